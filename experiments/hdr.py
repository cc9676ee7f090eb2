"""Harm Direction Removal (Safety Arithmetic) on the model organisms, run as a user would.

    python experiments/hdr.py [--arch llama gpt2]   # writes experiments/results/hdr.md, .json and hdr_<arch>.png

For each architecture:
1. ``steering task-vector ALIGNED HARMFUL --out tau_h.safetensors``: the harm vector τ_H.
2. A λ × k sweep of ``steering hdr DRIFTED --harm-vector tau_h --scale λ --top-k k [--scope tensor]``,
   each output's harmful / harmless refusal measured on *validation* prompts (harmful:val, 400 of
   harmless:val; substring judge, greedy, 32 new tokens), and the new skill's exact match (increment,
   the task `drifted` was fine-tuned for; 64 held-out items) on the held-out rows.
3. The best setting on validation (highest harmful refusal with harmless ≤ 10%) measured on the
   held-out *test* prompts, against `drifted` itself.
4. Why: per tensor group, the norms of τ_H and of the drift τ_D = drifted − aligned, their
   cosine, and where the global top-k of τ_H lands.
5. A drift more like the paper's (a shorter fine-tune that erodes refusal only partly):
   `aligned` fine-tuned on `drifted`'s training mixture for a fraction of the steps `drifted` took,
   then the best HDR setting; and a deeper one (half as many steps again).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import steering as st  # noqa: E402
from _util import add, cli, pct, previous  # noqa: E402
from steering import organisms  # noqa: E402
from steering.main import NEW_TOKENS  # noqa: E402
from steering.judge import refusal_rate  # noqa: E402
from steering.weights.taskvec import TaskVector  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
SCALES = (0.5, 1.0, 1.5, 2.0, 3.0)
TOPKS = (("0.1", "global"), ("0.1", "tensor"), ("0.5", "global"), ("1", "global"))
N_NEW = NEW_TOKENS  # as the main job's evaluation: long enough to judge


def rates(path: Path, split: str) -> dict[str, float]:
    m = st.load(path)
    limit = 400 if split == "val" else None
    out = {}
    for name, spec in (("harmful", f"harmful:{split}"), ("harmless", f"harmless:{split}")):
        prompts = st.datasets.load(spec, limit=limit if name == "harmless" else None)
        out[name] = refusal_rate(m.generate(prompts, max_new_tokens=N_NEW, batch_size=64))
    if split == "test":  # the task the drift taught, which HDR should keep (the paper's claim)
        out["skill"] = st.skills.accuracy(m, st.skills.NEW_SKILL)
    return out


def group(name: str) -> str:
    for key, pat in (("unembedding", r"lm_head|embed_out"), ("embedding", r"embed|wte|wpe"),
                     ("norms", r"norm|ln_"), ("attention", r"attn|attention"), ("mlp", r"mlp")):
        if re.search(pat, name):
            return key
    return "other"


def analyse(tau_h: TaskVector, tau_d: TaskVector) -> list[dict]:
    top = tau_h.top_k(0.1)
    stats: dict[str, dict[str, float]] = {}
    for n in tau_h.names:
        a, b = tau_h.get(n).flatten().double(), tau_d.get(n).flatten().double()
        g = stats.setdefault(group(n), {"h2": 0.0, "d2": 0.0, "hd": 0.0, "n": 0, "kept": 0})
        g["h2"] += float(a @ a)
        g["d2"] += float(b @ b)
        g["hd"] += float(a @ b)
        g["n"] += a.numel()
        g["kept"] += int(torch.count_nonzero(top.get(n)))
    th2 = sum(g["h2"] for g in stats.values())
    td2 = sum(g["d2"] for g in stats.values())
    rows = []
    for k, g in sorted(stats.items()):
        rows.append({"group": k, "params": g["n"], "tau_h_norm_share": g["h2"] / th2, "tau_d_norm_share": g["d2"] / td2,
                     "cos": g["hd"] / (g["h2"] * g["d2"]) ** 0.5 if g["h2"] and g["d2"] else 0.0,
                     "top10_share": g["kept"] / top.threshold().k, "rms_h": (g["h2"] / g["n"]) ** 0.5})
    allh = sum(g["hd"] for g in stats.values()) / (th2 * td2) ** 0.5
    rows.append({"group": "all", "params": sum(g["n"] for g in stats.values()), "tau_h_norm_share": 1.0,
                 "tau_d_norm_share": 1.0, "cos": allh, "top10_share": 1.0, "rms_h": (th2 / tau_h.numel) ** 0.5})
    return rows


def partial_drift(aligned: Path, out: Path, steps: int, arch: str) -> Path:
    """`aligned` fine-tuned on the drifted organism's training mixture (its new skill, no safety data) for ``steps`` steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(out, ignore_errors=True)
    recipe = organisms.Recipe(arch=arch)
    tok = AutoTokenizer.from_pretrained(aligned)
    net = AutoModelForCausalLM.from_pretrained(aligned, attn_implementation="eager")
    organisms._train(net, organisms.mixture("drifted", recipe), tok, recipe, steps, recipe.drift_lr, recipe.seed + 2)
    net.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_arch(arch: str, work: Path) -> dict:
    org = organisms.build(arch=arch, progress=True)
    A, H, D = org.path("aligned"), org.path("harmful"), org.path("drifted")
    work.mkdir(parents=True, exist_ok=True)
    tau_file = work / "tau_h.safetensors"
    cli("task-vector", str(A), str(H), "--out", str(tau_file), "--overwrite")
    result: dict = {"arch": arch, "drifted_val": rates(D, "val"), "sweep": []}
    print(f"[{arch}] drifted on val: {result['drifted_val']}", flush=True)
    for lam in SCALES:
        for k, scope in TOPKS:
            out = work / f"hdr_l{lam:g}_k{k}_{scope}"
            cli("hdr", str(D), "--harm-vector", str(tau_file), "--scale", f"{lam:g}", "--top-k", k, "--scope", scope,
                "--out", str(out), "--overwrite")
            r = rates(out, "val")
            result["sweep"].append({"scale": lam, "top_k": float(k), "scope": scope, **r})
            print(f"[{arch}] λ={lam:g} k={k} {scope}: harmful {100 * r['harmful']:.1f}% harmless {100 * r['harmless']:.1f}%",
                  flush=True)
            shutil.rmtree(out)
    ok = [s for s in result["sweep"] if s["harmless"] <= 0.10]
    best = max(ok, key=lambda s: (s["harmful"], -s["harmless"]))
    result["best"] = best
    out = work / "hdr_best"
    cli("hdr", str(D), "--harm-vector", str(tau_file), "--scale", f"{best['scale']:g}", "--top-k", f"{best['top_k']:g}",
        "--scope", best["scope"], "--out", str(out), "--overwrite")
    result["test"] = {"drifted": rates(D, "test"), "drifted+hdr": rates(out, "test"), "aligned": rates(A, "test")}
    paper = work / "hdr_paper"
    cli("hdr", str(D), "--harm-vector", str(tau_file), "--scale", "3", "--top-k", "0.1", "--out", str(paper), "--overwrite")
    result["test"]["drifted+hdr(λ=3, top 10%)"] = rates(paper, "test")
    result["analysis"] = analyse(TaskVector.load(tau_file), TaskVector.between(A, D))
    result["partial"] = partial(arch, A, tau_file, best, work, org.steps["drifted"])
    print(f"[{arch}] test: {result['test']}", flush=True)
    return result


def partial(arch: str, A: Path, tau_file: Path, best: dict, work: Path, drift: int) -> dict:
    """A drift that erodes refusal only partly: the shortest fine-tune on `drifted`'s mixture (of a
    quarter, a half and three quarters of ``drift``, the steps `drifted` took) whose harmful refusal
    on validation is at most 70%; then HDR at the best setting and at the paper's. And a deeper one
    (1.5 times ``drift``) with HDR at the best setting."""
    tried = []
    P = None
    for steps in (drift // 4, drift // 2, 3 * drift // 4):
        P = partial_drift(A, work / "drifted_partial", steps, arch)
        m = st.load(P)
        r = refusal_rate(m.generate(st.datasets.load("harmful:val"), max_new_tokens=N_NEW, batch_size=64))
        tried.append({"steps": steps, "harmful_val": r})
        print(f"[{arch}] partial drift {steps} steps: harmful refusal (val) {100 * r:.1f}%", flush=True)
        if r <= 0.70:
            break
    out = {"tried": tried, "steps": tried[-1]["steps"], "before": rates(P, "test"),
           "cos_all": analyse(TaskVector.load(tau_file), TaskVector.between(A, P))[-1]["cos"]}
    for name, (lam, k, scope) in (("hdr_best", (best["scale"], best["top_k"], best["scope"])), ("hdr_paper", (3.0, 0.1, "global"))):
        hp = work / f"hdr_partial_{name}"
        cli("hdr", str(P), "--harm-vector", str(tau_file), "--scale", f"{lam:g}", "--top-k", f"{k:g}", "--scope", scope,
            "--out", str(hp), "--overwrite")
        out[name] = rates(hp, "test")
    deep = partial_drift(A, work / "drifted_deep", 3 * drift // 2, arch)
    hp = work / "hdr_deep"
    cli("hdr", str(deep), "--harm-vector", str(tau_file), "--scale", f"{best['scale']:g}", "--top-k", f"{best['top_k']:g}",
        "--scope", best["scope"], "--out", str(hp), "--overwrite")
    out["deep"] = {"steps": 3 * drift // 2, "before": rates(deep, "test"), "hdr_best": rates(hp, "test")}
    out["drift_steps"] = drift
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [f"top {k} {'per tensor' if s == 'tensor' else 'global'}" for k, s in TOPKS]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, key, cmap in zip(axes, ("harmful", "harmless"), ("viridis", "magma")):
        grid = torch.zeros(len(SCALES), len(TOPKS))
        for s in result["sweep"]:
            grid[SCALES.index(s["scale"]), [(k, sc) for k, sc in TOPKS].index((f"{s['top_k']:g}", s["scope"]))] = s[key]
        im = ax.imshow(100 * grid.numpy(), cmap=cmap, vmin=0, vmax=100, aspect="auto")
        for i in range(len(SCALES)):
            for j in range(len(TOPKS)):
                ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", color="w" if grid[i, j] < 0.6 else "k")
        ax.set_xticks(range(len(TOPKS)), cols, rotation=15, fontsize=8)
        ax.set_yticks(range(len(SCALES)), [f"λ={s:g}" for s in SCALES])
        ax.set_title(f"{result['arch']}: {key} refusal % (val) after HDR")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cells(v: dict) -> str:
    """harmful refusal | harmless refusal | new skill |, of a :func:`rates` on test."""
    return f"{pct(v['harmful'])} | {pct(v['harmless'])} | {pct(v['skill'])} |"


def write(results: list[dict]) -> None:
    lines = ["# Harm Direction Removal on the organisms", "",
             "`python experiments/hdr.py` (CLI: `steering task-vector ALIGNED HARMFUL`, then `steering hdr DRIFTED "
             "--harm-vector tau_h.safetensors --scale λ --top-k k [--scope tensor]`). τ_H = harmful − aligned, over every "
             "floating tensor. Validation: harmful:val (230) and 400 of harmless:val; test: harmful:test (240), "
             f"harmless:test (1335). Substring judge, greedy, {N_NEW} new tokens. New skill: increment (what `drifted` was "
             "fine-tuned for), exact match on 64 held-out items.", ""]
    for r in results:
        a = r["arch"]
        t = r["test"]
        b = r["best"]
        lines += [f"## {a}", "", f"![sweep](hdr_{a}.png)", "",
                  f"Best on validation (harmless ≤ 10%): λ = {b['scale']:g}, top {b['top_k']:g} "
                  f"({b['scope']}). Held-out test:", "",
                  "| model | harmful refusal | harmless refusal | increment (new skill) |", "|---|---|---|---|"]
        for name, v in t.items():
            lines.append(f"| {name} | {cells(v)}")
        gain = t["drifted+hdr"]["harmful"] - t["drifted"]["harmful"]
        lines += ["", f"HDR raises drifted's harmful refusal by **{100 * gain:+.1f} points** "
                      f"(harmless {pct(t['drifted+hdr']['harmless'])}).", "",
                  "Sweep (validation):", "", "| λ | top-k | scope | harmful | harmless |", "|---|---|---|---|---|"]
        for s in r["sweep"]:
            lines.append(f"| {s['scale']:g} | {s['top_k']:g} | {s['scope']} | {pct(s['harmful'])} | {pct(s['harmless'])} |")
        lines += ["", "Where τ_H and the drift τ_D = drifted − aligned live:", "",
                  "| tensors | params | share of ‖τ_H‖² | share of ‖τ_D‖² | cos(τ_H, τ_D) | share of τ_H's global top 10% | RMS of τ_H |",
                  "|---|---|---|---|---|---|---|"]
        for g in r["analysis"]:
            lines.append(f"| {g['group']} | {g['params']:,} | {g['tau_h_norm_share']:.3f} | {g['tau_d_norm_share']:.3f} | "
                         f"{g['cos']:+.3f} | {g['top10_share']:.3f} | {g['rms_h']:.2e} |")
        p = r.get("partial")
        if not isinstance(p, dict):
            continue
        lines += ["", f"A partial drift: `aligned` fine-tuned on `drifted`'s mixture for {p['steps']} steps (tried: "
                      + ", ".join(f"{t['steps']} steps → {pct(t['harmful_val'])}" for t in p["tried"])
                      + f" harmful refusal on validation; `drifted` took {p['drift_steps']}), test:", "",
                  "| model | cos(τ_H, τ_D) | harmful | harmless | increment |", "|---|---|---|---|---|",
                  f"| partial drift | {p['cos_all']:+.3f} | {cells(p['before'])}",
                  f"| + HDR, best setting above | | {cells(p['hdr_best'])}",
                  f"| + HDR, λ=3, top 10% | | {cells(p['hdr_paper'])}"]
        if "deep" in p:
            dp = p["deep"]
            lines += [f"| a deeper drift ({dp['steps']} steps) | | {cells(dp['before'])}",
                      f"| + HDR, best setting above | | {cells(dp['hdr_best'])}"]
        lines += ["", "(harmful / harmless refusal)", ""]
    (RESULTS / "hdr.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "hdr.json").write_text(json.dumps(results, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="+", default=["llama", "gpt2"])
    ap.add_argument("--partial-only", action="store_true", help="redo only the partial-drift part, keeping hdr.json's sweep")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.partial_only:
        results = json.loads((RESULTS / "hdr.json").read_text())
        for r in results:
            if r["arch"] not in args.arch:
                continue
            org = organisms.build(arch=r["arch"], progress=False)
            work = ROOT / "runs" / "hdr" / r["arch"]
            r["partial"] = partial(r["arch"], org.path("aligned"), org.path("drifted"), work / "tau_h.safetensors", r["best"], work)
            write(results)
        print((RESULTS / "hdr.md").read_text())
        return
    results = previous(RESULTS / "hdr.json", args.arch)
    for arch in args.arch:
        r = run_arch(arch, ROOT / "runs" / "hdr" / arch)
        plot(r, RESULTS / f"hdr_{arch}.png")
        add(results, r)
        write(results)
    print((RESULTS / "hdr.md").read_text())


if __name__ == "__main__":
    main()
