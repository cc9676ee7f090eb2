"""What every edit shares: the :class:`Edit` base (hooks, bake, save), the registry that
:func:`steering.edits.load_edit` reads files through, and small helpers the edits use (finite
checks, a per-device tensor cache, layer lists, copying a model, untying embeddings, adding a
bias). Subclassing :class:`Edit` with a ``kind`` and a ``from_parts`` classmethod registers the
kind, so a file of a new edit loads with ``load_edit`` like the built-in ones."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..hooks import attach
from ..io import atomic_write, check_finite, read_safetensors
from ..model import Model, as_model

FORMAT = "steering.edit"
HookList = list[tuple[tuple[str, int], Callable]]

KINDS: dict[str, type["Edit"]] = {}  # kind -> class, filled by subclassing Edit


def finite(t: Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} holds NaN or infinite values")


def finite_number(x: float, what: str) -> None:
    if not math.isfinite(float(x)):
        raise ValueError(f"{what} is {x}, not a finite number")


class Cast:
    """A tensor moved to each device / dtype it is asked for once, then reused (hot path)."""

    def __init__(self, t: Tensor) -> None:
        self.t = t
        self.cache: dict[tuple, Tensor] = {}

    def like(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in self.cache:
            self.cache[key] = self.t.to(device=x.device, dtype=x.dtype)
        return self.cache[key]


def orthonormal(basis: Tensor) -> Tensor:
    """Rows spanning the same subspace, orthonormal (QR in float64); zero rows are an error."""
    b = basis.detach().double().reshape(-1, basis.shape[-1])
    if bool((b.norm(dim=-1) < 1e-12).any()):
        raise ValueError("ablation basis has a zero vector")
    if bool(((b @ b.T - torch.eye(b.shape[0], dtype=b.dtype)).abs() < 1e-6).all()):
        return basis.detach().float().reshape(b.shape).clone()  # already orthonormal: keep it to the bit
    q, r = torch.linalg.qr(b.T)
    diag = r.diagonal()
    keep = diag.abs() > 1e-8 * diag.abs().max()
    return (q.T * torch.sign(diag)[:, None])[keep].float()  # each vector keeps its input's sign


class Edit:
    """Base class: subclasses give ``_hooks(model)`` and ``_tensors()`` / ``_params()``."""

    kind: ClassVar[str] = "edit"

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "kind" in cls.__dict__:
            KINDS[cls.kind] = cls

    @classmethod
    def from_parts(cls, params: dict[str, Any], tensors: dict[str, Tensor]) -> "Edit":
        """The edit a file's ``params`` (metadata) and ``tensors`` describe (the inverse of
        ``_params`` / ``_tensors``)."""
        raise NotImplementedError(f"{cls.__name__} cannot be read from a file")

    def _hooks(self, model: Model) -> HookList:
        raise NotImplementedError

    @contextlib.contextmanager
    def hooks(self, model: Any) -> Iterator[Model]:
        """Run ``model`` with this edit; yields the :class:`steering.Model`."""
        sm = as_model(model)
        with attach(sm, self._hooks(sm)):
            yield sm

    def bake(self, model: Any, inplace: bool = False) -> Model:
        raise NotImplementedError(f"{type(self).__name__} has no exact weight form; use .hooks(model)")

    def hook_points(self, model: Any) -> list[tuple[str, int]]:
        """The (site, layer) points this edit hooks on ``model``, in order."""
        return [k for k, _ in self._hooks(as_model(model))]

    def fingerprint(self) -> str:
        """A hash of what the edit's file holds (its kind, parameters and tensors)."""
        import hashlib

        h = hashlib.sha256(f"{self.kind}{json.dumps(self._params(), sort_keys=True, default=str)}".encode())
        for k, v in sorted(self._tensors().items()):
            h.update(k.encode() + v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # --- files -------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().float().contiguous() for k, v in self._tensors().items()}
        meta = {"format": FORMAT, "kind": self.kind, "params": json.dumps(self._params(), sort_keys=True)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))



def from_parts(kind: str, params: dict[str, Any], tensors: dict[str, Tensor]) -> Edit:
    """The edit of registered ``kind`` built from a file's parts."""
    if kind not in KINDS:
        raise ValueError(f"unknown edit kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    return KINDS[kind].from_parts(params, tensors)


def layers_of(model: Model, layers: Iterable[int] | None) -> list[int]:
    """Layer indices (negative ones count from the end), checked."""
    n = model.n_layers
    if layers is None:
        return list(range(n))
    out = [l + n if l < 0 else l for l in layers]
    for l in out:
        model.map.check_layer(l)
    return out


def copy_model(model: Model) -> Model:
    return Model(copy.deepcopy(model.hf), model.tokenizer, model.arch, model.source)


def untie_embeddings(model: Model) -> None:
    """Give the unembedding its own weight, so editing the embedding leaves the logits' matrix alone."""
    head = model.hf.get_output_embeddings()
    emb = model.hf.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
        model.hf.config.tie_word_embeddings = False
        if hasattr(model.hf.config, "get_text_config"):
            model.hf.config.get_text_config().tie_word_embeddings = False



def add_bias(module: nn.Module, delta: Tensor) -> None:
    """Add ``delta`` to a Linear / Conv1D's bias, creating a zero bias if it has none."""
    weight = module.weight
    d_out = weight.shape[0] if type(module).__name__ != "Conv1D" else weight.shape[1]
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(torch.zeros(d_out, dtype=weight.dtype, device=weight.device))
    module.bias.add_(delta.to(module.bias))



@dataclass(frozen=True, eq=False)
class Compose(Edit):
    """Several edits at once (hooks in order; bake applies each in turn)."""

    edits: tuple[Edit, ...]
    kind = "compose"

    @classmethod
    def from_parts(cls, params: dict[str, Any], tensors: dict[str, Tensor]) -> "Compose":
        parts = []
        for i, (kind, p) in enumerate(zip(params["kinds"], params["params"])):
            prefix = f"{i}."
            parts.append(from_parts(kind, p, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}))
        return cls(tuple(parts))

    def _tensors(self) -> dict[str, Tensor]:
        return {f"{i}.{k}": v for i, e in enumerate(self.edits) for k, v in e._tensors().items()}

    def _params(self) -> dict[str, Any]:
        return {"kinds": [e.kind for e in self.edits], "params": [e._params() for e in self.edits]}

    def _hooks(self, model: Model) -> HookList:
        return [h for e in self.edits for h in e._hooks(model)]

    def bake(self, model: Any, inplace: bool = False) -> Model:
        sm = as_model(model) if inplace else copy_model(as_model(model))
        for e in self.edits:
            sm = e.bake(sm, inplace=True)
        return sm


def combine(edits: Iterable[Edit | None]) -> Edit | None:
    """The edits given (``None`` left out) as one: ``None``, the edit itself, or their :class:`Compose`."""
    es = tuple(e for e in edits if e is not None)
    return None if not es else es[0] if len(es) == 1 else Compose(es)



def load_edit(path: str | os.PathLike) -> Edit:
    """Read an edit written by ``edit.save(path)``."""
    meta, tensors = read_safetensors(path, FORMAT, "edit")
    check_finite(tensors, str(path))
    try:
        params = json.loads(meta["params"])
        edit = from_parts(meta["kind"], params, tensors)
    except KeyError as e:
        raise ValueError(f"{path}: the edit file lacks {e.args[0]!r} (metadata or tensor); not an edit steering wrote") from None
    except (TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the edit file's metadata is malformed ({e})") from None
    for name in ("scale", "beta", "threshold"):
        value = params.get(name) if isinstance(params, dict) else None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{path}: the edit's {name} is {value}, not a finite number")
    return edit
