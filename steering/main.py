"""The main job: what ``steering main`` runs end to end on the model organisms.

1. Build (or reuse) the organisms (llama by default; ``arch="gpt2"``, ``--arch gpt2``): ``aligned``, ``harmful``, ``drifted``.
2. On ``aligned``: difference-in-means candidates at the post-instruction positions, selection
   (bypass / induce / KL, the paper's filters, each candidate ablated in affine form: its
   coordinate kept at the harmless prompts' mean), the pick's ablation hooked and baked into a
   checkpoint (``aligned-ablated/``).
3. On ``drifted`` (refusal eroded by a benign fine-tune), every safety edit of the toolkit:
   the aligned model's refusal direction added (ActAdd at every position), the same under
   conditional steering (gated by drifted's own harmful-vs-harmless direction, threshold fitted
   on validation prompts), Safety Arithmetic's
   ICV injection, Harm Direction Removal with τ_H = harmful − aligned streamed into a checkpoint
   (``drifted-hdr/``), and SafeInfer (amplification + guided decoding against ``harmful``).
4. :func:`steering.evaluate.evaluate` of all of them side by side on held-out prompts, judged by
   the substring judge and, beside it, by the judge organism in the Llama Guard format
   (:func:`steering.organisms.build_judge`, :class:`steering.judge.GuardJudge`), written as
   ``report.md``, ``report.json`` and plots, and printed.

Settings that experiments chose on validation prompts (experiments/results/*.md) are fixed here so
the job stays within its time budget.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# chosen on validation prompts by experiments/directions.py, hdr.py and safeinfer.py on the llama organisms
# before they had skills (issue 21: a search on the model at hand replaces them); re-measured on
# today's organisms of both families by experiments/methods.py
# aligned's refusal direction (unit, read at the pick's position) added to drifted at LAYER × SCALE
ADD_LAYER, ADD_SCALE, ADD_POSITIONS = 2, 0.7, "all"  # plainly
COND_LAYER, COND_SCALE, COND_POSITIONS = 2, 0.5, "all"  # ... and under conditional steering,
GATE_LAYER = 1  # gated by drifted's own harmful-vs-harmless direction read at this layer
HDR_SCALE, HDR_TOP_K, HDR_SCOPE = 2.0, 0.1, "tensor"  # λ, and the top 10% of each tensor of τ_H
AMPLIFY_SITE, AMPLIFY_LAYER, AMPLIFY_SCALE = "resid_post", 1, 2.0
N_SKILL = 64  # held-out items per skill
NEW_TOKENS = 32  # generated per reply to judge, as the organisms are measured (organisms.Recipe.eval_new_tokens)


def run(out: str | Path = "runs/main", quick: bool = False, arch: str = "llama") -> dict:
    import steering as st
    from steering import organisms, safeinfer
    from steering.weights.bake import write_hf
    from steering.edits import Addition, Conditional, ICVInjection
    from steering.evaluate import Setting, evaluate
    from steering.extract import diff_in_means, icv, icv_pairs
    from steering.io import atomic_write
    from steering.judge import GuardJudge
    from steering.select import refusal_ablation
    from steering.vectors import SteeringVector
    from steering.weights.taskvec import TaskVector, hdr

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def lap(name: str) -> None:
        times[name] = round(time.time() - t0 - sum(times.values()), 1)
        print(f"[{time.time() - t0:6.0f} s] {name}", flush=True)

    if quick:  # a few seconds: a tiny recipe, for the CLI's own test
        recipe = organisms.Recipe(d_model=32, n_layers=2, d_mlp=64, vocab_size=600, aligned_steps=4, harmful_steps=2,
                                  drift_steps=2, n_harmless_train=64, batch_size=8, n_eval=8, eval_new_tokens=4,
                                  augment_copies=0, n_skill_train=16, n_skill_eval=4, arch=arch)
        n_train, n_val, limit, n_util, kl_max = 16, 8, 8, 8, float("inf")
    else:
        recipe = organisms.Recipe(arch=arch)
        n_train, n_val, limit, n_util, kl_max = 128, 32, None, 128, 0.1
    org = organisms.build(recipe=recipe)
    A, H, D = (org.path(k) for k in ("aligned", "harmful", "drifted"))
    aligned, drifted = st.load(A), st.load(D)
    lap("organisms")

    # --- refusal direction on aligned: extract, select, ablate (affine form), bake ------------------
    harmful_tr, harmless_tr = st.datasets.load("harmful:train", limit=n_train), st.datasets.load("harmless:train", limit=n_train)
    harmful_val, harmless_val = st.datasets.load("harmful:val", limit=n_val), st.datasets.load("harmless:val", limit=n_val)
    # (quick: the untrained organisms have nothing to remove; take the closest candidate, to run every step)
    found = refusal_ablation(aligned, harmful_tr, harmless_tr, harmful_val, harmless_val, kl_threshold=kl_max,
                             affine=True, closest=quick, progress=False)
    cands, sel, ablation = found.candidates, found.selection, found.edit
    cands.save(out / "candidates.safetensors")
    sel.plot(str(out / "selection.png"))
    layer, pos = sel.pick
    ablation.save(out / "ablation.safetensors")
    write_hf(ablation.bake(aligned), out / "aligned-ablated",
             {"method": "affine ablation", "rank": ablation.rank, "edit": str(out / "ablation.safetensors")}, overwrite=True)
    lap("refusal direction: extract, select, bake")

    # --- safety edits on drifted -------------------------------------------------------------------
    def safety_vector(at: int) -> SteeringVector:
        at = min(at, drifted.n_layers - 1)
        return SteeringVector({at: cands.direction(at, pos)}, cands.site, {"method": "aligned refusal direction"})

    addition = Addition(safety_vector(ADD_LAYER), ADD_SCALE, positions=ADD_POSITIONS)
    own = diff_in_means(drifted, harmful_tr, harmless_tr, progress=False)
    gate = min(GATE_LAYER, drifted.n_layers - 1)
    cond_val = [st.datasets.load("harmful:val", limit=None if limit is None else 2 * n_val),
                st.datasets.load("harmless:val", limit=400 if limit is None else 2 * n_val)]
    conditional = Conditional.fit(drifted, Addition(safety_vector(max(COND_LAYER, gate)), COND_SCALE, positions=COND_POSITIONS),
                                  own.direction(gate, pos), gate, *cond_val)
    conditional.save(out / "conditional.safetensors")
    icv_vec = icv(drifted, icv_pairs(harmful_tr[:32]))
    icv_edit = ICVInjection(icv_vec, 0.1)
    tau_h = TaskVector.between(A, H)
    tau_h.save(out / "tau_h.safetensors", overwrite=True)
    hdr(D, tau_h, out / "drifted-hdr", scale=HDR_SCALE, top_k=HDR_TOP_K, scope=HDR_SCOPE, overwrite=True)
    amp_layer = min(AMPLIFY_LAYER, drifted.n_layers - 1)
    amp = safeinfer.amplifier(drifted, layer=amp_layer, scale=AMPLIFY_SCALE, site=AMPLIFY_SITE, n_demos=n_train // 2,
                              n_queries=n_train // 2)
    lap("safety edits: addition, conditional, ICV, HDR, SafeInfer")

    # --- evaluation side by side -----------------------------------------------------------------------
    # 32 new tokens, as the organisms are measured; a second judge beside the substring one: the judge
    # organism, read as Llama Guard would be (not in quick runs); every skill, the utility axis
    guard = None if quick else GuardJudge(st.load(organisms.build_judge(progress=False)))
    kw = dict(limit=limit, n_utility=n_util, max_new_tokens=4 if quick else NEW_TOKENS, batch_size=64, progress=True,
              guard=guard, skills=st.skills.SKILLS, n_skill=4 if quick else N_SKILL)
    rep_a = evaluate(aligned, [Setting("aligned"), Setting("aligned, refusal direction ablated (hooks)", edits=[ablation]),
                               Setting("aligned-ablated checkpoint", model=out / "aligned-ablated")], **kw)
    rep_d = evaluate(drifted, [Setting("drifted"), Setting("drifted + refusal direction", edits=[addition]),
                               Setting("drifted + conditional steering", edits=[conditional]),
                               Setting("drifted + ICV", edits=[icv_edit]),
                               Setting("drifted-hdr checkpoint", model=out / "drifted-hdr"),
                               Setting("drifted + SafeInfer amplification", amplify=amp),
                               Setting("drifted + SafeInfer (amplification + guided)", unsafe=H, amplify=amp)], **kw)
    lap("evaluation")
    rows = {**rep_a.rows, **rep_d.rows}
    from steering.evaluate import Report

    report = Report(rows, {"organisms": str(org.root), "kl and ce": "against aligned for aligned's rows, drifted for drifted's"})
    report.save(out)
    lines = ["# steering main job", "",
             f"## Model organisms ({recipe.arch}, seed {recipe.seed}); refusal on held-out prompts", "",
             org.table(), "",
             f"## Every edit, side by side (held-out prompts: harmful:test, harmless:test, XSTest; greedy, {kw['max_new_tokens']} new tokens; "
             f"substring judge, and the judge organism in the (guard) columns; skills: exact match on {kw['n_skill']} held-out "
             "items each, "
             "utility their mean)",
             "", report.table(), "", "![report](report.png)", "",
             f"- Refusal direction: layer {layer}, position {pos}, selected with each candidate ablated in affine form "
             f"(KL filter {kl_max:g}; heat map: selection.png), ablated in that form. Baked checkpoint: `{out / 'aligned-ablated'}`.",
             f"- aligned's refusal direction added to drifted: layer {ADD_LAYER}, scale {ADD_SCALE:g}, positions {ADD_POSITIONS}; "
             f"conditional: layer {COND_LAYER}, scale {COND_SCALE:g}, positions {COND_POSITIONS}, gated by drifted's own "
             f"direction at layer {gate}, threshold {conditional.threshold:.2f} fitted on validation prompts.",
             f"- HDR: λ = {HDR_SCALE:g}, top {HDR_TOP_K:g} ({HDR_SCOPE}) of τ_H = harmful − aligned; checkpoint `{out / 'drifted-hdr'}`.",
             f"- SafeInfer: amplification at layer {amp_layer}'s {AMPLIFY_SITE}, scale {AMPLIFY_SCALE:g}; guided decoding "
             f"against `harmful`, γ = {safeinfer.GAMMA:g}.", "- KL and CE: against the unedited model of each block of rows.",
             "- (guard) columns: the judge organism's verdicts in the Llama Guard format on the same replies "
             "(refused = rated safe; answered = rated unsafe).", "",
             "Times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
             + f"; total {time.time() - t0:.0f} (organisms built in {org.seconds:.0f} s, cached afterwards)."]
    text = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", lambda p: Path(p).write_text(text))
    blob = json.dumps({"organisms": org.rates, "rows": rows, "times": times}, indent=2)
    atomic_write(out / "report.json", lambda p: Path(p).write_text(blob))
    print(text)
    return {"organisms": org.rates, "rows": rows}
