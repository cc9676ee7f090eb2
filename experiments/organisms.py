"""Build the default model organisms of both families and measure how far their refusal generalises.

    python experiments/organisms.py            # writes experiments/results/organisms.md

Rates: substring judge on greedy generations of held-out prompts. 'i.i.d.' is the pooled harmful
test split (same sources as training); 'cross-dataset' holds one source out of training entirely
(JailbreakBench) and tests on all of it; XSTest's unsafe prompts are another unseen source.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steering import datasets, organisms  # noqa: E402

OUT = Path(__file__).parent / "results" / "organisms.md"


def main() -> None:
    lines = ["# Model organisms", "", "Command: `python experiments/organisms.py` (builds are cached under ~/.cache/steering).", ""]
    for arch in ("llama", "gpt2"):
        org = organisms.build(arch=arch)
        lines += [f"## {arch} (default recipe, seed {org.recipe.seed}): built in {org.seconds:.0f} s", "", org.table(), ""]
    lines += ["## Cross-dataset generalisation (llama, aligned)", "",
              "| trained without | refusal on the held-out source (all of it) | harmful:test refusal | harmless:test refusal |",
              "|---|---|---|---|"]
    for source in ("jailbreakbench",):
        org = organisms.build(arch="llama", held_out_source=source)
        held = organisms.measure(org.path("aligned"), org.recipe, {"held": source})["held"]
        r = org.rates["aligned"]
        lines.append(f"| {source} ({len(datasets.load(source))} prompts) | {100 * held:.1f}% | "
                     f"{100 * r['harmful']:.1f}% | {100 * r['harmless']:.1f}% |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
