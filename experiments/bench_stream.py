"""Benchmark 3: streaming checkpoint edits on a ~1.1B-parameter Llama-shaped bf16 checkpoint.

    python experiments/bench_stream.py [--repeats 3] [--cache DIR]   # writes its section of experiments/results/BENCHMARKS.md and bench_stream.json

Three random checkpoints (``base``, ``ft`` = base + noise, ``tgt`` = base + other noise) of the
TinyLlama-1.1B shape (d 2048, 22 layers, MLP 5632, 32k vocabulary, untied head), bf16, in 5 shards,
are generated once into ``--cache`` (default ``~/.cache/steering/bench``). Then, in one run, each
job is timed as a fresh process, side by side with the floor of the same bytes, ``--repeats`` times
in interleaved order (medians reported; ``sync`` before each, untimed; outputs deleted after):

- **HDR**: ``steering run`` of a recipe computing τ = ft − base on the fly and writing
  tgt − 3·topk₁₀%(τ) with the exact *global* top 10% — against ``cat base ft > /dev/null`` and a copy
  of tgt's files with ``cat``
  (every input read once, the output written once);
- **orthogonalisation + write**: ``steering bake base --edit abl`` (streamed) — against copying base;
- **task arithmetic** (base + (ft − base)), ours (``steering run``) and **mergekit**'s
  ``task_arithmetic`` (``mergekit-yaml``, output shards of the inputs' size) — against
  reading base and copying ft.

Peak RSS is the process's maximum resident set (``/usr/bin/time``'s %M) and is compared with the
largest input shard; the page cache is warm for every command alike (the inputs fit in RAM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "experiments" / "results"

from _util import bench_section, machine  # noqa: E402

SHAPE = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
             rms_norm_eps=1e-5)
N_SHARDS = 5


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPE, dtype="bfloat16", architectures=["LlamaForCausalLM"])


def generate(cache: Path) -> dict[str, Path]:
    """base, ft and tgt checkpoints (bf16, 5 shards), generated once; returns their folders."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folders = {k: cache / f"llama-1.1b-{k}" for k in ("base", "ft", "tgt")}
    if all((f / "DONE").exists() for f in folders.values()):
        for f in folders.values():
            _config().save_pretrained(f)
        return folders
    cfg = _config()
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    shapes = {n: tuple(p.shape) for n, p in meta.state_dict().items()}
    total = sum(torch.Size(s).numel() for s in shapes.values())
    per_shard, shards, size = total / N_SHARDS, [[]], 0
    for n, s in shapes.items():
        if size >= per_shard * len(shards) and len(shards) < N_SHARDS:
            shards.append([])
        shards[-1].append(n)
        size += torch.Size(s).numel()
    for kind, folder in folders.items():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        cfg.save_pretrained(folder)
        weight_map = {}
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for j, n in enumerate(names):
                g = torch.Generator().manual_seed(1000 * i + j)
                t = torch.randn(shapes[n], generator=g) * 0.02
                if kind != "base":
                    g2 = torch.Generator().manual_seed(10**6 * (1 if kind == "ft" else 2) + 1000 * i + j)
                    t += torch.randn(shapes[n], generator=g2) * 0.002
                if n.endswith("norm.weight"):
                    t = torch.ones(shapes[n])
                tensors[n] = t.to(torch.bfloat16)
                weight_map[n] = fname
            save_file(tensors, str(folder / fname), metadata={"format": "pt"})
            del tensors
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=2))
        (folder / "DONE").write_text("")
        print(f"generated {folder} ({total / 1e9:.2f}B parameters)", flush=True)
    return folders


# The least a Python tool can do for base + (ft − base): safetensors + torch, shard by shard, float32
# arithmetic, no checks, no provenance, each output shard held whole until written.
BARE = """
import os, sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
base, ft, out = sys.argv[1:4]
os.makedirs(out)
for f in sorted(os.listdir(ft)):
    if f.endswith(".safetensors"):
        res = {}
        with safe_open(f"{ft}/{f}", "pt") as a, safe_open(f"{base}/{f}", "pt") as b:
            for n in a.keys():
                t = b.get_tensor(n)
                res[n] = (t.float() + (a.get_tensor(n).float() - t.float())).to(t.dtype)
        save_file(res, f"{out}/{f}")
"""


def timed(cmd: str) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a shell command run under /usr/bin/time."""
    subprocess.run("sync", shell=True, check=True)
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", tf.name, "bash", "-c", cmd],
                              capture_output=True, text=True, cwd=ROOT)
        secs = time.perf_counter() - t
        if done.returncode != 0:
            raise RuntimeError(f"{cmd} failed:\n{done.stderr[-3000:]}")
        return secs, int(tf.read().strip().splitlines()[-1]) * 1024


def startup_rss(code: str) -> int:
    """Peak RSS of a Python process that only imports what a command imports."""
    return timed(f"{sys.executable} -c '{code}'")[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("STEERING_CACHE", Path.home() / ".cache/steering")) / "bench")
    args = ap.parse_args()
    import torch

    from steering.edits import Ablation

    ck = generate(args.cache)
    base, ft, tgt = (str(ck[k]) for k in ("base", "ft", "tgt"))
    shard_bytes = max(p.stat().st_size for p in ck["base"].glob("*.safetensors"))
    ck_bytes = sum(p.stat().st_size for p in ck["base"].glob("*.safetensors"))
    params_per_shard = int(shard_bytes / 2)
    work = Path(tempfile.mkdtemp(prefix="bench-stream-", dir=args.cache))
    try:
        Ablation(torch.randn(1, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(0))).save(work / "abl.safetensors")
        (work / "hdr.yaml").write_text(
            f"model: {tgt}\nout: {work / 'out'}\nsteps:\n  - hdr:\n      harm: {{base: {base}, finetuned: {ft}}}\n"
            "      scale: 3.0\n      top_k: 0.1\n")
        (work / "ta.yaml").write_text(
            f"model: {base}\nout: {work / 'out'}\nsteps:\n  - task_arithmetic:\n"
            f"      vectors: [{{base: {base}, finetuned: {ft}}}]\n      scale: 1.0\n")
        (work / "mergekit.yaml").write_text(
            f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft}\n    parameters:\n"
            "      weight: 1.0\ndtype: bfloat16\n")
        steer = f"{sys.executable} -m steering.cli"
        out = work / "out"
        def copy(src: str) -> str:  # write every shard's bytes with cat (cp may take other paths, copy_file_range)
            return f"mkdir {out} && for f in {src}/*; do cat $f > {out}/$(basename $f); done"

        jobs = {
            "hdr: floor (cat base ft; copy tgt)": f"cat {base}/*.safetensors {ft}/*.safetensors > /dev/null && {copy(tgt)}",
            "hdr: steering run (τ = ft − base, exact global top 10%, λ = 3)": f"{steer} run {work / 'hdr.yaml'}",
            "bake: floor (copy base)": copy(base),
            "bake: steering bake (orthogonalisation, streamed)": f"{steer} bake {base} --edit {work / 'abl.safetensors'} --out {out}",
            "task arithmetic: floor (cat base; copy ft)": f"cat {base}/*.safetensors > /dev/null && {copy(ft)}",
            "task arithmetic: steering run": f"{steer} run {work / 'ta.yaml'}",
            "task arithmetic: bare torch + safetensors (no checks, no provenance)": (
                f"{sys.executable} -c '{BARE}' {base} {ft} {out}"),
            "task arithmetic: mergekit-yaml": (f"mergekit-yaml {work / 'mergekit.yaml'} {out} --no-copy-tokenizer --quiet "
                                               f"--out-shard-size {params_per_shard}"),
        }
        times: dict[str, list[float]] = {k: [] for k in jobs}
        peaks: dict[str, list[int]] = {k: [] for k in jobs}
        for r in range(args.repeats):
            for label, cmd in jobs.items():
                shutil.rmtree(out, ignore_errors=True)
                secs, peak = timed(cmd)
                times[label].append(secs)
                peaks[label].append(peak)
                print(f"[{r + 1}/{args.repeats}] {label}: {secs:.1f} s, peak RSS {peak / 2**20:.0f} MB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        start = {"steering": startup_rss("import torch, steering.cli, steering.weights.taskvec, steering.recipe"),
                 "mergekit": startup_rss("import torch, mergekit.merge, mergekit.scripts.run_yaml"),
                 "bare": startup_rss("import torch, safetensors.torch")}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: max(v) for k, v in peaks.items()}
    floor_of = {"hdr": "hdr: floor (cat base ft; copy tgt)", "bake": "bake: floor (copy base)",
                "task arithmetic": "task arithmetic: floor (cat base; copy ft)"}
    rows = []
    for label in jobs:
        group = label.split(":")[0]
        is_floor = label == floor_of[group]
        tool = "mergekit" if "mergekit" in label else "bare" if "bare" in label else "steering"
        grown = "" if is_floor else f"{(peak[label] - start[tool]) / shard_bytes:.2f}×"
        rows.append({"job": label, "median_s": round(med[label], 2), "runs_s": [round(t, 2) for t in times[label]],
                     "ratio_to_floor": round(med[label] / med[floor_of[group]], 2),
                     "peak_rss_mb": round(peak[label] / 2**20), "peak_over_largest_shard": round(peak[label] / shard_bytes, 2),
                     "growth_over_largest_shard": grown})
    meta = {"command": "python experiments/bench_stream.py" + (f" --repeats {args.repeats}" if args.repeats != 3 else ""),
            "machine": machine(), "checkpoint": f"{sum(1 for _ in ck['base'].glob('*.safetensors'))} shards, "
            f"{ck_bytes / 2**30:.2f} GiB bf16, largest shard {shard_bytes / 2**20:.0f} MiB",
            "startup_rss_mb": {k: round(v / 2**20) for k, v in start.items()}}
    (RESULTS / "bench_stream.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Checkpoints: {meta['checkpoint']}  ",
             f"Start-up RSS (imports only): steering {meta['startup_rss_mb']['steering']} MB, "
             f"mergekit {meta['startup_rss_mb']['mergekit']} MB, torch + safetensors {meta['startup_rss_mb']['bare']} MB", "",
             "| job | median (s) | runs (s) | × floor | peak RSS | peak − start-up, in largest shards |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['job']} | {r['median_s']:.1f} | {', '.join(f'{t:.1f}' for t in r['runs_s'])} | "
                     f"**{r['ratio_to_floor']:.2f}×** | {r['peak_rss_mb']} MB | {r['growth_over_largest_shard']} |")
    bench_section("stream", "3. Streaming checkpoint edits", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
