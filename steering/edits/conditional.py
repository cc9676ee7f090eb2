"""Conditional steering: :class:`Conditional` applies another edit only to the sequences whose
prompt projects past a threshold on a condition direction (CAST's gate), per sequence in a batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..hooks import SITES, HookContext
from ..model import Model
from .base import Cast, Edit, HookList, finite, finite_number, from_parts, layers_of

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

    @classmethod
    def from_parts(cls, params: dict[str, Any], tensors: dict[str, Tensor]) -> "Conditional":
        inner = from_parts(params["edit_kind"], params["edit"], {k[5:]: v for k, v in tensors.items() if k.startswith("edit.")})
        return cls(inner, tensors["condition"], params["layer"], params["threshold"], params["site"])

    def __post_init__(self) -> None:
        finite(self.condition, "Conditional: the condition vector")
        finite_number(self.threshold, "Conditional: threshold")
        object.__setattr__(self, "condition", self.condition.detach().float().reshape(-1) / self.condition.norm())

    def _hooks(self, model: Model) -> HookList:
        inner = self.edit._hooks(model)
        (layer,) = layers_of(model, [self.layer])  # negative counts from the end; out of range is an error
        early = [k for k, _ in inner if k[1] < layer or (k[1] == layer and SITES.index(k[0]) < SITES.index(self.site))]
        if early:
            raise ValueError(f"Conditional: the edit hooks {early[0]} run before the condition is read at "
                             f"{self.site} of layer {layer}; read the condition earlier or edit later layers")
        state: dict[str, Tensor] = {}
        cond = Cast(self.condition)

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
        from ..record import record

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


