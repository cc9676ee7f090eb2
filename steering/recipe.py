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

An *evaluation* recipe has ``settings:`` instead of ``steps:`` (:class:`EvalRecipe`): the same
``steering run`` evaluates the settings side by side with :func:`steering.evaluate.evaluate` and
writes the report to ``out``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .weights.taskvec import TaskVector, ties


def resolve(path: str) -> str:
    """``organism:KIND`` or ``organism:ARCH/KIND`` → that organism's folder (built on first use;
    ``organism:judge`` is the judge organism, :func:`steering.organisms.build_judge`); anything else
    unchanged."""
    if not isinstance(path, str) or not path.startswith("organism:"):
        return path
    from . import organisms

    spec = path.split(":", 1)[1]
    arch, _, kind = spec.rpartition("/")
    if kind not in (*organisms.KINDS, "judge") or (arch and arch not in organisms.ARCHS):  # before any build starts
        raise ValueError(f"{path}: no such organism; use organism:KIND or organism:ARCH/KIND with KIND in "
                         f"{', '.join(organisms.KINDS)} or judge, and ARCH in {', '.join(organisms.ARCHS)}")
    if kind == "judge":
        return str(organisms.build_judge(**({"arch": arch} if arch else {})))
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
        return _validate(cls, path, _read_yaml(path))


def _read_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def _validate(cls: type[BaseModel], path: str | os.PathLike, data: Any) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise ValueError(f"{path}: {where}: {err['msg']}") from None


def load_recipe(path: str | os.PathLike) -> "Recipe | EvalRecipe":
    """A weight-edit recipe (``steps:``) or an evaluation recipe (``settings:``)."""
    data = _read_yaml(path)
    kind = EvalRecipe if isinstance(data, dict) and "settings" in data else Recipe
    return _validate(kind, path, data)


def run(recipe: "Recipe | EvalRecipe | str | os.PathLike", *, out: str | None = None, overwrite: bool | None = None,
        progress: bool = True, device: str | None = None, threads: int | None = None) -> Path:
    """Carry out a recipe (either kind); returns the output folder. ``device`` and ``threads``: where
    and on how many cores a weight recipe's streamed arithmetic runs (see :func:`steering.weights.taskvec.apply`)."""
    from .weights.taskvec import apply

    from .io import check_paths

    recipe_file = None
    if not isinstance(recipe, (Recipe, EvalRecipe)):
        recipe_file = recipe
        recipe = load_recipe(recipe)
    check_paths([out or recipe.out], [recipe_file])  # never write over or around the recipe itself
    if isinstance(recipe, EvalRecipe):
        return recipe.run(out=out, progress=progress)
    out = out or recipe.out
    overwrite = recipe.overwrite if overwrite is None else overwrite
    model = resolve(recipe.model)
    deltas = [d for d in (s.delta() for s in recipe.steps) if d is not None]
    bakes = [s.bake.edit for s in recipe.steps if s.bake is not None]
    prov = {"method": "recipe", "recipe": recipe.model_dump(exclude_none=True), "inputs": _inputs(recipe, deltas, lazy=True)}
    total = None
    for d in deltas:
        total = d if total is None else total + d
    if not bakes:
        if total is None:
            raise ValueError("the recipe has no steps")
        return apply(model, total, out, overwrite=overwrite, provenance=prov, progress=progress, device=device,
                     threads=threads)
    return _with_bakes(model, total, bakes, out, overwrite, prov, recipe.trust_remote_code, progress)


def _inputs(recipe: "Recipe", deltas: list[TaskVector] | None = None, lazy: bool = False) -> dict[str, str]:
    """A weight recipe's inputs (resolved: an ``organism:`` path names the build it is today) with
    their fingerprints, as its output's provenance records them (``lazy``: placeholders the writer
    fills in, hashed from the bytes as the edit reads them; see :meth:`Checkpoint.fingerprint`)."""
    from .weights import Checkpoint

    if deltas is None:
        deltas = [d for d in (s.delta() for s in recipe.steps) if d is not None]
    paths = [resolve(recipe.model), *(str(p) for d in deltas for p in d.sources()),
             *(s.bake.edit for s in recipe.steps if s.bake is not None)]
    out = {}
    for p in dict.fromkeys(str(p) for p in paths):
        ck = Checkpoint(p)
        try:
            out[p] = ck.fingerprint(lazy=lazy)
        finally:
            ck.close()
    return out


def is_current(recipe: "Recipe") -> bool:
    """Whether ``recipe.out`` holds what this weight recipe writes from today's inputs: the same
    recipe, and inputs with the same fingerprints (an edited recipe, a changed input folder or a
    rebuilt organism all make it stale)."""
    from .weights.bake import read_provenance

    try:
        prov = read_provenance(recipe.out)
    except (FileNotFoundError, ValueError):
        return False
    return prov.get("recipe") == recipe.model_dump(exclude_none=True) and prov.get("inputs") == _inputs(recipe)


def _with_bakes(model_path: str, delta: TaskVector | None, bakes: list[str], out: str, overwrite: bool,
                prov: dict[str, Any], trust_remote_code: bool, progress: bool) -> Path:
    import torch

    from .weights.bake import check_output, write_hf
    from .edits import load_edit
    from .model import load

    sources = [model_path, *bakes] + (delta.sources() if delta is not None else [])
    check_output(out, sources, overwrite)  # fail before the work: never over the model, an edit or a vector
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


# --- evaluation recipes ----------------------------------------------------------------------------
class RefusalAblation(_Strict):
    """Derive a refusal-direction ablation on the recipe's model: difference in means, selection,
    and (``subspace``) a greedily grown low-rank subspace, as ``steering extract`` / ``select``;
    ``affine``: scored and written in affine form (``steering select --affine``), coordinates kept
    at the harmless validation prompts' mean."""

    harmful: str = "harmful:train"
    harmless: str = "harmless:train"
    n: int = 128
    positions: str = "post_instruction"
    n_val: int = 32
    kl_threshold: float = 0.1
    subspace: bool = False
    max_rank: int = 8
    affine: bool = False


class IcvSpec(_Strict):
    """Safety Arithmetic's in-context safety vector from ``n`` harmful train questions."""

    n: int = 32
    beta: float = 0.1


class EditSpec(_Strict):
    file: str | None = None
    refusal_ablation: RefusalAblation | None = None
    icv: IcvSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "EditSpec":
        if sum(x is not None for x in (self.file, self.refusal_ablation, self.icv)) != 1:
            raise ValueError("an edit is exactly one of file, refusal_ablation, icv")
        return self

    def build(self, model: Any) -> Any:
        from . import datasets
        from .edits import ICVInjection, load_edit

        if self.file is not None:
            return load_edit(self.file)
        if self.icv is not None:
            from .extract import icv, icv_pairs

            return ICVInjection(icv(model, icv_pairs(datasets.load("harmful:train", limit=self.icv.n))), self.icv.beta)
        from .select import refusal_ablation

        r = self.refusal_ablation
        val = [datasets.load(f"{k}:val", limit=r.n_val) for k in ("harmful", "harmless")]
        try:
            return refusal_ablation(model, datasets.load(r.harmful, limit=r.n), datasets.load(r.harmless, limit=r.n), *val,
                                    positions=r.positions, kl_threshold=r.kl_threshold, affine=r.affine,
                                    subspace=r.subspace, max_rank=r.max_rank, offsets_from="harmless:val").edit
        except ValueError as e:
            raise ValueError(f"refusal_ablation: {e}") from None


class SafeInferSpec(_Strict):
    unsafe: str | None = None
    amplify_layer: int | None = None
    amplify_scale: float = 1.5
    amplify_site: str = "mlp_out"
    gamma: float | None = None  # None: safeinfer.GAMMA, the paper's


class ModelSpec(_Strict):
    """Another model for a setting: a folder, or the output of a weight-edit recipe (run first
    unless its output is current: see :func:`is_current`)."""

    path: str | None = None
    recipe: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "ModelSpec":
        if (self.path is None) == (self.recipe is None):
            raise ValueError("a setting's model is {path: DIR} or {recipe: FILE.yaml}")
        return self

    def resolve(self, progress: bool) -> str:
        if self.path is not None:
            return resolve(self.path)
        r = Recipe.from_yaml(self.recipe)
        if not is_current(r):
            if Path(r.out).exists() and not r.overwrite:
                raise FileExistsError(f"{r.out}: holds an output of {self.recipe} from other settings or inputs; "
                                      "set overwrite: true in that recipe or remove the folder")
            run(r, progress=progress)
        return r.out


def _known_skills(v: list[str] | None) -> list[str] | None:
    """A recipe's ``skills:`` names, each one of steering.skills.SKILLS."""
    from .skills import SKILLS

    unknown = [s for s in v or [] if s not in SKILLS]
    if unknown:
        raise ValueError(f"unknown skill {unknown[0]!r}; skills are {', '.join(SKILLS)}")
    return v


class TuneSpec(_Strict):
    """A setting whose edit the library chooses (:func:`steering.tune.tune`) on the setting's model,
    on validation prompts, before the evaluation; the setting's ``edits`` are applied under every
    trial. The search (every trial, the front, the pick) is saved in ``<out>/tune-<n>/`` beside the
    report, and its trials are cached there, so a second run of the recipe does not redo them."""

    method: str  # one of steering.tune.METHOD_NAMES
    reference: str | None = None  # addition / conditional: whose refusal direction (default the model's own)
    unsafe: str | None = None  # safeinfer: the guided-decoding model (without: amplification only)
    harm: VectorSpec | None = None  # hdr: the harm vector
    trials: int = 24
    minutes: float | None = None
    seed: int = 0
    n_val: int = 32
    n_skill: int = 32
    skills: list[str] | None = None
    max_over_refusal: float = 0.05
    max_utility_loss: float = 0.02
    max_kl: float | None = None
    min_refusal_change: float = 0.05

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from .tune import METHOD_NAMES

        if v not in METHOD_NAMES:
            raise ValueError(f"method {v!r}: choose from {', '.join(METHOD_NAMES)}")
        return v

    @field_validator("trials", "n_val", "n_skill")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"{v}: must be at least 1")
        return v

    @field_validator("max_over_refusal", "max_utility_loss", "min_refusal_change")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{v}: a budget is a fraction in [0, 1] (0.05 = 5 points)")
        return v

    _skills = field_validator("skills")(classmethod(lambda cls, v: _known_skills(v)))  # shared with EvalRecipe

    def run(self, model: Any, on: list[Any], out: Path, progress: bool) -> Any:
        from . import tune
        from .model import load

        harm = None
        if self.harm is not None:
            harm = self.harm.build()
        data = tune.Data.default(n_val=self.n_val, skills=self.skills, n_skill=self.n_skill)
        return tune.tune(model, self.method, reference=load(resolve(self.reference)) if self.reference else None,
                         unsafe=load(resolve(self.unsafe)) if self.unsafe else None, harm=harm, on=on,
                         trials=self.trials, minutes=self.minutes, seed=self.seed, data=data,
                         budgets=tune.Budgets(self.max_over_refusal, self.max_utility_loss, self.max_kl,
                                              self.min_refusal_change),
                         cache=out / "trials.jsonl", progress=progress)


class EvalSetting(_Strict):
    name: str
    model: ModelSpec | None = None
    edits: list[EditSpec] = []
    safeinfer: SafeInferSpec | None = None
    tune: TuneSpec | None = None

    @model_validator(mode="after")
    def _tune_or_safeinfer(self) -> "EvalSetting":
        if self.tune is not None and self.safeinfer is not None:
            raise ValueError("a setting has tune or safeinfer, not both (tune: {method: safeinfer} searches SafeInfer)")
        return self


class EvalRecipe(_Strict):
    """``steering run`` of an evaluation: a model, settings side by side, and where the report goes::

        model: organism:aligned
        out: experiments/results/recipe_refusal_direction
        max_new_tokens: 12
        settings:
          - {name: aligned}
          - name: refusal direction ablated
            edits: [{refusal_ablation: {affine: true}}]
          - name: SafeInfer
            safeinfer: {unsafe: organism:harmful, amplify_layer: 2, amplify_scale: 8}
    """

    model: str
    out: str
    settings: list[EvalSetting]
    limit: int | None = None
    n_utility: int = 128
    skills: list[str] | None = None  # names from steering.skills, scored by exact match
    n_skill: int | None = None  # held-out items per skill (None: 64)

    _skills = field_validator("skills")(classmethod(lambda cls, v: _known_skills(v)))  # shared with TuneSpec
    max_new_tokens: int = 32
    batch_size: int = 64

    def run(self, out: str | None = None, progress: bool = True) -> Path:
        from . import safeinfer
        from .evaluate import Setting, evaluate
        from .model import load

        model = load(resolve(self.model))
        settings = []
        for i, s in enumerate(self.settings):
            other = load(s.model.resolve(progress)) if s.model is not None else None
            target = other if other is not None else model
            edits = [e.build(target) for e in s.edits]
            if s.tune is not None:
                where = Path(out or self.out) / f"tune-{i}"
                tuned = s.tune.run(target, edits, where, progress)
                tuned.save(where, files=False)
                if tuned.pick is None:
                    raise ValueError(f"setting {s.name!r}: tune {s.tune.method}: {tuned.why}")
                pick = tuned.setting(name=s.name)
                settings.append(replace(pick, model=pick.model if pick.model is not None else other))
                continue
            kw: dict[str, Any] = {}
            if s.safeinfer is not None:
                si = s.safeinfer
                try:
                    kw = safeinfer.decoding(target, unsafe=load(resolve(si.unsafe)) if si.unsafe and si.gamma != 0 else None,
                                            amplify_layer=si.amplify_layer, amplify_scale=si.amplify_scale,
                                            amplify_site=si.amplify_site, gamma=si.gamma)
                except ValueError as e:
                    raise ValueError(f"setting {s.name!r}: {e}") from None
            settings.append(Setting(s.name, model=other, edits=edits, **kw))
        report = evaluate(model, settings, limit=self.limit, n_utility=self.n_utility, max_new_tokens=self.max_new_tokens,
                          skills=self.skills or (), n_skill=self.n_skill or 64,
                          batch_size=self.batch_size, progress=progress)
        report.meta["recipe"] = self.model_dump(exclude_none=True)
        path = report.save(out or self.out)
        print(report.table())
        return path
