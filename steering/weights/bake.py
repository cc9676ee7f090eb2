"""Write an edited model as a Hugging Face folder, safely.

Streaming edits of checkpoints (task vectors, HDR) and baked activation edits go through the same
writer, :func:`steering.weights.write_checkpoint`. The folder is written into a temporary sibling and renamed into place; an existing output is
refused unless ``overwrite=True``; an output inside a source folder is refused; the provenance
(method, parameters, inputs' hashes, toolkit version) goes into every safetensors file's metadata
(key ``steering``) and into a model card. The result loads with ``from_pretrained``.

A bake can give a module a bias its family's config does not declare (an addition baked into
Llama's bias-free MLP); such a checkpoint would load with the bias silently dropped. The writer
therefore checks the parameters against a model built from the config and, where config flags
(``mlp_bias``, ``attention_bias``, ...) declare the missing biases, turns them on and gives the
other modules they govern zero biases; otherwise it refuses, naming the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..io import atomic_folder
from ..model import Model
from . import files
from .files import (Checkpoint, check_output, model_card, numel, provenance_json, resolve_fingerprints, strip_remote_code,
                    write_checkpoint)

__all__ = ["write_hf", "read_provenance", "declare_new_biases", "check_output", "write_checkpoint"]

BIAS_FLAGS = ("mlp_bias", "attention_bias", "bias", "use_bias")


def _param_names_for(config: Any) -> set[str]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(config)
    return {n for n, _ in ref.named_parameters()}


def declare_new_biases(model: Model) -> list[str]:
    """Make every parameter of ``model`` one its config declares (see the module docstring).

    Turns on each flag that declares some of the undeclared parameters (an affine ablation baked
    into Llama needs both ``attention_bias`` and ``mlp_bias``) and returns those flags; refuses,
    changing nothing, when no set of flags declares them all."""
    config = model.hf.config
    have = {n for n, _ in model.hf.named_parameters()}
    declared = _param_names_for(config)
    extra = have - declared
    if not extra:
        return []
    turned: list[str] = []
    for flag in BIAS_FLAGS:
        if extra <= declared:
            break
        if getattr(config, flag, None) is False:
            setattr(config, flag, True)
            now = _param_names_for(config)
            if (extra - declared) & now:
                turned.append(flag)
                declared = now
            else:
                setattr(config, flag, False)
    if not extra <= declared:
        for flag in turned:
            setattr(config, flag, False)
        raise ValueError(f"{sorted(extra - declared)[0]}: the edited model has this tensor but its config "
                         f"({config.model_type}) has no flag that declares it; it would be dropped on load")
    for name in sorted(declared - have):  # the other biases the flags govern: zeros
        owner_name, _, pname = name.rpartition(".")
        owner = model.hf.get_submodule(owner_name)
        weight = owner.weight
        size = weight.shape[1] if type(owner).__name__ == "Conv1D" else weight.shape[0]
        setattr(owner, pname, nn.Parameter(torch.zeros(size, dtype=weight.dtype, device=weight.device)))
    return turned


def _tied_to(state: Mapping[str, torch.Tensor], names: set[str]) -> dict[str, str]:
    """Parameters of ``state`` not in ``names`` that share storage with one that is (tied weights)."""
    ptrs = {state[n].data_ptr(): n for n in names if n in state}
    return {n: ptrs[t.data_ptr()] for n, t in state.items() if n not in names and t.data_ptr() in ptrs}


def write_hf(model: Model, out: str | os.PathLike, provenance: Mapping[str, Any], *, overwrite: bool = False,
             sources: Iterable[str | os.PathLike] = (), progress: bool = False, keep_remote_code: bool = False) -> Path:
    """Save ``model`` (and its tokenizer) as a Hugging Face folder at ``out`` (without the source's
    remote code, ``*.py`` and ``auto_map``, unless ``keep_remote_code``).

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
                                sources=sources, extra=extra, side_files=side_files, progress=progress,
                                keep_remote_code=keep_remote_code)
    return _save_pretrained(model, out, prov, overwrite, sources, keep_remote_code)


def _source_checkpoint(model: Model) -> Checkpoint | None:
    if not model.source or not Path(model.source).is_dir():
        return None
    try:
        return Checkpoint(model.source)
    except (OSError, ValueError):
        return None


def _save_pretrained(model: Model, out: str | os.PathLike, prov: Mapping[str, Any], overwrite: bool,
                     sources: Iterable[str | os.PathLike], keep_remote_code: bool = False) -> Path:
    from safetensors.torch import load_file, save_file

    out = check_output(Path(out), sources, overwrite)
    blob = resolve_fingerprints(provenance_json(prov))  # placeholders of lazy fingerprints filled in
    with atomic_folder(out) as tmp:
        model.hf.save_pretrained(tmp)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        for shard in sorted(tmp.glob("*.safetensors")):
            tensors = load_file(str(shard))
            save_file(tensors, str(shard), metadata={"format": "pt", "steering": blob})
        model_card(tmp, blob, model.name)
        if not keep_remote_code:
            strip_remote_code(tmp)
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


# --- orthogonalisation streamed through the writer -------------------------------------------------
class NotStreamable(ValueError):
    """The checkpoint's tensor names are not the model's (e.g. MoE experts stored one by one,
    which transformers fuses on load): load the model and bake it instead."""


_CHUNK = 2**22  # elements of float32/float64 work per piece (16–32 MB)


def stream_plan(folder: str | os.PathLike, trust_remote_code: bool = False) -> dict[str, Any]:
    """What a streamed orthogonalisation of the model in ``folder`` edits, read from a model built
    from its config on the meta device (no weights), through the architecture map the in-memory
    bake uses: ``plan`` (tensor name → how, layout), ``d_model``, ``post_norm``, ``arch`` and
    ``tied`` (the head's and embedding's names when they share a weight).

    Cached under ``$STEERING_CACHE/plans`` by the config's bytes (and the model code's, with
    ``trust_remote_code``), the architecture map's and the transformers and steering versions, so a later bake of the same
    architecture skips importing transformers and building the model (about 3.5 s here)."""
    import hashlib
    import importlib.metadata

    from .._version import __version__
    from ..io import atomic_write, cache_root

    folder = Path(folder)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    if trust_remote_code:
        for f in sorted(folder.glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    h.update(f"{importlib.metadata.version('transformers')} {__version__} {trust_remote_code}".encode())
    here = Path(__file__).resolve().parents[1]
    for f in (here / "arch.py", here / "architectures.json"):  # the architecture map itself
        h.update(f.read_bytes())
    cache = cache_root() / "plans" / f"{h.hexdigest()[:32]}.json"
    try:
        info = json.loads(cache.read_text())
        if isinstance(info, dict) and set(info) == {"arch", "post_norm", "d_model", "plan", "tied"}:
            return info
    except (OSError, ValueError):
        pass  # none yet, or unreadable: planned again
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    sm = Model(hf, None)
    qual = {id(m): n for n, m in hf.named_modules()}

    def name_of(owner: nn.Module, attr: str) -> str:
        return f"{qual[id(owner)]}.{attr}" if qual[id(owner)] else attr

    plan: dict[str, tuple[str, str]] = {}
    if not sm.map.spec.post_norm:
        for sw in sm.map.stream_writers():  # the walk Ablation.bake follows
            if sw.layout is None:
                plan[name_of(sw.owner, sw.attr)] = ("rows", "")
                continue
            plan[name_of(sw.owner, sw.attr)] = ("out", sw.layout)
            if sw.bias is not None:
                plan[name_of(sw.owner, "bias")] = ("rows", "")
    head, emb = hf.get_output_embeddings(), hf.get_input_embeddings()
    tied = ([name_of(head, "weight"), name_of(emb, "weight")]
            if head is not None and emb is not None and head.weight is emb.weight else None)
    info = {"arch": sm.map.spec.name, "post_norm": bool(sm.map.spec.post_norm), "d_model": int(sm.d_model),
            "plan": plan, "tied": tied}
    try:
        atomic_write(cache, lambda tmp: Path(tmp).write_text(json.dumps(info)))
    except OSError:
        pass  # a read-only cache: build it again next time
    return json.loads(json.dumps(info))


def _rows_projected(f: Any, name: str, q: torch.Tensor, dev: torch.device) -> Iterator[torch.Tensor]:
    """:func:`~steering.edits.project_rows` of the rows of a stored tensor, read and computed in
    pieces of whole rows of about ``_CHUNK`` entries, in reused buffers (rows are independent, so
    the bytes are those of the whole tensor projected at once)."""
    from ..edits.ablation import project_rows_, work_dtype

    shape, dtype = f.shape(name), f.dtype(name)
    width = shape[-1] if shape else 1
    rows = max(1, numel(shape) // max(1, width))
    step = max(1, _CHUNK * rows // max(1, numel(shape)))
    wd = work_dtype(dtype)
    q32 = q.to(dev, wd)
    size = min(step, rows) * width
    with files.work_buffers(size, [wd, wd], dev) as (w32, scratch), files.work_buffers(size, [dtype, dtype], "cpu") as outs:
        for i, w in enumerate(f.pieces(name, size=step * width)):
            n = w.numel()
            x = w32[:n].view(-1, width).copy_(w.view(-1, width))
            project_rows_(x, q32, scratch[:n].view(-1, width))
            yield outs[i % 2][:n].copy_(x.reshape(-1))  # two: the writer may still hold the last one


def _out_projected(f: Any, name: str, layout: str, q: torch.Tensor, dev: torch.device, out: torch.Tensor) -> torch.Tensor:
    """:func:`~steering.edits.project_out` of a stored tensor into ``out`` (flat, its stored dtype,
    on the CPU), in reused buffers: the float work never holds more than about ``_CHUNK`` entries,
    and the values are the whole tensor's.

    Layouts that act along their first axis ([in, d], experts of [E, d, in]) are worked on in
    slices of rows. A [d, in] weight (W − QᵀQW) mixes its rows, so QW is computed on slices of
    columns first (as :func:`~steering.edits.project_out` would compute it), then the rows:
    W[rows] − Q[:, rows]ᵀ(QW); every value is computed column by column or entry by entry
    (:func:`~steering.edits.ablation.column_coordinates`, :func:`~steering.edits.ablation.sub_outer_`),
    never by a matrix product whose kernel would follow the slice's shape, so the same bytes."""
    from ..edits.ablation import COLUMN_BLOCK, column_coordinates, project_out_, sub_outer_, work_dtype

    shape, dtype = f.shape(name), f.dtype(name)
    total = numel(shape)
    out = out.view(torch.uint8).reshape(-1)[:total * dtype.itemsize].view(dtype)
    if total == 0:
        return out
    wd = work_dtype(dtype)
    q32 = q.to(dev, wd)
    with files.work_buffers(total, [dtype], "cpu") as (raw,):
        w = f.get(name, into=raw).to(dev)
        if layout != "out_in":  # rows (or experts) are independent: slices of whole rows
            step = max(1, _CHUNK * shape[0] // total)
            part = [min(step, shape[0]), *shape[1:]]
            with files.work_buffers(numel(part), [wd, wd], dev) as (w32, scratch):
                for i in range(0, shape[0], step):
                    part[0] = min(step, shape[0] - i)
                    n, at = numel(part), i * (total // shape[0])
                    x = project_out_(w32[:n].view(part).copy_(w.narrow(0, i, part[0])), q32, layout,
                                     scratch[:n].view(part))
                    out[at:at + n].copy_(x.reshape(-1))
            return out
        d, width = shape
        cols = max(1, _CHUNK // d // COLUMN_BLOCK) * COLUMN_BLOCK  # slices start at multiples of the block
        rows = max(1, _CHUNK // width)
        s = torch.empty(q32.shape[0], width, dtype=wd, device=dev)  # QW
        with files.work_buffers(d * min(cols, width), [wd], dev) as (w32,), \
                files.work_buffers(d * COLUMN_BLOCK, [wd], dev) as (blocks,):
            for i in range(0, width, cols):
                m = min(cols, width - i)
                s[:, i:i + m] = column_coordinates(w32[:d * m].view(d, m).copy_(w.narrow(1, i, m)), q32, blocks)
        size = min(rows, d) * width
        with files.work_buffers(size, [wd, wd], dev) as (w32, scratch):
            for i in range(0, d, rows):
                m = min(rows, d - i)
                x = w32[:m * width].view(m, width).copy_(w.narrow(0, i, m))
                sub_outer_(x, q32[:, i:i + m], s, scratch[:m * width].view(m, width))
                out[i * width:(i + m) * width].copy_(x.reshape(-1))
    return out


class _Ahead:
    """The ``out`` tensors of a streamed bake projected one ahead, in a thread of their own, while
    the tensors before them are written (the copies between them pass meanwhile). Two output
    buffers alternate: the one being filled is the one whose tensor was written two turns ago."""

    def __init__(self, ck: Checkpoint, names: list[str], compute: Any):
        from concurrent.futures import ThreadPoolExecutor

        self.ck, self.names, self.at = ck, names, {n: i for i, n in enumerate(names)}
        self.compute = compute
        self.bufs: list[torch.Tensor | None] = [None, None]
        self.jobs: dict[str, Any] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="steering-project")

    def _start(self, i: int) -> None:
        if i >= len(self.names) or self.names[i] in self.jobs:
            return
        n = self.names[i]
        f = self.ck.file(n)  # the shard the index places it in (the next one may lie in the next shard)
        need = numel(f.shape(n)) * f.dtype(n).itemsize
        if self.bufs[i % 2] is None or self.bufs[i % 2].numel() < need:
            self.bufs[i % 2] = torch.empty(need, dtype=torch.uint8)
        self.jobs[n] = self.pool.submit(self.compute, f, n, self.bufs[i % 2])

    def take(self, name: str) -> Iterator[torch.Tensor]:
        i = self.at[name]
        self._start(i)
        out = self.jobs.pop(name).result()
        self._start(i + 1)
        yield from files.flat_pieces(out)  # views of a buffer that is not touched until two turns on

    def close(self) -> None:
        for job in self.jobs.values():
            job.cancel()
        self.pool.shutdown(wait=True)


def bake_ablation_stream(edit: Any, source: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                         provenance: Mapping[str, Any] | None = None, trust_remote_code: bool = False,
                         progress: bool = False, sources: Iterable[str | os.PathLike] = (),
                         device: torch.device | str | None = None, threads: int | None = None) -> Path:
    """Orthogonalise the checkpoint folder ``source`` against ``edit`` (an :class:`~steering.edits.Ablation`)
    one tensor at a time, without loading the model: what ``edit.bake(model)`` followed by
    :func:`write_hf` gives, at the memory of one tensor.

    The tensors to edit are found on a model built from the config on the meta device (no
    weights), through the same architecture map the in-memory bake uses (:func:`stream_plan`,
    cached per architecture). A tied unembedding is
    untied: the original embedding is written as the head and the config says so. Refuses, naming
    the tensor, a checkpoint whose tensor names are not the model's (load it and bake instead).
    Tensors it does not edit are copied piece by piece, rows of an embedding are projected piece by
    piece, each ``o_proj``/``down_proj`` kind of tensor is projected one ahead in a thread of its
    own (in its turn while the checkpoint is being hashed, which needs its bytes read in order),
    and the reads, hashing and writes run beside the arithmetic (``threads``: see
    :func:`steering.weights.write_checkpoint`). ``device="cuda"`` projects on a GPU (its matrix
    products may round differently from the CPU's in the last bit)."""
    from .taskvec import work_device
    from ..arch import ArchitectureError
    from ..edits import ABLATION_SITES, Ablation

    if not isinstance(edit, Ablation):
        raise TypeError(f"bake_ablation_stream: expected an Ablation edit, got {type(edit).__name__}")
    if edit.layers is not None or set(edit.sites) != set(ABLATION_SITES):
        raise ValueError("bake_ablation_stream: only the full ablation (every layer, every site) has an exact weight form")
    ck = Checkpoint(source)
    if ck.folder is None:
        raise ValueError(f"{source}: a streamed bake needs a model folder, not one file")
    info = stream_plan(ck.folder, trust_remote_code)
    if info["post_norm"]:
        raise ArchitectureError(f"{info['arch']}: sublayer outputs are normalised before they join the residual "
                                "stream, so no weight edit removes a direction exactly; use Ablation.hooks(model) instead")
    if edit.basis.shape[1] != info["d_model"]:
        raise ValueError(f"ablation basis has d={edit.basis.shape[1]}, {ck.folder} has d_model={info['d_model']}")
    plan: dict[str, tuple[str, str]] = {n: (how, layout) for n, (how, layout) in info["plan"].items()}
    for n in plan:
        if n not in ck:
            raise NotStreamable(f"{n}: the model built from {ck.folder / 'config.json'} has this tensor but the checkpoint "
                                "does not (its names differ); load the model and bake it instead")
    extra: dict[str, torch.Tensor] = {}
    cfg = None
    if info["tied"] is not None:
        head_name, emb_name = info["tied"]
        if head_name not in ck:  # tied: the head keeps the unedited embedding
            from transformers import AutoConfig

            extra[head_name] = ck.get(emb_name)
            cfg = AutoConfig.from_pretrained(ck.folder, trust_remote_code=trust_remote_code)
            cfg.tie_word_embeddings = False
            if hasattr(cfg, "get_text_config"):
                cfg.get_text_config().tie_word_embeddings = False
    dev = work_device(device)
    q = edit.basis.detach().to(dev)

    def project(f: Any, name: str, buf: torch.Tensor) -> torch.Tensor:
        return _out_projected(f, name, plan[name][1], q, dev, buf)

    prov = {"method": "bake", "edit": "ablation", "rank": edit.rank, "stream": True, "base_model": str(ck.folder),
            "base_sha256": ck.fingerprint(lazy=True), **dict(edit.meta), **(provenance or {})}
    order = [n for s, f in ck.files.items() for n in f.keys() if ck.where.get(n) == s]  # write_checkpoint's
    # projected ahead unless the checkpoint is being hashed as it is read (that needs its bytes in order)
    ahead = None if files.being_hashed(ck) else _Ahead(ck, [n for n in order if plan.get(n, ("",))[0] == "out"], project)

    def tensor(name: str, f: Any) -> Iterator[torch.Tensor] | None:
        how, _ = plan.get(name, ("", ""))
        if how == "rows":
            return _rows_projected(f, name, q, dev)
        if how == "out":
            return ahead.take(name) if ahead is not None else in_turn(f, name)
        return None  # copied as stored

    def in_turn(f: Any, name: str) -> Iterator[torch.Tensor]:
        with files.work_buffers(numel(f.shape(name)), [f.dtype(name)], "cpu") as (buf,):
            yield from files.flat_pieces(project(f, name, buf))

    try:
        return write_checkpoint(ck, out, None, prov, overwrite=overwrite, extra=extra, sources=sources,
                                side_files=(lambda tmp: cfg.save_pretrained(tmp)) if cfg is not None else None,
                                progress=progress, keep_remote_code=trust_remote_code, pieces=tensor, threads=threads)
    finally:
        if ahead is not None:
            ahead.close()


def bake(edit: Any, model: Any, out: str | os.PathLike, *, provenance: Mapping[str, Any], overwrite: bool = False,
         stream: bool = True, trust_remote_code: bool = False, progress: bool = False,
         sources: Iterable[str | os.PathLike] = (), log: Any = None, device: str | None = None,
         threads: int | None = None) -> tuple[Path, bool]:
    """``edit`` baked into ``model`` (a local folder, a hub or ``organism:`` name, or a loaded
    model) and written as the Hugging Face folder ``out``: what ``steering bake`` does.

    A plain :class:`~steering.edits.Ablation` of a local folder is orthogonalised tensor by tensor
    (:func:`bake_ablation_stream`: the memory of one tensor, not the model) unless ``stream`` is
    False; where that cannot be done (:class:`NotStreamable`, said through ``log``, a callable
    taking one line) and for every other edit, the model is loaded, baked and written
    (:func:`write_hf`). ``sources`` are further inputs (the edit files) the output must not
    overwrite. ``device``: where the arithmetic runs (a named model is loaded there); ``threads``:
    cores a streamed bake uses. Returns the folder and whether it was streamed."""
    from ..edits import Ablation
    from ..model import as_model, load

    is_folder = isinstance(model, (str, os.PathLike)) and Path(model).is_dir()
    if stream and is_folder and isinstance(edit, Ablation):
        try:
            return bake_ablation_stream(edit, model, out, overwrite=overwrite, progress=progress, provenance=provenance,
                                        device=device, threads=threads,
                                        trust_remote_code=trust_remote_code, sources=sources), True
        except NotStreamable as e:
            if log is not None:
                log(f"cannot stream ({e}); loading the model")
    named = isinstance(model, (str, os.PathLike))
    if device is not None:
        from .taskvec import work_device

        work_device(device)  # one that is not there is an error before anything loads
    baked = edit.bake(load(model, trust_remote_code=trust_remote_code, device=device) if named else as_model(model))
    srcs = [model, *sources] if named else list(sources)
    return write_hf(baked, out, {"method": "bake", **provenance}, overwrite=overwrite, sources=srcs,
                    keep_remote_code=trust_remote_code, progress=progress), False
