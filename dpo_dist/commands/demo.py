"""`dpo-dist demo`: pretrain → SFT → DPO on a tiny model with the bundled data."""
from __future__ import annotations

def _demo(args) -> int:
    from dpo_dist.demo.run import run_demo

    run_demo(args.out, args.overrides, method=args.preference, resume=args.resume)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="pretrain → SFT → DPO on a tiny model with bundled data; prints a table")
    p.add_argument("--out", default="demo-out", help="directory for the run directories (default: demo-out)")
    p.add_argument("--preference", default="dpo", metavar="METHOD",
                   help="the preference stage's method: dpo (default), kto, orpo, cpo, or a DPO loss type (ipo, "
                        "hinge, ...)")
    p.add_argument("--resume", action="store_true", help="keep the stages that finished in --out: continue an "
                   "interrupted demo, or try another --preference after a finished one")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/recipes/demo.yaml")
    p.set_defaults(func=_demo)
