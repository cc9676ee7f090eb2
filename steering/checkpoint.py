"""Write an edited model as a Hugging Face folder, safely.

Streaming edits of checkpoints (task vectors, HDR) and baked activation edits go through the same
writer, :func:`steering.weights.write_checkpoint`. The folder is written into a temporary sibling and renamed into place; an existing output is
refused unless ``overwrite=True``; an output inside a source folder is refused; the provenance
(method, parameters, inputs' hashes, toolkit version) goes into every safetensors file's metadata
(key ``steering``) and into a model card. The result loads with ``from_pretrained``.

A bake can give a module a bias its family's config does not declare (an addition baked into
Llama's bias-free MLP); such a checkpoint would load with the bias silently dropped. The writer
therefore checks the parameters against a model built from the config and, where a config flag
(``mlp_bias``, ``attention_bias``, ...) declares the missing biases, turns it on and gives the
other modules it governs zero biases; otherwise it refuses, naming the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .io import atomic_folder
from .model import Model
from .weights import Checkpoint, check_output, model_card, provenance_json, write_checkpoint

__all__ = ["write_hf", "read_provenance", "declare_new_biases", "check_output", "write_checkpoint"]

BIAS_FLAGS = ("mlp_bias", "attention_bias", "bias", "use_bias")


def _param_names_for(config: Any) -> set[str]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(config)
    return {n for n, _ in ref.named_parameters()}


def declare_new_biases(model: Model) -> list[str]:
    """Make every parameter of ``model`` one its config declares (see the module docstring).

    Returns the config flags it turned on."""
    have = {n for n, _ in model.hf.named_parameters()}
    extra = have - _param_names_for(model.hf.config)
    turned: list[str] = []
    if not extra:
        return turned
    for flag in BIAS_FLAGS:
        if getattr(model.hf.config, flag, None) is False:
            setattr(model.hf.config, flag, True)
            declared = _param_names_for(model.hf.config)
            if extra <= declared:
                turned.append(flag)
                for name in sorted(declared - have):
                    owner_name, _, pname = name.rpartition(".")
                    owner = model.hf.get_submodule(owner_name)
                    weight = owner.weight
                    size = weight.shape[1] if type(owner).__name__ == "Conv1D" else weight.shape[0]
                    setattr(owner, pname, nn.Parameter(torch.zeros(size, dtype=weight.dtype, device=weight.device)))
                return turned
            setattr(model.hf.config, flag, False)
    raise ValueError(f"{sorted(extra)[0]}: the edited model has this tensor but its config "
                     f"({model.hf.config.model_type}) has no flag that declares it; it would be dropped on load")


def _tied_to(state: Mapping[str, torch.Tensor], names: set[str]) -> dict[str, str]:
    """Parameters of ``state`` not in ``names`` that share storage with one that is (tied weights)."""
    ptrs = {state[n].data_ptr(): n for n in names if n in state}
    return {n: ptrs[t.data_ptr()] for n, t in state.items() if n not in names and t.data_ptr() in ptrs}


def write_hf(model: Model, out: str | os.PathLike, provenance: Mapping[str, Any], *, overwrite: bool = False,
             sources: Iterable[str | os.PathLike] = (), progress: bool = False) -> Path:
    """Save ``model`` (and its tokenizer) as a Hugging Face folder at ``out``.

    When the model was loaded from a local safetensors folder whose tensor names it still has,
    this goes through the toolkit's one writer (:func:`steering.weights.write_checkpoint`): the
    source's shards, index, dtypes and side files are kept, tensors new to the edit (an untied
    unembedding, a declared bias) go into the last shard, and the edited config replaces the
    source's. Otherwise (a hub name, a model built in memory) ``save_pretrained`` writes it."""
    sources = list(sources) + ([model.source] if model.source and Path(model.source).exists() else [])
    flags = declare_new_biases(model)
    prov: dict[str, Any] = {**provenance, "base_model": model.name}
    if flags:
        prov["config_flags_turned_on"] = flags
    ck = _source_checkpoint(model)
    state = model.hf.state_dict()
    if ck is not None and all(n in state for n in ck.names):
        tied = _tied_to(state, set(ck.names))
        extra = {n: t.detach() for n, t in state.items() if n not in ck and n not in tied}

        def side_files(tmp: Path) -> None:
            model.hf.config.save_pretrained(tmp)

        return write_checkpoint(ck, out, lambda n, _: state[n].detach(), prov, overwrite=overwrite,
                                sources=sources, extra=extra, side_files=side_files, progress=progress)
    return _save_pretrained(model, out, prov, overwrite, sources)


def _source_checkpoint(model: Model) -> Checkpoint | None:
    if not model.source or not Path(model.source).is_dir():
        return None
    try:
        return Checkpoint(model.source)
    except (OSError, ValueError):
        return None


def _save_pretrained(model: Model, out: str | os.PathLike, prov: Mapping[str, Any], overwrite: bool,
                     sources: Iterable[str | os.PathLike]) -> Path:
    from safetensors.torch import load_file, save_file

    out = check_output(Path(out), sources, overwrite)
    blob = provenance_json(prov)
    with atomic_folder(out) as tmp:
        model.hf.save_pretrained(tmp)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        for shard in sorted(tmp.glob("*.safetensors")):
            tensors = load_file(str(shard))
            save_file(tensors, str(shard), metadata={"format": "pt", "steering": blob})
        model_card(tmp, blob, model.name)
    return out


def read_provenance(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``steering`` metadata of a folder written by :func:`write_hf`."""
    from safetensors import safe_open

    shards = sorted(Path(folder).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no .safetensors files")
    with safe_open(str(shards[0]), "pt") as f:
        meta = f.metadata() or {}
    if "steering" not in meta:
        raise ValueError(f"{shards[0]}: no steering provenance in its metadata")
    return json.loads(meta["steering"])
