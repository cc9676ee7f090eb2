"""The ``steering`` command's parser and entry point."""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Sequence

from ..tune import METHOD_NAMES
from . import commands as cmd
from .args import (add_safeinfer_args, end_progress_bars, finite_float, fraction, nonneg_float, one_line, positive_int,
                   skill_list)



def weight_args(c: argparse.ArgumentParser) -> None:
    """--device and --threads of the streamed weight edits."""
    c.add_argument("--device", help="where the weight arithmetic runs: cpu (default) or cuda; the same bytes out "
                                    "for task arithmetic and HDR (orthogonalisation may differ in the last bit)")
    c.add_argument("--threads", type=positive_int,
                   help="cores to use (default: torch's threads); one is left to the reads, hashing and writes")

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
    c.set_defaults(func=cmd.cmd_info)

    c = sub.add_parser("datasets", help="List the bundled prompt sets, or describe one.")
    c.add_argument("name", nargs="?", help="a set name, e.g. harmful:test")
    c.set_defaults(func=cmd.cmd_datasets)

    c = model_cmd("record", "Record mean activations over a prompt set into a safetensors file.")
    c.add_argument("--prompts", required=True, help="a set name (harmful:train) or a CSV/JSON/JSONL/TXT file")
    c.add_argument("--column", help="the prompt column of a CSV/JSON/JSONL file")
    c.add_argument("--limit", type=positive_int, help="use at most this many prompts")
    c.add_argument("--sites", default="resid_pre", help="comma-separated: resid_pre,resid_mid,resid_post,attn_out,mlp_out")
    c.add_argument("--layers", help="comma-separated layer indices (default: all)")
    c.add_argument("--positions", default="post_instruction", help="last, last:K, post_instruction or all")
    c.add_argument("--batch-size", type=positive_int, default=16)
    c.add_argument("--out", required=True, help="output .safetensors file")
    c.set_defaults(func=cmd.cmd_record)

    c = model_cmd("extract", "Difference-in-means candidates (layer x post-instruction position) from two prompt sets.")
    c.add_argument("--harmful", default="harmful:train", help="prompt set that should trigger refusal (default harmful:train)")
    c.add_argument("--harmless", default="harmless:train", help="prompt set that should not (default harmless:train)")
    c.add_argument("--limit", type=positive_int, default=128, help="prompts from each set (default 128, as the paper)")
    c.add_argument("--site", default="resid_pre")
    c.add_argument("--positions", default="post_instruction")
    c.add_argument("--batch-size", type=positive_int, default=32)
    c.add_argument("--out", required=True, help="candidates .safetensors file")
    c.set_defaults(func=cmd.cmd_extract)

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
    c.set_defaults(func=cmd.cmd_select)

    c = model_cmd("bake", "Bake edits into weights and write a Hugging Face folder (or a PEFT LoRA adapter).")
    c.add_argument("--edit", action="append", required=True, help="an edit file (repeatable)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--format", choices=("hf", "peft"), default="hf")
    c.add_argument("--in-memory", action="store_true",
                   help="load the model to bake an ablation (by default a local folder is streamed tensor by tensor)")
    c.add_argument("--overwrite", action="store_true")
    weight_args(c)
    c.set_defaults(func=cmd.cmd_bake)

    c = model_cmd("generate", "Greedy generation, optionally under edits.")
    c.add_argument("--edit", action="append", help="an edit file (repeatable)")
    c.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    c.add_argument("--max-new-tokens", type=positive_int, default=48)
    add_safeinfer_args(c)
    c.set_defaults(func=cmd.cmd_generate)

    c = sub.add_parser("organism", help="Model organisms: small chat models trained here that really refuse.")
    osub = c.add_subparsers(dest="organism_command", required=True, metavar="ACTION")
    for action, help, out_help, func in (
            ("build", "Build (or reuse from the cache) aligned, harmful and drifted into DIR.",
             "output folder; gets aligned/, harmful/, drifted/", cmd.cmd_organism_build),
            ("judge", "Build (or reuse from the cache) the judge organism, a Llama Guard-format classifier, into DIR.",
             "output folder", cmd.cmd_organism_judge)):
        b = osub.add_parser(action, help=help)
        b.add_argument("--out", required=True, help=out_help)
        b.add_argument("--arch", default="llama", help="llama (default), gpt2, qwen2 or gpt_neox")
        b.add_argument("--seed", type=int, help="training seed (default: the recipe's)")
        b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        b.set_defaults(func=func)

    c = model_cmd("eval", "Refusal, over-refusal, compliance and utility of MODEL, plain and under edits, side by side.")
    c.add_argument("--edit", action="append", help="an edit file, evaluated as its own setting (repeatable)")
    c.add_argument("--compare", action="append", help="another model folder (e.g. a baked or HDR checkpoint) as a setting")
    c.add_argument("--limit", type=positive_int, help="at most this many prompts of each set")
    c.add_argument("--n-utility", type=positive_int, default=128, help="harmless prompts for KL and cross-entropy")
    c.add_argument("--skills", type=skill_list, default=(),
                   help="comma-separated skills to score by exact match (sort,reverse,count,increment; see steering.skills)")
    c.add_argument("--n-skill", type=positive_int, default=64, help="held-out items per skill (default 64)")
    c.add_argument("--guard", help="a classifier model (e.g. Llama Guard) whose verdicts in the Llama Guard format "
                                   "rate the replies to harmful requests, beside the substring judge")
    c.add_argument("--max-new-tokens", type=positive_int, default=32)
    c.add_argument("--batch-size", type=positive_int, default=32)
    c.add_argument("--out", required=True, help="folder for report.json, report.md and report.png")
    c.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    add_safeinfer_args(c)
    c.set_defaults(func=cmd.cmd_eval)

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
    c.set_defaults(func=cmd.cmd_task_vector)

    c = sub.add_parser("hdr", help="Harm Direction Removal: TARGET - scale * topk(harm vector), streamed into a checkpoint.")
    c.add_argument("target", help="checkpoint folder to make safer (or organism:[ARCH/]KIND)")
    c.add_argument("--harm-vector", required=True, help="a task vector file (steering task-vector ALIGNED HARMFUL)")
    c.add_argument("--scale", type=finite_float, default=3.0, help="lambda (default 3, as Safety Arithmetic)")
    c.add_argument("--top-k", type=fraction, default=0.1, help="fraction of the harm vector kept, largest first (default 0.1; 1 keeps all)")
    c.add_argument("--scope", choices=["global", "tensor"], default="global", help="top-k over the whole model (the paper) or per tensor")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--overwrite", action="store_true")
    weight_args(c)
    c.set_defaults(func=cmd.cmd_hdr)

    c = model_cmd("tune", "Search an edit's settings on MODEL's validation prompts: every trial, the Pareto front, a pick within "
                          "budgets, and the pick's files (see steering.tune).")
    c.add_argument("--method", required=True, choices=METHOD_NAMES)
    c.add_argument("--out", required=True, help="folder for tune.json, front.md, front.png, trials.jsonl (the trial cache: "
                                                "run again with the same --out to resume) and the pick's files")
    c.add_argument("--reference", help="the model whose refusal direction addition / conditional add (default: MODEL)")
    c.add_argument("--unsafe", help="SafeInfer: the unsafe model for guided decoding (without it: amplification only)")
    c.add_argument("--harm", nargs=2, metavar=("BASE", "FINETUNED"), help="HDR: the harm vector as FINETUNED - BASE")
    c.add_argument("--harm-vector", help="HDR: the harm vector as a file (steering task-vector)")
    c.add_argument("--on", action="append", help="an edit file applied under every trial (repeatable): tune on top of it")
    c.add_argument("--inner", help="conditional: the edit file to gate (only the gate is tuned)")
    c.add_argument("--trials", type=positive_int, default=24, help="trial budget (default 24)")
    c.add_argument("--minutes", type=nonneg_float, help="time budget; the first budget to run out ends the search")
    c.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0): the same seed repeats the search")
    c.add_argument("--n-val", type=positive_int, default=32, help="validation prompts of each set per trial (default 32)")
    c.add_argument("--skills", type=skill_list, help="skills for the utility objective (default: all of steering.skills)")
    c.add_argument("--n-skill", type=positive_int, default=32, help="validation items per skill (default 32)")
    c.add_argument("--max-over-refusal", type=fraction, default=0.05,
                   help="budget: largest rise of harmless and of XSTest-safe refusal (default 0.05 = 5 points)")
    c.add_argument("--max-utility-loss", type=fraction, default=0.02, help="budget: largest utility loss (default 0.02)")
    c.add_argument("--max-kl", type=nonneg_float, help="budget: largest KL on harmless prompts (default: none)")
    c.add_argument("--min-refusal-change", type=fraction, default=0.05,
                   help="the least a pick must move harmful refusal on validation prompts (default 0.05 = 5 points)")
    c.add_argument("--checkpoint", action="store_true",
                   help="the pick is written as a checkpoint: only forms that bake on MODEL's family are searched")
    c.add_argument("--adapter", action="store_true",
                   help="the pick is written as a PEFT LoRA adapter: only the directional ablation (ablation methods)")
    c.add_argument("--tamper", action="store_true", help="after the search, ablate the edited model's own refusal direction "
                                                         "and report how much of the restored refusal survives")
    c.add_argument("--max-new-tokens", type=positive_int, default=32)
    c.add_argument("--batch-size", type=positive_int, default=64)
    c.add_argument("--overwrite", action="store_true", help="write into a non-empty --out that is not a tune folder")
    c.set_defaults(func=cmd.cmd_tune)

    c = sub.add_parser("run", help="Carry out a YAML recipe: weight edits into one checkpoint (steps:), or an evaluation (settings:).")
    c.add_argument("recipe", help="a YAML recipe (see steering.recipe)")
    c.add_argument("--out", help="output folder (default: the recipe's out)")
    c.add_argument("--overwrite", action="store_true")
    weight_args(c)
    c.set_defaults(func=cmd.cmd_run)

    c = sub.add_parser("main", help="The main job, end to end (see README).")
    c.add_argument("--out", default="runs/main", help="output folder (default: runs/main)")
    c.add_argument("--arch", default="llama", choices=("llama", "gpt2"), help="the organisms' family (default: llama)")
    c.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    c.set_defaults(func=cmd.cmd_main)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # FileExistsError and FileNotFoundError are OSErrors; NotImplementedError: baking an edit with no weight form
    except (ValueError, KeyError, IndexError, OSError, NotImplementedError, TypeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{end_progress_bars()}steering {args.command}: error: {one_line(msg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{end_progress_bars()}steering {args.command}: interrupted (outputs appear only once complete)",
              file=sys.stderr)
        return 130


def run(argv: Sequence[str] | None = None) -> int:
    """The entry point of the ``steering`` process (``steering ...``, ``python -m steering.cli``):
    :func:`main`, with the objects of the imports frozen out of the garbage collector
    (:func:`gc.freeze`) before the job and everything frozen after it. The interpreter's collections
    then skip torch's hundreds of thousands of module objects, during the job and at exit, where
    they cost about half a second a process (``experiments/bench_stream.py`` measures the jobs).
    Only for a process of its own: :func:`main`, which tests and notebooks call, freezes nothing,
    so what they made earlier stays collectable."""
    gc.freeze()
    try:
        return main(argv)
    finally:
        gc.freeze()  # nothing left to collect at exit: the outputs are written and closed
