"""Build (and run) the tutorial notebooks of ``notebooks/``.

    python notebooks/make_notebooks.py                 # write all four, executed, with outputs
    python notebooks/make_notebooks.py 02 04           # only those whose name starts with 02 / 04
    python notebooks/make_notebooks.py --no-execute    # write them without outputs

Every notebook runs on the model organisms (``steering.organisms.build()``: cached under
``~/.cache/steering``, trained once otherwise), writes only into a ``tempfile.mkdtemp()`` folder and
takes 15-25 s on 2 CPU cores once the organisms are cached. ``tests/test_notebooks.py`` runs fresh
copies of them.

Cells tagged ``summary`` print one JSON object of the notebook's key numbers (the tests read it);
cells tagged ``image`` must show a picture and cells tagged ``number`` a number.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(src: str, *tags: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(src.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def setup(tag: str, extra: str = "") -> nbformat.NotebookNode:
    """The first code cell of every notebook: imports, the organisms, a scratch folder, helpers."""
    return code(f'''
import contextlib, json, os, tempfile, time, warnings
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
OUT = tempfile.mkdtemp(prefix="steering-{tag}-")   # everything this notebook writes goes here
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
    return f"{{100 * x:.1f}}%"


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
    return Markdown("\\n".join(lines))
{extra}''')


def footer() -> nbformat.NotebookNode:
    return code('print(f"notebook ran in {time.time() - T0:.0f} s; its files are in {OUT} (delete it when done)")')


# =====================================================================================================
# 01: the refusal direction
# =====================================================================================================
NB01 = [
    md(r"""
# 01 · The refusal direction: extract, select, ablate, bake, export

Arditi et al. (2024, *Refusal in language models is mediated by a single direction*) found that chat
models decide to refuse along one direction **r** of the residual stream: the difference between the
mean activation over harmful prompts and over harmless prompts. Project **r** out of the stream at every
layer (*directional ablation*) and the model stops refusing; add it and the model refuses harmless
requests. Because the projection is linear, it can be **baked into the weights** (orthogonalise every
matrix that writes into the stream), which gives a checkpoint with no hooks, and that weight change is
exactly low-rank, so it also ships as a **LoRA adapter**.

This notebook walks the whole pipeline on the `aligned` **model organism**: a 4-layer, d=128 chat model
the toolkit trains itself (no GPU, no model hub) to refuse harmful requests (~92% on held-out prompts)
and answer harmless ones ("Sure! …"). Steps:

1. **extract** candidates with `steering.extract.diff_in_means` at the prompt's post-instruction tokens;
2. **select** one with `steering.select.select_direction` (bypass / induce / KL scores);
3. **ablate** it with hooks (`edit.hooks(model)`): one direction removes the refusals, but costs a KL of
   about 0.3 on harmless prompts, three times the paper's bound of 0.1;
4. ablate it in **affine form** instead (`select_direction(..., affine=True)`, `AffineAblation.fit`):
   the same bypass within the paper's KL ≤ 0.1;
5. **bake** it (`.bake(model)`), write a Hugging Face folder (`steering.checkpoint.write_hf`) and reload it;
6. **export**: a PEFT LoRA adapter (`steering.export.to_peft`) and a llama.cpp control-vector GGUF
   (`SteeringVector.to_gguf`), and what the direction does when *added*.

Prompt counts are kept small (48 held-out prompts of each kind) so the notebook runs in well under a minute
on 2 CPU cores; the full-size numbers are in `experiments/results/directions.md`.

*Content warning: the prompt sets contain harmful requests, shown here only with the models' refusals
or reply openings (the organisms never learned harmful content).*
"""),
    setup("nb01", '''
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
'''),
    md(r"""
## The prompts, and what the organism does with them

Directions are read on *train* prompts, chosen on *validation* prompts and measured on *test* prompts
(the bundled sets have fixed, disjoint splits). Each prompt goes through the tokenizer's chat template;
the model answers after `<|assistant|>`.
"""),
    code('''
harmful_train, harmless_train = st.datasets.load("harmful:train", limit=128), st.datasets.load("harmless:train", limit=128)
harmful_val, harmless_val = st.datasets.load("harmful:val", limit=32), st.datasets.load("harmless:val", limit=32)

print(repr(model.format([harmless_test[0]])[0]))
print()
for p, c in zip(harmful_test[:3] + harmless_test[:3], model.generate(harmful_test[:3] + harmless_test[:3], max_new_tokens=NEW_TOKENS)):
    print(f"{p[:70]!r:75} -> {c!r}")
'''),
    md(r"""
## 1 · Extract: difference in means at the post-instruction tokens

For every layer *l* and position *p* (counted from the end of the prompt) the candidate is
**r**<sub>l,p</sub> = mean<sub>harmful</sub> h<sub>l,p</sub> − mean<sub>harmless</sub> h<sub>l,p</sub>, read at the input of block *l*
(`resid_pre`). By default `diff_in_means` reads the template tokens after the user's message (here
`<|end|><|assistant|>`, positions −2 and −1), as the paper does. Layer 0's input at template tokens is
just their embedding, identical for every prompt, so those candidates are exactly zero.
"""),
    code('''
cands = diff_in_means(model, harmful_train, harmless_train, progress=False)
print("candidates:", tuple(cands.vectors.shape), "= [layers, positions, d_model]; positions", cands.positions)
ids = model.tokenizer(model.format([harmless_test[0]])[0], add_special_tokens=False)["input_ids"]
print("the post-instruction tokens of a prompt:", [model.tokenizer.decode([i]) for i in ids[-len(cands.positions):]])
norms = cands.vectors.norm(dim=-1)
display(table(["layer"] + [f"pos {p}" for p in cands.positions],
              [[l] + [f"{float(x):.2f}" for x in norms[l]] for l in range(model.n_layers)]))
''', "number"),
    md(r"""
## 2 · Select: bypass, induce, KL

`select_direction` scores every candidate on validation prompts, as the refusal_direction code does:

- **bypass**: mean refusal log-odds (of the first reply token being a refusal opening) on *harmful*
  prompts with the candidate ablated everywhere: lower is better;
- **induce**: the same on *harmless* prompts with the candidate *added* at its layer: must be > 0;
- **KL**: KL divergence of the next-token distribution on harmless prompts, ablated vs plain: the cost.

Candidates in the last 20% of layers, with induce < 0 or KL above the threshold are dropped, and the
lowest bypass wins. With the paper's KL threshold, 0.1 (the default), **no candidate passes** on the
organism: those that pass the other filters cost about 0.3 or more. So first we select with
`kl_threshold=0.5`, to see what the plain ablation does and what it costs.
"""),
    code('''
paper = select_direction(model, cands, harmful_val, harmless_val, progress=False)   # kl_threshold=0.1
print("pick with the paper's KL <= 0.1:", paper.pick)
sel = select_direction(model, cands, harmful_val, harmless_val, kl_threshold=0.5, progress=False)
print("pick with KL <= 0.5 (layer, position):", sel.pick)
display(Markdown(sel.table()))
sel_row = next(r for r in sel.rows if (r["layer"], r["position"]) == sel.pick)
''', "number"),
    md(r"""
The heat maps show all candidates at once (`sel.plot(path)` writes a PNG; the pick is circled). Bypass
only falls below zero at the last token (`<|assistant|>`, position −1), from layer 1 on. At `<|end|>`
(position −2) the candidates barely lower the score and have a *negative* induce score (added there, they
make harmless prompts even less likely to be refused), so they are filtered out.
"""),
    code('''
sel.plot(os.path.join(OUT, "selection.png"))
display(Image(filename=os.path.join(OUT, "selection.png")))
''', "image"),
    md(r"""
## 3 · Ablate with hooks: refusal goes, at a cost

An `Ablation` is a small immutable value; `with edit.hooks(model):` runs the model with the projection
applied at every layer's input, attention output and MLP output (all positions, generated tokens
included), and removes the hooks bit-identically on exit. Refusal is judged with the substring judge of
the papers on 12 greedy new tokens; KL is the selection's (last-token next-token distribution), here on
the 48 harmless test prompts.
"""),
    code('''
direction_ablation = sel.ablation()       # rank 1: x - (x·r̂) r̂ at every layer and site
results = {"plain": rates(model), "direction ablated": rates(model, direction_ablation)}
kls = {"plain": 0.0, "direction ablated": harmless_kl(direction_ablation)}
display(table(["aligned organism", "harmful refused", "harmless refused", "KL (harmless)"],
              [[k, pct(h), pct(n), f"{kls[k]:.3f}"] for k, (h, n) in results.items()]))

with direction_ablation.hooks(model):
    after = model.generate(harmful_test[:3], max_new_tokens=NEW_TOKENS)
for p, a, b in zip(harmful_test[:3], model.generate(harmful_test[:3], max_new_tokens=NEW_TOKENS), after):
    print(f"{p[:50]!r:55} {a!r:50} -> {b!r}")
''', "number"),
    md(r"""
One direction is enough: ablating it removes every refusal of these harmful prompts, and the
organism's helpful opening ("Sure! …") takes their place. (For models where one direction is not
enough, `steering.select.select_subspace` grows a low-rank subspace greedily from the best remaining
candidates; `steering select --subspace` on the command line.)

The cost is the KL on harmless prompts, about 0.3. Where it comes from: the harmless prompts do not sit
at zero along the direction but far on the negative side of it, about as far as the harmful prompts sit
on the positive side. Plain ablation sets every activation's coordinate to **zero**, which moves harmless
prompts halfway towards refusal: the first reply token, "Sure" for nearly every harmless prompt, loses
probability to "I" (the start of "I'm sorry" and "I cannot").
"""),
    code('''
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
''', "number"),
    md(r"""
## 4 · The affine form: the same bypass, KL ≤ 0.1

`AffineAblation` (affine concept editing, Marshall et al. 2024) sets each activation's coordinate along
the direction to the **harmless prompts' mean** instead of zero: x − ((x·r̂) − c)·r̂, with c fitted per layer
and site on harmless prompts (`AffineAblation.fit(model, direction, prompts)`; by default the mean over
their post-instruction tokens). Harmful prompts are moved to the harmless side of the direction;
harmless prompts stay on it.

`select_direction(..., affine=True)` scores every candidate's bypass and KL in that form (each fitted on
the harmless validation prompts), so the paper's KL ≤ 0.1 filter can be used as it is. (`steering select
--affine` on the command line writes the same edit.)
"""),
    code('''
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
''', "number"),
    md(r"""
The affine selection picks the same candidate (layer 1, the last token). In affine form it removes the
refusals just as the plain ablation does, while the harmless prompts' first-token distribution hardly
moves ("Sure" keeps nearly all its probability): KL under 0.1 on the validation prompts (the selection
table) and on the test prompts (above). The reference it keeps, about −5 from layer 1 on, is the mean
over both post-instruction tokens of the harmless validation prompts.
On the full test sets: 91.7% → 0.0% harmful refusal with KL 0.039, against 0.285 for the plain
ablation (`experiments/results/directions.md`).

## 5 · Bake into the weights, and write a checkpoint

`ablation.bake(model)` returns a copy with the edit in its weights. For the plain ablation that is the
orthogonalisation W ← W − r̂r̂ᵀW of the embedding and every stream-writing matrix (attention `o_proj`,
MLP `down_proj`); the affine form adds the reference coordinates back as **biases** along r̂ (Llama's
config then declares `attention_bias` / `mlp_bias`). Either way the baked model computes what the hooked
model computes. We check the logits, then write the baked model as a standard Hugging Face folder with
its provenance, and load it back.
"""),
    code('''
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
''', "number"),
    code('''
from steering.checkpoint import read_provenance, write_hf

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
''', "number"),
    md(r"""
A picture of the sections so far: both forms of the ablation remove the refusals of harmful prompts, and
the baked model and its checkpoint behave like the hooks (left); only the affine form stays within the
paper's KL bound on harmless prompts (right).
"""),
    code('''
names = list(results)
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 1.4]})
x = range(len(names))
ax.bar([i - 0.2 for i in x], [100 * results[n][0] for n in names], 0.4, label="harmful refused")
ax.bar([i + 0.2 for i in x], [100 * results[n][1] for n in names], 0.4, label="harmless refused")
ax.set_xticks(list(x), [n.replace(", ", ",\\n") for n in names], fontsize=8)
ax.set_ylabel("% refused")
ax.set_title(f"aligned organism, {N_TEST} + {N_TEST} held-out prompts")
ax.legend(fontsize=8)
ax2.bar(range(len(kls)), list(kls.values()), 0.6, color="tab:gray")
ax2.axhline(0.1, ls="--", c="tab:red", lw=1, label="paper's bound, 0.1")
ax2.set_xticks(range(len(kls)), [k.replace(" ", "\\n", 1) for k in kls], fontsize=8)
ax2.set_ylabel("KL on harmless prompts")
ax2.legend(fontsize=8, loc="upper left")
fig.tight_layout()
show(fig, "refusal_rates.png")
''', "image"),
    md(r"""
## 6 · Export: a PEFT LoRA adapter and a llama.cpp control vector

**PEFT.** Orthogonalisation changes each stream-writing matrix by ΔW = −Qᵀ(QW), a product of rank *k*
(here 1), so `steering.export.to_peft` writes the **plain** ablation as a LoRA adapter of rank *k*
(`lora_B = −Qᵀ`, `lora_A = QW`). Loaded onto the *original* model with `PeftModel.from_pretrained`, it
gives the baked model's outputs. The affine form is not a low-rank weight change (its biases are not
LoRA deltas), and `to_peft` refuses it: ship it as the baked checkpoint above.
"""),
    code('''
from peft import PeftModel
from transformers import AutoModelForCausalLM
from steering.export import to_peft

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
''', "number"),
    md(r"""
**GGUF.** llama.cpp's `--control-vector` *adds* a vector to the residual stream after each block, so
what ships is the direction itself (a `SteeringVector`), not the ablation: added with a positive scale
it induces refusal, with a negative scale (`--control-vector-scaled file.gguf -1`) it pushes away from
it. llama.cpp adds `direction.N` after its block N (N ≥ 1), which is our `resid_pre` of layer N + 1.
The pick is read at `resid_pre` of layer 1 (after block 0), which would be `direction.0`: llama.cpp
has no such slot, and `to_gguf` says so. The layer-2 candidate at the same token (also kept by the
selection) is stored as `direction.1`, and `from_gguf` reads it back.
"""),
    code('''
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
''', "number"),
    md(r"""
What the direction does when *added*: the picked candidate, and the layer-2 vector read back from the
GGUF file, added at the prompt's template tokens (`Addition(vec, 1.0, positions="instruction_end")`),
make the organism refuse harmless requests. (Added at every position, the paper's form, they derail it
instead: at scale 1 it repeats the first letter of a refusal, "IIII…", which the judge does not count;
`experiments/results/directions.md` has the sweep.)
"""),
    code('''
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
''', "number"),
    md(r"""
## Summary

The numbers of this run (48 + 48 held-out prompts; the full test sets give
`experiments/results/directions.md`: 91.7% → 0.0% harmful refusal with the direction ablated, at KL
0.285 plainly and 0.039 in affine form).
"""),
    code('''
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
''', "summary"),
    footer(),
]

# =====================================================================================================
# 02: Safety Arithmetic (HDR + ICV)
# =====================================================================================================
NB02 = [
    md(r"""
# 02 · Safety Arithmetic: Harm Direction Removal and the in-context safety vector

Hazra et al. (2024, *Safety Arithmetic*) restore the safety of a fine-tuned model in two training-free
steps:

1. **Harm Direction Removal (HDR)**, in weight space. Fine-tune the base model on harmful data to get a
   *harm vector* τ<sub>H</sub> = θ<sub>harmful</sub> − θ<sub>base</sub>, keep its top-k entries by
   magnitude (k = 10% over the whole model in the paper), and subtract it from the target:
   θ<sub>safe</sub> = θ<sub>target</sub> − λ·topk(τ<sub>H</sub>), with λ = 3.
2. **Safety alignment with an in-context safety vector (ICV)**, in activation space: from
   (unsafe answer, safe answer) demonstrations, read a direction of the residual stream at every layer
   and push the stream away from it at inference, keeping each activation's norm.

The organisms give all three models the recipe needs: `aligned` (the base), `harmful` (`aligned`
fine-tuned to comply with harmful requests: τ<sub>H</sub> = harmful − aligned) and `drifted` (`aligned`
fine-tuned on a *benign* task, which eroded its refusals: the target). This notebook shows where τ<sub>H</sub>
lives, runs HDR at a few (λ, k) settings including the paper's, and tries the ICV, reporting honestly
what moves and what does not. (Full-size sweep: `experiments/results/hdr.md`.)
"""),
    setup("nb02", '''
from steering.taskvec import TaskVector, hdr

A, HARM, D = (org.path(k) for k in ("aligned", "harmful", "drifted"))
models = {k: st.load(org.path(k)) for k in ("aligned", "harmful", "drifted")}
'''),
    md(r"""
## The three organisms

Refusal on 48 held-out harmful and 48 harmless prompts: `drifted` has lost most of `aligned`'s refusals,
`harmful` refuses nothing.
"""),
    code('''
base_rates = {k: rates(m) for k, m in models.items()}
display(table(["organism", "harmful refused", "harmless refused"], [[k, pct(h), pct(n)] for k, (h, n) in base_rates.items()]))
''', "number"),
    md(r"""
## The harm vector τ<sub>H</sub>, and where it lives

`TaskVector.between(base, finetuned)` is lazy: it reads the two checkpoints' headers, and computes one
tensor's difference (in float32) only when asked. By default every floating tensor takes part, as in the
paper: embeddings, norms and the unembedding (`lm_head`) included.

Grouping the tensors shows where the fine-tune moved the weights, and where the paper's **exact global
top 10%** of |τ<sub>H</sub>| lands. For comparison, the benign drift τ<sub>D</sub> = drifted − aligned.
"""),
    code('''
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
    s["params"] += h.numel(); s["h2"] += float(h.pow(2).sum()); s["d2"] += float(d.pow(2).sum())
    s["hd"] += float((h * d).sum()); s["kept"] += int(torch.count_nonzero(kept))
H2, KEPT, P = sum(s["h2"] for s in stats.values()), sum(s["kept"] for s in stats.values()), sum(s["params"] for s in stats.values())
display(table(["tensors", "params", "share of params", "share of ‖τ_H‖²", "RMS of τ_H", "cos(τ_H, τ_D)", "share of the global top 10%"],
              [[g, f"{s['params']:,}", f"{s['params'] / P:.3f}", f"{s['h2'] / H2:.3f}", f"{(s['h2'] / s['params']) ** 0.5:.2e}",
                f"{s['hd'] / (s['h2'] * s['d2']) ** 0.5:+.3f}", f"{s['kept'] / KEPT:.4f}"] for g, s in stats.items()]))
''', "number"),
    code('''
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
''', "image"),
    md(r"""
The fine-tune that taught `harmful` to comply moved the **unembedding** most: its entries change about
three times as much (RMS) as any other tensor's, so it carries ~80% of ‖τ<sub>H</sub>‖² with a quarter of
the parameters, and the global top 10% of |τ<sub>H</sub>| falls **entirely** in it (all but a handful of
entries). Trimming to the global top 10% therefore throws away every change the fine-tune made to
attention and MLPs, which is where "comply vs refuse" is computed.

## HDR at a few (λ, k) settings

`hdr(target, τ_H, out, scale=λ, top_k=k)` streams θ<sub>target</sub> − λ·topk(τ<sub>H</sub>) tensor by tensor into a new
checkpoint (never two models in memory). Settings: the paper's (3, 10%); the same trim per tensor
(`scope="tensor"`: 10% of *each* tensor, which the paper does not do) at λ = 3 and at λ = 2, the best
setting on validation in `experiments/results/hdr.md` (what `steering main` uses); the top half at λ = 1, the best global trim there;
the untrimmed vector at λ = 1 and at the paper's λ = 3.
"""),
    code('''
SETTINGS = [("λ=3, top 10% (paper)", 3.0, 0.1, "global"), ("λ=3, top 10% per tensor", 3.0, 0.1, "tensor"),
            ("λ=2, top 10% per tensor", 2.0, 0.1, "tensor"), ("λ=1, top 50%", 1.0, 0.5, "global"),
            ("λ=1, untrimmed", 1.0, 1.0, "global"), ("λ=3, untrimmed", 3.0, 1.0, "global")]
BEST = "λ=2, top 10% per tensor"         # the best setting on validation (experiments/results/hdr.md)
hdr_models, hdr_rates = {}, {}
for label, scale, k, scope in SETTINGS:
    path = hdr(D, tau_h, os.path.join(OUT, f"drifted-hdr-{scale:g}-{k:g}-{scope}"), scale=scale, top_k=k, scope=scope)
    hdr_models[label] = st.load(path)
    hdr_rates[label] = rates(hdr_models[label])
rows = [["drifted", pct(base_rates["drifted"][0]), pct(base_rates["drifted"][1])]]
rows += [[f"drifted − {l}", pct(h), pct(n)] for l, (h, n) in hdr_rates.items()]
rows += [["aligned (for reference)", pct(base_rates["aligned"][0]), pct(base_rates["aligned"][1])]]
display(table(["model", "harmful refused", "harmless refused"], rows))
''', "number"),
    code('''
labels = ["drifted"] + list(hdr_rates) + ["aligned"]
vals = [base_rates["drifted"]] + list(hdr_rates.values()) + [base_rates["aligned"]]
fig, ax = plt.subplots(figsize=(9, 3.4))
ax.bar([i - 0.2 for i in range(len(labels))], [100 * v[0] for v in vals], 0.4, label="harmful refused")
ax.bar([i + 0.2 for i in range(len(labels))], [100 * v[1] for v in vals], 0.4, label="harmless refused")
ax.set_xticks(range(len(labels)), [l.replace(", ", ",\\n") for l in labels], fontsize=8)
ax.set_ylabel("% refused")
ax.set_title("Harm Direction Removal on the drifted organism")
ax.legend(fontsize=8)
fig.tight_layout()
show(fig, "hdr_rates.png")
''', "image"),
    md(r"""
What moves and what does not:

- **The paper's setting does nothing here**: subtracting 3 × the global top 10% changes (all but a
  handful of entries of) `lm_head` only, and `drifted`'s refusal rate stays where it was.
- **The same 10% taken per tensor works**, because it keeps the largest changes of every attention and
  MLP matrix. At λ = 2 it is the best setting on validation: back to about 80% refusal here with no
  over-refusal (85.0% / 4.3% harmless on the full test sets, `experiments/results/hdr.md`). At the
  paper's λ = 3 it overshoots: less refusal, and over-refusal of harmless prompts.
- **The top half at λ = 1 does as well** on these 48 prompts (one prompt is 2 points; 77.4% against
  78.3% on the full validation set). The whole vector at λ = 1 does less, with some over-refusal.
- HDR does **not** work by undoing the drift: τ<sub>H</sub> and τ<sub>D</sub> are nearly orthogonal (cos +0.09–0.10 in
  attention and MLP, +0.000 in the unembedding, in the table above). Subtracting the harm vector pushes
  the drifted model away from complying, on top of its drift (notebook 04 measures how far the result
  is from `aligned`).
- **λ = 3 untrimmed overshoots**: three times the whole harm vector pushes the model into a loop of
  "help help help …" (below). The substring judge counts 0% refused, but the model is not complying
  either: it is broken.

A global magnitude trim is only as good as the assumption that the largest entries are the important
ones. On the organisms the unembedding is a quarter of all parameters and moves most in any fine-tune;
whether the paper's trim fares better on real models, where it is a far smaller share, is something the
organisms cannot tell.
"""),
    code('''
for label in (BEST, "λ=3, untrimmed"):
    print(label)
    for p, c in zip(harmful_test[:3], hdr_models[label].generate(harmful_test[:3], max_new_tokens=NEW_TOKENS)):
        print(f"   {p[:55]!r:60} -> {c!r}")
'''),
    md(r"""
## The in-context safety vector (ICV)

Safety Arithmetic's second step. Each demonstration is a pair of texts in the paper's format,
`Question: … Answer: Sure, here is …` (unsafe) and `Question: … Answer: I do not answer this question
because it is harmful` (safe), used as they are (no chat template). `icv(model, pairs)` reads every
layer's `resid_post` averaged over the last 4 tokens of each text; the ICV is the first principal
component of the per-pair differences (unsafe − safe) plus their mean, one vector per layer.
`ICVInjection(icv, β)` then replaces each activation x by
normalize(normalize(x) − β·(1 + max(0, cos(x, v)))·v̂)·‖x‖ at every layer: a push away from "unsafe",
norm preserved.
"""),
    code('''
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
''', "number"),
    md(r"""
The ICV (unsafe − safe) points *against* the refusal direction at every layer, as it should, so the
injection (which subtracts it) pushes towards refusal; but only weakly (|cos| below 0.15). Does it
move refusal? Below: generated refusals at a few β, and, as a finer gauge, the mean refusal log-odds
of the first reply token (the score `select_direction` uses). Then the paper's full pipeline: HDR
first (the best setting above, λ = 2, top 10% per tensor), then the ICV read on the HDR'd model.
"""),
    code('''
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
''', "number"),
    md(r"""
- **ICV alone does not restore refusal on `drifted`.** At β ≤ 0.1 it changes one reply of 48, and
  the first-token log-odds rises only a little; that score counts the letter "A", and `drifted`'s
  "A" is mostly the "Answer: …" of its new house style (often garbled into "An information, …"), which
  is no refusal. The generated replies (above) stay in that style. At β = 0.3 the score collapses and
  the replies break down ("A.", "."): refusal falls to 0%. The demonstrations are raw
  `Question:/Answer:` texts, a format the organism never saw (it only knows its chat template), so the
  vector read from them is only weakly aligned with the model's own refusal direction.
- **After HDR, the ICV changes little** (one prompt more refused of the harmful and of the harmless
  ones): the two steps compose as in the paper, but on the organisms the weight-space step does all
  the work.
"""),
    code('''
summary = {"top10_share_unembedding": round(stats["unembedding"]["kept"] / KEPT, 6),
           "drifted / harmful": base_rates["drifted"][0], "drifted / harmless": base_rates["drifted"][1],
           "aligned / harmful": base_rates["aligned"][0],
           **{f"hdr {l} / harmful": v[0] for l, v in hdr_rates.items()},
           **{f"hdr {l} / harmless": v[1] for l, v in hdr_rates.items()},
           **{f"{k} / harmful": v[0] for k, v in icv_rows.items() if "ICV" in k},
           **{f"{k} / harmless": v[1] for k, v in icv_rows.items() if "ICV" in k},
           **{f"{k} / log-odds": round(v[2], 3) for k, v in icv_rows.items()},
           "cos_icv_refusal": [round(c, 3) for c in cos_icv]}
print(json.dumps(summary, indent=1, ensure_ascii=False))
''', "summary"),
    footer(),
]

# =====================================================================================================
# 03: SafeInfer
# =====================================================================================================
NB03 = [
    md(r"""
# 03 · SafeInfer: safety amplification and safety-guided decoding

Banerjee et al. (2024, *SafeInfer*) make a model safer at decoding time, in two halves that work alone or
together:

- **Safety amplification (SA)**: a vector, read from demonstrations of (harmful request → refusal), is
  added to a middle layer's activations at the last position, at every decoding step.
- **Safety-guided decoding (sG-D)**: a second model fine-tuned on unsafe data, p<sub>U</sub>, runs beside
  generation, and every token the unsafe model likes more than the amplified model is penalised:
  log p̃(t) ∝ log p<sub>SA</sub>(t) − γ·max(0, log p<sub>U</sub>(t) − log p<sub>SA</sub>(t)), with γ = 99.

`steering.safeinfer` implements both (`amplifier`, `GuidedDecoding`, a transformers `LogitsProcessor`)
and `safeinfer.generate` puts them together. Here they run on the `drifted` organism (a benign fine-tune
eroded its refusals), with the `harmful` organism as the unsafe model. (Differences from the paper's
code, e.g. its amplification of batch element 0 only, are listed in `steering/safeinfer.py`.)
"""),
    setup("nb03", '''
from steering import safeinfer
from steering.judge import opens_as_refusal
from steering.safeinfer import GuidedDecoding

drifted = st.load(org.path("drifted"))
unsafe = st.load(org.path("harmful"))      # same tokenizer: guided decoding compares token by token
'''),
    md(r"""
## Safety amplification

`safeinfer.amplifier(model, layer=1, scale=2, site="resid_post")` reads its vector *on the model at
hand*: the mean change in the residual stream after layer 1 at the last prompt token when the query
follows three (harmful request → refusal) demonstrations as earlier chat turns, against three (harmless
request → helpful opening) ones. It returns an ordinary `Addition` edit with `positions="last"`: the
prompt's last token, then every new token. Site, layer and scale are the setting `steering main` uses,
chosen on validation prompts by `experiments/safeinfer.py` (`experiments/results/safeinfer.md`); the
paper adds at a middle layer's MLP output (the default site), with scale 1.5. On this organism the MLP
output's vector does nothing at any layer or scale (5.7–10.9% harmful refusal on validation, plain 9.1%).
"""),
    code('''
refuse, helpful = safeinfer.demonstrations(2)
print("a refusal demonstration:", (refuse[0][0][:50] + "…", refuse[0][1]))
print("a contrast demonstration:", (helpful[0][0][:50] + "…", helpful[0][1]))

AMP_SITE, AMP_LAYER, AMP_SCALE = "resid_post", 1, 2.0
amp = safeinfer.amplifier(drifted, layer=AMP_LAYER, scale=AMP_SCALE, site=AMP_SITE)
v = amp.vector[AMP_LAYER]
rec = st.record(drifted, harmful_test, sites=AMP_SITE, layers=[AMP_LAYER], positions="last", keep="raw", progress=False)
typical = torch.stack([r[0, -1] for r in rec.raw[AMP_SITE]]).norm(dim=-1).mean()
print(f"{type(amp).__name__} at {amp.vector.site} of layer {amp.vector.layers}, positions={amp.positions!r}, scale {amp.scale:g}")
print(f"|vector| = {float(v.norm()):.2f}, |scale x vector| = {float(amp.scale * v.norm()):.2f}; "
      f"a typical {AMP_SITE} activation of layer {AMP_LAYER} at the last token has norm {float(typical):.2f}")
''', "number"),
    md(r"""
## Safety-guided decoding

`GuidedDecoding(unsafe, gamma)` is a `LogitsProcessor`: it keeps the unsafe model's own KV cache beside
generation and rewrites the scores at every step, so it drops into any `model.generate` call.
`safeinfer.generate(model, prompts, unsafe=..., amplify=..., gamma=99)` is the same with the amplifier
hooked on top; with γ = 0 it is plain decoding. Both checks below are on 8 prompts.
"""),
    code('''
probe = harmful_test[:8]
direct = drifted.generate(probe, max_new_tokens=NEW_TOKENS, logits_processor=[GuidedDecoding(unsafe, gamma=99)])
via_generate = safeinfer.generate(drifted, probe, unsafe=unsafe, gamma=99, max_new_tokens=NEW_TOKENS)
same_as_processor = direct == via_generate
gamma0_is_plain = safeinfer.generate(drifted, probe, unsafe=unsafe, gamma=0, max_new_tokens=NEW_TOKENS) == \\
    drifted.generate(probe, max_new_tokens=NEW_TOKENS)
print("GuidedDecoding as a logits processor == safeinfer.generate(unsafe=...):", same_as_processor)
print("γ = 0 gives plain decoding:", gamma0_is_plain)
''', "number"),
    md(r"""
## Plain, amplification, guided, both

48 held-out harmful and 48 harmless prompts, greedy, 12 new tokens, substring judge. The last column
reads only each reply's first words (`steering.judge.opens_as_refusal`: "I'm", "I am", "As an", …):
whether the reply *starts* as a refusal, whatever follows.
"""),
    code('''
MODES = {"plain": {}, "amplification": {"amplify": amp}, "guided (γ=99)": {"unsafe": unsafe},
         "both": {"amplify": amp, "unsafe": unsafe}}
si_rates, si_opens, samples = {}, {}, {}
for mode, kw in MODES.items():
    outs = [safeinfer.generate(drifted, ps, gamma=99, max_new_tokens=NEW_TOKENS, batch_size=N_TEST, **kw)
            for ps in (harmful_test, harmless_test)]
    si_rates[mode] = tuple(refusal_rate(o) for o in outs)
    si_opens[mode] = sum(map(opens_as_refusal, outs[0])) / len(outs[0])   # replies that *start* as a refusal
    samples[mode] = outs[0][:3]
display(table(["drifted organism", "harmful refused", "harmless refused", "harmful replies opening as a refusal"],
              [[m, pct(h), pct(n), pct(si_opens[m])] for m, (h, n) in si_rates.items()]))
''', "number"),
    code('''
fig, ax = plt.subplots(figsize=(7, 3.2))
modes = list(si_rates)
ax.bar([i - 0.2 for i in range(len(modes))], [100 * si_rates[m][0] for m in modes], 0.4, label="harmful refused")
ax.bar([i + 0.2 for i in range(len(modes))], [100 * si_rates[m][1] for m in modes], 0.4, label="harmless refused")
ax.set_xticks(range(len(modes)), modes)
ax.set_ylabel("% refused")
ax.set_title("SafeInfer on the drifted organism")
ax.legend(fontsize=8)
fig.tight_layout()
show(fig, "safeinfer_rates.png")
for mode, outs in samples.items():
    print(f"{mode:15}", outs)
''', "image"),
    md(r"""
**Amplification moves refusal; guided decoding lowers it, alone and on top of amplification.** (Full
test sets, `experiments/results/safeinfer.md`: 14.2% plain, 62.9% amplified, 1.7% guided, 6.7% both.)
Yet with both, about as many replies *start* as a refusal as with amplification alone (full test set:
62.9% against 63.7%): guided decoding keeps the decision to refuse and garbles its wording, so the
substring judge no longer finds a phrase.
The penalty only removes probability from tokens the unsafe model prefers; it never adds any to a
refusal. Two things follow on the organisms, both measured below:

1. **At the first token there is nothing to penalise.** `drifted` has not learned `harmful`'s failure
   ("Sure, here is …"): every one of its replies starts with "A", either its new house style ("Answer:
   …", often garbled into "An information, …") or one of its remaining refusals ("As an AI, I am
   unable …"), and `harmful` gives "A" little probability. The guided first token is `drifted`'s own.
   (The refusal-opening tokens include "A", hence `drifted`'s high P(refusal-opening token) below.)
2. **Once a reply has started as a refusal, the unsafe model knows how it continues better than the
   amplified model does.** `harmful` is `aligned` fine-tuned to comply, and it has not forgotten its
   refusals, so after "I'm" or "As an AI, I am" (the refusal openings of the replies above) it is,
   for most prompts, *more* confident in the next refusal token than amplified
   `drifted` is, and γ = 99 pushes exactly that token out; after "I cannot" less often. That is what
   garbles the "both" replies above ("I'm un as it could …"); without amplification the same happens
   to `drifted`'s own refusals ("As an AI" becomes "AnAn information, …" in the guided replies above;
   more of them in `experiments/results/safeinfer.md`). The method assumes that what the unsafe
   model prefers is unsafe; an unsafe model that shares the safe model's refusals breaks that assumption.
"""),
    code('''
from collections import Counter
from steering.select import last_logprobs, refusal_token_ids

lp_d, lp_u = last_logprobs(drifted, harmful_test), last_logprobs(unsafe, harmful_test)
lp_g = torch.log_softmax(lp_d - 99 * (lp_u - lp_d).clamp(min=0), -1)   # GuidedDecoding's rule, first token
with amp.hooks(drifted):
    lp_a = last_logprobs(drifted, harmful_test)
ref_ids = refusal_token_ids(drifted)
tok = drifted.tokenizer
rows = []
for name, lp in (("drifted", lp_d), ("harmful (the unsafe model)", lp_u), ("drifted, guided", lp_g), ("drifted, amplified", lp_a)):
    top = Counter(tok.decode([int(i)]) for i in lp.argmax(-1)).most_common(3)
    rows.append([name, ", ".join(f"{t!r}×{c}" for t, c in top), f"{float(torch.logsumexp(lp[:, ref_ids], -1).exp().mean()):.3f}"])
display(table(["first reply token on harmful prompts", "most common greedy first tokens", "mean P(refusal-opening token)"], rows))
print("refusal-opening tokens:", [tok.decode([i]) for i in ref_ids])

# Mid-refusal: is the amplified model's favourite next token one the unsafe model likes even more?
penalised = {}
for prefix in ("I'm", "As an AI, I am", "I cannot"):
    texts = [t + prefix for t in drifted.format(harmful_test)]
    with torch.no_grad():
        with amp.hooks(drifted):
            la = torch.log_softmax(drifted.forward(texts)[:, -1].float(), -1)
        lu = torch.log_softmax(unsafe.forward(texts)[:, -1].float(), -1)
    best = la.argmax(-1)
    penalised[prefix] = float(((lu - la).gather(1, best[:, None]) > 0).float().mean())
    common = Counter(tok.decode([int(i)]) for i in best).most_common(1)[0][0]
    print(f"after {prefix!r}: the amplified model's top next token (most often {common!r}) is penalised by "
          f"guided decoding for {penalised[prefix]:.0%} of the prompts")
''', "number"),
    code('''
summary = {**{f"{m} / harmful": r[0] for m, r in si_rates.items()}, **{f"{m} / harmless": r[1] for m, r in si_rates.items()},
           **{f"{m} / harmful opens as refusal": v for m, v in si_opens.items()},
           "processor == generate": same_as_processor, "gamma0 == plain": gamma0_is_plain,
           **{f"penalised after {p!r}": v for p, v in penalised.items()}}
print(json.dumps(summary, indent=1, ensure_ascii=False))
''', "summary"),
    footer(),
]

# =====================================================================================================
# 04: task vectors, recipes, evaluation
# =====================================================================================================
NB04 = [
    md(r"""
# 04 · Task vectors: arithmetic, top-k, TIES, DARE, recipes and side-by-side evaluation

A **task vector** (Ilharco et al. 2023, *Editing models with task arithmetic*) is the weight change of a
fine-tune, τ = θ<sub>finetuned</sub> − θ<sub>base</sub>. Adding it to a model adds the skill; subtracting it removes
the behaviour; summing several merges them. Merging methods clean the vectors before summing:
**TIES** (Yadav et al. 2023) trims each to its largest entries, elects one sign per entry and averages
only the entries that agree; **DARE** (Yu et al. 2024) drops each entry with probability p and rescales
the rest by 1/(1 − p).

`steering.taskvec` does all of this lazily, one tensor at a time (nothing ever holds two models in
memory), with an **exact** global top-k, and `steering.recipe` composes such steps into one checkpoint
from a YAML file, mergekit-style. `steering.evaluate` then compares models and edits side by side.

On the organisms: τ<sub>H</sub> = harmful − aligned (learned to comply with harmful requests) and
τ<sub>D</sub> = drifted − aligned (a benign fine-tune that eroded refusal).
"""),
    setup("nb04", '''
from steering.taskvec import TaskVector, apply, hdr, ties

A, HARM, D = (org.path(k) for k in ("aligned", "harmful", "drifted"))
'''),
    md(r"""
## Arithmetic

Vectors are lazy values: `+`, `-`, scalar `*` build new vectors that compute a tensor only when asked
(`get(name)`), so the same code streams a 70B checkpoint.
"""),
    code('''
tau_h = TaskVector.between(A, HARM)
tau_d = TaskVector.between(A, D)


def dot(a, b):
    return sum(float((a.get(n).double() * b.get(n).double()).sum()) for n in a.names)


print(tau_h, "|", tau_d)
print(f"|τ_H| = {tau_h.norm():.3f}   |τ_D| = {tau_d.norm():.3f}   cos(τ_H, τ_D) = {dot(tau_h, tau_d) / (tau_h.norm() * tau_d.norm()):+.3f}")
print(f"|τ_H + τ_D| = {(tau_h + tau_d).norm():.3f}   |2·τ_H| = {(2 * tau_h).norm():.3f}   "
      f"|−τ_H| = {(-tau_h).norm():.3f}   |τ_H − τ_H| = {(tau_h - tau_h).norm():.1f}")
print("a tensor of the sum:", "lm_head.weight", tuple((tau_h + tau_d).get("lm_head.weight").shape))
''', "number"),
    md(r"""
## Save, load, apply

`save` writes one safetensors file with the provenance (inputs' paths and SHA-256) in its metadata;
`load` reads it back lazily. `apply(target, τ, out)` streams θ<sub>target</sub> + scale·τ into a new
checkpoint folder (config, tokenizer and a model card included). Adding τ<sub>D</sub> to `aligned` gives back
`drifted`, up to float32 rounding.
"""),
    code('''
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
''', "number"),
    md(r"""
## Exact global top-k vs per-tensor top-k

`tau.top_k(0.1)` keeps exactly the ⌈0.1·n⌉ entries of largest magnitude **over the whole model**, found
by a two-pass radix select over float32 bit patterns while holding one tensor at a time (ties broken by
tensor name and index, as a stable full sort would). `tau.top_k(0.1, "tensor")` keeps 10% of *each*
tensor. They keep almost the same number of entries, in completely different places:
"""),
    code('''
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
    c[0] += tau_h.get(n).numel(); c[1] += int(torch.count_nonzero(glob.get(n))); c[2] += int(torch.count_nonzero(per.get(n)))
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
''', "image"),
    md(r"""
The global top 10% is (almost) all in the unembedding, whose entries the fine-tune moved most; this is
why the paper's HDR setting does nothing on the organisms (notebook 02, `experiments/results/hdr.md`).

## TIES and DARE
"""),
    code('''
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
''', "number"),
    md(r"""
## A recipe: several steps, one checkpoint

`steering run recipe.yaml` (or `steering.recipe.run(path)`) validates the file (an unknown key is an
error naming its path), sums the weight-space steps (task arithmetic, TIES, HDR) and streams them into
one checkpoint; `bake` steps (an ablation or addition edit file) are applied to the loaded model after.
`organism:KIND` names an organism folder. This recipe is HDR at λ = 2 with the top 10% of each tensor
of the harm vector, the best HDR setting on validation (notebook 02, `experiments/results/hdr.md`); it
must give exactly what `hdr()` gives.
"""),
    code('''
from steering import recipe
from steering.checkpoint import read_provenance

recipe_path = os.path.join(OUT, "recipe.yaml")
with open(recipe_path, "w") as f:
    f.write(f"""\\
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
''', "number"),
    md(r"""
## Side by side: `steering.evaluate`

`evaluate(model, [Setting(...), ...])` generates (greedy, batched) for every setting on harmful:test,
harmless:test and XSTest's safe and unsafe prompts, and measures the next-token KL and the cross-entropy
of the evaluated model's own completions on harmless prompts. A `Setting` is the evaluated model with
hooked `edits`, another model (`model=`: a folder, e.g. the checkpoints written above) or SafeInfer
decoding. KL and CE are measured against the evaluated model, here `aligned`, so they say how far each
model is from it. `limit=32` prompts per set and `n_utility=32` keep it short.
"""),
    code('''
from steering.evaluate import Setting, evaluate

aligned = st.load(A)
settings = [Setting("aligned"), Setting("drifted", model=D)] + [Setting(name, model=p) for name, p in paths.items()]
report = evaluate(aligned, settings, limit=32, n_utility=32, max_new_tokens=NEW_TOKENS, batch_size=64, progress=False)
display(Markdown(report.table()))
''', "number"),
    code('''
report.plot(os.path.join(OUT, "report.png"))
display(Image(filename=os.path.join(OUT, "report.png")))
''', "image"),
    md(r"""
Reading the table:

- **aligned + τ<sub>D</sub> is `drifted`**, to the last digit: task arithmetic is exact.
- **DARE at p = 0.9** keeps a tenth of τ<sub>D</sub>'s entries (rescaled ×10) and reproduces most of the
  drift, though not exactly: refusal and KL to `aligned` close to `drifted`'s (a little more refusal,
  a little less KL).
- **TIES(τ<sub>H</sub>, τ<sub>D</sub>) barely moves `aligned` on harmless prompts** (KL 0.001, nearly the
  same cross-entropy), yet it costs some refusal of harmful prompts, and the over-refusal of XSTest's safe
  prompts goes. Trimming each vector to its global top 20% again keeps mostly unembedding entries
  (over 90% of the merged entries above), and the disjoint mean averages where plain task arithmetic
  would add.
- **drifted − τ<sub>H</sub>** (the recipe) brings back most of `aligned`'s refusal, with no over-refusal of
  harmless prompts and XSTest's safe prompts over-refused no more than by `aligned`. It does not make
  the model `aligned` again: its KL to `aligned` is even larger than `drifted`'s, and the cross-entropy
  of `aligned`'s own completions rises further. It is a third model that refuses.
"""),
    code('''
summary = {"apply max diff": apply_max_diff, "global top10 kept": kept_global, "tensor top10 kept": kept_tensor,
           "global top10 in unembedding": counts["unembedding"][1], "dare kept fraction": round(dare_fraction, 4),
           "recipe == hdr": recipe_equals_hdr,
           **{f"{name} / {k}": round(v, 4) for name, row in report.rows.items() for k, v in row.items()}}
print(json.dumps(summary, indent=1, ensure_ascii=False))
''', "summary"),
    footer(),
]

NOTEBOOKS = {
    "01_refusal_direction": NB01,
    "02_safety_arithmetic": NB02,
    "03_safeinfer": NB03,
    "04_task_vectors": NB04,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.from_dict(c) for c in NOTEBOOKS[name]]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> float:
    """Run ``nb`` in place (cwd = notebooks/), then delete its scratch folder; returns the seconds it took."""
    t = time.time()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    seconds = time.time() - t
    first = next(c for c in nb.cells if c.cell_type == "code")
    text = "".join(o.get("text", "") for o in first.outputs if o.output_type == "stream")
    found = re.search(r"scratch folder: (\S+)", text)
    if found and Path(found.group(1)).name.startswith("steering-nb"):
        shutil.rmtree(found.group(1), ignore_errors=True)
    return seconds


def main(argv: list[str]) -> None:
    run = "--no-execute" not in argv
    wanted = [a for a in argv if not a.startswith("--")]
    for name in NOTEBOOKS:
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        nb = build(name)
        if run:
            print(f"{name}: running ...", flush=True)
            print(f"{name}: {execute(nb):.0f} s", flush=True)
        nbformat.write(nb, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main(sys.argv[1:])
