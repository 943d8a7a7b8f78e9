"""`dpo-dist launch`: a recipe under a profile's launcher."""
from __future__ import annotations

from dpo_dist.config.schema import ConfigError


def _launch(args) -> int:
    from dpo_dist.launch.command import Nodes, launch

    if args.slurm:
        if args.nodes is not None or args.node_rank is not None:
            raise ConfigError("--slurm takes the node count and rank from the allocation; drop --nodes/--node-rank")
        nodes = Nodes.from_slurm(args.master_addr, args.master_port, args.nproc_per_node)
    else:
        nodes = Nodes(args.nodes, args.node_rank or 0, args.master_addr or "127.0.0.1", args.master_port,
                      args.nproc_per_node)
    return launch(args.recipe, args.profile, args.overrides, nodes, stage=args.stage, resume=args.resume,
                  dry_run=args.dry_run)


def add_parser(sub) -> None:
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
