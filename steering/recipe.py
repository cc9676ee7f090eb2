"""``steering run RECIPE.yaml``: compose weight edits into one output checkpoint, mergekit-style.

A recipe names the model to edit, the output folder, and a list of steps::

    model: organism:drifted            # a folder, a hub name, or organism:[ARCH/]KIND
    out: runs/drifted-safe
    steps:
      - hdr:                           # θ -= scale · topk(τ_H)
          harm: {base: organism:aligned, finetuned: organism:harmful}
          scale: 3.0
          top_k: 0.1
      - task_arithmetic:               # θ += scale · Σ τ_i
          vectors: [{file: runs/tau_style.safetensors}]
          scale: 0.5
      - ties: {vectors: [{base: A, finetuned: B}, {base: A, finetuned: C}], top_k: 0.2, scale: 1.0}
      - bake: {edit: runs/direction.safetensors}   # an ablation / addition edit file

A task vector is ``{base: DIR, finetuned: DIR}`` or ``{file: FILE}`` (written by ``steering
task-vector``), optionally with ``include`` / ``exclude`` regexes, ``top_k`` (+ ``scope``:
global or tensor) and ``dare`` (+ ``seed``). Paths are relative to the working directory.

Weight-space steps (task arithmetic, TIES, HDR) are deltas: their sum is added to the model's
weights in one streamed pass, tensor by tensor (no model in memory). ``bake`` steps need the
model's structure, so a recipe with them loads the model, adds the weight deltas, bakes the edits
in order, and writes through the same writer. Unknown keys are errors, named with their path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .taskvec import TaskVector, ties


def resolve(path: str) -> str:
    """``organism:KIND`` or ``organism:ARCH/KIND`` → that organism's folder (built on first use);
    anything else unchanged."""
    if not isinstance(path, str) or not path.startswith("organism:"):
        return path
    from . import organisms

    spec = path.split(":", 1)[1]
    arch, _, kind = spec.rpartition("/")
    return str(organisms.get(kind, **({"arch": arch} if arch else {})))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VectorSpec(_Strict):
    base: str | None = None
    finetuned: str | None = None
    file: str | None = None
    include: str | list[str] | None = None
    exclude: str | list[str] | None = None
    top_k: float | None = None
    scope: Literal["global", "tensor"] = "global"
    dare: float | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> "VectorSpec":
        if (self.file is None) == (self.base is None or self.finetuned is None):
            raise ValueError("a task vector is either {file: FILE} or {base: DIR, finetuned: DIR}")
        if self.file is not None and (self.include or self.exclude):
            raise ValueError("include / exclude apply to {base, finetuned}, not to a saved file")
        return self

    def build(self) -> TaskVector:
        if self.file is not None:
            v = TaskVector.load(self.file)
        else:
            v = TaskVector.between(resolve(self.base), resolve(self.finetuned), include=self.include, exclude=self.exclude)
        if self.dare:
            v = v.dare(self.dare, self.seed)
        if self.top_k is not None and self.top_k < 1.0:
            v = v.top_k(self.top_k, self.scope)
        return v


class TaskArithmetic(_Strict):
    vectors: list[VectorSpec]
    scale: float = 1.0


class Ties(_Strict):
    vectors: list[VectorSpec]
    top_k: float = 0.2
    scale: float = 1.0


class Hdr(_Strict):
    harm: VectorSpec
    scale: float = 3.0
    top_k: float | None = 0.1
    scope: Literal["global", "tensor"] = "global"


class Bake(_Strict):
    edit: str


class Step(_Strict):
    task_arithmetic: TaskArithmetic | None = None
    ties: Ties | None = None
    hdr: Hdr | None = None
    bake: Bake | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Step":
        given = [k for k in ("task_arithmetic", "ties", "hdr", "bake") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("each step is exactly one of task_arithmetic, ties, hdr, bake")
        return self

    def delta(self) -> TaskVector | None:
        """This step's weight delta, or None for a bake."""
        if self.task_arithmetic is not None:
            vs = [v.build() for v in self.task_arithmetic.vectors]
            total = vs[0]
            for v in vs[1:]:
                total = total + v
            return self.task_arithmetic.scale * total
        if self.ties is not None:
            return self.ties.scale * ties([v.build() for v in self.ties.vectors], self.ties.top_k)
        if self.hdr is not None:
            h = self.hdr.harm.build()
            if self.hdr.top_k is not None and self.hdr.top_k < 1.0:
                h = h.top_k(self.hdr.top_k, self.hdr.scope)
            return -self.hdr.scale * h
        return None


class Recipe(_Strict):
    model: str
    out: str
    steps: list[Step]
    overwrite: bool = False
    trust_remote_code: bool = False

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such recipe file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            raise ValueError(f"{path}: {where}: {err['msg']}") from None


def run(recipe: Recipe | str | os.PathLike, *, out: str | None = None, overwrite: bool | None = None,
        progress: bool = True) -> Path:
    """Carry out a recipe; returns the output folder."""
    from .taskvec import apply

    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    out = out or recipe.out
    overwrite = recipe.overwrite if overwrite is None else overwrite
    model = resolve(recipe.model)
    deltas = [d for d in (s.delta() for s in recipe.steps) if d is not None]
    bakes = [s.bake.edit for s in recipe.steps if s.bake is not None]
    prov = {"method": "recipe", "recipe": recipe.model_dump(exclude_none=True)}
    total = None
    for d in deltas:
        total = d if total is None else total + d
    if not bakes:
        if total is None:
            raise ValueError("the recipe has no steps")
        return apply(model, total, out, overwrite=overwrite, provenance=prov, progress=progress)
    return _with_bakes(model, total, bakes, out, overwrite, prov, recipe.trust_remote_code, progress)


def _with_bakes(model_path: str, delta: TaskVector | None, bakes: list[str], out: str, overwrite: bool,
                prov: dict[str, Any], trust_remote_code: bool, progress: bool) -> Path:
    import torch

    from .checkpoint import check_output, write_hf
    from .edits import load_edit
    from .model import load

    sources = [model_path] + (delta.sources() if delta is not None else [])
    check_output(out, sources, overwrite)  # fail before the work
    edits = [load_edit(p) for p in bakes]
    m = load(model_path, trust_remote_code=trust_remote_code)
    if delta is not None:
        params = dict(m.hf.named_parameters())
        with torch.no_grad():
            for name in delta.names:
                if name not in params:
                    raise ValueError(f"{name}: in the recipe's task vectors but not a parameter of {model_path}")
                p = params[name]
                if tuple(p.shape) != delta.shapes[name]:
                    raise ValueError(f"{name}: shape {delta.shapes[name]} in the task vectors but {tuple(p.shape)} in {model_path}")
                p.copy_((p.float() + delta.get(name)).to(p.dtype))
    for e in edits:
        m = e.bake(m)
    return write_hf(m, out, prov, overwrite=overwrite, sources=sources, progress=progress)
