"""`dpo-dist slurm` script writing and the driver's refusals; no cluster needed (tests/test_slurm.py runs them)."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_dist.config.schema import ConfigError
from dpo_dist.launch.slurm import Allocation, JobSpec, render, run_job, script_for

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "configs" / "recipes" / "qwen2.5-72b-dpo-qlora.yaml")


def sbatch_options(text: str) -> list[str]:
    return [shlex.split(line[len("#SBATCH "):])[0] for line in text.splitlines() if line.startswith("#SBATCH ")]


def exec_args(text: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith("exec "))
    return shlex.split(line)[1:]


def test_gpu_job_script_has_the_allocation_and_requeue_options():
    text = render(RECIPE, "8xh100-fsdp-qlora", ["stages.dpo.train.learning_rate=5e-6"],
                  JobSpec(nodes=4, partition="gpu", time="2-00:00:00", account="proj", extra=["--qos=high"]))
    opts = sbatch_options(text)
    for want in ("--nodes=4", "--ntasks-per-node=1", "--exclusive", "--gpus-per-node=8", "--requeue", "--signal=B:USR1@120",
                 "--partition=gpu", "--time=2-00:00:00", "--account=proj", "--qos=high", "--open-mode=append"):
        assert want in opts, (want, opts)
    args = exec_args(text)
    assert args[:4] == [sys.executable, "-m", "dpo_dist.cli", "slurm-run"]
    assert args[4] == RECIPE and args[args.index("--script") + 1] == "accelerate"
    assert args[-1] == "stages.dpo.train.learning_rate=5e-6"


def test_cpu_profile_requests_no_gpus_and_deepspeed_profiles_get_their_script():
    text = render(RECIPE, "cpu-zero3-qlora-2", [], JobSpec(nodes=2, gpus_per_node=1))
    assert not any(o.startswith("--gpus") for o in sbatch_options(text))
    args = exec_args(text)
    assert args[args.index("--script") + 1] == "deepspeed" and args[args.index("--gpus-per-node") + 1] == "1"
    assert script_for("torchrun") == "accelerate"
    with pytest.raises(ConfigError, match="python profile is one process"):
        script_for("python")


def test_hostile_values_stay_data(tmp_path):
    hostile = tmp_path / "my runs $(touch pwned) `id` 'q' \"dq\";ls"
    text = render(RECIPE, "8xh100-zero3-qlora", [f"output_dir={hostile}"],
                  JobSpec(log_dir=str(hostile / "logs"), job_name="a b;c"))
    assert exec_args(text)[-1] == f"output_dir={hostile}"
    assert f"--output={hostile}/logs/%j-batch.log" in sbatch_options(text)
    # bash parses the script without running anything from the values
    proc = subprocess.run(["bash", "-n", "-c", text], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(ConfigError, match="newline"):
        render(RECIPE, "8xh100-zero3-qlora", [], JobSpec(extra=["--comment=a\n#SBATCH --x"]))


def test_dry_run_prints_the_script(capsys):
    from dpo_dist.cli import main

    assert main(["slurm", RECIPE, "--profile", "8xh100-zero3-qlora", "--nodes", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n") and "#SBATCH --nodes=2" in out and "--script deepspeed" in out


def test_driver_refuses_outside_slurm_and_the_wrong_script(monkeypatch, tmp_path):
    for key in ("SLURM_JOB_ID", "SLURM_NNODES", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="not inside a Slurm job"):
        Allocation.from_env()
    with pytest.raises(ConfigError, match="scripts/slurm/deepspeed.sbatch"):
        run_job(RECIPE, "8xh100-zero3-qlora", [], "accelerate", None, 29500, tmp_path)
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NODEID": "1"}
    assert Allocation.from_env(env) == Allocation("7", 2, 1, "gpu[01-02]")


def test_running_a_launcher_restores_the_callers_signal_handlers():
    import signal

    from dpo_dist.launch.command import _run

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    # the child sees SIGUSR1 ignored (launchers would die of it) and SIGTERM at its default
    code = ("import signal,sys; sys.exit(0 if signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN "
            "and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 3)")
    assert _run([sys.executable, "-c", code], env=dict(__import__("os").environ)) == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_first_run_starts_fresh_unless_asked():
    text = render(RECIPE, "8xh100-fsdp-qlora", [], JobSpec())
    assert "--resume" not in exec_args(text)
    assert "--resume" in exec_args(render(RECIPE, "8xh100-fsdp-qlora", [], JobSpec(resume=True)))
