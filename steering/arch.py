"""Where a causal LM keeps the pieces steering needs: one table, kept as data.

``architectures.json`` maps a ``config.model_type`` to module paths (see its ``_doc``). A family
that is not in the table gets a generic fallback that finds the decoder layers by shape and the
sublayers by common names; a user can pass their own entry (``steering.load(..., arch={...})``).
Anything that cannot be found raises :class:`ArchitectureError` naming the piece; nothing is
skipped silently.

A TransformerLens ``TransformerBridge`` wraps every HF module in a bridge component that keeps the
original as ``_original_component``; paths are resolved through those wrappers to the HF modules,
so one hook mechanism serves both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from functools import lru_cache
from importlib import resources
from typing import Any, Iterator, Literal, NamedTuple

import torch
from torch import nn

Layout = Literal["out_in", "in_out", "experts_out_in"]
LAYOUTS = ("out_in", "in_out", "experts_out_in")


class ArchitectureError(ValueError):
    """A piece of the model that steering needs could not be found."""


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one model family. Root paths start at the CausalLM; the rest at a layer."""

    embed: str | None = None
    layers: str | None = None
    final_norm: str | None = None
    unembed: str | None = None
    pos_embed: str | None = None
    attn_write: str | None = None
    mlp_write: str | None = None
    attn_weights: tuple[tuple[str, Layout], ...] = ()
    mlp_weights: tuple[tuple[str, Layout], ...] = ()
    resid_mid_input: str | None = None
    parallel_if: str | None = None
    post_norm: bool = False
    name: str = "generic"

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str = "custom") -> "ArchSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"like", "_doc"})
        if unknown:
            raise ArchitectureError(f"architecture entry {name!r}: unknown key(s) {unknown}; known: {sorted(known)}")
        data = dict(data)
        for key in ("attn_weights", "mlp_weights"):
            pairs = []
            for item in data.get(key, ()):
                if len(item) != 2 or item[1] not in LAYOUTS:
                    raise ArchitectureError(f"architecture entry {name!r}: {key} item {item!r} must be [path, one of {LAYOUTS}]")
                pairs.append((str(item[0]), item[1]))
            data[key] = tuple(pairs)
        data.pop("like", None)
        data.pop("_doc", None)
        return cls(name=data.pop("name", name), **data)


@lru_cache(maxsize=1)
def _table() -> dict[str, dict[str, Any]]:
    return json.loads(resources.files("steering").joinpath("architectures.json").read_text())


def known_architectures() -> list[str]:
    return sorted(k for k in _table() if not k.startswith("_"))


def _entry(model_type: str) -> dict[str, Any] | None:
    table = _table()
    if model_type not in table:
        return None
    entry = dict(table[model_type])
    seen = {model_type}
    while "like" in entry:
        parent = entry.pop("like")
        if parent in seen or parent not in table:
            raise ArchitectureError(f"architectures.json: entry {model_type!r} has a bad 'like' chain at {parent!r}")
        seen.add(parent)
        entry = {**table[parent], **entry}
    return entry


def unwrap(module: nn.Module) -> nn.Module:
    """The HF module inside any TransformerLens bridge wrappers."""
    while "_original_component" in module._modules:
        module = module._modules["_original_component"]
    return module


def get_path(root: nn.Module, path: str, what: str, outer: bool = False) -> nn.Module | nn.Parameter:
    """Follow ``path`` from ``root`` through any bridge wrappers to the HF module (or parameter).

    ``outer=True`` returns the outermost wrapper of the last module instead: the module whose
    forward actually runs, which is where hooks belong (a bridge may re-implement attention
    around the HF module without calling the HF module's own forward).
    """
    obj: Any = unwrap(root)
    parts = path.split(".")
    for i, part in enumerate(parts):
        nxt = getattr(obj, part, None)
        if nxt is None:
            raise ArchitectureError(
                f"{what}: {type(unwrap(root)).__name__} has no {path!r} (missing {part!r}); "
                "pass arch={...} to steering.load to say where it is")
        last = i == len(parts) - 1
        obj = unwrap(nxt) if isinstance(nxt, nn.Module) and not (outer and last) else nxt
    return obj


_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_ATTN_OUT = ("o_proj", "out_proj", "c_proj", "dense", "wo")
_MLP_OUT = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "wo")
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")


def _generic(model: nn.Module) -> dict[str, Any]:
    """Guess paths for a family not in the table; leave out what cannot be found."""
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    names = {id(unwrap(m)): n for n, m in model.named_modules()}
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and (n_layers is None or len(m) == n_layers) and "_original_component" not in n]
    out: dict[str, Any] = {}
    if lists:
        path, layers = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
        out["layers"] = path
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        for nm in _NORM_NAMES:
            if hasattr(get_path(model, parent, "layers' parent") if parent else model, nm):
                out["final_norm"] = f"{parent}.{nm}" if parent else nm
                break
        layer = unwrap(layers[0])
        for key, cands, outs, wkey in (("attn_write", _ATTN_NAMES, _ATTN_OUT, "attn_weights"),
                                       ("mlp_write", _MLP_NAMES, _MLP_OUT, "mlp_weights")):
            sub = next((c for c in cands if hasattr(layer, c)), None)
            if sub is None:
                continue
            out[key] = sub
            proj = next((o for o in outs if isinstance(getattr(unwrap(getattr(layer, sub)), o, None), nn.Module)), None)
            if proj is not None:
                mod = unwrap(getattr(unwrap(getattr(layer, sub)), proj))
                layout = "in_out" if type(mod).__name__ == "Conv1D" else "out_in"
                out[wkey] = [[f"{sub}.{proj}", layout]]
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and id(unwrap(emb)) in names:
        out["embed"] = names[id(unwrap(emb))]
    try:
        head = model.get_output_embeddings()
    except Exception:  # some models raise instead of returning None
        head = None
    if head is not None and id(unwrap(head)) in names:
        out["unembed"] = names[id(unwrap(head))]
    return out


def resolve_spec(model: nn.Module, override: dict[str, Any] | ArchSpec | None = None) -> ArchSpec:
    """The ArchSpec for ``model``: table entry (or generic guess), then the user's override on top."""
    if isinstance(override, ArchSpec):
        return override
    model_type = getattr(getattr(model, "config", None), "model_type", None) or "unknown"
    entry = _entry(model_type)
    name = model_type if entry is not None else f"{model_type} (generic)"
    data = entry if entry is not None else _generic(model)
    if override:
        data = {**data, **override}
        name = f"{name} + override"
    return ArchSpec.from_dict(data, name=name)


class StreamWriter(NamedTuple):
    """One weight that writes into the residual stream (see :meth:`ModelMap.stream_writers`)."""

    kind: str  # "embed", "pos_embed", "attn" or "mlp"
    layer: int | None
    owner: nn.Module
    attr: str
    layout: Layout | None  # None for the embeddings (rows of [V, d])

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.owner, self.attr)

    @property
    def bias(self) -> torch.Tensor | None:
        """The owner's bias, where the weight is a module's ``weight`` that has one."""
        b = getattr(self.owner, "bias", None) if self.attr == "weight" and self.layout is not None else None
        return b if isinstance(b, torch.Tensor) else None


@dataclass
class ModelMap:
    """The resolved modules of one loaded model (HF modules, never bridge wrappers)."""

    model: nn.Module
    spec: ArchSpec
    layers: list[nn.Module] = field(init=False)

    def __post_init__(self) -> None:
        if not self.spec.layers:
            raise ArchitectureError(f"cannot find the decoder layers of {type(self.model).__name__} "
                                    f"(model_type {getattr(self.model.config, 'model_type', '?')!r}); pass arch={{'layers': 'path.to.layers'}}")
        layers = get_path(self.model, self.spec.layers, "decoder layers")
        self.layers = [unwrap(m) for m in layers]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        cfg = self.model.config
        for key in ("hidden_size", "n_embd", "d_model"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return int(self.module("embed").weight.shape[1])

    @property
    def parallel(self) -> bool:
        return bool(self.spec.parallel_if and getattr(self.model.config, self.spec.parallel_if, False))

    def module(self, piece: str) -> nn.Module:
        """A root piece: 'embed', 'pos_embed', 'final_norm' or 'unembed'."""
        path = getattr(self.spec, piece)
        if not path:
            raise ArchitectureError(f"{self.spec.name}: {piece!r} is not mapped; pass arch={{{piece!r}: 'path'}} to steering.load")
        return get_path(self.model, path, piece)

    def sublayer(self, layer: int, piece: str) -> nn.Module:
        """A per-layer piece to hook: 'attn_write', 'mlp_write' or 'resid_mid_input' (outermost wrapper)."""
        self.check_layer(layer)
        path = getattr(self.spec, piece)
        if piece == "resid_mid_input" and self.parallel:
            path = None
        if not path:
            raise ArchitectureError(f"{self.spec.name}: {piece!r} does not exist or is not mapped for this model"
                                    + (" (parallel attention and MLP: there is no resid_mid)" if piece == "resid_mid_input" else ""))
        return get_path(self.layers[layer], path, f"layer {layer} {piece}", outer=True)

    def write_weights(self, layer: int, which: str) -> list[tuple[nn.Module, str, Layout]]:
        """(owner module, parameter name, layout) of every weight of 'attn' or 'mlp' that writes into the stream."""
        self.check_layer(layer)
        pairs = getattr(self.spec, f"{which}_weights")
        if not pairs:
            raise ArchitectureError(f"{self.spec.name}: {which} output weights are not mapped; pass arch={{'{which}_weights': [[path, layout]]}}")
        out = []
        for path, layout in pairs:
            owner_path, _, pname = path.rpartition(".")
            target = get_path(self.layers[layer], path, f"layer {layer} {which} output weight")
            if isinstance(target, nn.Module):
                out.append((target, "weight", layout))
            else:
                owner = get_path(self.layers[layer], owner_path, f"layer {layer} {which} output weight") if owner_path else self.layers[layer]
                out.append((owner, pname, layout))
        return out

    def stream_writers(self) -> Iterator[StreamWriter]:
        """Every weight that writes into the residual stream, in one order: the token embedding and
        the learned positions (``kind`` ``"embed"`` / ``"pos_embed"``, rows of ``[V, d]``), then each
        layer's attention and MLP output weights (``"attn"`` / ``"mlp"``, in their ``layout``). The
        one walk that baking, the streamed bake and the PEFT export all follow."""
        for piece in ("embed", "pos_embed"):
            if getattr(self.spec, piece):
                yield StreamWriter(piece, None, self.module(piece), "weight", None)
        for layer in range(self.n_layers):
            for which in ("attn", "mlp"):
                for owner, attr, layout in self.write_weights(layer, which):
                    yield StreamWriter(which, layer, owner, attr, layout)

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} is out of range: the model has {self.n_layers} layers (0..{self.n_layers - 1})")

    def device_of_layer(self, layer: int) -> torch.device:
        return next(self.layers[layer].parameters()).device
