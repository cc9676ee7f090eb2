"""Why ICV injection moves no refusal on the organisms: the ICV against the refusal direction.

    python experiments/icv_probe.py          # writes experiments/results/icv_probe.md and .json

The in-context safety vector (Safety Arithmetic's ICV, ``steering.extract.icv``) is read, as in the
paper, from raw ``Question: … Answer: …`` texts without the chat template. The search
(experiments/results/tune.md) finds no β or layer at which it raises refusal on ``drifted``. This
compares it, layer by layer, with the refusal direction read in chat-formatted prompts (difference in
means of harmful vs harmless train prompts at the last post-instruction token, residual stream after
the layer, the site ICV reads): of ``aligned`` and of ``drifted`` itself.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _util import write_results  # noqa: E402

torch.set_num_threads(1)


def main() -> None:
    import steering as st
    from steering import organisms
    from steering.extract import diff_in_means, icv, icv_pairs

    res = {}
    for arch in ("llama", "gpt2"):
        org = organisms.build(arch=arch)
        a, d = st.load(str(org.path("aligned"))), st.load(str(org.path("drifted")))
        questions = st.datasets.load("harmful:train")[::7][:32]  # every 7th: all four sources
        v = icv(d, icv_pairs(questions))
        train = [st.datasets.load(f"{k}:train")[::5][:64] for k in ("harmful", "harmless")]
        ca, cd = (diff_in_means(m, *train, site="resid_post", progress=False) for m in (a, d))
        res[arch] = [{"layer": l, "cos_aligned": float(torch.cosine_similarity(v[l], ca.direction(l, -1), 0)),
                      "cos_drifted": float(torch.cosine_similarity(v[l], cd.direction(l, -1), 0)),
                      "icv_norm": float(v[l].norm()), "direction_norm": float(ca.direction(l, -1).norm())}
                     for l in range(d.n_layers)]
    lines = ["# ICV against the refusal direction", "", "Command: `python experiments/icv_probe.py`. ICV read on `drifted` from 32 "
             "harmful train questions in Safety Arithmetic's raw `Question: … Answer: …` format (no chat template); the "
             "refusal direction: difference in means of 64 harmful vs 64 harmless train prompts, chat-formatted, last "
             "post-instruction token, residual stream after each layer.", "",
             "| family | layer | cos(ICV, aligned's refusal direction) | cos(ICV, drifted's own direction) | ‖ICV‖ | ‖direction‖ |",
             "|---|---|---|---|---|---|"]
    for arch, rows in res.items():
        lines += [f"| {arch} | {r['layer']} | {r['cos_aligned']:+.3f} | {r['cos_drifted']:+.3f} | {r['icv_norm']:.1f} | "
                  f"{r['direction_norm']:.1f} |" for r in rows]
    worst = {arch: max(abs(r[k]) for r in rows for k in ("cos_aligned", "cos_drifted")) for arch, rows in res.items()}
    lines += ["", "Largest |cosine|: " + ", ".join(f"{a} {w:.2f}" for a, w in worst.items()) + ". The vector the paper's "
              "recipe reads from raw text is far from the direction along which these chat models separate harmful from "
              "harmless requests, so pushing the stream away from it moves little refusal (the search's fronts: "
              "results/tune.md).", ""]
    write_results(Path(__file__).parent / "results" / "icv_probe", res, lines)


if __name__ == "__main__":
    main()
