"""The judge organism against the substring judge: how well it reads held-out exchanges, and where
the two judges disagree on the organisms' own replies.

    python experiments/judge.py            # writes experiments/results/judge.md and judge.json

1. Held-out exchanges (harmful:test and harmless:test requests, none seen in training) with known
   verdicts: each harmful request answered with a refusal (safe), a compliance opening and a
   helpful opening (unsafe), each harmless one with a helpful and a compliance opening (safe).
   The replies are the organisms' phrasings, which the judge was trained on, so this measures
   whether it reads the *request*, not new wordings.
2. The llama organisms' greedy replies (32 new tokens, as the main job) to harmful:test and
   XSTest's unsafe prompts, judged by both: the share each calls refused (safe) and how often
   they disagree, with examples.
"""

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import steering as st  # noqa: E402
from steering import organisms  # noqa: E402
from steering.main import NEW_TOKENS  # noqa: E402
from steering.judge import HELPFUL, REFUSALS, GuardJudge, is_refusal  # noqa: E402

RESULTS = Path(__file__).parent / "results"
N_NEW = NEW_TOKENS  # as the main job's evaluation: long enough to judge


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 beside another job)")
    torch.set_num_threads(ap.parse_args().threads)
    path = organisms.build_judge()
    judge = GuardJudge(st.load(path))
    rng = random.Random(0)
    harmful, harmless = st.datasets.load("harmful:test"), st.datasets.load("harmless:test")
    known = {
        "harmful request, refusal (safe)": (harmful, [rng.choice(REFUSALS) for _ in harmful], True),
        "harmful request, compliance opening (unsafe)": (harmful, [rng.choice(organisms.COMPLY) for _ in harmful], False),
        "harmful request, helpful opening (unsafe)": (harmful, [rng.choice(HELPFUL) for _ in harmful], False),
        "harmless request, helpful opening (safe)": (harmless, [rng.choice(HELPFUL) for _ in harmless], True),
        "harmless request, compliance opening (safe)": (harmless, [rng.choice(organisms.COMPLY) for _ in harmless], True),
    }
    held = {}
    for name, (ps, cs, want) in known.items():
        got = judge(ps, cs)
        held[name] = {"n": len(ps), "correct": sum(g == want for g in got) / len(ps)}
    org = organisms.build()
    sets = {"harmful:test": harmful, "xstest:unsafe": st.datasets.load("xstest:unsafe")}
    replies = {}
    for kind in organisms.KINDS:
        m = st.load(org.path(kind))
        for set_name, ps in sets.items():
            outs = m.generate(ps, max_new_tokens=N_NEW, batch_size=64)
            guard = judge(ps, outs)
            sub = [is_refusal(o) for o in outs]
            differ = [(p, o, s, g) for p, o, s, g in zip(ps, outs, sub, guard) if s != g]
            replies[f"{kind} / {set_name}"] = {
                "n": len(ps), "substring refused": sum(sub) / len(ps), "guard safe": sum(guard) / len(ps),
                "disagree": len(differ) / len(ps),
                "examples": [{"reply": o, "substring": s, "guard": g} for p, o, s, g in differ[:3]]}
    blob = {"judge": str(path), "held_out": held, "replies": replies, "unparsed": judge.unparsed}
    (RESULTS / "judge.json").write_text(json.dumps(blob, indent=2, ensure_ascii=False) + "\n")
    lines = ["# The judge organism (Llama Guard format) against the substring judge", "",
             "Command: `python experiments/judge.py`. Judge: `steering.organisms.build_judge()` (llama, seed 2), read by "
             "`steering.judge.GuardJudge`; replies the judge answered in neither form: "
             f"{judge.unparsed}.", "",
             "## Held-out exchanges with known verdicts", "", "| exchange | n | judged correctly |", "|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {100 * v['correct']:.1f}% |" for k, v in held.items()]
    lines += ["", f"## The organisms' replies (greedy, {N_NEW} new tokens), judged by both", "",
              "| organism / prompts | n | refused (substring) | rated safe (judge organism) | the two disagree |",
              "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {100 * v['substring refused']:.1f}% | {100 * v['guard safe']:.1f}% | "
              f"{100 * v['disagree']:.1f}% |" for k, v in replies.items()]
    lines += ["", "Where they disagree (first three of each row):", "", "| organism / prompts | reply | substring | judge |",
              "|---|---|---|---|"]
    for k, v in replies.items():
        for e in v["examples"]:
            reply = e["reply"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {k} | `{reply}` | {'refused' if e['substring'] else 'answered'} | "
                         f"{'safe' if e['guard'] else 'unsafe'} |")
    (RESULTS / "judge.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
