"""`dpo-dist plot`: PNG training curves of one or several runs (the demo's own plots: tests/test_demo_and_cli.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpo_dist.config.schema import ConfigError
from dpo_dist.commands.plot import find_runs, moving_average, plot_runs

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(path, kind: str, steps: int = 12, scale: float = 1.0):
    path.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": scale * (2.0 - step / steps), "learning_rate": 1e-4 * (1 - step / steps),
               "tokens_per_s": 100.0 + step, "grad_norm": float("nan") if step == 3 else 1.0}
        if kind == "dpo":
            row.update({"rewards/accuracies": min(1.0, step / steps + 0.2), "rewards/margins": 0.1 * step,
                        "rewards/chosen": 0.05 * step, "rewards/rejected": -0.05 * step})
        rows.append(json.dumps(row))  # (a NaN grad_norm at step 3: non-finite values are not drawn)
    rows.append(json.dumps({"step": steps, "train_runtime": 12.0, "train_loss": 1.2}))  # the Trainer's final entry
    (path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    return path


def image_size(path):
    import matplotlib.image

    height, width = matplotlib.image.imread(str(path)).shape[:2]
    return width, height


def test_moving_average_is_a_trailing_mean_over_steps():
    assert moving_average([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([7], [4.0], 3) == [4.0]
    # logged every 5 steps: a 10-step window holds 2 points, a 5-step window only the point itself
    assert moving_average([5, 10, 15], [1.0, 3.0, 5.0], 10) == [1.0, 2.0, 4.0]
    assert moving_average([5, 10, 15], [1.0, 3.0, 5.0], 5) == [1.0, 3.0, 5.0]


def test_dpo_run_gets_every_panel_and_sft_only_its_own(tmp_path):
    dpo = write_run(tmp_path / "r" / "dpo", "dpo")
    drawn = plot_runs([dpo], smooth=0)
    assert drawn["out"] == dpo / "metrics.png" and drawn["out"].read_bytes()[:8] == PNG
    assert drawn["panels"] == ["Loss", "Preference accuracy", "Reward margin", "Rewards: chosen vs rejected",
                               "Learning rate", "Throughput"]
    assert set(drawn["series"]["Rewards: chosen vs rejected"]) == {"dpo chosen", "dpo rejected"}
    assert image_size(drawn["out"]) == (1716, 792)  # 3 x 2 panels at 110 dpi
    sft = write_run(tmp_path / "r" / "sft", "sft")
    drawn = plot_runs([sft], tmp_path / "sft.png")
    assert drawn["panels"] == ["Loss", "Learning rate", "Throughput"] and image_size(tmp_path / "sft.png") == (1716, 396)


def test_several_runs_are_overlaid_and_smoothed(tmp_path):
    a = write_run(tmp_path / "a" / "dpo", "dpo")
    b = write_run(tmp_path / "b" / "dpo", "dpo", scale=2.0)
    drawn = plot_runs([a, b], tmp_path / "cmp.png", smooth=4, title="a vs b")
    loss = drawn["series"]["Loss"]
    assert set(loss) == {"a/dpo", "b/dpo"}  # same stage names: the parent tells them apart
    steps = list(range(1, 13))
    raw = [2.0 - s / 12 for s in steps]
    assert loss["a/dpo"] == pytest.approx(moving_average(steps, raw, 4))
    assert loss["b/dpo"] == pytest.approx(moving_average(steps, [2 * v for v in raw], 4))
    assert loss["a/dpo"] != pytest.approx(raw)
    lr = drawn["series"]["Learning rate"]["a/dpo"]  # never smoothed
    assert lr == pytest.approx([1e-4 * (1 - s / 12) for s in steps])
    assert (tmp_path / "cmp.png").read_bytes()[:8] == PNG


def test_recipe_output_directory_expands_to_its_stages(tmp_path):
    write_run(tmp_path / "runs" / "sft", "sft")
    write_run(tmp_path / "runs" / "dpo", "dpo")
    assert sorted(p.name for p in find_runs([tmp_path / "runs"])) == ["dpo", "sft"]


def test_bad_input_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}: no metrics.jsonl"):
        plot_runs([tmp_path])
    run = tmp_path / "x"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss"\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2: invalid JSON"):
        plot_runs([run])
    (run / "metrics.jsonl").write_text('{"step": 1, "epoch": 0.1}\n')
    with pytest.raises(ConfigError, match="no plottable metrics"):
        plot_runs([run])


@pytest.mark.slow
def test_command_line(tmp_path):
    write_run(tmp_path / "runs" / "sft", "sft")
    write_run(tmp_path / "runs" / "dpo", "dpo")
    out = tmp_path / "both.png"
    proc = subprocess.run([sys.executable, "-m", "dpo_dist.cli", "plot", str(tmp_path / "runs"), "--out", str(out),
                           "--smooth", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: Loss, Preference accuracy" in proc.stdout and "for sft, dpo" in proc.stdout
    assert out.read_bytes()[:8] == PNG
    proc = subprocess.run([sys.executable, "-m", "dpo_dist.cli", "plot", str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr
