"""Benchmark 2: recording means at every layer, over bare forward passes and beside TransformerLens.

    python experiments/bench_record.py [--repeats 3]   # writes its section of experiments/results/BENCHMARKS.md and bench_record.json

A random Llama-shaped model (d 512, 8 layers, MLP 1536; the toolkit's small test tokenizer) runs
512 prompts of the shipped ``harmless`` set (cycled) in batches of 32:

- **bare**: the same batches through ``model(**batch)`` with nothing attached;
- **steering**: ``steering.record(model, prompts, layers=all, positions="last")`` — the running
  mean of the last token's residual stream entering every layer;
- **TransformerBridge**: ``run_with_cache`` (names filtered to those hook points) on the same
  batches, the means accumulated by hand, as a TransformerLens user would.

All three are checked to give the same means, then timed interleaved; medians of ``--repeats``
are reported as ratios to bare (target for steering ≤ 1.10×). Peak RSS (VmHWM) is measured in a
fresh process for 512 and 4,096 prompts (the same 512, cycled), for bare forward passes, steering
and the bridge: flat memory means the 4,096 figure equals the 512 one.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "experiments" / "results"

import torch  # noqa: E402

from _util import bench_section, interleaved, machine  # noqa: E402

SHAPE = dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1536, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False)
BATCH = 32


def setup(folder: Path):
    """The steering Model, the bridge (or None) and the formatted prompt texts."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import steering as st
    from steering.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = LlamaConfig(**SHAPE, vocab_size=len(tok))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()  # as the bridge runs it
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    return st.load(hf, tok), hf, tok


def prompts(n: int) -> list[str]:
    """``n`` prompts: the first 512 of the ``harmless`` set, cycled, so that 4,096 prompts are the
    same batches eight times and any growth of memory is the recorder's, not a longer batch's."""
    import steering as st

    base = st.datasets.load("harmless")[:512]
    return [base[i % len(base)] for i in range(n)]


def batches(m, texts: list[str]) -> list[dict]:
    return [m.encode(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)]


def bare(m, texts: list[str]) -> None:
    with torch.inference_mode():
        for i in range(0, len(texts), BATCH):
            batch = m.encode(texts[i:i + BATCH])
            m.hf(**batch, use_cache=False)


def ours(m, raw: list[str]) -> torch.Tensor:
    from steering.record import record

    return record(m, raw, positions="last", batch_size=BATCH, progress=False).mean("resid_pre")[:, 0].double()


def bridge_means(bridge, m, texts: list[str]) -> torch.Tensor:
    import _bench_rivals as rivals

    # A generator: one batch encoded at a time, so the bridge is not charged for holding all batches.
    return rivals.bridge_record_means(bridge, (m.encode(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)))


def hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(tool: str, n: int) -> None:
    """Measured in a fresh process: peak RSS of recording ``n`` prompts, and the RSS before it."""
    import psutil

    with tempfile.TemporaryDirectory() as folder:
        m, hf, tok = setup(Path(folder))
        raw = prompts(n)
        bridge = None
        if tool == "bridge":
            import _bench_rivals as rivals

            bridge = rivals.bridge_of(copy.deepcopy(hf), tok, folder)
        texts = m.format(raw)
        bare(m, texts[:BATCH])  # one batch first: what any run pays
        before = psutil.Process().memory_info().rss
        if tool == "steering":
            ours(m, raw)
        elif tool == "bridge":
            bridge_means(bridge, m, texts)
        else:
            bare(m, texts)
        print("RESULT", before, hwm())


def rss(tool: str, n: int) -> tuple[int, int]:
    done = subprocess.run([sys.executable, __file__, "--child", tool, str(n)], capture_output=True, text=True, cwd=ROOT)
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT")]
    if done.returncode != 0 or not line:
        raise RuntimeError(done.stderr[-3000:])
    _, before, peak = line[0].split()
    return int(before), int(peak)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]))

    import _bench_rivals as rivals

    folder = Path(tempfile.mkdtemp(prefix="bench-record-"))
    m, hf, tok = setup(folder)
    bridge = rivals.bridge_of(copy.deepcopy(hf), tok, str(folder))  # the bridge changes the model it wraps
    raw = prompts(args.prompts)
    texts = m.format(raw)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches(m, texts))
    a, b = ours(m, raw), bridge_means(bridge, m, texts)
    ref = torch.zeros_like(a)
    with torch.inference_mode():  # a third opinion: the HF hidden states
        for batch in batches(m, texts):
            hs = m.hf(**batch, output_hidden_states=True, use_cache=False).hidden_states
            ref += torch.stack([h[:, -1] for h in hs[:-1]]).double().sum(1)
    ref /= len(texts)
    for name, got in (("steering", a), ("bridge", b)):
        err = float((got - ref).abs().max())
        if err > 1e-4:
            raise SystemExit(f"{name}'s means differ from the hidden states by {err}")
    jobs = {"bare forward": lambda: bare(m, texts), "steering.record": lambda: ours(m, raw),
            "TransformerBridge run_with_cache": lambda: bridge_means(bridge, m, texts)}
    times = interleaved(jobs, args.repeats, verbose=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {(tool, n): rss(tool, n) for tool in ("bare", "steering", "bridge") for n in (512, 4096)}
    for k, v in mem.items():
        print(k, f"before {v[0] / 2**20:.0f} MB, peak {v[1] / 2**20:.0f} MB", flush=True)

    n_params = sum(p.numel() for p in hf.parameters())
    meta = {"command": "python experiments/bench_record.py", "machine": machine(),
            "model": f"Llama-shaped, {n_params / 1e6:.0f}M parameters, float32, random weights, {m.n_layers} layers",
            "work": f"{args.prompts} prompts ({n_tokens} tokens with the chat template), batches of {BATCH}, "
                    "resid_pre of every layer at the last token", "repeats": args.repeats}
    rows = [{"job": k, "median_s": med[k], "runs_s": times[k], "ratio_to_bare": med[k] / med["bare forward"]} for k in jobs]
    memrows = [{"tool": t, "prompts": n, "rss_before_mb": v[0] / 2**20, "peak_mb": v[1] / 2**20,
                "growth_mb": (v[1] - v[0]) / 2**20} for (t, n), v in mem.items()]
    (RESULTS / "bench_record.json").write_text(json.dumps({"meta": meta, "rows": rows, "memory": memrows}, indent=2) + "\n")
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Model: {meta['model']}  ",
             f"Work: {meta['work']}; median of {args.repeats} interleaved runs (target for steering: ≤ 1.10× bare)", "",
             "| job | median (s) | runs (s) | × bare |", "|---|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['job']} | {r['median_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['runs_s'])} | **{r['ratio_to_bare']:.3f}×** |")
    lines += ["", "Peak RSS in a fresh process (VmHWM), and its growth over the RSS after loading and one batch:", "",
              "| tool | 512 prompts: peak (growth) | 4,096 prompts: peak (growth) |", "|---|---:|---:|"]
    for t, name in (("bare", "bare forward"), ("steering", "steering.record"), ("bridge", "TransformerBridge run_with_cache")):
        cells = [next(r for r in memrows if r["tool"] == t and r["prompts"] == n) for n in (512, 4096)]
        lines.append(f"| {name} | " + " | ".join(f"{c['peak_mb']:.0f} MB ({c['growth_mb']:+.0f} MB)" for c in cells) + " |")
    bench_section("record", "2. Recording activations", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
