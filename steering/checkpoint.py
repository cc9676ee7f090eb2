"""Write an edited model as a Hugging Face folder, safely.

The folder is written into a temporary sibling and renamed into place; an existing output is
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


def check_output(out: Path, sources: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    out = Path(out).expanduser().resolve()
    for src in sources:
        s = Path(src).expanduser().resolve()
        if out == s or s in out.parents:
            raise ValueError(f"{out}: the output is inside the source {s}; write somewhere else")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists; pass overwrite=True (--overwrite) to replace it")
    return out


def write_hf(model: Model, out: str | os.PathLike, provenance: Mapping[str, Any], *, overwrite: bool = False,
             sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Save ``model`` (and its tokenizer) as a Hugging Face folder at ``out``."""
    from safetensors.torch import load_file, save_file

    import steering

    sources = list(sources) + ([model.source] if model.source and Path(model.source).exists() else [])
    out = check_output(Path(out), sources, overwrite)
    flags = declare_new_biases(model)
    prov = {**{k: v if isinstance(v, (str, int, float, bool)) or v is None else str(v) for k, v in provenance.items()},
            "steering_version": steering.__version__, "base_model": model.name}
    if flags:
        prov["config_flags_turned_on"] = flags
    with atomic_folder(out) as tmp:
        model.hf.save_pretrained(tmp)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        meta_json = json.dumps(prov, sort_keys=True)
        for shard in sorted(tmp.glob("*.safetensors")):
            tensors = load_file(str(shard))
            save_file(tensors, str(shard), metadata={"format": "pt", "steering": meta_json})
        (tmp / "README.md").write_text(
            "---\ntags: [steering, edited]\n---\n# Edited with steering\n\n"
            f"Base model: `{model.name}`.\n\n## Provenance\n\n```json\n{json.dumps(prov, indent=2, sort_keys=True)}\n```\n")
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
