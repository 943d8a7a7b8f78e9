"""A real Slurm cluster on this host for the tests: munged, slurmctld and two slurmd "nodes" (n1, n2).

Everything lives in one temporary directory (config, state, spool, logs, munge socket and key) with free ports, so
it does not touch a system Slurm; `stop()` kills only the daemons it started. Debian's slurm-wlm and munge are
installed with apt-get when missing (we run as root in CI).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def unavailable() -> str | None:
    """Why a cluster cannot run here, or None. Installs the packages when it can."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"apt-get could not install slurm-wlm and munge: {proc.stderr.strip()[-300:]}"
    missing = [b for b in BINARIES if not shutil.which(b)]
    return f"installed, but still missing {missing}" if missing else None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    def __init__(self, root: Path, nodes=("n1", "n2"), cpus: int = 2):
        self.root, self.nodes = root, nodes
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        ctld, *node_ports = _free_ports(1 + len(nodes))
        host = socket.gethostname()
        for sub in ("state", "spool"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=dpodist", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld}",
            # A requeued job may start again only once its old credential expires (default 120 s); 10 s here.
            "AuthType=auth/munge", f"AuthInfo=socket={root}/munge.sock,cred_expire=10", "CredType=cred/munge",
            "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool/%n",
            f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd-%n.pid",
            f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "ReturnToService=2", "MpiDefault=none",
            "JobRequeue=1", "KillWait=10",
            *(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} Port={p} CPUs={cpus} State=UNKNOWN"
              for n, p in zip(nodes, node_ports)),
            f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        self.pidfiles = [root / "munged.pid", root / "slurmctld.pid", *(root / f"slurmd-{n}.pid" for n in nodes)]

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def start(self, timeout: float = 60) -> "Cluster":
        key = self.root / "munge.key"
        self._run("mungekey", "--create", "--keyfile", str(key))
        os.chmod(key, 0o600)
        self._run("munged", "--force", f"--socket={self.root}/munge.sock", f"--key-file={key}",
                  f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/munged.log",
                  f"--seed-file={self.root}/munge.seed")
        self._run("slurmctld", "-f", str(self.conf))
        for node in self.nodes:
            self._run("slurmd", "-f", str(self.conf), "-N", node)
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self._run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
            idle = [ln for ln in states if ln.strip().endswith("idle")]
            if len(idle) == len(self.nodes):
                return self
            time.sleep(1)
        raise RuntimeError(f"Slurm nodes not idle after {timeout} s: {states}; logs in {self.root}")

    def stop(self) -> None:
        self._run("scancel", "--user=root", check=False)
        for pidfile in reversed(self.pidfiles):
            try:
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                pass

    # ---- jobs ---------------------------------------------------------------------------------------------------

    def job(self, job_id: str) -> dict:
        """scontrol's view of a job as key → value (state, restarts, ...); {} once Slurm has forgotten it."""
        proc = self._run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)

    def wait(self, job_id: str, until, timeout: float = 600, poll: float = 1.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id}: condition not met in {timeout} s; last state {self.job(job_id)}")

    def wait_done(self, job_id: str, timeout: float = 600) -> dict:
        return self.wait(job_id, lambda j: j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                   "NODE_FAIL", "OUT_OF_MEMORY"), timeout)
