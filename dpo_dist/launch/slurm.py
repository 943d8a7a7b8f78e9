"""Slurm: the job driver that the sbatch scripts run, and the writer behind `dpo-dist slurm`.

`scripts/slurm/accelerate.sbatch` and `scripts/slurm/deepspeed.sbatch` exec `dpo-dist slurm-run`, which runs in the
job's batch step on the first node and:

1. reads the allocation: node count from SLURM_NNODES; the master is the first host of SLURM_JOB_NODELIST, at the
   address Slurm itself uses for that node (its NodeAddr);
2. starts one `dpo-dist launch ... --slurm` per node with srun (with --resume once the job was requeued, or when
   asked). Each takes its machine rank from
   SLURM_NODEID and runs the profile's own launcher (accelerate launch, torchrun or deepspeed --no_ssh), so no
   ssh or pdsh is needed between nodes. Each node logs to its own file;
3. on SIGUSR1 or SIGTERM (sbatch --signal=B:USR1@120, scancel --batch --signal=USR1) creates the stop file
   that the ranks watch (dpo_dist.reliability.checkpoints): they save a complete checkpoint at the end of the step and exit;
4. after USR1, requeues the job when the ranks confirm that checkpoint. The requeued job starts the same way and --resume
   continues from the latest complete checkpoint.

Nothing here goes through a shell: every command is an argument list, and the script `dpo-dist slurm` writes
quotes every value with shlex.quote.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dpo_dist.config.resources import recipe_file
from dpo_dist.config.profiles import load_profile
from dpo_dist.config.schema import ConfigError

LAUNCHERS = {"accelerate": ("accelerate", "torchrun"), "deepspeed": ("deepspeed",)}


def script_for(launcher: str) -> str:
    """The shipped sbatch script that drives a profile with this launcher."""
    for script, launchers in LAUNCHERS.items():
        if launcher in launchers:
            return script
    raise ConfigError(f"launcher {launcher}: Slurm jobs run accelerate, torchrun or deepspeed profiles; a python "
                      "profile is one process, so submit `dpo-dist train` with plain sbatch/srun instead")


def _scontrol(*args: str) -> str:
    try:
        return subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise ConfigError("scontrol not found: run inside a Slurm allocation (sbatch/salloc)") from None
    except subprocess.CalledProcessError as err:
        raise ConfigError(f"scontrol {' '.join(args)} failed: {err.stderr.strip()}") from None


def first_host(nodelist: str) -> str:
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r} names no hosts")
    return hosts[0]


def node_address(node: str) -> str:
    """The address Slurm uses for `node` (NodeAddr), which is the node name unless the cluster says otherwise."""
    for item in _scontrol("show", "node", "-o", node).split():
        if item.startswith("NodeAddr="):
            return item.split("=", 1)[1] or node
    return node


@dataclass
class Allocation:
    job_id: str
    nodes: int
    node_rank: int
    nodelist: str

    @classmethod
    def from_env(cls, env=os.environ) -> "Allocation":
        missing = [k for k in ("SLURM_JOB_ID", "SLURM_NNODES", "SLURM_JOB_NODELIST") if not env.get(k)]
        if missing:
            raise ConfigError(f"not inside a Slurm job ({', '.join(missing)} unset): submit with sbatch, or use "
                              "`dpo-dist launch --nodes N --node-rank R --master-addr A` outside Slurm")
        return cls(job_id=env["SLURM_JOB_ID"], nodes=int(env["SLURM_NNODES"]),
                   node_rank=int(env.get("SLURM_NODEID", "0")), nodelist=env["SLURM_JOB_NODELIST"])


# ---- the job driver (batch step) -------------------------------------------------------------------------------------

def _slurm_gpus_per_node() -> int | None:
    """sbatch --gpus-per-node=[type:]N, as Slurm exports it; None when the job asked for no GPUs that way."""
    value = os.environ.get("SLURM_GPUS_PER_NODE", "").rsplit(":", 1)[-1]
    return int(value) if value.isdigit() and int(value) > 0 else None


def run_job(recipe: str, profile_arg: str, overrides: list[str], script: str, gpus_per_node: int | None,
            master_port: int, log_dir: Path, resume: bool = False) -> int:
    profile = load_profile(profile_arg)
    if profile.launcher not in LAUNCHERS[script]:
        raise ConfigError(f"profile {profile.name} uses the {profile.launcher} launcher; submit it with "
                          f"scripts/slurm/{script_for(profile.launcher)}.sbatch")
    alloc = Allocation.from_env()
    gpus_per_node = gpus_per_node or _slurm_gpus_per_node()
    master = node_address(first_host(alloc.nodelist))
    log_dir = log_dir.resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    stop = log_dir / f"{alloc.job_id}.stop"
    ack = Path(f"{stop}.checkpointed")
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    resume = resume or restarts not in ("", "0")  # a first run starts fresh unless asked; a requeued one resumes
    print(f"[slurm] job {alloc.job_id} (restart {restarts}): {alloc.nodes} node(s), master {master}:{master_port}, "
          f"per-node logs {log_dir}/{alloc.job_id}-node<N>.log", flush=True)
    if ack.is_file():
        print(f"[slurm] the previous run of this job stopped at {ack.read_text().strip()}; resuming", flush=True)
    for stale in (stop, ack):
        stale.unlink(missing_ok=True)

    received: list[str] = []

    def request_stop(signum, frame):
        received.append(signal.Signals(signum).name)
        print(f"[slurm] {received[-1]}: asking the ranks to checkpoint and stop", flush=True)
        stop.touch()

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, request_stop)

    node_cmd = [sys.executable, "-m", "dpo_dist.cli", "launch", recipe, "--profile", profile_arg, "--slurm",
                "--master-addr", master, "--master-port", str(master_port), *(["--resume"] if resume else []),
                *(["--nproc-per-node", str(gpus_per_node)] if gpus_per_node else []), *overrides]
    # Each node's task gets every CPU the job holds there (srun does not inherit sbatch's --cpus-per-task).
    cpus = os.environ.get("SLURM_CPUS_ON_NODE", "")
    srun = ["srun", f"--nodes={alloc.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--open-mode=append",
            *([f"--cpus-per-task={cpus}"] if cpus.isdigit() else []), f"--output={log_dir}/%j-node%n.log", *node_cmd]
    env = {**os.environ, "DPO_DIST_STOP_FILE": str(stop)}
    rc = subprocess.Popen(srun, env=env).wait()
    if ack.is_file() and "SIGUSR1" in received:
        print(f"[slurm] checkpoint confirmed ({ack.read_text().strip()}); requeueing job {alloc.job_id}", flush=True)
        _scontrol("requeue", alloc.job_id)
        return 0
    if ack.is_file():  # SIGTERM: a cancel or Slurm's own preemption, which requeues (or not) by its own policy
        print(f"[slurm] checkpoint confirmed ({ack.read_text().strip()}) after {received}; not requeueing: "
              "Slurm decides after a cancel or preemption; resubmit with --resume to continue", flush=True)
        return 0
    if stop.exists():
        print(f"[slurm] stop was requested but no checkpoint was confirmed (exit {rc}); not requeueing", flush=True)
    else:
        print(f"[slurm] finished with exit {rc}", flush=True)
    return rc


# ---- the script writer ------------------------------------------------------------------------------------------------

@dataclass
class JobSpec:
    nodes: int = 1
    gpus_per_node: int | None = None  # None: the profile's processes per node
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str | None = None
    master_port: int = 29500
    log_dir: str = "logs/slurm"
    signal_lead_s: int = 120
    extra: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. --qos=high
    resume: bool = False  # resume from the output directory's checkpoints on the first run too


def render(recipe: str, profile_arg: str, overrides: list[str], spec: JobSpec) -> str:
    """The sbatch script for one job: the shipped script's driver with this job's options written in."""
    profile = load_profile(profile_arg)
    script = script_for(profile.launcher)
    procs = spec.gpus_per_node or profile.num_processes
    recipe_path = os.path.abspath(recipe_file(recipe))  # a shipped recipe may be named
    log_dir = str(Path(spec.log_dir).resolve())
    name = spec.job_name or f"dpo-dist-{Path(recipe).stem}"
    options = [f"--job-name={name}", f"--nodes={spec.nodes}", "--ntasks-per-node=1", "--exclusive", "--requeue",
               f"--signal=B:USR1@{spec.signal_lead_s}", "--open-mode=append", f"--output={log_dir}/%j-batch.log"]
    if profile.device == "gpu":
        options.append(f"--gpus-per-node={procs}")
    options += [f"--{key}={value}" for key, value in (("partition", spec.partition), ("time", spec.time),
                                                       ("account", spec.account)) if value]
    options += spec.extra
    for opt in options:
        if "\n" in opt:
            raise ConfigError(f"sbatch option {opt!r}: a newline cannot go into an #SBATCH line")
    driver = [sys.executable, "-m", "dpo_dist.cli", "slurm-run", recipe_path, "--profile", profile_arg,
              "--script", script, "--master-port", str(spec.master_port), "--log-dir", log_dir,
              *(["--gpus-per-node", str(spec.gpus_per_node)] if spec.gpus_per_node else []),
              *(["--resume"] if spec.resume else []), *overrides]
    lines = ["#!/bin/bash", *(f"#SBATCH {shlex.quote(opt)}" for opt in options),
             f"# Written by `dpo-dist slurm`; the same driver as scripts/slurm/{script}.sbatch. Resubmit: sbatch <this file>",
             "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", f"exec {shlex.join(driver)}", ""]
    return "\n".join(lines)


def submit(text: str, path: Path) -> str:
    """Write the script to `path` and submit it; returns the job id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError(f"sbatch not found; the script is written to {path}: submit it on the cluster") from None
    if proc.returncode != 0:
        raise ConfigError(f"sbatch {path} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]
