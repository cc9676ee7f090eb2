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
