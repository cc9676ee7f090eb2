"""How far can each method bring back `drifted`'s refusal, for one organism recipe? The recipe's
organisms are built (or taken from the cache), each method's setting is chosen by the search
(``steering.tune``, 12 trials, over-refusal and utility budgets of 5 points each, on validation
prompts and items), and the pick is scored on 120 harmful and 160 harmless test prompts (greedy,
32 new tokens, substring judge). A short screen for recipes, not the methods' tables (those are
``methods.py`` and ``tune.py``).

    python experiments/organism_restore.py [--arch llama] [--skill-weights reverse=2,sort=2] [--no-skill-check]
    # prints one line per method; adds a row to experiments/results/organism_restore.md (and .json)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "organism_restore"
SEARCHED = ("addition", "conditional", "hdr", "safeinfer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--skill-weights", default="", help="e.g. reverse=2,sort=2 (default: none)")
    ap.add_argument("--no-skill-check", action="store_true", help="Recipe(skill_target=None)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import steering as st
    from steering import organisms, safeinfer, tune
    from steering.judge import refusal_rate

    weights = tuple((k, int(w)) for k, w in (kv.split("=") for kv in a.skill_weights.split(",") if kv))
    fields = {"arch": a.arch, "skill_weights": weights, **({"skill_target": None} if a.no_skill_check else {})}
    org = organisms.build(progress=True, **fields)
    A, H, D = (org.path(k) for k in organisms.KINDS)
    al, un, d = st.load(A), st.load(H), st.load(D)
    harmful, harmless = st.datasets.load("harmful:test", limit=120), st.datasets.load("harmless:test", limit=160)

    def rates(s=None) -> list[float]:
        """Harmful and harmless refusal of ``d`` under setting ``s`` (none: plain), through
        safeinfer.generate, which hooks the setting's edits and is plain decoding without SafeInfer."""
        m = s.model if s is not None and s.model is not None else d
        kw = {} if s is None else {"amplify": s.amplify, "edits": list(s.edits),
                                   **({"unsafe": s.unsafe, "gamma": s.gamma} if s.unsafe is not None else {})}
        return [refusal_rate(safeinfer.generate(m, ps, max_new_tokens=32, batch_size=80, **kw)) for ps in (harmful, harmless)]

    budgets = tune.Budgets(over_refusal=0.05, utility_loss=0.05)
    kw = {"addition": {"reference": al}, "conditional": {"reference": al}, "hdr": {"harm": (str(A), str(H))},
          "safeinfer": {"unsafe": un}}
    plain = rates()
    row = {"arch": a.arch, "skill_weights": dict(org.recipe.skill_weights), "skill_check": not a.no_skill_check,
           "aligned_harmful": org.rates["aligned"]["harmful"], "drifted_steps": org.steps.get("drifted"),
           "plain": plain, "methods": {}}
    print(f"{a.arch} {dict(org.recipe.skill_weights)}: drifted {100 * plain[0]:.1f}% / {100 * plain[1]:.1f}%", flush=True)
    for m in SEARCHED:
        t0 = time.time()
        r = tune.tune(d, m, trials=12, budgets=budgets, progress=False, **kw[m])
        if r.pick is None:
            row["methods"][m] = {"pick": None, "why": r.why}
            print(f"  {m}: no pick ({r.why})", flush=True)
            continue
        got = rates(r.setting())
        row["methods"][m] = {"pick": r.pick.params, "harmful": got[0], "harmless": got[1]}
        print(f"  {m}: {r.pick.params} -> {100 * got[0]:.1f}% / {100 * got[1]:.1f}%  [{time.time() - t0:.0f} s]", flush=True)

    js = OUT.with_suffix(".json")
    rows = [x for x in (json.loads(js.read_text()) if js.exists() else [])
            if (x["arch"], x["skill_weights"], x["skill_check"]) != (row["arch"], row["skill_weights"], row["skill_check"])]
    rows.append(row)
    js.write_text(json.dumps(rows, indent=1))
    lines = ["# Restoring drifted's refusal, by organism recipe", "",
             "Command: `python experiments/organism_restore.py [--arch A] [--skill-weights k=w,...] [--no-skill-check]`, one "
             "row each (this CPU's builds: see docs/organisms.md). Each method's setting chosen by `steering.tune` (12 trials, "
             "5-point budgets) on validation prompts; harmful / harmless refused on 120 / 160 test prompts, as the gain over "
             "`drifted` in points.", "",
             "| arch | skill weights trained with | aligned refused | drifted steps | drifted refused | "
             + " | ".join(SEARCHED) + " |", "|---" * (5 + len(SEARCHED)) + "|"]
    for x in rows:
        cells = []
        for m in SEARCHED:
            v = x["methods"][m]
            cells.append("no pick" if v["pick"] is None
                         else f"{100 * (v['harmful'] - x['plain'][0]):+.0f} ({100 * v['harmless']:.1f}% harmless)")
        w = ", ".join(f"{k} ×{n}" for k, n in x["skill_weights"].items()) or "none"
        lines.append(f"| {x['arch']} | {w}{'' if x['skill_check'] else ' (no check)'} | {100 * x['aligned_harmful']:.1f}% | "
                     f"{x['drifted_steps']} | {100 * x['plain'][0]:.1f}% | " + " | ".join(cells) + " |")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
