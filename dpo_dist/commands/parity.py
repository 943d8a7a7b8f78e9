"""`dpo-dist parity`: one recipe under several profiles, losses and weights compared."""
from __future__ import annotations

import sys


def _parity(args) -> int:
    from pathlib import Path

    from dpo_dist.launch.parity import ParityError, run_parity

    try:
        report, ok = run_parity(args.recipe, [p for p in args.profiles.split(",") if p], Path(args.out),
                                args.overrides, tolerance=args.tolerance, reuse=args.reuse, steps=args.steps,
                                horizon=args.horizon, final_tolerance=args.final_tolerance, chained=args.chained,
                                drift=args.drift)
    except ParityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report)
    return 0 if ok else 1


def add_parser(sub) -> None:
    from dpo_dist.launch.parity import HORIZON

    p = sub.add_parser("parity", help="train one recipe under several profiles and compare losses and weights")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied under every profile")
    p.add_argument("--profiles", required=True, help="comma-separated names or files; the first is the reference")
    p.add_argument("--out", default="runs/parity", help="directory for one run per profile (default runs/parity)")
    p.add_argument("--steps", type=int, help="stop every stage after this many steps (the schedule stays the "
                   "recipe's); default: train to the end")
    p.add_argument("--horizon", type=int, default=HORIZON, help="steps compared per step; a longer stage is "
                   f"judged by its final mean loss, at --final-tolerance (default {HORIZON})")
    p.add_argument("--tolerance", type=float, help="max relative difference per step and of weights within the "
                   "horizon (default: 1e-4 in fp32; in bf16/fp16 1e-2 for series, 1e-1 for weights)")
    p.add_argument("--final-tolerance", type=float, help="max relative difference of the mean loss over the last "
                   "10 steps of a stage longer than the horizon (default 2e-2)")
    p.add_argument("--chained", action="store_true", help="also train every other profile stage after stage from "
                   "its own results, and report that propagation (not judged)")
    p.add_argument("--drift", action="store_true", help="also train the reference with its micro-batch halved: "
                   "the differences of another reduction order alone, reported beside the profiles'")
    p.add_argument("--reuse", action="store_true", help="compare existing finished runs instead of retraining")
    p.set_defaults(func=_parity)
