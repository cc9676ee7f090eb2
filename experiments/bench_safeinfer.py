"""Benchmark 4: SafeInfer decoding over plain decoding, against its floor of two forward passes.

    python experiments/bench_safeinfer.py [--repeats 5] [--new-tokens 32]
    # writes its section of experiments/results/BENCHMARKS.md and bench_safeinfer.json

Two random Llama-shaped models of ~155M parameters (the guarded model and the "unsafe" one, same
shape and tokenizer, different weights; float32) decode greedily with the KV cache, at batch 1
and 8, ``--new-tokens`` tokens (EOS ignored) from chat-formatted prompts of the shipped ``harmless``
set, four ways through ``steering.safeinfer.generate``: plain, safety amplification (an addition at
the middle layer's last position), guided decoding (γ = 99, the unsafe model's forward pass at every
step) and both. The floor of guided decoding is plain decoding of both models one after the other
(two forward passes per token, nothing else), timed in the same run. Medians of ``--repeats``
interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "experiments" / "results"

import torch  # noqa: E402

from _util import bench_section, interleaved, machine  # noqa: E402

SHAPE = dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2816, num_attention_heads=12,
             num_key_value_heads=12, vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False)


def build(seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    import steering as st
    from steering.testing import tiny_tokenizer

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE)).eval()
    return st.load(hf, tiny_tokenizer())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()

    import steering as st
    from steering import safeinfer

    D, U = build(0), build(1)
    amp = safeinfer.amplifier(D, scale=8.0, n_demos=16, n_queries=16)
    n_new = args.new_tokens
    gen = dict(max_new_tokens=n_new, eos_token_id=None)
    modes = {"plain": {}, "amplification": {"amplify": amp}, "guided": {"unsafe": U}, "both": {"amplify": amp, "unsafe": U}}
    rows = []
    for bs in args.batches:
        prompts = st.datasets.load("harmless:val", limit=bs)
        run = {m: (lambda kw=kw: safeinfer.generate(D, prompts, batch_size=bs, **gen, **kw)) for m, kw in modes.items()}
        run["floor: plain, both models"] = lambda: (D.generate(prompts, batch_size=bs, **gen), U.generate(prompts, batch_size=bs, **gen))
        for f in run.values():  # warm-up
            f()
        times = interleaved(run, args.repeats)
        plain = statistics.median(times["plain"])
        for k, ts in times.items():
            med = statistics.median(ts)
            rows.append({"batch": bs, "mode": k, "median_s": med, "runs_s": ts, "tokens_per_s": bs * n_new / med,
                         "speed_vs_plain": plain / med})
            print(f"batch {bs} {k:28s} {med:.3f} s  {plain / med:.2f}× plain speed", flush=True)
    n_params = sum(p.numel() for p in D.hf.parameters())
    meta = {"command": "python experiments/bench_safeinfer.py", "machine": machine(),
            "models": f"two Llama-shaped models, {n_params / 1e6:.0f}M parameters each, float32, random weights",
            "decoding": f"greedy, KV cache on, {n_new} new tokens", "repeats": args.repeats}
    (RESULTS / "bench_safeinfer.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Models: {meta['models']}  ",
             f"Decoding: {meta['decoding']}; median of {args.repeats} interleaved runs; speed relative to plain decoding "
             "in the same run (1.00× = as fast; the floor of guided decoding is the last row)", "",
             "| decoding | " + " | ".join(f"batch {b}" for b in args.batches) + " |", "|---|" + "---:|" * len(args.batches)]
    for mode in [*modes, "floor: plain, both models"]:
        cells = [next(r for r in rows if r["batch"] == b and r["mode"] == mode) for b in args.batches]
        lines.append(f"| {mode} | " + " | ".join(f"{c['speed_vs_plain']:.2f}× ({c['tokens_per_s']:.0f} tok/s)" for c in cells) + " |")
    bench_section("safeinfer", "4. SafeInfer decoding", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
