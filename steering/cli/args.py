"""The command line's argument layer: value types that argparse refuses with a message naming the
option, the output guard every command runs before any work, SafeInfer's option group and its
mapping onto :func:`steering.safeinfer.decoding`, and one-line errors."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Iterable


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def nonneg_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} is negative")
    return value


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is not a fraction in (0, 1]")
    return value


def skill_list(text: str) -> tuple[str, ...]:
    from steering.skills import SKILLS

    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SKILLS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: skills are {', '.join(SKILLS)} (comma-separated)")
    return names


def guard(outputs: Iterable[Any], *inputs: Any) -> None:
    """Refuse, before any work, an output that is, holds or lies inside an input (symlinks resolved)."""
    from steering.io import check_paths

    flat: list[Any] = []
    for i in inputs:
        flat += list(i) if isinstance(i, (list, tuple)) else [i]
    check_paths(list(outputs), [x for x in flat if isinstance(x, str) and not x.startswith("organism:")])


def fresh_folder(out: str, overwrite: bool) -> None:
    """A report folder: refused if it is a file, or a non-empty folder without ``--overwrite``."""
    path = Path(out)
    if path.is_file():
        raise FileExistsError(f"{out}: is a file; --out takes a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; pass --overwrite to write the report into it")


def add_safeinfer_args(c: argparse.ArgumentParser) -> None:
    g = c.add_argument_group("SafeInfer (context-adaptive decoding)")
    g.add_argument("--safeinfer", action="store_true", help="decode with SafeInfer: safety amplification and guided decoding")
    g.add_argument("--unsafe-model", help="a model fine-tuned on unsafe data, with the same tokenizer (needed unless --gamma 0)")
    g.add_argument("--amplify-layer", type=int, help="layer that gets the amplification vector (default: the middle one)")
    g.add_argument("--amplify-site", help="where the amplification vector is read and added: mlp_out (default, as "
                                          "the paper) or another hook site, e.g. resid_post")
    g.add_argument("--amplify-scale", type=finite_float, default=1.5, help="0 turns amplification off (default 1.5, as the paper)")
    g.add_argument("--gamma", type=nonneg_float, help="guidance strength; 0 turns guided decoding off "
                                                       "(default: steering.safeinfer.GAMMA, the paper's 99)")


def safeinfer_kwargs(m: Any, args: argparse.Namespace) -> dict[str, Any]:
    """SafeInfer's options as :func:`steering.safeinfer.decoding`'s result (amplify, unsafe, gamma)."""
    from steering import safeinfer

    try:
        return safeinfer.decoding(m, unsafe=args.unsafe_model, amplify_layer=args.amplify_layer,
                                  amplify_scale=args.amplify_scale, amplify_site=args.amplify_site or "mlp_out",
                                  gamma=args.gamma)
    except ValueError as e:
        if args.gamma != 0 and not args.unsafe_model:
            raise ValueError("--safeinfer: guided decoding needs --unsafe-model DIR (or --gamma 0 for amplification alone)") from None
        raise ValueError(f"--safeinfer: {e}") from None


def check_no_safeinfer_options(args: argparse.Namespace) -> None:
    """SafeInfer's options without ``--safeinfer`` are a mistake, not something to ignore."""
    if args.unsafe_model or args.amplify_layer is not None or args.amplify_site:
        raise ValueError("--unsafe-model / --amplify-layer / --amplify-site need --safeinfer")


def end_progress_bars() -> str:
    """Close any progress bar an error left open; a newline to print first if one was open, so that
    the error is the last line, alone."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return ""
    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        try:
            bar.leave = False
            bar.close()
        except Exception:  # pragma: no cover - a bar that cannot close must not hide the error
            pass
    sys.stderr.flush()
    return "\n" if bars else ""


def one_line(text: Any) -> str:
    return " ".join(str(text).split())
