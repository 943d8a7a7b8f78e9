"""`dpo-dist parity`'s comparison on runs written here (no training): tied copies, names that differ, missing
runs, the horizon and the final-loss judgement. The launched proof is tests/test_distributed.py's demo parity."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dpo_dist.launch.parity import (FINAL_WINDOW, FP32_TOLERANCE, ParityError, compare, format_report, weights_diff)


def write_weights(d: Path, tensors: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
    return d


def write_stage(root: Path, profile: str, stage: str, losses: list[float], weights: dict | None) -> None:
    d = root / profile / stage
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"step": i + 1, "loss": v, "grad_norm": 1.0} for i, v in enumerate(losses)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if weights is not None:
        write_weights(d / "model", weights)


def test_a_tied_copy_is_compared_as_the_tensor_it_is_tied_to(tmp_path):
    torch.manual_seed(0)
    embed, norm = torch.randn(16, 4), torch.ones(4)
    single = write_weights(tmp_path / "single", {"embed.weight": embed, "norm.weight": norm})
    moved = embed + 1e-3
    sharded = write_weights(tmp_path / "sharded", {"embed.weight": moved, "lm_head.weight": moved.clone(),
                                                   "norm.weight": norm})
    expected = (moved - embed).norm().item() / embed.norm().item()
    assert weights_diff(single, sharded) == pytest.approx(expected, rel=1e-6)
    assert weights_diff(sharded, single) == pytest.approx((embed - moved).norm().item() / moved.norm().item(), rel=1e-6)
    # an extra tensor that is not a copy of another is a real difference, said in one line
    other = write_weights(tmp_path / "other", {"embed.weight": moved, "lm_head.weight": torch.randn(16, 4),
                                               "norm.weight": norm})
    with pytest.raises(ParityError, match=r"only in the reference none, only here \['lm_head.weight'\]") as err:
        weights_diff(single, other)
    assert "\n" not in str(err.value)
    with pytest.raises(ParityError, match="no .safetensors weights"):
        weights_diff(single, tmp_path)


def test_runs_that_cannot_be_compared_fail_in_the_report_not_with_a_traceback(tmp_path):
    w = {"a": torch.ones(3)}
    write_stage(tmp_path, "cpu", "sft", [2.0, 1.5, 1.0], w)
    write_stage(tmp_path, "cpu-ddp-2", "sft", [2.0, 1.5, 1.0], {"b": torch.ones(3)})  # other names
    write_stage(tmp_path, "cpu-fsdp-2", "sft", [2.0, 1.5], w)  # a step short
    # cpu-zero3-2 never wrote anything
    profiles = ["cpu", "cpu-ddp-2", "cpu-fsdp-2", "cpu-zero3-2"]
    results = compare(tmp_path, profiles, ["sft"])
    report, ok = format_report(results, profiles, FP32_TOLERANCE)
    assert not ok and report.endswith("PARITY FAILED")
    diffs = results[0].diffs
    assert diffs["cpu-ddp-2"]["loss"] == 0 and diffs["cpu-ddp-2"]["weights"] == math.inf
    assert diffs["cpu-fsdp-2"]["loss"] == math.inf and diffs["cpu-zero3-2"]["loss"] == math.inf
    assert "cpu-ddp-2: " in report and "tensor names differ" in report
    assert "cpu-fsdp-2: " in report and "logged steps [1, 2]… differ from the reference's [1, 2, 3]…" in report
    assert "cpu-zero3-2: " in report and "no metrics.jsonl" in report


def test_beyond_the_horizon_only_the_final_mean_loss_is_judged(tmp_path):
    n = 40
    ref = [5.0 - 0.1 * i for i in range(n)]
    # agrees per step for 10 steps, then wanders (as reduction-order drift does) but ends at the same mean
    drifted = [v + (0.0 if i < 10 else 0.05 * (-1) ** i) for i, v in enumerate(ref)]
    write_stage(tmp_path, "cpu", "pretrain", ref, {"w": torch.ones(4)})
    write_stage(tmp_path, "cpu-ddp-2", "pretrain", drifted, {"w": torch.full((4,), 1.5)})  # weights far apart
    profiles = ["cpu", "cpu-ddp-2"]

    results = compare(tmp_path, profiles, ["pretrain"], horizon=10)
    report, ok = format_report(results, profiles, FP32_TOLERANCE)
    diffs = results[0].diffs["cpu-ddp-2"]
    assert ok, report
    assert diffs["loss"] == 0 and diffs["final loss"] < 1e-3 and diffs["weights"] == pytest.approx(0.5)
    assert "per step over steps 1–10 (the horizon), then by the mean loss of steps 31–40" in report
    assert f"mean loss of the last {FINAL_WINDOW} steps 0.02" in report
    assert "5.00e-01 info" in report  # the weights are shown, not judged

    # a horizon past the divergence judges it per step
    results = compare(tmp_path, profiles, ["pretrain"], horizon=20)
    report, ok = format_report(results, profiles, FP32_TOLERANCE)
    assert not ok and "FAIL" in report.split("\nloss")[1].splitlines()[0]

    # a stage no longer than the horizon is judged per step and by its weights
    results = compare(tmp_path, profiles, ["pretrain"], horizon=n)
    assert "final loss" not in results[0].diffs["cpu-ddp-2"]
    assert not format_report(results, profiles, FP32_TOLERANCE)[1]

    # a final mean loss 5% off fails beyond the horizon
    write_stage(tmp_path, "cpu-ddp-2", "pretrain", ref[:10] + [v * 1.05 for v in ref[10:]], {"w": torch.ones(4)})
    results = compare(tmp_path, profiles, ["pretrain"], horizon=10)
    report, ok = format_report(results, profiles, FP32_TOLERANCE)
    assert not ok and results[0].diffs["cpu-ddp-2"]["final loss"] == pytest.approx(0.05)


def test_chained_runs_are_reported_apart_and_not_judged(tmp_path):
    w = {"w": torch.ones(4)}
    write_stage(tmp_path, "cpu", "dpo", [0.7, 0.6, 0.5], w)
    write_stage(tmp_path, "cpu-ddp-2", "dpo", [0.7, 0.6, 0.5], w)
    write_stage(tmp_path / "chained", "cpu-ddp-2", "dpo", [0.8, 0.7, 0.6], {"w": torch.full((4,), 2.0)})
    results = compare(tmp_path, ["cpu", "cpu-ddp-2"], ["dpo"], chained=True)
    report, ok = format_report(results, ["cpu", "cpu-ddp-2"], FP32_TOLERANCE)
    assert ok, report  # the isolated run agrees; the chained one is far off, and only shown
    chained = results[0].chained["cpu-ddp-2"]
    assert chained["final loss"] == pytest.approx(0.1 / 0.6)  # means 0.6 and 0.7
    assert chained["weights"] == pytest.approx(1.0)
    assert "chained: each profile from its own previous stage (for information, not judged)" in report


def test_the_drift_twin_halves_the_reference_micro_batch(tmp_path):
    import yaml

    from dpo_dist.config.profiles import load_profile
    from dpo_dist.config.schema import ConfigError
    from dpo_dist.launch.parity import reordered_profile

    twin = load_profile(reordered_profile("cpu-zero3-2", tmp_path))
    ref = load_profile("cpu-zero3-2")
    assert (twin.micro_batch_size, twin.world_size, twin.launcher) == (1, ref.world_size, ref.launcher)
    assert Path(twin.deepspeed_config).is_absolute() and twin.path_of("deepspeed_config").is_file()
    odd = tmp_path / "odd.yaml"
    odd.write_text(yaml.safe_dump({**yaml.safe_load(Path(load_profile("cpu").source).read_text()),
                                   "micro_batch_size": 3}))
    with pytest.raises(ConfigError, match="--drift: .* has micro_batch_size 3, which cannot be halved"):
        reordered_profile(str(odd), tmp_path)
