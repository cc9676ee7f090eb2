"""The main job: what ``steering main`` runs end to end.

Today: build (or reuse) the model organisms, report their refusal rates on held-out prompts, and
record the aligned organism's residual stream over harmful and harmless training prompts at the
post-instruction positions, writing the recordings, the per-layer difference in means and a
report. The methods of the later issues plug in here as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def run(out: str | Path = "runs/main", quick: bool = False) -> dict:
    import steering as st
    from steering import organisms
    from steering.record import save_recording

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if quick:  # a few seconds: a tiny recipe, for the CLI's own test
        recipe = organisms.Recipe(d_model=32, n_layers=2, d_mlp=64, vocab_size=600, aligned_steps=4, harmful_steps=2,
                                  drift_steps=2, n_harmless_train=64, batch_size=8, n_eval=8, eval_new_tokens=4,
                                  augment_copies=0)
    else:
        recipe = organisms.Recipe()
    org = organisms.build(recipe=recipe)
    model = st.load(org.path("aligned"))
    n = 16 if quick else 128
    recs = {}
    for kind in ("harmful", "harmless"):
        recs[kind] = st.record(model, st.datasets.load(f"{kind}:train", limit=n), sites="resid_pre",
                               positions="post_instruction", batch_size=32)
        save_recording(recs[kind], str(out / f"recording_{kind}.safetensors"), str(org.path("aligned")))
    diff = recs["harmful"].mean("resid_pre") - recs["harmless"].mean("resid_pre")  # [layers, positions, d]
    rows = [{"layer": layer, "diff_norm_last": float(diff[layer, -1].norm()),
             "harmless_norm_last": float(recs["harmless"].mean("resid_pre")[layer, -1].norm())}
            for layer in range(model.n_layers)]
    lines = ["# steering main job", "",
             f"## Model organisms ({recipe.arch}, seed {recipe.seed}); refusal on held-out prompts", "",
             org.table(), "",
             f"Folders: {org.root}", "",
             f"## Harmful − harmless difference in means (aligned organism, resid_pre, last of the "
             f"{model.post_instruction_len} post-instruction positions, {n} train prompts each)", "",
             "| layer | ‖mean harmful − mean harmless‖ | ‖mean harmless‖ |", "|---|---|---|"]
    lines += [f"| {r['layer']} | {r['diff_norm_last']:.3f} | {r['harmless_norm_last']:.3f} |" for r in rows]
    lines += ["", f"Took {time.time() - t0:.0f} s (organisms built in {org.seconds:.0f} s, cached afterwards)."]
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps({"organisms": org.rates, "diff_in_means": rows}, indent=2))
    print(report)
    return {"organisms": org.rates, "rows": rows}
