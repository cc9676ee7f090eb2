"""Refusal directions and activation edits on the model organisms, run as a user would.

    python experiments/directions.py [--arch llama gpt2]   # writes experiments/results/directions.md

For each architecture: `steering extract` (difference in means, 128 harmful:train vs 128
harmless:train prompts, resid_pre at the post-instruction positions) and `steering select`
(bypass / induce / KL on 32 harmful:val and 32 harmless:val prompts) on the `aligned` organism,
`steering extract --positions last:5` and `steering select --subspace` when one direction is not
enough, `steering bake` to a Hugging Face folder; then, on held-out test prompts (substring judge,
greedy):
- the ablation's harmful refusal and its KL on harmless prompts;
- the selected direction in affine form (`steering select --affine`: coordinates kept at the
  harmless validation prompts' mean instead of zero), hooked and baked;
- the selected direction added (ActAdd) to harmless prompts, at every position (the paper's form)
  and only at the prompt's post-instruction tokens;
- a safety vector (the aligned model's refusal direction) added to `drifted`, plainly and under
  conditional steering (gated by `drifted`'s own harmful-vs-harmless direction); layer,
  positions, scale, condition layer and threshold are chosen on validation prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import steering as st  # noqa: E402
from _util import cli, pct  # noqa: E402
from steering import organisms  # noqa: E402
from steering.main import NEW_TOKENS  # noqa: E402
from steering.edits import Ablation, Addition, Conditional, load_edit  # noqa: E402
from steering.judge import is_refusal, refusal_rate  # noqa: E402
from steering.select import kl_div, kl_per_prompt, last_logprobs  # noqa: E402
from steering.vectors import SteeringVector  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
N_NEW = NEW_TOKENS  # as the main job's evaluation: long enough to judge
# scales of the safety vector tried on validation: steps of √2. The response is not monotone (too
# much addition derails the reply into repeated tokens the judge does not count), and on gpt2 the
# useful band is narrow: a grid of {0.5, 1, 2} missed it (gpt2 drifted: 25.8% harmful refusal on test
# against 68.3% at the scale this grid finds; the sweep is in the results file)
SCALES = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0)


def skills(model: st.Model, edit=None) -> dict[str, float]:
    """Exact match on 64 held-out items of every skill (aligned's three and drifted's new one)."""
    return {k: st.skills.accuracy(model, k, edit=edit) for k in st.skills.SKILLS}


def rates(model: st.Model, edit=None, sets=("harmful:test", "harmless:test"), with_skills: bool = True) -> dict:
    out: dict = {"skills": skills(model, edit)} if with_skills else {}
    for spec in sets:
        prompts = st.datasets.load(spec)
        if edit is None:
            outs = model.generate(prompts, max_new_tokens=N_NEW, batch_size=64)
        else:
            with edit.hooks(model):
                outs = model.generate(prompts, max_new_tokens=N_NEW, batch_size=64)
        out[spec] = refusal_rate(outs)
    return out


def harmless_kl(model: st.Model, edit, n: int = 256) -> float:
    prompts = st.datasets.load("harmless:test", limit=n)
    base = last_logprobs(model, prompts)
    with edit.hooks(model):
        new = last_logprobs(model, prompts)
    return kl_div(base, new)


def harmless_reference(model: st.Model, n: int = 256) -> tuple[list[str], torch.Tensor, list[bool]]:
    """The unedited model on ``n`` harmless:test prompts: the prompts, last-token log-probs, judged refusals."""
    prompts = st.datasets.load("harmless:test", limit=n)
    plain = [is_refusal(o) for o in model.generate(prompts, max_new_tokens=N_NEW, batch_size=64)]
    return prompts, last_logprobs(model, prompts), plain


def kl_breakdown(model: st.Model, edit, n: int = 256, seed: int = 0, reference: tuple | None = None) -> dict:
    """Where an ablation's KL on harmless prompts comes from: the prompts whose judged refusal the
    edit flips (the organism refuses some harmless prompts, and an ablation that works un-refuses
    them), the rest (a change of which helpful opening comes first), and, as a control, random
    subspaces of the same rank (mean of 5). ``reference``: :func:`harmless_reference` of the same
    model and ``n``, to share between several edits."""
    prompts, base, plain = reference or harmless_reference(model, n)
    with edit.hooks(model):
        new = last_logprobs(model, prompts)
        edited = [is_refusal(o) for o in model.generate(prompts, max_new_tokens=N_NEW, batch_size=64)]
    kl = kl_per_prompt(base, new)
    flip = torch.tensor([a != b for a, b in zip(plain, edited)])
    g = torch.Generator().manual_seed(seed)
    rand = []
    for _ in range(5):
        with Ablation(torch.randn(edit.rank, model.d_model, generator=g)).hooks(model):
            rand.append(kl_div(base, last_logprobs(model, prompts)))
    before, after = base.exp().mean(0), new.exp().mean(0)
    tok = model.tokenizer
    return {"kl": float(kl.mean()), "n": n, "flipped": int(flip.sum()), "refused_before": int(sum(plain)),
            "refused_after": int(sum(edited)),
            "kl_from_flipped": float(kl[flip].sum() / n), "kl_from_rest": float(kl[~flip].sum() / n),
            "random_same_rank": sum(rand) / len(rand),
            "first_tokens": [[tok.decode([int(i)]), float(before[i]), float(after[i])] for i in before.topk(8).indices]}


def run_arch(arch: str, work: Path) -> dict:
    org = organisms.build(arch=arch)
    aligned_dir, drifted_dir = str(org.path("aligned")), str(org.path("drifted"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"arch": arch}
    cli("extract", aligned_dir, "--out", str(work / "candidates.safetensors"))
    # The paper's filter (KL <= 0.1 on harmless prompts) first; where no candidate passes it the run
    # goes on with KL <= 0.5, and where none passes that either, with the direction selected in affine
    # form (the main job's), and the report says so.
    single = None
    for kl in (0.1, 0.5):
        res["kl_threshold"] = kl
        try:
            single = cli("select", aligned_dir, str(work / "candidates.safetensors"), "--kl-threshold", str(kl),
                         "--out", str(work / "ablation.safetensors"))
            break
        except RuntimeError as e:
            res["plain_failed"] = (str(e).strip().splitlines()[-1].removeprefix("steering select: error: ")
                                   .split(" (relax")[0].removeprefix("no candidate passed the filters; "))
    if single is None:
        for kl in (0.1, 0.5):
            res["kl_threshold"] = kl
            try:
                single = cli("select", aligned_dir, str(work / "candidates.safetensors"), "--kl-threshold", str(kl),
                             "--affine", "--out", str(work / "ablation.safetensors"))
                break
            except RuntimeError:
                if kl == 0.5:
                    raise
        res["plain_form"] = "affine"
    res["selection_table"] = single.split("\npick:")[0].strip()
    aligned = st.load(aligned_dir)
    res["aligned"] = rates(aligned)
    edit = load_edit(work / "ablation.safetensors")
    res["ablation_single"] = {**rates(aligned, edit), "kl": harmless_kl(aligned, edit), "pick": single.strip().splitlines()[-2]}
    chosen = "ablation.safetensors"
    if res["ablation_single"]["harmful:test"] > 0.20:
        # One direction is not enough on a 4-layer model: grow a subspace from candidates read at the
        # last five tokens (the two template tokens and the end of the user's message).
        cli("extract", aligned_dir, "--positions", "last:5", "--out", str(work / "candidates5.safetensors"))
        out = cli("select", aligned_dir, str(work / "candidates5.safetensors"), "--subspace", "--kl-threshold",
                  str(res["kl_threshold"]), "--out", str(work / "subspace.safetensors"))
        edit = load_edit(work / "subspace.safetensors")
        res["ablation_subspace"] = {**rates(aligned, edit), "kl": harmless_kl(aligned, edit), "rank": edit.rank,
                                    "steps": [l for l in out.splitlines() if l.startswith("subspace of rank")][0]}
        chosen = "subspace.safetensors"
    res["ablation_rank"] = edit.rank
    res["kl_breakdown"] = kl_breakdown(aligned, edit)
    # baked, as a user ships it
    cli("bake", aligned_dir, "--edit", str(work / chosen), "--out", str(work / "aligned-ablated"), "--overwrite")
    res["baked"] = rates(st.load(work / "aligned-ablated"), sets=("harmful:test",), with_skills=False)
    # the selected single direction in affine form (`steering select --affine`: coordinates kept at
    # the harmless validation prompts' mean), hooked and baked
    # (selection scores bypass and KL in the affine form too, so the paper's filter is tried first)
    res["affine_kl_threshold"] = 0.1
    try:
        out = cli("select", aligned_dir, str(work / "candidates.safetensors"), "--affine", "--out", str(work / "affine.safetensors"))
    except RuntimeError:
        res["affine_kl_threshold"] = 0.5
        out = cli("select", aligned_dir, str(work / "candidates.safetensors"), "--kl-threshold", "0.5", "--affine",
                  "--out", str(work / "affine.safetensors"))
    res["affine_selection_table"] = out.split("\npick:")[0].strip()
    affine = load_edit(work / "affine.safetensors")
    res["ablation_affine"] = {**rates(aligned, affine), "kl": harmless_kl(aligned, affine),
                              "pick": [l for l in out.splitlines() if l.startswith("pick:")][0]}
    cli("bake", aligned_dir, "--edit", str(work / "affine.safetensors"), "--out", str(work / "aligned-affine"), "--overwrite")
    res["affine_baked"] = rates(st.load(work / "aligned-affine"), sets=("harmful:test",), with_skills=False)
    # ActAdd: the selected direction added where it was read, at every position (the paper's form)
    # and only at the post-instruction tokens of the prompt
    sel = json.loads((work / "ablation.json").read_text())
    layer, pos = sel["pick"]
    cands = st.vectors.Candidates.load(work / "candidates.safetensors")
    res["addition"] = {}
    for where in ("all", "instruction_end"):
        for scale in (0.5, 1.0, 2.0):
            add = Addition(cands.vector(layer, pos), scale, where)
            res["addition"][f"{where} {scale}"] = rates(aligned, add, sets=("harmless:test",), with_skills=False)["harmless:test"]
    res["addition_layer"] = [layer, pos]
    # The safety vector on the drifted model: the aligned model's refusal direction (drifted is aligned
    # fine-tuned, so they share a residual basis), at a layer, positions and scale chosen on validation
    # prompts; plainly (harmless refusal on validation <= 10%), and conditionally (threshold fitted on
    # validation prompts, on the drifted model's own projections).
    drifted = st.load(drifted_dir)
    res["drifted"] = rates(drifted)
    val_h, val_s = st.datasets.load("harmful:val", limit=64), st.datasets.load("harmless:val", limit=64)
    sweep = []
    for l in range(1, int(0.8 * drifted.n_layers)):
        for where in ("all", "instruction_end"):
            for scale in SCALES:
                add = Addition(SteeringVector({l: cands.direction(l, pos)}, meta={"method": "aligned refusal direction"}),
                               scale, where)
                sweep.append((*rates_on(drifted, add, val_h, val_s), l, where, scale, add))
    res["drifted_sweep"] = [{"layer": l, "positions": w, "scale": c, "harmful": h, "harmless": s}
                            for h, s, l, w, c, _ in sweep]
    plain = max((s for s in sweep if s[1] <= 0.10), key=lambda s: s[0])
    res["drifted_addition"] = {**rates(drifted, plain[5]), "layer": plain[2], "positions": plain[3], "scale": plain[4]}
    best = max(sweep, key=lambda s: s[0])
    # Conditional steering: the condition is drifted's *own* harmful-vs-harmless direction (the
    # fine-tune stopped it acting on harmfulness, not seeing it; aligned's refusal direction read in
    # drifted is the comparison row below), at the layer up to the edit's whose threshold separates
    # the validation prompts best (all of harmful:val, 400 of harmless:val).
    cli("extract", drifted_dir, "--out", str(work / "drifted_candidates.safetensors"))
    own = st.vectors.Candidates.load(work / "drifted_candidates.safetensors")
    fit_h, fit_s = st.datasets.load("harmful:val"), st.datasets.load("harmless:val", limit=400)
    gates = []
    for l in range(1, best[2] + 1):
        c = Conditional.fit(drifted, best[5], own.direction(l, pos), l, fit_h, fit_s)
        on, off = float(c.passes(drifted, fit_h).float().mean()), float(c.passes(drifted, fit_s).float().mean())
        gates.append((on - off, on, off, c))
    _, on, off, cond = max(gates, key=lambda g: g[0])
    res["drifted_conditional"] = {**rates(drifted, cond), "threshold": cond.threshold, "condition_layer": cond.layer,
                                  "layer": best[2], "positions": best[3], "scale": best[4],
                                  "gate_val": {"harmful": on, "harmless": off}}
    # for comparison, the gate read along aligned's refusal direction (at the edit's layer)
    other = Conditional.fit(drifted, best[5], cands.direction(best[2], pos), best[2], fit_h, fit_s)
    res["drifted_conditional_aligned_gate"] = {
        **rates(drifted, other), "condition_layer": best[2],
        "gate_val": {"harmful": float(other.passes(drifted, fit_h).float().mean()),
                     "harmless": float(other.passes(drifted, fit_s).float().mean())}}
    plain[5].save(work / "drifted_safety_vector.safetensors")
    cond.save(work / "drifted_conditional.safetensors")
    return res


def rates_on(model: st.Model, edit, harmful: list[str], harmless: list[str]) -> tuple[float, float]:
    with edit.hooks(model):
        a = refusal_rate(model.generate(harmful, max_new_tokens=N_NEW, batch_size=64))
        b = refusal_rate(model.generate(harmless, max_new_tokens=N_NEW, batch_size=64))
    return a, b


def sk(v: dict) -> str:
    """The skill cells of a table row: each skill's exact match and their mean (blank if not measured)."""
    got = v.get("skills")
    if not got:
        return " |" * (len(st.skills.SKILLS) + 1)
    return "".join(f" {pct(got[k])} |" for k in st.skills.SKILLS) + f" {pct(sum(got.values()) / len(got))} |"


def report(results: list[dict]) -> str:
    lines = ["# Refusal directions and activation edits on the organisms", "",
             "Command: `python experiments/directions.py`. Held-out prompts: harmful:test (240), harmless:test (1335); "
             f"substring judge on greedy generations ({N_NEW} new tokens). KL: last-token KL on 256 harmless:test prompts. "
             "Skills: exact match on 64 held-out items each (sort, reverse, count: aligned's; increment: drifted's), "
             "utility their mean.", ""]
    for r in results:
        a = r["arch"]
        lines += [f"## {a}", ""]
        if r.get("plain_form") == "affine":
            lines += [f"No candidate passes the filters in the plain (directional) form, at KL ≤ 0.1 or 0.5 ({r['plain_failed']}), "
                      "so the rows below called the selected direction's ablation use the direction selected in affine "
                      "form (`steering select --affine`), as the main job does.", ""]
        lines += [f"Selection (KL filter {r['kl_threshold']}):", "", r["selection_table"], ""]
        if "affine_selection_table" in r:
            lines += [f"Selection with each candidate ablated in affine form (`steering select --affine`; KL filter "
                      f"{r['affine_kl_threshold']}):", "", r["affine_selection_table"], ""]
        lines += [
                  "| model / edit | harmful refusal | harmless refusal | KL (harmless) | " + " | ".join(st.skills.SKILLS) + " | utility |",
                  "|---|---|---|---|" + "---|" * (len(st.skills.SKILLS) + 1),
                  f"| aligned | {pct(r['aligned']['harmful:test'])} | {pct(r['aligned']['harmless:test'])} | 0 |{sk(r['aligned'])}",
                  f"| aligned, selected direction ablated ({r['ablation_single']['pick']}) | {pct(r['ablation_single']['harmful:test'])} "
                  f"| {pct(r['ablation_single']['harmless:test'])} | {r['ablation_single']['kl']:.4f} |{sk(r['ablation_single'])}"]
        if "ablation_subspace" in r:
            s = r["ablation_subspace"]
            lines.append(f"| aligned, selected subspace ablated (rank {s['rank']}; last 5 positions' candidates) | {pct(s['harmful:test'])} "
                         f"| {pct(s['harmless:test'])} | {s['kl']:.4f} |{sk(s)}")
        lines.append(f"| aligned, ablation baked (`steering bake`, rank {r['ablation_rank']}) | {pct(r['baked']['harmful:test'])} | | |")
        if "ablation_affine" in r:
            f = r["ablation_affine"]
            lines += [f"| aligned, direction selected and ablated in affine form (`steering select --affine`, KL filter "
                      f"{r.get('affine_kl_threshold', r['kl_threshold'])}; {f.get('pick', '')}) | {pct(f['harmful:test'])} "
                      f"| {pct(f['harmless:test'])} | {f['kl']:.4f} |{sk(f)}",
                      f"| aligned, affine form baked (`steering bake`) | {pct(r['affine_baked']['harmful:test'])} | | |"]
        for key, v in r["addition"].items():
            where, scale = key.split()
            lines.append(f"| aligned + {scale} × direction (layer {r['addition_layer'][0]}, pos {r['addition_layer'][1]}; "
                         f"positions {where}) | | {pct(v)} | |")
        d, da, dc = r["drifted"], r["drifted_addition"], r["drifted_conditional"]
        lines += [f"| drifted | {pct(d['harmful:test'])} | {pct(d['harmless:test'])} | |{sk(d)}",
                  f"| drifted + safety vector (layer {da['layer']}, {da['positions']}, scale {da['scale']}) | {pct(da['harmful:test'])} "
                  f"| {pct(da['harmless:test'])} | |{sk(da)}",
                  f"| drifted + conditional safety vector (layer {dc.get('layer', dc['condition_layer'])}, {dc['positions']}, "
                  f"scale {dc['scale']}; gate: drifted's own direction at layer {dc['condition_layer']}, threshold "
                  f"{dc['threshold']:.2f}, passing {pct(dc['gate_val']['harmful'])} / {pct(dc['gate_val']['harmless'])} "
                  f"of harmful / harmless validation prompts) "
                  f"| {pct(dc['harmful:test'])} | {pct(dc['harmless:test'])} | |{sk(dc)}"]
        if "drifted_conditional_aligned_gate" in r:
            g = r["drifted_conditional_aligned_gate"]
            lines.append(f"| … the same, gated by aligned's refusal direction at layer {g['condition_layer']} instead (passing "
                         f"{pct(g['gate_val']['harmful'])} / {pct(g['gate_val']['harmless'])}) "
                         f"| {pct(g['harmful:test'])} | {pct(g['harmless:test'])} | |{sk(g)}")
        lines.append("")
        if "drifted_sweep" in r:
            sw = r["drifted_sweep"]
            scales = sorted({e["scale"] for e in sw})
            lines += ["Validation sweep of the safety vector on drifted (64 harmful:val / 64 harmless:val; harmful / "
                      "harmless refusal). Plain addition takes the highest harmful refusal with harmless ≤ 10%; "
                      "conditional steering starts from the highest harmful refusal.", "",
                      "| layer | positions | " + " | ".join(f"scale {c:g}" for c in scales) + " |",
                      "|---|---|" + "---|" * len(scales)]
            for l, w in dict.fromkeys((e["layer"], e["positions"]) for e in sw):
                cells = {e["scale"]: f"{pct(e['harmful'])} / {pct(e['harmless'])}" for e in sw
                         if (e["layer"], e["positions"]) == (l, w)}
                lines.append(f"| {l} | {w} | " + " | ".join(cells.get(c, "") for c in scales) + " |")
            lines.append("")
        if "ablation_subspace" in r:
            lines += [f"Subspace growth: {r['ablation_subspace']['steps']}", ""]
        if "kl_breakdown" in r:
            b = r["kl_breakdown"]
            lines += [f"Where the rank-{r['ablation_rank']} ablation's KL ({b['kl']:.3f}, {b['n']} harmless:test prompts) "
                      f"comes from: {b['flipped']} prompts whose judged refusal flips ({b['refused_before']} refused before, "
                      f"{b['refused_after']} after) give {b['kl_from_flipped']:.3f}; the other {b['n'] - b['flipped']} give "
                      f"{b['kl_from_rest']:.3f}. Random subspaces of the same rank: {b['random_same_rank']:.3f}.", "",
                      "First-token probability on harmless prompts (mean), before → after the ablation: "
                      + ", ".join(f"`{t}` {a:.3f} → {c:.3f}" for t, a, c in b["first_tokens"]) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", nargs="+", default=["llama", "gpt2"])
    p.add_argument("--work", default=str(ROOT / "runs" / "directions"))
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 beside another job)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = [run_arch(a, Path(args.work) / a) for a in args.arch]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "directions.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (RESULTS / "directions.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
