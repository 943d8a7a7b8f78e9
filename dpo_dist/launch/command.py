"""Recipe + profile → the real launcher command (python | torchrun | accelerate launch | deepspeed), then run it.

The command is exactly what a user could type: the launchers are the ecosystem's own, and every rank runs
`-m dpo_dist.train RECIPE --profile P`, which reads what the launcher set up.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.distributed.backends import Backend, Launch, check_devices, check_run, on_cuda
from dpo_dist.config.preflight import check_recipe
from dpo_dist.config.profiles import Profile, gradient_accumulation, load_profile
from dpo_dist.config.recipe import load_recipe
from dpo_dist.config.schema import ConfigError


@dataclass
class Nodes:
    count: int | None = None  # None = the profile's num_nodes
    rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    procs: int | None = None  # processes per node; None = the profile's num_processes

    @classmethod
    def from_slurm(cls, master_addr: str | None, master_port: int, procs: int | None) -> "Nodes":
        """This node's place in the Slurm allocation: node count, machine rank (SLURM_NODEID) and, unless given,
        the master = the first host of SLURM_JOB_NODELIST at its Slurm NodeAddr."""
        from dpo_dist.launch.slurm import Allocation, first_host, node_address

        alloc = Allocation.from_env()
        master = master_addr or node_address(first_host(alloc.nodelist))
        return cls(count=alloc.nodes, rank=alloc.node_rank, master_addr=master, master_port=master_port, procs=procs)


def _tool(name: str) -> str:
    """The launcher installed beside this Python (a venv's bin/), else the one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def build_command(recipe: str, profile: Profile, profile_arg: str, nodes: Nodes | None = None,
                  train_args: list[str] | None = None) -> list[str]:
    """The command that starts every rank of this node. `profile_arg` is what each rank gets as --profile."""
    nodes = nodes or Nodes()
    count = nodes.count or profile.num_nodes
    if count > 1 and profile.launcher == "python":
        raise ConfigError(f"profile {profile.name}: the python launcher runs one process; multi-node needs torchrun, "
                          "accelerate or deepspeed")
    if not 0 <= nodes.rank < count:
        raise ConfigError(f"--node-rank {nodes.rank}: must be in 0..{count - 1} for {count} node(s)")
    entry = ["dpo_dist.train", recipe, "--profile", profile_arg, *(train_args or [])]
    n = nodes.procs or profile.num_processes
    if nodes.procs is not None and nodes.procs <= 0:
        raise ConfigError(f"--nproc-per-node {nodes.procs}: must be positive")
    if profile.launcher == "python":
        return [sys.executable, "-m", *entry]
    if profile.launcher == "torchrun":
        return [_tool("torchrun"), f"--nproc_per_node={n}", f"--nnodes={count}", f"--node_rank={nodes.rank}",
                f"--master_addr={nodes.master_addr}", f"--master_port={nodes.master_port}", "-m", *entry]
    if profile.launcher == "accelerate":
        return [_tool("accelerate"), "launch", "--config_file", str(profile.path_of("accelerate_config")),
                "--num_processes", str(n * count), "--num_machines", str(count), "--machine_rank", str(nodes.rank),
                "--main_process_ip", nodes.master_addr, "--main_process_port", str(nodes.master_port), "-m", *entry]
    # deepspeed: without a hostfile it launches this node's ranks. For several nodes it needs a hostfile to size the
    # world, and --no_ssh makes each node start only its own ranks (no ssh/pdsh); the host names are only labels.
    multi = (["--hostfile", str(deepspeed_hostfile(count, n)), "--num_nodes", str(count), "--node_rank",
              str(nodes.rank), "--no_ssh"] if count > 1 else [])
    return [_tool("deepspeed"), "--num_gpus", str(n), *multi, "--master_addr", nodes.master_addr,
            "--master_port", str(nodes.master_port), "--module", *entry,
            "--deepspeed", str(profile.path_of("deepspeed_config"))]


def deepspeed_hostfile(count: int, procs: int) -> Path:
    """Where the multi-node deepspeed command reads its hostfile: `node<i> slots=<procs>` for each node."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"dpo-dist-hostfile-{os.getuid()}-{count}x{procs}"


def write_deepspeed_hostfile(count: int, procs: int) -> Path:
    path = deepspeed_hostfile(count, procs)
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text("".join(f"node{i} slots={procs}\n" for i in range(count)))
    os.replace(tmp, path)  # atomic: several nodes of one host may write it at once
    return path


def preflight(recipe_path: str, profile: Profile, overrides: list[str], nodes: int, procs: int | None = None,
              sources: bool = True) -> None:
    """Refuse up front, in the launching process, what check_run (and, unless `sources` is off, check_recipe)
    would refuse on every rank."""
    recipe = load_recipe(recipe_path, overrides)
    world = (procs or profile.num_processes) * nodes
    launch = Launch(world_size=world, rank=0, local_rank=0, accelerate_fsdp=profile.backend == "fsdp",
                    accelerate_deepspeed=False)
    ds = profile.deepspeed_file()
    stage = profile.deepspeed_settings().get("zero_optimization", {}).get("stage", 0) if ds else 0
    backend = Backend(profile.backend, ds, stage, profile.fsdp_settings())
    check_run(recipe, profile, launch, backend, cuda=False)  # the GPU checks run again on the ranks themselves
    check_devices(profile, procs or profile.num_processes, 0, on_cuda(profile))  # this node's GPUs, before launching
    if sources:
        check_recipe(recipe)
    for s in recipe.stages:
        gradient_accumulation(s.train.global_batch_size, profile.micro_batch_size, world, f"stages.{s.name}.train",
                              profile.sequence_parallel)


def launch(recipe: str, profile_arg: str, overrides: list[str], nodes: Nodes | None = None, stage: str | None = None,
           resume: bool = False, dry_run: bool = False, log_file: Path | None = None, env: dict | None = None) -> int:
    profile = load_profile(profile_arg)
    nodes = nodes or Nodes()
    count = nodes.count or profile.num_nodes
    preflight(recipe, profile, overrides, count, nodes.procs, sources=not dry_run)
    train_args = [*(["--stage", stage] if stage else []), *(["--resume"] if resume else []), *overrides]
    cmd = build_command(recipe, profile, profile_arg, nodes, train_args)
    print(shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    if profile.launcher == "deepspeed" and count > 1:
        write_deepspeed_hostfile(count, nodes.procs or profile.num_processes)
    full_env = {**os.environ, **(env or {})}
    if log_file is None:
        return _run(cmd, full_env)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w", encoding="utf-8") as fh:
        return _run(cmd, full_env, stdout=fh, stderr=subprocess.STDOUT)


def _run(cmd: list[str], env: dict, **kwargs) -> int:
    """Run the launcher and wait for it, with the caller's signal handlers restored afterwards.

    SIGUSR1 would kill the launchers (torchrun's agent, accelerate, deepspeed), so it is ignored here and by them (an
    ignored signal stays ignored across exec); the ranks install their own handler (dpo_dist.reliability.checkpoints). SIGTERM
    is passed on to the launcher, except inside a Slurm step, where Slurm signals every process itself and a second
    TERM would cut torchrun's shutdown short; either way this process keeps waiting for the launcher."""
    in_slurm_step = "SLURM_STEP_ID" in os.environ
    proc: subprocess.Popen | None = None

    def on_term(signum, frame):
        if proc is not None and not in_slurm_step:
            proc.send_signal(signum)

    previous = {signal.SIGUSR1: signal.signal(signal.SIGUSR1, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, on_term)}
    try:
        proc = subprocess.Popen(cmd, env=env, **kwargs)
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
