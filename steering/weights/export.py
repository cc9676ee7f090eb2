"""Export an edit to other tools' formats: a PEFT LoRA adapter for an :class:`~steering.edits.Ablation`.

Weight orthogonalisation changes every matrix that writes into the residual stream by an exactly
low-rank amount: with ``Q`` the ablation's orthonormal basis (``[k, d_model]``) and ``W`` a write
seen as ``[d_model, fan_in]``, ``ΔW = −Qᵀ (Q W)``, of rank ``k``. :func:`to_peft` writes that as a
PEFT LoRA adapter of rank ``r = k`` with ``lora_alpha = r`` (scaling ``lora_alpha / r = 1``,
``use_rslora=False``), ``lora_B = −Qᵀ`` and ``lora_A = Q W``, which, loaded onto the *original*
model with ``peft.PeftModel.from_pretrained(model, folder)``, gives the outputs of
``edit.bake(model)`` (up to float error). ``adapter_config.json`` declares ``task_type="CAUSAL_LM"``
and, as ``base_model_name_or_path``, the model as it was given: the ``source`` of the
:class:`~steering.model.Model`, i.e. the hub name or folder passed to ``steering.load`` as written,
not made absolute (an ``organism:KIND`` is recorded as the organism's cached folder);
``base_model=`` overrides it. So ``peft.AutoPeftModelForCausalLM.from_pretrained(folder)`` loads
base model and adapter in one call wherever that name resolves.

PEFT conventions used (peft 0.21, ``peft/tuners/lora/layer.py``):

- ``nn.Linear`` (layout ``out_in``, ``W`` ``[d_model, in]``): ``ΔW = lora_B.weight @ lora_A.weight``,
  ``lora_A.weight`` ``[r, in]``, ``lora_B.weight`` ``[d_model, r]``.
- GPT-2 ``Conv1D`` (layout ``in_out``, ``W`` ``[in, d_model]``): ``fan_in_fan_out=True``; the forward adds
  ``x @ lora_A.weightᵀ @ lora_B.weightᵀ``, so ``ΔW = (lora_B.weight @ lora_A.weight)ᵀ``, same shapes as Linear.
- ``nn.Embedding`` (``W`` ``[V, d_model]``): the forward adds ``F.embedding(ids, lora_embedding_Aᵀ) @
  lora_embedding_Bᵀ`` (times the layer's ``embed_scale`` if it has one), so ``ΔW = (lora_embedding_B @
  lora_embedding_A)ᵀ``, ``lora_embedding_A`` ``[r, V]``, ``lora_embedding_B`` ``[d_model, r]``.
- fused MoE experts (``nn.Parameter`` ``[E, d_model, in]``, ``target_parameters``): ``lora_A.weight``
  ``[E·r, in]`` read as ``[E, r, in]``, ``lora_B.weight`` ``[d_model, r·E]`` read as ``[d_model, r, E]``;
  ``ΔW[e] = B[:, :, e] @ A[e]``.

Stream-writing biases (GPT-2, GPT-NeoX, OPT, Phi) are carried with PEFT's ``bias="lora_only"``: the
projected biases are saved as ``<module>.base_layer.bias`` and *replace* the base model's biases when
the adapter loads (disabling or unloading the adapter does not restore them). A learned positional
embedding whose forward is not a plain lookup (OPT's, which is called with the attention mask) is
carried whole, projected, as a ``modules_to_save`` module. Target modules are one regex matching
exactly the edited modules' full names.

Tied embeddings (GPT-2, OPT): the embedding LoRA changes the lookup only, so the tied unembedding is
left alone, as ``bake`` does (it unties). Merging (``merge_and_unload``) would write the change into
the shared matrix and so also into the unembedding: untie first, or use the adapter unmerged.

Refused, naming the piece: post-norm families (the same :class:`~steering.arch.ArchitectureError` as ``bake``),
partial ablations (some layers or sites: no weight form), and weights or embeddings PEFT cannot
express exactly. Provenance goes into ``steering_provenance.json``, ``README.md``, the safetensors
metadata (key ``steering``) and the edit itself (``steering_edit.safetensors``); not into
``adapter_config.json``, whose unknown keys PEFT 0.21 drops with a warning that the file came
from a newer PEFT.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..arch import get_path
from .files import check_output
from ..edits import ABLATION_SITES, Ablation, project_rows
from ..io import atomic_folder
from ..model import Model, as_model

PEFT_PREFIX = "base_model.model."


@dataclass
class _Piece:
    """One edited module: how PEFT wraps it and the tensors of the adapter file."""

    module: str  # full module name in the HF model
    kind: str  # "linear", "conv1d", "embedding", "experts", "full"
    tensors: dict[str, Tensor]  # adapter-file keys (without the PEFT prefix) -> tensors
    param: str = "weight"


def _names(hf: nn.Module) -> dict[int, str]:
    out: dict[int, str] = {}
    for n, mod in hf.named_modules():
        out.setdefault(id(mod), n)
    return out


def _cpu(t: Tensor) -> Tensor:
    return t.float().cpu().contiguous()


def _is_plain_lookup(emb: nn.Module) -> bool:
    """An nn.Embedding whose forward PEFT's embedding LoRA reproduces (a lookup, optionally times embed_scale)."""
    return isinstance(emb, nn.Embedding) and (type(emb).forward is nn.Embedding.forward or hasattr(emb, "embed_scale"))


def _check_bakeable(edit: Ablation, sm: Model) -> None:
    """Raise exactly what ``edit.bake`` raises for a model / ablation it cannot bake (before it copies anything)."""
    if sm.map.spec.post_norm or edit.layers is not None or set(edit.sites) != set(ABLATION_SITES):
        edit.bake(sm)  # raises ArchitectureError (post-norm) or ValueError (partial) before copying anything
        raise ValueError("to_peft: this ablation has no exact weight form")  # not reached
    if edit.basis.shape[1] != sm.d_model:
        raise ValueError(f"ablation basis has d={edit.basis.shape[1]}, the model has d_model={sm.d_model}")


def _pieces(edit: Ablation, sm: Model) -> list[_Piece]:
    """The adapter's modules and tensors, in the model's order (embeddings, then layer by layer)."""
    q = edit.basis.double()
    minus_qt = (-q.T).float().contiguous()  # lora_B of every piece: [d_model, k]
    names = _names(sm.hf)
    out: list[_Piece] = []

    def name_of(mod: nn.Module, what: str) -> str:
        n = names.get(id(mod))
        if n is None or "_original_component" in n:
            raise ValueError(f"to_peft: cannot name the {what} module as a Hugging Face module path "
                             "(export from the Hugging Face model, not a TransformerLens bridge)")
        return n

    for piece in ("embed", "pos_embed"):
        if not getattr(sm.map.spec, piece):
            continue
        emb = sm.map.module(piece)
        name = name_of(emb, piece)
        w = emb.weight.detach()
        if _is_plain_lookup(emb):
            a = _cpu(q.to(w.device) @ w.double().T)  # [k, V]
            out.append(_Piece(name, "embedding", {f"{name}.lora_embedding_A": a, f"{name}.lora_embedding_B": minus_qt.clone()}))
        elif piece == "pos_embed" and isinstance(emb, nn.Embedding) and [n for n, _ in emb.named_parameters()] == ["weight"]:
            # e.g. OPT's learned positions: PEFT's LoRA would look up its forward's first argument (the attention
            # mask), so carry the projected table whole, as bake computes it.
            out.append(_Piece(name, "full", {f"{name}.weight": project_rows(w, edit.basis).cpu().contiguous()}))
        else:
            raise ValueError(f"to_peft: {name}.weight: {type(emb).__name__} is not a plain embedding lookup, "
                             "so a PEFT embedding LoRA cannot express its change")

    for sw in sm.map.stream_writers():  # the walk Ablation.bake follows; the embeddings were done above
        if sw.layout is None:
            continue
        layer, which, owner, pname, layout = sw.layer, sw.kind, sw.owner, sw.attr, sw.layout
        oname = name_of(owner, f"layer {layer} {which} output")
        full = f"{oname}.{pname}"
        w = getattr(owner, pname).detach().double()
        qd = q.to(w.device)
        if layout == "experts_out_in":
            if w.ndim != 3 or getattr(owner, "is_transposed", False):
                raise ValueError(f"to_peft: {full}: expected fused experts [E, d_model, in], got shape "
                                 f"{tuple(w.shape)}{' (transposed)' if getattr(owner, 'is_transposed', False) else ''}")
            if getattr(owner, f"{pname}_bias", None) is not None:
                raise ValueError(f"to_peft: {full}_bias: fused expert biases have no LoRA form (and bake leaves them)")
            n_exp, k = w.shape[0], q.shape[0]
            a = torch.einsum("kd,edn->ekn", qd, w).reshape(n_exp * k, w.shape[2])  # row e·k + j
            b = minus_qt[:, :, None].expand(-1, -1, n_exp).reshape(minus_qt.shape[0], k * n_exp)  # col j·E + e
            out.append(_Piece(oname, "experts", {f"{oname}.lora_A.weight": _cpu(a),
                                                 f"{oname}.lora_B.weight": b.contiguous()}, pname))
            continue
        kind = {"out_in": "linear", "in_out": "conv1d"}.get(layout)
        ok = pname == "weight" and (isinstance(owner, nn.Linear) if kind == "linear"
                                    else type(owner).__name__ == "Conv1D" if kind == "conv1d" else False)
        if not ok:
            raise ValueError(f"to_peft: {full}: {type(owner).__name__} with layout {layout!r} is not a module "
                             "PEFT's LoRA wraps (nn.Linear / transformers Conv1D)")
        w_dm = w if kind == "linear" else w.T  # [d_model, in]
        tensors = {f"{oname}.lora_A.weight": _cpu(qd @ w_dm), f"{oname}.lora_B.weight": minus_qt.clone()}
        bias = getattr(owner, "bias", None)
        if isinstance(bias, Tensor):  # as bake: the bias loses its component in the span of Q
            tensors[f"{oname}.base_layer.bias"] = project_rows(bias.detach()[None], edit.basis)[0].cpu().contiguous()
        out.append(_Piece(oname, kind, tensors))
    return out


def _target_regex(hf: nn.Module, names: list[str], layers_name: str, n_layers: int) -> str:
    """A regex that fullmatches exactly ``names`` among the model's modules (layer indices folded when complete)."""
    per_rest: dict[str, set[int]] = {}
    other: list[str] = []
    prefix = f"{layers_name}."
    for n in names:
        m = re.fullmatch(rf"{re.escape(prefix)}(\d+)\.(.+)", n) if layers_name else None
        if m:
            per_rest.setdefault(m.group(2), set()).add(int(m.group(1)))
        else:
            other.append(n)
    alts = [re.escape(n) for n in other]
    for rest, idx in per_rest.items():
        if idx == set(range(n_layers)):
            alts.append(rf"{re.escape(prefix)}\d+\.{re.escape(rest)}")
        else:
            alts.extend(re.escape(f"{prefix}{i}.{rest}") for i in sorted(idx))
    pattern = "|".join(alts)
    pattern = f"(?:{pattern})" if len(alts) > 1 else pattern
    matched = {n for n, _ in hf.named_modules() if re.fullmatch(pattern, n)}
    if matched != set(names):  # never wrap anything else
        pattern = "(?:" + "|".join(re.escape(n) for n in names) + ")"
    return pattern


def _base_name(sm: Model, base_model: str | os.PathLike | None = None) -> str | None:
    """The base model as the user named it: ``base_model`` if given, else the hub name or folder the
    model was loaded from (``Model.source``, then the config's ``_name_or_path``), unchanged: a relative
    folder stays relative; if unknown, None."""
    if base_model is not None:
        return os.fspath(base_model)
    return sm.source or str(getattr(sm.hf.config, "_name_or_path", "") or "") or None


def lora_config(edit: Ablation, model: Any, *, base_model: str | os.PathLike | None = None) -> tuple[Any, list[_Piece]]:
    """The ``peft.LoraConfig`` and the adapter tensors :func:`to_peft` writes (nothing is written)."""
    from peft import LoraConfig

    sm = as_model(model)
    _check_bakeable(edit, sm)
    pieces = _pieces(edit, sm)
    names = _names(sm.hf)
    layers_name = names.get(id(get_path(sm.hf, sm.map.spec.layers, "decoder layers")), "")
    wrapped = [p.module for p in pieces if p.kind in ("linear", "conv1d", "embedding")]
    conv = {p.kind for p in pieces} & {"linear", "conv1d"}
    if conv == {"linear", "conv1d"}:
        bad = next(p for p in pieces if p.kind == "conv1d")
        raise ValueError(f"to_peft: {bad.module}: a model mixing nn.Linear and Conv1D writes needs two fan_in_fan_out "
                         "settings; one PEFT LoRA config has one")
    r = edit.rank
    config = LoraConfig(
        r=r, lora_alpha=r, use_rslora=False, lora_dropout=0.0, init_lora_weights=True,
        target_modules=_target_regex(sm.hf, wrapped, layers_name, sm.n_layers) if wrapped else [],
        target_parameters=[f"{p.module}.{p.param}" for p in pieces if p.kind == "experts"] or None,
        modules_to_save=[p.module for p in pieces if p.kind == "full"] or None,
        fan_in_fan_out=conv == {"conv1d"},
        bias="lora_only" if any(k.endswith(".base_layer.bias") for p in pieces for k in p.tensors) else "none",
        base_model_name_or_path=_base_name(sm, base_model), inference_mode=True, task_type="CAUSAL_LM",
    )
    return config, pieces


def _readme(prov: dict[str, Any], config: Any) -> str:
    tied = prov.get("tied_embeddings")
    base = f"`{prov['base_model']}`" if prov.get("base_model") else "the base model"
    notes = []
    if config.bias != "none":
        notes.append("- The adapter carries the projected biases of the edited modules (`bias=\"lora_only\"`): they "
                     "replace the base model's biases when the adapter loads, and stay after `disable_adapter()` / `unload()`.")
    if config.modules_to_save:
        notes.append(f"- Carried whole (projected): {', '.join(f'`{m}`' for m in config.modules_to_save)}.")
    if tied:
        notes.append("- The base model ties its embedding and unembedding; the adapter changes the embedding lookup "
                     "only. Use it unmerged, or untie before `merge_and_unload()` (merging writes into the shared matrix).")
    return (
        "---\nlibrary_name: peft\ntags: [steering, ablation, lora]\n"
        + (f"base_model: {prov['base_model']}\n" if prov.get("base_model") else "")
        + "---\n# Directional ablation as a LoRA adapter\n\n"
        f"Rank-{prov['rank']} weight orthogonalisation of {base}, exported by "
        "`steering.export.to_peft`. Loaded onto the original model it gives the outputs of the baked edit:\n\n"
        "```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"path/to/this/folder\")\n"
        + ("# or, base model and adapter in one call (the base model is loaded from `base_model_name_or_path`):\n"
           "from peft import AutoPeftModelForCausalLM\n"
           "model = AutoPeftModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n" if prov.get("base_model") else "")
        + "```\n\n"
        + ("\n".join(notes) + "\n\n" if notes else "")
        + f"## Provenance\n\n```json\n{json.dumps(prov, indent=2, sort_keys=True)}\n```\n"
    )


def to_peft(edit: Ablation, model: Any, out: str | os.PathLike, *, overwrite: bool = False,
            base_model: str | os.PathLike | None = None) -> Path:
    """Write ``edit`` as a PEFT LoRA adapter folder at ``out`` (rank = the ablation's rank); returns its path.

    ``PeftModel.from_pretrained(original_hf_model, out)`` then gives ``edit.bake(model)``'s outputs, and so
    does ``AutoPeftModelForCausalLM.from_pretrained(out)`` where the recorded base model resolves: that is
    ``base_model`` if given (e.g. the hub name of a model loaded from a local copy), else the hub name or
    folder ``model`` was loaded from, as given.
    An existing ``out`` is refused unless ``overwrite=True``; the folder is written beside ``out``
    and renamed into place, so a failure leaves nothing behind.
    """
    from safetensors.torch import save_file

    from .._version import __version__

    if not isinstance(edit, Ablation):
        raise TypeError(f"to_peft: only an Ablation is a low-rank weight change; got {type(edit).__name__}")
    sm = as_model(model)
    sources = [sm.source] if sm.source and Path(sm.source).exists() else []
    out = check_output(Path(out), sources, overwrite)
    config, pieces = lora_config(edit, sm, base_model=base_model)
    tensors = {PEFT_PREFIX + k: v for p in pieces for k, v in p.tensors.items()}
    try:
        head, emb = sm.hf.get_output_embeddings(), sm.hf.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        head = emb = None
    prov = {
        "format": "steering.peft_adapter", "kind": edit.kind, "rank": edit.rank, "meta": dict(edit.meta),
        "sites": list(edit.sites), "base_model": config.base_model_name_or_path, "architecture": sm.map.spec.name,
        "steering_version": __version__,
        "tied_embeddings": bool(head is not None and emb is not None and head.weight is emb.weight),
        "lora_modules": sum(p.kind != "full" for p in pieces),
        "full_modules": [p.module for p in pieces if p.kind == "full"],
        "biases": sum(k.endswith(".base_layer.bias") for k in tensors),
    }
    if out.is_file() or out.is_symlink():  # atomic_folder replaces folders; a file in the way goes first
        out.unlink()
    with atomic_folder(out) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt", "steering": json.dumps(prov, sort_keys=True)})
        (tmp / "steering_provenance.json").write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(_readme(prov, config))
        edit.save(tmp / "steering_edit.safetensors")
    return out
