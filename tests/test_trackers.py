"""Experiment trackers, for real and offline, under a launched profile (cpu-fsdp-2, two ranks): a tiny SFT → DPO
run (and the same SFT without answers during training) reports to MLflow (a local SQLite store) and to W&B (offline
mode). Each library's own reader reads the stored runs back: MLflow's client, and `wandb leet inspect --json`, W&B's
reader of its run files. One run per stage, from rank 0 only; each step's loss and rewards; the resolved recipe and
profile; the answers during training as a table. The run also shows that the answers leave the numbers unchanged
under FSDP2 (answers under the cpu profile: tests/test_samples.py)."""
from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from dpo_dist.training.common import read_metrics
from tests.helpers import BIN, free_port, read_samples, run, sampling_recipe, training_numbers, untied_base

STAGES = ("sft", "plain", "dpo")


@pytest.fixture(scope="module")
def tracked(tiny_base, tmp_path_factory):
    """The launched run: (its stage run directories, the MLflow tracking URI, the W&B directory)."""
    tmp = tmp_path_factory.mktemp("tracked")
    base = untied_base(tiny_base, tmp / "base")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(sampling_recipe(base, tmp, sample={"sample_every": 2, "sample_max_new_tokens": 8},
                                                     report_to=["mlflow", "wandb"])))
    import mlflow

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    # The artifacts' default place is ./mlruns under the working directory: the experiment keeps them in tmp.
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("tracked", artifact_location=(tmp / "artifacts").as_uri())
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "tracked", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_PROJECT": "tracked",
           "WANDB_SILENT": "true", "DPO_DIST_CACHE": str(tmp / "cache")}
    run([BIN / "dpo-dist", "launch", recipe, "--profile", "cpu-fsdp-2", "--master-port", free_port()], env=env)
    return {name: tmp / "runs" / name for name in STAGES}, uri, tmp / "wandb"


def metric_keys(stage: str) -> tuple[str, ...]:
    return ("loss", "rewards/accuracies", "rewards/margins") if stage == "dpo" else ("loss",)


@pytest.mark.e2e
@pytest.mark.distributed
def test_answers_during_training_leave_fsdp_numbers_unchanged_and_come_from_rank_0_once(tracked):
    runs, _, _ = tracked
    assert training_numbers(runs["sft"]) == training_numbers(runs["plain"])
    assert not (runs["plain"] / "samples.jsonl").exists()
    for stage in ("sft", "dpo"):
        rows = read_samples(runs[stage])
        assert [(r["step"], r["prompt"]) for r in rows] == [
            (s, p) for s in (2, 4) for p in ("Describe the owl 3.", "Describe a cat.")], stage
        assert any(r["response"] for r in rows), stage


@pytest.mark.e2e
@pytest.mark.distributed
def test_mlflow_holds_each_stages_steps_config_and_answers_read_back_through_its_client(tracked):
    import mlflow

    runs, uri, _ = tracked
    client = mlflow.MlflowClient(tracking_uri=uri)
    stored = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert {client.get_experiment(r.info.experiment_id).name for r in stored} == {"tracked"}
    assert sorted(r.info.run_name for r in stored) == sorted(f"tracked/{s}" for s in STAGES)  # rank 1 is silent
    for run_info in stored:
        stage = run_info.info.run_name.split("/")[1]
        logged = [m for m in read_metrics(runs[stage]) if "loss" in m]
        for key in metric_keys(stage):
            history = sorted(client.get_metric_history(run_info.info.run_id, key), key=lambda m: m.step)
            assert [m.step for m in history] == [1, 2, 3, 4], (stage, key)
            assert [m.value for m in history] == pytest.approx([m[key] for m in logged], rel=1e-6), (stage, key)
        path = client.download_artifacts(run_info.info.run_id, "dpo_dist_config.json", str(runs[stage].parent))
        config = json.loads(open(path).read())
        assert (config["recipe"]["name"], config["stage"], config["profile"]["name"], config["backend"]) == \
            ("tracked", stage, "cpu-fsdp-2", "fsdp")
        if stage != "plain":  # the answers: one table, appended to at each sampling step
            path = client.download_artifacts(run_info.info.run_id, "samples.json", str(runs[stage].parent))
            table = json.loads(open(path).read())
            assert table["columns"] == ["step", "prompt", "response"], table["columns"]
            assert table["data"] == [[r["step"], r["prompt"], r["response"]] for r in read_samples(runs[stage])]


def wandb_records(run_dir) -> list[dict]:
    proc = subprocess.run([BIN / "wandb", "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.e2e
@pytest.mark.distributed
def test_wandb_offline_holds_each_stages_steps_config_and_answers_read_back_through_its_reader(tracked):
    runs, _, wandb_dir = tracked
    stored = {}
    for run_dir in sorted(wandb_dir.glob("offline-run-*")):
        records = wandb_records(run_dir)
        (header,) = [r["run"] for r in records if r.get("type") == "run"]
        config = {}
        for update in [header["config"]] + [r["config"] for r in records if r.get("type") == "config"]:
            config.update(update["update"])
        stored[header["display_name"]] = (run_dir, config, [r["history"]["item"] for r in records
                                                            if r.get("type") == "history"])
    assert sorted(stored) == sorted(f"tracked/{s}" for s in STAGES)  # one run per stage; rank 1 is silent
    for name, (run_dir, config, history) in stored.items():
        stage = name.split("/")[1]
        logged = [m for m in read_metrics(runs[stage]) if "loss" in m]
        steps = [h for h in history if "train/loss" in h]
        assert [h["train/global_step"] for h in steps] == [1, 2, 3, 4], stage
        for key in metric_keys(stage):
            assert [h[f"train/{key}"] for h in steps] == pytest.approx([m[key] for m in logged], rel=1e-6), (stage,
                                                                                                              key)
        assert (config["dpo_dist"]["stage"], config["dpo_dist"]["profile"]["name"]) == (stage, "cpu-fsdp-2")
        tables = [h for h in history if h.get("samples._type") == "table-file"]
        if stage == "plain":
            assert tables == []
            continue
        assert [h["train/global_step"] for h in tables] == [2, 4], stage
        shown = [row for t in tables for row in json.loads((run_dir / "files" / t["samples.path"]).read_text())["data"]]
        assert shown == [[r["step"], r["prompt"], r["response"]] for r in read_samples(runs[stage])], stage
