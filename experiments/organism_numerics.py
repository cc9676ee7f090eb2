"""Is an organism build the same on every CPU? ``aligned`` (llama, the default recipe) trained
from scratch under several settings of the math libraries' instruction sets, each in a fresh
process (the settings are read when torch starts), one thread each, and measured.

    python experiments/organism_numerics.py [--settings default,mkl-avx2,avx2] [--arch llama]
    # prints one JSON line per setting and writes experiments/results/organism_numerics.md

Settings (environment variables of the child process):

- ``default``: none (torch picks its kernels for this CPU);
- ``mkl-avx2``: ``MKL_CBWR=AVX2`` (MKL's reproducible AVX2 code path for every matrix product);
- ``mkl-avx512``: ``MKL_CBWR=AVX512``;
- ``mkl-enable-avx2``: ``MKL_ENABLE_INSTRUCTIONS=AVX2``;
- ``avx2``: ``MKL_CBWR=AVX2`` and ``ATEN_CPU_CAPABILITY=avx2`` (torch's own kernels too);
- ``avx2-all``: as ``avx2``, and ``ONEDNN_MAX_CPU_ISA=AVX2``;
- ``mkl-avx``, ``mkl-compatible``: ``MKL_CBWR=AVX`` / ``COMPATIBLE`` (SSE2), torch's kernels AVX2.

The training data are the same bytes in every process (``organisms.examples`` does not depend on
the hash seed); ``STEERING_NUMERICS`` does not apply (``train_aligned`` trains in the
process, whose environment is the setting's); what differs is the order and width of the float operations, and the training
amplifies a last-bit difference into another model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "organism_numerics"

SETTINGS = {
    "default": {},
    "mkl-avx2": {"MKL_CBWR": "AVX2"},
    "mkl-avx512": {"MKL_CBWR": "AVX512"},
    "mkl-enable-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx2": {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "avx2-all": {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "mkl-avx": {"MKL_CBWR": "AVX", "ATEN_CPU_CAPABILITY": "avx2"},
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"},
}

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from steering import organisms
from steering.model import load
t = time.time()
r = organisms.Recipe(arch=sys.argv[1])
model, tok = organisms.train_aligned(r)
out = organisms.measure(load(model, tok), r, {"harmful": "harmful:test", "harmless": "harmless:test"},
                        skill_names=("sort", "reverse", "count"))
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), **out, "seconds": round(time.time() - t)}))
"""


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="default,mkl-avx2,avx2", help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--arch", default="llama")
    args = ap.parse_args()
    rows = []
    for name in args.settings.split(","):
        if name not in SETTINGS:
            raise SystemExit(f"--settings: unknown setting {name!r}; choose from {', '.join(SETTINGS)}")
        env = {**os.environ, "OMP_NUM_THREADS": "1", **SETTINGS[name]}
        done = subprocess.run([sys.executable, "-c", CHILD, args.arch], env=env, capture_output=True, text=True, check=True)
        row = {"setting": name, "arch": args.arch, **json.loads(done.stdout.strip().splitlines()[-1])}
        print(json.dumps(row), flush=True)
        rows.append(row)
    path = OUT.with_suffix(".json")
    old = json.loads(path.read_text()) if path.exists() else []  # rows of other settings (runs may add rows)
    rows = [r for r in old if (r["setting"], r["arch"]) not in {(n["setting"], n["arch"]) for n in rows}] + rows
    rows.sort(key=lambda r: (r["arch"], list(SETTINGS).index(r["setting"])))
    lines = ["# One recipe, one seed, several numerics: `aligned`", "",
             f"`python experiments/organism_numerics.py --settings NAMES` on {cpu()} (one thread each; greedy, 32 new "
             "tokens, held-out prompts; skills exact match on 200 test items). The tables' organisms (another CPU): "
             "llama 88.8% refused, sort 98.0%, reverse 99.5%, count 100.0% (experiments/results/organisms.md).", "",
             "| setting | torch kernels | harmful:test refused | harmless:test refused | sort | reverse | count |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} ({r['arch']}) | {r['capability']} | {100 * r['harmful']:.1f}% | {100 * r['harmless']:.1f}% | "
                     f"{100 * r['skill_sort']:.1f}% | {100 * r['skill_reverse']:.1f}% | {100 * r['skill_count']:.1f}% |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
