"""Steering vectors and direction candidates: small immutable values with provenance and files.

A :class:`SteeringVector` holds one ``[d_model]`` tensor per layer, the site it was read at and
where it belongs, and a provenance dict (``str -> str``) that travels into every file it is
written to. Vectors support ``v1 - v2``, ``2 * v``, ``-v`` and ``v / 2``.

Files: ``save``/``load`` write safetensors (tensors ``layer.N``, provenance in the metadata);
``to_gguf``/``from_gguf`` write llama.cpp's control-vector GGUF (tensors ``direction.N``), so a
vector runs in ``llama-cli --control-vector``. llama.cpp adds ``direction.N`` to the output of its
(0-based) block N, which is our ``resid_post`` of layer N = ``resid_pre`` of layer N + 1, and never
reads ``direction.0``; the conversion shifts indices accordingly and refuses a vector llama.cpp
cannot place (``resid_pre`` of layers 0 and 1, ``resid_post`` of layer 0).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from .io import atomic_write, check_finite, read_safetensors

FORMAT = "steering.vector"


def prompts_hash(prompts: Iterable[str]) -> str:
    """A short, order-sensitive hash of a prompt set, for provenance."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """Per-layer vectors: ``directions[layer]`` is ``[d_model]`` float32 on the CPU."""

    directions: Mapping[int, Tensor]
    site: str = "resid_pre"
    meta: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.directions:
            raise ValueError("SteeringVector: no layers")
        dims = {tuple(v.shape) for v in self.directions.values()}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise ValueError(f"SteeringVector: every layer needs one [d_model] vector, got shapes {sorted(dims)}")
        object.__setattr__(self, "directions", {int(k): v.detach().float().cpu() for k, v in sorted(self.directions.items())})
        object.__setattr__(self, "meta", {str(k): str(v) for k, v in self.meta.items()})

    # --- shape and arithmetic --------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])

    def __getitem__(self, layer: int) -> Tensor:
        return self.directions[layer]

    def _combine(self, other: "SteeringVector", sign: float, op: str) -> "SteeringVector":
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.site != self.site:
            raise ValueError(f"cannot combine vectors read at different sites ({self.site} {op} {other.site})")
        layers = sorted(set(self.directions) | set(other.directions))
        zero = torch.zeros(self.d_model)
        dirs = {l: self.directions.get(l, zero) + sign * other.directions.get(l, zero) for l in layers}
        return SteeringVector(dirs, self.site, {"method": f"({self.meta.get('method', '?')}) {op} ({other.meta.get('method', '?')})"})

    def __add__(self, other: "SteeringVector") -> "SteeringVector":
        return self._combine(other, 1.0, "+")

    def __sub__(self, other: "SteeringVector") -> "SteeringVector":
        return self._combine(other, -1.0, "-")

    def __mul__(self, scale: float) -> "SteeringVector":
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return replace(self, directions={l: v * scale for l, v in self.directions.items()},
                       meta={**self.meta, "scale": str(float(self.meta.get("scale", 1.0)) * scale)})

    __rmul__ = __mul__

    def __neg__(self) -> "SteeringVector":
        return self * -1.0

    def __truediv__(self, scale: float) -> "SteeringVector":
        return self * (1.0 / scale)

    def normalized(self) -> "SteeringVector":
        """Each layer's vector scaled to unit norm."""
        return replace(self, directions={l: v / v.norm().clamp(min=1e-12) for l, v in self.directions.items()})

    def only(self, layers: Iterable[int]) -> "SteeringVector":
        keep = list(layers)
        missing = [l for l in keep if l not in self.directions]
        if missing:
            raise KeyError(f"layers {missing} are not in this vector (it has {self.layers})")
        return replace(self, directions={l: self.directions[l] for l in keep})

    # --- files -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        # A copy of each: layers may hold one tensor (``{1: v, 2: v}``) or views of one storage, which
        # safetensors refuses to write ("tensors share memory"); the copies load back equal, one per layer.
        tensors = {f"layer.{l}": v.clone(memory_format=torch.contiguous_format) for l, v in self.directions.items()}
        meta = {"format": FORMAT, "site": self.site, "provenance": json.dumps(dict(self.meta), sort_keys=True)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SteeringVector":
        meta, tensors = read_safetensors(path, FORMAT, "vector")
        check_finite(tensors, str(path))
        dirs = {int(k.split(".", 1)[1]): v for k, v in tensors.items()}
        return cls(dirs, meta.get("site", "resid_pre"), json.loads(meta.get("provenance", "{}")))

    def to_gguf(self, path: str | os.PathLike, model_hint: str = "llama") -> None:
        """Write llama.cpp's control-vector GGUF (see the module docstring for the layer shift)."""
        import gguf
        import numpy as np

        shift = {"resid_pre": -1, "resid_post": 0}.get(self.site)
        if shift is None:
            raise ValueError(f"to_gguf: llama.cpp adds control vectors to the residual stream; this vector is at {self.site!r}")
        unplaceable = [l for l, v in self.directions.items() if l + shift < 1 and bool(v.any())]
        if unplaceable:
            raise ValueError(f"to_gguf: llama.cpp has no control-vector slot for {self.site} of layer(s) {unplaceable} "
                             "(it adds direction.N after block N, for N >= 1)")

        def write(tmp: str) -> None:
            writer = gguf.GGUFWriter(tmp, "controlvector")
            writer.add_string("controlvector.model_hint", model_hint)
            writer.add_uint32("controlvector.layer_count", len(self.directions))
            for layer, vec in self.directions.items():
                if layer + shift >= 1:
                    writer.add_tensor(f"direction.{layer + shift}", vec.numpy().astype(np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()

        atomic_write(path, write)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, site: str = "resid_pre") -> "SteeringVector":
        import gguf

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        shift = {"resid_pre": 1, "resid_post": 0}.get(site)
        if shift is None:
            raise ValueError(f"from_gguf: site must be resid_pre or resid_post, not {site!r}")
        reader = gguf.GGUFReader(str(path))
        dirs = {}
        for t in reader.tensors:
            if t.name.startswith("direction."):
                dirs[int(t.name.split(".")[1]) + shift] = torch.from_numpy(t.data.copy()).float().reshape(-1)
        if not dirs:
            raise ValueError(f"{path}: no direction.N tensors; not a control-vector GGUF")
        hint = reader.fields.get("controlvector.model_hint")
        meta = {"source": str(path)}
        if hint is not None:
            meta["model_hint"] = bytes(hint.parts[hint.data[0]]).decode()
        return cls(dirs, site, meta)


@dataclass(frozen=True, eq=False)
class Candidates:
    """Difference-in-means candidates ``vectors[layer, position]`` (``[n_layers, n_positions, d]``).

    ``positions`` are offsets from the end of the prompt (-1 = last token).
    """

    vectors: Tensor
    positions: tuple[int, ...]
    site: str = "resid_pre"
    meta: Mapping[str, str] = field(default_factory=dict)

    def direction(self, layer: int, position: int) -> Tensor:
        """The candidate read at ``layer`` and position offset ``position`` (e.g. -1)."""
        if position not in self.positions:
            raise KeyError(f"position {position} is not a candidate position; candidates are at {self.positions}")
        return self.vectors[layer, self.positions.index(position)]

    def vector(self, layer: int, position: int) -> SteeringVector:
        """That candidate as a one-layer :class:`SteeringVector` (to add at ``layer``)."""
        return SteeringVector({layer: self.direction(layer, position)}, self.site,
                              {**self.meta, "layer": str(layer), "position": str(position)})

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        meta = {"format": "steering.candidates", "site": self.site, "positions": json.dumps(list(self.positions)),
                "provenance": json.dumps(dict(self.meta), sort_keys=True)}
        atomic_write(path, lambda tmp: save_file({"vectors": self.vectors.contiguous().float()}, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Candidates":
        meta, tensors = read_safetensors(path, "steering.candidates", "candidates")
        check_finite(tensors, str(path))
        vectors = tensors["vectors"]
        return cls(vectors, tuple(json.loads(meta["positions"])), meta.get("site", "resid_pre"),
                   json.loads(meta.get("provenance", "{}")))
