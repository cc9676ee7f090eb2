"""The ``steering`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence


# --- argument types: a bad value is refused by argparse, naming the option ------------------------
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


def _guard(outputs: Iterable[Any], *inputs: Any) -> None:
    """Refuse, before any work, an output that is, holds or lies inside an input (symlinks resolved)."""
    from steering.io import check_paths

    flat: list[Any] = []
    for i in inputs:
        flat += list(i) if isinstance(i, (list, tuple)) else [i]
    check_paths(list(outputs), [x for x in flat if isinstance(x, str) and not x.startswith("organism:")])


def _fresh_folder(out: str, overwrite: bool) -> None:
    """A report folder: refused if it is a file, or a non-empty folder without ``--overwrite``."""
    path = Path(out)
    if path.is_file():
        raise FileExistsError(f"{out}: is a file; --out takes a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; pass --overwrite to write the report into it")


def _cmd_info(args: argparse.Namespace) -> int:
    import steering as st

    m = st.load(args.model, trust_remote_code=args.trust_remote_code)
    spec = m.map.spec
    print(f"model       {m.name}")
    print(f"family      {spec.name}  layers {m.n_layers}  d_model {m.d_model}  parallel {m.map.parallel}  post_norm {spec.post_norm}")
    for key in ("embed", "pos_embed", "layers", "final_norm", "unembed", "attn_write", "mlp_write", "resid_mid_input"):
        print(f"{key:<16}{getattr(spec, key)}")
    print(f"attn_weights    {list(spec.attn_weights)}")
    print(f"mlp_weights     {list(spec.mlp_weights)}")
    print(f"chat template   {m.has_chat_template}  post-instruction tokens {m.post_instruction_len}")
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from steering import datasets

    if args.name:
        for key, value in datasets.info(args.name).items():
            print(f"{key:<14}{value}")
        return 0
    for name in datasets.names():
        print(name)
    return 0


def _cmd_record(args: argparse.Namespace) -> int:
    import steering as st
    from steering.record import save_recording

    _guard([args.out], args.model, args.prompts)
    prompts = st.datasets.load(args.prompts, column=args.column, limit=args.limit)  # fail fast, before the model loads
    try:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    except ValueError:
        raise ValueError(f"--layers {args.layers!r}: give comma-separated whole numbers, e.g. 0,2,3") from None
    m = st.load(args.model, trust_remote_code=args.trust_remote_code)
    rec = st.record(m, prompts, sites=args.sites.split(","), layers=layers, positions=args.positions,
                    batch_size=args.batch_size)
    save_recording(rec, args.out, m.name)
    print(f"recorded {rec.n_prompts} prompts at {','.join(rec.sums)} -> {args.out}")
    return 0


def _load_edits(paths: list[str] | None):
    from steering.edits import combine, load_edit

    return combine(load_edit(p) for p in paths or [])


def _cmd_extract(args: argparse.Namespace) -> int:
    import steering as st
    from steering.extract import diff_in_means

    _guard([args.out], args.model, args.harmful, args.harmless)
    harmful = st.datasets.load(args.harmful, limit=args.limit)
    harmless = st.datasets.load(args.harmless, limit=args.limit)
    m = st.load(args.model, trust_remote_code=args.trust_remote_code)
    cands = diff_in_means(m, harmful, harmless, site=args.site, positions=args.positions, batch_size=args.batch_size)
    cands.save(args.out)
    print(f"{cands.vectors.shape[0]} layers x {len(cands.positions)} positions of difference-in-means candidates -> {args.out}")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import steering as st
    from steering.io import atomic_write
    from steering.select import ablation_edit, select_direction
    from steering.vectors import Candidates

    out = Path(args.out)
    stem = out.with_suffix("")
    _guard([out, str(stem) + ".png", str(stem) + ".json"], args.model, args.candidates, args.harmful_val, args.harmless_val)
    cands = Candidates.load(args.candidates)
    harmful = st.datasets.load(args.harmful_val, limit=args.limit)
    harmless = st.datasets.load(args.harmless_val, limit=args.limit)
    m = st.load(args.model, trust_remote_code=args.trust_remote_code)
    sel = select_direction(m, cands, harmful, harmless, kl_threshold=args.kl_threshold, affine=args.affine)
    print(sel.table())
    try:  # nothing is written for a selection that found nothing
        edit, sub = ablation_edit(m, sel, harmful, harmless, subspace=args.subspace, max_rank=args.max_rank,
                                  kl_threshold=args.kl_threshold, affine=args.affine, offsets_from=args.harmless_val)
    except ValueError as e:
        raise ValueError(f"{e}; on the command line: --kl-threshold, or more validation prompts (--limit)") from None
    report = sel.to_json()
    if sub is not None:
        report["subspace"] = sub.steps
        print(f"subspace of rank {sub.rank}: " + ", ".join(f"+L{s['layer']}/{s['position']} -> {s['bypass']:.3f}" for s in sub.steps))
    else:
        print(f"pick: layer {sel.pick[0]}, position {sel.pick[1]}")
    if args.affine:
        print(f"affine: coordinates kept at the mean of {len(harmless)} {args.harmless_val} prompts' post-instruction tokens")
    sel.plot(str(stem) + ".png")
    edit.save(out)
    atomic_write(str(stem) + ".json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    print(f"ablation edit (rank {edit.rank}) -> {out}; table {stem}.json, heat map {stem}.png")
    return 0


def _cmd_bake(args: argparse.Namespace) -> int:
    from pathlib import Path

    import steering as st
    from steering.checkpoint import NotStreamable, bake_ablation_stream, write_hf
    from steering.edits import Ablation

    if args.format == "peft" and len(args.edit) != 1:
        raise ValueError("--format peft takes exactly one --edit (an ablation)")
    _guard([args.out], args.model, args.edit)
    edit = _load_edits(args.edit)
    if args.format == "peft" and not isinstance(edit, Ablation):
        raise ValueError(f"--format peft: {args.edit[0]} holds a {edit.kind} edit; only an ablation is a low-rank weight change")
    if args.format == "hf" and isinstance(edit, Ablation) and Path(args.model).is_dir() and not args.in_memory:
        # A local folder is orthogonalised tensor by tensor: the memory of one tensor, not the model.
        try:
            out = bake_ablation_stream(edit, args.model, args.out, overwrite=args.overwrite, progress=True,
                                       provenance={"edits": ",".join(args.edit)}, trust_remote_code=args.trust_remote_code,
                                       sources=args.edit)
            print(f"baked (streamed) -> {out}")
            return 0
        except NotStreamable as e:
            print(f"cannot stream ({e}); loading the model", file=sys.stderr)
    m = st.load(args.model, trust_remote_code=args.trust_remote_code)
    if args.format == "peft":
        from steering.export import to_peft

        base = None if args.model.startswith("organism:") else args.model  # as the user named it
        out = to_peft(edit, m, args.out, overwrite=args.overwrite, base_model=base)
    else:
        baked = edit.bake(m)
        out = write_hf(baked, args.out, {"method": "bake", "edits": ",".join(args.edit)}, overwrite=args.overwrite,
                       sources=[args.model, *args.edit], keep_remote_code=args.trust_remote_code)
    print(f"baked -> {out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import steering as st

    m = st.load(args.model, trust_remote_code=args.trust_remote_code)
    edit = _load_edits(args.edit)
    outs = _generate(m, args.prompt, edit, args, max_new_tokens=args.max_new_tokens)
    for prompt, text in zip(args.prompt, outs):
        print(f">>> {prompt}\n{text}")
    return 0


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


def _safeinfer_parts(m, args: argparse.Namespace):
    """(amplification edit or None, unsafe model path or None) from the SafeInfer arguments."""
    from steering import safeinfer

    if args.gamma is None:
        args.gamma = safeinfer.GAMMA
    if args.gamma and not args.unsafe_model:
        raise ValueError("--safeinfer: guided decoding needs --unsafe-model DIR (or --gamma 0 for amplification alone)")
    site = {"site": args.amplify_site} if args.amplify_site else {}
    amp = safeinfer.amplifier(m, layer=args.amplify_layer, scale=args.amplify_scale, **site) if args.amplify_scale else None
    return amp, (args.unsafe_model if args.gamma else None)


def _check_no_safeinfer_options(args: argparse.Namespace) -> None:
    """SafeInfer's options without ``--safeinfer`` are a mistake, not something to ignore."""
    if args.unsafe_model or args.amplify_layer is not None or args.amplify_site:
        raise ValueError("--unsafe-model / --amplify-layer / --amplify-site need --safeinfer")


def _generate(m, prompts, edit, args: argparse.Namespace, **kw):
    """Plain, edited, or SafeInfer generation, as the arguments say."""
    import contextlib

    from steering import safeinfer

    if not getattr(args, "safeinfer", False):
        _check_no_safeinfer_options(args)
        with edit.hooks(m) if edit is not None else contextlib.nullcontext():
            return m.generate(prompts, **kw)
    amp, unsafe = _safeinfer_parts(m, args)
    return safeinfer.generate(m, prompts, unsafe=unsafe, amplify=amp,
                              edits=[edit] if edit is not None else [], gamma=args.gamma, **kw)


def _cmd_organism_build(args: argparse.Namespace) -> int:
    from steering import organisms

    seed = {} if args.seed is None else {"seed": args.seed}
    org = organisms.build(args.out, arch=args.arch, overwrite=args.overwrite, **seed)
    print(org.table())
    print(f"built in {org.seconds:.0f} s (cached afterwards); folders: " + ", ".join(str(org.path(k)) for k in organisms.KINDS))
    return 0


def _cmd_task_vector(args: argparse.Namespace) -> int:
    import torch

    from steering.recipe import resolve
    from steering.taskvec import TaskVector

    _guard([args.out], args.base, args.finetuned)
    tau = TaskVector.between(resolve(args.base), resolve(args.finetuned), include=args.include, exclude=args.exclude)
    if args.top_k is not None:
        tau = tau.top_k(args.top_k, args.scope)
    path = tau.save(args.out, dtype=getattr(torch, args.dtype), overwrite=args.overwrite)
    print(f"task vector: {len(tau)} tensors, {tau.numel:,} values"
          + (f", top {args.top_k:g} ({args.scope})" if args.top_k is not None else "") + f" -> {path}")
    return 0


def _cmd_hdr(args: argparse.Namespace) -> int:
    from steering.recipe import resolve
    from steering.taskvec import TaskVector, hdr

    _guard([args.out], args.target, args.harm_vector)
    harm = TaskVector.load(args.harm_vector)
    out = hdr(resolve(args.target), harm, args.out, scale=args.scale, top_k=args.top_k, scope=args.scope,
              overwrite=args.overwrite, progress=True)
    print(f"HDR (scale {args.scale:g}, top {args.top_k:g}{'' if args.scope == 'global' else ' per tensor'}) -> {out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from steering.recipe import run

    out = run(args.recipe, out=args.out, overwrite=args.overwrite or None)
    print(f"recipe {args.recipe} -> {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import steering as st
    from steering.edits import load_edit
    from steering.evaluate import Setting, evaluate

    if not args.safeinfer:
        _check_no_safeinfer_options(args)  # before the model loads
    _guard([args.out], args.model, args.edit or [], args.compare or [], args.unsafe_model)
    _fresh_folder(args.out, args.overwrite)
    m = st.load(args.model, trust_remote_code=args.trust_remote_code)
    settings = [Setting("plain")]
    settings += [Setting(Path(p).stem, edits=[load_edit(p)]) for p in args.edit or []]
    settings += [Setting(Path(p).name, model=p) for p in args.compare or []]
    if args.safeinfer:
        amp, unsafe = _safeinfer_parts(m, args)
        settings.append(Setting("safeinfer", unsafe=unsafe, amplify=amp, gamma=args.gamma))
    report = evaluate(m, settings, limit=args.limit, n_utility=args.n_utility, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size)
    out = report.save(args.out)
    print(report.table())
    print(f"report -> {out}/report.md, report.json, report.png")
    return 0


def _cmd_main(args: argparse.Namespace) -> int:
    from steering.main import run

    run(out=args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steering", description="Steer causal LMs towards safety without training them.")
    p.add_argument("--version", action="version", version=f"steering {__import__('steering._version').__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("model", help="a local Hugging Face folder or a hub name")
        c.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own Python code (off by default)")
        return c

    c = model_cmd("info", "Show how steering maps a model: layers, sites, output weights.")
    c.set_defaults(func=_cmd_info)

    c = sub.add_parser("datasets", help="List the bundled prompt sets, or describe one.")
    c.add_argument("name", nargs="?", help="a set name, e.g. harmful:test")
    c.set_defaults(func=_cmd_datasets)

    c = model_cmd("record", "Record mean activations over a prompt set into a safetensors file.")
    c.add_argument("--prompts", required=True, help="a set name (harmful:train) or a CSV/JSON/JSONL/TXT file")
    c.add_argument("--column", help="the prompt column of a CSV/JSON/JSONL file")
    c.add_argument("--limit", type=positive_int, help="use at most this many prompts")
    c.add_argument("--sites", default="resid_pre", help="comma-separated: resid_pre,resid_mid,resid_post,attn_out,mlp_out")
    c.add_argument("--layers", help="comma-separated layer indices (default: all)")
    c.add_argument("--positions", default="post_instruction", help="last, last:K, post_instruction or all")
    c.add_argument("--batch-size", type=positive_int, default=16)
    c.add_argument("--out", required=True, help="output .safetensors file")
    c.set_defaults(func=_cmd_record)

    c = model_cmd("extract", "Difference-in-means candidates (layer x post-instruction position) from two prompt sets.")
    c.add_argument("--harmful", default="harmful:train", help="prompt set that should trigger refusal (default harmful:train)")
    c.add_argument("--harmless", default="harmless:train", help="prompt set that should not (default harmless:train)")
    c.add_argument("--limit", type=positive_int, default=128, help="prompts from each set (default 128, as the paper)")
    c.add_argument("--site", default="resid_pre")
    c.add_argument("--positions", default="post_instruction")
    c.add_argument("--batch-size", type=positive_int, default=32)
    c.add_argument("--out", required=True, help="candidates .safetensors file")
    c.set_defaults(func=_cmd_extract)

    c = model_cmd("select", "Score every candidate (bypass, induce, KL), pick the refusal direction, write its ablation edit.")
    c.add_argument("candidates", help="a file written by 'steering extract'")
    c.add_argument("--harmful-val", default="harmful:val")
    c.add_argument("--harmless-val", default="harmless:val")
    c.add_argument("--limit", type=positive_int, default=32, help="validation prompts from each set (default 32, as the paper)")
    c.add_argument("--kl-threshold", type=nonneg_float, default=0.1)
    c.add_argument("--subspace", action="store_true", help="grow a low-rank subspace instead of one direction")
    c.add_argument("--max-rank", type=positive_int, default=8)
    c.add_argument("--affine", action="store_true",
                   help="write an affine ablation: coordinates set to the harmless prompts' mean, not zero; "
                        "the candidates' bypass and KL are scored in that form (bakes with --format hf, not peft)")
    c.add_argument("--out", required=True, help="edit .safetensors file (a .json table and .png heat map are written beside it)")
    c.set_defaults(func=_cmd_select)

    c = model_cmd("bake", "Bake edits into weights and write a Hugging Face folder (or a PEFT LoRA adapter).")
    c.add_argument("--edit", action="append", required=True, help="an edit file (repeatable)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--format", choices=("hf", "peft"), default="hf")
    c.add_argument("--in-memory", action="store_true",
                   help="load the model to bake an ablation (by default a local folder is streamed tensor by tensor)")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_bake)

    c = model_cmd("generate", "Greedy generation, optionally under edits.")
    c.add_argument("--edit", action="append", help="an edit file (repeatable)")
    c.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    c.add_argument("--max-new-tokens", type=positive_int, default=48)
    add_safeinfer_args(c)
    c.set_defaults(func=_cmd_generate)

    c = sub.add_parser("organism", help="Model organisms: small chat models trained here that really refuse.")
    osub = c.add_subparsers(dest="organism_command", required=True, metavar="ACTION")
    b = osub.add_parser("build", help="Build (or reuse from the cache) aligned, harmful and drifted into DIR.")
    b.add_argument("--out", required=True, help="output folder; gets aligned/, harmful/, drifted/")
    b.add_argument("--arch", default="llama", help="llama (default), gpt2, qwen2 or gpt_neox")
    b.add_argument("--seed", type=int, help="training seed (default: the recipe's)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    b.set_defaults(func=_cmd_organism_build)

    c = model_cmd("eval", "Refusal, over-refusal, compliance and utility of MODEL, plain and under edits, side by side.")
    c.add_argument("--edit", action="append", help="an edit file, evaluated as its own setting (repeatable)")
    c.add_argument("--compare", action="append", help="another model folder (e.g. a baked or HDR checkpoint) as a setting")
    c.add_argument("--limit", type=positive_int, help="at most this many prompts of each set")
    c.add_argument("--n-utility", type=positive_int, default=128, help="harmless prompts for KL and cross-entropy")
    c.add_argument("--max-new-tokens", type=positive_int, default=24)
    c.add_argument("--batch-size", type=positive_int, default=32)
    c.add_argument("--out", required=True, help="folder for report.json, report.md and report.png")
    c.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    add_safeinfer_args(c)
    c.set_defaults(func=_cmd_eval)

    c = sub.add_parser("task-vector", help="A task vector FINETUNED - BASE, read one tensor at a time, saved to a file.")
    c.add_argument("base", help="base checkpoint folder (or organism:[ARCH/]KIND)")
    c.add_argument("finetuned", help="fine-tuned checkpoint folder with the same tensors")
    c.add_argument("--out", required=True, help="output .safetensors file")
    c.add_argument("--top-k", type=fraction, help="keep only this fraction of entries, largest in magnitude (e.g. 0.1)")
    c.add_argument("--scope", choices=["global", "tensor"], default="global", help="top-k over the whole model (exact) or per tensor")
    c.add_argument("--include", action="append", help="regex: only tensors whose name matches (repeatable)")
    c.add_argument("--exclude", action="append", help="regex: leave out tensors whose name matches (repeatable)")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_task_vector)

    c = sub.add_parser("hdr", help="Harm Direction Removal: TARGET - scale * topk(harm vector), streamed into a checkpoint.")
    c.add_argument("target", help="checkpoint folder to make safer (or organism:[ARCH/]KIND)")
    c.add_argument("--harm-vector", required=True, help="a task vector file (steering task-vector ALIGNED HARMFUL)")
    c.add_argument("--scale", type=finite_float, default=3.0, help="lambda (default 3, as Safety Arithmetic)")
    c.add_argument("--top-k", type=fraction, default=0.1, help="fraction of the harm vector kept, largest first (default 0.1; 1 keeps all)")
    c.add_argument("--scope", choices=["global", "tensor"], default="global", help="top-k over the whole model (the paper) or per tensor")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_hdr)

    c = sub.add_parser("run", help="Carry out a YAML recipe: weight edits into one checkpoint (steps:), or an evaluation (settings:).")
    c.add_argument("recipe", help="a YAML recipe (see steering.recipe)")
    c.add_argument("--out", help="output folder (default: the recipe's out)")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_run)

    c = sub.add_parser("main", help="The main job, end to end (see README).")
    c.add_argument("--out", default="runs/main", help="output folder (default: runs/main)")
    c.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    c.set_defaults(func=_cmd_main)
    return p


def _end_progress_bars() -> str:
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


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # FileExistsError and FileNotFoundError are OSErrors; NotImplementedError: baking an edit with no weight form
    except (ValueError, KeyError, IndexError, OSError, NotImplementedError, TypeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{_end_progress_bars()}steering {args.command}: error: {_one_line(msg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_end_progress_bars()}steering {args.command}: interrupted (outputs appear only once complete)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
