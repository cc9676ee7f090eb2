"""Peak memory of a streamed weight edit, against the size of its inputs.

    python experiments/stream_memory.py [--tensors 96] [--mb 8]   # writes experiments/results/stream_memory.md

Three checkpoints (base, fine-tune, target) of ``--tensors`` float32 tensors of ``--mb`` MB each, in
6 shards, are written once; then, each in a fresh process, (1) ``steering task-vector`` with the
exact global top 10% and (2) ``steering hdr`` with the exact global top 10% run on them, and the
process's peak RSS (VmHWM) is compared with its RSS after start-up, the largest tensor and one
checkpoint. A non-streaming implementation would hold at least two whole checkpoints.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from steering.testing import save_sharded  # noqa: E402

RESULTS = ROOT / "experiments" / "results"

PROBE = """
import runpy, sys, psutil, threading, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import torch, steering.cli, steering.weights.taskvec, steering.weights  # start-up: what every command pays
torch.set_num_threads(1)
before = psutil.Process().memory_info().rss
t = time.perf_counter()
code = steering.cli.main(sys.argv[1:])
print("RESULT", before, hwm(), time.perf_counter() - t, code)
"""


def measure(args: list[str]) -> tuple[int, int, float]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT)
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT")]
    if done.returncode != 0 or not line:
        raise RuntimeError(done.stderr[-2000:])
    _, before, peak, secs, code = line[0].split()
    if code != "0":
        raise RuntimeError(done.stderr[-2000:])
    return int(before), int(peak), float(secs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=96)
    ap.add_argument("--mb", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stream-memory-"))
    try:
        n = args.mb * 2**20 // 4
        g = torch.Generator().manual_seed(0)
        for name, shift in (("base", 0.0), ("ft", 1.0), ("tgt", 2.0)):
            save_sharded({f"t{i:03d}": torch.randn(n, generator=g) + shift for i in range(args.tensors)}, work / name, 6)
        ck_mb = args.tensors * args.mb
        rows = []
        for label, cmd in (
            ("task-vector, exact global top 10%", ["task-vector", str(work / "base"), str(work / "ft"), "--top-k", "0.1",
                                                  "--out", str(work / "tau.safetensors")]),
            ("hdr, exact global top 10%", ["hdr", str(work / "tgt"), "--harm-vector", str(work / "tau.safetensors"),
                                          "--scale", "3", "--top-k", "0.1", "--out", str(work / "out")]),
        ):
            before, peak, secs = measure(cmd)
            grown = (peak - before) / 2**20
            rows.append(f"| `steering {label}` | {ck_mb} MB | {args.mb} MB | {before / 2**20:.0f} MB | {peak / 2**20:.0f} MB | "
                        f"**{grown:.0f} MB** ({grown / args.mb:.1f} tensors, {grown / ck_mb:.2f} checkpoints) | {secs:.1f} s |")
            print(rows[-1], flush=True)
        text = "\n".join([
            "# Peak memory of streamed weight edits", "",
            f"`python experiments/stream_memory.py --tensors {args.tensors} --mb {args.mb}` "
            f"({time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} threads available, 1 used). Three checkpoints of "
            f"{args.tensors} float32 tensors × {args.mb} MB in 6 shards; each command in a fresh process; growth = "
            "peak RSS (VmHWM) − RSS after start-up.", "",
            "| command | one checkpoint | largest tensor | RSS after start-up | peak RSS | growth | time |",
            "|---|---|---|---|---|---|---|", *rows, ""])
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "stream_memory.md").write_text(text)
        print(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
