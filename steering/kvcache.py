"""The KV cache across transformers versions, and a check that a model's cache gives right tokens.

transformers 5.x renamed the cache argument of every ``forward`` from ``past_key_values`` to
``cache`` (the old name is deprecated; ``generate`` passes the new one), and outputs carry it as
``.cache``. Code that reads the cache from a forward call's keyword arguments therefore looks
under every name (:func:`cache_in`), and code that passes one uses the name the model's ``forward``
takes (:func:`cache_kwarg`).

Wrappers that re-implement attention may read only one of the names. TransformerLens 4.3's
``TransformerBridge`` reads ``past_key_values`` (and ``layer_past``), so under transformers 5.24
its attention never sees the cache ``generate`` passes and every decoding step attends to itself
alone: fluent-looking garbage, no error. :func:`kv_cache_works` finds such a model by running the
same tokens with and without the cache; :meth:`steering.Model.generate` then decodes without the
cache (slower, right), whatever the versions installed.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn

CACHE_NAMES = ("cache", "past_key_values", "layer_past")


def cache_in(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache among a forward call's keyword arguments, under whichever name it came."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_kwarg(hf: nn.Module) -> str:
    """The name under which ``hf.forward`` takes a KV cache (``cache`` from transformers 5.2x on)."""
    try:
        params = inspect.signature(hf.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_out(out: Any) -> Any:
    """The KV cache a forward call returned (``.cache``, or ``.past_key_values`` before the rename)."""
    found = getattr(out, "cache", None)
    return found if found is not None else getattr(out, "past_key_values", None)


@torch.inference_mode()
def kv_cache_works(hf: nn.Module, n_tokens: int = 6, rtol: float = 1e-2) -> bool:
    """Whether ``hf``'s logits for a token are the same decoded one step at a time under its KV cache
    as from a forward over the whole sequence (the relative distance of the two logit vectors
    within ``rtol``; a cache that is not read gives distances of order one)."""
    embed = hf.get_input_embeddings()
    vocab = int(embed.weight.shape[0])
    ids = (torch.arange(n_tokens) * 7919 % max(vocab - 1, 1) + 1).unsqueeze(0).to(embed.weight.device)
    full = hf(input_ids=ids, use_cache=False).logits[:, -1].float()
    prefix = hf(input_ids=ids[:, :-1], use_cache=True)
    past = cache_out(prefix)
    if past is None:
        return False
    step = hf(input_ids=ids[:, -1:], use_cache=True, **{cache_kwarg(hf): past}).logits[:, -1].float()
    return bool((full - step).norm() <= rtol * full.norm().clamp(min=1e-6))
