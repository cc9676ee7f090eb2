"""Directional ablation: :class:`Ablation` (project a direction or subspace out of the residual
stream; bakes by orthogonalising every weight that writes into it) and :class:`AffineAblation`
(set the coordinates along it to harmless prompts' mean instead of zero), with the projections
the weight writers share (:func:`project_out`, :func:`project_rows`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from ..arch import ArchitectureError
from ..hooks import HookContext
from ..model import Model, as_model
from .base import Cast, Edit, HookList, add_bias, copy_model, finite, layers_of, orthonormal, untie_embeddings

ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")


@dataclass(frozen=True, eq=False)
class Ablation(Edit):
    """Project the span of ``basis`` (``[d]`` or ``[k, d]``) out of the residual stream everywhere."""

    basis: Tensor
    sites: tuple[str, ...] = ABLATION_SITES
    layers: tuple[int, ...] | None = None
    meta: Mapping[str, str] = field(default_factory=dict)
    kind = "ablation"

    @classmethod
    def from_parts(cls, params: dict[str, Any], tensors: dict[str, Tensor]) -> "Ablation":
        layers = params.get("layers")
        return cls(tensors["basis"], tuple(params["sites"]), None if layers is None else tuple(layers), params.get("meta", {}))

    def __post_init__(self) -> None:
        finite(self.basis, "Ablation: the basis")
        object.__setattr__(self, "basis", orthonormal(self.basis))

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def _hooks(self, model: Model) -> HookList:
        if self.basis.shape[1] != model.d_model:
            raise ValueError(f"ablation basis has d={self.basis.shape[1]}, the model has d_model={model.d_model}")
        q = Cast(self.basis)

        def ablate(x: Tensor, ctx: HookContext) -> Tensor:
            b = q.like(x)
            return x - (x @ b.T) @ b

        return [((s, l), ablate) for l in layers_of(model, self.layers) for s in self.sites]

    def bake(self, model: Any, inplace: bool = False) -> Model:
        """Orthogonalise every write into the residual stream (exact; refuses post-norm families)."""
        sm = as_model(model)
        if sm.map.spec.post_norm:
            raise ArchitectureError(
                f"{sm.map.spec.name}: sublayer outputs are normalised before they join the residual stream, so no "
                "weight edit removes a direction exactly; use Ablation.hooks(model) instead")
        if self.layers is not None or set(self.sites) != set(ABLATION_SITES):
            raise ValueError("Ablation.bake: only the full ablation (every layer, every site) has an exact weight form")
        sm = sm if inplace else copy_model(sm)
        untie_embeddings(sm)
        with torch.no_grad():
            for sw in sm.map.stream_writers():
                w = sw.tensor
                if sw.layout is None:  # an embedding: its rows are stream vectors
                    w.copy_(project_rows(w, self.basis))
                    continue
                w.copy_(project_out(w, self.basis, sw.layout))
                if sw.bias is not None:
                    sw.bias.copy_(project_rows(sw.bias[None], self.basis)[0])
        return sm

    def _tensors(self) -> dict[str, Tensor]:
        return {"basis": self.basis}

    def _params(self) -> dict[str, Any]:
        return {"sites": list(self.sites), "layers": None if self.layers is None else list(self.layers), "meta": dict(self.meta)}

    def weight_deltas(self, model: Any) -> dict[str, tuple[Tensor, Tensor]]:
        """Each orthogonalised matrix's change as a rank-k product ``(B, A)`` with ``ΔW = B @ A``
        in the parameter's own layout (for LoRA export). Keys are parameter names."""
        sm = as_model(model)
        q = self.basis.double()
        out: dict[str, tuple[Tensor, Tensor]] = {}
        names: dict[int, str] = {}
        for n, p in sm.hf.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), n)  # a tied weight keeps its first (embedding) name
        for sw in sm.map.stream_writers():
            key, w = names[id(sw.tensor)], sw.tensor.double()
            if sw.layout is None:
                out[key] = ((-(w @ q.T)).float(), q.float())  # ΔW = −W Qᵀ Q  [V, d]
            elif sw.layout == "out_in":
                out[key] = ((-q.T).float(), (q @ w).float())
            elif sw.layout == "in_out":
                out[key] = ((-(w @ q.T)).float(), q.float())
            else:
                raise ArchitectureError(f"{sw.attr}: fused MoE experts have no LoRA form of this edit")
        return out


@dataclass(frozen=True, eq=False)
class AffineAblation(Edit):
    """Directional ablation in affine form (affine concept editing, Marshall et al. 2024): at every
    layer's input, attention output and MLP output, each activation's coordinates along the span of
    ``basis`` are set to a reference ``offsets[site][layer]`` (the mean coordinates of harmless
    prompts, from :meth:`fit`) instead of zero: ``x − ((x·Qᵀ) − c)·Q``.

    Plain :class:`Ablation` moves harmless activations to the origin along the direction; where a
    model's harmless prompts sit far from it, that moves them toward refusal's side too. On the
    organisms this form bypasses refusal better than plain ablation and, for a subspace, costs less
    KL on harmless prompts (experiments/kl_variants.py). :meth:`bake` is exact: the
    orthogonalisation plus biases along the basis (no LoRA form, since biases are not low-rank
    weight deltas)."""

    basis: Tensor
    offsets: Tensor  # [len(sites), n_layers, rank]: coordinates along the orthonormalised basis
    sites: tuple[str, ...] = ABLATION_SITES
    meta: Mapping[str, str] = field(default_factory=dict)
    kind = "affine_ablation"

    @classmethod
    def from_parts(cls, params: dict[str, Any], tensors: dict[str, Tensor]) -> "AffineAblation":
        return cls(tensors["basis"], tensors["offsets"], tuple(params["sites"]), params.get("meta", {}))

    def __post_init__(self) -> None:
        finite(self.basis, "AffineAblation: the basis")
        finite(self.offsets, "AffineAblation: the offsets")
        q = orthonormal(self.basis)
        if q.shape[0] != (1 if self.basis.dim() == 1 else self.basis.shape[0]):
            raise ValueError("AffineAblation: the basis vectors are linearly dependent; offsets would be ambiguous")
        object.__setattr__(self, "basis", q)
        if self.offsets.dim() != 3 or self.offsets.shape[0] != len(self.sites) or self.offsets.shape[2] != q.shape[0]:
            raise ValueError(f"AffineAblation: offsets of shape {tuple(self.offsets.shape)}, expected "
                             f"[{len(self.sites)} sites, n_layers, {q.shape[0]}]")

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    @classmethod
    def fit(cls, model: Any, basis: Tensor, prompts: Sequence[str] | str, *,
            positions: str | int = "post_instruction", sites: Sequence[str] = ABLATION_SITES, batch_size: int = 16,
            meta: Mapping[str, str] | None = None) -> "AffineAblation":
        """References from ``prompts`` (harmless ones, e.g. ``"harmless:train"``): the mean
        coordinates along ``basis`` at every layer and site, over ``positions`` of each prompt
        (see :func:`steering.record.record`).

        The default, the post-instruction tokens, is where refusal is decided and where the
        direction was read. The mean over every token (``"all"``) sits closer to the origin than a
        harmless prompt's last tokens do, so it too moves them toward refusal: on the organism
        variants with one helpful opening word, one direction ablated this way costs 1.2-9.5× the
        KL on harmless prompts, and only this default meets the refusal-direction paper's KL ≤ 0.1
        on every llama build (experiments/results/kl_variants.md)."""
        sm = as_model(model)
        if basis.shape[-1] != sm.d_model:
            raise ValueError(f"ablation basis has d={basis.shape[-1]}, the model has d_model={sm.d_model}")
        return cls.from_means(basis, cls.reference_means(sm, prompts, positions=positions, sites=sites,
                                                         batch_size=batch_size), meta)

    @staticmethod
    def reference_means(model: Any, prompts: Sequence[str] | str, *, positions: str | int = "post_instruction",
                        sites: Sequence[str] = ABLATION_SITES, batch_size: int = 16) -> dict[str, Tensor]:
        """The mean activation at each site and layer (``{site: [n_layers, d]}``) over ``positions``
        of ``prompts``: what :meth:`fit` projects on the basis. Computed once, it serves any number
        of bases through :meth:`from_means`."""
        from ..record import record

        rec = record(as_model(model), prompts, sites=list(sites), positions=positions, batch_size=batch_size, progress=False)
        return {s: rec.mean(s).mean(1) for s in sites}

    @classmethod
    def from_means(cls, basis: Tensor, means: Mapping[str, Tensor], meta: Mapping[str, str] | None = None) -> "AffineAblation":
        """The affine ablation whose references are ``means``' coordinates along ``basis`` (see
        :meth:`reference_means`)."""
        q = orthonormal(basis).float()
        offsets = torch.stack([means[s].float() @ q.T for s in means])  # [sites, layers, rank]
        return cls(q, offsets, tuple(means), dict(meta or {}))

    def _check(self, model: Model) -> None:
        if self.basis.shape[1] != model.d_model:
            raise ValueError(f"ablation basis has d={self.basis.shape[1]}, the model has d_model={model.d_model}")
        if self.offsets.shape[1] != model.n_layers:
            raise ValueError(f"affine ablation fitted on {self.offsets.shape[1]} layers, the model has {model.n_layers}")

    def _hooks(self, model: Model) -> HookList:
        self._check(model)
        q = Cast(self.basis)

        def hook(c: Cast) -> Callable:
            def affine(x: Tensor, ctx: HookContext) -> Tensor:
                b = q.like(x)
                return x - ((x @ b.T) - c.like(x)) @ b
            return affine

        return [((s, l), hook(Cast(self.offsets[i, l]))) for i, s in enumerate(self.sites) for l in range(model.n_layers)]

    def bake(self, model: Any, inplace: bool = False) -> Model:
        """Exact weight form: the plain ablation's orthogonalisation, then the reference coordinates
        as biases along the basis. The embedding rows get layer 0's input coordinates; each
        attention output's bias its own; each MLP output's bias whatever takes the stream to the
        next layer's input coordinates (the last layer's: its own). A family whose attention or
        MLP output has no bias declares one when written (Llama's ``attention_bias`` /
        ``mlp_bias``; their other projections get zero biases); fused MoE experts and post-norm
        families refuse."""
        sm = as_model(model)
        if set(self.sites) != set(ABLATION_SITES):
            raise ValueError("AffineAblation.bake: only the full ablation (every site) has an exact weight form")
        self._check(sm)
        if not sm.map.spec.post_norm:  # (post-norm families: Ablation.bake raises)
            for layer in range(sm.n_layers):
                for which in ("attn", "mlp"):
                    if sm.map.write_weights(layer, which)[-1][1] != "weight":
                        raise ArchitectureError(f"layer {layer}: the {which} output is written by fused experts with no "
                                                "bias; use AffineAblation.hooks(model)")
        sm = Ablation(self.basis).bake(sm, inplace=inplace)  # unties the embedding, too
        c = {site: self.offsets[i].double() for i, site in enumerate(self.sites)}  # [n_layers, rank] each
        q = self.basis.double()
        with torch.no_grad():
            w = sm.map.module("embed").weight
            w.add_((c["resid_pre"][0] @ q).to(w))
            for layer in range(sm.n_layers):
                att = c["attn_out"][layer]
                nxt = c["resid_pre"][layer + 1] - c["resid_pre"][layer] - att if layer + 1 < sm.n_layers else c["mlp_out"][layer]
                for which, coord in (("attn", att), ("mlp", nxt)):
                    add_bias(sm.map.write_weights(layer, which)[-1][0], (coord @ q).float())
        return sm

    def _tensors(self) -> dict[str, Tensor]:
        return {"basis": self.basis, "offsets": self.offsets}

    def _params(self) -> dict[str, Any]:
        return {"sites": list(self.sites), "meta": dict(self.meta)}


def work_dtype(w: Tensor | torch.dtype) -> torch.dtype:
    """float64 for float32 (or wider) weights; float32 for 16-bit ones, whose result is rounded to
    8 or 11 significant bits anyway (twice as fast, half the memory, same stored values but for
    rare last-bit ties)."""
    dtype = w if isinstance(w, torch.dtype) else w.dtype
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else torch.float64


def project_rows(w: Tensor, q: Tensor) -> Tensor:
    """Rows of ``w`` ([n, d]) with the span of ``q`` removed; computed in float32 or better."""
    dt = work_dtype(w)
    w32 = w.to(dt)
    if w32.data_ptr() == w.data_ptr():
        w32 = w32.clone()  # the input is never changed
    return project_rows_(w32, q.to(w.device, dt)).to(w.dtype)


_BLOCK_ENTRIES = 2**17  # entries of the row blocks the projections work in (512 KB in float32: they stay in cache)


def _block_rows(width: int) -> int:
    """Rows of ``width`` entries in one block of about :data:`_BLOCK_ENTRIES` entries (at least one)."""
    return max(1, _BLOCK_ENTRIES // max(1, width))


def _row_blocks(n: int, width: int) -> Iterator[tuple[int, int]]:
    """``(start, rows)`` of consecutive blocks of whole rows (:func:`_block_rows`)."""
    step = _block_rows(width)
    for r in range(0, n, step):
        yield r, min(step, n - r)


def _block_scratch(w32: Tensor) -> Tensor:
    """Scratch for one block of rows of ``w32`` (``[n, width]``): what the projections need."""
    n, width = w32.shape
    return w32.new_empty(min(n, _block_rows(width)) * width)


def row_coordinates(w32: Tensor, q32: Tensor, scratch: Tensor | None = None) -> Tensor:
    """``[k, n]``: each row of ``w32`` (``[n, d]``) dotted with each row of ``q32`` (``[k, d]``),
    as a product then a sum along the row, a block of rows at a time (through ``scratch``, at least
    one block's entries, when given).

    Not a matrix product: a BLAS chooses its kernel, and with it the order of its additions, by the
    matrices' shapes and alignment, so a weight projected in slices (a streamed bake) would differ
    from the whole weight projected at once in the last bit of some entries. A sum along one row
    adds in an order set by the row's length alone, so each row's value is the same whatever rows
    share the call (or the block)."""
    n, d = w32.shape
    scratch = _block_scratch(w32) if scratch is None else scratch
    c = w32.new_empty(q32.shape[0], n)
    for r, m in _row_blocks(n, d):
        block, tmp = w32[r:r + m], scratch.reshape(-1)[:m * d].view(m, d)
        for j in range(q32.shape[0]):
            torch.sum(torch.mul(block, q32[j], out=tmp), dim=1, out=c[j, r:r + m])
    return c


COLUMN_BLOCK = 64  # columns summed at once by column_coordinates; slices of columns start at multiples of it


def column_coordinates(w32: Tensor, q32: Tensor, buf: Tensor | None = None) -> Tensor:
    """``[k, m]``: ``q32`` (``[k, d]``) times ``w32`` (``[d, m]``), as products summed down each
    column, :data:`COLUMN_BLOCK` columns at a time, each block's products written into the same
    zero-padded ``[d, COLUMN_BLOCK]`` place in ``buf`` (at least ``d * COLUMN_BLOCK`` entries;
    allocated when not given). A sum down columns adds in an order that follows how many columns
    the call has (see :func:`row_coordinates`); a block of fixed shape in a fixed place does not, so
    a column's value is the same in any slice of columns that starts at a multiple of the block."""
    d, m = w32.shape
    n_b = COLUMN_BLOCK
    buf = w32.new_empty(d * n_b) if buf is None else buf
    prod = buf.reshape(-1)[:d * n_b].view(d, n_b)
    c, col = w32.new_empty(q32.shape[0], m), w32.new_empty(n_b)
    for i in range(0, m, n_b):
        n = min(n_b, m - i)
        if n < n_b:
            prod[:, n:].zero_()
        for j in range(q32.shape[0]):
            torch.mul(w32[:, i:i + n], q32[j].unsqueeze(1), out=prod[:, :n])
            torch.sum(prod, dim=0, out=col)
            c[j, i:i + n] = col[:n]
    return c


def sub_outer_(w32: Tensor, a: Tensor, b: Tensor, scratch: Tensor | None = None) -> Tensor:
    """``w32`` (``[n, m]``) minus ``Σ_j a[j] b[j]ᵀ`` (``a``: ``[k, n]``, ``b``: ``[k, m]``) in place,
    one rank-one term at a time, a block of rows at a time (through ``scratch``, at least one
    block's entries, when given): entry by entry, so each entry's value does not depend on the
    slice it is computed in."""
    n, m = w32.shape
    scratch = _block_scratch(w32) if scratch is None else scratch
    for r, k in _row_blocks(n, m):
        block, tmp = w32[r:r + k], scratch.reshape(-1)[:k * m].view(k, m)
        for j in range(a.shape[0]):
            block.sub_(torch.mul(a[j, r:r + k].unsqueeze(1), b[j], out=tmp))
    return w32


def project_rows_(w32: Tensor, q32: Tensor, scratch: Tensor | None = None) -> Tensor:
    """:func:`project_rows` in place on the working-precision rows ``w32`` (``[n, d]``, same
    values), through ``scratch`` (a block of rows' entries or more, e.g. ``w32``'s shape) when given.
    Each row's values are the same whatever rows share the call (:func:`row_coordinates`), so a
    weight projected in slices of rows has the bytes of the whole weight projected at once."""
    scratch = _block_scratch(w32) if scratch is None else scratch
    return sub_outer_(w32, row_coordinates(w32, q32, scratch), q32, scratch)


def project_out(w: Tensor, q: Tensor, layout: str) -> Tensor:
    """A stream-writing weight whose output has no component in the span of ``q``."""
    dt = work_dtype(w)
    w32 = w.to(dt)
    if w32.data_ptr() == w.data_ptr():
        w32 = w32.clone()  # the input is never changed
    return project_out_(w32, q.to(w.device, dt), layout).to(w.dtype)


def project_out_(w32: Tensor, q32: Tensor, layout: str, scratch: Tensor | None = None) -> Tensor:
    """:func:`project_out` in place on the working-precision weight ``w32`` (same values),
    through ``scratch`` (``w32``'s shape) when given: for a caller that reuses memory. As with
    :func:`project_rows_`, an entry's value does not depend on how the weight is sliced."""
    if layout == "out_in":  # [d, in]: W − QᵀQ W
        return sub_outer_(w32, q32, column_coordinates(w32, q32), scratch)
    if layout == "in_out":  # Conv1D [in, d]: W − W QᵀQ
        return project_rows_(w32, q32, scratch)
    if layout == "experts_out_in":  # [E, d, in]: each expert as an out_in weight
        for e in range(w32.shape[0]):
            project_out_(w32[e], q32, "out_in", None if scratch is None else scratch[e])
        return w32
    raise ArchitectureError(f"unknown weight layout {layout!r}")


