"""Safetensors checkpoints read and written one tensor at a time.

Edits of weights (task vectors, HDR, baked activation edits) must work on checkpoints far larger
than memory, so nothing here holds more than one tensor of a checkpoint at once:

- :class:`SafetensorsFile` parses a file's header itself and reads each tensor with a plain
  positioned read (no memory map, so the pages of a 10 GB shard never count against the
  process), checking on open that the file is as long as its header says;
- :class:`Checkpoint` is a Hugging Face folder (one ``model.safetensors`` or shards named by
  ``model.safetensors.index.json``) or a single ``.safetensors`` file, validated on open;
- :class:`ShardWriter` writes a safetensors file whose header is known in advance, tensor by tensor;
- :func:`write_checkpoint` is the toolkit's one checkpoint writer: it streams every tensor of a
  source checkpoint through a function into a new folder that keeps the source's shards and
  index, copies config, tokenizer and generation config, records provenance in every shard's
  metadata (key ``steering``) and in a model card, keeps each tensor's dtype, writes into a
  temporary folder renamed into place, never into a source, and refuses an existing output unless
  told to overwrite.

Pickled weights (``.bin``, ``.pt``) are never read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
CODES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER = 100 * 2**20


def numel(shape: Iterable[int]) -> int:
    """Number of entries of a tensor of ``shape`` (1 for a scalar)."""
    return math.prod(shape)


def _libc_trim() -> Callable[[], Any]:
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
        return lambda: trim(0)
    except (OSError, AttributeError):
        return lambda: None


release_memory = _libc_trim()
release_memory.__doc__ = """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

Streaming loops call it after each tensor: glibc raises its mmap threshold after the first
multi-MB tensor is freed, so later ones come from the heap and freed ones stay in the
process's RSS; measured on a 200 MB HDR in tests/test_taskvec.py, that tripled the peak."""


class SafetensorsFile:
    """One safetensors file: its header parsed and checked on open, tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such safetensors file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{self.path}: corrupt or truncated safetensors file (header of {n} bytes, file of {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ValueError(f"{self.path}: corrupt safetensors file (its header is not JSON)") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: corrupt safetensors file (its header is not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        end = 0
        for name, e in header.items():
            try:
                code, shape, (b, e_) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: corrupt safetensors header entry for tensor {name!r}") from None
            if code not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {code}, which steering does not read")
            if e_ - b != numel(shape) * DTYPES[code].itemsize or b < 0:
                raise ValueError(f"{self.path}: corrupt safetensors header (tensor {name!r}: offsets do not match its shape)")
            self.entries[name] = (code, shape, b, e_)
            end = max(end, e_)
        if self.data_start + end > size:
            raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes; its header needs "
                             f"{self.data_start + end})")
        self._f = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name][0]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read from disk into fresh memory."""
        code, shape, b, e = self.entries[name]
        out = torch.empty(e - b, dtype=torch.uint8)
        if e > b:
            if self._f is None:
                self._f = open(self.path, "rb")
            self._f.seek(self.data_start + b)
            if self._f.readinto(out.numpy()) != e - b:
                raise ValueError(f"{self.path}: truncated while reading tensor {name!r}")
        return out.view(DTYPES[code]).reshape(shape)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class Checkpoint:
    """The safetensors weights of a Hugging Face folder (or one ``.safetensors`` file), checked on open.

    ``names`` are sorted; :meth:`get` reads one tensor. A missing shard named in the index, a
    tensor the index places in a shard that lacks it, a truncated or corrupt file, and a folder
    with only pickled weights are each one clear error naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        p = self.path
        if p.is_file():
            self.folder = None
            self.files = {p.name: SafetensorsFile(p)}
            self.where = {n: p.name for n in self.files[p.name].keys()}
        elif p.is_dir():
            self.folder = p
            index = p / INDEX
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{index}: not a safetensors index (no weight_map)") from None
                self.files = {}
                for shard in sorted(set(weight_map.values())):
                    if not (p / shard).is_file():
                        raise FileNotFoundError(f"{p / shard}: shard named in {index.name} is missing")
                    self.files[shard] = SafetensorsFile(p / shard)
                for name, shard in weight_map.items():
                    if name not in self.files[shard].entries:
                        raise ValueError(f"{p / shard}: has no tensor {name!r}, which {index.name} places there")
                self.where = dict(weight_map)
            else:
                shards = sorted(p.glob("*.safetensors"))
                if not shards:
                    pickled = [f.name for f in p.iterdir() if f.suffix in PICKLED]
                    why = f" (found {pickled[0]}; steering never loads pickled weights, convert it to safetensors)" if pickled else ""
                    raise FileNotFoundError(f"{p}: no safetensors weights{why}")
                if len(shards) > 1:
                    raise ValueError(f"{p}: {len(shards)} safetensors files but no {INDEX}")
                self.files = {shards[0].name: SafetensorsFile(shards[0])}
                self.where = {n: shards[0].name for n in self.files[shards[0].name].keys()}
        else:
            raise FileNotFoundError(f"{p}: no such checkpoint folder or safetensors file")
        self.names: list[str] = sorted(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def file(self, name: str) -> SafetensorsFile:
        if name not in self.where:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self.files[self.where[name]]

    def dtype(self, name: str) -> torch.dtype:
        return self.file(name).dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file(name).shape(name)

    def numel(self, name: str) -> int:
        return numel(self.shape(name))

    def get(self, name: str) -> torch.Tensor:
        return self.file(name).get(name)

    @property
    def metadata(self) -> dict[str, str]:
        return next(iter(self.files.values())).metadata

    @property
    def nbytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files.values())

    def largest_tensor_bytes(self) -> int:
        return max((self.numel(n) * self.dtype(n).itemsize for n in self.names), default=0)

    def fingerprint(self) -> str:
        """SHA-256 of the weight files' bytes (in shard-name order), for provenance."""
        return _fingerprint(tuple((str(f.path.resolve()), f.path.stat().st_size, f.path.stat().st_mtime_ns)
                                  for _, f in sorted(self.files.items())))

    def is_floating(self, name: str) -> bool:
        return self.dtype(name).is_floating_point

    def close(self) -> None:
        for f in self.files.values():
            f.close()


_FINGERPRINTS: dict[tuple, str] = {}


def _fingerprint(files: tuple[tuple[str, int, int], ...]) -> str:
    if files not in _FINGERPRINTS:
        h = hashlib.sha256()
        for path, _, _ in files:
            with open(path, "rb") as f:
                while chunk := f.read(16 * 2**20):
                    h.update(chunk)
        _FINGERPRINTS[files] = h.hexdigest()
    return _FINGERPRINTS[files]


class ShardWriter:
    """Write a safetensors file whose tensors (name, dtype, shape, in order) are known up front,
    one tensor at a time; :meth:`close` checks every tensor was written."""

    def __init__(self, path: str | os.PathLike, layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.layout = list(layout)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, dtype, shape in self.layout:
            if dtype not in CODES:
                raise ValueError(f"{name}: dtype {dtype} cannot be written to safetensors")
            n = numel(shape) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape = self.layout[self._next]
        if name != want:
            raise ValueError(f"{self.path}: expected tensor {want!r} next, got {name!r}")
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: the edit returned {tensor.dtype} {tuple(tensor.shape)}, "
                             f"the checkpoint holds {dtype} {tuple(shape)}")
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self._f.write(t.view(torch.uint8).numpy().data)
        self._next += 1

    def abort(self) -> None:
        """Close the file without the completeness check (the caller is raising another error)."""
        self._f.close()

    def close(self) -> None:
        try:
            if self._next != len(self.layout):
                raise ValueError(f"{self.path}: {len(self.layout) - self._next} tensors were not written")
        finally:
            self._f.close()


def provenance_json(provenance: Mapping[str, Any]) -> str:
    from .._version import __version__

    prov = {k: v if isinstance(v, (str, int, float, bool, list, dict)) or v is None else str(v)
            for k, v in provenance.items()}
    prov.setdefault("steering_version", __version__)
    return json.dumps(prov, sort_keys=True)


def check_output(out: str | os.PathLike, sources: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """``out`` resolved; an error if it is, holds or lies inside a source (symlinks resolved, see
    :func:`steering.io.check_paths`), or exists and ``overwrite`` is false."""
    from ..io import check_paths

    check_paths([out], sources)
    out = Path(out).expanduser().resolve()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out}: exists; pass overwrite=True (--overwrite) to replace it")
    return out


def copy_side_files(src: Path | None, dst: Path, keep_remote_code: bool = False) -> None:
    """Config, tokenizer, generation config, chat template...: every file of ``src`` except weights,
    the index and the model card (pickled weights are never copied). A model repo's own Python code
    (``*.py`` and the ``auto_map`` entries naming it) is left out unless ``keep_remote_code``."""
    if src is None:
        return
    for f in sorted(src.iterdir()):
        if (f.is_file() and not f.name.startswith(".") and f.suffix != ".safetensors" and f.suffix not in PICKLED
                and f.name not in (INDEX, "README.md") and (keep_remote_code or f.suffix != ".py")):
            shutil.copy2(f, dst / f.name)
    if not keep_remote_code:
        strip_remote_code(dst)


def strip_remote_code(folder: Path) -> list[str]:
    """Remove a written model folder's remote code: ``*.py`` files and ``auto_map`` entries of its
    JSON configs (an output runs no code of the source's unless asked). Returns what was removed."""
    gone = []
    for f in sorted(folder.glob("*.py")):
        f.unlink()
        gone.append(f.name)
    for name in ("config.json", "tokenizer_config.json", "generation_config.json", "processor_config.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and "auto_map" in data:
            del data["auto_map"]
            f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            gone.append(f"{name}:auto_map")
    return gone


def model_card(dst: Path, provenance_blob: str, base: str) -> None:
    prov = json.loads(provenance_blob)
    (dst / "README.md").write_text(
        "---\ntags: [steering, edited]\n---\n# Edited with steering\n\n"
        f"Base model: `{base}`. Method: `{prov.get('method', '?')}`.\n\n"
        "The same provenance is in every safetensors file's metadata (key `steering`).\n\n"
        f"## Provenance\n\n```json\n{json.dumps(prov, indent=2, sort_keys=True)}\n```\n")


def write_checkpoint(source: Checkpoint, out: str | os.PathLike, tensor: Callable[[str, torch.Tensor], torch.Tensor],
                     provenance: Mapping[str, Any], *, overwrite: bool = False,
                     sources: Iterable[str | os.PathLike] = (), extra: Mapping[str, torch.Tensor] | None = None,
                     side_files: Callable[[Path], None] | None = None, progress: bool = False,
                     keep_remote_code: bool = False) -> Path:
    """Write ``source`` with every tensor passed through ``tensor(name, original)`` into folder ``out``.

    The function gets the stored tensor (its own dtype) and returns the edited one, which is cast
    back to the stored dtype; shapes must not change. ``extra`` tensors (new biases of a baked
    edit) go into the last shard. ``side_files(tmp)`` writes config files in place of copying the
    source's (a bake that changes the config). See the module docstring for the guarantees."""
    from tqdm.auto import tqdm

    from ..io import atomic_folder

    if source.folder is None:
        raise ValueError(f"{source.path}: a checkpoint to write from must be a model folder, not one file")
    srcs = [source.folder, *sources]
    out = check_output(out, srcs, overwrite)
    blob = provenance_json(provenance)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(source.names))
    if clash:
        raise ValueError(f"{clash[0]}: an extra tensor has the name of one the checkpoint already holds")
    shards = list(source.files)
    bar = tqdm(total=len(source.names) + len(extra), desc="writing", unit="tensor", disable=not progress)
    total = 0
    with atomic_folder(out) as tmp:
        for i, shard in enumerate(shards):
            f = source.files[shard]
            names = [n for n in f.keys() if source.where.get(n) == shard]
            new = sorted(extra) if i == len(shards) - 1 else []
            layout = ([(n, f.dtype(n), f.shape(n)) for n in names]
                      + [(n, extra[n].dtype, tuple(extra[n].shape)) for n in new])
            meta = {**{k: v for k, v in f.metadata.items() if k not in ("steering",)}, "format": "pt", "steering": blob}
            w = ShardWriter(tmp / shard, layout, meta)
            try:
                for n in names:
                    orig = f.get(n)
                    t = tensor(n, orig)
                    if tuple(t.shape) != tuple(orig.shape):
                        raise ValueError(f"{n}: the edit changed its shape from {tuple(orig.shape)} to {tuple(t.shape)}")
                    # only tensors the edit made are checked (no extra pass over the ones it copies)
                    if t is not orig and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise ValueError(f"{n}: the edit made NaN or infinite values (from finite inputs: "
                                         "check the edit's scale and vectors)" if bool(torch.isfinite(orig).all())
                                         else f"{n}: the source tensor holds NaN or infinite values")
                    w.write(n, t.to(orig.dtype))
                    del orig, t
                    release_memory()
                    bar.update()
                for n in new:
                    w.write(n, extra[n])
                    bar.update()
            except BaseException:
                w.abort()  # the first error is the one reported, not "tensors were not written"
                bar.close()
                raise
            w.close()
            total += sum(dtype.itemsize * numel(shape) for _, dtype, shape in layout)
        if (source.folder / INDEX).is_file() or len(shards) > 1:
            weight_map = dict(source.where)
            weight_map.update({n: shards[-1] for n in extra})
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        copy_side_files(source.folder, tmp, keep_remote_code)
        if side_files is not None:
            side_files(tmp)
            if not keep_remote_code:
                strip_remote_code(tmp)
        model_card(tmp, blob, str(provenance.get("base_model", source.path)))
    bar.close()
    return out

