"""The main job (the demo) and the command line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_dist.demo import synth
from dpo_dist.demo.build import DATA_DIR


def test_bundled_demo_data_is_what_the_generator_writes(tmp_path):
    synth.write(tmp_path)
    for name in synth.generate():
        assert (tmp_path / name).read_text() == (DATA_DIR / name).read_text(), name


def test_demo_preference_is_checkable():
    assert synth.is_preferred("It is kind. It sleeps in the sun.")
    assert not synth.is_preferred("It is rude. It sleeps in the sun.")
    assert not synth.is_preferred("kind kind kind")
    rows = [json.loads(line) for line in (DATA_DIR / "dpo.jsonl").read_text().splitlines()]
    assert all(synth.is_preferred(r["chosen"]) and not synth.is_preferred(r["rejected"]) for r in rows)


@pytest.mark.e2e
def test_demo_dpo_beats_sft(demo_run):
    out, stdout = demo_run
    assert "held-out pref. acc." in stdout
    results = json.loads((out / "demo_results.json").read_text())["results"]
    sft, dpo = results["sft"], results["dpo"]
    assert dpo["preference_accuracy"] >= sft["preference_accuracy"] + 0.2
    assert dpo["generation_score"] >= sft["generation_score"] + 0.3
    for stage in ("pretrain", "sft", "dpo"):
        assert (out / stage / "metrics.jsonl").stat().st_size > 0
        assert (out / stage / "summary.json").is_file()
        assert (out / stage / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_demo_preference_kto_trains_on_the_unpaired_form_and_beats_sft(demo_run, tmp_path):
    # KTO after the finished DPO demo, as a user tries another method: --resume keeps its base, pretrain and SFT
    finished, _ = demo_run
    out = tmp_path / "demo"
    shutil.copytree(finished, out, ignore=lambda d, names: ["dpo"] if Path(d) == finished else [])
    kept = {s: (out / s / "summary.json").read_bytes() for s in ("pretrain", "sft")}
    proc = subprocess.run([sys.executable, "-m", "dpo_dist.cli", "demo", "--out", str(out), "--preference", "kto",
                           "--resume"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 1/3: pretrain finished earlier" in proc.stdout and "stage 2/3: sft finished earlier" in proc.stdout
    assert {s: (out / s / "summary.json").read_bytes() for s in ("pretrain", "sft")} == kept  # not retrained
    saved = json.loads((out / "demo_results.json").read_text())
    assert saved["method"] == "kto" and list(saved["results"]) == ["base", "sft", "kto"]
    assert saved["results"]["kto"]["preference_accuracy"] >= saved["results"]["sft"]["preference_accuracy"] + 0.2
    rows = [json.loads(line) for line in (out / "kto.jsonl").read_text().splitlines()]
    pairs = (DATA_DIR / "dpo.jsonl").read_text().splitlines()
    assert len(rows) == 2 * len(pairs) and sum(r["label"] for r in rows) == len(pairs)
    assert [ln.split()[0] for ln in proc.stdout.splitlines() if ln.startswith(("base ", "sft ", "kto "))] == [
        "base", "sft", "kto"]
    assert json.loads((out / "kto" / "summary.json").read_text())["stage"] == "kto"


@pytest.mark.slow
def test_demo_refuses_an_unknown_preference_method_before_building_anything(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path / "d"), "--preference", "kto-pair")
    assert proc.returncode == 2 and "--preference kto-pair: not a method; choose one of dpo, kto, orpo, cpo, sigmoid" \
        in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "d" / "base").exists()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dpo_dist.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_train_refuses_a_bad_recipe_before_loading_anything(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nmodel: {name_or_path: nowhere}\nstages:\n  - stage: sft\n    data: {train: a.jsonl}\n"
                      "    train: {learning_rat: 1.0e-4}\n")
    proc = run_cli("train", str(recipe))
    assert proc.returncode == 2
    assert "stages[0].train.learning_rat: unknown key; did you mean 'stages[0].train.learning_rate'" in proc.stderr
    proc = run_cli("train", str(recipe), "--profile", "cpu", "stages.0.train={fp16: true, bf16: true}")
    assert proc.returncode == 2 and "fp16 and bf16" in proc.stderr
    proc = run_cli("train", str(recipe), "stages.0.train={}", "stages.0.data.format=fierfly")
    assert proc.returncode == 2 and "stages[0].data.format: 'fierfly'" in proc.stderr and "'firefly'" in proc.stderr


def test_templates_command_lists_the_registry():
    proc = run_cli("templates")
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    for name in ("qwen", "chatml", "llama2", "llama3", "mistral", "mixtral", "gemma", "phi3", "yi", "deepseek",
                 "minicpm", "zephyr", "vicuna", "baichuan2", "internlm2", "default"):
        assert name in names


def test_every_subcommand_is_in_the_help_and_the_readme():
    # One command table (dpo_dist.cli): what it registers is what --help lists and what the README documents.
    from dpo_dist.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = set(sub.choices)
    assert {"train", "launch", "plan", "merge", "chat", "generate", "eval", "plot", "import-firefly",
            "validate", "parity", "slurm", "demo"} <= commands
    help_text = run_cli("--help").stdout
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in sorted(commands):
        assert name in help_text, name
        assert f"dpo-dist {name}" in readme, f"README.md never shows `dpo-dist {name}`"
