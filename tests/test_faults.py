"""Fault injection (dpo_dist.reliability.faults) on real runs: a crash or a full disk while saving, a non-finite loss, NaN
weights and a hung rank. Each case checks what the run says, what is left on disk, and that a resume is exact.
(A killed rank: tests/test_distributed.py; SIGTERM/SIGUSR1: tests/test_preemption.py.)

| case                         | profile      | fault                    | expected                                        |
|------------------------------|--------------|--------------------------|-------------------------------------------------|
| crash while saving           | cpu-fsdp-2   | save-kill@4 on rank 1    | exit != 0, checkpoint-2 intact, resume exact    |
| full disk while saving       | cpu-ddp-2    | save-enospc@4 on rank 0  | one clear error, checkpoint-2 intact, resume    |
| NaN loss, default            | cpu-ddp-2    | nan-loss@3 on rank 1     | both ranks stop: step 3, last good checkpoint-2 |
| NaN loss, skip               | cpu-fsdp-2   | nan-loss@3 on rank 1     | step 3's update skipped on both ranks, finishes |
| NaN in 1 of 4 micro-batches  | cpu, in-proc | micro-batch 1 or 4 of 2  | stop or skip before the update, 1 check a step  |
| NaN weights                  | cpu          | nan-weights@2            | checkpoint-2 and the adapter are never written  |
| hung rank                    | cpu-ddp-2    | hang@2 on rank 1         | rank 0 fails after collective_timeout_s         |
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from collections import Counter

import pytest
import yaml
from safetensors.torch import load_file

from dpo_dist.reliability.checkpoints import COMPLETE, STAGING, commit_checkpoint, latest_complete
from dpo_dist.reliability.faults import Faults, parse_faults
from dpo_dist.launch.parity import rel_diff, weights_diff
from dpo_dist.config.profiles import LAUNCH_DIR
from tests.helpers import BIN, free_port, host_reads, losses, run, steps, write_recipe


def launch(recipe, profile):
    return [BIN / "dpo-dist", "launch", recipe, "--profile", profile, "--master-port", free_port()]


def sft_recipe(tmp_path, tiny_base, data, **train):
    train = {"max_steps": 6, "save_steps": 2, "save_total_limit": 5, **train}
    return write_recipe(tmp_path / "recipe.yaml", tiny_base, data, stages=("sft",), **train)


def checkpoints(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))


def output(proc) -> str:
    return proc.stdout + proc.stderr


def error_lines(proc) -> list[str]:
    # (a progress bar may share the line)
    return [ln[ln.index("error: "):] for ln in output(proc).splitlines() if "error: " in ln]


# ---- unit: spec parsing, commit and rotation ----------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["boom@3", "nan-loss", "nan-loss@x", "hang@3:r"])
def test_fault_spec_is_checked(spec):
    with pytest.raises(ValueError, match="DPO_DIST_FAULT"):
        parse_faults(spec)


def test_fault_spec_parses_several():
    assert [(f.kind, f.step, f.rank) for f in parse_faults("save-kill@4:1, nan-loss@3")] == [
        ("save-kill", 4, 1), ("nan-loss", 3, None)]
    assert Faults("").faults == []


def test_commit_moves_the_staged_checkpoint_and_rotates_only_after_marking(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4):
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        (ckpts / f"checkpoint-{step}" / COMPLETE).write_text("{}")
    (ckpts / "checkpoint-1").mkdir()  # an unmarked leftover, older than everything kept
    staged = ckpts / STAGING / "checkpoint-6"
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"x")
    said = []
    assert commit_checkpoint(ckpts, 6, keep=2, log=said.append) == ckpts / "checkpoint-6"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (ckpts / "checkpoint-6" / COMPLETE).is_file() and not staged.exists()
    assert latest_complete(tmp_path) == ckpts / "checkpoint-6"
    assert len(said) == 2 and all("save_total_limit 2" in s for s in said)
    assert commit_checkpoint(ckpts, 8, keep=2) is None  # nothing staged, nothing in place


def _files(root):
    # (sizes of everything but the files that record the run's own path or time)
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
            if p.is_file() and p.name not in ("trainer_state.json", "COMPLETE", ".metadata")}


# ---- unit: the guard's decisions on one process -------------------------------------------------------------------

def _count_asks(monkeypatch) -> list[str]:
    """Counts the guard's any_rank calls (its collectives), by the Guard method that made them."""
    import dpo_dist.reliability.guard as reliability

    asks, real = [], reliability.any_rank

    def counted(flag):
        asks.append(sys._getframe(1).f_code.co_name)
        return real(flag)

    monkeypatch.setattr(reliability, "any_rank", counted)
    return asks

def _guard(tmp_path, **kw):
    from dpo_dist.reliability.guard import Guard

    said = []
    return Guard("sft", tmp_path, log=said.append, **kw), said


def test_guard_stop_names_step_and_last_good_checkpoint(tmp_path):
    import torch

    from dpo_dist.reliability.guard import NonFiniteLoss

    guard, _ = _guard(tmp_path)
    guard.check_loss(torch.tensor(1.5), 1)  # finite: nothing happens
    with pytest.raises(NonFiniteLoss, match=r"sft step 2: non-finite loss \(inf\) on rank 0; stopped before the "
                                            r"optimizer step.*Last good checkpoint: none"):
        guard.check_loss(torch.tensor(float("inf")), 2)


def test_guard_skip_is_taken_once_per_step_and_limited(tmp_path):
    import torch

    from dpo_dist.reliability.guard import NonFiniteLoss

    guard, said = _guard(tmp_path, on_nonfinite_loss="skip", max_nonfinite_skips=2)
    nan = torch.tensor(float("nan"))
    guard.check_loss(nan, 3)
    guard.check_loss(nan, 3)  # a second bad micro-batch of the same step
    assert guard.skipped_steps == [3] and len(said) == 1 and "skipping this step's update" in said[0]
    assert guard.take_skip() and not guard.take_skip()
    guard.check_loss(nan, 5)
    guard.end_step()  # fp16: the scaler skipped optimizer.step itself; the next good step must not be dropped
    assert not guard.take_skip()
    with pytest.raises(NonFiniteLoss, match=r"again after 2 skipped steps \(3, 5\).*train.max_nonfinite_skips"):
        guard.check_loss(nan, 7)


@pytest.mark.parametrize("bad", [None, 0, 3])
def test_guard_reads_the_host_and_asks_the_ranks_once_per_step(tmp_path, monkeypatch, bad):
    import torch

    from dpo_dist.reliability.guard import NonFiniteLoss

    asks = _count_asks(monkeypatch)
    guard, _ = _guard(tmp_path)
    losses = [torch.tensor(1.0 + i) for i in range(4)]  # the 4 micro-batches of one step; `bad` is NaN
    if bad is not None:
        losses[bad] = losses[bad] * math.nan
    with host_reads() as reads:
        for loss in losses[:3]:
            guard.note_loss(loss)
    assert reads == [] and asks == []  # nothing is read or agreed on before the step's last micro-batch
    guard.note_loss(losses[3])
    with host_reads() as reads:
        if bad is None:
            guard.check_step(1)
        else:
            with pytest.raises(NonFiniteLoss, match=r"sft step 1: non-finite loss \(nan\) on rank 0; stopped"):
                guard.check_step(1)
    assert asks == ["check_step"]
    if bad is None:
        assert len(reads) == 1  # one sync per step on the good path (with several ranks: after the all-reduce)
    guard.end_step(1)
    assert guard._losses == []


def test_guard_refuses_a_step_whose_check_never_ran(tmp_path):
    import torch

    guard, _ = _guard(tmp_path)
    guard.note_loss(torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="sft step 4: the non-finite loss check did not run before the optimizer"):
        guard.end_step(4)


def _advice(tmp_path, **kw) -> str:
    import torch

    from dpo_dist.reliability.guard import NonFiniteLoss

    guard, _ = _guard(tmp_path, **kw)
    with pytest.raises(NonFiniteLoss) as err:
        guard.check_loss(torch.tensor(float("nan")), 2)
    return str(err.value)


def test_nonfinite_advice_offers_bf16_only_where_the_gpu_has_it(tmp_path, monkeypatch):
    import dpo_dist.reliability.guard as reliability

    with_bf16 = _advice(tmp_path, fp16=True, bf16_available=True)  # an A100 or H100 training in fp16
    assert "fp16 overflow" in with_bf16 and "train in bf16 instead" in with_bf16 and "train.bf16: true" in with_bf16
    volta = _advice(tmp_path, fp16=True, bf16_available=False)  # a V100: no native bf16
    assert "bf16 instead" not in volta and "train.bf16" not in volta and "no native bf16, so stay in fp16" in volta
    for advice in ("lower train.learning_rate", "train.warmup_steps", "train.max_grad_norm > 0", "broken one",
                   "gradient scaler", "train.on_nonfinite_loss: skip"):
        assert advice in volta, advice
    fp32 = _advice(tmp_path, fp16=False)  # not fp16: no precision advice at all
    assert "bf16" not in fp32 and "fp16" not in fp32 and "lower train.learning_rate" in fp32
    deepspeed = _advice(tmp_path, fp16=True, bf16_available=False, skip_available=False)
    assert "set train.on_nonfinite_loss: skip" not in deepspeed and "not available under DeepSpeed" in deepspeed
    import torch

    if not torch.cuda.is_available():
        assert reliability.bf16_native() is False  # no GPU: nothing to switch to
    # unset: the GPU is asked, only when a message is written
    monkeypatch.setattr(reliability, "bf16_native", lambda: True)
    assert "train in bf16 instead" in _advice(tmp_path, fp16=True)
    monkeypatch.setattr(reliability, "bf16_native", lambda: False)
    assert "no native bf16" in _advice(tmp_path, fp16=True)


def test_nonfinite_weights_advice_follows_the_gpu_too(tmp_path):
    import torch

    from dpo_dist.reliability.guard import NonFiniteWeights

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    for bf16, expected, absent in ((True, "train in bf16 instead", "stay in fp16"),
                                   (False, "no native bf16, so stay in fp16", "bf16 instead")):
        guard, _ = _guard(tmp_path, fp16=True, bf16_available=bf16)
        with pytest.raises(NonFiniteWeights, match="trainable weights hold NaN/inf") as err:
            guard.check_weights(model, 2, "checkpoint-2")
        assert expected in str(err.value) and absent not in str(err.value)


def test_write_failures_are_recognised_and_others_are_not(tmp_path):
    import errno as errno_

    from torch.distributed.checkpoint.api import CheckpointException

    from dpo_dist.reliability.guard import is_write_failure

    torch_write = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: file write failed")
    assert is_write_failure(OSError(errno_.ENOSPC, "No space left on device"))
    assert is_write_failure(torch_write)
    assert is_write_failure(CheckpointException("save", {0: (torch_write, None)}))
    assert not is_write_failure(RuntimeError("CUDA out of memory"))
    guard, _ = _guard(tmp_path)
    msg = str(guard.save_failed(torch_write, 4, tmp_path / "staged"))
    assert "saving checkpoint-4 failed on rank 0: [enforce fail" in msg and "Free disk space" in msg


# ---- a crash while a checkpoint is being written ------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.distributed
def test_crash_while_saving_keeps_the_previous_checkpoint_and_resume_is_exact(tiny_base, data, tmp_path):
    recipe = sft_recipe(tmp_path, tiny_base, data)
    cmd = launch(recipe, "cpu-fsdp-2")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run([*cmd, f"output_dir={whole}"])
    proc = run([*cmd, f"output_dir={broken}"], env={"DPO_DIST_FAULT": "save-kill@4:1"}, expect=1)
    assert "SIGKILL while writing" in output(proc)
    sft = broken / "sft"
    assert checkpoints(sft) == ["checkpoint-2"]  # the partial checkpoint-4 never reached its final name
    assert (sft / "checkpoints" / STAGING / "checkpoint-4").is_dir()
    previous = sft / "checkpoints" / "checkpoint-2"
    assert (previous / COMPLETE).is_file()
    # the same files as the uninterrupted run's checkpoint-2 (FSDP writes sharded .distcp files, compared by size)
    same = whole / "sft" / "checkpoints" / "checkpoint-2"
    assert _files(previous) == _files(same)
    proc = run([*cmd, f"output_dir={broken}", "--resume"])
    assert "a partial checkpoint left by a save that never finished" in output(proc)
    assert f"resuming sft from {previous}" in output(proc)
    assert steps(sft) == [1, 2, 3, 4, 5, 6]
    assert checkpoints(sft) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not (sft / "checkpoints" / STAGING / "checkpoint-4").exists()
    for key in ("loss", "grad_norm"):
        assert rel_diff(losses(whole / "sft", key), losses(sft, key)) <= 1e-6, key
    assert weights_diff(whole / "sft" / "adapter", sft / "adapter") <= 1e-6


@pytest.mark.e2e
@pytest.mark.distributed
def test_full_disk_while_saving_is_one_clear_error(tiny_base, data, tmp_path):
    recipe = sft_recipe(tmp_path, tiny_base, data, save_total_limit=1)
    proc = run(launch(recipe, "cpu-ddp-2"), env={"DPO_DIST_FAULT": "save-enospc@4:0"}, expect=1)
    sft = tmp_path / "runs" / "sft"
    errors = error_lines(proc)
    assert errors, output(proc)[-3000:]
    msg = errors[0]
    assert "saving checkpoint-4 failed on rank 0: No space left on device (ENOSPC), writing" in msg
    assert "optimizer.pt.part" in msg and "GiB free" in msg and "Free disk space" in msg
    assert f"last good checkpoint: {sft / 'checkpoints' / 'checkpoint-2'}" in msg
    assert "then run again with --resume" in msg
    assert checkpoints(sft) == ["checkpoint-2"] and (sft / "checkpoints" / "checkpoint-2" / COMPLETE).is_file()
    assert not (sft / "adapter").exists()
    # the partial checkpoint stays in .staging (never resumed from) until the next start removes it
    proc = run(launch(recipe, "cpu-ddp-2") + ["--resume"])
    assert "a partial checkpoint left by a save that never finished" in output(proc)
    assert f"resuming sft from {sft / 'checkpoints' / 'checkpoint-2'}" in output(proc)
    assert steps(sft) == [1, 2, 3, 4, 5, 6] and checkpoints(sft) == ["checkpoint-6"]  # save_total_limit 1


# ---- non-finite loss and weights ----------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.distributed
def test_nan_loss_on_one_rank_stops_both_naming_step_and_last_good_checkpoint(tiny_base, data, tmp_path):
    recipe = sft_recipe(tmp_path, tiny_base, data)
    proc = run(launch(recipe, "cpu-ddp-2"), env={"DPO_DIST_FAULT": "nan-loss@3:1"}, expect=1)
    sft = tmp_path / "runs" / "sft"
    last_good = sft / "checkpoints" / "checkpoint-2"
    errors = error_lines(proc)
    # both ranks stop, each saying so (on failure: the whole output without progress bars, to see the other rank)
    assert len(errors) == 2, "\n".join(ln for ln in output(proc).splitlines() if "it/s]" not in ln)[-12000:]
    assert any("sft step 3: non-finite loss (nan) on rank 1" in e for e in errors)
    assert any("sft step 3: rank 0: another rank saw a non-finite loss; stopped before the optimizer step" in e
               for e in errors)
    assert all(f"Last good checkpoint: {last_good}" in e and "on_nonfinite_loss: skip" in e for e in errors)
    assert steps(sft) == [1, 2] and checkpoints(sft) == ["checkpoint-2"] and not (sft / "adapter").exists()
    assert all(t.isfinite().all() for t in load_file(last_good / "adapter_model.safetensors").values())


@pytest.mark.e2e
@pytest.mark.distributed
def test_nan_loss_skip_drops_that_update_on_both_ranks(tiny_base, data, tmp_path):
    recipe = sft_recipe(tmp_path, tiny_base, data, on_nonfinite_loss="skip", save_steps=100)
    proc = run(launch(recipe, "cpu-fsdp-2"), env={"DPO_DIST_FAULT": "nan-loss@3:1"})
    sft = tmp_path / "runs" / "sft"
    assert "sft step 3: rank 0: another rank saw a non-finite loss; skipping this step's update" in output(proc)
    summary = json.loads((sft / "summary.json").read_text())
    assert summary["nonfinite_skipped_steps"] == [3] and summary["global_step"] == 6
    adapter = load_file(sft / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.isfinite().all() for t in adapter.values())
    logged = [m for m in losses(sft) if not math.isnan(m)]
    assert len(logged) == 6  # every step logged a finite loss (the Trainer logs the running mean for step 3)


def _accumulating_run(tmp_path, tiny_base, data, monkeypatch, bad: int, **train):
    """One process, micro-batch 1 × accumulation 4, 3 steps; only micro-batch `bad` (1..4) of step 2 has a NaN loss.
    Returns (what it saw, the exception or None)."""
    from accelerate import Accelerator

    from dpo_dist.reliability.faults import Faults
    from dpo_dist.config.profiles import Profile
    from dpo_dist.config.recipe import load_recipe
    from dpo_dist.reliability.guard import GuardCallback
    from dpo_dist.training.run import run_recipe

    seen = {"asks": _count_asks(monkeypatch), "backwards": 0, "weights": {}, "model": None}
    micro_batches = Counter()

    def poison(self, loss, step):
        micro_batches[step] += 1
        return loss * math.nan if (step, micro_batches[step]) == (2, bad) else loss

    def backward(accelerator, loss, **kwargs):
        seen["backwards"] += 1
        return real_backward(accelerator, loss, **kwargs)

    def on_step_end(callback, args, state, control, model=None, **kwargs):
        seen["model"] = model
        seen["weights"][state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                              if p.requires_grad}
        return real_step_end(callback, args, state, control, model=model, **kwargs)

    real_backward, real_step_end = Accelerator.backward, GuardCallback.on_step_end
    monkeypatch.setattr(Faults, "poison_loss", poison)
    monkeypatch.setattr(Accelerator, "backward", backward)
    monkeypatch.setattr(GuardCallback, "on_step_end", on_step_end)
    recipe = load_recipe(sft_recipe(tmp_path, tiny_base, data, max_steps=3, save_steps=100, global_batch_size=4,
                                    **train))
    profile = Profile(name="test", device="cpu", micro_batch_size=1, precision="fp32", attn_implementation="sdpa")
    err = None
    try:
        (result,) = run_recipe(recipe, profile, log=lambda *_: None)
        seen["summary"] = result.summary
    except Exception as caught:  # noqa: BLE001 (the caller checks it)
        err = caught
    assert micro_batches[1] == 4 and micro_batches[2] >= bad  # accumulation 4, and the fault was injected
    return seen, err


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[n].equal(b[n]) for n in a)


@pytest.mark.e2e
@pytest.mark.parametrize("bad", [1, 4], ids=["first-micro-batch", "last-micro-batch"])
def test_nan_in_one_micro_batch_stops_before_the_update_with_one_check_per_step(tiny_base, data, tmp_path,
                                                                                monkeypatch, bad):
    from dpo_dist.reliability.guard import NonFiniteLoss

    seen, err = _accumulating_run(tmp_path, tiny_base, data, monkeypatch, bad)
    assert isinstance(err, NonFiniteLoss), err
    assert re.search(r"sft step 2: non-finite loss \(nan\) on rank 0; stopped before the optimizer step", str(err))
    assert "bf16" not in str(err) and "fp16" not in str(err)  # an fp32 run: no precision advice
    assert seen["asks"] == ["check_step"] * 2  # one per step (steps 1 and 2), not one per micro-batch
    # Decided before step 2's last backward (under DeepSpeed that backward applies the update), and nothing changed.
    assert 4 <= seen["backwards"] < 8
    assert list(seen["weights"]) == [1]
    current = {n: p.detach() for n, p in seen["model"].named_parameters() if p.requires_grad}
    assert _same(current, seen["weights"][1])


@pytest.mark.e2e
@pytest.mark.parametrize("bad", [1, 4], ids=["first-micro-batch", "last-micro-batch"])
def test_nan_in_one_micro_batch_skips_the_whole_step_with_one_check_per_step(tiny_base, data, tmp_path,
                                                                             monkeypatch, bad):
    seen, err = _accumulating_run(tmp_path, tiny_base, data, monkeypatch, bad, on_nonfinite_loss="skip")
    assert err is None, err
    assert seen["summary"]["nonfinite_skipped_steps"] == [2] and seen["summary"]["global_step"] == 3
    assert seen["asks"].count("check_step") == 3 and set(seen["asks"]) <= {"check_step", "check_weights"}
    weights = seen["weights"]
    assert _same(weights[2], weights[1])  # step 2's update (all 4 micro-batches of it) was dropped
    assert not _same(weights[3], weights[2])  # and step 3 trained
    assert all(t.isfinite().all() for t in weights[3].values())


@pytest.mark.e2e
def test_nan_weights_are_never_saved(tiny_base, data, tmp_path):
    recipe = sft_recipe(tmp_path, tiny_base, data)
    proc = run([sys.executable, "-m", "dpo_dist.train", recipe, "--profile", "cpu"],
               env={"DPO_DIST_FAULT": "nan-weights@2"}, expect=1)
    sft = tmp_path / "runs" / "sft"
    (msg,) = error_lines(proc)
    assert re.search(r"sft step 2: trainable weights hold NaN/inf \(\S+lora_\S+ on rank 0\); not saving "
                     r"checkpoint-2\. Last good checkpoint: none", msg), msg
    assert checkpoints(sft) == [] and not (sft / "checkpoints" / STAGING / "checkpoint-2").exists()
    assert not (sft / "adapter").exists()


# ---- a hung rank ---------------------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.distributed
def test_hung_rank_times_out_with_a_useful_message(tiny_base, data, tmp_path):
    profile = yaml.safe_load((LAUNCH_DIR / "cpu-ddp-2.yaml").read_text())
    profile["collective_timeout_s"] = 15
    path = tmp_path / "cpu-ddp-2-short-timeout.yaml"
    path.write_text(yaml.safe_dump(profile))
    recipe = sft_recipe(tmp_path, tiny_base, data, save_steps=100)
    started = time.time()
    proc = run(launch(recipe, str(path)), env={"DPO_DIST_FAULT": "hang@2:1"}, expect=1, timeout=300)
    took = time.time() - started
    hung_at = float(re.search(r"\[fault\] rank 1: hanging at the end of step 2 \(t=([\d.]+)\)", output(proc))[1])
    errors = error_lines(proc)
    assert any("rank 0: a collective operation did not finish within collective_timeout_s=15 s during sft step 3"
               in e and "another rank is hung or died" in e and "raise collective_timeout_s" in e
               for e in errors), output(proc)[-3000:]
    exit_after = time.time() - hung_at
    print(f"hung rank: job exited {exit_after:.1f} s after the hang (timeout 15 s), whole run {took:.1f} s")
    assert exit_after < 15 + 60
