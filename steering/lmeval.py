"""Utility through lm-evaluation-harness (``lm_eval``), under any edit or SafeInfer setting.

lm-eval is the field's standard for capability benchmarks; this module runs its tasks on a
``steering`` model with edits hooked in, so an edit's cost shows on MMLU, GSM8K, ARC, ... (by
name, for a user with a hub) or, offline, on the skills of :mod:`steering.skills`, shipped as
local task files (``steering_sort``, ``steering_reverse``, ``steering_count``, ``steering_increment``;
tag ``steering_skills``; see :mod:`steering.lm_eval_tasks`)::

    from steering import lmeval
    res = lmeval.evaluate(model, ["steering_skills"], edits=[ablation], apply_chat_template=True)
    res["steering_count"]["exact_match,none"]
    lmeval.evaluate(model, ["mmlu", "gsm8k"], limit=100)            # hub tasks, by name

The model is lm-eval's own Hugging Face backend (``HFLM``) over the loaded module, so its
tokenisation, batching and request handling are lm-eval's; the edits are this package's hooks,
active for the whole run and removed afterwards. SafeInfer: ``amplify`` is an edit like the
others; guided decoding (``unsafe``, ``gamma``) changes ``generate_until`` tasks only, since it
is a decoding rule (log-likelihood tasks score the amplified model, as
:func:`steering.evaluate.evaluate`'s ``ce`` does). Needs ``pip install lm_eval`` (the ``lmeval``
extra).
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

from .edits import Edit, combine
from .model import as_model


def lm(model: Any, *, unsafe: Any = None, gamma: float | None = None, batch_size: int = 16) -> Any:
    """lm-eval's ``HFLM`` over ``model``'s module and tokenizer; with ``unsafe``, its
    ``generate_until`` decodes with SafeInfer's guided decoding against that model."""
    from lm_eval.models.huggingface import HFLM

    from .safeinfer import GAMMA, GuidedDecoding, check_same_tokenizer

    sm = as_model(model)
    if sm.bridge is not None:
        raise ValueError("lmeval: lm-eval's backend runs a Hugging Face model; load the model itself, not a TransformerBridge")
    tok = sm.require_tokenizer()
    if unsafe is None:
        return HFLM(pretrained=sm.hf, tokenizer=tok, batch_size=batch_size)
    um = as_model(unsafe)
    check_same_tokenizer(sm, um)
    g = GAMMA if gamma is None else float(gamma)

    class _Guided(HFLM):
        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            guided = GuidedDecoding(um, g, tok.pad_token_id)
            guided.reset()
            procs = list(generation_kwargs.pop("logits_processor", None) or []) + [guided]
            return super()._model_generate(context, max_length, stop, logits_processor=procs, **generation_kwargs)

    return _Guided(pretrained=sm.hf, tokenizer=tok, batch_size=batch_size)


def evaluate(model: Any, tasks: Sequence[str], *, edits: Sequence[Edit] = (), amplify: Edit | None = None,
             unsafe: Any = None, gamma: float | None = None, limit: int | float | None = None,
             num_fewshot: int | None = None, apply_chat_template: bool = False, batch_size: int = 16,
             include_path: Any = None, **simple_evaluate_kwargs: Any) -> dict[str, dict[str, Any]]:
    """lm-eval's ``simple_evaluate`` of ``tasks`` on ``model`` under ``edits`` (and SafeInfer's
    ``amplify`` / ``unsafe`` / ``gamma``, e.g. from :func:`steering.safeinfer.decoding`); returns
    lm-eval's per-task results (``{"task": {"metric,filter": value, ...}}``). The shipped skill
    tasks are always findable; ``include_path`` adds a folder of the user's own task files.
    ``apply_chat_template`` formats each request through the model's chat template (needed for
    chat models such as the organisms)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .lm_eval_tasks import FOLDER

    paths = [str(FOLDER)] + ([str(p) for p in include_path] if isinstance(include_path, (list, tuple))
                             else [str(include_path)] if include_path is not None else [])
    sm = as_model(model)
    edit = combine((*edits, amplify))
    with edit.hooks(sm) if edit is not None else contextlib.nullcontext():
        out = lm_eval.simple_evaluate(model=lm(sm, unsafe=unsafe, gamma=gamma, batch_size=batch_size), tasks=list(tasks),
                                      limit=limit, num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
                                      task_manager=TaskManager(include_path=paths), log_samples=False,
                                      **simple_evaluate_kwargs)
    return dict(out["results"])


METRICS = ("exact_match", "acc_norm", "acc")  # the score utility() reads when none is named, in this order


def utility(tasks: Sequence[str], *, metric: str | None = None, limit: int | float | None = None,
            apply_chat_template: bool = True, batch_size: int = 16, **evaluate_kwargs: Any) -> Any:
    """A utility score for :func:`steering.tune.tune` (``utility=``): the mean over ``tasks`` of
    ``metric`` (e.g. ``"acc,none"``; default each task's first of exact_match, acc_norm, acc)
    under a trial's setting (its edits, amplification and guided decoding)::

        tune.tune(model, "addition", utility=lmeval.utility(["mmlu", "gsm8k"], limit=100))
    """
    if not tasks:
        raise ValueError("lmeval.utility: name at least one task")

    def score(model: Any, setting: Any) -> float:
        m = setting.model if setting.model is not None else model
        res = evaluate(m, tasks, edits=list(setting.edits), amplify=setting.amplify, unsafe=setting.unsafe if setting.gamma else None,
                       gamma=setting.gamma, limit=limit, apply_chat_template=apply_chat_template, batch_size=batch_size,
                       **evaluate_kwargs)
        vals = []
        for name, r in res.items():
            key = metric if metric in r else next((k for m_ in METRICS for k in r if k.split(",")[0] == m_), None)
            if key is not None and isinstance(r[key], (int, float)):
                vals.append(float(r[key]))
        if not vals:
            raise ValueError(f"lmeval.utility: no {metric or ' / '.join(METRICS)} score in the results of {', '.join(tasks)}")
        return sum(vals) / len(vals)

    # (steering.tune keys its trial cache by this name: other tasks or limits are other searches)
    score.__qualname__ = f"lmeval.utility({','.join(tasks)}; metric={metric}; limit={limit})"
    return score
