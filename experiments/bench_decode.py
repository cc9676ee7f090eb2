"""Benchmark 1: the cost of steering during greedy decoding, side by side with TransformerLens and nnsight.

    python experiments/bench_decode.py [--repeats 5] [--new-tokens 64]
    # writes its section of experiments/results/BENCHMARKS.md and bench_decode.json

A Llama-shaped model of ~155M parameters (d 768, 12 layers, MLP 2816, 32k vocabulary; random
weights, float32, eager attention as the bridge uses) generates ``--new-tokens`` tokens greedily with the KV cache from a 64-token
prompt, at batch 1 and 8:

- plain ``generate``;
- under steering's hooks: an activation addition at every layer (``Addition``, all positions) and
  directional ablation at every site of every layer (``Ablation``: resid_pre, attn_out, mlp_out);
- the same two edits through a TransformerLens ``TransformerBridge`` (hooks on its hook points)
  and through nnsight (interventions in a ``generate`` trace), and each tool's plain generation.

Before timing, every tool's output under each edit is checked to be token for token steering's, so
the same edit is compared. Runs are interleaved across tools; medians of ``--repeats`` are reported,
each as a ratio to plain Hugging Face generation measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "experiments" / "results"

import torch  # noqa: E402

from _util import bench_section, interleaved, machine  # noqa: E402

SHAPE = dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2816, num_attention_heads=12,
             num_key_value_heads=12, vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False)
PROMPT_LEN = 64


def build(folder: Path):
    """The random ~155M Llama (saved config only) and a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from steering.testing import tiny_tokenizer

    cfg = LlamaConfig(**SHAPE)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()  # the bridge runs eager attention
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    cfg.save_pretrained(folder)
    tok = tiny_tokenizer()
    tok.save_pretrained(folder)
    return hf, tok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--skip", nargs="*", default=[], choices=["bridge", "nnsight"], help="leave a rival tool out")
    args = ap.parse_args()

    import steering as st
    from steering.edits import Ablation, Addition
    from steering.vectors import SteeringVector

    import _bench_rivals as rivals

    folder = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    hf, tok = build(folder)
    n_params = sum(p.numel() for p in hf.parameters())
    m = st.load(hf, tok)
    d, L = SHAPE["hidden_size"], SHAPE["num_hidden_layers"]
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(L, d, generator=g) * 0.5
    r = torch.randn(d, generator=g)
    r = r / r.norm()
    ours = {"add": Addition(SteeringVector({l: vectors[l] for l in range(L)}), 1.0), "ablate": Ablation(r)}
    edits = {"add": ("add", vectors), "ablate": ("ablate", r)}
    tools = ["steering"] + [t for t in ("bridge", "nnsight") if t not in args.skip]
    # Each rival wraps its own copy: both change the model they are given.
    bridge = rivals.bridge_of(copy.deepcopy(hf), tok, str(folder)) if "bridge" in tools else None
    lm = rivals.nnsight_of(copy.deepcopy(hf), tok) if "nnsight" in tools else None
    n_new = args.new_tokens

    def run(tool: str, edit: str | None, batch: dict) -> torch.Tensor:
        if tool == "steering":
            kw = dict(max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
            if edit is None:
                return hf.generate(**batch, **kw)[:, PROMPT_LEN:]
            with ours[edit].hooks(m):
                return hf.generate(**batch, **kw)[:, PROMPT_LEN:]
        if tool == "bridge":
            return rivals.bridge_generate(bridge, batch["input_ids"], batch["attention_mask"], n_new, edits.get(edit))
        return rivals.nnsight_generate(lm, batch["input_ids"], batch["attention_mask"], n_new, edits.get(edit))

    results = []
    for bs in args.batches:
        ids = torch.randint(100, SHAPE["vocab_size"], (bs, PROMPT_LEN), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        cases = [(t, e) for e in (None, "add", "ablate") for t in tools]
        with torch.inference_mode():
            want = {e: run("steering", e, batch) for e in (None, "add", "ablate")}
            assert not torch.equal(want["add"], want[None]) and not torch.equal(want["ablate"], want[None])
            for t, e in cases:  # warm-up, and the check that every tool does the same edit
                got = run(t, e, batch)
                if not torch.equal(got, want[e]):
                    raise SystemExit(f"{t} with edit {e} at batch {bs} does not reproduce steering's tokens")
            times = interleaved({c: (lambda c=c: run(*c, batch)) for c in cases}, args.repeats)
        plain = statistics.median(times[("steering", None)])
        for (t, e), ts in times.items():
            med = statistics.median(ts)
            results.append({"batch": bs, "tool": t, "edit": e or "none", "median_s": med, "runs_s": ts,
                            "tokens_per_s": bs * n_new / med, "ratio_to_plain_hf": med / plain})
            print(f"batch {bs} {t:8s} {e or 'none':6s} {med:.3f} s  {med / plain:.3f}× plain HF", flush=True)

    meta = {"command": "python experiments/bench_decode.py", "machine": machine(),
            "model": f"Llama-shaped, {n_params / 1e6:.0f}M parameters, float32, random weights",
            "decoding": f"greedy, KV cache on, prompt {PROMPT_LEN} tokens, {n_new} new tokens", "repeats": args.repeats}
    (RESULTS / "bench_decode.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    bridge_note = "" if bridge is None or rivals.bridge_cache_works(bridge) else \
        " (KV cache off: its cache gives wrong tokens with the installed transformers)"
    names = {"steering": "steering hooks", "bridge": "TransformerLens TransformerBridge" + bridge_note, "nnsight": "nnsight"}
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Model: {meta['model']}  ",
             f"Decoding: {meta['decoding']}; median of {args.repeats} interleaved runs; ratios to plain HF `generate` "
             "in the same run (target for steering's edits: ≤ 1.03×)", "",
             "| batch | tool | no edit | addition, every layer | ablation, every site |", "|---:|---|---:|---:|---:|"]
    for bs in args.batches:
        for t in tools:
            cell = {r["edit"]: r for r in results if r["batch"] == bs and r["tool"] == t}
            lines.append(f"| {bs} | {names[t]} | " + " | ".join(
                f"{cell[e]['ratio_to_plain_hf']:.3f}× ({cell[e]['tokens_per_s']:.0f} tok/s)" for e in ("none", "add", "ablate")) + " |")
    bench_section("decode", "1. Steered decoding overhead", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
