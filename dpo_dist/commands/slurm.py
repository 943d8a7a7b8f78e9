"""`dpo-dist slurm` (write and submit the sbatch script) and `dpo-dist slurm-run` (its driver inside the job)."""
from __future__ import annotations

import os

from dpo_dist.config.schema import ConfigError


def _slurm(args) -> int:
    from dpo_dist.config.profiles import load_profile
    from dpo_dist.launch.command import preflight
    from dpo_dist.launch.slurm import JobSpec, render, submit

    spec = JobSpec(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition, time=args.time,
                   account=args.account, job_name=args.job_name, master_port=args.master_port, log_dir=args.log_dir,
                   signal_lead_s=args.signal_lead, extra=args.sbatch, resume=args.resume)
    # launch's preflight, for the whole job: a bad recipe is refused here, not after the job waited in the queue
    preflight(args.recipe, load_profile(args.profile), args.overrides, args.nodes, args.gpus_per_node,
              sources=not args.dry_run)
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

    from dpo_dist.launch.slurm import run_job

    port = args.master_port if args.master_port is not None else os.environ.get("MASTER_PORT") or "29500"
    if not str(port).isdigit():
        raise ConfigError(f"MASTER_PORT={port!r}: must be a port number")
    return run_job(args.recipe, args.profile, args.overrides, args.script, args.gpus_per_node, int(port),
                   Path(args.log_dir), resume=args.resume)


def add_parser(sub) -> None:
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
