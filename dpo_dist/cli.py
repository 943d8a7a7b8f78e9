"""The `dpo-dist` command: one table of subcommands."""
from __future__ import annotations

import argparse
import os
import sys

from dpo_dist.schema import ConfigError


def _train(args) -> int:
    from dpo_dist.train import main as train_main

    argv = [args.recipe, *args.overrides]
    argv += ["--profile", args.profile] if args.profile else []
    argv += ["--stage", args.stage] if args.stage else []
    argv += ["--resume"] if args.resume else []
    return train_main(argv)


def _demo(args) -> int:
    from dpo_dist.demo.run import run_demo

    run_demo(args.out, args.overrides)
    return 0


def _merge(args) -> int:
    from dpo_dist.merge import describe, merge_adapter

    out = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                        max_shard_size=args.max_shard_size)
    print(f"merged model written to {out} ({describe(out)}, {args.dtype})")
    return 0


def _launch(args) -> int:
    from dpo_dist.launch import Nodes, launch

    if args.slurm:
        if args.nodes is not None or args.node_rank is not None:
            raise ConfigError("--slurm takes the node count and rank from the allocation; drop --nodes/--node-rank")
        nodes = Nodes.from_slurm(args.master_addr, args.master_port, args.nproc_per_node)
    else:
        nodes = Nodes(args.nodes, args.node_rank or 0, args.master_addr or "127.0.0.1", args.master_port,
                      args.nproc_per_node)
    return launch(args.recipe, args.profile, args.overrides, nodes, stage=args.stage, resume=args.resume,
                  dry_run=args.dry_run)


def _slurm(args) -> int:
    from dpo_dist.slurm import JobSpec, render, submit

    spec = JobSpec(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition, time=args.time,
                   account=args.account, job_name=args.job_name, master_port=args.master_port, log_dir=args.log_dir,
                   signal_lead_s=args.signal_lead, extra=args.sbatch, resume=args.resume)
    text = render(args.recipe, args.profile, args.overrides, spec)
    if args.dry_run:
        print(text, end="")
        return 0
    from pathlib import Path

    log_dir = Path(args.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm cannot open --output in a missing directory
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{spec.job_name or 'job'}-{Path(args.recipe).stem}")
    path = Path(args.script_out) if args.script_out else log_dir / f"{stem}.sbatch"
    job = submit(text, path)
    print(f"submitted job {job}: script {path}, logs {log_dir}/{job}-*.log")
    return 0


def _slurm_run(args) -> int:
    from pathlib import Path

    from dpo_dist.slurm import run_job

    port = args.master_port if args.master_port is not None else os.environ.get("MASTER_PORT") or "29500"
    if not str(port).isdigit():
        raise ConfigError(f"MASTER_PORT={port!r}: must be a port number")
    return run_job(args.recipe, args.profile, args.overrides, args.script, args.gpus_per_node, int(port),
                   Path(args.log_dir), resume=args.resume)


def _parity(args) -> int:
    from pathlib import Path

    from dpo_dist.parity import run_parity

    report, ok = run_parity(args.recipe, [p for p in args.profiles.split(",") if p], Path(args.out), args.overrides,
                            tolerance=args.tolerance, reuse=args.reuse)
    print(report)
    return 0 if ok else 1


def _validate(args) -> int:
    from dpo_dist.validate import run

    return run(args)


def _profiles(args) -> int:
    from dpo_dist.profiles import load_profile, profile_names

    print(f"{'profile':<28}{'launcher':<12}{'backend':<11}{'procs':>6}  {'precision':<10}{'micro':>6}  methods")
    for name in profile_names():
        p = load_profile(name)
        print(f"{name:<28}{p.launcher:<12}{p.backend:<11}{p.world_size:>6}  {p.precision or 'recipe':<10}"
              f"{p.micro_batch_size:>6}  {','.join(p.methods)}")
    return 0


def _templates(args) -> int:
    from dpo_dist.templates import get_template, template_names

    for name in template_names():
        t = get_template(name)
        print(f"{name:<10} end-of-turn {t.end_of_turn or '<eos>':<16} default system: {t.default_system or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-dist", description="Fine-tune LLMs with SFT, DPO and pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a recipe's stages in this process (or under a launcher)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--profile")
    p.add_argument("--stage")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser("launch", help="run a recipe under a profile's launcher (python, torchrun, accelerate, deepspeed)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--profile", required=True, help="launch profile name (launch/*.yaml) or path")
    p.add_argument("--nodes", type=int, help="number of nodes (default: the profile's num_nodes)")
    p.add_argument("--node-rank", type=int, help="this node's rank (default 0)")
    p.add_argument("--master-addr", help="address of node 0 (default 127.0.0.1; under --slurm the first node)")
    p.add_argument("--master-port", type=int, default=29500, help="port on node 0 (default 29500)")
    p.add_argument("--nproc-per-node", type=int, help="processes per node (default: the profile's num_processes); "
                   "the recipe's global batch is kept")
    p.add_argument("--slurm", action="store_true", help="take nodes, node rank and master from the Slurm allocation")
    p.add_argument("--stage")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.set_defaults(func=_launch)

    p = sub.add_parser("parity", help="train one recipe under several profiles and compare losses and weights")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied under every profile")
    p.add_argument("--profiles", required=True, help="comma-separated; the first is the reference")
    p.add_argument("--out", default="runs/parity", help="directory for one run per profile (default runs/parity)")
    p.add_argument("--tolerance", type=float, help="max relative difference for series and weights (default: 1e-4 in fp32; "
                   "in bf16/fp16 1e-2 for series, 1e-1 for weights)")
    p.add_argument("--reuse", action="store_true", help="compare existing finished runs instead of retraining")
    p.set_defaults(func=_parity)

    p = sub.add_parser("slurm", help="write the sbatch script for a recipe + profile and submit it")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--profile", required=True, help="launch profile (accelerate, torchrun or deepspeed launcher)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, help="processes (GPUs) per node (default: the profile's)")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 2-00:00:00")
    p.add_argument("--account")
    p.add_argument("--job-name")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--log-dir", default="logs/slurm", help="batch and per-node logs (default logs/slurm)")
    p.add_argument("--signal-lead", type=int, default=120,
                   help="seconds before the time limit at which the job checkpoints and requeues (default 120)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH option, e.g. --sbatch=--qos=high (repeatable)")
    p.add_argument("--script-out", help="where to write the script (default: in --log-dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the output directory's checkpoints (a requeued job always does)")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    p.set_defaults(func=_slurm)

    p = sub.add_parser("slurm-run", help="inside an sbatch job: start every node, checkpoint and requeue on signal")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--profile", required=True)
    p.add_argument("--script", required=True, choices=["accelerate", "deepspeed"],
                   help="which shipped script this is (it checks the profile's launcher)")
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--master-port", type=int, help="rendezvous port (default: $MASTER_PORT, else 29500)")
    p.add_argument("--resume", action="store_true", help="resume on the first run too (a requeued run always does)")
    p.add_argument("--log-dir", default=os.environ.get("DPO_DIST_LOG_DIR", "logs/slurm"))
    p.set_defaults(func=_slurm_run)

    p = sub.add_parser("validate", help="check a recipe's data (or one data file) without loading a model: "
                       "every bad row as FILE:LINE: field: reason")
    p.add_argument("recipe", nargs="?", help="recipe to check (every stage's data.train and data.eval)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--data", metavar="FILE", help="check this file (or pretrain directory) instead of a recipe")
    p.add_argument("--format", dest="kind", choices=["sft", "dpo", "pretrain"], help="with --data: the kind of data")
    p.add_argument("--data-format", default="auto", help="with --data: firefly, openai, sharegpt, alpaca, pair, "
                   "ultrafeedback, text or auto (default)")
    p.add_argument("--split", default="train", help="with --data: split of a Hugging Face dataset (default train)")
    p.add_argument("--tokenizer", metavar="PATH", help="with --data: tokenizer for token-length checks")
    p.add_argument("--template", help="with --tokenizer: chat template name (default: the tokenizer's own)")
    p.add_argument("--max-length", type=int, help="with --tokenizer: max_length (default 2048)")
    p.add_argument("--max-prompt-length", type=int, help="with --tokenizer, dpo: max_prompt_length "
                   "(default max_length/2)")
    p.add_argument("--max-lines", type=int, metavar="N", help="show at most N lines per kind of problem")
    p.add_argument("--strict", action="store_true", help="also fail (exit 1) on warnings")
    p.add_argument("--profile", help="with a RECIPE: also run the checks training under this launch profile makes "
                   "before loading weights (global batch split, methods, precision)")
    p.set_defaults(func=_validate)

    from dpo_dist import doctor, prepare
    from dpo_dist.tools import bench, chat, evaluate, firefly_import, plan, plot

    for tool in (prepare, plan, chat, evaluate, plot, bench, firefly_import, doctor):
        tool.add_parser(sub)  # each registers its subcommand(s)

    p = sub.add_parser("profiles", help="list the launch profiles")
    p.set_defaults(func=_profiles)

    p = sub.add_parser("demo", help="pretrain → SFT → DPO on a tiny model with bundled data; prints a table")
    p.add_argument("--out", default="demo-out", help="directory for the run directories (default: demo-out)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/recipes/demo.yaml")
    p.set_defaults(func=_demo)

    p = sub.add_parser("merge", help="merge a LoRA/QLoRA adapter into a full-precision copy of its base")
    p.add_argument("--base", required=True, help="the full-precision base the adapter was trained on")
    p.add_argument("--adapter", required=True, help="an adapter directory, a stage's run directory, or a checkpoint "
                   "(also FSDP/ZeRO-3 sharded ones)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"], help="dtype of the merged weights "
                   "(default bf16; never 4-bit)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_merge)

    p = sub.add_parser("templates", help="list the chat templates")
    p.set_defaults(func=_templates)
    return parser


_JSON_STDOUT = None  # the real stdout while a command writes JSON there (see main)


def json_stdout():
    """Where a command writes its JSON when asked for it on stdout (`--json`, `--json -`): the real stdout, also while
    main() sends everything else the command (or a library) prints to stderr."""
    return _JSON_STDOUT or sys.stdout


def _json_on_stdout(args) -> bool:
    value = getattr(args, "json", None)
    return value is True or value == "-"


def _run_for_json(func, args) -> int:
    """Run a command whose stdout must hold its JSON alone. Libraries print on import (DeepSpeed's logger binds
    sys.stdout when it is created: "Setting accelerator to CPU"), so while the command runs stdout is stderr; the JSON
    goes to json_stdout()."""
    import contextlib

    global _JSON_STDOUT
    _JSON_STDOUT = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return func(args)
    finally:
        _JSON_STDOUT = None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # key=value overrides may follow options; argparse leaves them over
        extra = [a for a in rest if a.startswith("-")]
        if extra or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = list(args.overrides) + rest
    try:
        return _run_for_json(args.func, args) if _json_on_stdout(args) else args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m dpo_dist.cli`: run the module's importable copy, whose state (json_stdout) the commands import
    from dpo_dist.cli import main as _main

    sys.exit(_main())
