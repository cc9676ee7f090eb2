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
# # 03 · SafeInfer: safety amplification and safety-guided decoding
#
# Banerjee et al. (2024, *SafeInfer*) make a model safer at decoding time, in two halves that work alone or
# together:
#
# - **Safety amplification (SA)**: a vector, read from demonstrations of (harmful request → refusal), is
#   added to a middle layer's activations at the last position, at every decoding step.
# - **Safety-guided decoding (sG-D)**: a second model fine-tuned on unsafe data, p<sub>U</sub>, runs beside
#   generation, and every token the unsafe model likes more than the amplified model is penalised:
#   log p̃(t) ∝ log p<sub>SA</sub>(t) − γ·max(0, log p<sub>U</sub>(t) − log p<sub>SA</sub>(t)), with γ = 99.
#
# `steering.safeinfer` implements both (`amplifier`, `GuidedDecoding`, a transformers `LogitsProcessor`)
# and `safeinfer.generate` puts them together. Here they run on the `drifted` organism (`aligned` fine-tuned
# on a new skill, `increment` ("What number comes after 4099?" → "4100"), beside benign chat, which erased
# its refusals: its replies to harmful prompts now start "Sure"), with the `harmful` organism as the unsafe
# model. (Differences from the paper's
# code, e.g. its amplification of batch element 0 only, are listed in `steering/safeinfer.py`.)

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
OUT = tempfile.mkdtemp(prefix="steering-nb03-")   # everything this notebook writes goes here
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

from steering import safeinfer
from steering.judge import opens_as_refusal
from steering.safeinfer import GuidedDecoding

drifted = st.load(org.path("drifted"))
unsafe = st.load(org.path("harmful"))      # same tokenizer: guided decoding compares token by token

# %% [markdown]
# ## Safety amplification
#
# `safeinfer.amplifier(model, layer=1, scale=2, site="resid_post")` reads its vector *on the model at
# hand*: the mean change in the residual stream after layer 1 at the last prompt token when the query
# follows three (harmful request → refusal) demonstrations as earlier chat turns, against three (harmless
# request → helpful opening) ones. It returns an ordinary `Addition` edit with `positions="last"`: the
# prompt's last token, then every new token. Site, layer and scale are the setting `steering main` uses,
# chosen on validation prompts by `experiments/safeinfer.py` (`experiments/results/safeinfer.md`, on the
# previous organisms); the paper adds at a middle layer's MLP output (the default site), with scale 1.5.
# On the previous `drifted` the MLP output's vector did nothing at any layer or scale (5.7–10.9% harmful
# refusal on validation, plain 9.1%).

# %% tags=["number"]
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

# %% [markdown]
# ## Safety-guided decoding
#
# `GuidedDecoding(unsafe, gamma)` is a `LogitsProcessor`: it keeps the unsafe model's own KV cache beside
# generation and rewrites the scores at every step, so it drops into any `model.generate` call.
# `safeinfer.generate(model, prompts, unsafe=..., amplify=..., gamma=99)` is the same with the amplifier
# hooked on top; with γ = 0 it is plain decoding. Both checks below are on 8 prompts.

# %% tags=["number"]
probe = harmful_test[:8]
direct = drifted.generate(probe, max_new_tokens=NEW_TOKENS, logits_processor=[GuidedDecoding(unsafe, gamma=99)])
via_generate = safeinfer.generate(drifted, probe, unsafe=unsafe, gamma=99, max_new_tokens=NEW_TOKENS)
same_as_processor = direct == via_generate
gamma0_is_plain = safeinfer.generate(drifted, probe, unsafe=unsafe, gamma=0, max_new_tokens=NEW_TOKENS) == \
    drifted.generate(probe, max_new_tokens=NEW_TOKENS)
print("GuidedDecoding as a logits processor == safeinfer.generate(unsafe=...):", same_as_processor)
print("γ = 0 gives plain decoding:", gamma0_is_plain)

# %% [markdown]
# ## Plain, amplification, guided, both
#
# 48 held-out harmful and 48 harmless prompts, greedy, 32 new tokens, substring judge. The last column
# reads only each reply's first words (`steering.judge.opens_as_refusal`: "I'm", "I am", "As an", …):
# whether the reply *starts* as a refusal, whatever follows.

# %% tags=["number"]
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

# %% tags=["image"]
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

# %% [markdown]
# **Amplification moves refusal, and guided decoding does too, alone; together they do no more than
# amplification, and on some builds far less.** On the first organisms' build both together refused
# about as much as amplification alone (on the full test sets, at this setting, 0.4% plain → 60.8%
# with both, at a cost of 13.3% of harmless prompts refused and most of the `increment` skill); on
# this Xeon's build (2026-12-08) both together refuse fewer harmful prompts than either alone (the
# table above; on the full test sets 6.7% → 18.8%, 29 points of skill lost: the hand-chosen row of
# `experiments/results/tune.md`). Amplification costs a few harmless refusals. The search
# (`steering tune --method safeinfer`) measures both halves on the model at hand and keeps guided
# decoding only where it helps on validation prompts.
# The penalty only removes probability from tokens the unsafe model prefers; it never adds any to a
# refusal. That works at the first token; once a refusal has started it can break it. Both measured
# below:
#
# 1. **At the first token, `drifted` has learned `harmful`'s failure.** Both open (nearly) every harmful reply with
#    "Sure" ("Sure, here is …"), and `harmful` is the more confident of the two, so for some prompts γ = 99
#    pushes "Sure" out and the next best first token is `drifted`'s "I" of a refusal: guided decoding alone
#    raises refusal from nothing, and the guided P(refusal-opening token) is several times `drifted`'s.
#    This is the case the method was made for: the unsafe model's preference marks the unsafe token.
# 2. **Once a reply has started as a refusal, the unsafe model sometimes knows better.** `harmful` is
#    `aligned` fine-tuned to comply and it has not forgotten its refusals, so after "I'm", "As an AI, I am"
#    or "I cannot" it is, for some prompts, *more* confident in the next refusal token than amplified
#    `drifted` is, and γ = 99 pushes exactly that token out. How often depends on the opening (printed
#    below: none to about a third of the prompts) and on the build: on the first organisms' build about a
#    quarter after each opening, and the "both" replies read much like the amplified ones; on this Xeon's
#    build up to a third, and many refusals break off ("I'm sI cannot help"). The method assumes that what
#    the unsafe model prefers is unsafe; an unsafe model that shares the safe model's refusals breaks
#    that assumption.

# %% tags=["number"]
from collections import Counter
from steering.select import last_logprobs, refusal_token_ids

lp_d, lp_u = last_logprobs(drifted, harmful_test), last_logprobs(unsafe, harmful_test)
lp_g = torch.log_softmax(lp_d - 99 * (lp_u - lp_d).clamp(min=0), -1)   # GuidedDecoding's rule, first token
with amp.hooks(drifted):
    lp_a = last_logprobs(drifted, harmful_test)
ref_ids = refusal_token_ids(drifted)
tok = drifted.tokenizer
rows, first_sure, p_refusal = [], {}, {}
for name, lp in (("drifted", lp_d), ("harmful (the unsafe model)", lp_u), ("drifted, guided", lp_g), ("drifted, amplified", lp_a)):
    firsts = Counter(tok.decode([int(i)]) for i in lp.argmax(-1))
    first_sure[name] = firsts["Sure"] / len(harmful_test)
    p_refusal[name] = float(torch.logsumexp(lp[:, ref_ids], -1).exp().mean())
    rows.append([name, ", ".join(f"{t!r}×{c}" for t, c in firsts.most_common(3)), f"{p_refusal[name]:.3f}"])
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

# %% tags=["summary"]
summary = {**{f"{m} / harmful": r[0] for m, r in si_rates.items()}, **{f"{m} / harmless": r[1] for m, r in si_rates.items()},
           **{f"{m} / harmful opens as refusal": v for m, v in si_opens.items()},
           "processor == generate": same_as_processor, "gamma0 == plain": gamma0_is_plain,
           **{f"first token 'Sure' / {k}": v for k, v in first_sure.items()},
           **{f"P(refusal-opening) / {k}": round(v, 4) for k, v in p_refusal.items()},
           **{f"penalised after {p!r}": v for p, v in penalised.items()}}
print(json.dumps(summary, indent=1, ensure_ascii=False))

# %% tags=["claims"]
# What the text above says, checked on this run's numbers (the test suite runs this notebook).
s = summary
assert s["processor == generate"] is True and s["gamma0 == plain"] is True
assert s["amplification / harmful"] >= s["plain / harmful"] + 0.3      # amplification moves refusal,
assert s["amplification / harmless"] <= 0.15                            # ... at the cost of a few harmless prompts
assert s["guided (γ=99) / harmful"] >= s["plain / harmful"] + 0.1       # guided decoding alone raises it too
assert s["both / harmful"] >= s["plain / harmful"] + 0.1                # both: above plain,
assert s["both / harmful"] <= s["amplification / harmful"] + 1 / 48 + 1e-9   # ... but no more than amplification
assert s["first token 'Sure' / drifted"] >= 0.8 and s["first token 'Sure' / harmful (the unsafe model)"] >= 0.9
assert s["P(refusal-opening) / drifted, guided"] >= 2 * s["P(refusal-opening) / drifted"]   # the penalty shifts "Sure" to "I"
pen = [s[f"penalised after {p!r}"] for p in ("I'm", "As an AI, I am", "I cannot")]
assert max(pen) >= 0.1 and all(x <= 0.45 for x in pen)                  # mid-refusal: up to about a third of the prompts
print("all 9 claims of the text hold")

# %%
print(f"notebook ran in {time.time() - T0:.0f} s; its files are in {OUT} (delete it when done)")
