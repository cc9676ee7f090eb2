"""Recipe variants of the `aligned` organism: how far each moves refusal on harmful:test and on a held-out source.

    python experiments/organism_variants.py --variants nosplice,splice --sources none,harmbench
    python experiments/organism_variants.py --variants splice --sources all --arch gpt2

Writes experiments/results/organism_variants.md and .json; each (variant, arch, held-out source)
row is trained once and kept, so runs add rows (``--threads 1`` beside another job). ``aligned``
alone is trained (``organisms.train_aligned``, not cached), with ``none`` or one harmful source
kept out of training entirely (``Recipe.held_out_source``), and measured on held-out prompts:
harmful:test, harmless:test, XSTest's safe prompts, all of the held-out source, and exact match on
64 test items of each of aligned's skills (greedy, 32 new tokens; the substring judge).

Issue 20 asks for ≥ 90% refusal of harmful:test and ≥ 80% of every held-out source;
experiments/results/organisms.md has the default recipe at 88.8% and 36–84%, where a bag-of-words
classifier trained on the same prompts reaches 73–99% (`organisms.py --lexical`). The variants:

- ``nosplice``: the default recipe (``Recipe.splice=0``), the organisms every table is measured on;
- ``splice``: ``Recipe.splice=0.5`` (opt-in, not yet the default): beside the plain examples, spliced ones
  (``organisms._splices``): a harmful request (any of its rewordings) joined, before or after, to a
  harmless request (under 200 characters), answered with the request's refusal, and as many pairs
  of harmless requests answered with the first one's helpful reply; half as many of each as there
  are refusal examples. Most of ``nosplice``'s misses are harmful requests worded like the
  harmless chat sets' ("What are some ways …"); a splice puts harmful content in a harmless
  request's company, so that harmful content anywhere in a request means a refusal;
- ``splice1``: as ``splice`` with as many of each as there are refusal examples;
- ``worddrop``: ``nosplice`` whose reworded copies lose each word with probability 0.2 (at least
  three kept);
- ``copies6``: ``nosplice`` with six reworded copies of each example instead of three;
- ``harmfulx2``: ``nosplice`` with harmful examples twice as often (``Recipe.harmful_weight=2``);
- ``dropout``: ``nosplice`` with dropout 0.1 while training (``Recipe.dropout``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from steering import datasets, organisms, skills  # noqa: E402
from steering.datasets import _sources  # noqa: E402
from steering.model import load  # noqa: E402

OUT = Path(__file__).parent / "results" / "organism_variants"


def _drop(p: str, rng: random.Random, q: float) -> str:
    words = p.split()
    kept = [w for w in words if rng.random() >= q]
    return " ".join(kept if len(kept) >= 3 else words)


@contextlib.contextmanager
def word_dropout(q: float):
    """``organisms._augment`` whose reworded copies also lose words (see the module's docstring)."""
    plain = organisms._augment

    def augment(pairs, rng, copies):
        out = list(pairs)
        for _ in range(copies):
            out += [(_drop(rng.choice(organisms.AUGMENT[1:])(p), rng, q), r) for p, r in pairs]
        return out

    organisms._augment = augment
    try:
        yield
    finally:
        organisms._augment = plain


VARIANTS = {  # name: (recipe fields, context that changes the training data)
    "nosplice": ({"splice": 0.0}, contextlib.nullcontext),
    "splice": ({"splice": 0.5}, contextlib.nullcontext),
    "splice1": ({"splice": 1.0}, contextlib.nullcontext),
    "worddrop": ({"splice": 0.0}, lambda: word_dropout(0.2)),
    "copies6": ({"splice": 0.0, "augment_copies": 6}, contextlib.nullcontext),
    "harmfulx2": ({"splice": 0.0, "harmful_weight": 2}, contextlib.nullcontext),
    "dropout": ({"splice": 0.0, "dropout": 0.1}, contextlib.nullcontext),
}


def ablation(model) -> dict:
    """Does one direction carry this ``aligned``'s refusal? The main job's refusal-direction step
    (``refusal_ablation``'s extraction and selection on the same train and validation prompts,
    affine form, the paper's KL filter 0.1), then harmful:test with the edit hooked: ``abl_pick``
    for the selection's pick (absent where no candidate passed the filters), ``abl_best`` for the
    candidate with the lowest bypass score whatever its KL (``Selection.closest``), each with the
    KL on harmless validation prompts its selection measured."""
    from steering import tune
    from steering.extract import diff_in_means
    from steering.judge import refusal_rate
    from steering.select import ablation_edit, select_direction

    data = tune.Data.default(n_val=32, n_train=128)
    cands = diff_in_means(model, data.harmful_train, data.harmless_train, progress=False)
    sel = select_direction(model, cands, data.harmful, data.harmless, affine=True, progress=False)
    test = datasets.load("harmful:test")
    out = {}
    for name, pick in (("abl_pick", sel.pick), ("abl_best", sel.closest)):
        if pick is None:
            continue
        row = next(r for r in sel.rows if (r["layer"], r["position"]) == pick)
        edit, _ = ablation_edit(model, replace(sel, pick=pick), data.harmful, data.harmless, affine=True)
        with edit.hooks(model):
            out[name] = refusal_rate(model.generate(test, max_new_tokens=organisms.Recipe().eval_new_tokens, batch_size=64))
        out[f"{name}_kl"], out[f"{name}_layer"] = row["kl"], row["layer"]
    return out


def run(variant: str, arch: str, source: str | None, with_ablation: bool = False) -> dict:
    fields, context = VARIANTS[variant]
    recipe = replace(organisms.Recipe(arch=arch, held_out_source=source), **fields)
    t0 = time.time()
    with context():
        model, tok = organisms.train_aligned(recipe)
    seconds = time.time() - t0
    sets = {"harmful": "harmful:test", "harmless": "harmless:test", "xstest_safe": "xstest:safe"}
    if source:
        sets["held_out"] = datasets.load(source)
    m = load(model, tok)
    r = organisms.measure(m, replace(recipe, n_skill_eval=64), sets, skill_names=skills.ALIGNED)
    if with_ablation:
        r.update(ablation(m))
    return {"variant": variant, "arch": arch, "held_out_source": source, **r, "train_seconds": round(seconds)}


def write(rows: list[dict]) -> None:
    cols = ["harmful", "harmless", "xstest_safe", "held_out", *(f"skill_{k}" for k in skills.ALIGNED)]
    lines = ["# Organism recipe variants: refusal of harmful:test and of a held-out source", "",
             "`python experiments/organism_variants.py` (see its docstring for the variants). `aligned` alone, trained "
             "from scratch per row; held-out prompts, greedy, 32 new tokens, substring judge; skills: exact match on 64 "
             "test items each. `held out`: the harmful source kept out of training entirely, refusal on all of it.", "",
             "| variant | arch | trained without | harmful:test refusal | harmless:test refusal | XSTest safe refusal "
             "| held-out source refusal | " + " | ".join(skills.ALIGNED) + " | training (s) |",
             "|---|---|---|" + "---|" * (len(cols) + 1)]
    order = {v: i for i, v in enumerate(VARIANTS)}
    for r in sorted(rows, key=lambda r: (r["arch"], r["held_out_source"] or "", order[r["variant"]])):
        cells = [f"{100 * r[c]:.1f}%" if c in r else "" for c in cols]
        lines.append(f"| {r['variant']} | {r['arch']} | {r['held_out_source'] or '(none)'} | " + " | ".join(cells)
                     + f" | {r['train_seconds']} |")
    probed = [r for r in rows if "abl_best" in r]
    if probed:
        def cell(r: dict, k: str) -> str:
            if k not in r:
                return "no candidate passed the filters"
            return f"{100 * r[k]:.1f}% (layer {r[k + '_layer']}, KL {r[k + '_kl']:.3f})"

        lines += ["", "## Does one direction carry the refusal? (`--ablation`)", "",
                  "The main job's refusal-direction step on each `aligned` (difference in means on 128 train prompts of "
                  "each kind, selection on 32 validation prompts, affine ablation), then harmful:test with the edit "
                  "hooked. *pick*: the selection's pick under the paper's filters (KL ≤ 0.1 on harmless validation "
                  "prompts, layer < 80% of depth); *lowest bypass*: the candidate that lowers the refusal score most, "
                  "whatever its KL.", "",
                  "| variant | arch | harmful:test refusal | ablated: pick | ablated: lowest bypass |", "|---|---|---|---|---|"]
        for r in sorted(probed, key=lambda r: (r["arch"], order[r["variant"]])):
            lines.append(f"| {r['variant']} | {r['arch']} | {100 * r['harmful']:.1f}% | {cell(r, 'abl_pick')} | "
                         f"{cell(r, 'abl_best')} |")
    lines += ["", "The default recipe (`nosplice`) without each of the other sources: "
              "experiments/results/organisms.md, leave one source out. The reverse skill swings between builds "
              "(50–100% on 64 items) in rows where nothing touches the skill data."]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="nosplice,splice", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--sources", default="none,harmbench",
                    help="comma-separated harmful sources to hold out ('none': train on all; 'all': each in turn)")
    ap.add_argument("--arch", default="llama", choices=organisms.ARCHS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ablation", action="store_true",
                    help="also run the main job's refusal-direction step on each aligned and measure harmful:test ablated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    sources = list(_sources.HARMFUL_POOL) if args.sources == "all" else args.sources.split(",")
    for s in sources:
        if s != "none" and s not in _sources.HARMFUL_POOL:
            raise SystemExit(f"--sources: unknown harmful source {s!r}; choose from none, {', '.join(_sources.HARMFUL_POOL)}")
    for v in variants:
        for s in sources:
            held = None if s == "none" else s
            row = run(v, args.arch, held, args.ablation)
            print(json.dumps(row), flush=True)
            add(row)
    print(OUT.with_suffix(".md").read_text())


def add(row: dict) -> None:
    """Put ``row`` in the results (replacing an earlier one of the same variant, arch and source),
    under a lock, re-read first: runs on both cores may add rows at once."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / "steering-organism-variants.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = OUT.with_suffix(".json")
        rows = json.loads(path.read_text()) if path.exists() else []
        same = (row["variant"], row["arch"], row["held_out_source"])
        rows = [r for r in rows if (r["variant"], r["arch"], r["held_out_source"]) != same] + [row]
        write(rows)


if __name__ == "__main__":
    main()
