"""Prompt sets for steering: bundled harmful / harmless benchmarks and user files.

CONTENT WARNING: the harmful sets hold harmful requests; use them only to
evaluate refusal and to fit steering vectors.

Usage::

    from steering import datasets
    harmful = datasets.load("harmful:train")
    harmless = datasets.load("harmless:train", limit=256)
    mine = datasets.load("my_prompts.csv", column="question")

Named sets (``names()`` lists them all, ``info(name)`` gives source, licence and
row counts).  ``name`` alone is every row; ``name:train`` / ``name:val`` /
``name:test`` is a split.

=====================  =========================================================
advbench               AdvBench goals (520)
harmbench              HarmBench *standard* behaviours (200); contextual ones
                       need their ContextString and copyright ones are not
                       harmful requests, so both are left out
jailbreakbench         JailbreakBench goals (100)
refusal_direction      harmful splits of Arditi et al. (2024)
harmful                pool of the four sets above
xstest                 XSTest (450); ``xstest:safe`` (250), ``xstest:unsafe``
                       (200, the ``contrast_*`` prompts), e.g. ``xstest:safe:test``
hh_rlhf                hh-rlhf helpful-* test sets: first human turns (the text
                       between "\\n\\nHuman: " and the first "\\n\\nAssistant:"
                       of ``chosen``), keyword-filtered (see below)
self_instruct          self-instruct seed + user-oriented instructions whose
                       first instance has an empty ``input``
ifeval                 IFEval prompts
mt_bench               MT-bench first turns
vicuna                 Vicuna-bench questions
arena_hard             Arena-Hard-Auto v0.1 prompts
harmless               pool of the six sets above, filtered (see below)
=====================  =========================================================

Cleaning.  Every set strips surrounding whitespace from each prompt, drops empty
ones and is deduplicated on its *normalised* text (lower-cased, stripped, runs of
whitespace collapsed to one space), keeping the first occurrence.

Splits.  All sets except ``harmbench`` and ``refusal_direction`` are split by
hash: the first 8 bytes of ``sha256(normalised text)``, read as a big-endian
integer and divided by 2**64, give a fraction f; f < 0.6 -> ``train``,
f < 0.8 -> ``val``, otherwise ``test`` (about 60/20/20).  A prompt thus lands in
the same split in every hash-split set it appears in (``advbench:train`` is
exactly ``harmful:train`` restricted to AdvBench), the pools are i.i.d. over their
sources, and adding data never moves an existing prompt.

``harmbench`` and ``refusal_direction`` keep their *official* splits instead:
``harmbench:val`` / ``harmbench:test`` are the standard behaviours of HarmBench's
val / test files (HarmBench has no train split); ``refusal_direction:train`` /
``:val`` / ``:test`` are its harmful_{train,val,test}.json (one prompt listed in
both train and test is kept in train only).  Official splits do NOT agree with the
hash split, so do not train on ``refusal_direction:train`` and evaluate on
``harmful:test`` (or vice versa): stay within one family.

Pools.  ``harmful`` is advbench + harmbench + jailbreakbench + refusal_direction,
deduplicated.  ``harmless`` is hh_rlhf + self_instruct + ifeval + mt_bench +
vicuna + arena_hard, deduplicated, minus (1) prompts matching the borderline
keyword filter (``BORDERLINE_TERMS``: drugs, weapons, violence, crime, hate,
sex, self-harm words matched case-insensitively on word boundaries; see
``is_borderline``), which is also applied to ``hh_rlhf`` itself, (2) prompts
longer than ``MAX_HARMLESS_CHARS`` (400) characters, and (3) any prompt whose
normalised text is in ``harmful``.  So the two pools never overlap.

User files (``load(path, column=...)``): ``.csv`` (header row), ``.json`` (a
list of strings, or a list of objects), ``.jsonl`` (one string or object a line)
and ``.txt`` (one prompt a line).  For tables ``column`` names the field; by
default the first of ``DEFAULT_COLUMNS`` present (case-insensitive) is used.
Prompts are stripped and blank ones skipped; files are not deduplicated or cached.

Bundled data (``data/``, byte-for-byte copies of the public sets, each LICENSE next to its
files; see ``data/SOURCES.md``).  Not bundled because no
loader needs them: harmbench_behaviors_text_all.csv (its standard behaviours are
exactly those of the val and test files), xstest_v2_prompts.csv (same prompts as
xstest_prompts.csv, which has an explicit ``label`` column) and adversarialqa
(all 500 prompts are AdvBench goals).
"""

from __future__ import annotations

import csv
import difflib
import json
import os
from pathlib import Path

from ._sources import (
    BORDERLINE_TERMS,
    DATASETS,
    MAX_HARMLESS_CHARS,
    Dataset,
    hash_split,
    is_borderline,
    normalise,
    rows,
)

__all__ = [
    "BORDERLINE_TERMS",
    "DEFAULT_COLUMNS",
    "MAX_HARMLESS_CHARS",
    "MissingColumnError",
    "hash_split",
    "info",
    "is_borderline",
    "load",
    "names",
    "normalise",
]

DEFAULT_COLUMNS = ("prompt", "instruction", "goal", "Behavior", "text")
FILE_SUFFIXES = (".csv", ".json", ".jsonl", ".txt")


class MissingColumnError(KeyError, ValueError):
    """A column is not in a user file (both a KeyError and a ValueError)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def names() -> list[str]:
    """Every known set name, each followed by its split names (``name:split``)."""
    return [n for name, ds in DATASETS.items() for n in (name, *(f"{name}:{s}" for s in ds.splits))]


def info(name: str) -> dict:
    """Description, source, licence, split method and row counts of a named set."""
    dataset, _ = _resolve(name)
    counts = rows(dataset.name)
    return {
        "name": dataset.name,
        "kind": dataset.kind,
        "description": dataset.description,
        "source": dataset.source,
        "licence": dataset.licence,
        "split_method": "official" if dataset.official_splits else "hash",
        "rows": {split: len(prompts) for split, prompts in counts.items()},
    }


def load(
    spec: str | os.PathLike | list[str],
    *,
    column: str | None = None,
    limit: int | None = None,
) -> list[str]:
    """Prompts of a named set (``"harmful:train"``), a user file, or a list of strings.

    ``column`` picks the field of a CSV / JSON / JSONL file; ``limit`` keeps the
    first ``limit`` prompts.  Always returns a new list.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    if isinstance(spec, list):
        bad = [i for i, p in enumerate(spec) if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompt list item {bad[0]} is {type(spec[bad[0]]).__name__}, not str")
        prompts = spec
    elif isinstance(spec, str) and not _looks_like_path(spec):
        if column is not None:
            raise ValueError(f"column={column!r} applies to files only, not to the named set {spec!r}")
        dataset, split = _resolve(spec)
        prompts = rows(dataset.name)[split]
    elif isinstance(spec, (str, os.PathLike)):
        prompts = _load_file(Path(spec), column)
    else:
        raise TypeError(f"spec must be a set name, a path or a list of str, not {type(spec).__name__}")
    return list(prompts[:limit] if limit is not None else prompts)


# --- named sets -------------------------------------------------------------------


def _resolve(spec: str) -> tuple[Dataset, str]:
    """(Dataset, split) for ``name`` or ``name:split``; split is ``"all"`` without suffix."""
    if spec in DATASETS:
        return DATASETS[spec], "all"
    base, _, split = spec.rpartition(":")
    if base in DATASETS:
        dataset = DATASETS[base]
        if split in dataset.splits:
            return dataset, split
        raise ValueError(
            f"unknown split {split!r} for {base!r}: choose from {', '.join(dataset.splits)}"
            f"{_did_you_mean(spec)}"
        )
    raise ValueError(f"unknown prompt set {spec!r}{_did_you_mean(spec)}")


def _did_you_mean(spec: str) -> str:
    close = difflib.get_close_matches(spec, names(), n=5, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else f"; known sets: {', '.join(DATASETS)}"


def _looks_like_path(spec: str) -> bool:
    if spec in DATASETS or spec.rpartition(":")[0] in DATASETS:
        return False  # a set name, possibly with a bad split: let _resolve explain
    return spec.lower().endswith(FILE_SUFFIXES) or "/" in spec or os.sep in spec or os.path.exists(spec)


# --- user files -------------------------------------------------------------------


def _load_file(path: Path, column: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"unsupported file type {suffix or '(none)'!r} for {path}: "
                         f"use {', '.join(FILE_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        return _read_file(path, suffix, column)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save the prompt file as UTF-8") from None


def _read_file(path: Path, suffix: str, column: str | None) -> list[str]:
    with path.open(encoding="utf-8-sig", newline="" if suffix == ".csv" else None) as f:
        if suffix == ".txt":
            if column is not None:
                raise ValueError(f"column={column!r} does not apply to the text file {path}")
            return _clean(f.read().splitlines())
        if suffix == ".csv":
            reader = csv.DictReader(f)
            name = _pick_column(reader.fieldnames or [], column, path)
            return _clean(_field(row, name, path, f"data row {i}") for i, row in enumerate(reader, 1))
        if suffix == ".json":
            try:
                items = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
            if not isinstance(items, list):
                raise ValueError(f"{path} must hold a JSON list, not {type(items).__name__}")
            where = [f"item {i}" for i in range(len(items))]
        else:
            items, where = [], []
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path} line {lineno} is not valid JSON: {err}") from None
                    where.append(f"line {lineno}")
    return _from_items(items, where, column, path)


def _from_items(items: list, where: list[str], column: str | None, path: Path) -> list[str]:
    """Prompts from JSON items: all strings, or all objects read through ``column``."""
    if all(isinstance(item, str) for item in items):
        if column is not None and items:
            raise ValueError(f"column={column!r} given but {path} holds plain strings, not objects")
        return _clean(items)
    for item, at in zip(items, where):
        if not isinstance(item, dict):
            raise ValueError(f"{path} {at}: expected an object, got {type(item).__name__}")
    available = list(dict.fromkeys(key for item in items for key in item))
    name = _pick_column(available, column, path)
    return _clean(_field(item, name, path, at) for item, at in zip(items, where))


def _pick_column(available: list[str], column: str | None, path: Path) -> str:
    if column is not None:
        if column in available:
            return column
        raise MissingColumnError(f"column {column!r} not found in {path}; available: {available}")
    lowered = {c.lower(): c for c in reversed(available)}
    for candidate in DEFAULT_COLUMNS:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    raise MissingColumnError(f"{path} has none of the default columns {list(DEFAULT_COLUMNS)}; "
                             f"pass column= (available: {available})")


def _field(record: dict, column: str, path: Path, where: str) -> str:
    value = record.get(column)
    if not isinstance(value, str):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise ValueError(f"{path} {where}: column {column!r} is {found}, not a string")
    return value


def _clean(prompts) -> list[str]:
    return [p.strip() for p in prompts if p.strip()]
