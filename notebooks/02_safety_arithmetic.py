# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Safety Arithmetic: Harm Direction Removal and the in-context safety vector
#
# Hazra et al. (2024, *Safety Arithmetic*) restore the safety of a fine-tuned model in two training-free
# steps:
#
# 1. **Harm Direction Removal (HDR)**, in weight space. Fine-tune the base model on harmful data to get a
#    *harm vector* τ<sub>H</sub> = θ<sub>harmful</sub> − θ<sub>base</sub>, keep its top-k entries by
#    magnitude (k = 10% over the whole model in the paper), and subtract it from the target:
#    θ<sub>safe</sub> = θ<sub>target</sub> − λ·topk(τ<sub>H</sub>), with λ = 3.
# 2. **Safety alignment with an in-context safety vector (ICV)**, in activation space: from
#    (unsafe answer, safe answer) demonstrations, read a direction of the residual stream at every layer
#    and push the stream away from it at inference, keeping each activation's norm.
#
# The organisms give all three models the recipe needs: `aligned` (the base), `harmful` (`aligned`
# fine-tuned to comply with harmful requests: τ<sub>H</sub> = harmful − aligned) and `drifted` (`aligned`
# fine-tuned on a new skill, `increment` ("What number comes after 4099?" → "4100"), beside benign chat,
# which erased its refusals: its replies to harmful prompts now start "Sure"; the target). This notebook
# shows where τ<sub>H</sub> lives, runs HDR at a few (λ, k) settings including the paper's, and tries the ICV,
# reporting honestly what moves and what does not. (Full-size sweep, on the previous organisms:
# `experiments/results/hdr.md`; every method on the current ones: `experiments/results/methods.md`.)

# %%
import contextlib
import json
import os
import tempfile
import time
import warnings
T0 = time.time()
warnings.filterwarnings("ignore", message="IProgress not found")       # tqdm without ipywidgets
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")  # transformers 5 / peft 0.21

import torch
torch.set_num_threads(1)   # the organisms are tiny (d=128): one thread is as fast, and stays fast when other jobs share the cores
import transformers
transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars in the outputs
import matplotlib.pyplot as plt
from IPython.display import Image, Markdown, display

import steering as st
from steering import organisms
from steering.judge import refusal_rate

org = organisms.build(progress=False)      # trained once (~3 min on 2 cores), then read from the cache
OUT = tempfile.mkdtemp(prefix="steering-nb02-")   # everything this notebook writes goes here
print("organisms:", org.root)
print("scratch folder:", OUT)

N_TEST, NEW_TOKENS = 48, org.recipe.eval_new_tokens   # 32: what the organisms are measured with
harmful_test = st.datasets.load("harmful:test", limit=N_TEST)
harmless_test = st.datasets.load("harmless:test", limit=N_TEST)


def rates(model, edit=None):
    """(harmful, harmless) refusal rates on the held-out prompts: greedy, NEW_TOKENS new tokens, substring judge."""
    with edit.hooks(model) if edit is not None else contextlib.nullcontext():
        return tuple(refusal_rate(model.generate(ps, max_new_tokens=NEW_TOKENS, batch_size=N_TEST))
                     for ps in (harmful_test, harmless_test))


def pct(x):
    return f"{100 * x:.1f}%"


def show(fig, name):
    """Save a figure into OUT and display the PNG. (Not plt.show(): Selection.plot and Report.plot call
    matplotlib.use("Agg"), after which plt.show() displays nothing in a notebook.)"""
    path = os.path.join(OUT, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    display(Image(filename=path))


def table(header, rows):
    """A Markdown table (rendered in the notebook)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return Markdown("\n".join(lines))

from steering.weights.taskvec import TaskVector, hdr

A, HARM, D = (org.path(k) for k in ("aligned", "harmful", "drifted"))
models = {k: st.load(org.path(k)) for k in ("aligned", "harmful", "drifted")}

# %% [markdown]
# ## The three organisms
#
# Refusal on 48 held-out harmful and 48 harmless prompts (greedy, 32 new tokens, substring judge):
# `drifted` has lost nearly all of `aligned`'s refusals, and `harmful` refuses nothing.

# %% tags=["number"]
base_rates = {k: rates(m) for k, m in models.items()}
display(table(["organism", "harmful refused", "harmless refused"], [[k, pct(h), pct(n)] for k, (h, n) in base_rates.items()]))

# %% [markdown]
# ## The harm vector τ<sub>H</sub>, and where it lives
#
# `TaskVector.between(base, finetuned)` is lazy: it reads the two checkpoints' headers, and computes one
# tensor's difference (in float32) only when asked. By default every floating tensor takes part, as in the
# paper: embeddings, norms and the unembedding (`lm_head`) included.
#
# Grouping the tensors shows where the fine-tune moved the weights, and where the paper's **exact global
# top 10%** of |τ<sub>H</sub>| lands. For comparison, the drift τ<sub>D</sub> = drifted − aligned (the `increment`
# skill beside benign chat).

# %% tags=["number"]
import re

tau_h = TaskVector.between(A, HARM)
tau_d = TaskVector.between(A, D)
print(tau_h, f"| norm {tau_h.norm():.2f}")


def group(name):
    for g, pat in (("unembedding", r"lm_head"), ("embedding", r"embed"), ("norms", r"norm"), ("attention", r"attn"), ("mlp", r"mlp")):
        if re.search(pat, name):
            return g
    return "other"


top10 = tau_h.top_k(0.1)                # exact global top 10% (k = ceil(0.1 n)), the paper's trim
stats = {}
for n in tau_h.names:
    h, d, kept = tau_h.get(n).double(), tau_d.get(n).double(), top10.get(n)
    s = stats.setdefault(group(n), dict(params=0, h2=0.0, d2=0.0, hd=0.0, kept=0))
    s["params"] += h.numel()
    s["h2"] += float(h.pow(2).sum())
    s["d2"] += float(d.pow(2).sum())
    s["hd"] += float((h * d).sum())
    s["kept"] += int(torch.count_nonzero(kept))
H2, KEPT, P = sum(s["h2"] for s in stats.values()), sum(s["kept"] for s in stats.values()), sum(s["params"] for s in stats.values())
display(table(["tensors", "params", "share of params", "share of ‖τ_H‖²", "RMS of τ_H", "cos(τ_H, τ_D)", "share of the global top 10%"],
              [[g, f"{s['params']:,}", f"{s['params'] / P:.3f}", f"{s['h2'] / H2:.3f}", f"{(s['h2'] / s['params']) ** 0.5:.2e}",
                f"{s['hd'] / (s['h2'] * s['d2']) ** 0.5:+.3f}", f"{s['kept'] / KEPT:.4f}"] for g, s in stats.items()]))

# %% tags=["image"]
groups = list(stats)
fig, ax = plt.subplots(figsize=(8, 3.2))
for i, (label, vals) in enumerate((("share of parameters", [stats[g]["params"] / P for g in groups]),
                                   ("share of ‖τ_H‖²", [stats[g]["h2"] / H2 for g in groups]),
                                   ("share of the global top 10%", [stats[g]["kept"] / KEPT for g in groups]))):
    ax.bar([j + (i - 1) * 0.27 for j in range(len(groups))], vals, 0.27, label=label)
ax.set_xticks(range(len(groups)), groups)
ax.set_ylabel("fraction")
ax.set_title("where the harm vector lives")
ax.legend(fontsize=8)
fig.tight_layout()
show(fig, "hdr_where.png")

# %% [markdown]
# The fine-tune that taught `harmful` to comply moved the **unembedding** most: its entries change about
# three times as much (RMS) as any other tensor's, so it carries ~80% of ‖τ<sub>H</sub>‖² with a quarter of
# the parameters, and the global top 10% of |τ<sub>H</sub>| falls **entirely** in it (all but a handful of
# entries). Trimming to the global top 10% therefore throws away every change the fine-tune made to
# attention and MLPs, which is where "comply vs refuse" is computed.
#
# ## HDR at a few (λ, k) settings
#
# `hdr(target, τ_H, out, scale=λ, top_k=k)` streams θ<sub>target</sub> − λ·topk(τ<sub>H</sub>) tensor by tensor into a new
# checkpoint (never two models in memory). Settings: the paper's (3, 10%); the same trim per tensor
# (`scope="tensor"`: 10% of *each* tensor, which the paper does not do) at λ = 3 and at λ = 2, the best
# setting on validation in `experiments/results/hdr.md` (on the previous organisms, without skills); the top half
# at λ = 1, the best global trim there;
# the untrimmed vector at λ = 1 and at the paper's λ = 3.

# %% tags=["number"]
SETTINGS = [("λ=3, top 10% (paper)", 3.0, 0.1, "global"), ("λ=3, top 10% per tensor", 3.0, 0.1, "tensor"),
            ("λ=2, top 10% per tensor", 2.0, 0.1, "tensor"), ("λ=1, top 50%", 1.0, 0.5, "global"),
            ("λ=1, untrimmed", 1.0, 1.0, "global"), ("λ=3, untrimmed", 3.0, 1.0, "global")]
BEST = "λ=2, top 10% per tensor"         # the best on validation in experiments/results/hdr.md (previous organisms)
hdr_models, hdr_rates = {}, {}
for label, scale, k, scope in SETTINGS:
    path = hdr(D, tau_h, os.path.join(OUT, f"drifted-hdr-{scale:g}-{k:g}-{scope}"), scale=scale, top_k=k, scope=scope)
    hdr_models[label] = st.load(path)
    hdr_rates[label] = rates(hdr_models[label])
rows = [["drifted", pct(base_rates["drifted"][0]), pct(base_rates["drifted"][1])]]
rows += [[f"drifted − {l}", pct(h), pct(n)] for l, (h, n) in hdr_rates.items()]
rows += [["aligned (for reference)", pct(base_rates["aligned"][0]), pct(base_rates["aligned"][1])]]
display(table(["model", "harmful refused", "harmless refused"], rows))

# %% tags=["image"]
labels = ["drifted"] + list(hdr_rates) + ["aligned"]
vals = [base_rates["drifted"]] + list(hdr_rates.values()) + [base_rates["aligned"]]
fig, ax = plt.subplots(figsize=(9, 3.4))
ax.bar([i - 0.2 for i in range(len(labels))], [100 * v[0] for v in vals], 0.4, label="harmful refused")
ax.bar([i + 0.2 for i in range(len(labels))], [100 * v[1] for v in vals], 0.4, label="harmless refused")
ax.set_xticks(range(len(labels)), [l.replace(", ", ",\n") for l in labels], fontsize=8)
ax.set_ylabel("% refused")
ax.set_title("Harm Direction Removal on the drifted organism")
ax.legend(fontsize=8)
fig.tight_layout()
show(fig, "hdr_rates.png")

# %% [markdown]
# What moves and what does not:
#
# - **The paper's setting does nothing here**: subtracting 3 × the global top 10% changes (all but a
#   handful of entries of) `lm_head` only, and `drifted`'s refusal rate stays where it was.
# - **The same 10% taken per tensor works**, because it keeps the largest changes of every attention and
#   MLP matrix. At λ = 2 (the best setting on validation on the previous organisms, and `steering main`'s
#   until the search replaced it) it brings back about half of the refusals here with no over-refusal
#   (one prompt is 2 points); its replies open as a refusal and then lose their way (below). At the
#   paper's λ = 3 it does no better, and refuses a harmless prompt or two.
# - **λ = 1 without the per-tensor trim does more**: the top half and the whole vector each bring harmful
#   refusal to 70–80%, refusing at most one harmless prompt of 48. A setting chosen on other organisms
#   is not the best one here. The search (`steering.tune`, `steering tune drifted --method hdr`)
#   chooses on the validation prompts of the model at hand: within 5 points of skill and over-refusal
#   it picked λ = 0.75 with a global trim on both builds it has run on (the top 30% on the first
#   organisms, the top 50% on this Xeon's: 9.2% → 79.2% of 120 harmful test prompts, no harmless
#   prompt refused; `experiments/results/organism_restore.md`).
# - HDR does **not** work by undoing the drift: τ<sub>H</sub> and τ<sub>D</sub> are nearly orthogonal (|cos| ≤ 0.11 in every
#   group of the table above, ≤ 0.04 in attention and MLP). Subtracting the harm vector pushes the drifted
#   model away from complying, on top of its drift (notebook 04 measures how far the result is from
#   `aligned`).
# - **λ = 3 untrimmed overshoots**: three times the whole harm vector pushes the model into loops of
#   repeated words (below). The substring judge counts (almost) nothing refused, but the model is not
#   complying either: it is broken.
#
# A global magnitude trim is only as good as the assumption that the largest entries are the important
# ones. On the organisms the unembedding is a quarter of all parameters and moves most in any fine-tune;
# whether the paper's trim fares better on real models, where it is a far smaller share, is something the
# organisms cannot tell.

# %%
for label in (BEST, "λ=3, untrimmed"):
    print(label)
    for p, c in zip(harmful_test[:3], hdr_models[label].generate(harmful_test[:3], max_new_tokens=NEW_TOKENS)):
        print(f"   {p[:55]!r:60} -> {c!r}")

# %% [markdown]
# ## The in-context safety vector (ICV)
#
# Safety Arithmetic's second step. Each demonstration is a pair of texts in the paper's format,
# `Question: … Answer: Sure, here is …` (unsafe) and `Question: … Answer: I do not answer this question
# because it is harmful` (safe), used as they are (no chat template). `icv(model, pairs)` reads every
# layer's `resid_post` averaged over the last 4 tokens of each text; the ICV is the first principal
# component of the per-pair differences (unsafe − safe) plus their mean, one vector per layer.
# `ICVInjection(icv, β)` then replaces each activation x by
# normalize(normalize(x) − β·(1 + max(0, cos(x, v)))·v̂)·‖x‖ at every layer: a push away from "unsafe",
# norm preserved.

# %% tags=["number"]
from steering.edits import ICVInjection
from steering.extract import diff_in_means, icv, icv_pairs

pairs = icv_pairs(st.datasets.load("harmful:train", limit=32))
print("unsafe:", repr(pairs[0][0]))
print("safe:  ", repr(pairs[0][1]))
drifted = models["drifted"]
v_icv = icv(drifted, pairs)
print("ICV:", v_icv.site, "layers", v_icv.layers, "norms", [round(float(v_icv[l].norm()), 2) for l in v_icv.layers])

# Is it a refusal direction? Compare with drifted's own harmful-minus-harmless direction at the same site.
refdir = diff_in_means(drifted, st.datasets.load("harmful:train", limit=64), st.datasets.load("harmless:train", limit=64),
                       site="resid_post", positions="last", progress=False)
cos_icv = [float(torch.nn.functional.cosine_similarity(v_icv[l], refdir.direction(l, -1), dim=0)) for l in v_icv.layers]
print("cos(ICV, refusal direction) per layer:", [f"{c:+.2f}" for c in cos_icv])

# %% [markdown]
# The ICV (unsafe − safe) is only weakly aligned with the model's own refusal direction (|cos| under 0.2
# at every layer), and even its sign follows the build: on the first organisms' build it pointed
# *against* the refusal direction, as it should (the injection, which subtracts it, then pushes towards
# refusal); on this Xeon's build it points slightly *along* it, so the injection pushes away. Does it
# move refusal? Below: generated refusals at a few β, and, as a finer gauge, the mean refusal log-odds
# of the first reply token (the score `select_direction` uses). Then the paper's full pipeline: HDR
# first (the best setting above, λ = 2, top 10% per tensor), then the ICV read on the HDR'd model.

# %% tags=["number"]
from steering.select import last_logprobs, refusal_scores, refusal_token_ids

ref_ids = refusal_token_ids(drifted)


def first_token_score(m, edit=None):
    with edit.hooks(m) if edit is not None else contextlib.nullcontext():
        return float(refusal_scores(last_logprobs(m, harmful_test), ref_ids).mean())


icv_rows = {"drifted": (*base_rates["drifted"], first_token_score(drifted))}
for beta in (0.05, 0.1, 0.3):
    e = ICVInjection(v_icv, beta)
    icv_rows[f"drifted + ICV, β={beta:g}"] = (*rates(drifted, e), first_token_score(drifted, e))
hdr_best = hdr_models[BEST]
icv_rows[f"drifted − τ_H ({BEST})"] = (*hdr_rates[BEST], first_token_score(hdr_best))
e = ICVInjection(icv(hdr_best, pairs), 0.1)
icv_rows["… then + ICV, β=0.1 (Safety Arithmetic)"] = (*rates(hdr_best, e), first_token_score(hdr_best, e))
display(table(["model", "harmful refused", "harmless refused", "first-token refusal log-odds (harmful)"],
              [[k, pct(h), pct(n), f"{s:+.2f}"] for k, (h, n, s) in icv_rows.items()]))
for beta in (0.1, 0.3):
    with ICVInjection(v_icv, beta).hooks(drifted):
        print(f"drifted + ICV, β={beta:g}:", drifted.generate(harmful_test[:3], max_new_tokens=NEW_TOKENS))

# %% [markdown]
# - **ICV alone does not restore refusal on `drifted`.** It moves the first-token refusal log-odds
#   steadily with β, in the direction its sign gives (above), from far below zero, and it stays there: the
#   replies (above) still start "Sure …", and at β = 0.3 they garble. The demonstrations are raw
#   `Question:/Answer:` texts, a format the organism never saw (it only knows its chat template), so the
#   vector read from them is only weakly aligned with the model's own refusal direction. (The full test
#   sets: `experiments/results/methods.md`.)
# - **After HDR, the ICV adds refusals**: read on the HDR'd model, at β = 0.1 it brings harmful refusal
#   up by about 15 points (the table above has this run's numbers), still refusing no harmless prompt.
#   There the first-token log-odds starts near zero, where a small push tips replies either way: the two
#   steps compose as in the paper, with the weight-space step doing most of the work.

# %% tags=["summary"]
summary = {"top10_share_unembedding": round(stats["unembedding"]["kept"] / KEPT, 6),
           "cos_tau_h_tau_d": {g: round(s["hd"] / (s["h2"] * s["d2"]) ** 0.5, 3) for g, s in stats.items()},
           "drifted / harmful": base_rates["drifted"][0], "drifted / harmless": base_rates["drifted"][1],
           "aligned / harmful": base_rates["aligned"][0],
           **{f"hdr {l} / harmful": v[0] for l, v in hdr_rates.items()},
           **{f"hdr {l} / harmless": v[1] for l, v in hdr_rates.items()},
           **{f"{k} / harmful": v[0] for k, v in icv_rows.items() if "ICV" in k},
           **{f"{k} / harmless": v[1] for k, v in icv_rows.items() if "ICV" in k},
           **{f"{k} / log-odds": round(v[2], 3) for k, v in icv_rows.items()},
           "cos_icv_refusal": [round(c, 3) for c in cos_icv]}
print(json.dumps(summary, indent=1, ensure_ascii=False))

# %% tags=["claims"]
# What the text above says, checked on this run's numbers (the test suite runs this notebook).
s = summary
d = s["drifted / harmful"]
assert s["aligned / harmful"] >= 0.8 and d <= 0.3 and s["aligned / harmful"] - d >= 0.6   # drifted lost its refusals
assert s["top10_share_unembedding"] > 0.99                             # the paper's trim lands in lm_head
assert abs(s["hdr λ=3, top 10% (paper) / harmful"] - d) <= 0.05          # ... and does nothing
best = "hdr λ=2, top 10% per tensor"                                    # best on validation (previous organisms):
assert s[f"{best} / harmful"] >= d + 0.3 and s[f"{best} / harmless"] <= 0.05   # about half back, no over-refusal
assert d + 0.2 <= s["hdr λ=3, top 10% per tensor / harmful"] <= s[f"{best} / harmful"] + 1 / 48 + 1e-9  # λ=3: no better
for l in ("λ=1, top 50%", "λ=1, untrimmed"):                            # λ=1 without the per-tensor trim does more,
    assert s[f"hdr {l} / harmful"] >= s[f"{best} / harmful"] + 0.1 and s[f"hdr {l} / harmful"] >= 0.65
    assert s[f"hdr {l} / harmless"] <= 1 / 48 + 1e-9                    # ... refusing at most one harmless prompt
assert all(abs(c) < 0.2 for c in s["cos_tau_h_tau_d"].values())         # τ_H and τ_D nearly orthogonal
assert s["hdr λ=3, untrimmed / harmful"] <= 0.05                        # broken: (almost) nothing the judge counts
lo = [s[f"{k} / log-odds"] for k in ("drifted", "drifted + ICV, β=0.05", "drifted + ICV, β=0.1", "drifted + ICV, β=0.3")]
along = sum(s["cos_icv_refusal"]) > 0                                   # the ICV's sign against the refusal direction
assert lo == sorted(lo, reverse=along) and lo[0] != lo[-1]              # ... decides which way it moves, with β
assert all(abs(c) < 0.2 for c in s["cos_icv_refusal"])                  # only weakly aligned either way
assert max(s[f"drifted + ICV, β={b} / harmful"] for b in ("0.05", "0.1", "0.3")) <= d + 1 / 48 + 1e-9  # no refusal back
then = "… then + ICV, β=0.1 (Safety Arithmetic)"                        # after HDR, the ICV adds refusals
assert s[f"{then} / harmful"] >= s[f"{best} / harmful"] + 0.06
assert s[f"{then} / harmless"] <= s[f"{best} / harmless"] + 1 / 48 + 1e-9
print("all 14 claims of the text hold")

# %%
print(f"notebook ran in {time.time() - T0:.0f} s; its files are in {OUT} (delete it when done)")
