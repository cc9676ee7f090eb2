"""The commands: each maps its arguments onto the Python API and prints what it wrote."""

from __future__ import annotations

import argparse
import sys

from .args import check_no_safeinfer_options, fresh_folder, guard, safeinfer_kwargs


def cmd_info(args: argparse.Namespace) -> int:
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


def cmd_datasets(args: argparse.Namespace) -> int:
    from steering import datasets

    if args.name:
        for key, value in datasets.info(args.name).items():
            print(f"{key:<14}{value}")
        return 0
    for name in datasets.names():
        print(name)
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    import steering as st
    from steering.record import save_recording

    guard([args.out], args.model, args.prompts)
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


def load_edits(paths: list[str] | None):
    from steering.edits import combine, load_edit

    return combine(load_edit(p) for p in paths or [])


def cmd_extract(args: argparse.Namespace) -> int:
    import steering as st
    from steering.extract import diff_in_means

    guard([args.out], args.model, args.harmful, args.harmless)
    harmful = st.datasets.load(args.harmful, limit=args.limit)
    harmless = st.datasets.load(args.harmless, limit=args.limit)
    m = st.load(args.model, trust_remote_code=args.trust_remote_code)
    cands = diff_in_means(m, harmful, harmless, site=args.site, positions=args.positions, batch_size=args.batch_size)
    cands.save(args.out)
    print(f"{cands.vectors.shape[0]} layers x {len(cands.positions)} positions of difference-in-means candidates -> {args.out}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import steering as st
    from steering.io import atomic_write
    from steering.select import ablation_edit, select_direction
    from steering.vectors import Candidates

    out = Path(args.out)
    stem = out.with_suffix("")
    guard([out, str(stem) + ".png", str(stem) + ".json"], args.model, args.candidates, args.harmful_val, args.harmless_val)
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


def cmd_bake(args: argparse.Namespace) -> int:
    import steering as st
    from steering.edits import Ablation
    from steering.weights.bake import bake

    if args.format == "peft" and len(args.edit) != 1:
        raise ValueError("--format peft takes exactly one --edit (an ablation)")
    guard([args.out], args.model, args.edit)
    edit = load_edits(args.edit)
    if args.format == "peft":
        from steering.weights.export import to_peft

        if not isinstance(edit, Ablation):
            raise ValueError(f"--format peft: {args.edit[0]} holds a {edit.kind} edit; only an ablation is a low-rank weight change")
        m = st.load(args.model, trust_remote_code=args.trust_remote_code)
        base = None if args.model.startswith("organism:") else args.model  # as the user named it
        print(f"baked -> {to_peft(edit, m, args.out, overwrite=args.overwrite, base_model=base)}")
        return 0
    out, streamed = bake(edit, args.model, args.out, provenance={"edits": ",".join(args.edit)}, overwrite=args.overwrite,
                         stream=not args.in_memory, trust_remote_code=args.trust_remote_code, progress=True,
                         sources=args.edit, log=lambda line: print(line, file=sys.stderr), device=args.device,
                         threads=args.threads)
    print(f"baked{' (streamed)' if streamed else ''} -> {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import steering as st

    m = st.load(args.model, trust_remote_code=args.trust_remote_code)
    edit = load_edits(args.edit)
    outs = run_generation(m, args.prompt, edit, args, max_new_tokens=args.max_new_tokens)
    for prompt, text in zip(args.prompt, outs):
        print(f">>> {prompt}\n{text}")
    return 0


def run_generation(m, prompts, edit, args: argparse.Namespace, **kw):
    """Plain, edited, or SafeInfer generation, as the arguments say."""
    import contextlib

    from steering import safeinfer

    if not getattr(args, "safeinfer", False):
        check_no_safeinfer_options(args)
        with edit.hooks(m) if edit is not None else contextlib.nullcontext():
            return m.generate(prompts, **kw)
    return safeinfer.generate(m, prompts, **safeinfer_kwargs(m, args), edits=[edit] if edit is not None else [], **kw)


def cmd_organism_build(args: argparse.Namespace) -> int:
    from steering import organisms

    seed = {} if args.seed is None else {"seed": args.seed}
    org = organisms.build(args.out, arch=args.arch, overwrite=args.overwrite, **seed)
    print(org.table())
    print(f"built in {org.seconds:.0f} s (cached afterwards); folders: " + ", ".join(str(org.path(k)) for k in organisms.KINDS))
    return 0


def cmd_organism_judge(args: argparse.Namespace) -> int:
    from steering import organisms

    out = organisms.build_judge(args.out, arch=args.arch, seed=args.seed, overwrite=args.overwrite)
    print(f"judge organism -> {out} (use: steering eval MODEL --guard {out})")
    return 0


def cmd_task_vector(args: argparse.Namespace) -> int:
    import torch

    from steering.recipe import resolve
    from steering.weights.taskvec import TaskVector

    guard([args.out], args.base, args.finetuned)
    tau = TaskVector.between(resolve(args.base), resolve(args.finetuned), include=args.include, exclude=args.exclude)
    if args.top_k is not None:
        tau = tau.top_k(args.top_k, args.scope)
    path = tau.save(args.out, dtype=getattr(torch, args.dtype), overwrite=args.overwrite)
    print(f"task vector: {len(tau)} tensors, {tau.numel:,} values"
          + (f", top {args.top_k:g} ({args.scope})" if args.top_k is not None else "") + f" -> {path}")
    return 0


def cmd_hdr(args: argparse.Namespace) -> int:
    from steering.recipe import resolve
    from steering.weights.taskvec import TaskVector, hdr

    guard([args.out], args.target, args.harm_vector)
    harm = TaskVector.load(args.harm_vector)
    out = hdr(resolve(args.target), harm, args.out, scale=args.scale, top_k=args.top_k, scope=args.scope,
              overwrite=args.overwrite, progress=True, device=args.device, threads=args.threads)
    print(f"HDR (scale {args.scale:g}, top {args.top_k:g}{'' if args.scope == 'global' else ' per tensor'}) -> {out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import steering as st
    from steering import tune
    from steering.edits import load_edit
    from steering.io import atomic_write
    from steering.recipe import resolve

    out = Path(args.out)
    if out.is_file():
        raise FileExistsError(f"{args.out}: is a file; --out takes a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "trials.jsonl").exists() and not args.overwrite:
        raise FileExistsError(f"{args.out}: exists, is not empty and holds no earlier search (trials.jsonl); "
                              "pass --overwrite to write into it")
    if args.harm and args.harm_vector:
        raise ValueError("--harm and --harm-vector: give one harm vector")
    if args.adapter and args.checkpoint:
        raise ValueError("--adapter and --checkpoint: ask for one form of the pick")
    guard([args.out], args.model, args.reference, args.unsafe, args.harm or [], args.harm_vector, args.on or [], args.inner)
    on = [load_edit(p) for p in args.on or []]  # fail fast, before a model loads
    inner = load_edit(args.inner) if args.inner else None
    data = tune.Data.default(n_val=args.n_val, skills=args.skills, n_skill=args.n_skill)
    m = st.load(resolve(args.model), trust_remote_code=args.trust_remote_code)
    load = lambda p: st.load(resolve(p), trust_remote_code=args.trust_remote_code) if p else None
    r = tune.tune(m, args.method, reference=load(args.reference), unsafe=load(args.unsafe),
                  harm=tuple(args.harm) if args.harm else args.harm_vector, on=on, inner=inner, trials=args.trials,
                  minutes=args.minutes, seed=args.seed, data=data, checkpoint="peft" if args.adapter else args.checkpoint,
                  budgets=tune.Budgets(args.max_over_refusal, args.max_utility_loss, args.max_kl, args.min_refusal_change),
                  cache=out / "trials.jsonl", max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    r.save(out)
    print(r.table())
    done = len([t for t in r.trials if not t.skipped])
    print(f"{done} trials ({r.meta['evaluated']} evaluated, the rest from {out / 'trials.jsonl'}) in {r.meta['seconds']:.0f} s; "
          f"{r.meta['sampler']} over {r.meta['grid_size']} points")
    p = r.pick
    if p is None:
        print(f"no pick: {r.why}")
    else:
        print(f"pick: trial {p.number} ({', '.join(f'{k}={v}' for k, v in p.params.items())}); files: "
              + ", ".join(f"{k} {v}" for k, v in r.meta.get("files", {}).items())
              + (f"; evaluate it on test prompts: steering run {out / 'pick.yaml'}" if (out / "pick.yaml").exists() else ""))
        if args.tamper:
            t = tune.tamper_check(r)
            atomic_write(out / "tamper.json", lambda f: Path(f).write_text(json.dumps(t, indent=2)))
            gain = (f"{100 * t['survives']:.0f}% of the gain survives" if t["survives"] == t["survives"]
                    else "the edit raised no refusal on these prompts to test")
            print(f"tamper check: refusal {100 * t['unedited']:.0f}% unedited, {100 * t['edited']:.0f}% edited, "
                  f"{100 * t['attacked']:.0f}% after ablating the edited model's refusal direction "
                  f"(layer {t['direction_layer']}): {gain}")
    return 0 if p is not None else 1


def cmd_run(args: argparse.Namespace) -> int:
    from steering.recipe import run

    out = run(args.recipe, out=args.out, overwrite=args.overwrite or None, device=args.device, threads=args.threads)
    print(f"recipe {args.recipe} -> {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import steering as st
    from steering.edits import load_edit
    from steering.evaluate import Setting, evaluate

    if not args.safeinfer:
        check_no_safeinfer_options(args)  # before the model loads
    guard([args.out], args.model, args.edit or [], args.compare or [], args.unsafe_model, args.guard)
    fresh_folder(args.out, args.overwrite)
    m = st.load(args.model, trust_remote_code=args.trust_remote_code)
    settings = [Setting("plain")]
    settings += [Setting(Path(p).stem, edits=[load_edit(p)]) for p in args.edit or []]
    settings += [Setting(Path(p).name, model=p) for p in args.compare or []]
    if args.safeinfer:
        settings.append(Setting("safeinfer", **safeinfer_kwargs(m, args)))
    second_judge = None
    if args.guard:
        from steering.judge import GuardJudge

        second_judge = GuardJudge(st.load(args.guard, trust_remote_code=args.trust_remote_code))
    report = evaluate(m, settings, limit=args.limit, n_utility=args.n_utility, max_new_tokens=args.max_new_tokens,
                      skills=args.skills, n_skill=args.n_skill, guard=second_judge, batch_size=args.batch_size)
    out = report.save(args.out)
    print(report.table())
    print(f"report -> {out}/report.md, report.json, report.png")
    return 0


def cmd_main(args: argparse.Namespace) -> int:
    from steering.main import run

    run(out=args.out, quick=args.quick, arch=args.arch)
    return 0
