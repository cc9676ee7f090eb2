"""Training-free edits as small immutable values.

Every edit has ``edit.hooks(model)``, a context manager that runs the model with the edit applied
(and removes it, bit-identically, on exit), and ``edit.save(path)`` / :func:`load_edit`. Where
the edit is exactly a weight change, ``edit.bake(model)`` returns a baked copy (or bakes in place
with ``inplace=True``) that gives the same outputs as the hooks.

- :class:`Ablation`: remove a direction, or a low-rank subspace, from the residual stream at every
  layer's input, attention output and MLP output, at all positions (Arditi et al.). Bakes into
  weights by orthogonalisation (embeddings, every stream-writing matrix, fused MoE experts, GPT-2
  Conv1D, stream-writing biases); refuses on post-norm families, where no weight edit is exact.
- :class:`AffineAblation`: the same, but coordinates along the basis are set to harmless prompts'
  mean (affine concept editing) instead of zero. Bakes exactly as the orthogonalisation plus biases
  along the basis (no PEFT form).
- :class:`Addition`: ActAdd / CAA, ``h_l ← h_l + c·r`` at chosen layers, at all positions or only
  from the post-instruction tokens on. Bakes as a bias (all positions only).
- :class:`ICVInjection`: Safety Arithmetic's in-context safety vector, norm-preserving, at the
  site it was read from by default.
- :class:`Conditional`: another edit applied only to the sequences whose projection on a
  condition direction passes a threshold (chosen on validation prompts by :meth:`Conditional.fit`),
  per sequence in a batch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .arch import ArchitectureError
from .hooks import HookContext, attach
from .model import Model, as_model
from .io import atomic_write, check_finite, read_safetensors
from .vectors import SteeringVector

FORMAT = "steering.edit"
HookList = list[tuple[tuple[str, int], Callable]]


def _finite(t: Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} holds NaN or infinite values")


def _finite_number(x: float, what: str) -> None:
    if not math.isfinite(float(x)):
        raise ValueError(f"{what} is {x}, not a finite number")


class _Cast:
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

    kind = "edit"

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


def _layers_of(model: Model, layers: Iterable[int] | None) -> list[int]:
    """Layer indices (negative ones count from the end), checked."""
    n = model.n_layers
    if layers is None:
        return list(range(n))
    out = [l + n if l < 0 else l for l in layers]
    for l in out:
        model.map.check_layer(l)
    return out


def _copy_model(model: Model) -> Model:
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


# --- ablation ------------------------------------------------------------------------------------
ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")


@dataclass(frozen=True, eq=False)
class Ablation(Edit):
    """Project the span of ``basis`` (``[d]`` or ``[k, d]``) out of the residual stream everywhere."""

    basis: Tensor
    sites: tuple[str, ...] = ABLATION_SITES
    layers: tuple[int, ...] | None = None
    meta: Mapping[str, str] = field(default_factory=dict)
    kind = "ablation"

    def __post_init__(self) -> None:
        _finite(self.basis, "Ablation: the basis")
        object.__setattr__(self, "basis", orthonormal(self.basis))

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def _hooks(self, model: Model) -> HookList:
        if self.basis.shape[1] != model.d_model:
            raise ValueError(f"ablation basis has d={self.basis.shape[1]}, the model has d_model={model.d_model}")
        q = _Cast(self.basis)

        def ablate(x: Tensor, ctx: HookContext) -> Tensor:
            b = q.like(x)
            return x - (x @ b.T) @ b

        return [((s, l), ablate) for l in _layers_of(model, self.layers) for s in self.sites]

    def bake(self, model: Any, inplace: bool = False) -> Model:
        """Orthogonalise every write into the residual stream (exact; refuses post-norm families)."""
        sm = as_model(model)
        if sm.map.spec.post_norm:
            raise ArchitectureError(
                f"{sm.map.spec.name}: sublayer outputs are normalised before they join the residual stream, so no "
                "weight edit removes a direction exactly; use Ablation.hooks(model) instead")
        if self.layers is not None or set(self.sites) != set(ABLATION_SITES):
            raise ValueError("Ablation.bake: only the full ablation (every layer, every site) has an exact weight form")
        sm = sm if inplace else _copy_model(sm)
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

    def __post_init__(self) -> None:
        _finite(self.basis, "AffineAblation: the basis")
        _finite(self.offsets, "AffineAblation: the offsets")
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
        from .record import record

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
        q = _Cast(self.basis)

        def hook(c: _Cast) -> Callable:
            def affine(x: Tensor, ctx: HookContext) -> Tensor:
                b = q.like(x)
                return x - ((x @ b.T) - c.like(x)) @ b
            return affine

        return [((s, l), hook(_Cast(self.offsets[i, l]))) for i, s in enumerate(self.sites) for l in range(model.n_layers)]

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


def _work_dtype(w: Tensor) -> torch.dtype:
    """float64 for float32 (or wider) weights; float32 for 16-bit ones, whose result is rounded to
    8 or 11 significant bits anyway (twice as fast, half the memory, same stored values but for
    rare last-bit ties)."""
    return torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else torch.float64


def project_rows(w: Tensor, q: Tensor) -> Tensor:
    """Rows of ``w`` ([n, d]) with the span of ``q`` removed; computed in float32 or better."""
    dt = _work_dtype(w)
    w32, q32 = w.to(dt), q.to(w.device, dt)
    return (w32 - (w32 @ q32.T) @ q32).to(w.dtype)


def project_out(w: Tensor, q: Tensor, layout: str) -> Tensor:
    """A stream-writing weight whose output has no component in the span of ``q``."""
    dt = _work_dtype(w)
    w32, q32 = w.to(dt), q.to(w.device, dt)
    if layout == "out_in":  # [d, in]: W − QᵀQ W
        new = w32 - q32.T @ (q32 @ w32)
    elif layout == "in_out":  # Conv1D [in, d]: W − W QᵀQ
        new = w32 - (w32 @ q32.T) @ q32
    elif layout == "experts_out_in":  # [E, d, in]
        new = w32 - torch.einsum("kd,ekn->edn", q32, torch.einsum("kd,edn->ekn", q32, w32))
    else:
        raise ArchitectureError(f"unknown weight layout {layout!r}")
    return new.to(w.dtype)


# --- addition ------------------------------------------------------------------------------------
def _after_instruction_mask(ctx: HookContext, x: Tensor, n_eoi: int, state: dict, prompt_only: bool = False) -> Tensor:
    """[batch, seq, 1] mask of the positions from the post-instruction tokens on (``prompt_only``:
    only those tokens of the prompt, none of the generated ones)."""
    if ctx.past_len == 0:  # prefill: the prompt ends at each row's last real token
        state["start"] = ctx.last_token(x) - n_eoi + 1
    start = state.get("start")
    if start is None:
        raise RuntimeError("Addition(positions='post_instruction'): decode step without a prefill in this context")
    pos = ctx.positions().to(x.device)
    mask = pos[None, :] >= start[:, None]
    if prompt_only:
        mask &= pos[None, :] < (start + n_eoi)[:, None]
    return mask.unsqueeze(-1).to(x.dtype)


ADDITION_POSITIONS = ("all", "post_instruction", "instruction_end", "last")


@dataclass(frozen=True, eq=False)
class Addition(Edit):
    """``h ← h + scale·v[layer]`` at ``vector.site`` of each of the vector's layers."""

    vector: SteeringVector
    scale: float = 1.0
    # "all"; "post_instruction": from the tokens the chat template puts after the user's message on,
    # generated tokens included; "instruction_end": only those template tokens of the prompt;
    # "last": each forward call's last real token (the prompt's last token, then every new token:
    # SafeInfer's safety amplification)
    positions: str = "all"
    kind = "addition"

    def __post_init__(self) -> None:
        if self.positions not in ADDITION_POSITIONS:
            raise ValueError(f"Addition: positions={self.positions!r}; use one of {ADDITION_POSITIONS}")
        _finite_number(self.scale, "Addition: scale")
        for layer, v in self.vector.directions.items():
            _finite(v, f"Addition: the vector of layer {layer}")

    def _hooks(self, model: Model) -> HookList:
        if self.vector.d_model != model.d_model:
            raise ValueError(f"vector has d={self.vector.d_model}, the model has d_model={model.d_model}")
        out: HookList = []
        state: dict[str, Tensor] = {}
        n_eoi = model.post_instruction_len
        for layer, v in self.vector.directions.items():
            cv = _Cast(v * self.scale)

            def add(x: Tensor, ctx: HookContext, cv: _Cast = cv) -> Tensor:
                if self.positions == "all":
                    return x + cv.like(x)
                if self.positions == "last":
                    last = ctx.last_token(x)
                    mask = torch.zeros(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)
                    mask[torch.arange(x.shape[0], device=x.device), last.clamp(min=0)] = 1
                    return x + mask * cv.like(x)
                mask = _after_instruction_mask(ctx, x, n_eoi, state, prompt_only=self.positions == "instruction_end")
                return x + mask * cv.like(x)

            out.append(((self.vector.site, layer), add))
        return out

    def bake(self, model: Any, inplace: bool = False) -> Model:
        """Add the vector as a bias of the write that produces the site (exact for positions='all')."""
        if self.positions != "all":
            raise ValueError(f"Addition.bake: only positions='all' is a bias; {self.positions!r} needs hooks")
        sm = as_model(model)
        if self.vector.d_model != sm.d_model:
            raise ValueError(f"vector has d={self.vector.d_model}, the model has d_model={sm.d_model}")
        for layer in self.vector.directions:
            sm.map.check_layer(layer)
        if sm.map.spec.post_norm:
            raise ArchitectureError(f"{sm.map.spec.name}: the MLP's write is normalised, so a bias cannot add a fixed vector")
        sm = sm if inplace else _copy_model(sm)
        with torch.no_grad():
            for layer, v in self.vector.directions.items():
                src = layer - 1 if self.vector.site == "resid_pre" else layer
                if self.vector.site not in ("resid_pre", "resid_post"):
                    raise ValueError(f"Addition.bake: site {self.vector.site!r} has no bias form; use resid_pre or resid_post")
                if src < 0:  # before layer 0: every token's embedding
                    untie_embeddings(sm)
                    w = sm.map.module("embed").weight
                    w.add_((self.scale * v).to(w))
                    continue
                owner, name, layout = sm.map.write_weights(src, "mlp")[-1]
                if name != "weight":
                    raise ArchitectureError(f"layer {src}: the MLP writes through fused experts with no bias; use hooks")
                add_bias(owner, (self.scale * v))
        return sm

    def _tensors(self) -> dict[str, Tensor]:
        return {f"vector.{l}": v for l, v in self.vector.directions.items()}

    def _params(self) -> dict[str, Any]:
        return {"scale": self.scale, "positions": self.positions, "site": self.vector.site, "meta": dict(self.vector.meta)}


def add_bias(module: nn.Module, delta: Tensor) -> None:
    """Add ``delta`` to a Linear / Conv1D's bias, creating a zero bias if it has none."""
    weight = module.weight
    d_out = weight.shape[0] if type(module).__name__ != "Conv1D" else weight.shape[1]
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(torch.zeros(d_out, dtype=weight.dtype, device=weight.device))
    module.bias.add_(delta.to(module.bias))


# --- ICV -----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ICVInjection(Edit):
    """x ← normalize(normalize(x) − β·(1 + max(0, cos(x, v)))·v̂)·‖x‖ at ``site`` of each ICV layer.

    Pushes the stream away from the unsafe-minus-safe direction while keeping its norm (Safety
    Arithmetic). ``site`` defaults to the residual stream the vector was read from.
    """

    icv: SteeringVector
    beta: float = 0.1
    site: str | None = None
    kind = "icv"

    def __post_init__(self) -> None:
        _finite_number(self.beta, "ICVInjection: beta")
        for layer, v in self.icv.directions.items():
            _finite(v, f"ICVInjection: the vector of layer {layer}")

    def _hooks(self, model: Model) -> HookList:
        if self.icv.d_model != model.d_model:
            raise ValueError(f"vector has d={self.icv.d_model}, the model has d_model={model.d_model}")
        out: HookList = []
        for layer, v in self.icv.directions.items():
            unit = _Cast(v / v.norm().clamp(min=1e-12))

            def inject(x: Tensor, ctx: HookContext, unit: _Cast = unit) -> Tensor:
                u = unit.like(x)
                norm = x.norm(dim=-1, keepdim=True)
                xn = x / norm.clamp(min=1e-12)
                cos = (xn @ u)[..., None]
                y = xn - self.beta * (1 + cos.clamp(min=0)) * u
                return y / y.norm(dim=-1, keepdim=True).clamp(min=1e-12) * norm

            out.append(((self.site or self.icv.site, layer), inject))
        return out

    def _tensors(self) -> dict[str, Tensor]:
        return {f"vector.{l}": v for l, v in self.icv.directions.items()}

    def _params(self) -> dict[str, Any]:
        return {"beta": self.beta, "site": self.site, "read_site": self.icv.site, "meta": dict(self.icv.meta)}


# --- conditional ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Conditional(Edit):
    """Apply ``edit`` only to sequences whose prompt projects above ``threshold`` on ``condition``.

    The projection is read at ``site`` of ``layer`` on the prompt's last token during the prefill
    (before the edit touches anything at or after that layer), per sequence; the decision holds
    for every decoding step after it. The edit's own hooks must sit at ``layer`` or later.
    """

    edit: Edit
    condition: Tensor
    layer: int
    threshold: float
    site: str = "resid_pre"
    kind = "conditional"

    def __post_init__(self) -> None:
        _finite(self.condition, "Conditional: the condition vector")
        _finite_number(self.threshold, "Conditional: threshold")
        object.__setattr__(self, "condition", self.condition.detach().float().reshape(-1) / self.condition.norm())

    def _hooks(self, model: Model) -> HookList:
        inner = self.edit._hooks(model)
        layer = self.layer % model.n_layers
        from .hooks import SITES

        early = [k for k, _ in inner if k[1] < layer or (k[1] == layer and SITES.index(k[0]) < SITES.index(self.site))]
        if early:
            raise ValueError(f"Conditional: the edit hooks {early[0]} run before the condition is read at "
                             f"{self.site} of layer {layer}; read the condition earlier or edit later layers")
        state: dict[str, Tensor] = {}
        cond = _Cast(self.condition)

        def decide(x: Tensor, ctx: HookContext) -> None:
            if ctx.past_len == 0:
                h = x[torch.arange(x.shape[0], device=x.device), ctx.last_token(x)]
                state["on"] = (h @ cond.like(h)) > self.threshold
            return None

        def gated(fn: Callable) -> Callable:
            def hook(x: Tensor, ctx: HookContext) -> Tensor | None:
                new = fn(x, ctx)
                if new is None:
                    return None
                return torch.where(state["on"].to(x.device)[:, None, None], new, x)
            return hook

        return [((self.site, layer), decide)] + [(k, gated(fn)) for k, fn in inner]

    @staticmethod
    def scores(model: Any, prompts: Sequence[str], condition: Tensor, layer: int, site: str = "resid_pre") -> Tensor:
        """Each prompt's projection on ``condition`` (unit) at its last token."""
        from .record import record

        rec = record(model, prompts, sites=site, layers=[layer], positions="last", keep="raw", progress=False)
        unit = condition.float().reshape(-1) / condition.norm()
        return torch.stack([r[0, -1] for r in rec.raw[site]]) @ unit

    @classmethod
    def fit(cls, model: Any, edit: Edit, condition: Tensor, layer: int, on_prompts: Sequence[str],
            off_prompts: Sequence[str], site: str = "resid_pre") -> "Conditional":
        """Choose the threshold that best separates ``on_prompts`` (edit) from ``off_prompts`` (leave)."""
        on = cls.scores(model, on_prompts, condition, layer, site)
        off = cls.scores(model, off_prompts, condition, layer, site)
        values = torch.cat([on, off]).sort().values
        cuts = torch.cat([values[:1] - 1, (values[1:] + values[:-1]) / 2, values[-1:] + 1])
        acc = torch.stack([((on > c).float().mean() + (off <= c).float().mean()) / 2 for c in cuts])
        best = int(acc.argmax())
        return cls(edit, condition, layer, float(cuts[best]), site)

    def passes(self, model: Any, prompts: Sequence[str]) -> Tensor:
        """Whether the gate applies the edit to each prompt (a bool per prompt)."""
        return self.scores(model, prompts, self.condition, self.layer, self.site) > self.threshold

    def _tensors(self) -> dict[str, Tensor]:
        return {"condition": self.condition, **{f"edit.{k}": v for k, v in self.edit._tensors().items()}}

    def _params(self) -> dict[str, Any]:
        return {"layer": self.layer, "threshold": self.threshold, "site": self.site,
                "edit_kind": self.edit.kind, "edit": self.edit._params()}


# --- several edits, and files ---------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Compose(Edit):
    """Several edits at once (hooks in order; bake applies each in turn)."""

    edits: tuple[Edit, ...]
    kind = "compose"

    def _hooks(self, model: Model) -> HookList:
        return [h for e in self.edits for h in e._hooks(model)]

    def bake(self, model: Any, inplace: bool = False) -> Model:
        sm = as_model(model) if inplace else _copy_model(as_model(model))
        for e in self.edits:
            sm = e.bake(sm, inplace=True)
        return sm


def combine(edits: Iterable[Edit | None]) -> Edit | None:
    """The edits given (``None`` left out) as one: ``None``, the edit itself, or their :class:`Compose`."""
    es = tuple(e for e in edits if e is not None)
    return None if not es else es[0] if len(es) == 1 else Compose(es)


def _from_parts(kind: str, params: dict[str, Any], tensors: dict[str, Tensor]) -> Edit:
    vec = lambda: {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("vector.")}  # noqa: E731
    if kind == "ablation":
        layers = params.get("layers")
        return Ablation(tensors["basis"], tuple(params["sites"]), None if layers is None else tuple(layers), params.get("meta", {}))
    if kind == "affine_ablation":
        return AffineAblation(tensors["basis"], tensors["offsets"], tuple(params["sites"]), params.get("meta", {}))
    if kind == "addition":
        return Addition(SteeringVector(vec(), params["site"], params.get("meta", {})), params["scale"], params["positions"])
    if kind == "icv":
        return ICVInjection(SteeringVector(vec(), params["read_site"], params.get("meta", {})), params["beta"], params["site"])
    if kind == "conditional":
        inner = _from_parts(params["edit_kind"], params["edit"], {k[5:]: v for k, v in tensors.items() if k.startswith("edit.")})
        return Conditional(inner, tensors["condition"], params["layer"], params["threshold"], params["site"])
    raise ValueError(f"unknown edit kind {kind!r}")


def load_edit(path: str | os.PathLike) -> Edit:
    """Read an edit written by ``edit.save(path)``."""
    meta, tensors = read_safetensors(path, FORMAT, "edit")
    check_finite(tensors, str(path))
    try:
        params = json.loads(meta["params"])
        edit = _from_parts(meta["kind"], params, tensors)
    except KeyError as e:
        raise ValueError(f"{path}: the edit file lacks {e.args[0]!r} (metadata or tensor); not an edit steering wrote") from None
    except (TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the edit file's metadata is malformed ({e})") from None
    for name in ("scale", "beta", "threshold"):
        value = params.get(name) if isinstance(params, dict) else None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{path}: the edit's {name} is {value}, not a finite number")
    return edit
