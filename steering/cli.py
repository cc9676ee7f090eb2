"""The ``steering`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


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

    prompts = st.datasets.load(args.prompts, column=args.column, limit=args.limit)  # fail fast, before the model loads
    m = st.load(args.model, trust_remote_code=args.trust_remote_code)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    rec = st.record(m, prompts, sites=args.sites.split(","), layers=layers, positions=args.positions,
                    batch_size=args.batch_size)
    save_recording(rec, args.out, m.name)
    print(f"recorded {rec.n_prompts} prompts at {','.join(rec.sums)} -> {args.out}")
    return 0


def _cmd_main(args: argparse.Namespace) -> int:
    from steering.main import run

    run(out=args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steering", description="Steer causal LMs towards safety without training them.")
    p.add_argument("--version", action="version", version=f"steering {__import__('steering').__version__}")
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
    c.add_argument("--limit", type=int, help="use at most this many prompts")
    c.add_argument("--sites", default="resid_pre", help="comma-separated: resid_pre,resid_mid,resid_post,attn_out,mlp_out")
    c.add_argument("--layers", help="comma-separated layer indices (default: all)")
    c.add_argument("--positions", default="post_instruction", help="last, last:K, post_instruction or all")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--out", required=True, help="output .safetensors file")
    c.set_defaults(func=_cmd_record)

    c = sub.add_parser("main", help="The main job, end to end (see README).")
    c.add_argument("--out", default="runs/main", help="output folder (default: runs/main)")
    c.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    c.set_defaults(func=_cmd_main)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, IndexError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"steering {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
