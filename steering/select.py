"""Choosing the refusal direction among the candidates, as refusal_direction does
(Arditi et al.).

For every candidate (layer, position):
- ``bypass``: mean refusal score on harmful validation prompts with the direction ablated
  everywhere (lower is better);
- ``induce``: mean refusal score on harmless validation prompts with the raw candidate added at
  ``resid_pre`` of its layer, all positions;
- ``kl``: KL divergence of the last-token distributions on harmless validation prompts, ablated
  against plain.

(With ``affine=True`` the ablation of ``bypass`` and ``kl`` is the affine form, which keeps the
coordinate at the harmless prompts' mean.)
Candidates at layers ≥ ⌊0.8·L⌋, with ``kl`` > 0.1, ``induce`` < 0, or a NaN are discarded; the pick
is the lowest ``bypass``. The refusal score is log P(refusal) − log(1 − P(refusal)) at the last
prompt position, P summed over the first tokens refusals start with. With a tokenizer that splits
words, such a token can also start helpful openings (the organisms' ``A`` begins both "As an AI"
and "Absolutely"), and the score then counts those too; pass ``refusal_ids`` to choose the tokens
(experiments/kl_variants.py measures what that sharing does on the organisms).

Where no single direction carries refusal (small models can spread it over a few), :func:`select_subspace`
grows a low-rank subspace greedily from the best candidates and reports its rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from .edits import Ablation, AffineAblation, Addition, orthonormal
from .model import Model, as_model
from .vectors import Candidates, SteeringVector

REFUSAL_STARTS = ("I'm sorry", "I am sorry", "I apologize", "As an AI", "As a language model", "I cannot",
                  "I can't", "I am unable", "I'm unable", "Sorry")


def refusal_token_ids(model: Model, starts: Sequence[str] = REFUSAL_STARTS) -> list[int]:
    """The first token of each refusal opening, for this tokenizer."""
    tok = model.tokenizer
    ids = {tok(s, add_special_tokens=False)["input_ids"][0] for s in starts}
    return sorted(ids)


@torch.inference_mode()
def last_logprobs(model: Model, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Log-probabilities of the next token after each (chat-formatted) prompt, ``[n, vocab]``."""
    texts = model.format(prompts)
    out = []
    for i in range(0, len(texts), batch_size):
        logits = model.forward(texts[i:i + batch_size], padding_side="left")[:, -1].float()
        out.append(torch.log_softmax(logits, -1).cpu())
    return torch.cat(out)


def refusal_scores(logprobs: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """log P(refusal) − log(1 − P(refusal)) per prompt."""
    lp = torch.logsumexp(logprobs[:, list(refusal_ids)].double(), -1)
    return (lp - torch.log1p(-lp.exp().clamp(max=1 - 1e-12))).float()


def kl_per_prompt(base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ new) of each row of two batches of log-probabilities, ``[n]``."""
    return (base.exp() * (base - new)).sum(-1)


def kl_div(base: torch.Tensor, new: torch.Tensor) -> float:
    """Mean KL(base ‖ new) of two batches of log-probabilities."""
    return float(kl_per_prompt(base, new).mean())


@dataclass
class Selection:
    """Every candidate's scores, the filters' verdicts and the pick."""

    candidates: Candidates
    rows: list[dict[str, Any]]
    pick: tuple[int, int] | None
    baseline: dict[str, float]
    n_layers: int
    refusal_ids: list[int]
    max_layer: int
    meta: dict[str, str] = field(default_factory=dict)

    def _closest_row(self) -> dict[str, Any] | None:
        scored = [r for r in self.rows if not math.isnan(r["bypass"])]
        return min(scored, key=lambda r: r["bypass"]) if scored else None

    @property
    def closest(self) -> tuple[int, int] | None:
        """The candidate with the lowest bypass score among those whose scores are numbers, whether
        or not it passed the filters ((layer, position), or None)."""
        r = self._closest_row()
        return None if r is None else (r["layer"], r["position"])

    def nothing_passed(self) -> str:
        """One line for a selection that found nothing: the closest candidate (lowest bypass among
        those whose scores are numbers) and the filter that discarded it, to relax."""
        r = self._closest_row()
        if r is None:
            return "no candidate passed the filters: every candidate is a zero vector or scored NaN"
        return (f"no candidate passed the filters; the closest, layer {r['layer']} position {r['position']} "
                f"(bypass {r['bypass']:.2f}, kl {r['kl']:.3f}, induce {r['induce']:.2f}), failed: {r['why']} "
                "(relax that filter: kl_threshold, max_layer_frac or induce_threshold)")

    @property
    def direction(self) -> torch.Tensor:
        """The picked candidate, unit norm."""
        if self.pick is None:
            raise ValueError(self.nothing_passed())
        r = self.candidates.direction(*self.pick)
        return r / r.norm()

    def ablation(self) -> Ablation:
        layer, pos = self.pick or (None, None)
        return Ablation(self.direction, meta={**self.candidates.meta, "layer": str(layer), "position": str(pos),
                                              "selected_by": "bypass"})

    def table(self) -> str:
        lines = ["| layer | pos | bypass | induce | kl | kept | why not |", "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            mark = " **pick**" if self.pick == (r["layer"], r["position"]) else ""
            lines.append(f"| {r['layer']} | {r['position']} | {r['bypass']:.3f} | {r['induce']:.3f} | {r['kl']:.4f} | "
                         f"{'yes' if r['kept'] else 'no'}{mark} | {r['why']} |")
        lines.append(f"\nBaseline refusal score: harmful {self.baseline['harmful']:.3f}, harmless {self.baseline['harmless']:.3f}.")
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Heat maps (position × layer) of bypass, induce and KL; the pick is circled."""
        from matplotlib.figure import Figure  # not pyplot: no backend switch, no global state (notebooks keep inline plots)

        positions = list(self.candidates.positions)
        layers = sorted({r["layer"] for r in self.rows})
        fig = Figure(figsize=(4 + 1.2 * len(layers), 2.5 + 0.4 * len(positions)), constrained_layout=True)
        axes = fig.subplots(1, 3)
        for ax, key, cmap in zip(axes, ("bypass", "induce", "kl"), ("viridis_r", "viridis", "magma_r")):
            grid = torch.full((len(positions), len(layers)), float("nan"))
            for r in self.rows:
                grid[positions.index(r["position"]), layers.index(r["layer"])] = r[key]
            im = ax.imshow(grid.numpy(), aspect="auto", cmap=cmap)
            ax.set_xticks(range(len(layers)), layers)
            ax.set_yticks(range(len(positions)), positions)
            ax.set_xlabel("layer")
            ax.set_ylabel("position")
            ax.set_title(key)
            fig.colorbar(im, ax=ax)
            if self.pick is not None:
                ax.scatter([layers.index(self.pick[0])], [positions.index(self.pick[1])], s=200, facecolors="none", edgecolors="red")
        fig.savefig(path, dpi=120)

    def to_json(self) -> dict[str, Any]:
        return {"pick": self.pick, "rows": self.rows, "baseline": self.baseline, "refusal_ids": self.refusal_ids,
                "max_layer": self.max_layer, "meta": self.meta}


def select_direction(model: Any, candidates: Candidates, harmful_val: Sequence[str], harmless_val: Sequence[str], *,
                     kl_threshold: float = 0.1, max_layer_frac: float = 0.8, induce_threshold: float = 0.0,
                     refusal_ids: Sequence[int] | None = None, batch_size: int = 64, progress: bool = True,
                     affine: bool = False) -> Selection:
    """Score every candidate and pick one (see the module docstring).

    ``affine=True`` scores ``bypass`` and ``kl`` with each candidate ablated in affine form
    (:class:`~steering.edits.AffineAblation` fitted on ``harmless_val``: coordinates kept at the
    harmless prompts' mean instead of zero), the form ``steering select --affine`` writes."""
    from tqdm.auto import tqdm

    sm = as_model(model)
    ids = list(refusal_ids) if refusal_ids is not None else refusal_token_ids(sm)
    base_harmful = last_logprobs(sm, harmful_val, batch_size)
    base_harmless = last_logprobs(sm, harmless_val, batch_size)
    baseline = {"harmful": float(refusal_scores(base_harmful, ids).mean()),
                "harmless": float(refusal_scores(base_harmless, ids).mean())}
    max_layer = math.floor(max_layer_frac * sm.n_layers)
    means = AffineAblation.reference_means(sm, harmless_val) if affine else None  # once, for every candidate
    rows = []
    grid = [(l, p) for p in candidates.positions for l in range(candidates.vectors.shape[0])]
    for layer, pos in tqdm(grid, disable=not progress, desc="select"):
        r = candidates.direction(layer, pos)
        if float(r.norm()) < 1e-8:  # e.g. layer 0 at template tokens: every prompt has the same embedding there
            rows.append({"layer": layer, "position": pos, "bypass": float("nan"), "induce": float("nan"),
                         "kl": float("nan"), "kept": False, "why": "zero vector"})
            continue
        abl = AffineAblation.from_means(r, means) if means is not None else Ablation(r)
        with abl.hooks(sm):
            bypass = float(refusal_scores(last_logprobs(sm, harmful_val, batch_size), ids).mean())
            ablated_harmless = last_logprobs(sm, harmless_val, batch_size)
        with Addition(SteeringVector({layer: r}, candidates.site)).hooks(sm):
            induce = float(refusal_scores(last_logprobs(sm, harmless_val, batch_size), ids).mean())
        kl = kl_div(base_harmless, ablated_harmless)
        why = []
        if any(math.isnan(v) for v in (bypass, induce, kl)):
            why.append("nan")
        if layer >= max_layer:
            why.append(f"layer ≥ {max_layer}")
        if kl > kl_threshold:
            why.append(f"kl > {kl_threshold}")
        if induce < induce_threshold:
            why.append(f"induce < {induce_threshold}")
        rows.append({"layer": layer, "position": pos, "bypass": bypass, "induce": induce, "kl": kl,
                     "kept": not why, "why": ", ".join(why)})
    kept = [r for r in rows if r["kept"]]
    pick = None
    if kept:
        best = min(kept, key=lambda r: r["bypass"])
        pick = (best["layer"], best["position"])
    return Selection(candidates, rows, pick, baseline, sm.n_layers, ids, max_layer,
                     {"kl_threshold": str(kl_threshold), "ablation": "affine" if affine else "directional"})


def ablation_edit(model: Any, selection: Selection, harmful_val: Sequence[str], harmless_val: Sequence[str], *,
                  subspace: bool = False, max_rank: int = 8, kl_threshold: float = 0.1, affine: bool = False,
                  offsets_from: str = "harmless:val") -> tuple[Ablation | AffineAblation, "Subspace | None"]:
    """The ablation a selection stands for: its pick's direction, or (``subspace``) the low-rank
    subspace grown from the best candidates; in affine form (coordinates kept at the harmless
    validation prompts' mean) with ``affine``. Returns the edit and the subspace (or None)."""
    if selection.pick is None and not subspace:
        raise ValueError(selection.nothing_passed())
    sub = select_subspace(model, selection, harmful_val, harmless_val, max_rank=max_rank,
                          kl_threshold=kl_threshold) if subspace else None
    edit: Ablation | AffineAblation = sub.ablation() if sub is not None else selection.ablation()
    if affine:
        edit = AffineAblation.fit(model, edit.basis, harmless_val, meta={**edit.meta, "offsets_from": offsets_from})
    return edit, sub


@dataclass
class RefusalAblation:
    """What :func:`refusal_ablation` found: the edit, and the steps that led to it."""

    edit: Ablation | AffineAblation
    candidates: Candidates
    selection: Selection
    subspace: "Subspace | None" = None


def refusal_ablation(model: Any, harmful: Sequence[str], harmless: Sequence[str], harmful_val: Sequence[str],
                     harmless_val: Sequence[str], *, positions: str = "post_instruction", site: str = "resid_pre",
                     kl_threshold: float = 0.1, affine: bool = False, subspace: bool = False, max_rank: int = 8,
                     offsets_from: str = "harmless:val", induce_threshold: float = 0.0, max_layer_frac: float = 0.8,
                     batch_size: int = 32, closest: bool = False, progress: bool = False) -> RefusalAblation:
    """The refusal-direction pipeline in one call: difference-in-means candidates from ``harmful``
    vs ``harmless`` (:func:`steering.extract.diff_in_means`), the paper's selection on the
    validation prompts (:func:`select_direction`), and the ablation it stands for
    (:func:`ablation_edit`). ``steering extract`` + ``steering select``, the recipes'
    ``refusal_ablation:`` and ``steering main`` run the same steps.

    Where no candidate passes the filters this raises, naming the closest candidate and the filter
    to relax; with ``closest=True`` it takes that candidate instead (the selection's ``pick``
    is then :attr:`Selection.closest` and its meta says so): for smoke runs on untrained models,
    not for results."""
    from .extract import diff_in_means

    cands = diff_in_means(model, harmful, harmless, site=site, positions=positions, batch_size=batch_size,
                          progress=progress)
    sel = select_direction(model, cands, harmful_val, harmless_val, kl_threshold=kl_threshold, affine=affine,
                           induce_threshold=induce_threshold, max_layer_frac=max_layer_frac, progress=progress)
    if closest and sel.pick is None and sel.closest is not None:
        sel = replace(sel, pick=sel.closest, meta={**sel.meta, "pick": "closest candidate (none passed the filters)"})
    edit, sub = ablation_edit(model, sel, harmful_val, harmless_val, subspace=subspace, max_rank=max_rank,
                              kl_threshold=kl_threshold, affine=affine, offsets_from=offsets_from)
    return RefusalAblation(edit, cands, sel, sub)


@dataclass
class Subspace:
    """A low-rank subspace grown from the best candidates, and how refusal fell as it grew."""

    basis: torch.Tensor  # [rank, d], orthonormal
    steps: list[dict[str, Any]]
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    def ablation(self) -> Ablation:
        return Ablation(self.basis, meta={**self.meta, "rank": str(self.rank)})


def select_subspace(model: Any, selection: Selection, harmful_val: Sequence[str], harmless_val: Sequence[str], *,
                    max_rank: int = 8, target_score: float | None = None, kl_threshold: float = 0.1,
                    min_gain: float = 0.05, batch_size: int = 64) -> Subspace:
    """Grow a subspace one candidate at a time (best remaining ``bypass`` first, among candidates at
    layers below the selection's cut), keeping a candidate only if it lowers the mean harmful
    refusal score by at least ``min_gain`` and the KL on harmless prompts stays within
    ``kl_threshold``; stop at ``max_rank`` or once the score falls below ``target_score`` (None:
    never; a mean log-odds below 0 still leaves many prompts refused)."""
    sm = as_model(model)
    ids, max_layer = selection.refusal_ids, selection.max_layer
    base_harmless = last_logprobs(sm, harmless_val, batch_size)
    order = sorted((r for r in selection.rows if r["layer"] < max_layer and not math.isnan(r["bypass"])),
                   key=lambda r: r["bypass"])
    chosen: list[torch.Tensor] = []
    steps: list[dict[str, Any]] = []
    score = selection.baseline["harmful"]
    for r in order:
        if len(chosen) >= max_rank or (target_score is not None and score < target_score):
            break
        cand = selection.candidates.direction(r["layer"], r["position"])
        trial = orthonormal(torch.stack(chosen + [cand]))
        if trial.shape[0] == len(chosen):  # already in the span
            continue
        with Ablation(trial).hooks(sm):
            new = float(refusal_scores(last_logprobs(sm, harmful_val, batch_size), ids).mean())
            kl = kl_div(base_harmless, last_logprobs(sm, harmless_val, batch_size))
        if new < score - min_gain and kl <= kl_threshold:
            chosen.append(cand)
            score = new
            steps.append({"rank": len(chosen), "layer": r["layer"], "position": r["position"], "bypass": new, "kl": kl})
    if not chosen:
        raise ValueError("select_subspace: no candidate lowered the refusal score within the KL limit")
    return Subspace(orthonormal(torch.stack(chosen)), steps, {**selection.candidates.meta, "method": "subspace"})
