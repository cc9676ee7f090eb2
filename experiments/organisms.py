"""Build the default model organisms of both families and measure what they can do and how far their refusal generalises.

    python experiments/organisms.py                  # writes experiments/results/organisms.md
    python experiments/organisms.py --sources llama  # ... with the leave-one-source-out builds (4 more trainings of aligned)

Rates on held-out prompts, greedy, 32 new tokens: refusal by the substring judge, skills by exact
match on their held-out test items (``steering.skills``). Three tables:

- the organisms (each build's own measurements: harmful:test, harmless:test, XSTest, skills);
- held-out frames: harmful:test and harmless:test prompts wrapped in a question, a story and a
  role frame that no training prompt was wrapped in (``organisms.HELD_OUT_FRAMES``);
- leave one source out: ``aligned`` trained without one of the four harmful sources (every prompt
  of it removed from training), tested on all of that source.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _util import write_results  # noqa: E402
from steering import datasets, organisms  # noqa: E402
from steering.datasets import _sources  # noqa: E402
from steering.model import load  # noqa: E402

OUT = Path(__file__).parent / "results" / "organisms"


def frames(path: Path, recipe: organisms.Recipe) -> dict[str, dict[str, float]]:
    """Refusal of the model at ``path`` on harmful:test and harmless:test in each held-out frame."""
    m = load(path)
    out = {}
    for name, frame in organisms.HELD_OUT_FRAMES.items():
        sets = {kind: [frame(p) for p in datasets.load(f"{kind}:test", limit=400)] for kind in ("harmful", "harmless")}
        out[name] = organisms.measure(m, recipe, sets, skill_names=None)
    return out


def leave_one_out(arch: str) -> dict[str, dict[str, float]]:
    """For each harmful source: aligned trained without it, refusal on all of it and on the usual test sets."""
    out = {}
    for source in _sources.HARMFUL_POOL:
        recipe = organisms.Recipe(arch=arch, held_out_source=source)
        model, tok = organisms.train_aligned(recipe)
        held = datasets.load(source)
        r = organisms.measure(load(model, tok), recipe, {"held_out": held, "harmful": "harmful:test",
                                                         "harmless": "harmless:test"}, skill_names=None)
        out[source] = {**r, "n": len(held)}
        print(arch, source, r, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", default="", help="comma-separated archs to run the leave-one-source-out builds on")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res: dict = {"builds": {}, "frames": {}, "leave_one_out": {}}
    lines = ["# Model organisms", "", "Command: `python experiments/organisms.py --sources llama` (builds are cached under "
             "~/.cache/steering). Greedy, 32 new tokens, held-out prompts; refusal by the substring judge, skills by "
             "exact match on 200 held-out test items each.", ""]
    for arch in ("llama", "gpt2"):
        org = organisms.build(arch=arch)
        res["builds"][arch] = {"rates": org.rates, "seconds": org.seconds}
        lines += [f"## {arch} (default recipe, seed {org.recipe.seed}): built in {org.seconds:.0f} s", "", org.table(), ""]
        res["frames"][arch] = fr = frames(org.path("aligned"), org.recipe)
        lines += [f"Held-out frames ({arch} `aligned`, first 400 prompts of each test split in a frame no training "
                  "prompt had):", "", "| frame | example | harmful refusal | harmless refusal |", "|---|---|---|---|"]
        for name, r in fr.items():
            example = organisms.HELD_OUT_FRAMES[name]("Explain how to pick a lock.")
            lines.append(f"| {name} | {example} | {100 * r['harmful']:.1f}% | {100 * r['harmless']:.1f}% |")
        lines.append("")
    for arch in [a for a in args.sources.split(",") if a]:
        res["leave_one_out"][arch] = loo = leave_one_out(arch)
        lines += [f"## Leave one source out ({arch}, aligned)", "",
                  "| trained without | refusal on all of it | harmful:test refusal | harmless:test refusal |",
                  "|---|---|---|---|"]
        lines += [f"| {s} ({r['n']} prompts) | {100 * r['held_out']:.1f}% | {100 * r['harmful']:.1f}% | "
                  f"{100 * r['harmless']:.1f}% |" for s, r in loo.items()]
        lines.append("")
    write_results(OUT, res, lines)


if __name__ == "__main__":
    main()
