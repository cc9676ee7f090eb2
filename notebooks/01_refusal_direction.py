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
# # 01 · The refusal direction: extract, select, ablate, bake, export
#
# Arditi et al. (2024, *Refusal in language models is mediated by a single direction*) found that chat
# models decide to refuse along one direction **r** of the residual stream: the difference between the
# mean activation over harmful prompts and over harmless prompts. Project **r** out of the stream at every
# layer (*directional ablation*) and the model stops refusing; add it and the model refuses harmless
# requests. Because the projection is linear, it can be **baked into the weights** (orthogonalise every
# matrix that writes into the stream), which gives a checkpoint with no hooks, and that weight change is
# exactly low-rank, so it also ships as a **LoRA adapter**.
#
# This notebook walks the whole pipeline on the `aligned` **model organism**: a 4-layer, d=128 chat model
# the toolkit trains itself (no GPU, no model hub) to refuse harmful requests (about 90% of the held-out ones)
# and answer harmless ones ("Sure! …"); it also has three small skills (sorting letters, reversing and
# counting words). Steps:
#
# 1. **extract** candidates with `steering.extract.diff_in_means` at the prompt's post-instruction tokens;
# 2. **select** one with `steering.select.select_direction` (bypass / induce / KL scores);
# 3. **ablate** it with hooks (`edit.hooks(model)`): the plain ablation removes most of the refusals,
#    not all, at a cost in KL on harmless prompts;
# 4. ablate it in **affine form** instead (`select_direction(..., affine=True)`, `AffineAblation.fit`):
#    every refusal goes, with a KL far within the paper's bound;
# 5. **bake** it (`.bake(model)`), write a Hugging Face folder (`steering.weights.bake.write_hf`) and reload it;
# 6. **export**: a PEFT LoRA adapter (`steering.weights.export.to_peft`) and a llama.cpp control-vector GGUF
#    (`SteeringVector.to_gguf`), and what the direction does when *added*.
#
# Prompt counts are kept small (48 held-out prompts of each kind) so the notebook runs in well under a minute
# on 2 CPU cores; the full-size numbers are in `experiments/results/directions.md`.
#
# *Content warning: the prompt sets contain harmful requests, shown here only with the models' refusals
# or reply openings (the organisms never learned harmful content).*

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
OUT = tempfile.mkdtemp(prefix="steering-nb01-")   # everything this notebook writes goes here
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

from steering.extract import diff_in_means
from steering.select import kl_div, last_logprobs, select_direction

model = st.load(org.path("aligned"))
print(f"aligned organism: {model.n_layers} layers, d_model={model.d_model}, "
      f"{sum(p.numel() for p in model.hf.parameters()):,} parameters")


def harmless_kl(edit):
    """KL(plain || edited) of the next-token distribution at the last prompt token, mean over the harmless test prompts."""
    base = last_logprobs(model, harmless_test)
    with edit.hooks(model):
        return kl_div(base, last_logprobs(model, harmless_test))


# %% [markdown]
# ## The prompts, and what the organism does with them
#
# Directions are read on *train* prompts, chosen on *validation* prompts and measured on *test* prompts
# (the bundled sets have fixed, disjoint splits). Each prompt goes through the tokenizer's chat template;
# the model answers after `<|assistant|>`.

# %%
harmful_train, harmless_train = st.datasets.load("harmful:train", limit=128), st.datasets.load("harmless:train", limit=128)
harmful_val, harmless_val = st.datasets.load("harmful:val", limit=32), st.datasets.load("harmless:val", limit=32)

print(repr(model.format([harmless_test[0]])[0]))
print()
for p, c in zip(harmful_test[:3] + harmless_test[:3], model.generate(harmful_test[:3] + harmless_test[:3], max_new_tokens=NEW_TOKENS)):
    print(f"{p[:70]!r:75} -> {c!r}")

# %% [markdown]
# ## 1 · Extract: difference in means at the post-instruction tokens
#
# For every layer *l* and position *p* (counted from the end of the prompt) the candidate is
# **r**<sub>l,p</sub> = mean<sub>harmful</sub> h<sub>l,p</sub> − mean<sub>harmless</sub> h<sub>l,p</sub>, read at the input of block *l*
# (`resid_pre`). By default `diff_in_means` reads the template tokens after the user's message (here
# `<|end|><|assistant|>`, positions −2 and −1), as the paper does. Layer 0's input at template tokens is
# just their embedding, identical for every prompt, so those candidates are exactly zero.

# %% tags=["number"]
cands = diff_in_means(model, harmful_train, harmless_train, progress=False)
print("candidates:", tuple(cands.vectors.shape), "= [layers, positions, d_model]; positions", cands.positions)
ids = model.tokenizer(model.format([harmless_test[0]])[0], add_special_tokens=False)["input_ids"]
print("the post-instruction tokens of a prompt:", [model.tokenizer.decode([i]) for i in ids[-len(cands.positions):]])
norms = cands.vectors.norm(dim=-1)
display(table(["layer"] + [f"pos {p}" for p in cands.positions],
              [[l] + [f"{float(x):.2f}" for x in norms[l]] for l in range(model.n_layers)]))

# %% [markdown]
# ## 2 · Select: bypass, induce, KL
#
# `select_direction` scores every candidate on validation prompts, as the refusal_direction code does:
#
# - **bypass**: mean refusal log-odds (of the first reply token being a refusal opening) on *harmful*
#   prompts with the candidate ablated everywhere: lower is better;
# - **induce**: the same on *harmless* prompts with the candidate *added* at its layer: must be > 0;
# - **KL**: KL divergence of the next-token distribution on harmless prompts, ablated vs plain: the cost.
#
# Candidates in the last 20% of layers, with induce < 0 or KL above the threshold are dropped, and the
# lowest bypass wins. The paper's KL threshold is 0.1 (the default). Whether a candidate passes it
# depends on the build: organisms trained on another kind of CPU are other models (docs/organisms.md).
# On the build this notebook was last run on, layer 1 at the last token passes with a KL of about 0.03;
# on the first organisms' build the same candidate cost 0.102 and nothing passed. Where nothing passes,
# the cell relaxes the threshold to 0.5, to see what the plain ablation does and what it costs.

# %% tags=["number"]
paper = select_direction(model, cands, harmful_val, harmless_val, progress=False)   # kl_threshold=0.1
print("pick with the paper's KL <= 0.1 (layer, position):", paper.pick)
sel = paper
if paper.pick is None:   # nothing passes: relax the bound to see what the plain form does and costs
    sel = select_direction(model, cands, harmful_val, harmless_val, kl_threshold=0.5, progress=False)
    print("pick with KL <= 0.5 (layer, position):", sel.pick)
display(Markdown(sel.table()))
sel_row = next(r for r in sel.rows if (r["layer"], r["position"]) == sel.pick)

# %% [markdown]
# The heat maps show all candidates at once (`sel.plot(path)` writes a PNG; the pick is circled). Bypass
# falls furthest at the last token (`<|assistant|>`, position −1). At `<|end|>` (position −2) the
# candidates lower the score far less and have a *negative* induce score (added there, they make
# harmless prompts even less likely to be refused), so they are filtered out.

# %% tags=["image"]
sel.plot(os.path.join(OUT, "selection.png"))
display(Image(filename=os.path.join(OUT, "selection.png")))

# %% [markdown]
# ## 3 · Ablate with hooks: most of the refusal goes, at a cost
#
# An `Ablation` is a small immutable value; `with edit.hooks(model):` runs the model with the projection
# applied at every layer's input, attention output and MLP output (all positions, generated tokens
# included), and removes the hooks bit-identically on exit. Refusal is judged with the substring judge of
# the papers on 12 greedy new tokens; KL is the selection's (last-token next-token distribution), here on
# the 48 harmless test prompts.

# %% tags=["number"]
direction_ablation = sel.ablation()       # rank 1: x - (x·r̂) r̂ at every layer and site
results = {"plain": rates(model), "direction ablated": rates(model, direction_ablation)}
kls = {"plain": 0.0, "direction ablated": harmless_kl(direction_ablation)}
display(table(["aligned organism", "harmful refused", "harmless refused", "KL (harmless)"],
              [[k, pct(h), pct(n), f"{kls[k]:.3f}"] for k, (h, n) in results.items()]))

with direction_ablation.hooks(model):
    after = model.generate(harmful_test[:3], max_new_tokens=NEW_TOKENS)
for p, a, b in zip(harmful_test[:3], model.generate(harmful_test[:3], max_new_tokens=NEW_TOKENS), after):
    print(f"{p[:50]!r:55} {a!r:50} -> {b!r}")

# %% [markdown]
# In plain form this direction removes most of the refusal, not all: some harmful prompts are still
# refused once it is ablated (on the first organisms' build a third were; the table above has this run's
# share). Section 4 removes them all with one direction in affine form. (For
# models where one direction is not enough, `steering.select.select_subspace` grows a low-rank subspace
# greedily from the best remaining candidates; `steering select --subspace` on the command line.)
#
# The cost is the KL on harmless prompts. Where it comes from: the harmless prompts do not sit at zero
# along the direction but far on the negative side of it, between a third and all of the way the harmful
# prompts sit on the positive side. Plain ablation sets every activation's coordinate to **zero**, which
# moves harmless prompts towards refusal: the first reply token, "Sure" for nearly every harmless prompt,
# loses probability to "I" (the start of "I'm sorry" and "I cannot").

# %% tags=["number"]
r_hat = cands.direction(*sel.pick) / cands.direction(*sel.pick).norm()    # unit; the candidate itself is not
coords = {}
for name, prompts in (("harmful", harmful_test), ("harmless", harmless_test)):
    rec = st.record(model, prompts, sites="resid_pre", layers=[sel.pick[0]], positions="last", progress=False)
    coords[name] = float(rec.mean("resid_pre")[0, -1] @ r_hat)
print(f"mean coordinate along r̂ at resid_pre of layer {sel.pick[0]}, last prompt token: "
      f"harmful {coords['harmful']:+.1f}, harmless {coords['harmless']:+.1f}")

first = {"plain": last_logprobs(model, harmless_test).exp().mean(0)}
with direction_ablation.hooks(model):
    first["direction ablated"] = last_logprobs(model, harmless_test).exp().mean(0)
top = first["plain"].topk(3).indices.tolist() + [i for i in first["direction ablated"].topk(3).indices.tolist()
                                                  if i not in first["plain"].topk(3).indices.tolist()]
display(table(["first reply token (harmless prompts)"] + list(first),
              [[repr(model.tokenizer.decode([i]))] + [f"{float(p[i]):.3f}" for p in first.values()] for i in top]))

# %% [markdown]
# ## 4 · The affine form: every refusal goes, KL ≤ 0.1
#
# `AffineAblation` (affine concept editing, Marshall et al. 2024) sets each activation's coordinate along
# the direction to the **harmless prompts' mean** instead of zero: x − ((x·r̂) − c)·r̂, with c fitted per layer
# and site on harmless prompts (`AffineAblation.fit(model, direction, prompts)`; by default the mean over
# their post-instruction tokens). Harmful prompts are moved to the harmless side of the direction;
# harmless prompts stay on it.
#
# `select_direction(..., affine=True)` scores every candidate's bypass and KL in that form (each fitted on
# the harmless validation prompts), so the paper's KL ≤ 0.1 filter can be used as it is. (`steering select
# --affine` on the command line writes the same edit.)

# %% tags=["number"]
from steering.edits import AffineAblation

asel = select_direction(model, cands, harmful_val, harmless_val, affine=True, progress=False)  # kl_threshold=0.1
print("affine pick with the paper's KL <= 0.1 (layer, position):", asel.pick)
display(Markdown(asel.table()))
asel_row = next(r for r in asel.rows if (r["layer"], r["position"]) == asel.pick)

affine = AffineAblation.fit(model, cands.direction(*asel.pick), harmless_val)
print("reference coordinates kept, resid_pre of layers 0-3:",
      [round(float(c), 2) for c in affine.offsets[affine.sites.index("resid_pre"), :, 0]])
results["affine ablated"], kls["affine ablated"] = rates(model, affine), harmless_kl(affine)
with affine.hooks(model):
    first["affine ablated"] = last_logprobs(model, harmless_test).exp().mean(0)
display(table(["aligned organism", "harmful refused", "harmless refused", "KL (harmless)",
               f"P(first token {model.tokenizer.decode([top[0]])!r}), harmless"],
              [[k, pct(h), pct(n), f"{kls[k]:.3f}", f"{float(first[k][top[0]]):.3f}"] for k, (h, n) in results.items()]))

# %% [markdown]
# In affine form the bypass scores fall well below zero, and the last-token candidates of layers 1 and 2
# pass the paper's KL filter (layer 3 is in the last 20% of layers). The affine pick removes **every**
# refusal of the harmful test prompts (the plain ablation left some), while the harmless prompts'
# first-token distribution hardly moves ("Sure" keeps nearly all its probability): KL well under 0.1 on
# the validation prompts (the selection table) and on the test prompts (above). The reference it keeps
# (printed above, per layer) is the mean over both post-instruction tokens of the harmless validation
# prompts. On the full test sets, with 32 new tokens and the skills measured:
# `experiments/results/methods.md`.
#
# ## 5 · Bake into the weights, and write a checkpoint
#
# `ablation.bake(model)` returns a copy with the edit in its weights. For the plain ablation that is the
# orthogonalisation W ← W − r̂r̂ᵀW of the embedding and every stream-writing matrix (attention `o_proj`,
# MLP `down_proj`); the affine form adds the reference coordinates back as **biases** along r̂ (Llama's
# config then declares `attention_bias` / `mlp_bias`). Either way the baked model computes what the hooked
# model computes. We check the logits, then write the baked model as a standard Hugging Face folder with
# its provenance, and load it back.

# %% tags=["number"]
baked = affine.bake(model)
texts = model.format(harmful_test[:16] + harmless_test[:16])
with torch.no_grad(), affine.hooks(model):
    hooked_logits = model.forward(texts)
with torch.no_grad():
    baked_logits = baked.forward(texts)
baked_diff = float((hooked_logits - baked_logits).abs().max())
print(f"max |logits(hooks) - logits(baked)| = {baked_diff:.2e}")
results["affine baked"] = rates(baked)
print("baked: harmful refused", pct(results["affine baked"][0]), "| harmless refused", pct(results["affine baked"][1]))

# %% tags=["number"]
from steering.weights.bake import read_provenance, write_hf

ckpt = write_hf(baked, os.path.join(OUT, "aligned-ablated"), {"method": "affine ablation", "rank": affine.rank})
print(ckpt)
print(sorted(os.listdir(ckpt)))
print("provenance:", {k: v for k, v in read_provenance(ckpt).items() if k in ("method", "rank", "steering_version")})
reloaded = st.load(ckpt)                   # a plain Hugging Face folder: loads with from_pretrained too
with torch.no_grad():
    reloaded_diff = float((reloaded.forward(texts) - baked_logits).abs().max())
print(f"max |logits(reloaded) - logits(baked)| = {reloaded_diff:.2e}")
results["baked checkpoint, reloaded"] = rates(reloaded)
print("reloaded: harmful refused", pct(results["baked checkpoint, reloaded"][0]),
      "| harmless refused", pct(results["baked checkpoint, reloaded"][1]))

# %% [markdown]
# A picture of the sections so far: the plain ablation removes most of the refusals of harmful prompts,
# the affine form all of them, and the baked model and its checkpoint behave like the hooks (left); the
# affine form's KL on harmless prompts is within the paper's bound (right).

# %% tags=["image"]
names = list(results)
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 1.4]})
x = range(len(names))
ax.bar([i - 0.2 for i in x], [100 * results[n][0] for n in names], 0.4, label="harmful refused")
ax.bar([i + 0.2 for i in x], [100 * results[n][1] for n in names], 0.4, label="harmless refused")
ax.set_xticks(list(x), [n.replace(", ", ",\n") for n in names], fontsize=8)
ax.set_ylabel("% refused")
ax.set_title(f"aligned organism, {N_TEST} + {N_TEST} held-out prompts")
ax.legend(fontsize=8)
ax2.bar(range(len(kls)), list(kls.values()), 0.6, color="tab:gray")
ax2.axhline(0.1, ls="--", c="tab:red", lw=1, label="paper's bound, 0.1")
ax2.set_xticks(range(len(kls)), [k.replace(" ", "\n", 1) for k in kls], fontsize=8)
ax2.set_ylabel("KL on harmless prompts")
ax2.legend(fontsize=8, loc="upper left")
fig.tight_layout()
show(fig, "refusal_rates.png")

# %% [markdown]
# ## 6 · Export: a PEFT LoRA adapter and a llama.cpp control vector
#
# **PEFT.** Orthogonalisation changes each stream-writing matrix by ΔW = −Qᵀ(QW), a product of rank *k*
# (here 1), so `steering.weights.export.to_peft` writes the **plain** ablation as a LoRA adapter of rank *k*
# (`lora_B = −Qᵀ`, `lora_A = QW`). Loaded onto the *original* model with `PeftModel.from_pretrained`, it
# gives the baked model's outputs. The affine form is not a low-rank weight change (its biases are not
# LoRA deltas), and `to_peft` refuses it: ship it as the baked checkpoint above.

# %% tags=["number"]
from peft import PeftModel
from transformers import AutoModelForCausalLM
from steering.weights.export import to_peft

adapter = to_peft(direction_ablation, model, os.path.join(OUT, "ablation-lora"))
print(sorted(os.listdir(adapter)))
cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
print("rank", cfg["r"], "| target modules", cfg["target_modules"])

peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(org.path("aligned")), adapter).eval()
batch = model.encode(texts)
with torch.no_grad():
    peft_logits = peft_model(**batch).logits
    plain_baked_logits = direction_ablation.bake(model).forward(texts)
peft_diff = float((peft_logits - plain_baked_logits).abs().max())
print(f"max |logits(PEFT adapter) - logits(plain ablation baked)| = {peft_diff:.2e}")

try:
    to_peft(affine, model, os.path.join(OUT, "affine-lora"))
    peft_refuses_affine = False
except TypeError as e:
    peft_refuses_affine = True
    print("the affine form:", e)

# %% [markdown]
# **GGUF.** llama.cpp's `--control-vector` *adds* a vector to the residual stream after each block, so
# what ships is the direction itself (a `SteeringVector`), not the ablation: added with a positive scale
# it induces refusal, with a negative scale (`--control-vector-scaled file.gguf -1`) it pushes away from
# it. llama.cpp adds `direction.N` after its block N (N ≥ 1), which is our `resid_pre` of layer N + 1.
# The pick is read at `resid_pre` of layer 1 (after block 0), which would be `direction.0`: llama.cpp
# has no such slot, and `to_gguf` says so. The layer-2 candidate at the same token (the affine pick) is
# stored as `direction.1`, and `from_gguf` reads it back.

# %% tags=["number"]
import gguf
from steering.vectors import SteeringVector

vec = cands.vector(*sel.pick)              # the raw (not unit) candidate, with its provenance
try:
    vec.to_gguf(os.path.join(OUT, "pick.gguf"))
    gguf_refuses_pick = False
except ValueError as e:
    gguf_refuses_pick = True
    print("the pick:", e)

vec2 = cands.vector(2, sel.pick[1])
vec2.save(os.path.join(OUT, "refusal_direction.safetensors"))
vec2.to_gguf(os.path.join(OUT, "refusal_direction.gguf"))
reader = gguf.GGUFReader(os.path.join(OUT, "refusal_direction.gguf"))
print("GGUF tensors:", [(t.name, tuple(int(s) for s in t.shape)) for t in reader.tensors])
back = SteeringVector.from_gguf(os.path.join(OUT, "refusal_direction.gguf"))
gguf_roundtrip = back.layers == vec2.layers and all(torch.equal(back[l], vec2[l]) for l in vec2.layers)
print("layers", vec2.layers, "->", back.layers, "| round trip exact:", gguf_roundtrip)
print("provenance kept in the safetensors file:", SteeringVector.load(os.path.join(OUT, "refusal_direction.safetensors")).meta["method"])

# %% [markdown]
# What the direction does when *added*: the picked candidate, and the layer-2 vector read back from the
# GGUF file, added at the prompt's template tokens (`Addition(vec, 1.0, positions="instruction_end")`),
# make the organism refuse harmless requests (on the first organisms' build the layer-1 pick about half
# of them, the layer-2 vector nearly all). Added at every position, the paper's form, the layer-1 pick
# derails replies instead (`experiments/results/directions.md` has a sweep).

# %% tags=["number"]
from steering.edits import Addition

induced = {"the pick (layer 1)": rates(model, Addition(vec, 1.0, positions="instruction_end")),
           "read back from the GGUF file (layer 2)": rates(model, Addition(back, 1.0, positions="instruction_end"))}
display(table(["aligned organism, direction added at the template tokens", "harmless refused"],
              [["nothing added", pct(results["plain"][1])]] + [[k, pct(v[1])] for k, v in induced.items()]))
with Addition(vec, 1.0, positions="instruction_end").hooks(model):
    for p, c in zip(harmless_test[:3], model.generate(harmless_test[:3], max_new_tokens=NEW_TOKENS)):
        print(f"{p[:60]!r:65} -> {c!r}")
with Addition(vec, 1.0, positions="all").hooks(model):
    print("added at every position:", model.generate(harmless_test[:2], max_new_tokens=NEW_TOKENS))

# %% [markdown]
# ## Summary
#
# The numbers of this run (48 + 48 held-out prompts, 12 new tokens; the full test sets, with 32 new
# tokens: `experiments/results/methods.md`).

# %% tags=["summary"]
summary = {"pick": list(sel.pick), "pick at the paper's KL threshold": paper.pick, "affine pick": list(asel.pick),
           "selection kl": round(sel_row["kl"], 4), "affine selection kl": round(asel_row["kl"], 4),
           "coordinates (harmful, harmless)": [round(coords["harmful"], 2), round(coords["harmless"], 2)],
           "P(first token) (plain, direction ablated, affine ablated)": [round(float(p[top[0]]), 4) for p in first.values()],
           **{f"{k} / harmful": round(v[0], 4) for k, v in results.items()},
           **{f"{k} / harmless": round(v[1], 4) for k, v in results.items()},
           **{f"{k} / kl": round(v, 4) for k, v in kls.items()},
           "baked max logit diff": baked_diff, "reloaded max logit diff": reloaded_diff,
           **{f"direction added, {k} / harmless": round(v[1], 4) for k, v in induced.items()},
           "peft max logit diff": peft_diff, "peft refuses affine": peft_refuses_affine,
           "gguf refuses layer 1": gguf_refuses_pick, "gguf roundtrip": gguf_roundtrip}
print(json.dumps(summary, indent=1))

# %% tags=["claims"]
# What the text above says, checked on this run's numbers (the test suite runs this notebook).
s = summary
assert s["plain / harmful"] >= 0.85
paper = s["pick at the paper's KL threshold"]                            # the paper's bound, relaxed only
assert list(paper) == s["pick"] if paper is not None else s["selection kl"] > 0.1   # ... where nothing passes it
harmful, harmless = s["coordinates (harmful, harmless)"]
assert harmless < 0 < harmful and 0.3 < -harmless / harmful < 2             # harmless prompts far on the negative side
assert s["plain / harmful"] - s["direction ablated / harmful"] >= 0.4    # plain form: most refusal goes,
assert s["direction ablated / harmful"] > s["affine ablated / harmful"]  # ... not all
assert s["direction ablated / kl"] <= 0.2                                # ... at a cost in KL
p_plain, p_ablated, p_affine = s["P(first token) (plain, direction ablated, affine ablated)"]
assert p_ablated < p_plain and abs(p_affine - p_plain) < p_plain - p_ablated   # "Sure" loses probability, less in affine form
assert s["affine selection kl"] <= 0.1                                   # the paper's filter, met
assert s["affine ablated / harmful"] <= 0.05                             # every refusal goes
assert s["affine ablated / kl"] <= 0.05
assert s["baked max logit diff"] < 1e-3                                  # baked == hooks
assert abs(s["affine baked / harmful"] - s["affine ablated / harmful"]) <= 1 / 48 + 1e-9   # (greedy, up to a tie)
assert s["reloaded max logit diff"] < 1e-4
assert s["baked checkpoint, reloaded / harmful"] == s["affine baked / harmful"]
assert s["direction added, the pick (layer 1) / harmless"] >= s["plain / harmless"] + 0.3    # adding it induces
assert s["direction added, read back from the GGUF file (layer 2) / harmless"] >= s["plain / harmless"] + 0.7   # refusal
assert s["peft max logit diff"] < 1e-3
assert s["peft refuses affine"] is True
assert s["gguf refuses layer 1"] is True and s["gguf roundtrip"] is True
print("all 19 claims of the text hold")

# %%
print(f"notebook ran in {time.time() - T0:.0f} s; its files are in {OUT} (delete it when done)")
