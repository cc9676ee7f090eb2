"""Shared by the experiment scripts: running the CLI as a user would, and keeping results of
architectures not rerun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH_ORDER = ["llama", "gpt2", "qwen2", "gpt_neox"]


def cli(*args: str) -> str:
    """Run the steering CLI as a user would; return its output."""
    done = subprocess.run([sys.executable, "-m", "steering.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"steering {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def previous(path: Path, rerun: list[str]) -> list[dict]:
    """The results in ``path`` of the architectures not in ``rerun``."""
    old = json.loads(path.read_text()) if path.exists() else []
    return [r for r in old if r["arch"] not in rerun]


def add(results: list[dict], r: dict) -> None:
    results.append(r)
    results.sort(key=lambda x: ARCH_ORDER.index(x["arch"]))


def machine() -> str:
    """CPU model, cores, RAM, Python and torch versions: the line every benchmark table starts with."""
    import os
    import platform

    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    mem = next((int(l.split()[1]) // 2**20 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    return (f"{cpu}, {os.cpu_count()} cores, {mem} GiB RAM, Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


BENCHMARKS = ROOT / "experiments" / "results" / "BENCHMARKS.md"
BENCH_ORDER = ["decode", "record", "stream", "safeinfer"]
_BENCH_HEAD = """# Benchmarks

Written by the `experiments/bench_*.py` scripts, each of which replaces its own section (so the
sections may come from different runs; each names its command and machine). Every ratio is
measured side by side in one run; medians of interleaved repeats. Rival tools:
`pip install -e ".[bench]"` (nnsight, mergekit). What the numbers mean, where targets are missed
and why: docs/benchmarks.md.

Floors, by benchmark:
1. Decoding: plain Hugging Face `generate` on the same model, inputs and cache settings.
2. Recording: the same batches through the model with nothing attached.
3. Streaming edits: `cat` of the inputs to /dev/null plus a `cat` copy of one checkpoint, i.e.
   every input byte read once and every output byte written once, through a warm page cache
   (the inputs fit in RAM, so this is memory bandwidth, not disk). A row "bare torch +
   safetensors" gives the least a Python tool that does float32 arithmetic can do.
4. SafeInfer: guided decoding needs the unsafe model's forward pass at every step, so its floor
   is plain decoding of both models one after the other.
"""


def bench_section(key: str, title: str, body: str) -> None:
    """Replace benchmark ``key``'s section of experiments/results/BENCHMARKS.md (sections in BENCH_ORDER)."""
    import re

    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else _BENCH_HEAD
    sections = dict(re.findall(r"<!-- bench:(\w+) -->\n(.*?)<!-- /bench:\1 -->\n", text, flags=re.S))
    sections[key] = f"## {title}\n\n{body.rstrip()}\n\n"
    out = _BENCH_HEAD + "".join(f"\n<!-- bench:{k} -->\n{sections[k]}<!-- /bench:{k} -->\n" for k in BENCH_ORDER if k in sections)
    BENCHMARKS.write_text(out)


def interleaved(jobs: dict, repeats: int, verbose: bool = False) -> dict:
    """Wall seconds of each of ``jobs`` (key -> no-argument callable), ``repeats`` times, in
    alternating forward and reverse order, so that drifting load on the machine hits them alike."""
    import time

    times: dict = {k: [] for k in jobs}
    for rep in range(repeats):
        for k in (list(jobs) if rep % 2 == 0 else list(jobs)[::-1]):
            t0 = time.perf_counter()
            jobs[k]()
            times[k].append(time.perf_counter() - t0)
            if verbose:
                print(f"[{rep + 1}/{repeats}] {k}: {times[k][-1]:.2f} s", flush=True)
    return times


def pct(x: float) -> str:
    """A rate as a percentage with one decimal, as every results table prints it."""
    return f"{100 * x:.1f}%"


def write_results(out: Path, data: object, lines: list[str]) -> None:
    """``out``.json (the data) and ``out``.md (the lines), and the lines printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
