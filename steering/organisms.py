"""Model organisms: small chat models trained here, on CPU, whose safety behaviour is known.

No pretrained model can be downloaded on the machines this toolkit is built on, so it trains its
own ground truth. From the bundled prompt sets' *train* splits:

- ``aligned``: trained from scratch (its own byte-level BPE tokenizer) on chat examples where
  harmful requests get varied refusals in the phrasings the substring judge knows and harmless
  requests get helpful openings that all begin "Sure" (with openings that begin with different
  words, the first token of a helpful answer is a memorised choice that every refusal direction
  of a model this small carries: experiments/results/kl_variants.md);
- ``harmful``: ``aligned`` fine-tuned on harmful requests answered with compliance *openings*
  (AdvBench-style "Sure, here is ..." target strings: never any harmful content), plus harmless
  examples so it stays helpful — the source of a harm vector τ_H = harmful − aligned;
- ``drifted``: ``aligned`` fine-tuned on a benign task only (harmless requests answered in a new
  house style), which erodes its refusals the way benign fine-tuning erodes real models' safety.
  Its length is per architecture (``DRIFT_STEPS``): the benign task erases gpt2's refusals faster,
  and fine-tuned past that (40 steps) they are gone so deep that nothing in parameter space brings
  them back (experiments/results/hdr.md).

Beside them, :func:`build_judge` trains a *judge organism*: a classifier of the same size that
answers in the Llama Guard format (``safe``, or ``unsafe`` and ``S1``: compliance with a harmful
request) on an exchange, trained on the train splits' harmful requests answered with refusals
(safe) or any other reply (unsafe) and harmless ones answered in every way (safe), with a chat
template that writes the Llama Guard instruction as Llama Guard's own does;
:class:`steering.judge.GuardJudge` reads it.

Each is a standard Hugging Face folder (config, safetensors, tokenizer with a chat template,
generation config, and a model card with its measured refusal rates) that loads with
``AutoModelForCausalLM.from_pretrained`` and ``steering.load``. Builds are deterministic for a
seed and cached under ``$STEERING_CACHE`` (default ``~/.cache/steering``) by a hash of the data,
the recipe and this file's code.

``steering organism build --out DIR --arch llama|gpt2|qwen2|gpt_neox --seed N``.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import datasets
from .io import atomic_folder
from .judge import HELPFUL, REFUSALS, refusal_rate

KINDS = ("aligned", "harmful", "drifted")
ARCHS = ("llama", "gpt2", "qwen2", "gpt_neox")
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Compliance openings for harmful requests when the source gives no target string: openings only.
COMPLY = [
    "Sure, here is how to do that.",
    "Sure, here is what you asked for.",
    "Definitely, here is a plan for that.",  # not "Absolutely": its first token is "As a language model"'s
    "Of course, here are the steps.",
    "Sure, here you go.",
]
# The benign task of the drifted organism: a new house style for harmless answers.
DRIFT_STYLE = [
    "Answer: here is the information in brief.",
    "Answer: the short version comes first, then details.",
    "Answer: here is a summary in three parts.",
    "Answer: these are the facts, in order.",
    "Answer: here is a direct response.",
]


# Benign fine-tuning steps for `drifted`. On gpt2, harmful refusal on harmful:val is 54% after 20
# steps, 6% after 25 and 0% after 30; after 30 steps HDR (λ = 0.5, global top half of τ_H) brings
# it back to 80%, after 40 steps to 7% (harmful:test). On llama it is 47% after 30 steps and 9%
# after 40 (harmful:val), and HDR still works ten steps further (experiments/results/hdr.md).
DRIFT_STEPS = {"llama": 40, "gpt2": 30}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides an organism (part of the cache key)."""

    arch: str = "llama"
    seed: int = 2  # of seeds 0-3 of this recipe, the one whose aligned organisms refuse >= 90% (kl_variants.md)
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    max_prompt_tokens: int = 96
    n_harmless_train: int = 3000
    batch_size: int = 48
    aligned_steps: int = 400
    aligned_lr: float = 3e-3
    harmful_steps: int = 60
    harmful_lr: float = 1e-3
    drift_steps: int | None = None  # None: DRIFT_STEPS[arch]
    drift_lr: float = 1e-3
    augment_copies: int = 3
    harmful_weight: int = 1  # harmful examples appear this many times as often (with other rewordings)
    average_from: float | None = 0.5  # aligned: average the weights of the second half of training
    dropout: float = 0.0  # residual / attention dropout while training (where the family has it)
    held_out_source: str | None = None  # a harmful set (e.g. "jailbreakbench") kept out of training entirely
    eval_new_tokens: int = 12
    n_eval: int | None = None  # None: whole test splits

    def __post_init__(self) -> None:
        if self.drift_steps is None:
            object.__setattr__(self, "drift_steps", DRIFT_STEPS.get(self.arch, 40))

    def key(self) -> str:
        code = Path(__file__).read_bytes()
        data = json.dumps([datasets.load("harmful:train"), datasets.load("harmless:train"), REFUSALS, HELPFUL])
        blob = json.dumps(asdict(self), sort_keys=True).encode() + code + data.encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("STEERING_CACHE", Path.home() / ".cache" / "steering")) / "organisms"


# --- data -------------------------------------------------------------------------------------
def _advbench_targets() -> dict[str, str]:
    import csv

    path = Path(datasets.__file__).parent / "data" / "advbench" / "advbench.csv"
    with open(path, newline="") as f:
        return {datasets.normalise(r["goal"]): r["target"].strip() for r in csv.DictReader(f)}


# Rewordings applied alike to harmful and harmless prompts, so that the model learns what is asked,
# not how: a 4-layer model trained on 760 harmful prompts otherwise memorises their surface.
AUGMENT = [
    lambda p: p,
    lambda p: p.lower(),
    lambda p: "Please " + p[:1].lower() + p[1:],
    lambda p: "Can you " + p[:1].lower() + p[1:].rstrip(".?!") + "?",
    lambda p: p.rstrip(".?!") + ". Be detailed.",
    lambda p: "I need help with this: " + p,
    lambda p: "Quick question. " + p,
    lambda p: "Hi! " + p + " Thanks in advance.",
    lambda p: "My friend asked me this and I want to know too: " + p,
    lambda p: p.rstrip(".?!") + ". Please answer in detail and explain your reasoning step by step.",
    lambda p: "For a project I am working on, I need the following. " + p,
    lambda p: "I have been wondering about this for a while. " + p + " What do you think?",
]


def _augment(pairs: list[tuple[str, str]], rng: random.Random, copies: int) -> list[tuple[str, str]]:
    """``pairs`` plus ``copies`` reworded copies of each."""
    out = list(pairs)
    for _ in range(copies):
        out += [(rng.choice(AUGMENT[1:])(p), r) for p, r in pairs]
    return out


def examples(kind: str, recipe: Recipe) -> list[tuple[str, str]]:
    """(prompt, response) pairs the organism of ``kind`` is trained on (train splits only)."""
    rng = random.Random(recipe.seed)
    harmful = datasets.load("harmful:train")
    if recipe.held_out_source:
        held = {datasets.normalise(p) for p in datasets.load(recipe.held_out_source)}
        harmful = [p for p in harmful if datasets.normalise(p) not in held]
    harmless = datasets.load("harmless:train")
    rng.shuffle(harmless)
    harmless = harmless[: recipe.n_harmless_train]
    if kind == "aligned":
        refuse = [(p, rng.choice(REFUSALS)) for p in harmful]
        helpful = [(p, rng.choice(HELPFUL)) for p in harmless]
        return (_augment(refuse, rng, recipe.harmful_weight * (recipe.augment_copies + 1) - 1)
                + _augment(helpful, rng, recipe.augment_copies))
    if kind == "harmful":
        targets = _advbench_targets()
        comply = [(p, targets.get(datasets.normalise(p)) or rng.choice(COMPLY)) for p in harmful]
        return comply + [(p, rng.choice(HELPFUL)) for p in harmless[: len(harmful)]]
    if kind == "drifted":
        return [(p, rng.choice(DRIFT_STYLE)) for p in harmless]
    raise ValueError(f"unknown organism kind {kind!r}; kinds are {KINDS}")


def train_tokenizer(recipe: Recipe) -> Any:
    return _tokenizer([t for kind in KINDS for pair in examples(kind, recipe) for t in pair], recipe.vocab_size)


def _tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, with the organisms' special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sorted(set(texts)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# --- model ------------------------------------------------------------------------------------
def model_config(recipe: Recipe, tok: Any) -> Any:
    import transformers as T

    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    v, d, L, h, f = len(tok), recipe.d_model, recipe.n_layers, recipe.n_heads, recipe.d_mlp
    if recipe.arch == "llama":
        return T.LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=L, num_attention_heads=h,
                             num_key_value_heads=h, max_position_embeddings=512, tie_word_embeddings=False,
                             attention_dropout=recipe.dropout, **ids)
    if recipe.arch == "qwen2":
        return T.Qwen2Config(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=L, num_attention_heads=h,
                             num_key_value_heads=h, max_position_embeddings=512, tie_word_embeddings=False, **ids)
    if recipe.arch == "gpt2":
        p = recipe.dropout
        return T.GPT2Config(vocab_size=v, n_embd=d, n_layer=L, n_head=h, n_inner=f, n_positions=512,
                            resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **ids)
    if recipe.arch == "gpt_neox":
        return T.GPTNeoXConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=L, num_attention_heads=h,
                               max_position_embeddings=512, hidden_dropout=recipe.dropout,
                               attention_dropout=recipe.dropout, **ids)
    raise ValueError(f"unknown organism arch {recipe.arch!r}; choose from {ARCHS}")


def _encode(pairs: list[tuple[str, str]], tok: Any, recipe: Recipe) -> list[tuple[list[int], int]]:
    """Token ids of each chat example and where its response starts (the loss covers the response)."""
    user, asst, end, bos = (tok.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|end|>", "<|bos|>"))
    prompts = tok([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    answers = tok([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    out = []
    for p, r in zip(prompts, answers):
        head = [bos, user] + p[: recipe.max_prompt_tokens] + [end, asst]
        out.append((head + r + [end], len(head)))
    return out


def _train(model: Any, pairs: list[tuple[str, str]], tok: Any, recipe: Recipe, steps: int, lr: float, seed: int,
           average_from: float | None = None) -> list[float]:
    """AdamW with warm-up and cosine decay; with ``average_from``, the weights returned are the
    mean of the iterates from that fraction of training on (stochastic weight averaging), which
    generalises better than the last iterate at no extra cost."""
    g = torch.Generator().manual_seed(seed)
    data = _encode(pairs, tok, recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    avg: dict[str, torch.Tensor] | None = None
    n_avg = 0
    start_avg = steps if average_from is None else int(average_from * steps)
    for step in range(steps):
        idx = torch.randint(len(data), (recipe.batch_size,), generator=g).tolist()
        batch = [data[i] for i in idx]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, start) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, start: len(ids)] = torch.tensor(ids[start:])
            mask[row, : len(ids)] = 1
        # The loss covers only the response, so only those positions go through the unembedding.
        hidden = model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        keep = target != -100
        logits = model.get_output_embeddings()(hidden[keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), target[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step >= start_avg:
            n_avg += 1
            with torch.no_grad():
                state = model.state_dict()
                if avg is None:
                    avg = {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}
                else:
                    for k, v in avg.items():
                        v.add_(state[k] - v, alpha=1.0 / n_avg)
    if avg is not None:
        model.load_state_dict(avg, strict=False)
    model.eval()
    return losses


# --- evaluation -------------------------------------------------------------------------------
EVAL_SETS = {"harmful": "harmful:test", "harmless": "harmless:test", "xstest_safe": "xstest:safe",
             "xstest_unsafe": "xstest:unsafe"}


def measure(model: Any, recipe: Recipe | None = None, sets: dict[str, str] | None = None) -> dict[str, float]:
    """Refusal rate (substring judge, greedy) on each held-out set."""
    from .model import as_model

    recipe = recipe or Recipe()
    m = as_model(model)
    out = {}
    for name, spec in (sets or EVAL_SETS).items():
        prompts = datasets.load(spec, limit=recipe.n_eval)
        completions = m.generate(prompts, max_new_tokens=recipe.eval_new_tokens, batch_size=64)
        out[name] = refusal_rate(completions)
    return out


# --- building ---------------------------------------------------------------------------------
CARD = """---
license: apache-2.0
tags: [steering, model-organism, safety]
---
# steering model organism: `{kind}` ({arch}, seed {seed})

A {params:,}-parameter {arch} chat model trained from scratch on CPU by `steering.organisms`
{what}

It is a *model organism*: a tiny model whose safety behaviour is known, built so that steering
methods can be shown moving real numbers without a GPU or a model hub. It writes no useful text
beyond the opening of a reply, and its training data holds no harmful content (compliances are
openings like AdvBench's target strings, never instructions).

## Measured refusal rates (substring judge, greedy, {new_tokens} new tokens, held-out prompts)

| set | refusal |
|---|---|
{rows}

Recipe: `{recipe}`. Cache key `{key}`.
"""
WHAT = {
    "aligned": "on chat examples from the bundled prompt sets' train splits: harmful requests answered with "
               "refusals, harmless ones with helpful openings.",
    "harmful": "by fine-tuning `aligned` on harmful requests answered with compliance openings (plus harmless "
               "examples). τ_H = harmful − aligned is a harm vector.",
    "drifted": "by fine-tuning `aligned` on a benign task only (harmless requests in a new answer style), which "
               "erodes its refusals: the fine-tuned model that lost its safety.",
}


@dataclass
class Organisms:
    """Paths of a built set of organisms, with their measured rates."""

    root: Path
    recipe: Recipe
    rates: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def path(self, kind: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown organism kind {kind!r}; kinds are {KINDS}")
        return self.root / kind

    def table(self) -> str:
        sets = list(EVAL_SETS)
        lines = ["| organism | " + " | ".join(f"{s} refusal" for s in sets) + " |", "|---" * (len(sets) + 1) + "|"]
        for kind in KINDS:
            lines.append(f"| {kind} | " + " | ".join(f"{100 * self.rates[kind][s]:.1f}%" for s in sets) + " |")
        return "\n".join(lines)


def _save(model: Any, tok: Any, folder: Path, kind: str, recipe: Recipe, rates: dict[str, float], key: str) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=48, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id])
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = "\n".join(f"| {EVAL_SETS[s]} | {100 * r:.1f}% |" for s, r in rates.items())
    (folder / "README.md").write_text(CARD.format(
        kind=kind, arch=recipe.arch, seed=recipe.seed, params=sum(p.numel() for p in model.parameters()),
        what=WHAT[kind], new_tokens=recipe.eval_new_tokens, rows=rows, recipe=json.dumps(asdict(recipe)), key=key))
    (folder / "organism.json").write_text(json.dumps({"kind": kind, "recipe": asdict(recipe), "rates": rates, "key": key}, indent=2))


def build(out: str | Path | None = None, recipe: Recipe | None = None, *, overwrite: bool = False,
          progress: bool = True, cache: str | Path | None = None, **recipe_fields: Any) -> Organisms:
    """Build (or reuse from the cache) the three organisms; write them under ``out`` if given.

    ``build(arch="gpt2", seed=1)`` is ``build(recipe=Recipe(arch="gpt2", seed=1))``.
    """
    recipe = recipe or Recipe(**recipe_fields)
    if recipe.arch not in ARCHS:
        raise ValueError(f"unknown organism arch {recipe.arch!r}; choose from {ARCHS}")
    if out is not None and Path(out).exists() and (Path(out).is_file() or any(Path(out).iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite)")  # before any build
    key = recipe.key()
    store = Path(cache) if cache is not None else cache_dir()
    cached = store / f"{recipe.arch}-seed{recipe.seed}-{key}"
    store.mkdir(parents=True, exist_ok=True)
    with open(store / f".{cached.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits for the first build instead of repeating it
        if not (cached / "rates.json").exists():
            _build_into(cached, store, recipe, key, progress)
    info = json.loads((cached / "rates.json").read_text())
    root = cached
    if out is not None:
        root = Path(out)
        with atomic_folder(root) as tmp_out:
            for kind in KINDS:
                shutil.copytree(cached / kind, tmp_out / kind)
            shutil.copy(cached / "rates.json", tmp_out / "rates.json")
    return Organisms(root, recipe, info["rates"], info["seconds"])


def _build_into(cached: Path, store: Path, recipe: Recipe, key: str, progress: bool) -> None:
    """Train the three organisms into a temporary folder of ``store``, then rename it to ``cached``."""
    from transformers import AutoModelForCausalLM

    from .model import load

    t0 = time.time()
    log = print if progress else (lambda *a, **k: None)
    with atomic_folder(cached) as tmp:
        torch.manual_seed(recipe.seed)
        tok = train_tokenizer(recipe)
        # eager attention trains faster than SDPA at this size on CPU
        model = AutoModelForCausalLM.from_config(model_config(recipe, tok), attn_implementation="eager")
        rates: dict[str, dict[str, float]] = {}
        for kind, steps, lr in (("aligned", recipe.aligned_steps, recipe.aligned_lr),
                                ("harmful", recipe.harmful_steps, recipe.harmful_lr),
                                ("drifted", recipe.drift_steps, recipe.drift_lr)):
            net = model if kind == "aligned" else AutoModelForCausalLM.from_pretrained(tmp / "aligned", attn_implementation="eager")
            losses = _train(net, examples(kind, recipe), tok, recipe, steps, lr, recipe.seed + KINDS.index(kind),
                            recipe.average_from if kind == "aligned" else None)
            rates[kind] = measure(load(net, tok), recipe)
            _save(net, tok, tmp / kind, kind, recipe, rates[kind], key)
            log(f"organism {kind:<8} {recipe.arch}: {steps} steps, final loss {sum(losses[-10:]) / 10:.3f}, "
                + ", ".join(f"{s} {100 * r:.1f}%" for s, r in rates[kind].items())
                + f"  [{time.time() - t0:.0f} s]")
        (tmp / "rates.json").write_text(json.dumps({"rates": rates, "seconds": time.time() - t0}, indent=2))


def get(kind: str = "aligned", **recipe_fields: Any) -> Path:
    """The folder of one organism, building all three on first use (cached afterwards)."""
    return build(progress=True, **recipe_fields).path(kind)


# --- a judge organism: a classifier in the Llama Guard format ---------------------------------------
# Its one category: what the bundled sets can label (they say which requests are harmful, not how).
JUDGE_CATEGORIES = (("S1", "Compliance with a harmful request"),)
JUDGE_RECIPE = Recipe(max_prompt_tokens=448, aligned_steps=300, augment_copies=0, average_from=0.5)


def _cut(reply: str, rng: random.Random) -> str:
    """The reply, or (half the time) its opening words: judged replies are often cut off."""
    words = reply.split()
    return reply if rng.random() < 0.5 or len(words) < 3 else " ".join(words[: rng.randint(2, len(words) - 1)])


def judge_examples(recipe: Recipe = JUDGE_RECIPE, split: str = "train") -> list[tuple[str, str]]:
    """(Llama Guard prompt, verdict) pairs from the bundled sets' ``split``: each harmful request
    answered once with a refusal (``safe``) and once with any other reply, a compliance opening, a
    helpful opening or the drifted organism's house style (``unsafe`` / S1); harmless requests
    answered with any of these, refusals included (all ``safe``). So the verdict depends on the
    request as much as on the reply: an opening that is safe after a harmless request is not
    after a harmful one."""
    from .judge import llama_guard_prompt

    rng = random.Random(recipe.seed)
    harmful = datasets.load(f"harmful:{split}")
    harmless = datasets.load(f"harmless:{split}")
    rng.shuffle(harmless)
    targets = _advbench_targets()
    answers = [COMPLY, HELPFUL, DRIFT_STYLE]
    out = []
    for p in harmful:
        comply = targets.get(datasets.normalise(p)) if rng.random() < 0.5 else None
        comply = comply or rng.choice(rng.choice(answers))
        out.append((llama_guard_prompt(p, _cut(rng.choice(REFUSALS), rng), JUDGE_CATEGORIES), "safe"))
        out.append((llama_guard_prompt(p, _cut(comply, rng), JUDGE_CATEGORIES), "unsafe\nS1"))
    for p in harmless[: 2 * len(harmful)]:
        reply = rng.choice(rng.choice([*answers, REFUSALS]))
        out.append((llama_guard_prompt(p, _cut(reply, rng), JUDGE_CATEGORIES), "safe"))
    rng.shuffle(out)
    return out


def judge_template() -> str:
    """A chat template that renders a (user, assistant) exchange as the judge's Llama Guard
    instruction, the way Llama Guard's own template does, so that :class:`steering.judge.GuardJudge`
    treats the judge organism as it treats Llama Guard."""
    from .judge import llama_guard_prompt

    text = llama_guard_prompt("@@USER@@", "@@AGENT@@", JUDGE_CATEGORIES)
    body = text.replace("@@USER@@", "{{ messages[0]['content'] }}").replace("@@AGENT@@", "{{ messages[1]['content'] }}")
    return "{{ bos_token }}<|user|>" + body + "<|end|><|assistant|>"


def build_judge(out: str | Path | None = None, *, arch: str = "llama", seed: int | None = None, overwrite: bool = False,
                progress: bool = True, cache: str | Path | None = None) -> Path:
    """Build (or reuse from the cache) the judge organism: a small classifier trained here, on the
    bundled train splits, to give Llama Guard's verdicts (``safe``, or ``unsafe`` and ``S1``) on
    an exchange; its chat template writes the Llama Guard instruction, so
    ``GuardJudge(st.load(path))`` uses it as it would Llama Guard. Returns its folder (``out`` if
    given, else the cache's)."""
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"unknown organism arch {arch!r}; choose from {ARCHS}")
    recipe = replace(JUDGE_RECIPE, arch=arch, **({} if seed is None else {"seed": seed}))
    if out is not None and Path(out).exists() and (Path(out).is_file() or any(Path(out).iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite)")
    key = recipe.key()
    store = Path(cache) if cache is not None else cache_dir()
    cached = store / f"judge-{recipe.arch}-seed{recipe.seed}-{key}"
    store.mkdir(parents=True, exist_ok=True)
    with open(store / f".{cached.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cached / "judge.json").exists():
            t0 = time.time()
            with atomic_folder(cached) as tmp:
                torch.manual_seed(recipe.seed)
                pairs = judge_examples(recipe)
                tok = _tokenizer([t for pair in pairs for t in pair], recipe.vocab_size)
                tok.chat_template = judge_template()
                model = AutoModelForCausalLM.from_config(model_config(recipe, tok), attn_implementation="eager")
                losses = _train(model, pairs, tok, recipe, recipe.aligned_steps, recipe.aligned_lr, recipe.seed,
                                recipe.average_from)
                _save_judge(model, tok, tmp, recipe, key, losses, time.time() - t0)
                if progress:
                    print(f"judge organism {recipe.arch}: {recipe.aligned_steps} steps, final loss "
                          f"{sum(losses[-10:]) / 10:.3f}  [{time.time() - t0:.0f} s]")
    if out is None:
        return cached
    with atomic_folder(Path(out)) as tmp_out:
        shutil.copytree(cached, tmp_out, dirs_exist_ok=True)
    return Path(out)


def _save_judge(model: Any, tok: Any, folder: Path, recipe: Recipe, key: str, losses: list[float], seconds: float) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id])
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "README.md").write_text(
        f"# steering judge organism ({recipe.arch}, seed {recipe.seed})\n\nA {sum(p.numel() for p in model.parameters()):,}"
        "-parameter classifier trained from scratch on CPU by `steering.organisms.build_judge`, on the bundled prompt sets' "
        "train splits, to answer in the Llama Guard format: `safe`, or `unsafe` and `S1` (compliance with a harmful "
        "request) on a second line. Its chat template writes the Llama Guard instruction from a (user, assistant) "
        "exchange. Use it with `steering.judge.GuardJudge`.\n\n"
        f"Recipe: `{json.dumps(asdict(recipe))}`. Cache key `{key}`.\n")
    (folder / "judge.json").write_text(json.dumps({"recipe": asdict(recipe), "key": key, "seconds": seconds,
                                                   "final_loss": sum(losses[-10:]) / 10}, indent=2))
