"""One preflight for every command (dpo_dist.config.preflight): each subcommand that takes a recipe or a model
refuses a missing model directory, a missing data file and an unknown key with the same one-line error, exit 2, and
no traceback, before any work."""
from __future__ import annotations

import pytest
import yaml

from dpo_dist import cli

RECIPE_COMMANDS = {  # how each command is given the recipe R (and whatever else it requires)
    "train": ["train", "{R}", "--profile", "cpu"],
    "launch": ["launch", "{R}", "--profile", "cpu"],
    "parity": ["parity", "{R}", "--profiles", "cpu,cpu-bf16", "--out", "{T}/parity"],
    "slurm": ["slurm", "{R}", "--profile", "cpu-ddp-2", "--log-dir", "{T}/slurm-logs"],
    "validate": ["validate", "{R}"],
    "prepare": ["prepare", "{R}"],
    "plan": ["plan", "--recipe", "{R}"],
}
MODEL_COMMANDS = {  # M: the model; D: a data file
    "merge": ["merge", "--base", "{M}", "--adapter", "{T}", "--out", "{T}/merged"],
    "eval": ["eval", "{M}", "--data", "{D}"],
    "chat": ["chat", "{M}"],
    "generate": ["generate", "{M}", "--prompts", "{D}", "--out", "{T}/answers.jsonl"],
}
FAULTS = {  # fault: (what the recipe gets, what the one error line must name)
    "missing model directory": ({"model": "{T}/no-such-model"}, ["model.name_or_path", "no-such-model does not exist"]),
    "missing data file": ({"data": "{T}/no-such-data.jsonl"}, ["stages.sft.data.train", "no-such-data.jsonl"]),
    "unknown key": ({"extra": {"learning_rat": 1e-4}}, ["learning_rat"]),
}


def _model_dir(tmp_path):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    return model


def _data(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"conversation": [{"human": "hi", "assistant": "hello"}]}\n')
    return data


def _recipe(tmp_path, model=None, data=None, extra=None):
    train = {"learning_rate": 1e-4, "global_batch_size": 2, **(extra or {})}
    recipe = {"name": "t", "model": {"name_or_path": model or str(_model_dir(tmp_path))},
              "method": {"type": "lora"},
              "stages": [{"stage": "sft", "data": {"train": data or str(_data(tmp_path)), "format": "firefly"},
                          "max_length": 32, "train": train}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _fill(args, **values):
    return [a.format(**values) for a in args]


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("command", list(RECIPE_COMMANDS))
def test_every_recipe_command_refuses_bad_input_in_one_line(command, fault, tmp_path, capsys, monkeypatch):
    if command == "plan" and fault == "missing data file":
        pytest.skip("plan reads no data: a run is planned before its data exists (the shipped recipes' data is "
                    "the user's)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    change, expected = FAULTS[fault]
    change = {k: (v.format(T=tmp_path) if isinstance(v, str) else v) for k, v in change.items()}
    recipe = _recipe(tmp_path, **change)
    code, out, err = _run(_fill(RECIPE_COMMANDS[command], R=recipe, T=tmp_path), capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1, err
    for part in expected:
        assert part in lines[0], lines[0]
    assert not (tmp_path / "parity").exists() and not (tmp_path / "slurm-logs").exists()  # refused before any work


@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
def test_every_model_command_refuses_a_missing_model_directory_in_one_line(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-model"
    code, out, err = _run(_fill(MODEL_COMMANDS[command], M=missing, D=_data(tmp_path), T=tmp_path), capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1 and f"{missing} does not exist" in lines[0], err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "answers.jsonl").exists()


def test_an_uncached_hub_name_offline_is_refused_at_once(tmp_path, capsys, monkeypatch):
    """The issue's case: a name that looks like a hub id, neither local nor cached, on a machine that cannot reach
    the hub; before, this spent a minute on retries and ended in an OSError traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    recipe = _recipe(tmp_path, model="demo-out/base")
    code, out, err = _run(["parity", str(recipe), "--profiles", "cpu,cpu-bf16", "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "Traceback" not in err
    assert ("error: model.name_or_path: demo-out/base is not a local directory nor in the Hugging Face cache, and "
            "http://127.0.0.1:9 is unreachable") in err


def test_library_warnings_stay_off_the_console_unless_verbose(tmp_path):
    """A library's warning (as transformers warns about gradient_checkpointing) is hidden by default, and shown with
    --verbose; dpo-dist's own output is untouched either way."""
    import subprocess
    import sys

    code = ("import sys, warnings; from dpo_dist import cli; import dpo_dist.commands.profiles as p\n"
            "orig = p._templates\n"
            "def noisy(args):\n"
            "    warnings.warn_explicit('use_reentrant is deprecated', FutureWarning, 'x.py', 1, "
            "module='transformers.modeling_utils')\n"
            "    return orig(args)\n"
            "p._templates = noisy\n"
            "import argparse\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    quiet = subprocess.run([sys.executable, "-c", code, "templates"], capture_output=True, text=True, cwd=tmp_path)
    loud = subprocess.run([sys.executable, "-c", code, "--verbose", "templates"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "qwen" in quiet.stdout and quiet.stdout == loud.stdout
    assert "use_reentrant" not in quiet.stderr
    assert "use_reentrant is deprecated" in loud.stderr


def test_a_directory_without_config_json_is_not_a_model(tmp_path):
    from dpo_dist.config.preflight import check_model
    from dpo_dist.config.schema import ConfigError

    (tmp_path / "weights").mkdir()
    with pytest.raises(ConfigError, match=r"^--base: .*weights is a directory without config.json"):
        check_model(str(tmp_path / "weights"), "--base")
    (tmp_path / "weights" / "config.json").write_text("{}")
    check_model(str(tmp_path / "weights"), "--base")
