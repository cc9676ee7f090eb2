"""One hook mechanism for every site of every layer.

Sites (``SITES``), for layer i, are the residual stream as it enters the layer (``resid_pre``),
between attention and MLP (``resid_mid``, where the block is sequential), as it leaves
(``resid_post``), and what attention and the MLP add to it (``attn_out``, ``mlp_out``: the very
tensors added, after any post-norm).

A hook function is ``fn(x, ctx) -> Tensor | None``: ``x`` is ``[batch, seq, d_model]`` (for a
decode step under the KV cache, ``seq`` is 1) and ``ctx`` a :class:`HookContext`. Returning a
tensor replaces the activation; returning ``None`` leaves it alone. Hooks must not write into
``x`` in place: another hook or a recording may hold it.

``attach(model, {(site, layer): fn, ...})`` is a context manager. Its handle list exists before
the ``try`` so that a failure half-way through set-up still removes what was added; nested
contexts remove only their own hooks; parameters and buffers are never touched, so the model
leaves the block bit-identical whatever happens inside it.

Threads. PyTorch module hooks are global to the module, so every hook ``attach`` registers
(including the root pre-hook that fills the :class:`ForwardState`) is scoped to the thread that
attached it: it first compares ``threading.get_ident()`` with that thread's id and, in any other
thread, does nothing. A forward pass therefore sees exactly the hooks its own thread has attached:
two threads may each run a different edit on one model at once (on one ``hf`` module, however
many :class:`steering.Model` objects wrap it) and each gets its own edit's outputs, a plain
forward in another thread is unaffected, and nested contexts in one thread stack as before. The
other side of this: a forward run in a thread other than the one that attached (a worker thread
that runs ``generate`` for a streamer, ``nn.DataParallel`` replicas) does not see the hooks, so
attach inside the thread that runs the forward. The scope is the thread, not an asyncio task.
Each context has its own ``ForwardState``; hook functions that keep state of their own should
keep it per context too (the edits build theirs per ``.hooks`` call). This covers the hooks only:
whether a model's forward may run in several threads at once is up to the model.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .arch import ModelMap
from .kvcache import cache_in

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")

HookFn = Callable[[Tensor, "HookContext"], "Tensor | None"]

_get_ident = threading.get_ident


@dataclass
class ForwardState:
    """What the current forward call is: filled by a pre-hook on the root model."""

    attention_mask: Tensor | None = None  # [batch, past + seq], 1 for real tokens
    past_len: int = 0  # tokens already in the KV cache
    seq_len: int = 0  # tokens in this call
    batch: int = 0
    thread: int = 0  # threading.get_ident() of the thread that attached: the hooks act only on its calls


@dataclass
class HookContext:
    site: str
    layer: int
    state: ForwardState

    @property
    def attention_mask(self) -> Tensor | None:
        return self.state.attention_mask

    @property
    def past_len(self) -> int:
        return self.state.past_len

    def positions(self) -> Tensor:
        """Absolute positions (0 = first token of the padded sequence) of this call's tokens."""
        return torch.arange(self.state.past_len, self.state.past_len + self.state.seq_len)

    def last_token(self, like: Tensor) -> Tensor:
        """[batch] index, in this call's sequence, of each row's last real token (left or right padding)."""
        return last_real_index(self.state.attention_mask, like.shape[0], like.shape[1]).to(like.device)

    def token_mask(self, like: Tensor) -> Tensor:
        """[batch, seq, 1] mask of this call's real (non-padding) tokens, on ``like``'s device and dtype."""
        mask = self.state.attention_mask
        if mask is None:
            return torch.ones(like.shape[0], like.shape[1], 1, device=like.device, dtype=like.dtype)
        return mask[:, -like.shape[1]:].to(device=like.device, dtype=like.dtype).unsqueeze(-1)


def last_real_index(mask: Tensor | None, batch: int, seq: int) -> Tensor:
    """[batch] index of each row's last real token: the last 1 of ``mask`` ([batch, seq]), or seq - 1."""
    if mask is None:
        return torch.full((batch,), seq - 1)
    cols = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask.bool(), cols, -1).max(-1).values - (mask.shape[1] - seq)


def _cache_len(past: Any) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:  # legacy tuple cache
        return int(past[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def _root_pre_hook(state: ForwardState) -> Callable:
    owner = state.thread

    # kwargs has a default: a forward in another thread that races with this hook's registration or
    # removal can see the hook without its with_kwargs flag and call it with (module, args) alone.
    def hook(module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        if _get_ident() != owner:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        state.batch, state.seq_len = (int(ref.shape[0]), int(ref.shape[1])) if ref is not None else (0, 0)
        state.past_len = _cache_len(cache_in(kwargs))
        state.attention_mask = kwargs.get("attention_mask")
    return hook


def _first(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def _replace_first(out: Any, new: Tensor) -> Any:
    if isinstance(out, Tensor):
        return new
    return (new, *out[1:]) if isinstance(out, tuple) else type(out)([new, *out[1:]])


def _call(fn: HookFn, x: Tensor, ctx: HookContext) -> Tensor | None:
    """Call ``fn`` on ``[batch, seq, d]``, also where a model flattens tokens to ``[batch*seq, d]`` (OPT)."""
    if x.ndim != 2:
        return fn(x, ctx)
    new = fn(x.view(ctx.state.batch, -1, x.shape[-1]), ctx)
    return None if new is None else new.reshape(x.shape)


def _input_hook(fn: HookFn, ctx: HookContext) -> Callable:
    """Forward pre-hook that passes the module's first input (positional or ``hidden_states``)."""
    owner = ctx.state.thread

    def hook(module: nn.Module, args: tuple, kwargs: dict | None = None) -> Any:  # default: see _root_pre_hook
        if _get_ident() != owner:
            return None
        if args:
            new = _call(fn, args[0], ctx)
            return None if new is None else ((new, *args[1:]), kwargs)
        if "hidden_states" not in kwargs:
            raise RuntimeError(f"{ctx.site} hook on layer {ctx.layer}: {type(module).__name__} got no hidden_states input")
        new = _call(fn, kwargs["hidden_states"], ctx)
        return None if new is None else (args, {**kwargs, "hidden_states": new})
    return hook


def _output_hook(fn: HookFn, ctx: HookContext) -> Callable:
    owner = ctx.state.thread

    def hook(module: nn.Module, args: tuple, out: Any) -> Any:
        if _get_ident() != owner:
            return None
        new = _call(fn, _first(out), ctx)
        return None if new is None else _replace_first(out, new)
    return hook


def _register(mmap: ModelMap, site: str, layer: int, fn: HookFn, state: ForwardState,
              handles: list[RemovableHandle]) -> None:
    mmap.check_layer(layer)
    ctx = HookContext(site, layer, state)
    if site == "resid_pre":
        handles.append(mmap.layers[layer].register_forward_pre_hook(_input_hook(fn, ctx), with_kwargs=True))
    elif site == "resid_post":
        handles.append(mmap.layers[layer].register_forward_hook(_output_hook(fn, ctx)))
    elif site == "attn_out":
        handles.append(mmap.sublayer(layer, "attn_write").register_forward_hook(_output_hook(fn, ctx)))
    elif site == "mlp_out":
        handles.append(mmap.sublayer(layer, "mlp_write").register_forward_hook(_output_hook(fn, ctx)))
    elif site == "resid_mid":
        # No module boundary carries resid_mid itself: the MLP reads it (through its norm) and the
        # layer adds it to the MLP's output. An edit therefore replaces the MLP's input and adds
        # the same change to the MLP's write, so the stream leaving the layer sees it too.
        reader = mmap.sublayer(layer, "resid_mid_input")
        writer = mmap.sublayer(layer, "mlp_write")
        delta: dict[str, Tensor | None] = {"d": None}

        def mid(x: Tensor, c: HookContext) -> Tensor | None:
            new = fn(x, c)
            delta["d"] = None if new is None else new - x
            return new

        def add(x: Tensor, c: HookContext) -> Tensor | None:
            d, delta["d"] = delta["d"], None
            return None if d is None else x + d.to(x.device)

        handles.append(reader.register_forward_pre_hook(_input_hook(mid, ctx), with_kwargs=True))
        handles.append(writer.register_forward_hook(_output_hook(add, ctx)))
    else:
        raise ValueError(f"unknown hook site {site!r}; sites are {SITES}")


def parse_key(key: Any) -> tuple[str, int]:
    """Accept ``("resid_pre", 3)`` or ``"resid_pre.3"``."""
    if isinstance(key, str):
        site, _, layer = key.rpartition(".")
        if not site or not layer.lstrip("-").isdigit():
            raise ValueError(f"hook key {key!r} must look like 'resid_pre.3' or ('resid_pre', 3)")
        return site, int(layer)
    site, layer = key
    return str(site), int(layer)


@contextlib.contextmanager
def attach(model: Any, hooks: Mapping[Any, HookFn] | list[tuple[Any, HookFn]]) -> Iterator[ForwardState]:
    """Run ``model`` with ``hooks`` attached; remove exactly these hooks on exit, whatever happens.

    ``model`` is a :class:`steering.Model` (``steering.load`` makes one of anything). Keys are
    ``(site, layer)`` pairs (negative layers count from the end) or ``"site.layer"`` strings.
    Several functions may share a key: pass a list of pairs. The hooks act only on forward calls
    made in the calling thread (see the module docstring).
    """
    sm = model
    if not (hasattr(sm, "map") and hasattr(sm, "hf")):
        raise TypeError(f"attach: expected a steering.Model (steering.load(...) makes one from any model), "
                        f"got {type(model).__name__}")
    mmap = sm.map
    items = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
    state = ForwardState(thread=_get_ident())
    handles: list[RemovableHandle] = []
    try:
        handles.append(sm.hf.register_forward_pre_hook(_root_pre_hook(state), with_kwargs=True))
        for key, fn in items:
            site, layer = parse_key(key)
            if layer < 0:
                layer += mmap.n_layers
            _register(mmap, site, layer, fn, state, handles)
        yield state
    finally:
        for handle in reversed(handles):
            handle.remove()
