"""Experiment trackers, for real and offline: a tiny SFT → DPO run reports to MLflow (a local SQLite store), and the
stored runs are read back through MLflow's own client."""
from __future__ import annotations

import json

import pytest

from dpo_dist.config.profiles import Profile
from dpo_dist.config.recipe import recipe_from_dict
from dpo_dist.training.common import read_metrics
from tests.helpers import write_jsonl

PAIRS = [{"prompt": f"Describe the owl {i}.", "chosen": "It is calm and kind.", "rejected": "It is rude."}
         for i in range(16)]


@pytest.mark.e2e
def test_mlflow_holds_each_stages_steps_and_config_read_back_through_its_client(tiny_base, tmp_path, monkeypatch):
    import mlflow  # make install installs the mlflow extra

    from dpo_dist.training.run import run_recipe

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"conversation": [{"human": p["prompt"], "assistant": p["chosen"]}]}
                                               for p in PAIRS])
    recipe = recipe_from_dict({
        "name": "tracked", "model": {"name_or_path": str(tiny_base), "template": "qwen"}, "chain": True,
        "method": {"type": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {"learning_rate": 1e-2, "global_batch_size": 4, "max_steps": 3, "logging_steps": 1,
                  "save_steps": 100, "lr_scheduler": "constant", "report_to": ["mlflow"]},
        "output_dir": str(tmp_path / "runs"),
        "stages": [{"stage": "sft", "data": {"train": str(sft)}, "max_length": 48},
                   {"stage": "dpo", "data": {"train": str(write_jsonl(tmp_path / "dpo.jsonl", PAIRS))},
                    "max_length": 48, "max_prompt_length": 32}]})
    profile = Profile(name="test", micro_batch_size=2, precision="fp32", attn_implementation="sdpa")
    results = run_recipe(recipe, profile, log=lambda *_: None)

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    assert set(runs) == {"tracked/sft", "tracked/dpo"}, set(runs)
    for result in results:
        run = runs[f"tracked/{result.name}"]
        logged = [m for m in read_metrics(result.run_dir) if "loss" in m]
        keys = ("loss", "rewards/accuracies", "rewards/margins") if result.name == "dpo" else ("loss",)
        for key in keys:
            history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            assert [m.step for m in history] == [1, 2, 3], (result.name, key)
            assert [m.value for m in history] == pytest.approx([m[key] for m in logged], rel=1e-6), (result.name, key)
        config = json.loads(open(client.download_artifacts(run.info.run_id, "dpo_dist_config.json",
                                                           str(tmp_path / result.name))).read())
        assert (config["recipe"]["name"], config["stage"], config["profile"]["name"]) == \
            ("tracked", result.name, "test")
