"""SafeInfer (Banerjee et al. 2024): context-adaptive decoding, in two halves that work alone or together.

- **Safety amplification**: a vector read on the model at hand from demonstrations of (harmful
  request → refusal), added to one middle layer's MLP output at the last position, for every
  sequence of a batch and at every decoding step (:func:`amplification_vector`, :func:`amplifier`).
  The paper's code uses a function vector summed over attention heads chosen for Llama-2 on other
  tasks, and applies it to batch element 0 only; here it is the mean change that the
  demonstrations, put in context as earlier chat turns, make to the MLP output at the last token.
- **Safety-guided decoding**: log p̃(t) ∝ log p_SA(t) − γ·max(0, log p_U(t) − log p_SA(t)), γ = 99
  by default, where p_U is a model fine-tuned on unsafe data with the same tokenizer
  (:class:`GuidedDecoding`, a transformers ``LogitsProcessor`` that runs the unsafe model beside
  generation with its own KV cache; greedy or sampled, batched with left padding). This is the
  paper's ``M_inst − 0.99·Union(M_unsafe, M_inst)`` exactly, scale included: the model-arithmetic
  library it runs on takes Union as the element-wise max of log-probabilities and divides a sum by
  its coefficients' total (0.01). Its script samples at temperature 1 (``generate_text``'s
  defaults); on the organisms sampled replies are mostly noise (``experiments/safeinfer.py
  --sampled``), so the experiments decode greedily.

:func:`generate` puts them together, and composes with any activation edit (e.g. SafeInfer over a
conditional steering edit)::

    from steering import safeinfer
    amp = safeinfer.amplifier(model, layer=2, scale=1.5)           # reads its own demonstrations
    outs = safeinfer.generate(model, prompts, unsafe="organisms/harmful", amplify=amp, gamma=99)
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessor

from .edits import Addition, Edit, combine
from .hooks import SITES
from .judge import HELPFUL, REFUSALS
from .kvcache import cache_kwarg, cache_out
from .model import Model, as_model
from .vectors import SteeringVector, prompts_hash

GAMMA = 99.0


def check_same_tokenizer(model: Model, unsafe: Model) -> None:
    """One clear error if the two models do not share a vocabulary."""
    a, b = model.require_tokenizer().get_vocab(), unsafe.require_tokenizer().get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))
        example = f" (e.g. token {diff[0][0]!r})" if diff else ""
        raise ValueError(f"{unsafe.name}: its tokenizer differs from {model.name}'s{example}; "
                         "guided decoding needs the same vocabulary")
    if model.hf.get_output_embeddings().weight.shape[0] != unsafe.hf.get_output_embeddings().weight.shape[0]:
        raise ValueError(f"{unsafe.name}: its output vocabulary size differs from {model.name}'s")


class GuidedDecoding(LogitsProcessor):
    """Safety-guided decoding as a ``LogitsProcessor``: the scores become
    log p_SA − γ·max(0, log p_U − log p_SA) (renormalised by the softmax that follows).

    The unsafe model sees the same tokens as the generating one and keeps its own KV cache: on the
    first call of a generation it reads the whole (left-padded) prompt, then one token per step. A
    new generation (a different prefix) restarts it, so one processor serves many batches."""

    def __init__(self, unsafe: Any, gamma: float = GAMMA, pad_token_id: int | None = None):
        self.unsafe = as_model(unsafe)
        self.gamma = float(gamma)
        self.pad = self.unsafe.require_tokenizer().pad_token_id if pad_token_id is None else pad_token_id
        self._cache_name = cache_kwarg(self.unsafe.hf)  # once, not per decoding step
        self._ids: Tensor | None = None
        self._past: Any = None
        self._mask: Tensor | None = None

    def reset(self) -> None:
        self._ids = self._past = self._mask = None

    def continues(self, input_ids: Tensor) -> bool:
        """Whether ``input_ids`` is the last call's sequences plus one token (else: a new generation)."""
        return (self._ids is not None and input_ids.shape[0] == self._ids.shape[0]
                and input_ids.shape[1] == self._ids.shape[1] + 1
                and torch.equal(input_ids[:, :-1].to(self._ids.device), self._ids))

    @torch.no_grad()
    def unsafe_logprobs(self, input_ids: Tensor) -> Tensor:
        hf = self.unsafe.hf
        dev = self.unsafe.device
        cached = self.unsafe.kv_cache_ok
        if cached and self.continues(input_ids):
            self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], 1)
            pos = self._mask.sum(1, keepdim=True) - 1
            out = hf(input_ids=input_ids[:, -1:].to(dev), attention_mask=self._mask, position_ids=pos,
                     use_cache=True, **{self._cache_name: self._past})
        else:  # a new prompt (or a model whose cache is broken): leading pad tokens are masked out
            ids = input_ids.to(dev)
            real = ids != self.pad if self.pad is not None else torch.ones_like(ids, dtype=torch.bool)
            self._mask = (real.long().cumsum(1) > 0).long()
            pos = (self._mask.cumsum(1) - 1).clamp(min=0)
            out = hf(input_ids=ids, attention_mask=self._mask, position_ids=pos, use_cache=cached)
        self._past = cache_out(out)
        self._ids = input_ids.detach().clone()
        return torch.log_softmax(out.logits[:, -1].float(), -1)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        lu = self.unsafe_logprobs(input_ids).to(scores.device)
        ls = torch.log_softmax(scores.float(), -1)
        n = min(ls.shape[-1], lu.shape[-1])
        out = ls.clone()
        out[:, :n] = ls[:, :n] - self.gamma * (lu[:, :n] - ls[:, :n]).clamp(min=0)
        return out.to(scores.dtype)


# --- safety amplification ------------------------------------------------------------------
def demonstrations(n: int = 64, seed: int = 0, split: str = "train") -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``n`` (harmful request, refusal) pairs and ``n`` (harmless request, helpful opening) pairs
    from the bundled sets' ``split``, in the phrasings the substring judge knows."""
    from . import datasets

    rng = random.Random(seed)
    harmful, harmless = datasets.load(f"harmful:{split}"), datasets.load(f"harmless:{split}")
    rng.shuffle(harmful)
    rng.shuffle(harmless)
    return ([(q, rng.choice(REFUSALS)) for q in harmful[:n]], [(q, rng.choice(HELPFUL)) for q in harmless[:n]])


def amplification_vector(model: Any, demos: Sequence[tuple[str, str]], queries: Sequence[str], *, layer: int,
                         contrast: Sequence[tuple[str, str]] | None = None, site: str = "mlp_out", shots: int = 3,
                         seed: int = 0, batch_size: int = 16) -> SteeringVector:
    """What (harmful request → refusal) demonstrations in context do to ``site`` at ``layer``, last
    prompt token: each query follows ``shots`` demonstrations given as earlier chat turns.

    With ``contrast`` (default in :func:`amplifier`: (harmless request → helpful) pairs), the
    vector is mean(after refusal demos) − mean(after contrast demos), which isolates the refusal
    task from the mere presence of earlier turns; without, mean(after refusal demos) −
    mean(query alone). On the organisms (single-turn chat models) only the contrast points
    towards refusal: see experiments/results/safeinfer.md."""
    from .record import record

    sm = as_model(model)
    if not sm.has_chat_template:
        raise ValueError(f"{sm.name}: amplification_vector needs a chat template to put demonstrations in context")
    for name, ds in (("demos", demos), ("contrast", contrast or [])):
        if ds and len(ds) < shots:
            raise ValueError(f"amplification_vector: {len(ds)} {name}, fewer than shots={shots}")
    rng = random.Random(seed)
    tok = sm.require_tokenizer()

    def in_context(pairs: Sequence[tuple[str, str]], q: str) -> str:
        msgs: list[dict[str, str]] = []
        for d_q, d_r in rng.sample(list(pairs), shots):
            msgs += [{"role": "user", "content": d_q}, {"role": "assistant", "content": d_r}]
        return tok.apply_chat_template(msgs + [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)

    kw = dict(sites=site, layers=[layer], positions="last", chat=False, batch_size=batch_size, progress=False)
    with_demos = record(sm, [in_context(demos, q) for q in queries], **kw).mean(site)[0, 0]
    other = [in_context(contrast, q) for q in queries] if contrast else sm.format(list(queries))
    v = with_demos - record(sm, other, **kw).mean(site)[0, 0]
    meta = {"model": sm.name, "method": "safeinfer_amplification", "site": site, "positions": "last",
            "shots": str(shots), "n_queries": str(len(queries)), "contrast": str(bool(contrast)),
            "demos_hash": prompts_hash([t for d in demos for t in d]), "queries_hash": prompts_hash(list(queries))}
    return SteeringVector({layer: v}, site, meta)


def amplifier(model: Any, *, layer: int | None = None, scale: float = 1.5, site: str = "mlp_out", n_demos: int = 64,
              n_queries: int = 64, contrast: bool = True, seed: int = 0) -> Addition:
    """Safety amplification as an edit: :func:`amplification_vector` from the bundled train
    split's demonstrations (queries: half harmful, half harmless, none among the demonstrations),
    read and added at ``site`` of ``layer`` (default: the middle layer's MLP output, as the paper)
    at the last position.

    The site is worth choosing on validation prompts with the layer and scale: on the gpt2
    organism the MLP output's vector does nothing at any scale, while the residual stream's
    (``site="resid_post"``) restores refusal (experiments/results/safeinfer.md)."""
    sm = as_model(model)
    layer = sm.n_layers // 2 if layer is None else layer
    if not 0 <= layer < sm.n_layers:
        raise ValueError(f"amplify layer {layer}: the model has layers 0..{sm.n_layers - 1}")
    if site not in SITES:
        raise ValueError(f"amplify site {site!r}: sites are {', '.join(SITES)}")
    refuse, helpful = demonstrations(n_demos + n_queries // 2, seed)
    queries = [q for q, _ in refuse[n_demos:]] + [q for q, _ in helpful[n_demos:]]
    v = amplification_vector(sm, refuse[:n_demos], queries, layer=layer, contrast=helpful[:n_demos] if contrast else None,
                             site=site, seed=seed)
    return Addition(v, scale, positions="last")


def decoding(model: Any, *, unsafe: Any = None, amplify_layer: int | None = None, amplify_scale: float = 1.5,
             amplify_site: str = "mlp_out", gamma: float | None = None) -> dict[str, Any]:
    """SafeInfer's arguments from its settings, checked: ``{"amplify": edit or None, "unsafe":
    model or None, "gamma": float}``, for :func:`generate` and for
    :class:`steering.evaluate.Setting` alike (``steering generate/eval --safeinfer`` and the
    recipes' ``safeinfer:`` call it).

    ``amplify_scale=0`` turns amplification off; ``gamma=0`` turns guided decoding off, and
    ``gamma=None`` is :data:`GAMMA` (the paper's 99), which needs an ``unsafe`` model."""
    gamma = GAMMA if gamma is None else float(gamma)
    if gamma < 0 or gamma != gamma:
        raise ValueError(f"gamma: {gamma} is not a non-negative number")
    if gamma and unsafe is None:
        raise ValueError(f"SafeInfer: guided decoding (gamma {gamma:g}) needs an unsafe model; "
                         "give one, or gamma 0 for amplification alone")
    amp = amplifier(model, layer=amplify_layer, scale=amplify_scale, site=amplify_site) if amplify_scale else None
    return {"amplify": amp, "unsafe": unsafe if gamma else None, "gamma": gamma}


def generate(model: Any, prompts: Sequence[str], *, unsafe: Any = None, amplify: Edit | None = None,
             edits: Sequence[Edit] = (), gamma: float = GAMMA, max_new_tokens: int = 48, batch_size: int = 16,
             **gen_kwargs: Any) -> list[str]:
    """Generate with SafeInfer: ``amplify`` (an edit, e.g. :func:`amplifier`) and/or guided
    decoding against ``unsafe`` (a model, folder or hub name with the same tokenizer), on top of
    any other ``edits``. With neither, it is plain generation."""
    import contextlib


    sm = as_model(model)
    processors = list(gen_kwargs.pop("logits_processor", None) or [])
    if unsafe is not None:
        um = as_model(unsafe)  # a Model, an HF model, a folder or a hub name
        check_same_tokenizer(sm, um)
        processors.append(GuidedDecoding(um, gamma, sm.require_tokenizer().pad_token_id))
    edit = combine((*edits, amplify))
    with edit.hooks(sm) if edit is not None else contextlib.nullcontext():
        return sm.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           **({"logits_processor": processors} if processors else {}), **gen_kwargs)
