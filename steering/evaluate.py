"""Evaluate a model under any set of edits, side by side: refusal, over-refusal, compliance, utility.

    from steering.evaluate import Setting, evaluate
    report = evaluate(model, [Setting("plain"), Setting("ablated", edits=[ablation]),
                              Setting("HDR", model="runs/drifted-hdr"),
                              Setting("SafeInfer", unsafe="organisms/harmful", amplify=amp)])
    print(report.table()); report.save("runs/eval")        # report.json, report.md, PNG plots

For each setting (the model with hooked edits, another model such as a baked checkpoint, or
SafeInfer decoding), batched greedy generation with a progress bar, then:

- ``harmful_refusal``: share of harmful prompts refused (default harmful:test);
- ``harmless_refusal``: share of harmless prompts refused (harmless:test);
- ``xstest_over_refusal``: share of XSTest's *safe* prompts refused (over-refusal);
- ``xstest_compliance``: share of XSTest's *unsafe* prompts answered (harmful compliance);
- ``kl``: mean KL(unedited ‖ setting) of the next-token distributions at the last prompt token on
  harmless prompts (for SafeInfer, of the guided distribution);
- ``ce``: mean cross-entropy per token, under the setting, of reference completions of those
  harmless prompts (the unedited model's own greedy completions: how much the edit costs the
  model's own behaviour; pass ``references=`` for other texts). Guided decoding is a decoding
  rule, so its ``ce`` is that of the amplified model.
- with ``skills=``: ``skill_<name>``, the exact-match accuracy on held-out items of each skill of
  :mod:`steering.skills`, and ``utility``, their mean (what the edit costs in capability).

Refusal is judged by the substring judge (:mod:`steering.judge`) unless ``judge=`` (any callable
``(prompts, completions) -> list[bool]``, e.g. a classifier you have) says otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .edits import Edit, combine
from .judge import Judge, substring_judge
from .model import Model, as_model

SETS = {"harmful": "harmful:test", "harmless": "harmless:test", "xstest_safe": "xstest:safe",
        "xstest_unsafe": "xstest:unsafe"}
METRICS = ("harmful_refusal", "harmless_refusal", "xstest_over_refusal", "xstest_compliance", "kl", "ce")
# with a second judge (evaluate(guard=...)): the same two harmful-request rates by its verdicts
GUARD_METRICS = ("harmful_refusal_guard", "xstest_compliance_guard")
GUARD_LABELS = {"harmful_refusal_guard": "harmful refused (guard)", "xstest_compliance_guard": "XSTest unsafe answered (guard)"}


@dataclass
class Setting:
    """One column of a report. ``model``: None for the evaluated model, or another model / folder
    (a baked checkpoint); ``edits`` are hooked on it; ``unsafe`` / ``amplify`` / ``gamma`` are
    SafeInfer's (see :mod:`steering.safeinfer`; ``gamma=None`` is its default, ``safeinfer.GAMMA``)."""

    name: str
    model: Any = None
    edits: Sequence[Edit] = ()
    unsafe: Any = None
    amplify: Edit | None = None
    gamma: float | None = None


@dataclass
class Report:
    rows: dict[str, dict[str, float]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def skill_keys(self) -> list[str]:
        """The skill columns present (``skill_<name>``, then ``utility``), in first-seen order."""
        keys = dict.fromkeys(k for r in self.rows.values() for k in r if k.startswith("skill_"))
        return [*keys, "utility"] if keys else []

    @property
    def guard_keys(self) -> list[str]:
        """The second judge's columns present (``*_guard``)."""
        return [k for k in GUARD_METRICS if any(k in r for r in self.rows.values())]

    def table(self) -> str:
        extra = self.guard_keys + self.skill_keys
        head = "| setting | harmful refused | harmless refused | XSTest safe refused | XSTest unsafe answered | KL | CE |"
        head += "".join(f" {GUARD_LABELS.get(k, k[6:] if k.startswith('skill_') else k)} |" for k in extra)
        lines = [head, "|---|---|---|---|---|---|---|" + "---|" * len(extra)]
        for name, r in self.rows.items():
            cells = [f"{100 * r[k]:.1f}%" if k in r else "–" for k in METRICS[:4]]
            cells += [f"{r[k]:.3f}" if k in r else "–" for k in METRICS[4:]]
            cells += [f"{100 * r[k]:.1f}%" if k in r else "–" for k in extra]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "meta": self.meta}

    def plot(self, path: str | os.PathLike) -> Path:
        """Grouped bars: one group per refusal metric, one bar per setting; KL and CE beside."""
        from matplotlib.figure import Figure  # not pyplot: no backend switch, no global state (notebooks keep inline plots)

        names = list(self.rows)
        rate_keys = [k for k in METRICS[:4] if any(k in r for r in self.rows.values())] + self.guard_keys
        util_keys = [k for k in METRICS[4:] if any(k in r for r in self.rows.values())]
        skill_keys = self.skill_keys
        panels = [(rate_keys, 100, "%"), (util_keys, 1, "nats")] + ([(skill_keys, 100, "% exact match")] if skill_keys else [])
        fig = Figure(figsize=(12 + 4 * bool(skill_keys), 4))
        axes = fig.subplots(1, len(panels), gridspec_kw={"width_ratios": [2, 1, 1.5][:len(panels)]})
        w = 0.8 / max(1, len(names))
        for ax, (keys, scale, label) in zip(axes, panels):
            for i, n in enumerate(names):
                vals = [scale * self.rows[n].get(k, float("nan")) for k in keys]
                ax.bar([j + i * w for j in range(len(keys))], vals, w, label=n)
            ax.set_xticks([j + w * (len(names) - 1) / 2 for j in range(len(keys))], [k.replace("_", " ") for k in keys],
                          fontsize=8)
            ax.set_ylabel(label)
        axes[0].legend(fontsize=7)
        axes[0].set_title("refusal and compliance")
        axes[1].set_title("utility (lower is closer to the unedited model)")
        if skill_keys:
            axes[2].set_title("skills (higher is better; utility = their mean)")
            axes[2].set_ylim(0, 100)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        return path

    def save(self, out: str | os.PathLike) -> Path:
        """report.json, report.md and report.png in the folder ``out``."""
        from .io import atomic_write

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "report.json", lambda p: Path(p).write_text(json.dumps(self.to_json(), indent=2)))
        md = "# steering evaluation\n\n" + self.table() + "\n\n![report](report.png)\n\n" + _meta_md(self.meta)
        atomic_write(out / "report.md", lambda p: Path(p).write_text(md))
        self.plot(out / "report.png")
        return out


def _meta_md(meta: dict[str, Any]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n"


def plot_sweep(points: Sequence[dict[str, float]], x: str, metrics: Sequence[str], path: str | os.PathLike,
               title: str = "") -> Path:
    """Curves of ``metrics`` against ``x`` over a sweep (a list of dicts, e.g. one per scale)."""
    from matplotlib.figure import Figure  # not pyplot: no backend switch, no global state (notebooks keep inline plots)

    pts = sorted(points, key=lambda p: p[x])
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for m in metrics:
        ax.plot([p[x] for p in pts], [100 * p[m] if m in METRICS[:4] else p[m] for p in pts], marker="o", label=m)
    ax.set_xlabel(x)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def _resolve(setting: Setting, base: Model, cache: dict[str, Model]) -> Model:
    if setting.model is None:
        return base
    if isinstance(setting.model, (str, os.PathLike)):
        key = str(setting.model)
        if key not in cache:
            from .model import load

            cache[key] = load(key)
        return cache[key]
    return as_model(setting.model)


def _edit(setting: Setting) -> Edit | None:
    return combine((*setting.edits, setting.amplify))


@torch.inference_mode()
def _next_token_logprobs(m: Model, prompts: Sequence[str], batch_size: int, guided: Any = None) -> Tensor:
    """Next-token log-probabilities after each prompt; with ``guided``, of the guided distribution."""
    from .select import last_logprobs

    if guided is None:
        return last_logprobs(m, prompts, batch_size)
    texts = m.format(prompts)
    out = []
    for i in range(0, len(texts), batch_size):
        batch = m.encode(texts[i:i + batch_size], padding_side="left")
        guided.reset()
        logits = guided(batch["input_ids"], m.hf(**batch, use_cache=False).logits[:, -1].float())
        out.append(torch.log_softmax(logits, -1).cpu())
    return torch.cat(out)


@torch.inference_mode()
def _cross_entropy(m: Model, prompts: Sequence[str], completions: Sequence[str], batch_size: int) -> float:
    """Mean NLL per completion token of ``completions`` after the formatted ``prompts``."""
    tok = m.require_tokenizer()
    total, count = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        ps, cs = list(prompts[i:i + batch_size]), list(completions[i:i + batch_size])
        # counted as encode() tokenises (it adds special tokens only when there is no chat template)
        n_prompt = [len(tok(p, add_special_tokens=not m.has_chat_template)["input_ids"]) for p in ps]
        batch = m.encode([p + c for p, c in zip(ps, cs)], padding_side="right")
        logp = torch.log_softmax(m.hf(**batch, use_cache=False).logits.float(), -1)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for b in range(len(ps)):
            end = int(mask[b].sum())
            start = n_prompt[b]
            if end - start <= 0:
                continue
            tgt = ids[b, start:end]
            total -= float(logp[b, start - 1:end - 1].gather(-1, tgt[:, None]).sum())
            count += end - start
    return total / max(count, 1)


def evaluate(model: Any, settings: Sequence[Setting] | None = None, *, sets: dict[str, str] | None = None,
             judge: Judge = substring_judge, limit: int | None = None, utility_prompts: str | Sequence[str] = "harmless:test",
             n_utility: int = 128, references: Sequence[str] | None = None, max_new_tokens: int = 32,
             skills: Sequence[str] = (), n_skill: int = 64, skill_split: str = "test", guard: Judge | None = None,
             batch_size: int = 32, progress: bool = True) -> Report:
    """Evaluate ``model`` under each setting (default: only ``Setting("plain")``); see the module docstring.
    ``skills`` (names from :mod:`steering.skills`) adds each one's exact-match accuracy on ``n_skill``
    held-out items (``skill_<name>``, 16 new tokens, decoded as the setting decodes; from the
    ``skill_split`` split, ``"val"`` when choosing settings) and ``utility``, their mean. ``guard``
    (a second judge, e.g. :class:`steering.judge.GuardJudge`, True = the reply is safe) rates the
    replies to harmful requests too: ``harmful_refusal_guard`` and ``xstest_compliance_guard``,
    beside the first judge's."""
    from tqdm.auto import tqdm

    from . import datasets
    from .safeinfer import GAMMA, GuidedDecoding, check_same_tokenizer
    from .safeinfer import generate as si_generate
    from .select import kl_div

    base = as_model(model)
    settings = list(settings or [Setting("plain")])
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluate: setting names must differ ({names})")
    sets = dict(SETS if sets is None else sets)
    prompts = {k: datasets.load(v, limit=limit) for k, v in sets.items()}
    u_prompts = datasets.load(utility_prompts, limit=n_utility) if isinstance(utility_prompts, str) else list(utility_prompts)[:n_utility]
    u_texts = base.format(u_prompts)
    ref_logp = _next_token_logprobs(base, u_prompts, batch_size)
    if references is None:
        references = base.generate(u_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    loaded: dict[str, Model] = {}
    unsafe_cache: dict[str, Model] = {}
    rows: dict[str, dict[str, float]] = {}
    from . import skills as skill_tasks

    tasks = list(skills)
    for k in tasks:  # an unknown name fails here, before any generation
        skill_tasks.items(k, skill_split, 1)
    bar = tqdm(total=len(settings) * (len(prompts) + 1 + len(tasks)), desc="evaluate", disable=not progress)
    for s in settings:
        m = _resolve(s, base, loaded)
        unsafe = None
        if s.unsafe is not None:
            key = str(s.unsafe) if isinstance(s.unsafe, (str, os.PathLike)) else str(id(s.unsafe))
            if key not in unsafe_cache:
                unsafe_cache[key] = as_model(s.unsafe)
            unsafe = unsafe_cache[key]
            check_same_tokenizer(m, unsafe)
        row: dict[str, float] = {}
        gamma = GAMMA if s.gamma is None else s.gamma
        for key, ps in prompts.items():
            outs = si_generate(m, ps, unsafe=unsafe, amplify=s.amplify, edits=list(s.edits), gamma=gamma,
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
            rate = sum(judge(ps, outs)) / len(outs)
            metric = {"harmful": "harmful_refusal", "harmless": "harmless_refusal", "xstest_safe": "xstest_over_refusal",
                      "xstest_unsafe": "xstest_compliance"}.get(key, f"{key}_refusal")
            row[metric] = 1.0 - rate if key == "xstest_unsafe" else rate
            if guard is not None and key in ("harmful", "xstest_unsafe"):
                safe = sum(guard(ps, outs)) / len(outs)
                row["harmful_refusal_guard" if key == "harmful" else "xstest_compliance_guard"] = (
                    safe if key == "harmful" else 1.0 - safe)
            bar.update()
        for key in tasks:  # decoded as the setting decodes
            row[f"skill_{key}"] = skill_tasks.accuracy(
                m, key, split=skill_split, n=n_skill, generate=lambda ps: si_generate(m, ps, unsafe=unsafe, amplify=s.amplify, edits=list(s.edits),
                                                                   gamma=gamma, max_new_tokens=16, batch_size=batch_size))
            bar.update()
        if tasks:
            row["utility"] = sum(row[f"skill_{k}"] for k in tasks) / len(tasks)
        edit = _edit(s)
        with edit.hooks(m) if edit is not None else contextlib.nullcontext():
            guided = GuidedDecoding(unsafe, gamma, m.require_tokenizer().pad_token_id) if unsafe is not None else None
            logp = _next_token_logprobs(m, u_prompts, batch_size, guided)
            row["kl"] = kl_div(ref_logp, logp)
            row["ce"] = _cross_entropy(m, u_texts, references, batch_size)
        bar.update()
        rows[s.name] = row
    bar.close()
    meta = {"model": base.name, "sets": sets, "max_new_tokens": max_new_tokens, "n_utility": len(u_prompts),
            "judge": getattr(judge, "__name__", type(judge).__name__), "limit": limit,
            **({"skills": tasks, "n_skill": n_skill, "skill_split": skill_split} if tasks else {}),
            **({"guard": getattr(guard, "__name__", type(guard).__name__)} if guard is not None else {})}
    return Report(rows, meta)
