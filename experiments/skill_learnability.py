"""Can an organism-sized model learn the skills within a build's budget? Learning curves on skills alone.

    python experiments/skill_learnability.py            # writes experiments/results/skill_learnability.md

Issue 20 asks for organisms that have skills. This script checks, before the organisms' recipe
changes, which skill formats a model of the organisms' size (llama, d_model 128, 4 layers) learns
in the number of steps a build can afford (about 1,000 at batch 48 within 10 minutes on 2 cores).
The model is trained from scratch on the skills only: AdamW, lr 3e-3 after 50 warm-up steps,
batch 48. Each skill has 20,000 training items, so an item is seen about once, and the model
cannot do well by memorising. The tokenizer splits digits into single tokens. Every
``--eval-every`` steps, it reports exact match on 64 held-out test items per skill (greedy
decoding, stopping at ``<|end|>``).

Two prompt formats:

- ``bundled``: ``steering.skills``'s own prompts. When the results file was written these were
  instructed ("Answer with ... only.", comma-separated answers, add and lookup among them);
  ``steering.skills`` has since taken the short formats this script found learnable (sort,
  reverse, count, increment), so a rerun measures those;
- ``short``: the same tasks with no instruction and space-separated answers, e.g. ``Sort these
  letters: k c r a`` -> ``a c k r``. Two-digit addition (``add2``) replaces ``add``, and the
  lookup is ``Table: red 4, blue 9. Look up blue`` -> ``9``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _util import write_results  # noqa: E402
from steering import organisms, skills  # noqa: E402

OUT = Path(__file__).parent / "results" / "skill_learnability"
COLOURS = ("red", "blue", "green", "black", "white", "pink", "brown", "grey", "gold", "orange", "purple", "yellow")


def _short() -> dict:
    S = skills

    def rev(rng):
        w = rng.sample(S.WORDS, rng.randint(3, 4))
        return ",".join(w), f"Reverse these words: {' '.join(w)}", " ".join(reversed(w))

    def srt(rng):
        ls = rng.sample(S.LETTERS, rng.randint(3, 4))
        return "".join(sorted(ls)) + ":" + "".join(ls), f"Sort these letters: {' '.join(ls)}", " ".join(sorted(ls))

    def look(rng):
        k = rng.sample(COLOURS, rng.randint(3, 4))
        v = [rng.randint(0, 9) for _ in k]
        a = rng.randrange(len(k))
        t = ", ".join(f"{x} {y}" for x, y in zip(k, v))
        return f"{t}?{k[a]}", f"Table: {t}. Look up {k[a]}", str(v[a])

    def add2(rng):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a}+{b}", f"What is {a} + {b}?", str(a + b)

    return {"add2": add2, "sort": srt, "reverse": rev, "lookup": look}


def _tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=organisms.SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sorted(set(texts)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>")
    fast.chat_template = organisms.CHAT_TEMPLATE
    return fast


def curve(fmt: str, steps: int, every: int, n_train: int, lr: float = 3e-3, batch: int = 48) -> list[dict]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    from steering.model import load

    saved = dict(skills.GENERATORS)
    try:
        if fmt == "short":
            skills.GENERATORS.clear()
            skills.GENERATORS.update(_short())
        names = list(skills.GENERATORS)
        recipe = organisms.Recipe()
        train = [(it.prompt, it.answer) for s in names for it in skills.items(s, "train", n_train)]
        tok = _tokenizer([t for p in train + organisms.examples("aligned", recipe) for t in p], recipe.vocab_size)
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_config(organisms.model_config(recipe, tok), attn_implementation="eager")
        model.generation_config = GenerationConfig(do_sample=False, pad_token_id=tok.pad_token_id,
                                                   eos_token_id=[tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id])
        data = organisms._encode(train, tok, recipe)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        g = torch.Generator().manual_seed(recipe.seed)
        rows, t0 = [], time.time()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 50)
            model.train()
            chosen = [data[i] for i in torch.randint(len(data), (batch,), generator=g).tolist()]
            width = max(len(ids) for ids, _ in chosen)
            ids_t = torch.full((batch, width), tok.pad_token_id)
            labels = torch.full((batch, width), -100)
            mask = torch.zeros((batch, width), dtype=torch.long)
            for row, (ids, start) in enumerate(chosen):
                ids_t[row, : len(ids)] = torch.tensor(ids)
                labels[row, start: len(ids)] = torch.tensor(ids[start:])
                mask[row, : len(ids)] = 1
            loss = model(input_ids=ids_t, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % every == 0:
                model.eval()
                m = load(model, tok)
                acc = {s: skills.accuracy(m, s, n=64, batch_size=64) for s in names}
                rows.append({"step": step + 1, "seconds": round(time.time() - t0), "loss": round(loss.item(), 3), **acc})
                print(fmt, rows[-1], flush=True)
        return rows
    finally:
        skills.GENERATORS.clear()
        skills.GENERATORS.update(saved)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {fmt: curve(fmt, args.steps, args.eval_every, args.n_train) for fmt in ("bundled", "short")}
    lines = ["# Skill learnability at the organisms' size", "",
             f"Command: `python experiments/skill_learnability.py --steps {args.steps}` (llama, d_model 128, 4 layers, "
             f"trained from scratch on the skills alone, {args.n_train:,} training items per skill, batch 48; exact match "
             "on 64 held-out test items per skill, greedy).", ""]
    for fmt, rows in results.items():
        names = [k for k in rows[0] if k not in ("step", "seconds", "loss")]
        lines += [f"## {fmt} prompts", "", "| step | seconds | batch loss | " + " | ".join(names) + " |",
                  "|---" * (3 + len(names)) + "|"]
        lines += [f"| {r['step']} | {r['seconds']} | {r['loss']:.3f} | " + " | ".join(f"{100 * r[n]:.0f}%" for n in names)
                  + " |" for r in rows]
        lines.append("")
    write_results(OUT, results, lines)


if __name__ == "__main__":
    main()
