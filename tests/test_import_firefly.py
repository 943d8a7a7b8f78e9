"""`dpo-dist import-firefly`: a Firefly train_args JSON becomes a recipe (+ a launch profile when no shipped one fits),
and every input key is either carried over or noted with a reason. No model is loaded."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from dpo_dist.profiles import load_profile
from dpo_dist.recipe import load_recipe
from dpo_dist.schema import ConfigError
from dpo_dist.tools.firefly_import import add_parser, convert, read_train_args, run

DATA = Path(__file__).resolve().parent / "data" / "firefly"

# file -> (world_size, expected values after the round trip through the written files)
CASES = {
    "pretrain-full": (1, dict(stage="pretrain", method="full", max_length=1024, max_prompt_length=None, beta=None,
                              lr=1e-5, global_batch=16, epochs=2, template=None, precision="fp16", micro=2,
                              profile=None, optim="adamw_torch", scheduler="cosine", seed=7)),
    "sft-full": (1, dict(stage="sft", method="full", max_length=2048, max_prompt_length=None, beta=None, lr=2e-5,
                         global_batch=32, epochs=3, template="qwen", precision="bf16", micro=4, profile="1gpu-bf16",
                         optim="adamw_torch", scheduler="cosine", seed=42)),
    "sft-lora": (1, dict(stage="sft", method="lora", max_length=1536, max_prompt_length=None, beta=None, lr=1e-4,
                         global_batch=32, epochs=1, template="llama3", precision="fp16", micro=1, profile="v100-qlora",
                         optim="paged_adamw_32bit", scheduler="linear", seed=1, lora=(16, 32, 0.1))),
    "sft-qlora": (1, dict(stage="sft", method="qlora", max_length=1024, max_prompt_length=None, beta=None, lr=2e-4,
                          global_batch=16, epochs=1, template="qwen", precision="fp16", micro=1, profile="v100-qlora",
                          optim="paged_adamw_32bit", scheduler="constant_with_warmup", seed=42, lora=(64, 16, 0.05))),
    "dpo-full": (8, dict(stage="dpo", method="full", max_length=2048, max_prompt_length=1024, beta=0.2, lr=5e-7,
                         global_batch=16, epochs=1, template="qwen", precision="bf16", micro=1, profile="8xh100-zero3",
                         optim="adamw_torch", scheduler="cosine", seed=42)),
    "dpo-lora": (8, dict(stage="dpo", method="lora", max_length=1600, max_prompt_length=500, beta=0.1, lr=5e-5,
                         global_batch=64, epochs=2, template="qwen", precision="bf16", micro=2,
                         profile="8gpu-ddp-qlora", optim="paged_adamw_32bit", scheduler="constant_with_warmup", seed=3,
                         lora=(32, 64, 0.05))),
    "dpo-qlora": (1, dict(stage="dpo", method="qlora", max_length=1024, max_prompt_length=300, beta=0.1, lr=2e-4,
                          global_batch=16, epochs=1, template="qwen", precision="fp16", micro=1, profile="v100-qlora",
                          optim="paged_adamw_32bit", scheduler="constant_with_warmup", seed=42, lora=(64, 16, 0.05))),
}


def _args(path, out, **kw) -> argparse.Namespace:
    return argparse.Namespace(train_args=str(path), out=str(out), name=kw.get("name"),
                              world_size=kw.get("world_size", 1), force=kw.get("force", False))


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _noted_keys(notes: list[str]) -> set[str]:
    return {n.split(":", 1)[0] for n in notes}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip(case, tmp_path, capsys):
    world_size, want = CASES[case]
    src = DATA / f"{case}.json"
    assert run(_args(src, tmp_path, world_size=world_size)) == 0
    printed = capsys.readouterr().out

    name = f"tiny-{case}"  # from output_dir
    recipe_path = tmp_path / f"{name}.yaml"
    assert recipe_path.read_text().startswith(f"# Converted from a Firefly train_args JSON: {src}")
    recipe = load_recipe(recipe_path)
    profile_file = tmp_path / f"{name}-profile.yaml"
    if want["profile"] is None:
        assert profile_file.is_file()
        profile = load_profile(str(profile_file))
        assert (profile.launcher, profile.num_processes) == ("python", 1)
        profile_arg = str(profile_file)
    else:
        assert not profile_file.exists()
        profile = load_profile(want["profile"])
        profile_arg = want["profile"]
        assert profile.world_size == world_size
    assert f"--profile {profile_arg}" in printed

    stage = recipe.stages[0]
    t = stage.train
    assert recipe.name == name and recipe.output_dir == f"output/{name}" and recipe.seed == want["seed"]
    assert recipe.model.name_or_path.startswith("org/tiny-")
    assert recipe.model.template == want["template"]
    assert stage.stage == want["stage"]
    assert stage.data.format == "auto" and stage.data.train.startswith("./data/")
    assert recipe.method_of(stage).type == want["method"]
    assert stage.max_length == want["max_length"]
    assert stage.max_prompt_length == want["max_prompt_length"]
    if want["beta"] is not None:
        assert stage.beta == pytest.approx(want["beta"]) and stage.loss_type == "sigmoid"
    assert t.learning_rate == pytest.approx(want["lr"])
    assert t.global_batch_size == want["global_batch"]
    assert t.num_epochs == want["epochs"]
    assert t.optim == want["optim"] and t.lr_scheduler == want["scheduler"]
    assert t.precision == want["precision"]
    assert (profile.precision or t.precision) == want["precision"]
    assert profile.micro_batch_size == want["micro"]
    if "lora" in want:
        m = recipe.method
        assert (m.lora_r, m.lora_alpha, m.lora_dropout) == want["lora"] and m.target_modules is None
    # The global batch is per-device batch × accumulation × world size, and the profile divides it.
    data = _load(src)
    assert t.global_batch_size == (data["per_device_train_batch_size"] * data["gradient_accumulation_steps"]
                                   * world_size)
    for key in ("max_grad_norm", "weight_decay"):
        assert getattr(t, key) == pytest.approx(data[key])
    for key in ("logging_steps", "save_steps", "gradient_checkpointing"):
        assert getattr(t, key) == data[key]

    # Every note is printed, one per line.
    conv = convert(data, source=str(src), world_size=world_size)
    for note in conv.notes:
        assert f"  {note}\n" in printed


@pytest.mark.parametrize("case", sorted(CASES))
def test_written_files_pass_launch_preflight(case, tmp_path):
    """The launcher's own pre-flight checks accept the written recipe + profile (method, precision, batch split)."""
    from dpo_dist.launch import preflight

    world_size, want = CASES[case]
    run(_args(DATA / f"{case}.json", tmp_path, world_size=world_size))
    name = f"tiny-{case}"
    profile_arg = want["profile"] or str(tmp_path / f"{name}-profile.yaml")
    profile = load_profile(profile_arg)
    preflight(str(tmp_path / f"{name}.yaml"), profile, [], profile.num_nodes, sources=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_key_carried_or_noted(case):
    world_size, _ = CASES[case]
    data = _load(DATA / f"{case}.json")
    data["my_custom_flag"] = 3
    conv = convert(data, source=f"{case}.json", world_size=world_size)
    noted = _noted_keys(conv.notes)
    missing = [key for key in data if key not in conv.carried and key not in noted]
    assert not missing, f"silently dropped: {missing}"
    assert any(n.startswith("my_custom_flag: 3: ") and "unknown key" in n for n in conv.notes)
    assert set(conv.carried) <= set(data)
    for note in conv.notes:
        assert "\n" not in note


def test_carried_targets():
    conv = convert(_load(DATA / "dpo-qlora.json"), source="dpo-qlora.json")
    c = conv.carried
    assert c["task_type"] == "stages[0].stage" and c["train_mode"] == "method.type"
    assert c["template_name"] == "model.template" and c["train_file"] == "stages[0].data.train"
    assert c["max_seq_length"] == "stages[0].max_length" and c["beta"] == "stages[0].beta"
    assert c["max_prompt_length"] == "stages[0].max_prompt_length"
    assert c["lora_rank"] == "method.lora_r" and c["num_train_epochs"] == "stages[0].train.num_epochs"
    assert "profile.micro_batch_size" in c["per_device_train_batch_size"]
    assert "stages[0].train.global_batch_size" in c["gradient_accumulation_steps"]
    assert "profile.precision" in c["fp16"]
    assert c["seed"] == "seed" and c["output_dir"] == "output_dir"


def test_unsloth_deepspeed_report_to_noted_with_reasons():
    data = _load(DATA / "pretrain-full.json") | {"use_unsloth": True}
    conv = convert(data, source="pretrain-full.json")
    notes = {n.split(":", 1)[0]: n for n in conv.notes}
    assert notes["use_unsloth"].startswith("use_unsloth: true: not carried over: dpo-dist does not use Unsloth")
    assert "attention and checkpointing" in notes["use_unsloth"]
    assert notes["deepspeed"].startswith("deepspeed: ./train_args/ds_z3_config.json: not carried over: choose a "
                                         "ZeRO-3 launch profile such as 8xh100-zero3 instead")
    assert notes["report_to"].startswith("report_to: tensorboard: not carried over:")
    assert "metrics.jsonl" in notes["report_to"]
    assert "min_seq_length: 16: not carried over" in notes["min_seq_length"]
    assert notes["optim"].startswith("optim: adamw_hf: changed to adamw_torch")
    for key in ("use_unsloth", "deepspeed", "report_to", "min_seq_length"):
        assert key not in conv.carried
    # QLoRA under a deepspeed file points at the QLoRA ZeRO-3 profile; another tracker is named as unsupported.
    qlora = _load(DATA / "sft-qlora.json") | {"deepspeed": "ds.json", "report_to": ["wandb", "tensorboard"]}
    notes = {n.split(":", 1)[0]: n for n in convert(qlora).notes}
    assert "8xh100-zero3-qlora" in notes["deepspeed"] and "does not report to wandb" in notes["report_to"]


def test_shipped_zero3_profile_replaces_deepspeed_file():
    conv = convert(_load(DATA / "dpo-full.json"), source="dpo-full.json", world_size=8)
    assert conv.profile is None and conv.profile_name == "8xh100-zero3"
    note = next(n for n in conv.notes if n.startswith("deepspeed:"))
    assert "8xh100-zero3" in note and "configs/deepspeed/zero3.json" in note
    assert "world_size 8" in next(n for n in conv.notes if n.startswith("global_batch_size:"))


def test_no_shipped_fit_writes_single_process_profile_keeping_global_batch():
    conv = convert(_load(DATA / "sft-qlora.json"), world_size=4)  # no 4-process profile is shipped
    assert conv.profile["num_processes"] == 1 and conv.profile["launcher"] == "python"
    assert conv.profile["micro_batch_size"] == 1 and conv.profile["precision"] == "fp16"
    assert conv.recipe["stages"][0]["train"]["global_batch_size"] == 64
    assert any(n.startswith("world_size: 4:") and "accumulation 64" in n for n in conv.notes)


def test_absent_keys_take_the_source_defaults_and_are_noted():
    data = {"model_name_or_path": "org/m", "train_file": "d.jsonl", "max_seq_length": 512, "template_name": "qwen"}
    conv = convert(data, source="minimal.json")
    stage = conv.recipe["stages"][0]
    assert stage["stage"] == "sft" and conv.recipe["method"]["type"] == "qlora"
    t = stage["train"]
    assert t["learning_rate"] == 5e-5 and t["num_epochs"] == 3 and t["lr_scheduler"] == "linear"
    assert t["global_batch_size"] == 8 and t["logging_steps"] == 500 and t["save_total_limit"] is None
    noted = _noted_keys(conv.notes)
    assert {"task_type", "train_mode", "learning_rate", "num_train_epochs", "lr_scheduler_type",
            "per_device_train_batch_size"} <= noted
    assert conv.name == "minimal"  # no output_dir: named after the file
    assert "output_dir" not in conv.recipe


def test_dpo_absent_prompt_length_uses_the_source_default():
    data = _load(DATA / "dpo-qlora.json")
    del data["max_prompt_length"]
    assert convert(data).recipe["stages"][0]["max_prompt_length"] == 512
    data["max_seq_length"] = 512  # 512 does not fit: dpo-dist's max_length / 2 applies, noted
    conv = convert(data)
    assert "max_prompt_length" not in conv.recipe["stages"][0]
    assert any(n.startswith("max_prompt_length: absent:") for n in conv.notes)


def test_unknown_template_is_noted_and_not_set():
    data = _load(DATA / "sft-qlora.json") | {"template_name": "orion"}
    conv = convert(data)
    assert "template" not in conv.recipe["model"]
    note = next(n for n in conv.notes if n.startswith("template_name:"))
    assert note.startswith("template_name: orion: not carried over: dpo-dist has no template of that name")


def test_non_dpo_keys_and_full_lora_keys_are_noted():
    data = _load(DATA / "sft-full.json") | {"beta": 0.1, "max_prompt_length": 256, "lora_rank": 8}
    conv = convert(data)
    notes = {n.split(":", 1)[0]: n for n in conv.notes}
    assert "only applies to dpo" in notes["beta"] and "only applies to dpo" in notes["max_prompt_length"]
    assert "train_mode is full" in notes["lora_rank"]
    assert "beta" not in conv.recipe["stages"][0] and "lora_r" not in conv.recipe["method"]


def test_unknown_scheduler_and_eval_file():
    data = _load(DATA / "sft-lora.json") | {"lr_scheduler_type": "inverse_sqrt", "eval_file": "./data/eval.jsonl",
                                            "eval_steps": 100}
    conv = convert(data)
    stage = conv.recipe["stages"][0]
    assert stage["train"]["lr_scheduler"] == "cosine" and stage["train"]["eval_steps"] == 100
    assert stage["data"]["eval"] == "./data/eval.jsonl"
    assert any(n.startswith("lr_scheduler_type: inverse_sqrt: not carried over:") for n in conv.notes)


# -- bad input --------------------------------------------------------------------------------------------------

def test_invalid_json_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n    "task_type": "sft",\n    "train_mode": "lora",,\n    "lora_rank": 8\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json:3:\d+: invalid JSON"):
        run(_args(bad, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="missing.json: file not found"):
        run(_args(tmp_path / "missing.json", tmp_path))
    top = tmp_path / "list.json"
    top.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="list.json: expected a JSON object"):
        run(_args(top, tmp_path))


@pytest.mark.parametrize("key,value", [("task_type", "reward"), ("train_mode", "adapter")])
def test_unknown_task_type_or_train_mode(key, value):
    data = _load(DATA / "sft-qlora.json") | {key: value}
    with pytest.raises(ConfigError, match=rf"x\.json: {key}: {value} is not one of"):
        convert(data, source="x.json")


def test_type_errors_and_missing_required_keys_name_the_key():
    data = _load(DATA / "sft-qlora.json")
    with pytest.raises(ConfigError, match=r"learning_rate: expected a number, got \"fast\""):
        convert(data | {"learning_rate": "fast"}, source="x.json")
    with pytest.raises(ConfigError, match="fp16, bf16: both are true"):
        convert(data | {"bf16": True})
    without = {k: v for k, v in data.items() if k != "train_file"}
    with pytest.raises(ConfigError, match="train_file: required key is missing"):
        convert(without)
    # A range error found by the recipe's own validation is traced back to the input key.
    with pytest.raises(ConfigError, match=r"x\.json: learning_rate \(as stages\[0\]\.train\.learning_rate\)"):
        convert(data | {"learning_rate": -1.0}, source="x.json")
    with pytest.raises(ConfigError, match="max_prompt_length: 2048 must be between 1 and max_seq_length - 1"):
        convert(_load(DATA / "dpo-qlora.json") | {"max_prompt_length": 2048})


def test_overwrite_refused_without_force(tmp_path, capsys):
    src = DATA / "pretrain-full.json"
    assert run(_args(src, tmp_path)) == 0
    recipe = tmp_path / "tiny-pretrain-full.yaml"
    recipe.write_text(recipe.read_text() + "# edited\n")
    with pytest.raises(ConfigError, match=r"tiny-pretrain-full\.yaml.*already exists; pass --force"):
        run(_args(src, tmp_path))
    assert recipe.read_text().endswith("# edited\n")  # untouched
    assert run(_args(src, tmp_path, force=True)) == 0
    assert not recipe.read_text().endswith("# edited\n")


def test_name_option_and_duplicate_keys(tmp_path, capsys):
    src = tmp_path / "dup.json"
    src.write_text('{"model_name_or_path": "org/m", "train_file": "d.jsonl", "max_seq_length": 256,\n'
                   ' "template_name": "qwen", "learning_rate": 1e-4, "learning_rate": 3e-4}\n')
    data, dupes = read_train_args(src)
    assert data["learning_rate"] == 3e-4 and dupes and dupes[0].startswith("learning_rate: given 2 times")
    assert run(_args(src, tmp_path, name="custom")) == 0
    assert load_recipe(tmp_path / "custom.yaml").stages[0].train.learning_rate == pytest.approx(3e-4)
    assert "learning_rate: given 2 times" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="name: 'a/b' must be a plain file name"):
        run(_args(src, tmp_path, name="a/b"))


def test_add_parser_registers_the_subcommand(tmp_path):
    parser = argparse.ArgumentParser(prog="dpo-dist")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["import-firefly", str(DATA / "dpo-lora.json"), "--out", str(tmp_path),
                              "--world-size", "8", "--name", "x", "--force"])
    assert (args.world_size, args.name, args.force, args.func) == (8, "x", True, run)
    defaults = parser.parse_args(["import-firefly", "t.json"])
    assert (defaults.out, defaults.name, defaults.world_size, defaults.force) == (".", None, 1, False)
    assert args.func(args) == 0
    assert load_recipe(tmp_path / "x.yaml").stages[0].train.global_batch_size == 64
