"""The documents and the scoring of the ``steering_*`` lm-eval tasks (the skills of
:mod:`steering.skills`, held-out test items), read by the YAML files beside this one."""

from __future__ import annotations

from typing import Any


def _docs(skill: str, n: int = 64, **_: Any) -> Any:
    import datasets

    from steering import skills

    rows = [{"prompt": it.prompt, "answer": it.answer} for it in skills.items(skill, "test", int(n))]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def count(**kw: Any) -> Any:
    return _docs("count", **kw)


def sort(**kw: Any) -> Any:
    return _docs("sort", **kw)


def reverse(**kw: Any) -> Any:
    return _docs("reverse", **kw)


def increment(**kw: Any) -> Any:
    return _docs("increment", **kw)


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """Exact match by :func:`steering.skills.is_correct` (first line, no final full stop)."""
    from steering.skills import is_correct

    return {"exact_match": int(is_correct(results[0], doc["answer"]))}
