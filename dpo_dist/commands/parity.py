"""`dpo-dist parity`: one recipe under several profiles, losses and weights compared."""
from __future__ import annotations

def _parity(args) -> int:
    from pathlib import Path

    from dpo_dist.launch.parity import run_parity

    report, ok = run_parity(args.recipe, [p for p in args.profiles.split(",") if p], Path(args.out), args.overrides,
                            tolerance=args.tolerance, reuse=args.reuse)
    print(report)
    return 0 if ok else 1


def add_parser(sub) -> None:
    p = sub.add_parser("parity", help="train one recipe under several profiles and compare losses and weights")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied under every profile")
    p.add_argument("--profiles", required=True, help="comma-separated; the first is the reference")
    p.add_argument("--out", default="runs/parity", help="directory for one run per profile (default runs/parity)")
    p.add_argument("--tolerance", type=float, help="max relative difference for series and weights (default: 1e-4 in fp32; "
                   "in bf16/fp16 1e-2 for series, 1e-1 for weights)")
    p.add_argument("--reuse", action="store_true", help="compare existing finished runs instead of retraining")
    p.set_defaults(func=_parity)
