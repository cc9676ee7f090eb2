"""Safetensors checkpoints read and written a piece (or a tensor) at a time.

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

Streaming at the speed of the disk: :meth:`SafetensorsFile.pieces` reads a tensor in pieces of
:data:`PIECE` entries into a few reused buffers, one piece ahead of its consumer in a background
thread (reads release the GIL), so the edits' float32 arithmetic runs on cache-sized pieces while
the next bytes arrive, and no tensor is ever held whole in float32. The SHA-256 fingerprints of
the provenance are computed from the same bytes as they are read (:meth:`Checkpoint.fingerprint`
with ``lazy=True`` gives a placeholder that the writer fills into each shard's header once the
inputs are read), so they add no pass of their own; a digest is remembered for the files' identity
and times, so a later edit of the same, unchanged files does not hash them at all.

Pickled weights (``.bin``, ``.pt``) are never read.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

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
PIECE = 2**19
"""Entries per piece of streamed arithmetic: 1–2 MB read, 2 MB of float32 work, which stays in the
cache (whole-tensor float32 temporaries ran about 20× slower here; 2¹⁸ to 2²⁰ entries ran alike,
and an edit holds about a dozen pieces, so the smaller half of that range)."""
_AHEAD = 1  # pieces read ahead of the consumer
_SPARE: list[torch.Tensor] = []  # byte buffers between uses, by size (reused: fresh memory is slow to fault in)
_SPARE_LOCK = threading.Lock()
_MAX_SPARE = 64  # never more than were in use at once


def _take_buffers(count: int, nbytes: int) -> list[torch.Tensor]:
    """``count`` byte buffers of at least ``nbytes``: the smallest spare ones that fit, else new."""
    with _SPARE_LOCK:
        fit = [b for b in _SPARE if b.numel() >= nbytes][:count]  # _SPARE is sorted by size: best fit
        taken = {id(b) for b in fit}
        _SPARE[:] = [b for b in _SPARE if id(b) not in taken]  # by identity: == on tensors compares entries
    return fit + [torch.empty(nbytes, dtype=torch.uint8) for _ in range(count - len(fit))]


def drop_spare_buffers() -> None:
    """Free the spare buffers (a job's end: whole tensors of a big model must not stay held)."""
    with _SPARE_LOCK:
        _SPARE.clear()


def _give_back(bufs: list[torch.Tensor]) -> None:
    with _SPARE_LOCK:
        _SPARE.extend(bufs)
        _SPARE.sort(key=torch.Tensor.numel)
        del _SPARE[:max(0, len(_SPARE) - _MAX_SPARE)]  # the smallest go


class work_buffers:
    """``with work_buffers(n, dtypes, device) as (a, b, ...):`` one tensor of ``n`` entries per dtype,
    from the reused byte buffers on the CPU (given back after the block; a generator holds them
    until it is finished or closed). Elsewhere, fresh tensors (the device's allocator caches)."""

    def __init__(self, n: int, dtypes: Iterable[torch.dtype], device: torch.device | str = "cpu"):
        self.n, self.dtypes, self.device = n, list(dtypes), torch.device(device)
        self.bases: list[torch.Tensor] = []

    def __enter__(self) -> list[torch.Tensor]:
        if self.device.type != "cpu":
            return [torch.empty(self.n, dtype=d, device=self.device) for d in self.dtypes]
        out = []
        for d in self.dtypes:
            (b,) = _take_buffers(1, max(1, self.n * d.itemsize))
            self.bases.append(b)
            out.append(b[:self.n * d.itemsize].view(d))
        return out

    def __exit__(self, *exc: Any) -> None:
        if self.bases:
            _give_back(self.bases)
            self.bases = []


def flat_pieces(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The flattened ``t`` in consecutive views of :data:`PIECE` entries."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), PIECE):
        yield flat[i:i + PIECE]


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
        st = self.path.stat()
        self._key = (str(self.path.resolve()), st.st_size, st.st_mtime_ns)
        _STATS[self._key] = (_stat_of(st), time.time_ns())
        self._f: int | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name][0]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``, read from disk into fresh memory (or into the start of the byte
        tensor ``into``, e.g. from :class:`work_buffers`)."""
        code, shape, b, e = self.entries[name]
        if into is None:
            out = torch.empty(e - b, dtype=torch.uint8)
        elif into.numel() * into.element_size() < e - b:
            raise ValueError(f"{name}: a buffer of {into.numel() * into.element_size()} bytes cannot hold its {e - b}")
        else:
            out = into.view(torch.uint8).reshape(-1)[:e - b]
        if e > b:
            job = self._read(self.data_start + b, out.numpy(), name)
            if job is not None:
                job.result()  # the caller may change the tensor in place
        return out.view(DTYPES[code]).reshape(shape)

    def _read(self, offset: int, buf: Any, name: str) -> Future | None:
        """Fill ``buf`` (a writable buffer) from byte ``offset``: a positioned read, safe from any
        thread; the bytes also feed a pending fingerprint of this file (see :class:`_SeqHash`),
        whose hashing job is returned: ``buf`` must not change before it is done."""
        self._open()
        mv, got = memoryview(buf).cast("B"), 0
        while got < len(mv):
            n = os.preadv(self._f, [mv[got:]], offset + got)
            if n <= 0:
                raise ValueError(f"{self.path}: truncated while reading tensor {name!r}")
            got += n
        feed = _FEEDERS.get(self._key)
        return feed.feed(self, offset, mv) if feed is not None else None

    def read_entries(self, name: str, starts: Iterable[int], length: int) -> torch.Tensor:
        """Entries ``[s, s + length)`` of the flattened tensor ``name`` for each start, one after
        another (small positioned reads: a sample, not a pass; they feed no fingerprint)."""
        code, shape, b, _ = self.entries[name]
        dt = DTYPES[code]
        starts = list(starts)
        out = torch.empty(len(starts) * length * dt.itemsize, dtype=torch.uint8)
        self._open()
        raw, step = out.numpy(), length * dt.itemsize
        for j, st in enumerate(starts):
            if st < 0 or st + length > numel(shape):
                raise IndexError(f"{name}: entries {st}..{st + length} outside its {numel(shape)}")
            self._read_raw(self.data_start + b + st * dt.itemsize, raw[j * step:(j + 1) * step])
        return out.view(dt)

    def _open(self) -> None:
        if self._f is None:
            with self._lock:
                if self._f is None:
                    self._f = os.open(self.path, os.O_RDONLY)

    def _read_raw(self, offset: int, buf: Any) -> None:
        mv = memoryview(buf).cast("B")
        if os.preadv(self._f, [mv], offset) != len(mv):
            raise ValueError(f"{self.path}: truncated at byte {offset}")

    def pieces(self, name: str, size: int | None = None, *, written: bool = False) -> Iterator[torch.Tensor]:
        """The flattened tensor ``name`` in consecutive pieces of ``size`` entries (default
        :data:`PIECE`; its stored dtype), read ahead in a background thread; each piece is valid
        until the next is asked for (``written``: until the one after, so a :class:`ShardWriter`
        can write it in the background)."""
        size = size or PIECE
        code, shape, b, e = self.entries[name]
        dt = DTYPES[code]
        total, nbytes = numel(shape), size * dt.itemsize
        count = -(-total // size)
        if count == 0:
            return
        bufs = _take_buffers(_AHEAD + 1 + written, min(nbytes, total * dt.itemsize))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="steering-read")

        hashing: list[Future | None] = [None] * len(bufs)  # each buffer's hashing job

        def read(i: int) -> torch.Tensor:
            n, j = min(size, total - i * size), i % len(bufs)
            if hashing[j] is not None:
                hashing[j].result()
            buf = bufs[j][:n * dt.itemsize]
            hashing[j] = self._read(self.data_start + b + i * nbytes, buf.numpy(), name)
            return buf.view(dt)

        ahead = deque(self._pool.submit(read, i) for i in range(min(_AHEAD, count)))
        try:
            for i in range(count):
                piece = ahead.popleft().result()
                if i + _AHEAD < count:
                    ahead.append(self._pool.submit(read, i + _AHEAD))
                yield piece
        finally:
            for f in ahead:  # a consumer that stopped early: no read may still fill these buffers
                f.cancel() or f.exception()
            for h in hashing:
                if h is not None:
                    h.exception()
            _give_back(bufs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._f is not None:
            os.close(self._f)
            self._f = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            if self._f is not None:
                os.close(self._f)
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

    def fingerprint(self, lazy: bool = False) -> str:
        """SHA-256 of the weight files' bytes (in shard-name order), for provenance.

        ``lazy=True``: unless it is known already, a placeholder of the same length, filled in by
        :func:`resolve_fingerprints` (which :func:`write_checkpoint` calls on what it writes). Until
        then the hash is computed from the bytes as this process reads them, in order; whatever was
        not read in order is read for the hash when it is resolved.

        A digest, once computed, is remembered under ``$STEERING_CACHE/fingerprints`` for the
        files' device, inode, size and modification and change times, so the next edit of the
        same files hashes nothing; any change to a file (a rewrite, even with its modification
        time set back, changes its change time) hashes it again. Delete that folder to hash
        everything anew."""
        files = self._files_key()
        if files in _FINGERPRINTS:
            return _FINGERPRINTS[files]
        known = _cached(files)
        if known is not None:
            _FINGERPRINTS[files] = known
            return known
        if not lazy:
            return _fingerprint(files)
        with _HASH_LOCK:
            seq = _PENDING.get(files)
            if seq is None:
                seq = _PENDING[files] = _SeqHash(files)
                for key in files:
                    _FEEDERS[key] = seq
        return seq.token

    def _files_key(self) -> tuple[tuple[str, int, int], ...]:
        return tuple(f._key for _, f in sorted(self.files.items()))

    def is_floating(self, name: str) -> bool:
        return self.dtype(name).is_floating_point

    def close(self) -> None:
        for f in self.files.values():
            f.close()


_FINGERPRINTS: dict[tuple, str] = {}
_PENDING: dict[tuple, "_SeqHash"] = {}  # checkpoint -> its hash in progress
_FEEDERS: dict[tuple[str, int, int], "_SeqHash"] = {}  # file -> the pending hash its bytes feed
_HASH_LOCK = threading.Lock()
_TOKEN = "sha256-pending-"
_TOKENS = itertools.count()


def _fingerprint(files: tuple[tuple[str, int, int], ...]) -> str:
    if files in _FINGERPRINTS:
        return _FINGERPRINTS[files]
    seq = _PENDING.get(files)
    if seq is not None:
        return seq.digest()
    h = hashlib.sha256()
    for path, _, _ in files:
        with open(path, "rb") as f:
            while chunk := f.read(16 * 2**20):
                h.update(chunk)
    _FINGERPRINTS[files] = h.hexdigest()
    _remember(files, _FINGERPRINTS[files])
    return _FINGERPRINTS[files]


class _SeqHash:
    """SHA-256 of a checkpoint's files, fed by the reads of whoever reads them (in order)."""

    def __init__(self, files: tuple[tuple[str, int, int], ...]):
        self.files = files
        self.token = f"{_TOKEN}{next(_TOKENS):049d}"  # 64 characters, like the digest it stands for; never reused
        self.h = hashlib.sha256()
        self.i, self.pos = 0, 0  # the next byte to hash: file i, offset pos
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="steering-hash")  # one a checkpoint: they hash side by side

    def feed(self, f: SafetensorsFile, offset: int, mv: memoryview) -> Future | None:
        """Hash the bytes ``mv`` read from ``offset`` of ``f`` if they are the next ones, in the
        hashing thread (beside the reads and the arithmetic); returns that job, which must finish
        before ``mv`` is reused."""
        with self.lock:
            if self.i >= len(self.files) or self.files[self.i][0] != f._key[0]:
                return None  # another file is next; what is skipped is read again when resolved
            if offset > self.pos:
                if offset - self.pos > 2**20:  # a gap (out-of-order reads): left for resolve
                    return None
                gap = bytearray(offset - self.pos)  # the header, or padding: small
                f._read_raw(self.pos, gap)
                self.pool.submit(self.h.update, gap)
                self.pos = offset
            end = offset + len(mv)
            if end <= self.pos:
                return None
            job = self.pool.submit(self.h.update, mv[self.pos - offset:])  # FIFO: in order
            self.pos = end
            if self.pos >= self.files[self.i][1]:
                self.i, self.pos = self.i + 1, 0
            return job

    def digest(self) -> str:
        with self.lock:
            self.pool.shutdown(wait=True)  # every fed piece hashed
            while self.i < len(self.files):
                path, size, _ = self.files[self.i]
                with open(path, "rb") as fh:
                    fh.seek(self.pos)
                    while chunk := fh.read(16 * 2**20):
                        self.h.update(chunk)
                self.i, self.pos = self.i + 1, 0
            digest = self.h.hexdigest()
        with _HASH_LOCK:
            _FINGERPRINTS[self.files] = digest
            if _PENDING.get(self.files) is self:
                del _PENDING[self.files]
                for key in self.files:
                    if _FEEDERS.get(key) is self:
                        del _FEEDERS[key]
            _RESOLVED[self.token] = digest
        _remember(self.files, digest)
        return digest


_RESOLVED: dict[str, str] = {}
_STATS: dict[tuple[str, int, int], tuple[tuple[int, ...], int]] = {}  # file -> its stat on open, and when
_SETTLED_NS = 2 * 10**9  # a file changed this recently when opened may still be being written


def _stat_of(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _fingerprint_dir() -> Path:
    from ..io import cache_root

    return cache_root() / "fingerprints"


def _cache_entry(files: tuple[tuple[str, int, int], ...]) -> tuple[Path, str] | None:
    """Where the fingerprint of these files would be remembered, and what it is remembered for."""
    stats = [_STATS.get(k) for k in files]
    if not files or any(s is None for s in stats):
        return None
    ident = json.dumps([[k[0], *s[0]] for k, s in zip(files, stats)])
    return _fingerprint_dir() / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.json", ident


def _cached(files: tuple[tuple[str, int, int], ...]) -> str | None:
    """The SHA-256 remembered for these files, if each still has the device, inode, size,
    modification and change times it had when it was hashed (``ctime`` cannot be set back by
    a program, so a file rewritten in place is hashed again)."""
    entry = _cache_entry(files)
    if entry is None:
        return None
    try:
        rec = json.loads(entry[0].read_text())
        if rec["files"] == entry[1] and re.fullmatch("[0-9a-f]{64}", rec["sha256"]):
            return rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: hashed again
    return None


def _remember(files: tuple[tuple[str, int, int], ...], digest: str) -> None:
    """Remember a digest under ``$STEERING_CACHE/fingerprints`` if no file changed since it was
    opened and none had changed in the seconds before (it could have been mid-write)."""
    from ..io import atomic_write

    entry = _cache_entry(files)
    if entry is None:
        return
    for k in files:
        stat, opened = _STATS[k]
        try:
            now = _stat_of(os.stat(k[0]))
        except OSError:
            return
        if now != stat or max(stat[3], stat[4]) > opened - _SETTLED_NS:
            return
    try:
        atomic_write(entry[0], lambda tmp: Path(tmp).write_text(json.dumps({"files": entry[1], "sha256": digest})))
    except OSError:
        pass  # a read-only cache: hashed again next time


def being_hashed(ck: Checkpoint) -> bool:
    """Whether a lazy fingerprint of ``ck`` is being fed by its reads (which must then come in order)."""
    return any(_FEEDERS.get(f._key) is not None for f in ck.files.values())


def resolve_fingerprints(text: str) -> str:
    """``text`` with every placeholder of :meth:`Checkpoint.fingerprint` (``lazy=True``) replaced by
    its digest (hashing what was not read yet)."""
    if _TOKEN not in text:
        return text
    for seq in list(_PENDING.values()):
        if seq.token in text:
            seq.digest()
    for token, digest in list(_RESOLVED.items()):
        text = text.replace(token, digest)
    return text


def resolve_provenance(obj: Any) -> Any:
    """A provenance structure with its fingerprint placeholders resolved (see :func:`resolve_fingerprints`)."""
    if isinstance(obj, str):
        return resolve_fingerprints(obj)
    if isinstance(obj, dict):
        return {k: resolve_provenance(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(resolve_provenance(v) for v in obj)
    return obj


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
        self._header = blob
        from ..io import reserve

        self._f = open(self.path, "wb")
        try:
            reserve(self._f.fileno(), 8 + len(blob) + offset, self.path)  # its blocks mapped in one step
        except BaseException:
            self._f.close()
            raise
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0
        self._left = -1  # bytes still owed to the tensor begun with begin()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Any = None  # the one write in flight

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape = self.layout[self._next]
        if name != want:
            raise ValueError(f"{self.path}: expected tensor {want!r} next, got {name!r}")
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: the edit returned {tensor.dtype} {tuple(tensor.shape)}, "
                             f"the checkpoint holds {dtype} {tuple(shape)}")
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._wait()  # a piece still being written goes first
        if t.numel():
            self._f.write(t.view(torch.uint8).numpy().data)
        self._next += 1

    def begin(self, name: str) -> None:
        """Start the next tensor, ``name``, to be written in pieces with :meth:`write_piece`."""
        want, dtype, shape = self.layout[self._next]
        if name != want:
            raise ValueError(f"{self.path}: expected tensor {want!r} next, got {name!r}")
        self._left = numel(shape) * dtype.itemsize

    def write_piece(self, piece: torch.Tensor) -> None:
        """The next consecutive entries of the tensor begun (its stored dtype, any shape), written
        in a background thread: ``piece`` must not change until the next call returns (that call
        waits for this write), so a producer that reuses memory alternates two buffers."""
        name, dtype, _ = self.layout[self._next]
        if piece.dtype != dtype:
            raise ValueError(f"{name}: the edit returned {piece.dtype}, the checkpoint holds {dtype}")
        data = piece.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data
        if len(data) > self._left:
            raise ValueError(f"{name}: the edit returned more entries than the tensor holds")
        self._wait()
        self._left -= len(data)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="steering-write")
        self._pending = self._pool.submit(self._f.write, data)
        if not self._left:  # the tensor's last bytes: written before the producer (whose buffers another
            self._wait()  # thread may take once it finishes, as a bake's projections do) is asked for more

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def end(self) -> None:
        """Finish the tensor begun; an error if pieces are missing."""
        self._wait()
        if self._left:
            raise ValueError(f"{self.layout[self._next][0]}: the edit returned {self._left} bytes too few")
        self._left = -1
        self._next += 1

    def patch_header(self, resolve: Callable[[str], str]) -> None:
        """After :meth:`close`: rewrite the header through ``resolve`` (fingerprint placeholders
        filled in), which must keep its length."""
        text = self._header.decode()
        new = resolve(text)
        if new != text:
            blob = new.encode()
            if len(blob) != len(self._header):
                raise AssertionError(f"{self.path}: a resolved header changed length")
            with open(self.path, "r+b") as f:
                f.seek(8)
                f.write(blob)
            self._header = blob

    def abort(self) -> None:
        """Close the file without the completeness check (the caller is raising another error)."""
        try:
            self._wait()
        except BaseException:
            pass  # the error being raised is the one to report
        finally:
            self._stop()
            self._f.close()

    def _stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def close(self) -> None:
        try:
            self._wait()
            self._stop()
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


def write_checkpoint(source: Checkpoint, out: str | os.PathLike, tensor: Callable[[str, torch.Tensor], torch.Tensor] | None,
                     provenance: Mapping[str, Any], *, overwrite: bool = False,
                     sources: Iterable[str | os.PathLike] = (), extra: Mapping[str, torch.Tensor] | None = None,
                     side_files: Callable[[Path], None] | None = None, progress: bool = False,
                     keep_remote_code: bool = False,
                     pieces: Callable[[str, SafetensorsFile], Iterator[torch.Tensor] | None] | None = None,
                     threads: int | None = None, before_commit: Callable[[Path], None] | None = None) -> Path:
    """Write ``source`` with every tensor passed through ``tensor(name, original)`` into folder ``out``.

    The function gets the stored tensor (its own dtype) and returns the edited one, which is cast
    back to the stored dtype; shapes must not change. Or, for edits that act entry by entry,
    ``pieces(name, file)`` returns the edited tensor as an iterator of flat pieces in the stored
    dtype (built from ``file.pieces(name)``), or ``None`` to copy the tensor unchanged: nothing is
    then held but a few pieces. A piece is written in the background, so it must stay unchanged
    until the iterator is asked for the piece after next (alternate two buffers, or yield fresh
    tensors). ``extra`` tensors (new biases of a baked edit) go into the last
    shard. ``side_files(tmp)`` writes config files in place of copying the source's (a bake that
    changes the config). Fingerprint placeholders in ``provenance`` (see
    :meth:`Checkpoint.fingerprint`) are filled into every header once everything is read. Torch
    runs on ``threads`` threads less one (default: the threads torch has), the reads, hashing and
    fsync in background threads. ``before_commit(tmp)`` runs once every shard is written, before
    the folder is renamed into place (an error there leaves nothing). See the module docstring
    for the guarantees."""
    from tqdm.auto import tqdm

    from ..io import fsync_file, atomic_folder

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
    writers: list[ShardWriter] = []
    syncs = ThreadPoolExecutor(1, thread_name_prefix="steering-fsync")
    try:
        with atomic_folder(out) as tmp, compute_threads(threads):
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
                        if pieces is not None:  # pieces come from reused buffers: nothing to hand back
                            _write_pieces(w, n, f, pieces(n, f))
                        else:
                            _write_whole(w, n, f, tensor)
                            release_memory()
                        bar.update()
                    for n in new:
                        w.write(n, extra[n])
                        bar.update()
                except BaseException:
                    w.abort()  # the first error is the one reported, not "tensors were not written"
                    bar.close()
                    syncs.shutdown(wait=True)
                    raise
                w.close()
                writers.append(w)
                syncs.submit(fsync_file, w.path)  # overlapped with the next shard's work
                total += sum(dtype.itemsize * numel(shape) for _, dtype, shape in layout)
            try:
                if before_commit is not None:
                    before_commit(tmp)  # beside the last shards' fsyncs (what it changes is flushed below)
            finally:
                syncs.shutdown(wait=True)
            blob = resolve_fingerprints(blob)
            for w in writers:
                w.patch_header(resolve_fingerprints)
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
    finally:
        drop_spare_buffers()  # the job is over: a big model's whole tensors must not stay held
    bar.close()
    return out


def _write_whole(w: ShardWriter, n: str, f: SafetensorsFile, tensor: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
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


def finite(t: torch.Tensor) -> bool:
    """Whether every entry of a floating tensor is finite (``aminmax``: NaN and ±inf reach the
    extremes; about 30× faster than ``isfinite(t).all()`` on CPU)."""
    if not t.is_floating_point() or not t.numel():
        return True
    try:
        lo, hi = torch.aminmax(t.reshape(-1))
    except (RuntimeError, NotImplementedError):  # dtypes without aminmax (float8)
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _write_pieces(w: ShardWriter, n: str, f: SafetensorsFile, it: Iterator[torch.Tensor] | None) -> None:
    w.begin(n)
    if it is None:
        for p in f.pieces(n, written=True):  # copied as stored
            w.write_piece(p)
    else:
        for p in it:
            check_edited(n, p)
            w.write_piece(p)
    w.end()


def check_edited(name: str, t: torch.Tensor) -> None:
    """An error naming ``name`` if the edited values ``t`` hold NaN or ±inf."""
    if not finite(t):
        raise ValueError(f"{name}: the edit made NaN or infinite values (check the edit's scale and vectors, "
                         "and that its inputs hold finite values)")


class compute_threads:
    """``with compute_threads(n):`` torch runs on ``n − 1`` intra-op threads (at least 1) inside
    the block, leaving a core to the background reads, hashing and writes; restored after.
    ``None``: the threads torch has now. (Torch's threads spin while they wait, so letting them
    compete with the readers for the same cores costs far more than it gains.)"""

    def __init__(self, threads: int | None):
        self.threads = threads

    def __enter__(self) -> "compute_threads":
        self.before = torch.get_num_threads()
        n = self.before if self.threads is None else int(self.threads)
        if n < 1:
            raise ValueError(f"threads must be at least 1, not {self.threads}")
        torch.set_num_threads(max(1, n - 1))
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.before)
