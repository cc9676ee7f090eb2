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
# # 04 · Task vectors: arithmetic, top-k, TIES, DARE, recipes and side-by-side evaluation
#
# A **task vector** (Ilharco et al. 2023, *Editing models with task arithmetic*) is the weight change of a
# fine-tune, τ = θ<sub>finetuned</sub> − θ<sub>base</sub>. Adding it to a model adds the skill; subtracting it removes
# the behaviour; summing several merges them. Merging methods clean the vectors before summing:
# **TIES** (Yadav et al. 2023) trims each to its largest entries, elects one sign per entry and averages
# only the entries that agree; **DARE** (Yu et al. 2024) drops each entry with probability p and rescales
# the rest by 1/(1 − p).
#
# `steering.weights.taskvec` does all of this lazily, one tensor at a time (nothing ever holds two models in
# memory), with an **exact** global top-k, and `steering.recipe` composes such steps into one checkpoint
# from a YAML file, mergekit-style. `steering.evaluate` then compares models and edits side by side.
#
# On the organisms: τ<sub>H</sub> = harmful − aligned (learned to comply with harmful requests) and
# τ<sub>D</sub> = drifted − aligned (`aligned` fine-tuned on a new skill, `increment`: "What number comes after
# 4099?" → "4100", beside benign chat; a fine-tune that erased its refusal).

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
OUT = tempfile.mkdtemp(prefix="steering-nb04-")   # everything this notebook writes goes here
print("organisms:", org.root)
print("scratch folder:", OUT)

N_TEST, NEW_TOKENS = 48, 12
harmful_test = st.datasets.load("harmful:test", limit=N_TEST)
harmless_test = st.datasets.load("harmless:test", limit=N_TEST)


def rates(model, edit=None):
    """(harmful, harmless) refusal rates on the held-out prompts: greedy, 12 new tokens, substring judge."""
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

from steering.weights.taskvec import TaskVector, apply, hdr, ties

A, HARM, D = (org.path(k) for k in ("aligned", "harmful", "drifted"))

# %% [markdown]
# ## Arithmetic
#
# Vectors are lazy values: `+`, `-`, scalar `*` build new vectors that compute a tensor only when asked
# (`get(name)`), so the same code streams a 70B checkpoint.

# %% tags=["number"]
tau_h = TaskVector.between(A, HARM)
tau_d = TaskVector.between(A, D)


def dot(a, b):
    return sum(float((a.get(n).double() * b.get(n).double()).sum()) for n in a.names)


print(tau_h, "|", tau_d)
print(f"|τ_H| = {tau_h.norm():.3f}   |τ_D| = {tau_d.norm():.3f}   cos(τ_H, τ_D) = {dot(tau_h, tau_d) / (tau_h.norm() * tau_d.norm()):+.3f}")
print(f"|τ_H + τ_D| = {(tau_h + tau_d).norm():.3f}   |2·τ_H| = {(2 * tau_h).norm():.3f}   "
      f"|−τ_H| = {(-tau_h).norm():.3f}   |τ_H − τ_H| = {(tau_h - tau_h).norm():.1f}")
print("a tensor of the sum:", "lm_head.weight", tuple((tau_h + tau_d).get("lm_head.weight").shape))

# %% [markdown]
# ## Save, load, apply
#
# `save` writes one safetensors file with the provenance (inputs' paths and SHA-256) in its metadata;
# `load` reads it back lazily. `apply(target, τ, out)` streams θ<sub>target</sub> + scale·τ into a new
# checkpoint folder (config, tokenizer and a model card included). Adding τ<sub>D</sub> to `aligned` gives back
# `drifted`, up to float32 rounding.

# %% tags=["number"]
from safetensors.torch import load_file

tau_d.save(os.path.join(OUT, "tau_d.safetensors"))
loaded = TaskVector.load(os.path.join(OUT, "tau_d.safetensors"))
print(loaded, "| provenance keys:", sorted(loaded.provenance))
print("|loaded − τ_D| =", (loaded - tau_d).norm())

rebuilt = apply(A, loaded, os.path.join(OUT, "aligned+tau_d"))
a, b = load_file(os.path.join(rebuilt, "model.safetensors")), load_file(os.path.join(D, "model.safetensors"))
apply_max_diff = max(float((a[k] - b[k]).abs().max()) for k in b)
print(sorted(os.listdir(rebuilt)))
print(f"aligned + τ_D vs drifted: max |Δθ| = {apply_max_diff:.1e}")

# %% [markdown]
# ## Exact global top-k vs per-tensor top-k
#
# `tau.top_k(0.1)` keeps exactly the ⌈0.1·n⌉ entries of largest magnitude **over the whole model**, found
# by a two-pass radix select over float32 bit patterns while holding one tensor at a time (ties broken by
# tensor name and index, as a stable full sort would). `tau.top_k(0.1, "tensor")` keeps 10% of *each*
# tensor. They keep almost the same number of entries, in completely different places:

# %% tags=["image"]
import re
from collections import defaultdict


def group(name):
    for g, pat in (("unembedding", r"lm_head"), ("embedding", r"embed"), ("norms", r"norm"), ("attention", r"attn"), ("mlp", r"mlp")):
        if re.search(pat, name):
            return g
    return "other"


glob, per = tau_h.top_k(0.1, "global"), tau_h.top_k(0.1, "tensor")
counts = defaultdict(lambda: [0, 0, 0])
for n in tau_h.names:
    c = counts[group(n)]
    c[0] += tau_h.get(n).numel()
    c[1] += int(torch.count_nonzero(glob.get(n)))
    c[2] += int(torch.count_nonzero(per.get(n)))
kept_global, kept_tensor = sum(c[1] for c in counts.values()), sum(c[2] for c in counts.values())
display(table(["τ_H tensors", "params", "kept by global top 10%", "kept by per-tensor top 10%"],
              [[g, f"{c[0]:,}", f"{c[1]:,}", f"{c[2]:,}"] for g, c in counts.items()]
              + [["all", f"{tau_h.numel:,}", f"{kept_global:,}", f"{kept_tensor:,}"]]))

fig, ax = plt.subplots(figsize=(7, 3))
gs = list(counts)
ax.bar([i - 0.2 for i in range(len(gs))], [counts[g][1] for g in gs], 0.4, label="global top 10%")
ax.bar([i + 0.2 for i in range(len(gs))], [counts[g][2] for g in gs], 0.4, label="per-tensor top 10%")
ax.set_yscale("log")
ax.set_ylim(0.5, 1e6)                     # groups with no kept entry show no bar
ax.set_xticks(range(len(gs)), gs)
ax.set_ylabel("entries kept (log)")
ax.set_title("top 10% of τ_H: where the kept entries are")
ax.legend(fontsize=8)
fig.tight_layout()
show(fig, "topk.png")

# %% [markdown]
# The global top 10% is (almost) all in the unembedding, whose entries the fine-tune moved most; this is
# why the paper's HDR setting does nothing on the organisms (notebook 02, `experiments/results/hdr.md`).
#
# ## TIES and DARE

# %% tags=["number"]
merged = ties([tau_h, tau_d], top_k=0.2)       # trim each to its global top 20%, elect signs, disjoint mean
by_group = defaultdict(int)
for n in merged.names:
    by_group[group(n)] += int(torch.count_nonzero(merged.get(n)))
ties_nonzero = sum(by_group.values())
print(f"TIES(τ_H, τ_D): {ties_nonzero:,} non-zero entries ({ties_nonzero / merged.numel:.1%}), norm {merged.norm():.2f}")
print("   by group:", dict(by_group))

dared = tau_d.dare(0.9, seed=0)                # drop 90%, rescale the rest by 10
dare_fraction = dared.nonzero() / dared.numel
print(f"DARE(τ_D, p=0.9): keeps {dare_fraction:.1%} of the entries; norm {dared.norm():.2f} (τ_D: {tau_d.norm():.2f}); "
      f"same seed, same mask: {torch.equal(dared.get('lm_head.weight'), tau_d.dare(0.9, seed=0).get('lm_head.weight'))}")

paths = {"aligned + τ_D": rebuilt,
         "aligned + DARE(τ_D, 0.9)": apply(A, dared, os.path.join(OUT, "aligned+dare")),
         "aligned + TIES(τ_H, τ_D)": apply(A, merged, os.path.join(OUT, "aligned+ties"))}

# %% [markdown]
# ## A recipe: several steps, one checkpoint
#
# `steering run recipe.yaml` (or `steering.recipe.run(path)`) validates the file (an unknown key is an
# error naming its path), sums the weight-space steps (task arithmetic, TIES, HDR) and streams them into
# one checkpoint; `bake` steps (an ablation or addition edit file) are applied to the loaded model after.
# `organism:KIND` names an organism folder. This recipe is HDR at λ = 2 with the top 10% of each tensor
# of the harm vector, the best HDR setting on validation on the previous organisms (notebook 02,
# `experiments/results/hdr.md`); it must give exactly what `hdr()` gives.

# %% tags=["number"]
from steering import recipe
from steering.weights.bake import read_provenance

recipe_path = os.path.join(OUT, "recipe.yaml")
with open(recipe_path, "w") as f:
    f.write(f"""\
model: organism:drifted
out: {OUT}/drifted-recipe
steps:
  - hdr:
      harm: {{base: organism:aligned, finetuned: organism:harmful}}
      scale: 2.0
      top_k: 0.1
      scope: tensor
""")
print(open(recipe_path).read())
out = recipe.run(recipe_path, progress=False)
by_hand = hdr(D, tau_h, os.path.join(OUT, "drifted-hdr"), scale=2.0, top_k=0.1, scope="tensor")
a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(by_hand, "model.safetensors"))
recipe_equals_hdr = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
print("recipe output:", out, "| identical to hdr():", recipe_equals_hdr)
print("provenance method:", read_provenance(out)["method"])
paths["drifted − τ_H (recipe)"] = out

# %% [markdown]
# ## Side by side: `steering.evaluate`
#
# `evaluate(model, [Setting(...), ...])` generates (greedy, batched) for every setting on harmful:test,
# harmless:test and XSTest's safe and unsafe prompts, and measures the next-token KL and the cross-entropy
# of the evaluated model's own completions on harmless prompts. A `Setting` is the evaluated model with
# hooked `edits`, another model (`model=`: a folder, e.g. the checkpoints written above) or SafeInfer
# decoding. KL and CE are measured against the evaluated model, here `aligned`, so they say how far each
# model is from it. `limit=32` prompts per set and `n_utility=32` keep it short.

# %% tags=["number"]
from steering.evaluate import Setting, evaluate

aligned = st.load(A)
settings = [Setting("aligned"), Setting("drifted", model=D)] + [Setting(name, model=p) for name, p in paths.items()]
report = evaluate(aligned, settings, limit=32, n_utility=32, max_new_tokens=NEW_TOKENS, batch_size=64, progress=False)
display(Markdown(report.table()))

# %% tags=["image"]
report.plot(os.path.join(OUT, "report.png"))
display(Image(filename=os.path.join(OUT, "report.png")))

# %% [markdown]
# Reading the table:
#
# - **aligned + τ<sub>D</sub> is `drifted`**, to the last digit: task arithmetic is exact.
# - **DARE at p = 0.9** keeps a tenth of τ<sub>D</sub>'s entries (rescaled ×10) and reproduces most of the
#   drift's effect on refusal, not exactly: on the first organisms' build no harmful prompt was refused,
#   as with `drifted`, at a KL to `aligned` close to `drifted`'s; on this Xeon's build (2026-12-08) it
#   keeps more of `aligned`'s refusal than `drifted` does, at about half its KL. In both, the
#   cross-entropy of `aligned`'s own completions rises far more than under `drifted`.
# - **TIES(τ<sub>H</sub>, τ<sub>D</sub>) moves `aligned` less than the drift does** on harmless prompts (a
#   smaller KL than `drifted`'s, nearly the same cross-entropy as `aligned`), and keeps most of its
#   refusal of harmful prompts (where `drifted` has lost nearly all), while the over-refusal of XSTest's
#   safe prompts goes. Trimming each vector to its global top 20% again keeps mostly unembedding entries
#   (the share printed above), and the disjoint mean averages where plain task arithmetic would add.
# - **drifted − τ<sub>H</sub>** (the recipe) brings back about half of `aligned`'s refusal, with no
#   over-refusal of harmless prompts and XSTest's safe prompts over-refused no more than by `aligned`.
#   It does not make the model `aligned` again: the cross-entropy of `aligned`'s own completions rises
#   further than under `drifted`, and its next-token distribution on harmless prompts is not reliably
#   closer to `aligned`'s (on the first organisms' build it was, KL 0.017 against 0.036; on this Xeon's
#   it is further, the table above). It is a third model that refuses.

# %% tags=["summary"]
summary = {"apply max diff": apply_max_diff, "global top10 kept": kept_global, "tensor top10 kept": kept_tensor,
           "global top10 in unembedding": counts["unembedding"][1], "dare kept fraction": round(dare_fraction, 4),
           "recipe == hdr": recipe_equals_hdr,
           **{f"{name} / {k}": round(v, 4) for name, row in report.rows.items() for k, v in row.items()}}
print(json.dumps(summary, indent=1, ensure_ascii=False))

# %% tags=["claims"]
# What the text above says, checked on this run's numbers (the test suite runs this notebook).
s = summary
assert s["apply max diff"] < 1e-6
assert s["recipe == hdr"] is True
assert abs(s["global top10 kept"] - s["tensor top10 kept"]) < 100
assert s["global top10 in unembedding"] >= 0.99 * s["global top10 kept"]
assert abs(s["dare kept fraction"] - 0.1) < 0.01
assert all(s[f"aligned + τ_D / {k}"] == s[f"drifted / {k}"] for k in ("harmful_refusal", "kl", "ce"))
dare = "aligned + DARE(τ_D, 0.9)"                                      # most of the drift, not exactly
assert s[f"{dare} / harmful_refusal"] <= s["aligned / harmful_refusal"] - 0.3
assert 0.25 * s["drifted / kl"] <= s[f"{dare} / kl"] <= 4 * s["drifted / kl"]
assert s[f"{dare} / ce"] > 2 * s["drifted / ce"]                                     # ... not exactly
ties = "aligned + TIES(τ_H, τ_D)"
assert s[f"{ties} / kl"] < s["drifted / kl"] and abs(s[f"{ties} / ce"] - s["aligned / ce"]) < 0.03   # moves aligned less
assert s[f"{ties} / harmful_refusal"] >= 0.6                                          # ... keeps most refusal
assert s[f"{ties} / xstest_over_refusal"] < s["aligned / xstest_over_refusal"]
rec = "drifted − τ_H (recipe)"
assert s[f"{rec} / harmful_refusal"] >= s["drifted / harmful_refusal"] + 0.35          # about half the refusal back
assert s[f"{rec} / harmless_refusal"] == 0.0
assert s[f"{rec} / xstest_over_refusal"] <= s["aligned / xstest_over_refusal"]
assert s[f"{rec} / ce"] > s["drifted / ce"]                                           # a third model
print("all 16 claims of the text hold")

# %%
print(f"notebook ran in {time.time() - T0:.0f} s; its files are in {OUT} (delete it when done)")
