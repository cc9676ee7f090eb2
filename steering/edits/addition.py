"""Adding a vector to the stream: :class:`Addition` (ActAdd / CAA, ``h ← h + c·v`` at chosen
layers and positions; bakes as a bias for all positions) and :class:`ICVInjection` (Safety
Arithmetic's in-context safety vector, norm-preserving)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..arch import ArchitectureError
from ..hooks import HookContext
from ..model import Model, as_model
from ..vectors import SteeringVector
from .base import Cast, Edit, HookList, add_bias, copy_model, finite, finite_number, untie_embeddings


def _vector(params: dict[str, Any], tensors: dict[str, Tensor], site_key: str) -> SteeringVector:
    layers = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("vector.")}
    return SteeringVector(layers, params[site_key], params.get("meta", {}))


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

    @classmethod
    def from_parts(cls, params: dict[str, Any], tensors: dict[str, Tensor]) -> "Addition":
        return cls(_vector(params, tensors, "site"), params["scale"], params["positions"])

    def __post_init__(self) -> None:
        if self.positions not in ADDITION_POSITIONS:
            raise ValueError(f"Addition: positions={self.positions!r}; use one of {ADDITION_POSITIONS}")
        finite_number(self.scale, "Addition: scale")
        for layer, v in self.vector.directions.items():
            finite(v, f"Addition: the vector of layer {layer}")

    def _hooks(self, model: Model) -> HookList:
        if self.vector.d_model != model.d_model:
            raise ValueError(f"vector has d={self.vector.d_model}, the model has d_model={model.d_model}")
        out: HookList = []
        state: dict[str, Tensor] = {}
        n_eoi = model.post_instruction_len
        for layer, v in self.vector.directions.items():
            cv = Cast(v * self.scale)

            def add(x: Tensor, ctx: HookContext, cv: Cast = cv) -> Tensor:
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
        sm = sm if inplace else copy_model(sm)
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

    @classmethod
    def from_parts(cls, params: dict[str, Any], tensors: dict[str, Tensor]) -> "ICVInjection":
        return cls(_vector(params, tensors, "read_site"), params["beta"], params["site"])

    def __post_init__(self) -> None:
        finite_number(self.beta, "ICVInjection: beta")
        for layer, v in self.icv.directions.items():
            finite(v, f"ICVInjection: the vector of layer {layer}")

    def _hooks(self, model: Model) -> HookList:
        if self.icv.d_model != model.d_model:
            raise ValueError(f"vector has d={self.icv.d_model}, the model has d_model={model.d_model}")
        out: HookList = []
        for layer, v in self.icv.directions.items():
            unit = Cast(v / v.norm().clamp(min=1e-12))

            def inject(x: Tensor, ctx: HookContext, unit: Cast = unit) -> Tensor:
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


