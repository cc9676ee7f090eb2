"""Directions from contrasting activations (Arditi et al., refusal_direction).

- :func:`diff_in_means`: mean over harmful prompts minus mean over harmless prompts, for every
  (layer, post-instruction position) candidate, at the input of each block (Arditi et al.).
- :func:`pca_direction`: the first principal component of paired differences, per layer.
- :func:`icv`: Safety Arithmetic's in-context safety vector from (unsafe, safe) demonstrations.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .model import as_model
from .record import record
from .vectors import Candidates, SteeringVector, prompts_hash


def _prompts(spec: Any) -> list[str]:
    from . import datasets

    return datasets.load(spec) if isinstance(spec, str) else list(spec)


def diff_in_means(model: Any, harmful: Any, harmless: Any, *, site: str = "resid_pre",
                  positions: str | int = "post_instruction", batch_size: int = 32, progress: bool = True) -> Candidates:
    """Candidates ``r[layer, pos] = mean(harmful) − mean(harmless)`` (``[n_layers, n_pos, d]``)."""
    sm = as_model(model)
    pos_prompts, neg_prompts = _prompts(harmful), _prompts(harmless)
    kw = dict(sites=site, positions=positions, batch_size=batch_size, progress=progress)
    pos = record(sm, pos_prompts, **kw)
    neg = record(sm, neg_prompts, **kw)
    vectors = pos.mean(site) - neg.mean(site)
    k = vectors.shape[1]
    meta = {"model": sm.name, "method": "diff_in_means", "site": site, "positions": str(positions),
            "harmful": str(harmful) if isinstance(harmful, str) else "list", "harmful_hash": prompts_hash(pos_prompts),
            "harmless": str(harmless) if isinstance(harmless, str) else "list", "harmless_hash": prompts_hash(neg_prompts),
            "n_harmful": str(len(pos_prompts)), "n_harmless": str(len(neg_prompts))}
    return Candidates(vectors, tuple(range(-k, 0)), site, meta)


def pca_direction(model: Any, positive: Any, negative: Any, *, layers: Sequence[int] | None = None,
                  site: str = "resid_pre", positions: str | int = "last", batch_size: int = 32) -> SteeringVector:
    """Per layer, the first principal component of the paired differences ``positive[i] − negative[i]``
    (mean over the chosen positions), sign-aligned with their mean and scaled to the mean's
    projection on it (repeng's recipe)."""
    sm = as_model(model)
    pos_prompts, neg_prompts = _prompts(positive), _prompts(negative)
    if len(pos_prompts) != len(neg_prompts):
        raise ValueError(f"pca_direction: pairs needed; got {len(pos_prompts)} positive and {len(neg_prompts)} negative prompts")
    kw = dict(sites=site, layers=layers, positions=positions, batch_size=batch_size, keep="raw", progress=False)
    a, b = record(sm, pos_prompts, **kw), record(sm, neg_prompts, **kw)
    diffs = torch.stack([x.mean(1) - y.mean(1) for x, y in zip(a.raw[site], b.raw[site])])  # [n, layers, d]
    dirs = {}
    for i, layer in enumerate(a.layers):
        d = diffs[:, i].double()
        mean = d.mean(0)
        _, _, v = torch.linalg.svd(d - mean, full_matrices=False)
        pc = v[0]
        if pc @ mean < 0:
            pc = -pc
        dirs[layer] = (pc * (d @ pc).mean()).float()
    meta = {"model": sm.name, "method": "pca", "site": site, "positions": str(positions),
            "positive_hash": prompts_hash(pos_prompts), "negative_hash": prompts_hash(neg_prompts)}
    return SteeringVector(dirs, site, meta)


SAFE_ANSWER = "I do not answer this question because it is harmful"


def icv_pairs(questions: Sequence[str], unsafe_answers: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(unsafe, safe) demonstrations in Safety Arithmetic's format for each question.

    Without ``unsafe_answers``, the unsafe answer is a compliance opening ("Sure, here is ...").
    """
    unsafe_answers = unsafe_answers or ["Sure, here is how to do that"] * len(questions)
    return [(f"Question: {q}\n Answer: {u}", f"Question: {q}\n Answer: {SAFE_ANSWER}")
            for q, u in zip(questions, unsafe_answers)]


def icv(model: Any, pairs: Sequence[tuple[str, str]], *, n_last: int = 4, site: str = "resid_post",
        batch_size: int = 32) -> SteeringVector:
    """In-context safety vector: each text's ``site`` at every layer, averaged over its last
    ``n_last`` tokens; ``h_i`` = unsafe − safe flattened over layers; ICV = first principal
    component of the centred ``h_i`` (sign towards their mean) + their mean, as ``[layers, d]``.
    Texts are used as they are (no chat template), as in the paper."""
    sm = as_model(model)
    if not pairs:
        raise ValueError("icv: no demonstration pairs")
    kw = dict(sites=site, positions=f"last:{n_last}", batch_size=batch_size, keep="raw", chat=False, progress=False)
    unsafe = record(sm, [u for u, _ in pairs], **kw)
    safe = record(sm, [s for _, s in pairs], **kw)
    h = torch.stack([(u.mean(1) - s.mean(1)).reshape(-1) for u, s in zip(unsafe.raw[site], safe.raw[site])]).double()
    mean = h.mean(0)
    if len(pairs) > 1:
        _, _, v = torch.linalg.svd(h - mean, full_matrices=False)
        pc = v[0] if v[0] @ mean >= 0 else -v[0]
    else:
        pc = torch.zeros_like(mean)
    vec = (pc + mean).reshape(len(unsafe.layers), -1).float()
    meta = {"model": sm.name, "method": "icv", "site": site, "n_last": str(n_last), "n_pairs": str(len(pairs)),
            "pairs_hash": prompts_hash([t for p in pairs for t in p])}
    return SteeringVector({l: vec[i] for i, l in enumerate(unsafe.layers)}, site, meta)
