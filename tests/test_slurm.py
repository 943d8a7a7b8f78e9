"""Multi-node runs: two launcher process groups on 127.0.0.1, and the shipped sbatch scripts on a real Slurm cluster
(slurmctld + two slurmd nodes on this host, tests/slurm_cluster.py).

Every run here is DPO with LoRA over 2 ranks, 6 steps, fp32, and is compared with one uninterrupted single-node
2-rank run (`cpu-fsdp-2`) under the fp32 parity bound: per-step loss and margins, and the final adapter.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpo_dist.reliability.checkpoints import COMPLETE
from dpo_dist.launch.parity import rel_diff, weights_diff
from dpo_dist.training.common import read_metrics
from tests.slurm_cluster import Cluster, unavailable
from tests.helpers import BIN, ROOT, free_port, run, summary, write_recipe

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]
STEPS = 6
BOUND = 1e-4


def dpo_recipe(path: Path, base, data, max_steps: int = STEPS) -> str:
    return write_recipe(path, base, data, stages=("dpo",), max_steps=max_steps, save_steps=100)


def series(run_dir: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run_dir) if "loss" in m]


def assert_matches(reference: Path, other: Path, world: int = 2):
    s = summary(other)
    assert (s["world_size"], s["global_step"]) == (world, STEPS)
    assert [m["step"] for m in read_metrics(other) if "loss" in m] == list(range(1, STEPS + 1))
    for key in ("loss", "rewards/margins"):
        assert rel_diff(series(reference, key), series(other, key)) <= BOUND, key
    assert weights_diff(reference / "adapter", other / "adapter") <= BOUND


@pytest.fixture(scope="module")
def reference(tiny_base, data, tmp_path_factory) -> Path:
    """The single-node, 2-rank FSDP2 run that every multi-node run must equal."""
    d = tmp_path_factory.mktemp("reference")
    recipe = dpo_recipe(d / "recipe.yaml", tiny_base, data)
    run([BIN / "dpo-dist", "launch", recipe, "--profile", "cpu-fsdp-2", "--master-port", free_port()])
    return d / "runs" / "dpo"


# ---- multi-node without Slurm: two launchers, one per "node", on 127.0.0.1 ------------------------------------------

@pytest.mark.parametrize("profile", ["cpu-fsdp-2", "cpu-zero3-2"])
def test_two_launchers_on_localhost_equal_one_node(profile, reference, tiny_base, data, tmp_path):
    recipe = dpo_recipe(tmp_path / "recipe.yaml", tiny_base, data)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    port = free_port()  # both launchers meet on it
    procs = []
    for rank in (0, 1):
        cmd = [BIN / "dpo-dist", "launch", recipe, "--profile", profile, "--nodes", "2", "--node-rank", str(rank),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port]
        log = open(tmp_path / f"node{rank}.log", "w")
        procs.append((subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                      log))
    for proc, log in procs:
        rc = proc.wait(timeout=600)
        log.close()
        assert rc == 0, (tmp_path / f"node{procs.index((proc, log))}.log").read_text()[-3000:]
    assert_matches(reference, tmp_path / "runs" / "dpo")


# ---- a real Slurm cluster ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = unavailable()
    if why:
        pytest.skip(f"no Slurm: {why}")
    cluster = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def sbatch(cluster: Cluster, args: list, cwd: Path, extra_env: dict | None = None) -> str:
    env = {**cluster.env, "DPO_DIST_PYTHON": sys.executable, "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def logs(directory: Path, job: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(directory.glob(f"{job}-*.log")))


def test_accelerate_sbatch_two_nodes_fsdp_dpo(slurm, reference, tiny_base, data, tmp_path):
    """The shipped script, submitted as a user would: sbatch --nodes=2 scripts/slurm/accelerate.sbatch ..."""
    recipe = dpo_recipe(tmp_path / "recipe.yaml", tiny_base, data)
    port = free_port()
    (tmp_path / "logs" / "slurm").mkdir(parents=True)
    job = sbatch(slurm, ["--nodes=2", ROOT / "scripts" / "slurm" / "accelerate.sbatch", recipe, "--profile",
                         "cpu-fsdp-2", "--gpus-per-node", "1"], cwd=tmp_path, extra_env={"MASTER_PORT": str(port)})
    info = slurm.wait_done(job)
    log_dir = tmp_path / "logs" / "slurm"
    assert info["JobState"] == "COMPLETED", logs(log_dir, job)
    assert {p.name for p in log_dir.glob(f"{job}-node*.log")} == {f"{job}-node0.log", f"{job}-node1.log"}
    assert f"master 127.0.0.1:{port}" in (log_dir / f"{job}-batch.log").read_text()
    run_dir = tmp_path / "runs" / "dpo"
    assert summary(run_dir)["backend"] == "fsdp"
    assert_matches(reference, run_dir)


def test_dpo_dist_slurm_two_nodes_zero3_dpo(slurm, reference, tiny_base, data, tmp_path):
    """`dpo-dist slurm` writes the deepspeed script for a ZeRO-3 profile and submits it; no ssh between nodes."""
    recipe = dpo_recipe(tmp_path / "recipe.yaml", tiny_base, data)
    out = tmp_path / "out $(touch pwned) 'q'"  # spaces, quotes and $(...) in a path reach the job as data
    proc = run([BIN / "dpo-dist", "slurm", recipe, "--profile", "cpu-zero3-2", "--nodes", "2", "--gpus-per-node",
                "1", "--master-port", free_port(), "--log-dir", out / "logs", f"output_dir={out / 'runs'}"],
               env={"SLURM_CONF": slurm.env["SLURM_CONF"], "DPO_DIST_PYTHON": sys.executable})
    job = proc.stdout.split("submitted job ")[1].split(":")[0]
    script = (out / "logs").glob("*.sbatch")
    assert "deepspeed" in next(script).read_text()
    info = slurm.wait_done(job)
    assert info["JobState"] == "COMPLETED", logs(out / "logs", job)
    assert not (ROOT / "pwned").exists() and not (tmp_path / "pwned").exists()
    node0 = (out / "logs" / f"{job}-node0.log").read_text()
    assert "--no_ssh" in node0 and "--node_rank 0" in node0
    run_dir = out / "runs" / "dpo"
    assert summary(run_dir)["backend"] == "deepspeed"
    assert_matches(reference, run_dir)


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, reference, tiny_base, data, tmp_path):
    """USR1 to the batch step (as --signal=B:USR1@120 sends before the time limit): the ranks save a complete
    checkpoint and exit, the job requeues itself, and the restart resumes and ends equal to an uninterrupted run."""
    recipe = dpo_recipe(tmp_path / "recipe.yaml", tiny_base, data)
    log_dir = tmp_path / "logs"
    proc = run([BIN / "dpo-dist", "slurm", recipe, "--profile", "cpu-fsdp-2", "--nodes", "2", "--gpus-per-node", "1",
                "--master-port", free_port(), "--log-dir", log_dir, f"output_dir={tmp_path / 'runs'}"],
               env={"SLURM_CONF": slurm.env["SLURM_CONF"]})
    job = proc.stdout.split("submitted job ")[1].split(":")[0]
    metrics = tmp_path / "runs" / "dpo" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 1):
        assert time.time() < deadline and slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), logs(log_dir, job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm.env, check=True)
    # Slurm holds the requeued job until its old credential expires (cred_expire, 10 s on this test cluster).
    slurm.wait(job, lambda j: j.get("Restarts") == "1", timeout=300)
    info = slurm.wait_done(job)
    batch = (log_dir / f"{job}-batch.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", logs(log_dir, job)
    assert "requeueing job" in batch and "(restart 1)" in batch
    run_dir = tmp_path / "runs" / "dpo"
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*") if (p / COMPLETE).is_file())
    stopped_at = int(saved[0].split("-")[1])
    assert 1 <= stopped_at < STEPS, saved  # it stopped mid-run, at a step boundary it saved
    node0 = (log_dir / f"{job}-node0.log").read_text()
    assert f"resuming dpo from {run_dir / 'checkpoints' / saved[0]}" in node0
    assert f'"checkpoint": "{run_dir / "checkpoints" / saved[0]}"' in batch  # confirmed, then resumed from
    assert_matches(reference, run_dir)  # per-step metrics (no step twice) and the adapter equal the whole run's
