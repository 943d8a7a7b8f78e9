"""Stopping on request and checkpoints a resume can trust (dpo_dist.reliability.checkpoints), on one process and on 2 ranks."""
from __future__ import annotations

import json
import sys

import pytest

from dpo_dist.reliability.checkpoints import COMPLETE, latest_complete
from dpo_dist.launch.parity import rel_diff, weights_diff
from dpo_dist.reliability.faults import KillAtStep
from tests.helpers import BIN, free_port, losses, run, steps, write_recipe


def test_latest_complete_skips_a_checkpoint_without_its_marker(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        ckpt = tmp_path / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        if complete:
            (ckpt / COMPLETE).write_text("{}")
    said = []
    assert latest_complete(tmp_path, log=said.append) == tmp_path / "checkpoints" / "checkpoint-4"
    assert len(said) == 1 and "checkpoint-6" in said[0] and COMPLETE in said[0]
    assert latest_complete(tmp_path / "nothing") is None


@pytest.mark.parametrize("spec", ["x", "3:NOPE", "3:USR1@r"])
def test_fault_spec_is_checked(spec):
    with pytest.raises(ValueError, match="DPO_DIST_KILL_AT_STEP"):
        KillAtStep(spec)


def _stop_then_resume(recipe, tmp_path, launch, env):
    whole, broken, stop = tmp_path / "whole", tmp_path / "broken", tmp_path / "job.stop"
    run([*launch, f"output_dir={whole}"])
    proc = run([*launch, f"output_dir={broken}"], env={"DPO_DIST_STOP_FILE": str(stop), **env})
    # The signal arrives at the end of step 3; the ranks agree to stop at the end of step 4, which is saved.
    assert "stop requested" in proc.stdout + proc.stderr
    assert steps(broken / "sft") == [1, 2, 3, 4]
    ckpt = broken / "sft" / "checkpoints" / "checkpoint-4"
    assert (ckpt / COMPLETE).is_file() and not (broken / "sft" / "adapter").exists()
    assert not (broken / "sft" / "summary.json").exists()
    assert json.loads(stop.with_name("job.stop.checkpointed").read_text())["checkpoint"] == str(ckpt)
    run([*launch, f"output_dir={broken}", "--resume"])
    assert steps(broken / "sft") == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm"):
        assert rel_diff(losses(whole / "sft", key), losses(broken / "sft", key)) <= 1e-6, key
    assert weights_diff(whole / "sft" / "adapter", broken / "sft" / "adapter") <= 1e-6
    return broken


@pytest.mark.e2e
def test_usr1_checkpoints_stops_cleanly_and_resume_matches(tiny_base, data, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_base, data, max_steps=6, save_steps=100)
    launch = [sys.executable, "-m", "dpo_dist.train", recipe, "--profile", "cpu"]
    broken = _stop_then_resume(recipe, tmp_path, launch, {"DPO_DIST_KILL_AT_STEP": "3:USR1"})
    # --resume skips a stage that finished: the second stage (dpo) ran after sft, and a further --resume is a no-op
    before = (broken / "dpo" / "summary.json").read_text()
    proc = run([*launch, f"output_dir={broken}", "--resume"])
    assert "finished earlier" in proc.stdout + proc.stderr
    assert (broken / "dpo" / "summary.json").read_text() == before


@pytest.mark.e2e
@pytest.mark.distributed
def test_term_on_one_rank_stops_both_ranks_at_the_same_step(tiny_base, data, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_base, data, stages=("sft",), max_steps=6, save_steps=100)
    launch = [BIN / "dpo-dist", "launch", recipe, "--profile", "cpu-fsdp-2", "--master-port", free_port()]
    _stop_then_resume(recipe, tmp_path, launch, {"DPO_DIST_KILL_AT_STEP": "3:TERM@1"})


@pytest.mark.e2e
def test_a_stop_file_present_at_start_stops_after_the_first_step(tiny_base, data, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_base, data, stages=("sft",), max_steps=6, save_steps=100)
    stop = tmp_path / "stop"
    stop.write_text("")
    run([sys.executable, "-m", "dpo_dist.train", recipe, "--profile", "cpu"], env={"DPO_DIST_STOP_FILE": str(stop)})
    run_dir = tmp_path / "runs" / "sft"
    assert steps(run_dir) == [1] and (run_dir / "checkpoints" / "checkpoint-1" / COMPLETE).is_file()
