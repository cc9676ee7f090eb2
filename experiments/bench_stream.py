"""Benchmark 3: streaming checkpoint edits on Llama-shaped bf16 checkpoints of three sizes.

    python experiments/bench_stream.py [--repeats 5] [--layers 4,10,22] [--device cuda] [--cache DIR]
    # writes its section of experiments/results/BENCHMARKS.md and bench_stream.json

For each size, three random checkpoints (``base``, ``ft`` = base + noise, ``tgt`` = base + other
noise) of the TinyLlama-1.1B shape (d 2048, MLP 5632, 32k vocabulary, untied head) with 4, 10 and
22 layers (0.31B, 0.57B and 1.10B parameters), bf16, in 5 shards, are generated once into
``--cache`` (default ``~/.cache/steering/bench``), so the cost's growth with the checkpoint's size
is measured, not assumed. ``--device`` is passed to steering's jobs (mergekit, the floors and the
bare loop run on the CPU). Then, in one run per size, each
job is timed as a fresh process, side by side with the floor of the same bytes, ``--repeats`` times
in interleaved order (medians reported). Before each, untimed: a read of the job's inputs and a
``sync``, so every job starts from the same warm page cache (this machine's kernel pages out what
has not been touched for a minute), and then, the last thing before the job, the previous job's
output is deleted. That order matters on a virtual machine with free page reporting
(virtio-balloon, as here): memory the guest frees is handed back to the host within seconds, and
writing into it again costs a host page fault per page. Deleted a second earlier, the 1.1B copy
floor took 4.8–5.1 s instead of 0.85 s; deleted just before, every job writes into memory freed a
moment ago, as on a machine without the balloon. steering's jobs run twice: with the
inputs' fingerprints remembered from an earlier edit (the cache is filled before the timed runs),
and with an empty ``$STEERING_CACHE`` (the architecture plans kept), so they hash their inputs:

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


NAMES = {22: "llama-1.1b", 10: "llama-0.6b", 4: "llama-0.3b"}
FLOOR_OF = {"hdr": "hdr: floor (cat base ft; copy tgt)", "bake": "bake: floor (copy base)",
            "task arithmetic": "task arithmetic: floor (cat base; copy ft)"}
TA, MK = "task arithmetic: steering run", "task arithmetic: mergekit-yaml"
HDR, BAKE = "hdr: steering run (τ = ft − base, exact global top 10%, λ = 3)", "bake: steering bake (orthogonalisation, streamed)"
HASHED = ", inputs hashed (no fingerprint remembered)"


def _config(layers: int = 22):
    from transformers import LlamaConfig

    return LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, dtype="bfloat16", architectures=["LlamaForCausalLM"])


def generate(cache: Path, layers: int = 22) -> dict[str, Path]:
    """base, ft and tgt checkpoints (bf16, 5 shards), generated once; returns their folders."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    name = NAMES.get(layers, f"llama-{layers}l")
    folders = {k: cache / f"{name}-{k}" for k in ("base", "ft", "tgt")}
    if all((f / "DONE").exists() for f in folders.values()):
        for f in folders.values():
            _config(layers).save_pretrained(f)
        return folders
    cfg = _config(layers)
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


def run_size(args: argparse.Namespace, layers: int) -> dict:
    """Every job on the checkpoints of one size, interleaved, ``--repeats`` times; their rows."""
    import torch

    from steering.edits import Ablation
    from steering.weights import Checkpoint

    ck = generate(args.cache, layers)
    base, ft, tgt = (str(ck[k]) for k in ("base", "ft", "tgt"))
    shard_bytes = max(p.stat().st_size for p in ck["base"].glob("*.safetensors"))
    ck_bytes = sum(p.stat().st_size for p in ck["base"].glob("*.safetensors"))
    params_per_shard = int(shard_bytes / 2)
    dev = f" --device {args.device}" if args.device else ""
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
        for folder in (base, ft, tgt):  # fingerprints remembered before the timed runs (a later edit's case)
            Checkpoint(folder).fingerprint()
        plans = Path(os.environ.get("STEERING_CACHE", Path.home() / ".cache" / "steering")) / "plans"
        plans.mkdir(parents=True, exist_ok=True)

        def hashing(cmd: str) -> str:  # the first edit of these inputs: an empty cache (the plans kept)
            return (f"c=$(mktemp -d) && ln -s {plans} $c/plans && STEERING_CACHE=$c {cmd}; s=$?; rm -rf $c; exit $s")

        def copy(src: str) -> str:  # write every shard's bytes with cat (cp may take other paths, copy_file_range)
            return f"mkdir {out} && for f in {src}/*; do cat $f > {out}/$(basename $f); done"

        hdr_cmd = f"{steer} run {work / 'hdr.yaml'}{dev}"
        bake_cmd = f"{steer} bake {base} --edit {work / 'abl.safetensors'} --out {out}{dev}"
        ta_cmd = f"{steer} run {work / 'ta.yaml'}{dev}"
        jobs = {  # label: (command, the folders it reads)
            "hdr: floor (cat base ft; copy tgt)": (f"cat {base}/*.safetensors {ft}/*.safetensors > /dev/null && {copy(tgt)}",
                                                   (base, ft, tgt)),
            HDR: (hdr_cmd, (base, ft, tgt)),
            HDR + HASHED: (hashing(hdr_cmd), (base, ft, tgt)),
            "bake: floor (copy base)": (copy(base), (base,)),
            BAKE: (bake_cmd, (base,)),
            BAKE + HASHED: (hashing(bake_cmd), (base,)),
            "task arithmetic: floor (cat base; copy ft)": (f"cat {base}/*.safetensors > /dev/null && {copy(ft)}", (base, ft)),
            TA: (ta_cmd, (base, ft)),
            TA + HASHED: (hashing(ta_cmd), (base, ft)),
            "task arithmetic: bare torch + safetensors (no checks, no provenance)": (
                f"{sys.executable} -c '{BARE}' {base} {ft} {out}", (base, ft)),
            MK: (f"mergekit-yaml {work / 'mergekit.yaml'} {out} --no-copy-tokenizer --quiet "
                 f"--out-shard-size {params_per_shard}", (base, ft)),
        }
        times: dict[str, list[float]] = {k: [] for k in jobs}
        peaks: dict[str, list[int]] = {k: [] for k in jobs}
        for r in range(args.repeats):
            for label, (cmd, inputs) in jobs.items():
                subprocess.run(f"cat {' '.join(f'{i}/*.safetensors' for i in inputs)} > /dev/null && sync", shell=True,
                               check=True)
                shutil.rmtree(out, ignore_errors=True)  # the last thing before the job: see the module docstring
                secs, peak = timed(cmd)
                times[label].append(secs)
                peaks[label].append(peak)
                print(f"[{layers} layers, {r + 1}/{args.repeats}] {label}: {secs:.1f} s, peak RSS {peak / 2**20:.0f} MB",
                      flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"layers": layers, "params_b": round(ck_bytes / 2 / 1e9, 2), "gib": round(ck_bytes / 2**30, 2),
            "largest_shard_mib": round(shard_bytes / 2**20), "shard_bytes": shard_bytes,
            "times": times, "peaks": peaks, "jobs": list(jobs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", default="4,10,22", help="checkpoint sizes, as layer counts of the 1.1B shape")
    ap.add_argument("--device", help="passed to steering's jobs (e.g. cuda)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("STEERING_CACHE", Path.home() / ".cache/steering")) / "bench")
    args = ap.parse_args()
    sizes = [run_size(args, int(x)) for x in args.layers.split(",")]
    start = {"steering": startup_rss("import torch, steering.cli, steering.weights.taskvec, steering.recipe"),
             "mergekit": startup_rss("import torch, mergekit.merge, mergekit.scripts.run_yaml"),
             "bare": startup_rss("import torch, safetensors.torch")}
    rows, summary = [], []
    for sz in sizes:
        med = {k: statistics.median(v) for k, v in sz["times"].items()}
        peak = {k: max(v) for k, v in sz["peaks"].items()}
        for label in sz["jobs"]:
            group = label.split(":")[0]
            is_floor = label == FLOOR_OF[group]
            tool = "mergekit" if "mergekit" in label else "bare" if "bare" in label else "steering"
            grown = None if is_floor else round((peak[label] - start[tool]) / sz["shard_bytes"], 2)
            rows.append({"size": f"{sz['params_b']:.2f}B", "job": label, "median_s": round(med[label], 2),
                         "runs_s": [round(t, 2) for t in sz["times"][label]],
                         "ratio_to_floor": round(med[label] / med[FLOOR_OF[group]], 2),
                         "peak_rss_mb": round(peak[label] / 2**20), "growth_over_largest_shard": grown})
        growth = {k: round((peak[k] - start["steering"]) / sz["shard_bytes"], 2)
                  for k in (TA, HDR, BAKE, TA + HASHED, HDR + HASHED, BAKE + HASHED)}
        for case, suffix in (("fingerprints remembered", ""), ("inputs hashed", HASHED)):
            ta, hd, bk = med[TA + suffix], med[HDR + suffix], med[BAKE + suffix]
            summary.append({"size": f"{sz['params_b']:.2f}B", "case": case, "gib": sz["gib"],
                            "largest_shard_mib": sz["largest_shard_mib"],
                            "ta_over_mergekit": round(ta / med[MK], 2),
                            "ta_over_floor": round(ta / med[FLOOR_OF["task arithmetic"]], 2),
                            "hdr_over_ta": round(hd / ta, 2),
                            "bake_over_floor": round(bk / med[FLOOR_OF["bake"]], 2),
                            "peak_growth_over_shard": max(v for k, v in growth.items() if k.endswith(HASHED) == bool(suffix)),
                            "ta_s": round(ta, 2), "hdr_s": round(hd, 2), "bake_s": round(bk, 2), "mergekit_s": round(med[MK], 2)})
    meta = {"command": "python experiments/bench_stream.py" + (f" --repeats {args.repeats}" if args.repeats != 5 else "")
            + (f" --layers {args.layers}" if args.layers != "4,10,22" else "") + (f" --device {args.device}" if args.device else ""),
            "machine": machine(), "startup_rss_mb": {k: round(v / 2**20) for k, v in start.items()},
            "device": args.device or "cpu"}
    (RESULTS / "bench_stream.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2) + "\n")
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             "Checkpoints: the TinyLlama-1.1B shape with 4, 10 and 22 layers, bf16, 5 shards each; "
             f"steering's arithmetic on the {meta['device']}  ",
             f"Start-up RSS (imports only): steering {meta['startup_rss_mb']['steering']} MB, "
             f"mergekit {meta['startup_rss_mb']['mergekit']} MB, torch + safetensors {meta['startup_rss_mb']['bare']} MB", "",
             "Targets, by size (medians; every job a fresh process, start-up included; *fingerprints remembered*: the "
             "inputs' SHA-256 known from an earlier edit of the same unchanged files, as when an edit is tried again "
             "or another made from the same model; *inputs hashed*: the first edit of these files, which hashes them "
             "as it reads them):", "",
             "| checkpoint | case | task arithmetic ÷ mergekit (≤ 0.5) | task arithmetic ÷ floor (≤ 6) | HDR ÷ task arithmetic (≤ 1.5) "
             "| orthogonalisation ÷ floor (≤ 5) | worst peak − start-up, in largest shards (≤ 1.5) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for sm in summary:
        lines.append(f"| {sm['size']} ({sm['gib']:.2f} GiB, largest shard {sm['largest_shard_mib']} MiB) | {sm['case']} | "
                     f"{sm['ta_over_mergekit']:.2f} ({sm['ta_s']:.1f} s vs {sm['mergekit_s']:.1f} s) | {sm['ta_over_floor']:.2f} | "
                     f"{sm['hdr_over_ta']:.2f} ({sm['hdr_s']:.1f} s) | {sm['bake_over_floor']:.2f} ({sm['bake_s']:.1f} s) | "
                     f"{sm['peak_growth_over_shard']:.2f} |")
    lines += ["", "Every job:", "", "| size | job | median (s) | runs (s) | × floor | peak RSS | peak − start-up, in largest shards |",
              "|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        g = "" if r["growth_over_largest_shard"] is None else f"{r['growth_over_largest_shard']:.2f}×"
        lines.append(f"| {r['size']} | {r['job']} | {r['median_s']:.1f} | {', '.join(f'{t:.1f}' for t in r['runs_s'])} | "
                     f"**{r['ratio_to_floor']:.2f}×** | {r['peak_rss_mb']} MB | {g} |")
    bench_section("stream", "3. Streaming checkpoint edits", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
