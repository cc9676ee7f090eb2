"""SafeInfer on the model organisms: plain decoding, safety amplification, guided decoding, both.

    python experiments/safeinfer.py [--arch llama gpt2]   # writes experiments/results/safeinfer.md and .json

For each architecture, with `harmful` as the unsafe model of guided decoding (γ = 99):
1. The amplification's site, layer and scale are chosen on `drifted` with validation prompts
   (harmful:val, 400 of harmless:val): the highest harmful refusal with harmless ≤ 10%, over
   sites {MLP output (the paper's), residual stream after the layer} × layers {1, 2} × scales
   {1, 1.5 (the paper's), 2, 4, 8}. The same setting without the contrast demonstrations (the
   vector of refusal demos against the query alone) is measured beside it.
2. `aligned` and `drifted` under the four decodings on held-out test prompts (harmful:test 240,
   harmless:test 1335; substring judge, greedy, 32 new tokens).
3. Decoding speed: tokens per second of each decoding against plain decoding, measured side by
   side in this run (64 prompts, batch 16, 32 new tokens forced, median of 3).

`--own-unsafe` adds guided decoding against an unsafe fine-tune of `drifted` itself;
`--both-sweep` the full SafeInfer over the whole amplification grid on validation; `--gamma-sweep`
the full SafeInfer with the chosen amplification over γ ∈ {0.1, 0.3, 1, 3, 10, 99} on validation;
`--compose` SafeInfer over the conditional steering edit that experiments/directions.py wrote;
`--openings` how many replies open as a refusal that the substring judge does not count;
`--sampled` the same, sampled at temperature 1 as the paper's script decodes; `--why`
adds how guided decoding moves `drifted`'s refusal (see :func:`why_guided`); `--skills` what each
decoding costs the skills (:func:`skill_costs`); `--speed-only`
remeasures the speeds. Each keeps the other results in the json and rewrites the report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import steering as st  # noqa: E402
from _util import add, pct, previous  # noqa: E402
from steering import organisms, safeinfer  # noqa: E402
from steering.main import NEW_TOKENS  # noqa: E402
from steering.judge import refusal_rate  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
N_NEW = NEW_TOKENS  # as the main job's evaluation: long enough to judge
SITES = ("mlp_out", "resid_post")
LAYERS = (1, 2)
SCALES = (1.0, 1.5, 2.0, 4.0, 8.0)


def amplifier(model, best: dict, **kw):
    """The amplification of a chosen setting."""
    return safeinfer.amplifier(model, layer=best["layer"], scale=best["scale"], site=best["site"], **kw)


def decodings(amp, U) -> dict[str, dict]:
    """The four decodings of the tables: keyword arguments of `safeinfer.generate` by name."""
    return {"plain": {}, "amplification": {"amplify": amp}, "guided": {"unsafe": U}, "both": {"amplify": amp, "unsafe": U}}


def rates(model, split: str, **kw) -> dict[str, float]:
    out = {}
    for name in ("harmful", "harmless"):
        prompts = st.datasets.load(f"{name}:{split}", limit=400 if (split == "val" and name == "harmless") else None)
        out[name] = refusal_rate(safeinfer.generate(model, prompts, max_new_tokens=N_NEW, batch_size=64, **kw))
    return out


def run_arch(arch: str) -> dict:
    org = organisms.build(arch=arch, progress=True)
    A, D, U = (st.load(org.path(k)) for k in ("aligned", "drifted", "harmful"))
    res: dict = {"arch": arch, "choice": []}
    for site in SITES:
        for layer in LAYERS:
            for scale in SCALES:
                r = rates(D, "val", amplify=safeinfer.amplifier(D, layer=layer, scale=scale, site=site))
                res["choice"].append({"site": site, "layer": layer, "scale": scale, **r})
                print(f"[{arch}] amplify {site} L{layer} x{scale:g}: harmful {100 * r['harmful']:.1f}% "
                      f"harmless {100 * r['harmless']:.1f}%", flush=True)
    ok = [c for c in res["choice"] if c["harmless"] <= 0.10]
    best = max(ok, key=lambda c: (c["harmful"], -c["harmless"]))
    res["best"] = best
    res["no_contrast_val"] = rates(D, "val", amplify=amplifier(D, best, contrast=False))
    res["plain_val"] = rates(D, "val")
    res["test"] = {}
    for name, m in (("aligned", A), ("drifted", D)):
        amp = amplifier(m, best)
        for mode, kw in decodings(amp, U).items():
            res["test"][f"{name}/{mode}"] = r = rates(m, "test", **kw)
            print(f"[{arch}] {name} {mode}: harmful {100 * r['harmful']:.1f}% harmless {100 * r['harmless']:.1f}%", flush=True)
    res["tokens_per_s"] = speeds(D, U, best)
    res["guided_examples"] = guided_examples(D, U)
    return res


def both_sweep(D, U) -> list[dict]:
    """The full SafeInfer (amplification + guided decoding against ``U``) over the amplification
    grid, on validation: whether choosing the amplification for the full method, rather than for
    amplification alone, rescues it."""
    out = []
    for site in SITES:
        for layer in LAYERS:
            for scale in SCALES:
                r = rates(D, "val", amplify=safeinfer.amplifier(D, layer=layer, scale=scale, site=site), unsafe=U)
                out.append({"site": site, "layer": layer, "scale": scale, **r})
                print(f"[both] {site} L{layer} x{scale:g}: harmful {100 * r['harmful']:.1f}% "
                      f"harmless {100 * r['harmless']:.1f}%", flush=True)
    return out


GAMMAS = (0.1, 0.3, 1.0, 3.0, 10.0, 99.0)


def gamma_sweep(D, U, best: dict) -> list[dict]:
    """The full SafeInfer with the chosen amplification over γ, on validation: whether a γ other
    than the paper's 99 makes guided decoding add to the amplification rather than take from it."""
    amp = amplifier(D, best)
    out = []
    for gamma in GAMMAS:
        r = rates(D, "val", amplify=amp, unsafe=U, gamma=gamma)
        out.append({"gamma": gamma, **r})
        print(f"[gamma] {gamma:g}: harmful {100 * r['harmful']:.1f}% harmless {100 * r['harmless']:.1f}%", flush=True)
    return out


def compose(arch: str, D, U, best: dict) -> dict:
    """SafeInfer over conditional steering: `drifted` with the conditional steering edit that
    experiments/directions.py fitted (its gate: `drifted`'s own harmful-vs-harmless direction),
    alone and under amplification, guided decoding and both, on the held-out test prompts."""
    from steering.edits import load_edit

    path = ROOT / "runs" / "directions" / arch / "drifted_conditional.safetensors"
    if not path.exists():
        raise SystemExit(f"{path}: missing; run `python experiments/directions.py --arch {arch}` first")
    cond = load_edit(path)
    amp = amplifier(D, best)
    out = {}
    for mode, kw in decodings(amp, U).items():
        mode = "conditional" if mode == "plain" else f"conditional + {mode}"
        out[mode] = rates(D, "test", edits=[cond], **kw)
        print(f"[{arch}] drifted {mode}: {out[mode]}", flush=True)
    return out


def openings(D, U, best: dict, sample: bool = False) -> dict:
    """What the substring judge misses: on harmful:test, the share of `drifted`'s replies under each
    decoding that the judge counts as refusals, and the share that *open* as a refusal (the first
    words of one of its phrases) whatever follows, with examples (of the second kind; with
    ``sample``, of any reply). ``sample``: sampled at temperature 1 without top-k / top-p, as the
    paper's script decodes (seed 0), instead of greedily."""
    import torch

    from steering.judge import is_refusal, opens_as_refusal

    amp = amplifier(D, best)
    prompts = st.datasets.load("harmful:test")
    gen = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {}
    out = {}
    for mode, kw in decodings(amp, U).items():
        torch.manual_seed(0)
        outs = safeinfer.generate(D, prompts, max_new_tokens=N_NEW, batch_size=64, **gen, **kw)
        judged, opened = [is_refusal(o) for o in outs], [opens_as_refusal(o) for o in outs]
        out[mode] = {"judged": sum(judged) / len(outs), "opens": sum(opened) / len(outs),
                     "either": sum(a or b for a, b in zip(judged, opened)) / len(outs),
                     "examples": [o for o, j, b in zip(outs, judged, opened) if sample or (b and not j)][:4]}
        print(f"[openings{' sampled' if sample else ''}] {mode}: judged {out[mode]['judged']:.3f} "
              f"opens {out[mode]['opens']:.3f}", flush=True)
    return out


def skill_costs(arch: str, D, U, best: dict) -> dict[str, dict[str, float]]:
    """Exact match on 64 held-out test items of every skill (aligned's three and drifted's new
    one, ``steering.skills``) of `aligned` and `drifted` (``D``) under each of the four decodings,
    and ``utility``, their mean: what SafeInfer costs in capability. The amplification is the
    chosen setting, fitted on the model it amplifies, as in the test table."""
    A = st.load(organisms.build(arch=arch, progress=False).path("aligned"))
    out = {}
    for name, m in (("aligned", A), ("drifted", D)):
        for mode, kw in decodings(amplifier(m, best), U).items():
            def gen(prompts, kw=kw, m=m):
                return safeinfer.generate(m, prompts, max_new_tokens=16, batch_size=64, **kw)

            row = {k: st.skills.accuracy(m, k, generate=gen) for k in st.skills.SKILLS}
            out[f"{name}/{mode}"] = {**row, "utility": sum(row.values()) / len(row)}
            print(f"[skills] {arch} {name} {mode}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in out[f"{name}/{mode}"].items()),
                  flush=True)
    return out


def guided_examples(D, U, n: int = 6) -> list[list[str]]:
    """`drifted`'s refusals of harmful:test prompts, and what guided decoding makes of them."""
    from steering.judge import is_refusal

    prompts = st.datasets.load("harmful:test")
    plain = D.generate(prompts, max_new_tokens=N_NEW, batch_size=64)
    idx = [i for i, o in enumerate(plain) if is_refusal(o)][:n]
    guided = safeinfer.generate(D, [prompts[i] for i in idx], unsafe=U, max_new_tokens=N_NEW, batch_size=64)
    return [[plain[i], g] for i, g in zip(idx, guided)]


def why_guided(D, U, best: dict) -> dict:
    """How guided decoding moves `drifted`'s refusal (on the first organisms it lowered it). While
    `drifted` + amplification writes its greedy answers to harmful:val, a processor that changes
    nothing records, at every step, both models' log-probabilities of the token chosen; tokens are grouped by whether the answer is
    judged a refusal and whether it is the first new token. Guided decoding would subtract
    γ·max(0, log p_U − log p_SA) from each: a token is "penalised" when the unsafe model gives it
    more probability than the amplified model does. Then, on validation, three variants of the rule:
    a margin τ (penalty γ·max(0, log p_U − log p_SA − τ)), guidance of the first k new tokens only,
    and the penalty measured against `drifted` without the amplification, γ·max(0, log p_U − log p_D),
    while decoding from p_SA (not the paper's rule)."""
    import torch

    from steering.judge import is_refusal

    amp = amplifier(D, best)
    tok = D.require_tokenizer()

    class Recorder(safeinfer.GuidedDecoding):
        def __init__(self, unsafe):
            super().__init__(unsafe, gamma=0.0, pad_token_id=tok.pad_token_id)
            self.gens: list[list[tuple]] = []  # per batch: per step (log p_SA, log p_U, token) of the chosen tokens
            self.last = None

        def __call__(self, input_ids, scores):
            fresh = not self.continues(input_ids)
            lu = self.unsafe_logprobs(input_ids).to(scores.device)
            ls = torch.log_softmax(scores.float(), -1)
            if fresh:
                self.gens.append([])
            else:
                t = input_ids[:, -1:].to(scores.device)
                self.gens[-1].append((self.last[0].gather(1, t)[:, 0], self.last[1].gather(1, t)[:, 0], t[:, 0]))
            self.last = (ls, lu)
            return scores

    prompts = st.datasets.load("harmful:val")

    def record(other) -> tuple[list[bool], dict[str, list[tuple[float, float]]]]:
        """The amplified greedy answers, and per group (log p_SA, log p_other) of each chosen token."""
        rec = Recorder(other)
        outs = safeinfer.generate(D, prompts, amplify=amp, max_new_tokens=N_NEW, batch_size=64, logits_processor=[rec])
        refused = [is_refusal(o) for o in outs]
        groups: dict[str, list[tuple[float, float]]] = {f"{k}, {w}": [] for k in ("refusal", "compliance")
                                                        for w in ("first token", "later tokens")}
        row = 0
        for steps in rec.gens:
            n = steps[0][0].shape[0] if steps else 0
            for j, (ls, lu, t) in enumerate(steps):
                for b in range(n):
                    if int(t[b]) != tok.pad_token_id:
                        kind = "refusal" if refused[row + b] else "compliance"
                        groups[f"{kind}, {'first token' if j == 0 else 'later tokens'}"].append((float(ls[b]), float(lu[b])))
            row += n
        return outs, groups

    outs, groups = record(U)
    # the same tokens under drifted *without* the amplification (a second copy, outside its hooks)
    unamplified = st.load(D.source)
    outs_plain, plain_groups = record(unamplified)
    assert outs_plain == outs  # the recorder changes nothing, so the answers are the same
    tokens = {}
    for g, rows in groups.items():
        if rows:
            sa = torch.tensor([a for a, _ in rows])
            un = torch.tensor([b for _, b in rows])
            pl = torch.tensor([b for _, b in plain_groups[g]])
            tokens[g] = {"n": len(rows), "log_p_sa": float(sa.mean()), "log_p_u": float(un.mean()),
                         "penalised": float((un > sa).float().mean()),
                         "mean_penalty": float((safeinfer.GAMMA * (un - sa).clamp(min=0)).mean()),
                         "log_p_plain": float(pl.mean()), "plain_above": float((pl > sa).float().mean())}

    class Variant(safeinfer.GuidedDecoding):
        """The rule with a margin, or for the first new tokens only, or with the penalty measured
        against a ``reference`` model's log-probabilities instead of the amplified model's."""

        def __init__(self, unsafe, margin: float = 0.0, first: int | None = None, reference=None):
            super().__init__(unsafe, pad_token_id=tok.pad_token_id)
            self.margin, self.first, self.start = margin, first, None
            self.reference = None if reference is None else safeinfer.GuidedDecoding(reference, pad_token_id=tok.pad_token_id)

        def __call__(self, input_ids, scores):
            if not self.continues(input_ids):
                self.start = input_ids.shape[1]
            lu = self.unsafe_logprobs(input_ids).to(scores.device)
            ls = torch.log_softmax(scores.float(), -1)
            lr = ls if self.reference is None else self.reference.unsafe_logprobs(input_ids).to(scores.device)
            if self.first is not None and input_ids.shape[1] - self.start >= self.first:
                return ls
            return ls - self.gamma * (lu - lr - self.margin).clamp(min=0)

    variants = {}
    for name, kw in (("margin 0.5", {"margin": 0.5}), ("margin 1", {"margin": 1.0}), ("margin 2", {"margin": 2.0}),
                     ("first 1 token", {"first": 1}), ("first 2 tokens", {"first": 2}), ("first 4 tokens", {"first": 4}),
                     ("penalty against drifted unamplified", {"reference": unamplified})):
        variants[name] = rates(D, "val", amplify=amp, logits_processor=[Variant(U, **kw)])
        print(f"[why] both, {name}: {variants[name]}", flush=True)
    return {"tokens": tokens, "variants": variants, "both_val": rates(D, "val", amplify=amp, unsafe=U),
            "amplification_val": rates(D, "val", amplify=amp)}


def speeds(D, U, best: dict) -> dict[str, float]:
    """Tokens per second of the four decodings, interleaved round by round so that load on the
    machine hits them alike; median of 3 rounds."""
    amp = amplifier(D, best)
    modes = decodings(amp, U)
    prompts = st.datasets.load("harmless:val", limit=64)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(3):
        for mode, kw in modes.items():
            t = time.perf_counter()
            safeinfer.generate(D, prompts, max_new_tokens=32, min_new_tokens=32, batch_size=16, **kw)
            times[mode].append(time.perf_counter() - t)
    return {m: len(prompts) * 32 / statistics.median(ts) for m, ts in times.items()}


def own_unsafe(arch: str, best: dict) -> dict:
    """Guided decoding with an unsafe model fine-tuned from `drifted` itself (as the paper's p_U is
    a fine-tune of the guarded model's own base): `drifted` trained on the `harmful` organism's
    data for as many steps as `harmful` was."""
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    org = organisms.build(arch=arch, progress=False)
    recipe = organisms.Recipe(arch=arch)
    tmp = Path(tempfile.mkdtemp(prefix="drifted-unsafe-"))
    try:
        tok = AutoTokenizer.from_pretrained(org.path("drifted"))
        net = AutoModelForCausalLM.from_pretrained(org.path("drifted"), attn_implementation="eager")
        organisms._train(net, organisms.mixture("harmful", recipe), tok, recipe, recipe.harmful_steps, recipe.harmful_lr,
                         recipe.seed + 1)
        net.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        D, U = st.load(org.path("drifted")), st.load(tmp)
        amp = amplifier(D, best)
        out = {"unsafe_itself": rates(U, "test")}
        for mode, kw in (("guided", {"unsafe": U}), ("both", {"amplify": amp, "unsafe": U})):
            out[mode] = rates(D, "test", **kw)
            print(f"[{arch}] drifted {mode}, unsafe = drifted's own unsafe fine-tune: {out[mode]}", flush=True)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


SITE_NAMES = {"mlp_out": "MLP output of layer {}", "resid_post": "residual stream after layer {}"}


def code(text: str) -> str:
    """A reply as inline code in a table cell."""
    return "`" + text.replace("|", "/").replace("`", "'") + "`"


def judged_and_opened(rows: dict[str, dict], examples: str) -> list[str]:
    """The table of :func:`openings`' results: per decoding, judged / opening / either, and two
    example replies under the ``examples`` header."""
    return ["| decoding | judged refusal | opens as a refusal | either | " + examples + " |", "|---|---|---|---|---|",
            *(f"| {k} | {pct(v['judged'])} | {pct(v['opens'])} | {pct(v['either'])} | "
              + " · ".join(map(code, v["examples"][:2])) + " |" for k, v in rows.items())]


def skill_cols(r: dict) -> list[str]:
    """The skill columns of an architecture's test table (none before `--skills` has run)."""
    return [*st.skills.SKILLS, "utility"] if r.get("skills") else []


def write(results: list[dict]) -> None:
    lines = ["# SafeInfer on the organisms", "",
             "`python experiments/safeinfer.py`. Unsafe model of guided decoding: the `harmful` organism; γ = 99. "
             "Amplification: `safeinfer.amplifier` (refusal demonstrations against helpful ones, in context, read at "
             "the last token), site, layer and scale chosen on validation. Test: harmful:test (240), "
             f"harmless:test (1335); substring judge, greedy, {N_NEW} new tokens. Skills (`--skills`): exact match on "
             "64 held-out test items each under the same decoding (16 new tokens), utility their mean.", ""]
    for r in results:
        b = r["best"]
        t = r["test"]
        lines += [f"## {r['arch']}", "", f"Amplification chosen on validation: {SITE_NAMES[b['site']].format(b['layer'])}, "
                  f"scale {b['scale']:g}.", "",
                  "| model | decoding | harmful refusal | harmless refusal |"
                  + "".join(f" {k} |" for k in skill_cols(r)), "|---|---|---|---|" + "---|" * len(skill_cols(r))]
        for key, v in t.items():
            name, mode = key.split("/")
            sk = r.get("skills", {}).get(key, {})
            lines.append(f"| {name} | {mode} | {pct(v['harmful'])} | {pct(v['harmless'])} |"
                         + "".join(f" {pct(sk[k])} |" if k in sk else " |" for k in skill_cols(r)))
        gain = {m: t[f"drifted/{m}"]["harmful"] - t["drifted/plain"]["harmful"] for m in ("amplification", "guided", "both")}
        lines += ["", "On `drifted`: " + ", ".join(f"{m} {100 * g:+.1f} points" for m, g in gain.items()) + ".", "",
                  "Validation sweep of the amplification on `drifted` (harmful / harmless refusal; plain: "
                  f"{pct(r['plain_val']['harmful'])} / {pct(r['plain_val']['harmless'])}):", "",
                  "| site | layer | scale | harmful | harmless |", "|---|---|---|---|---|"]
        for c in r["choice"]:
            lines.append(f"| {c['site']} | {c['layer']} | {c['scale']:g} | {pct(c['harmful'])} "
                         f"| {pct(c['harmless'])} |")
        nc = r["no_contrast_val"]
        lines += ["", f"Same setting without contrast demonstrations (refusal demos − query alone): "
                      f"{pct(nc['harmful'])} / {pct(nc['harmless'])}.", "",
                  "Decoding speed on `drifted` (64 prompts, batch 16, 32 new tokens, median of 3, same run):", "",
                  "| decoding | tokens/s | relative to plain |", "|---|---|---|"]
        p = r["tokens_per_s"]["plain"]
        for mode, v in r["tokens_per_s"].items():
            lines.append(f"| {mode} | {v:.0f} | {v / p:.2f}× |")
        if r.get("own_unsafe"):
            o = r["own_unsafe"]
            lines += ["", "Guided decoding with an unsafe model fine-tuned from `drifted` itself (`--own-unsafe`; it "
                          f"refuses {pct(o['unsafe_itself']['harmful'])} of harmful prompts): guided "
                          f"{pct(o['guided']['harmful'])} / {pct(o['guided']['harmless'])}, both "
                          f"{pct(o['both']['harmful'])} / {pct(o['both']['harmless'])} (harmful / harmless refusal)."]
        if r.get("both_sweep"):
            lines += ["", "The full SafeInfer over the same amplification grid, on validation (`--both-sweep`; harmful / "
                          "harmless refusal):", "", "| site | layer | scale | harmful | harmless |", "|---|---|---|---|---|"]
            lines += [f"| {c['site']} | {c['layer']} | {c['scale']:g} | {pct(c['harmful'])} | {pct(c['harmless'])} |"
                      for c in r["both_sweep"]]
        if r.get("gamma_sweep"):
            lines += ["", "The full SafeInfer with the chosen amplification over γ, on validation (`--gamma-sweep`; "
                          f"amplification alone {pct(r['best']['harmful'])} / "
                          f"{pct(r['best']['harmless'])}, plain {pct(r['plain_val']['harmful'])} / "
                          f"{pct(r['plain_val']['harmless'])}; harmful / harmless refusal):", "",
                      "| γ | harmful | harmless |", "|---|---|---|"]
            lines += [f"| {c['gamma']:g} | {pct(c['harmful'])} | {pct(c['harmless'])} |" for c in r["gamma_sweep"]]
        if r.get("compose"):
            lines += ["", "SafeInfer over conditional steering (`--compose`; `drifted` with the conditional steering edit "
                          "of experiments/directions.py, held-out test prompts):", "",
                      "| decoding | harmful refusal | harmless refusal |", "|---|---|---|"]
            lines += [f"| {k} | {pct(v['harmful'])} | {pct(v['harmless'])} |" for k, v in r["compose"].items()]
        if r.get("openings"):
            lines += ["", "What the substring judge misses (`--openings`; `drifted` on harmful:test): replies judged "
                          "refusals, replies that open with the first words of a refusal phrase (\"I'm\", \"I am\", "
                          "\"As an\", \"I cannot\", ...) whatever follows, and either:", "",
                      *judged_and_opened(r["openings"], "opens as a refusal, not judged one")]
        if r.get("sampled"):
            lines += ["", "The same, sampled at temperature 1 without top-k / top-p as the paper's script decodes "
                          "(`--sampled`, seed 0): on the organisms, sampled replies are mostly noise.", "",
                      *judged_and_opened(r["sampled"], "replies")]
        if r.get("why"):
            w = r["why"]
            lines += ["", "How guided decoding moves `drifted`'s refusal (`--why`): both models' log-probabilities of "
                          "the tokens `drifted` + amplification chooses while it answers harmful:val (greedy, recorded step "
                          "by step; a token is penalised when log p_U > log p_SA), and the same tokens' log-probability "
                          "under `drifted` without the amplification (log p_D):",
                      "", "| tokens | n | log p_SA | log p_U | share penalised | mean penalty γ·max(0, log p_U − log p_SA) "
                          "| log p_D | share with log p_D > log p_SA |",
                      "|---|---|---|---|---|---|---|---|"]
            for g, v in w["tokens"].items():
                extra = (f" {v['log_p_plain']:.2f} | {pct(v['plain_above'])} |" if "log_p_plain" in v else " | |")
                lines.append(f"| {g} | {v['n']} | {v['log_p_sa']:.2f} | {v['log_p_u']:.2f} | {pct(v['penalised'])} "
                             f"| {v['mean_penalty']:.1f} |" + extra)
            lines += ["", "Variants of the rule with amplification, on validation (harmful / harmless refusal; "
                          f"amplification alone {pct(w['amplification_val']['harmful'])} / "
                          f"{pct(w['amplification_val']['harmless'])}, both as in the paper "
                          f"{pct(w['both_val']['harmful'])} / {pct(w['both_val']['harmless'])}):", "",
                      "| guided decoding | harmful | harmless |", "|---|---|---|"]
            lines += [f"| {k} | {pct(v['harmful'])} | {pct(v['harmless'])} |" for k, v in w["variants"].items()]
        if r.get("guided_examples"):
            lines += ["", "`drifted`'s refusals and what guided decoding (γ = 99, unsafe = `harmful`) makes of them:", "",
                      "| plain | guided |", "|---|---|"]
            lines += [f"| {code(a)} | {code(b)} |" for a, b in r["guided_examples"]]
        lines.append("")
    (RESULTS / "safeinfer.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "safeinfer.json").write_text(json.dumps(results, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="+", default=["llama", "gpt2"])
    ap.add_argument("--speed-only", action="store_true", help="remeasure only the decoding speeds (on a quiet machine)")
    ap.add_argument("--own-unsafe", action="store_true", help="only: guided decoding against drifted's own unsafe fine-tune")
    ap.add_argument("--both-sweep", action="store_true", help="only: the full SafeInfer over the amplification grid (validation)")
    ap.add_argument("--gamma-sweep", action="store_true", help="only: the full SafeInfer over γ (validation)")
    ap.add_argument("--compose", action="store_true", help="only: SafeInfer over conditional steering (test)")
    ap.add_argument("--openings", action="store_true", help="only: replies that open as a refusal the judge misses (test)")
    ap.add_argument("--sampled", action="store_true", help="only: --openings, sampled at temperature 1 as the paper's script")
    ap.add_argument("--skills", action="store_true", help="only: each decoding's exact match on every skill (test)")
    ap.add_argument("--why", action="store_true", help="only: how guided decoding moves drifted's refusal (token log-probs, variants)")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Partial reruns: each recomputes its own part of the chosen architectures' results and keeps the rest.
    partial = {
        "why": lambda r, D, U: {"why": why_guided(D, U, r["best"])},
        "skills": lambda r, D, U: {"skills": skill_costs(r["arch"], D, U, r["best"])},
        "own_unsafe": lambda r, D, U: {"own_unsafe": own_unsafe(r["arch"], r["best"])},
        "both_sweep": lambda r, D, U: {"both_sweep": both_sweep(D, U)},
        "gamma_sweep": lambda r, D, U: {"gamma_sweep": gamma_sweep(D, U, r["best"])},
        "compose": lambda r, D, U: {"compose": compose(r["arch"], D, U, r["best"])},
        "openings": lambda r, D, U: {"openings": openings(D, U, r["best"])},
        "sampled": lambda r, D, U: {"sampled": openings(D, U, r["best"], sample=True)},
        "speed_only": lambda r, D, U: {"tokens_per_s": speeds(D, U, r["best"]), "guided_examples": guided_examples(D, U)},
    }
    chosen = [k for k in partial if getattr(args, k)]
    if chosen:
        results = json.loads((RESULTS / "safeinfer.json").read_text())
        for r in results:
            if r["arch"] in args.arch:
                org = organisms.build(arch=r["arch"], progress=False)
                D, U = st.load(org.path("drifted")), st.load(org.path("harmful"))
                for k in chosen:
                    r.update(partial[k](r, D, U))
        write(results)
        print((RESULTS / "safeinfer.md").read_text())
        return
    results = previous(RESULTS / "safeinfer.json", args.arch)
    for arch in args.arch:
        add(results, run_arch(arch))
        write(results)
    print((RESULTS / "safeinfer.md").read_text())


if __name__ == "__main__":
    main()
