"""The edits steering's hooks make, made instead through two rival tools, for side-by-side benchmarks.

Rivals: TransformerLens 4.x's ``TransformerBridge`` (hook points ``blocks.{l}.hook_resid_pre`` /
``hook_attn_out`` / ``hook_mlp_out``, its own ``generate`` loop) and nnsight 0.8's
``LanguageModel`` (a ``with lm.generate(...)`` trace that rewrites module inputs/outputs at every
decoding step, HF's own ``generate`` underneath).

An ``edit`` is one of
  - ``None``: no edit;
  - ``("add", V)``, ``V`` ``[n_layers, d_model]``: add ``V[l]`` to the residual stream entering layer
    ``l`` (resid_pre), at every position, on the prompt and on every decoding step. Steering's
    equivalent: ``Addition(SteeringVector({l: V[l] ...}, "resid_pre"))`` (positions="all", scale 1);
  - ``("ablate", r)``, ``r`` a unit ``[d_model]``: ``x <- x - (x.r) r`` at resid_pre, attn_out and
    mlp_out of every layer, every position, every step. Steering's equivalent: ``Ablation(r)``.

Generation contract, the same for both tools (and for the reference ``model.hf.generate``): greedy,
KV cache on, left-padded batch with its attention mask, exactly ``max_new_tokens`` new tokens, and
EOS is an ordinary token (generated when it is the argmax, generation goes on after it). For HF's
``generate`` that means ``eos_token_id=None``, not ``min_new_tokens`` (which would forbid EOS and so
change the tokens); for the bridge it means ``stop_at_eos=False``.

Both wrappers change the HF model they are given, in place: the bridge swaps every submodule for a
bridge component (and switches attention to eager); nnsight registers its hooks on every module.
Benchmark each tool on its own copy of the model (``copy.deepcopy``), never on the one steering's
reference runs. The bridge runs eager attention, so compare tokens against a reference loaded with
``attn_implementation="eager"`` too (sdpa differs by float rounding, which can flip a near-tie).
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    import nnsight
    from transformer_lens.model_bridge import TransformerBridge


def _check_edit(edit: Any, n_layers: int, d_model: int) -> tuple[str, Tensor] | None:
    if edit is None:
        return None
    kind, value = edit
    if kind == "add":
        if tuple(value.shape) != (n_layers, d_model):
            raise ValueError(f"add: V must be [n_layers={n_layers}, d_model={d_model}], got {tuple(value.shape)}")
    elif kind == "ablate":
        if tuple(value.shape) != (d_model,):
            raise ValueError(f"ablate: r must be [d_model={d_model}], got {tuple(value.shape)}")
        if abs(float(value.double().norm()) - 1.0) > 1e-4:
            raise ValueError(f"ablate: r must be a unit vector (norm {float(value.norm()):.6f})")
    else:
        raise ValueError(f"edit kind {kind!r}: use 'add' or 'ablate'")
    return kind, value.detach()


class _Like:
    """A tensor moved once to each (device, dtype) it is used at (out of the hot path)."""

    def __init__(self, t: Tensor) -> None:
        self.t, self.cache = t, {}

    def __call__(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in self.cache:
            self.cache[key] = self.t.to(device=x.device, dtype=x.dtype)
        return self.cache[key]


def _project_out(x: Tensor, r: Tensor) -> Tensor:
    return x - (x @ r).unsqueeze(-1) * r


def _project_first(out: Any, r: Tensor) -> Any:
    """``_project_out`` on a module's output, or on its first element when it returns a tuple."""
    if isinstance(out, tuple):
        return (_project_out(out[0], r), *out[1:])
    return _project_out(out, r)


def _last_real(mask: Tensor) -> Tensor:
    """[batch] index of each row's last real token (left or right padding)."""
    cols = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), cols, -1).max(-1).values


# --- TransformerLens TransformerBridge -------------------------------------------------------------
def bridge_of(hf_model: Any, tokenizer: Any, folder: str | os.PathLike) -> TransformerBridge:
    """Wrap ``hf_model`` (already in memory) in a ``TransformerBridge``, offline.

    ``TransformerBridge.boot_transformers(folder, hf_model=..., tokenizer=...)``: with ``hf_model``
    given, the config is copied from the model and no weights are read; ``folder`` (a local HF
    folder with the same model's config.json) only names the model. The bridge wraps the very
    module it is given — every submodule is replaced in place by a bridge component and attention
    is forced to eager — so pass a copy if the plain model is still needed.

    The boot re-loads the tokenizer from its ``name_or_path`` (to get ``add_bos_token=True``),
    which an in-memory tokenizer has not got and which may be a hub name; so the tokenizer is
    saved to a temporary folder and handed over from there (no network). The bridge never
    tokenises here (the adapters pass token ids), so this only gives it its pad/eos ids.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder}: not a local HF folder with config.json (the boot must stay offline)")
    with tempfile.TemporaryDirectory(prefix="bridge_tok_") as tmp:
        tokenizer.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
        bridge = TransformerBridge.boot_transformers(folder, hf_model=hf_model, tokenizer=tok)
    bridge.eval()
    return bridge


def _bridge_hooks(bridge: Any, edit: tuple[str, Tensor] | None) -> list[tuple[str, Callable]]:
    """TransformerLens forward hooks ``(name, fn(tensor, hook) -> tensor)`` making ``edit``."""
    if edit is None:
        return []
    kind, value = edit
    hooks: list[tuple[str, Callable]] = []
    if kind == "add":
        for l in range(bridge.cfg.n_layers):
            v = _Like(value[l])
            hooks.append((f"blocks.{l}.hook_resid_pre", lambda x, hook, v=v: x + v(x)))
    else:
        r = _Like(value)

        def ablate(x: Tensor, hook: Any) -> Tensor:
            return _project_out(x, r(x))

        for l in range(bridge.cfg.n_layers):
            for site in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out"):
                hooks.append((f"blocks.{l}.{site}", ablate))
    return hooks


_CACHE_WORKS: dict[int, bool] = {}


def bridge_cache_works(bridge: Any) -> bool:
    """Whether the bridge's KV cache gives its own tokens (checked once per bridge, with no hooks)."""
    from steering.kvcache import kv_cache_works

    key = id(bridge)
    if key not in _CACHE_WORKS:
        _CACHE_WORKS[key] = kv_cache_works(bridge.original_model)
    return _CACHE_WORKS[key]


@torch.no_grad()
def bridge_generate(bridge: Any, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                    edit: Any = None) -> Tensor:
    """Greedy generation through the bridge's own loop; returns the new ids ``[batch, max_new_tokens]``.

    ``with bridge.hooks(fwd_hooks=...): bridge.generate(input_ids, attention_mask=..., do_sample=False,
    stop_at_eos=False, use_past_kv_cache=True, return_type="tokens")``. The hooks sit on the
    bridge's hook points ``blocks.{l}.hook_resid_pre`` (the block's input), ``blocks.{l}.hook_attn_out``
    (the attention block's output, before the residual add) and ``blocks.{l}.hook_mlp_out``.

    KV cache: ON where it works (:func:`bridge_cache_works`), else OFF. TransformerLens 4.3's
    attention reads the cache as ``past_key_values`` while transformers 5.24 passes it as ``cache``,
    so with those versions the cached loop decodes garbage and the bridge decodes without the cache
    (each step a forward over the whole sequence; the benchmarks say which ran). With the cache,
    ``generate`` runs the prompt once, keeps HF's own cache (``_capture_hf_cache``)
    and feeds one token per step; verified by recording the sequence length the hooks see
    (``[batch, prompt_len, d]`` once, then ``[batch, 1, d]`` per step) and the embedding's input
    shapes (tests/test_bench_rivals.py). Left padding: correct when the mask is passed as
    ``attention_mask=`` (the bridge extends it per step and derives position ids from it; without
    it, a padded tensor is generated as if the pads were real tokens). ``stop_at_eos=False`` makes
    EOS an ordinary token, so exactly ``max_new_tokens`` come out.
    """
    edit = _check_edit(edit, bridge.cfg.n_layers, bridge.cfg.d_model)
    with bridge.hooks(fwd_hooks=_bridge_hooks(bridge, edit)):
        out = bridge.generate(input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                              do_sample=False, stop_at_eos=False, use_past_kv_cache=bridge_cache_works(bridge),
                              verbose=False, return_type="tokens")
    return out[:, input_ids.shape[1]:]


@torch.no_grad()
def bridge_record_means(bridge: Any, batches: Iterable[Mapping[str, Tensor]]) -> Tensor:
    """``[n_layers, d_model]`` float64 mean, over every prompt, of the last real token's residual
    stream entering each layer, the TransformerLens way: ``bridge.run_with_cache(input_ids,
    attention_mask=..., names_filter=[blocks.{l}.hook_resid_pre ...])``, then the last real token of
    each row (read off the mask; with left padding, the last column). Any ``position_ids`` in a
    batch are ignored: the bridge derives them from the mask itself.
    """
    n, d = bridge.cfg.n_layers, bridge.cfg.d_model
    names = [f"blocks.{l}.hook_resid_pre" for l in range(n)]
    total = torch.zeros(n, d, dtype=torch.float64)
    count = 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=names)
        rows = torch.arange(ids.shape[0])
        last = _last_real(mask)
        for l, name in enumerate(names):
            act = cache[name]
            total[l] += act[rows.to(act.device), last.to(act.device)].double().sum(0).cpu()
        count += ids.shape[0]
    return total / max(count, 1)


# --- nnsight -------------------------------------------------------------------------------------
def nnsight_of(hf_model: Any, tokenizer: Any) -> nnsight.LanguageModel:
    """Wrap ``hf_model`` (already in memory) as an ``nnsight.LanguageModel``.

    nnsight 0.8 quirks: ``LanguageModel`` is a deprecated name for ``TransformersModel(...,
    task="text-generation")`` and warns on construction (silenced here; the object is both); a
    pre-loaded module is wrapped in a transformers ``pipeline`` without touching the hub. The
    wrapper registers its hooks on every module of ``hf_model`` (inert outside a trace) and sets its
    tokenizer to left padding, so it gets a copy of ``tokenizer`` and should get its own copy of
    the model.
    """
    from nnsight import LanguageModel, NNsightDeprecationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NNsightDeprecationWarning)
        return LanguageModel(hf_model, tokenizer=copy.deepcopy(tokenizer))


def _nnsight_sites(lm: Any) -> tuple[Any, str, str]:
    """The layer list envoy and the attention / MLP write paths inside a layer (steering's map)."""
    from steering.arch import resolve_spec

    spec = resolve_spec(lm.pipeline.model)
    if spec.post_norm or not (spec.layers and spec.attn_write and spec.mlp_write):
        raise NotImplementedError(f"{spec.name}: the nnsight adapter handles pre-norm models with attention and MLP writes")
    return lm.get(spec.layers), spec.attn_write, spec.mlp_write


def nnsight_generate(lm: Any, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                     edit: Any = None) -> Tensor:
    """Greedy generation traced by nnsight; returns the new ids ``[batch, max_new_tokens]``.

    ``with lm.generate({"input_ids", "attention_mask"}, max_new_tokens=N, do_sample=False,
    eos_token_id=None, use_cache=True) as tracer: for step in tracer.iter[:N]: ...`` — one pass of
    the loop per forward call of HF's ``generate`` (the prompt, then N - 1 one-token steps), each
    rewriting ``layers[l].input`` (resid_pre), ``layers[l].self_attn.output[0]`` (attn_out) and
    ``layers[l].mlp.output`` (mlp_out), in execution order. The ids come from ``tracer.result``.

    KV cache: ON — it is HF's ``generate`` with ``use_cache=True``; verified by the embedding's
    input shapes (``[batch, prompt_len]`` then ``[batch, 1]`` per step, tests/test_bench_rivals.py).
    Left padding: correct — nnsight passes the mask through and adds mask-derived ``position_ids``
    for a left-padded batch, which HF's ``generate`` extends per step. ``eos_token_id=None`` makes
    EOS an ordinary token (``min_new_tokens`` would instead forbid it and change the tokens), so
    exactly ``max_new_tokens`` come out and ``tracer.iter[:N]`` never waits for a step that does
    not come. nnsight 0.8 runs the ``with`` body from its source in a worker greenlet and has it
    wait at each module it asks for, so the body must read sites in the order the model runs them.
    """
    layers, attn_path, mlp_path = _nnsight_sites(lm)
    n_layers = len(layers)
    d_model = lm.pipeline.model.get_input_embeddings().weight.shape[-1]
    edit = _check_edit(edit, n_layers, d_model)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer is not None else None
    kind = None if edit is None else edit[0]
    value = None if edit is None else _Like(edit[1])
    with lm.generate({"input_ids": input_ids, "attention_mask": attention_mask}, max_new_tokens=max_new_tokens,
                     do_sample=False, eos_token_id=None, pad_token_id=pad, use_cache=True) as tracer:
        if kind == "add":
            for step in tracer.iter[:max_new_tokens]:
                for l in range(n_layers):
                    layer = layers[l]
                    x = layer.input
                    layer.input = x + value(x)[l]
        elif kind == "ablate":
            for step in tracer.iter[:max_new_tokens]:
                for l in range(n_layers):
                    layer = layers[l]
                    x = layer.input
                    r = value(x)
                    layer.input = _project_out(x, r)
                    attn = layer.get(attn_path)
                    attn.output = _project_first(attn.output, r)
                    mlp = layer.get(mlp_path)
                    mlp.output = _project_first(mlp.output, r)
        ids = tracer.result.save()
    return ids[:, input_ids.shape[1]:]
