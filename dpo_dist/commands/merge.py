"""`dpo-dist merge`: an adapter merged into a full-precision copy of its base."""
from __future__ import annotations


def _merge(args) -> int:
    from dpo_dist.config.preflight import check_model
    from dpo_dist.inference.merge import describe, merge_adapter

    check_model(args.base, "--base")
    out = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                        max_shard_size=args.max_shard_size)
    print(f"merged model written to {out} ({describe(out)}, {args.dtype})")
    return 0


def add_parser(sub) -> None:
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
