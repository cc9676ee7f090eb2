"""Task vectors τ = θ_finetuned − θ_base, computed one tensor at a time, and Harm Direction Removal.

A :class:`TaskVector` is lazy: it knows its tensors' names and shapes, and computes one tensor
(in float32) when asked. Arithmetic (``a + b``, ``a - b``, ``-a``, ``2 * a``), sparsification
(:meth:`TaskVector.top_k`, per tensor or the *exact* global top-k over the whole model) and DARE
build new lazy vectors; :func:`ties` merges several. Nothing ever holds two models, or even two
whole tensors sets, in memory: applying a vector to a checkpoint (:func:`apply`, :func:`hdr`)
streams it tensor by tensor into an edited checkpoint through :func:`steering.weights.write_checkpoint`.

Recipes: task arithmetic (Ilharco et al.), TIES (trim, elect sign, disjoint mean),
DARE (drop and rescale) and Safety Arithmetic's HDR, θ_safe = θ_target − λ·topk(τ_H) with
τ_H = θ_harmful − θ_base (λ = 3, k = 10% global in the paper). Unlike that paper's code, the
global threshold is found with a two-pass radix select over float32 bit patterns while holding
one tensor at a time (their code runs one ``kthvalue`` over all 6.7 billion values).

Ties at the threshold are broken deterministically: entries strictly above it are kept, then
entries equal to it in order of (tensor name, flat index) until exactly k are kept — the same
entries a stable full sort by descending magnitude would pick.

>>> tau_h = TaskVector.between("organisms/aligned", "organisms/harmful")
>>> hdr("organisms/drifted", tau_h, scale=3.0, top_k=0.1, out="runs/drifted-hdr")
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .files import Checkpoint, ShardWriter, numel, provenance_json, release_memory

FORMAT = "steering.task_vector"


class TaskVector:
    """A lazy map from tensor name to a float32 delta. Build one with :meth:`between` or :meth:`load`."""

    names: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    provenance: dict[str, Any]

    def _setup(self, names: Iterable[str], shapes: Mapping[str, tuple[int, ...]], provenance: Mapping[str, Any]) -> None:
        self.names = tuple(sorted(names))
        self.shapes = {n: tuple(shapes[n]) for n in self.names}
        self.provenance = dict(provenance)

    def _get(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """The delta of tensor ``name`` (float32): a fresh tensor, which the caller may change in place."""
        if name not in self.shapes:
            raise KeyError(f"task vector has no tensor {name!r}")
        return self._get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def __len__(self) -> int:
        return len(self.names)

    @property
    def numel(self) -> int:
        return sum(numel(s) for s in self.shapes.values())

    def __repr__(self) -> str:
        return f"TaskVector({self.provenance.get('method', '?')}, {len(self.names)} tensors, {self.numel} values)"

    # --- construction -------------------------------------------------------------------
    @staticmethod
    def between(base: str | os.PathLike | Checkpoint, finetuned: str | os.PathLike | Checkpoint, *,
                include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None) -> "TaskVector":
        """τ = finetuned − base over the tensors both hold.

        By default every floating tensor takes part (as Safety Arithmetic does: embeddings, norms and
        the unembedding included). ``include`` / ``exclude`` are regular expressions (or lists of
        them) matched with ``re.search`` against tensor names. Names, shapes and dtypes must agree;
        a mismatch is an error naming the tensor."""
        b = base if isinstance(base, Checkpoint) else Checkpoint(base)
        f = finetuned if isinstance(finetuned, Checkpoint) else Checkpoint(finetuned)
        for n in b.names:
            if n not in f:
                raise ValueError(f"{n}: in base {b.path} but not in fine-tune {f.path}")
        for n in f.names:
            if n not in b:
                raise ValueError(f"{n}: in fine-tune {f.path} but not in base {b.path}")
        names = select_names(b, include, exclude)
        for n in b.names:  # a dtype mismatch is named even where the tensor would not take part
            if b.dtype(n) != f.dtype(n):
                raise ValueError(f"{n}: dtype {b.dtype(n)} in base {b.path} but {f.dtype(n)} in fine-tune {f.path}")
        for n in names:
            if b.shape(n) != f.shape(n):
                raise ValueError(f"{n}: shape {b.shape(n)} in base {b.path} but {f.shape(n)} in fine-tune {f.path}")
        return _Diff(b, f, names)

    @staticmethod
    def load(path: str | os.PathLike) -> "TaskVector":
        """A task vector saved by :meth:`save` (read lazily, one tensor at a time)."""
        ck = Checkpoint(path)
        if ck.metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not a steering task vector file (metadata format={ck.metadata.get('format')!r})")
        return _File(ck)

    # --- arithmetic ---------------------------------------------------------------------
    def _check_same(self, other: "TaskVector") -> None:
        """Shapes must agree on the tensors both vectors hold (a tensor only one holds counts as zero
        in the other, so vectors built with different include / exclude patterns can be added)."""
        for n in self.names:
            if n in other.shapes and self.shapes[n] != other.shapes[n]:
                raise ValueError(f"{n}: shapes {self.shapes[n]} and {other.shapes[n]} differ between the task vectors")

    def __add__(self, other: "TaskVector") -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        self._check_same(other)
        return _Sum([(1.0, self), (1.0, other)])

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        self._check_same(other)
        return _Sum([(1.0, self), (-1.0, other)])

    def __neg__(self) -> "TaskVector":
        return _Sum([(-1.0, self)])

    def __mul__(self, c: float) -> "TaskVector":
        if isinstance(c, TaskVector) or not isinstance(c, (int, float)):
            return NotImplemented
        return _Sum([(float(c), self)])

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> "TaskVector":
        return self * (1.0 / c)

    # --- sparsification -----------------------------------------------------------------
    def top_k(self, fraction: float, scope: str = "global") -> "TaskVector":
        """Keep the ``fraction`` of entries largest in magnitude (k = ⌈fraction·n⌉), zero the rest:
        over the whole vector (``scope="global"``, exact, see the module docstring) or in each
        tensor separately (``"tensor"``)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"top_k fraction must be in [0, 1], not {fraction}")
        if scope not in ("global", "tensor"):
            raise ValueError(f"top_k scope must be 'global' or 'tensor', not {scope!r}")
        return _TopK(self, fraction, scope)

    def dare(self, p: float, seed: int = 0) -> "TaskVector":
        """DARE: drop each entry with probability ``p`` and rescale the rest by 1/(1 − p).
        The mask of a tensor depends only on (seed, tensor name)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dare p must be in [0, 1), not {p}")
        return _Dare(self, p, seed)

    def norm(self) -> float:
        return math.sqrt(sum(float(self.get(n).double().pow(2).sum()) for n in self.names))

    def nonzero(self) -> int:
        return sum(int(torch.count_nonzero(self.get(n))) for n in self.names)

    # --- output -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, overwrite: bool = False) -> Path:
        """Write every tensor (as ``dtype``) to one safetensors file with the provenance in its
        metadata; written to a temporary file and renamed into place."""
        from ..io import atomic_write
        from .files import check_output

        path = Path(path)
        check_output(path, self.sources(), overwrite)
        meta = {"format": FORMAT, "steering": provenance_json(self.provenance)}

        def write(tmp: str) -> None:
            w = ShardWriter(tmp, [(n, dtype, self.shapes[n]) for n in self.names], meta)
            try:
                for n in self.names:
                    t = self.get(n)
                    if not bool(torch.isfinite(t).all()):
                        raise ValueError(f"{n}: the task vector holds NaN or infinite values")
                    w.write(n, t.to(dtype))
                    release_memory()
            except BaseException:
                w.abort()  # report the first error, not "tensors were not written"
                raise
            w.close()
        atomic_write(path, write)
        return path

    def sources(self) -> list[Path]:
        return []


def select_names(ck: Checkpoint, include: str | Sequence[str] | None, exclude: str | Sequence[str] | None) -> list[str]:
    """Names of ``ck`` that take part: floating tensors, filtered by the include / exclude regexes.
    A non-floating tensor an ``include`` pattern names explicitly is an error."""
    inc = [include] if isinstance(include, str) else list(include or [])
    exc = [exclude] if isinstance(exclude, str) else list(exclude or [])
    try:
        inc_re = [re.compile(p) for p in inc]
        exc_re = [re.compile(p) for p in exc]
    except re.error as e:
        raise ValueError(f"include/exclude pattern {e.pattern!r}: {e}") from None
    names = []
    for n in ck.names:
        if inc_re and not any(r.search(n) for r in inc_re):
            continue
        if any(r.search(n) for r in exc_re):
            continue
        if not ck.is_floating(n):
            if inc_re:
                raise ValueError(f"{n}: is {ck.dtype(n)}, not floating; task vectors take floating tensors only")
            continue
        names.append(n)
    for p, r in zip(inc, inc_re):
        if not any(r.search(n) for n in ck.names):
            raise ValueError(f"include pattern {p!r} matches no tensor of {ck.path}")
    return names


class _Diff(TaskVector):
    def __init__(self, base: Checkpoint, ft: Checkpoint, names: list[str]):
        self.base, self.ft = base, ft
        self._setup(names, {n: base.shape(n) for n in names},
                    {"method": "task_vector", "base": str(base.path), "finetuned": str(ft.path),
                     "base_sha256": base.fingerprint(), "finetuned_sha256": ft.fingerprint()})

    def _get(self, name: str) -> torch.Tensor:
        d = self.ft.get(name).float()  # in place from here: one float32 tensor, not three
        return d.sub_(self.base.get(name))

    def sources(self) -> list[Path]:
        return [self.base.path, self.ft.path]


class _File(TaskVector):
    def __init__(self, ck: Checkpoint):
        import json

        self.ck = ck
        try:
            prov = json.loads(ck.metadata.get("steering", "{}"))
        except ValueError:
            prov = None
        if not isinstance(prov, dict):
            raise ValueError(f"{ck.path}: its 'steering' metadata is not a JSON object; not a task vector steering wrote")
        self._setup(ck.names, {n: ck.shape(n) for n in ck.names}, {**prov, "file": str(ck.path)})

    def _get(self, name: str) -> torch.Tensor:
        return self.ck.get(name).float()

    def sources(self) -> list[Path]:
        return [self.ck.path]


class _Sum(TaskVector):
    def __init__(self, terms: list[tuple[float, TaskVector]]):
        flat: list[tuple[float, TaskVector]] = []
        for c, v in terms:  # (a + b) + c is one sum; the order of terms is kept, so results are reproducible
            if isinstance(v, _Sum):
                flat += [(c * c2, v2) for c2, v2 in v.terms]
            else:
                flat.append((c, v))
        self.terms = flat
        first = flat[0][1]
        shapes: dict[str, tuple[int, ...]] = {}
        for _, v in flat:
            shapes.update(v.shapes)
        self._setup(shapes, shapes,
                    {"method": "sum", "terms": [[c, v.provenance] for c, v in flat]} if len(flat) > 1 or flat[0][0] != 1.0
                    else first.provenance)

    def _get(self, name: str) -> torch.Tensor:
        out = None
        for c, v in self.terms:
            if name not in v:
                continue
            t = v.get(name)
            if c != 1.0:
                t.mul_(c)
            out = t if out is None else out.add_(t)
        return out

    def sources(self) -> list[Path]:
        return [s for _, v in self.terms for s in v.sources()]


class _Dare(TaskVector):
    def __init__(self, inner: TaskVector, p: float, seed: int):
        self.inner, self.p, self.seed = inner, p, seed
        self._setup(inner.names, inner.shapes, {"method": "dare", "p": p, "seed": seed, "of": inner.provenance})

    def _get(self, name: str) -> torch.Tensor:
        t = self.inner.get(name)
        if self.p == 0.0:
            return t
        g = torch.Generator().manual_seed(self.seed ^ int(hashlib.sha256(name.encode()).hexdigest()[:12], 16))
        drop = torch.rand(t.shape, generator=g) < self.p
        return t.div_(1.0 - self.p).masked_fill_(drop, 0.0)

    def sources(self) -> list[Path]:
        return self.inner.sources()


# --- exact top-k, one tensor at a time ----------------------------------------------------
_PIECE = 2**23  # entries per piece of the top-k passes: their temporaries stay near 32 MB each


def _bits(t: torch.Tensor, name: str) -> torch.Tensor:
    """|t| as int32 bit patterns (monotone in |t| for non-negative floats)."""
    a = t.reshape(-1).float().abs()
    if torch.isnan(a).any():
        raise ValueError(f"{name}: the task vector has NaN entries")
    return a.view(torch.int32)


def _pieces(t: torch.Tensor, name: str) -> Iterable[torch.Tensor]:
    """``_bits`` of ``t`` in consecutive pieces of the flattened tensor."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), _PIECE):
        yield _bits(flat[i:i + _PIECE], name)


class Threshold:
    """The exact k-th largest magnitude of a set of tensors, and how many of its ties to keep.

    ``value_bits``: the threshold as float32 bits; ``above``: entries strictly above it;
    ``ties_before[name]``: ties at the threshold in tensors before ``name`` (in name order), so
    a tensor knows how many of its own ties to keep without a look at the others."""

    def __init__(self, get: Callable[[str], torch.Tensor], names: Sequence[str], k: int):
        self.k = k
        if k == 0:
            self.value_bits, self.above, self.ties_before, self.keep_ties = 2**31 - 1, 0, {n: 0 for n in names}, 0
            return
        hi = torch.zeros(2**15, dtype=torch.int64)
        for n in names:  # pass 1: histogram of the top 15 value bits
            for bits in _pieces(get(n), n):
                hi += torch.bincount(bits >> 16, minlength=2**15)
            release_memory()
        above_hi = torch.flip(torch.cumsum(torch.flip(hi, [0]), 0), [0])  # count with hi-bin ≥ b
        b = int((above_hi >= k).nonzero().max())
        n_above_bin = int(above_hi[b] - hi[b])
        lo = torch.zeros(2**16, dtype=torch.int64)
        for n in names:  # pass 2: histogram of the low 16 bits inside bin b
            for bits in _pieces(get(n), n):
                lo += torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=2**16)
            release_memory()
        above_lo = torch.flip(torch.cumsum(torch.flip(lo, [0]), 0), [0]) + n_above_bin
        low = int((above_lo >= k).nonzero().max())
        self.value_bits = (b << 16) | low
        self.above = int(above_lo[low] - lo[low])
        self.keep_ties = k - self.above
        self.ties_before, run = {}, 0
        # pass 3, only when some ties at the threshold must be dropped: count each tensor's ties.
        # (Keeping per-tensor histograms from pass 2 instead fragments the heap: RSS grew by a
        # tensor per tensor in a test.)
        for n in names:
            self.ties_before[n] = run
            if self.keep_ties < int(lo[low]):
                run += sum(int((bits == self.value_bits).sum()) for bits in _pieces(get(n), n))
                release_memory()

    def mask(self, name: str, t: torch.Tensor) -> torch.Tensor:
        keep = torch.empty(t.numel(), dtype=torch.bool)  # filled piece by piece: no concatenated copy
        ties = []
        for i, bits in enumerate(_pieces(t, name)):
            torch.gt(bits, self.value_bits, out=keep[i * _PIECE:i * _PIECE + bits.numel()])
            if self.k:
                ties.append((bits == self.value_bits).nonzero().squeeze(1) + i * _PIECE)
        if ties:
            tie_idx = torch.cat(ties)
            keep[tie_idx[:max(0, min(len(tie_idx), self.keep_ties - self.ties_before[name]))]] = True
        return keep.reshape(t.shape)


class _TopK(TaskVector):
    def __init__(self, inner: TaskVector, fraction: float, scope: str):
        self.inner, self.fraction, self.scope = inner, fraction, scope
        self._threshold: Threshold | None = None
        self._setup(inner.names, inner.shapes,
                    {"method": "top_k", "fraction": fraction, "scope": scope, "of": inner.provenance})

    def k_of(self, n: int) -> int:
        return min(n, math.ceil(self.fraction * n - 1e-9))

    def threshold(self) -> Threshold:
        """The global threshold (two passes over the vector, computed once)."""
        if self._threshold is None:
            self._threshold = Threshold(self.inner.get, self.names, self.k_of(self.numel))
        return self._threshold

    def _get(self, name: str) -> torch.Tensor:
        t = self.inner.get(name)
        if self.scope == "global":
            th = self.threshold()
        else:
            th = Threshold(lambda _: t, [name], self.k_of(t.numel()))
        return t.masked_fill_(th.mask(name, t).logical_not_(), 0.0)

    def sources(self) -> list[Path]:
        return self.inner.sources()


class _Ties(TaskVector):
    def __init__(self, vectors: Sequence[TaskVector], k: float):
        self.trimmed = [v.top_k(k, "global") if k < 1.0 else v for v in vectors]
        for v in vectors[1:]:
            vectors[0]._check_same(v)
            if set(v.names) != set(vectors[0].names):
                raise ValueError(f"{sorted(set(v.names) ^ set(vectors[0].names))[0]}: TIES needs task vectors over the same tensors")
        self._majority: float | None = None
        self._setup(vectors[0].names, vectors[0].shapes,
                    {"method": "ties", "top_k": k, "of": [v.provenance for v in vectors]})

    def majority(self) -> float:
        """The sign given to entries whose summed sign is zero: the sign of the sum of all
        elected signs (TIES's ``resolve_zero_signs(..., "majority")``)."""
        if self._majority is None:
            total = sum(float(torch.sign(sum(v.get(n) for v in self.trimmed)).sum()) for n in self.names)
            self._majority = 1.0 if total >= 0 else -1.0
        return self._majority

    def _get(self, name: str) -> torch.Tensor:
        ts = torch.stack([v.get(name) for v in self.trimmed])
        sign = torch.sign(ts.sum(0))
        sign = torch.where(sign == 0, torch.full_like(sign, self.majority()), sign)
        agree = torch.where(sign > 0, ts > 0, ts < 0)
        kept = ts * agree
        return kept.sum(0) / agree.sum(0).clamp(min=1)

    def sources(self) -> list[Path]:
        return [s for v in self.trimmed for s in v.sources()]


def ties(vectors: Sequence[TaskVector], top_k: float = 0.2) -> TaskVector:
    """TIES merge: trim each vector to its global top ``top_k``, elect each entry's sign by the sum,
    and average the entries that agree with it (disjoint mean). Scale the result to apply it."""
    if not vectors:
        raise ValueError("ties needs at least one task vector")
    return _Ties(list(vectors), top_k)


# --- applying to checkpoints ------------------------------------------------------------
def apply(target: str | os.PathLike | Checkpoint, vector: TaskVector, out: str | os.PathLike, *,
          scale: float = 1.0, overwrite: bool = False, provenance: Mapping[str, Any] | None = None,
          progress: bool = False) -> Path:
    """θ_out = θ_target + scale·τ, streamed tensor by tensor into the folder ``out`` (arithmetic in
    float32, every tensor stored in its own dtype; tensors τ does not hold are copied)."""
    from .files import write_checkpoint

    tgt = target if isinstance(target, Checkpoint) else Checkpoint(target)
    for n in vector.names:
        if n not in tgt:
            raise ValueError(f"{n}: in the task vector but not in the target {tgt.path}")
        if tgt.shape(n) != vector.shapes[n]:
            raise ValueError(f"{n}: shape {vector.shapes[n]} in the task vector but {tgt.shape(n)} in the target {tgt.path}")
        if not tgt.is_floating(n):
            raise ValueError(f"{n}: is {tgt.dtype(n)} in the target {tgt.path}, not floating")
    if not math.isfinite(scale):
        raise ValueError(f"apply: scale must be a finite number, not {scale}")
    v = vector if scale == 1.0 else scale * vector

    def edit(name: str, t: torch.Tensor) -> torch.Tensor:
        return v.get(name).add_(t).to(t.dtype) if name in v else t  # = t.float() + v, without a third float32 copy

    prov = {"method": "task_arithmetic", "target": str(tgt.path), "target_sha256": tgt.fingerprint(),
            "scale": scale, "vector": vector.provenance, **(provenance or {})}
    return write_checkpoint(tgt, out, edit, prov, overwrite=overwrite, sources=vector.sources(), progress=progress)


def hdr(target: str | os.PathLike | Checkpoint, harm: TaskVector, out: str | os.PathLike, *, scale: float = 3.0,
        top_k: float | None = 0.1, scope: str = "global", overwrite: bool = False, progress: bool = False) -> Path:
    """Harm Direction Removal (Safety Arithmetic): θ_safe = θ_target − scale·topk(τ_H), with the
    exact global top ``top_k`` fraction of τ_H (``None`` or 1: untrimmed; ``scope="tensor"``: the
    top fraction of each tensor instead, which the paper does not do)."""
    if not math.isfinite(scale):
        raise ValueError(f"hdr: scale must be a finite number, not {scale}")
    if top_k is not None and not 0.0 < top_k <= 1.0:
        raise ValueError(f"hdr: top_k must be a fraction in (0, 1], not {top_k}")
    trimmed = harm if top_k is None or top_k >= 1.0 else harm.top_k(top_k, scope)
    return apply(target, trimmed, out, scale=-scale, overwrite=overwrite, progress=progress,
                 provenance={"method": "hdr", "hdr_scale": scale, "hdr_top_k": 1.0 if top_k is None else top_k,
                             "hdr_scope": scope})
