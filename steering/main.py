"""The main job: what ``steering main`` runs end to end.

Today it shows the foundation working on a tiny random Llama: it records the residual stream at
the post-instruction positions over harmful and harmless training prompts, turns the two means
into per-layer difference-in-means vectors, and writes the recordings and a report. (The weights
are random, so the numbers say nothing about safety yet; the model organisms of issue 3 replace
the random model.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def run(out: str | Path = "runs/main", quick: bool = False) -> dict:

    import steering as st
    from steering.record import save_recording

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = 16 if quick else 128
    model = st.testing.tiny_model("llama", layers=4, d=64)
    sets = {"harmful": st.datasets.load("harmful:train", limit=n), "harmless": st.datasets.load("harmless:train", limit=n)}
    recs = {}
    for kind, prompts in sets.items():
        recs[kind] = st.record(model, prompts, sites="resid_pre", positions="post_instruction", batch_size=16)
        save_recording(recs[kind], str(out / f"recording_{kind}.safetensors"), "tiny random llama")
    diff = recs["harmful"].mean("resid_pre") - recs["harmless"].mean("resid_pre")  # [layers, positions, d]
    rows = []
    for layer in range(model.n_layers):
        rows.append({"layer": layer, "diff_norm_last": float(diff[layer, -1].norm()),
                     "harmful_norm_last": float(recs["harmful"].mean("resid_pre")[layer, -1].norm())})
    lines = ["# steering main job", "",
             f"Model: tiny random Llama ({model.n_layers} layers, d={model.d_model}); {n} harmful and {n} harmless "
             f"training prompts; residual stream at the {model.post_instruction_len} post-instruction positions.", "",
             "| layer | ‖mean harmful − mean harmless‖ (last position) | ‖mean harmful‖ |", "|---|---|---|"]
    lines += [f"| {r['layer']} | {r['diff_norm_last']:.4f} | {r['harmful_norm_last']:.4f} |" for r in rows]
    lines += ["", f"Took {time.time() - t0:.1f} s."]
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps({"rows": rows, "n_prompts": n}, indent=2))
    print(report)
    return {"rows": rows}
