"""The streamed weight edits write the same tensor bytes as an earlier version of steering.

    python experiments/stream_identity.py [--against d5953f5] [--layers 4]
    # writes experiments/results/stream_identity.md and .json

Runs task arithmetic (base + (ft − base)), HDR (tgt − 3·topk₁₀%(ft − base), exact global top-k)
and the streamed orthogonalisation on bench_stream.py's checkpoints of the given size, once with
this checkout and once with the revision ``--against`` (checked out with ``git worktree`` into a
temporary folder), each in a fresh process, and compares the SHA-256 of every output tensor's
bytes (the metadata differs by design: paths, versions). Default: the revision before the
streaming rewrite (issue 22), on the 0.31B checkpoints.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
sys.path.insert(0, str(ROOT / "experiments"))

CHILD = r"""
import hashlib, json, sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
from steering.weights.files import Checkpoint
from steering.weights.taskvec import TaskVector, apply, hdr
from steering.weights.bake import bake_ablation_stream
from steering.edits import Ablation
job, base, ft, tgt, out = sys.argv[1:6]
t = time.perf_counter()
if job == "task arithmetic":
    apply(base, TaskVector.between(base, ft), out)
elif job == "hdr":
    hdr(tgt, TaskVector.between(base, ft), out, scale=3.0, top_k=0.1)
else:
    bake_ablation_stream(Ablation(torch.randn(1, 2048, generator=torch.Generator().manual_seed(0))), base, out)
secs = time.perf_counter() - t
ck = Checkpoint(out)
digests = {n: hashlib.sha256(ck.get(n).reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest() for n in ck.names}
print(json.dumps({"secs": secs, "digests": digests}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", default="d5953f5", help="the git revision to compare with")
    ap.add_argument("--layers", type=int, default=4, help="bench_stream.py's checkpoint size (4, 10 or 22 layers)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "steering" / "bench")
    args = ap.parse_args()
    from bench_stream import generate

    ck = generate(args.cache, args.layers)
    rev = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    here = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), rev], cwd=ROOT, check=True, capture_output=True)
        try:
            for job in ("task arithmetic", "hdr", "orthogonalisation"):
                got = {}
                for who, src in (("old", old), ("new", ROOT)):
                    out = Path(tmp) / f"out-{who}"
                    done = subprocess.run([sys.executable, "-c", CHILD, job, str(ck["base"]), str(ck["ft"]), str(ck["tgt"]),
                                           str(out)], cwd=tmp, capture_output=True, text=True,
                                          env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                                               "OMP_NUM_THREADS": "1"})
                    if done.returncode:
                        raise RuntimeError(f"{job} ({who}): {done.stderr[-2000:]}")
                    got[who] = json.loads(done.stdout.strip().splitlines()[-1])
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                same = got["old"]["digests"] == got["new"]["digests"]
                differ = sorted(n for n in got["old"]["digests"] if got["old"]["digests"][n] != got["new"]["digests"].get(n))
                rows.append({"job": job, "tensors": len(got["new"]["digests"]), "identical": same, "differ": differ[:5],
                             "old_s": round(got["old"]["secs"], 1), "new_s": round(got["new"]["secs"], 1)})
                print(rows[-1], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    meta = {"command": f"python experiments/stream_identity.py --against {args.against} --layers {args.layers}",
            "against": rev, "this": here, "when": time.strftime("%Y-%m-%d"), "checkpoint": ck["base"].name}
    (RESULTS / "stream_identity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Streamed edits: the same bytes as before", "",
             f"`{meta['command']}` ({meta['when']}): this checkout ({here}) against {rev}, on bench_stream.py's "
             f"`{meta['checkpoint'].rsplit('-', 1)[0]}` checkpoints (bf16, 5 shards), each job in a fresh process with one "
             "thread; SHA-256 of every output tensor's bytes compared (metadata differs by design).", "",
             "| job | tensors | identical | seconds, before → now (one thread, API call only) |", "|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['job']} | {r['tensors']} | {'yes' if r['identical'] else 'NO: ' + ', '.join(r['differ'])} | "
                     f"{r['old_s']} → {r['new_s']} |")
    (RESULTS / "stream_identity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
