"""The `dpo-dist` command: one table of subcommands."""
from __future__ import annotations

import argparse
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
    from dpo_dist.merge import merge_adapter

    out = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {out}")
    return 0


def _launch(args) -> int:
    from dpo_dist.launch import Nodes, launch

    nodes = Nodes(args.nodes, args.node_rank, args.master_addr, args.master_port)
    return launch(args.recipe, args.profile, args.overrides, nodes, stage=args.stage, resume=args.resume,
                  dry_run=args.dry_run)


def _parity(args) -> int:
    from pathlib import Path

    from dpo_dist.parity import run_parity

    report, ok = run_parity(args.recipe, [p for p in args.profiles.split(",") if p], Path(args.out), args.overrides,
                            tolerance=args.tolerance, reuse=args.reuse)
    print(report)
    return 0 if ok else 1


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
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (default 0)")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (default 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=29500, help="port on node 0 (default 29500)")
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

    p = sub.add_parser("profiles", help="list the launch profiles")
    p.set_defaults(func=_profiles)

    p = sub.add_parser("demo", help="pretrain → SFT → DPO on a tiny model with bundled data; prints a table")
    p.add_argument("--out", default="demo-out", help="directory for the run directories (default: demo-out)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/recipes/demo.yaml")
    p.set_defaults(func=_demo)

    p = sub.add_parser("merge", help="merge a LoRA adapter into a full-precision copy of its base")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_merge)

    p = sub.add_parser("templates", help="list the chat templates")
    p.set_defaults(func=_templates)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # key=value overrides may follow options; argparse leaves them over
        extra = [a for a in rest if a.startswith("-")]
        if extra or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = list(args.overrides) + rest
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
