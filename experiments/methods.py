"""Every method of the toolkit re-measured on the organisms of both families, with the capability axis.

    python experiments/methods.py            # writes experiments/results/methods.md and methods.json
    python experiments/methods.py --render   # only rewrites methods.md from methods.json

Runs the main job (``steering.main.run``: extraction, every edit, side-by-side evaluation) on the
llama and the gpt2 organisms, then writes one table per method: the unedited model beside the
edited one, on held-out prompts (harmful:test, harmless:test, XSTest; greedy, 32 new tokens; the
substring judge and the judge organism), with exact match on each skill's held-out items, their
mean (``utility``) and KL on harmless prompts. The settings are the main job's: each chosen by the
search (``steering.tune``) on the validation prompts of the family at hand.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _util import write_results  # noqa: E402
from steering import skills  # noqa: E402
from steering.evaluate import Report  # noqa: E402
from steering.main import run  # noqa: E402

OUT = Path(__file__).parent / "results" / "methods"
TUNED = {"Addition of the refusal direction": "addition", "Conditional steering": "conditional",  # the search's name
         "In-context vectors (ICV)": "icv", "Harm Direction Removal (Safety Arithmetic)": "hdr", "SafeInfer": "safeinfer"}
BY_METHOD = {  # method: (baseline row, edited rows, what the method should do)
    "Directional ablation (affine form)": ("aligned", ["aligned, refusal direction ablated (hooks)",
                                                       "aligned-ablated checkpoint"],
                                           "refusal removed; skills within 2 points of aligned"),
    "Addition of the refusal direction": ("drifted", ["drifted + refusal direction"],
                                          "refusal restored on drifted; what it costs harmless prompts and skills"),
    "Conditional steering": ("drifted", ["drifted + conditional steering"],
                             "refusal restored on drifted; harmless and skills untouched"),
    "In-context vectors (ICV)": ("drifted", ["drifted + ICV"], "refusal restored on drifted"),
    "Harm Direction Removal (Safety Arithmetic)": ("drifted", ["drifted-hdr checkpoint"],
                                                   "refusal restored on drifted; the new skill within 5 points"),
    "SafeInfer": ("drifted", ["drifted + SafeInfer"],
                  "refusal restored on drifted; harmless and skills kept"),
}


def table(rows: dict, base: str, edited: list[str]) -> list[str]:
    """The evaluation report's own table (steering.evaluate.Report), restricted to these rows."""
    return Report({name: rows[name] for name in [base, *edited]}).table().splitlines()


def main() -> None:
    if "--render" in sys.argv:  # only rewrite methods.md from methods.json
        import json

        res = json.loads(OUT.with_suffix(".json").read_text())
        write_results(OUT, res, render(res))
        return
    torch.set_num_threads(1)  # beside other jobs on 2 cores, 2 threads each spin-wait (~50x slower)
    res = {arch: run(out=f"runs/methods-{arch}", arch=arch) for arch in ("llama", "gpt2")}
    write_results(OUT, res, render(res))


def render(res: dict) -> list[str]:
    lines = ["# Every method on the organisms, with utility", "",
             "Command: `python experiments/methods.py` (the main job, `steering main --arch ARCH`, on both families). "
             "Held-out prompts; greedy, 32 new tokens; refusal by the substring judge and (guard) by the judge organism; "
             f"skills: exact match on 64 held-out items each ({', '.join(skills.ALIGNED)}: `aligned`'s; "
             f"{skills.NEW_SKILL}: `drifted`'s new skill); utility: their mean; KL on harmless prompts against the "
             "unedited model of the block. Settings: chosen by `steering.tune` on each family's validation prompts "
             "(steering/main.py's trial budgets, the default budgets: over-refusal rise ≤ 5 points, utility loss ≤ 2 "
             "points); each pick is named under its table, with the tamper check (the edited model's own refusal "
             "direction ablated on top, first 128 harmful:test prompts).", ""]
    for method, (base, edited, goal) in BY_METHOD.items():
        lines += [f"## {method}", "", f"What it should do: {goal}.", ""]
        for arch in res:
            lines += [f"{arch}:", "", *table(res[arch]["rows"], base, edited), ""]
            m = TUNED.get(method)
            if m and "picks" in res[arch]:
                p, t = res[arch]["picks"][m], res[arch]["tamper"][m]
                lines += ["Setting: " + ", ".join(f"{k} {v}" for k, v in p["params"].items())
                          + ("" if p["within_budgets"] else " (no pick: the closest trial; see the main job's report for why)")
                          + (f"; tamper check: refusal {100 * t['edited']:.1f}% → {100 * t['attacked']:.1f}% (unedited "
                             f"{100 * t['unedited']:.1f}%)." if t["survives"] == t["survives"] else "."), ""]
    return lines


if __name__ == "__main__":
    main()
