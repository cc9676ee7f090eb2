"""Build the default model organisms of both families and measure what they can do and how far their refusal generalises.

    python experiments/organisms.py                  # writes experiments/results/organisms.md
    python experiments/organisms.py --sources llama  # ... with the leave-one-source-out builds (4 more trainings of aligned)
    python experiments/organisms.py --lexical        # only: the lexical classifier beside each leave-one-source-out row

Rates on held-out prompts, greedy, 32 new tokens: refusal by the substring judge, skills by exact
match on their held-out test items (``steering.skills``). Three tables:

- the organisms (each build's own measurements: harmful:test, harmless:test, XSTest, skills);
- held-out frames: harmful:test and harmless:test prompts wrapped in a question, a story and a
  role frame that no training prompt was wrapped in (``organisms.HELD_OUT_FRAMES``);
- leave one source out: ``aligned`` trained without one of the four harmful sources (every prompt
  of it removed from training), tested on all of that source; beside it, a bag-of-words classifier
  trained on the same prompts (:func:`lexical`): how much of the held-out source the training
  prompts' words alone can carry.
"""

import argparse
import json
import sys
from dataclasses import replace
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
    trained = organisms.build(arch=arch, progress=False).recipe  # with the skill weights the build's check chose
    for source in _sources.HARMFUL_POOL:
        recipe = replace(trained, held_out_source=source)
        model, tok = organisms.train_aligned(recipe)
        held = datasets.load(source)
        r = organisms.measure(load(model, tok), recipe, {"held_out": held, "harmful": "harmful:test",
                                                         "harmless": "harmless:test"}, skill_names=None)
        out[source] = {**r, "n": len(held)}
        print(arch, source, r, flush=True)
    return out


def lexical(arch: str, sources: list[str]) -> dict[str, dict[str, float]]:
    """What words alone carry across sources: for each held-out source, a bag-of-words classifier
    (TF-IDF of word unigrams and bigrams, logistic regression with balanced classes, scikit-learn)
    trained on exactly the prompts ``aligned`` is trained on without that source (rewordings
    included; harmful ones labelled by their refusal replies), its threshold set on harmless:val so
    that it flags 3% of it (the organisms' harmless target). Its share of the held-out source flagged
    is a reference for the organism's refusal of it: what a classifier that sees only which words a
    prompt holds reaches on the same data."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from steering.judge import REFUSALS

    out = {}
    for source in sources:
        recipe = organisms.Recipe(arch=arch, held_out_source=source)
        pairs = organisms.examples("aligned", recipe)
        texts = [p for p, _ in pairs]
        y = np.array([r in REFUSALS for _, r in pairs], dtype=int)
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        clf = LogisticRegression(C=10.0, max_iter=5000, class_weight="balanced").fit(vec.fit_transform(texts), y)

        def score(prompts: list[str]) -> np.ndarray:
            return clf.decision_function(vec.transform(prompts))

        cut = float(np.quantile(score(datasets.load("harmless:val")), 0.97))
        out[source] = {name: float((score(datasets.load(spec)) > cut).mean()) for name, spec in
                       (("held_out", source), ("harmful", "harmful:test"), ("harmless", "harmless:test"))}
        print(arch, source, "lexical", out[source], flush=True)
    return out


def write(res: dict) -> None:
    lines = ["# Model organisms", "", "Command: `python experiments/organisms.py --sources llama` (builds are cached under "
             "~/.cache/steering). Greedy, 32 new tokens, held-out prompts; refusal by the substring judge, skills by "
             "exact match on 200 held-out test items each.", ""]
    for arch, b in res["builds"].items():
        recipe = organisms.Recipe(arch=arch)
        org = organisms.Organisms(Path("."), recipe, b["rates"], b["seconds"])
        weights = ", ".join(f"{k} ×{w}" for k, w in b.get("skill_weights", {}).items())
        lines += [f"## {arch} (default recipe, seed {recipe.seed}{'; the skill check weighted ' + weights if weights else ''}): "
                  f"built in {org.seconds:.0f} s", "", org.table(), ""]
        lines += [f"Held-out frames ({arch} `aligned`, first 400 prompts of each test split in a frame no training "
                  "prompt had):", "", "| frame | example | harmful refusal | harmless refusal |", "|---|---|---|---|"]
        for name, r in res["frames"][arch].items():
            example = organisms.HELD_OUT_FRAMES[name]("Explain how to pick a lock.")
            lines.append(f"| {name} | {example} | {100 * r['harmful']:.1f}% | {100 * r['harmless']:.1f}% |")
        lines.append("")
    for arch, loo in res["leave_one_out"].items():
        lex = res.get("lexical", {}).get(arch, {})
        lines += [f"## Leave one source out ({arch}, aligned)", "", *([res["leave_one_out_build"][arch], ""]
                                                                   if arch in res.get("leave_one_out_build", {}) else []),
                  "| trained without | refusal on all of it | harmful:test refusal | harmless:test refusal |"
                  + (" lexical classifier: flagged of it / harmful:test / harmless:test |" if lex else ""),
                  "|---|---|---|---|" + ("---|" if lex else "")]
        for s, r in loo.items():
            extra = ""
            if s in lex:
                x = lex[s]
                extra = f" {100 * x['held_out']:.1f}% / {100 * x['harmful']:.1f}% / {100 * x['harmless']:.1f}% |"
            lines.append(f"| {s} ({r['n']} prompts) | {100 * r['held_out']:.1f}% | {100 * r['harmful']:.1f}% | "
                         f"{100 * r['harmless']:.1f}% |" + extra)
        if lex:
            lines += ["", "Lexical classifier (`--lexical`): TF-IDF of word unigrams and bigrams and a logistic regression, "
                          "trained on the same prompts as that organism, its threshold set to flag 3% of harmless:val "
                          "(see `lexical`): what the words of the training prompts alone carry to the held-out source."]
        lines.append("")
    write_results(OUT, res, lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", default="", help="comma-separated archs to run the leave-one-source-out builds on")
    ap.add_argument("--lexical", action="store_true",
                    help="only: the lexical classifier of each leave-one-source-out row already measured (keeps the rest)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.lexical:
        res = json.loads(OUT.with_suffix(".json").read_text())
        res["lexical"] = {arch: lexical(arch, list(loo)) for arch, loo in res["leave_one_out"].items()}
        write(res)
        return
    old = json.loads(OUT.with_suffix(".json").read_text()) if OUT.with_suffix(".json").exists() else {}
    rerun = [a for a in args.sources.split(",") if a]
    res: dict = {"builds": {}, "frames": {}, "leave_one_out": {}}
    for arch, loo in old.get("leave_one_out", {}).items():  # kept, marked, where not rerun: 4 trainings of aligned each
        if arch not in rerun:
            res["leave_one_out"][arch] = loo
            res.setdefault("lexical", {})[arch] = old.get("lexical", {}).get(arch, {})
            res.setdefault("leave_one_out_build", {})[arch] = old.get("leave_one_out_build", {}).get(
                arch, "Of an earlier build than the tables above (the first organisms' CPU, before the skill check); "
                      "`--sources ARCH` reruns it on this one.")
    for arch in ("llama", "gpt2"):
        org = organisms.build(arch=arch)
        res["builds"][arch] = {"rates": org.rates, "seconds": org.seconds, "skill_weights": dict(org.recipe.skill_weights)}
        res["frames"][arch] = frames(org.path("aligned"), org.recipe)
    for arch in rerun:
        res["leave_one_out"][arch] = leave_one_out(arch)
        res.setdefault("lexical", {})[arch] = lexical(arch, list(res["leave_one_out"][arch]))
    write(res)


if __name__ == "__main__":
    main()
