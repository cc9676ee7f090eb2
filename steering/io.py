"""Writing files and folders so that nothing is lost, and outputs that never touch an input.

Every output is written to a temporary sibling (``.NAME.tmp-PID-XXXX``), fsynced, and renamed into
place, so an output exists only once it is complete. Replacing an existing folder is a swap:
on Linux one atomic ``renameat2(RENAME_EXCHANGE)`` of the new folder and the old, elsewhere the old
one renamed aside first (``.NAME.old-PID-XXXX``) and the new one renamed in; only then is the old
one deleted. So a kill at any instant leaves either the old output whole or the new one whole.
Temporaries of runs that were killed are removed by the next run that writes into the same place
(their process id is in their name, and only those of dead processes are touched).

:func:`check_paths` refuses, before any work, an output that is, contains, or lies inside any of
the command's inputs, every symlink resolved (also the links inside an input folder, as in the
Hugging Face cache, where a snapshot folder is made of links into ``../../blobs``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed runs left beside ``path`` (returns them); an old output
    a run killed mid-swap left aside goes back to ``path`` if nothing is there."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pat = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-(\d+)-")
    gone = []
    for sib in sorted(path.parent.iterdir()):
        m = pat.match(sib.name)
        if m and not _alive(int(m.group(2))):
            if m.group(1) == "old" and not (path.exists() or path.is_symlink()):
                os.replace(sib, path)  # a run killed mid-swap: the old output goes back in place
                continue
            if sib.is_dir() and not sib.is_symlink():
                shutil.rmtree(sib, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    sib.unlink()
            gone.append(sib)
    return gone


def _libc(name: str, argtypes: list) -> Any:
    """The Linux C library's function ``name``, or None where there is none."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes

    fn = _libc("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def reserve(fd: int, size: int, path: str | os.PathLike) -> None:
    """Allocate the ``size`` bytes a file being written will hold, at once (Linux ``fallocate(2)``):
    the file system maps its blocks in one step rather than page by page as the writes come, and a
    disk too small fails here, before any work, with an OSError naming ``path``. Where the call is
    not supported it does nothing (no emulation by writing zeros, as ``posix_fallocate`` would)."""
    import ctypes
    import errno

    fn = _libc("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
    if fn is None or size <= 0 or fn(fd, 0, 0, size) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        raise OSError(err, f"{path}: cannot hold the {size} bytes it is to be written with ({os.strerror(err)})")


def _prefix(path: Path, kind: str = "tmp") -> str:
    return f".{path.name}.{kind}-{os.getpid()}-"


def cache_root() -> Path:
    """Where steering keeps what it can rebuild (organisms, tensor plans, fingerprints):
    ``$STEERING_CACHE``, by default ``~/.cache/steering``."""
    return Path(os.environ.get("STEERING_CACHE", Path.home() / ".cache" / "steering"))


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path`` (a file or folder) to disk; errors are ignored (a file system without fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_file(os.path.join(dirpath, f))
        fsync_file(dirpath)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_file(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; when the block succeeds it replaces ``out`` by a
    swap (see the module docstring), and when it fails it is removed and the first error raised."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=_prefix(out)))
    try:
        yield tmp
        _fsync_tree(tmp)
        if (out.exists() or out.is_symlink()) and _exchange(tmp, out):
            old = tmp  # the two names swapped in one step: tmp now holds the old output
        else:
            old = None
            if out.exists() or out.is_symlink():
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=_prefix(out, "old")))
                old.rmdir()
                os.replace(out, old)  # a kill from here to the next line leaves the old output aside,
            os.replace(tmp, out)      # and the next run into ``out`` puts it back (clean_stale)
        fsync_file(out.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def _input_paths(inp: Path) -> set[Path]:
    """An input and every real file it stands for (the targets of the links inside a folder too)."""
    real = {_resolved(inp)}
    if inp.is_dir():
        for dirpath, dirs, files in os.walk(inp):
            for name in files + dirs:
                p = Path(dirpath) / name
                if p.is_symlink():
                    real.add(_resolved(p))
    return real


def check_paths(outputs: Iterable[str | os.PathLike | None], inputs: Iterable[str | os.PathLike | None]) -> None:
    """One clear error if an output is, contains, or lies inside an input (symlinks resolved).

    Inputs that do not exist on disk (hub names, bundled prompt-set names) are skipped."""
    ins: list[tuple[str, Path]] = []
    for i in inputs:
        if i is None or not str(i) or not Path(i).expanduser().exists():
            continue
        ins += [(str(i), p) for p in _input_paths(Path(i).expanduser())]
    for o in outputs:
        if o is None:
            continue
        out = _resolved(o)
        for name, src in ins:
            if out == src:
                raise ValueError(f"{o}: the output is the input {name}; write somewhere else")
            if src in out.parents:
                raise ValueError(f"{o}: the output lies inside the input {name}; write somewhere else")
            if out in src.parents:
                raise ValueError(f"{o}: the output would hold the input {name} (replacing it deletes the input); "
                                 "write somewhere else")


def read_safetensors(path: str | os.PathLike, fmt: str, what: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Metadata and tensors of a steering file whose metadata ``format`` is ``fmt``; one clear error
    naming the file when it is missing, unreadable or of another kind (``what`` names the kind)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path}: unreadable safetensors file ({exc})") from None
    if meta.get("format") != fmt:
        raise ValueError(f"{path}: not a steering {what} file (metadata format={meta.get('format')!r})")
    return meta, tensors


def check_finite(tensors: dict[str, Any], where: str) -> None:
    """One clear error naming ``where`` and the tensor when a value is NaN or infinite."""
    import torch

    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: tensor {name!r} holds NaN or infinite values")
