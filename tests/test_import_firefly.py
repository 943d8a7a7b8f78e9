"""`dpo-dist import-firefly`: a Firefly train_args JSON becomes a recipe (+ a launch profile when no shipped one fits),
and every input key is either carried over or noted with a reason. No model is loaded."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from dpo_dist.config.profiles import load_profile
from dpo_dist.config.recipe import load_recipe
from dpo_dist.config.schema import ConfigError
from dpo_dist.commands.import_firefly import add_parser, convert, read_train_args, run

DATA = Path(__file__).resolve().parent / "data" / "firefly"

# file -> (world_size, expected values after the round trip through the written files)
CASES = {
    # Full fine-tuning under the source's ZeRO-3 file, on one GPU: a written ZeRO-3 profile, not a plain process.
    "pretrain-full": (1, dict(stage="pretrain", method="full", max_length=1024, max_prompt_length=None, beta=None,
                              lr=1e-5, global_batch=16, epochs=2, template=None, precision="fp16", micro=2,
                              profile=None, launcher="deepspeed", optim="adamw_torch", scheduler="cosine", seed=7)),
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
        assert (profile.launcher, profile.num_processes) == (want.get("launcher", "python"), world_size)
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
    from dpo_dist.launch.command import preflight

    world_size, want = CASES[case]
    run(_args(DATA / f"{case}.json", tmp_path, world_size=world_size))
    name = f"tiny-{case}"
    profile_arg = want["profile"] or str(tmp_path / f"{name}-profile.yaml")
    profile = load_profile(profile_arg)
    preflight(str(tmp_path / f"{name}.yaml"), profile, [], profile.num_nodes, sources=False)


@pytest.mark.parametrize("src", sorted(DATA.glob("*.json")), ids=lambda p: p.stem)
def test_every_fixture_converts_and_passes_launch_preflight(src, tmp_path):
    """Every input here (the source's real configs among them), converted for one GPU, loads and passes pre-flight."""
    from dpo_dist.launch.command import preflight

    assert run(_args(src, tmp_path)) == 0
    conv = convert(_load(src), source=str(src))
    profile_arg = str(tmp_path / f"{conv.profile_name}.yaml") if conv.profile else conv.profile_name
    profile = load_profile(profile_arg)
    preflight(str(tmp_path / f"{conv.name}.yaml"), profile, [], profile.num_nodes, sources=False)


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
    assert notes["deepspeed"].startswith("deepspeed: ./train_args/ds_z3_config.json: not carried over: the backend "
                                         "is the launch profile's: no shipped profile fits")
    assert "min_seq_length: 16: not carried over" in notes["min_seq_length"]
    assert notes["optim"].startswith("optim: adamw_hf: changed to adamw_torch")
    for key in ("use_unsloth", "deepspeed", "min_seq_length"):
        assert key not in conv.carried
    # report_to: the trackers dpo-dist reports to are carried, "none" is none, any other is noted, not carried
    assert conv.carried["report_to"] == "stages[0].train.report_to" and "report_to" not in notes
    assert conv.recipe["stages"][0]["train"]["report_to"] == ["tensorboard"]
    two = convert(_load(DATA / "sft-qlora.json") | {"report_to": ["wandb", "tensorboard"]})
    assert two.recipe["stages"][0]["train"]["report_to"] == ["wandb", "tensorboard"]
    assert convert(_load(DATA / "sft-qlora.json") | {"report_to": "none"}).recipe["stages"][0]["train"][
        "report_to"] == []
    # QLoRA under a deepspeed file points at the QLoRA ZeRO-3 profile; a tracker without an extra is noted.
    qlora = _load(DATA / "sft-qlora.json") | {"deepspeed": "ds.json", "report_to": ["comet_ml", "tensorboard"]}
    conv = convert(qlora)
    notes = {n.split(":", 1)[0]: n for n in conv.notes}
    assert "8xh100-zero3-qlora" in notes["deepspeed"]
    assert notes["report_to"].startswith('report_to: ["comet_ml", "tensorboard"]: not carried over: dpo-dist reports '
                                         "to tensorboard, wandb, mlflow")
    assert "instead of comet_ml" in notes["report_to"] and "report_to" not in conv.recipe["stages"][0]["train"]


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


# -- models that run their own code ------------------------------------------------------------------------------

def _note(conv, prefix: str) -> str:
    hits = [n for n in conv.notes if n.startswith(prefix)]
    assert len(hits) == 1, f"want one note starting {prefix!r}, got {hits}"
    return hits[0]


@pytest.mark.parametrize("case,family", [("qwen-7b-sft-full", "Qwen-1"), ("chatglm3-6b-sft-qlora", "ChatGLM")])
def test_remote_code_family_turns_on_trust_remote_code_with_a_warning(case, family, tmp_path, capsys):
    """The source's real configs for Qwen-7B-Chat and chatglm3-6b: the model's own code must run, and the user is told
    what that means."""
    src = DATA / f"{case}.json"
    conv = convert(_load(src), source=str(src))
    assert conv.recipe["model"]["trust_remote_code"] is True
    note = _note(conv, "model.trust_remote_code: true: ")
    assert f"{family} models ship their own modelling code" in note and "model_name_or_path" in note
    assert "security warning: the model's own Python code will run on this machine with your permissions" in note
    assert "read or trust" in note
    assert "model.trust_remote_code" in conv.carried["model_name_or_path"]
    # The written recipe keeps it, and the warning is printed.
    assert run(_args(src, tmp_path)) == 0
    assert load_recipe(tmp_path / f"{conv.name}.yaml").model.trust_remote_code is True
    assert f"  {note}\n" in capsys.readouterr().out


@pytest.mark.parametrize("model,template,family", [
    ("Qwen/Qwen-1_8B-Chat", "qwen", "Qwen-1"),
    ("Qwen/Qwen-72B", None, "Qwen-1"),
    ("/models/firefly-qwen-14b-sft", "qwen", "Qwen-1"),
    ("THUDM/chatglm2-6b", "chatglm2", "ChatGLM"),
    ("baichuan-inc/Baichuan2-13B-Chat", "baichuan2", "Baichuan"),
    ("baichuan-inc/Baichuan-13B-Chat", "baichuan", "Baichuan"),
    ("internlm/internlm2-chat-20b", "internlm2", "InternLM"),
    ("internlm/internlm-chat-7b", "internlm", "InternLM"),
    ("openbmb/MiniCPM-2B-dpo-bf16", "minicpm", "MiniCPM"),
    ("xverse/XVERSE-13B-Chat", "xverse", "XVERSE"),
    ("OrionStarAI/Orion-14B-Chat", "orion", "Orion"),
    ("deepseek-ai/deepseek-moe-16b-chat", "deepseek", "DeepSeek-MoE"),
    ("/data/checkpoints/my-sft", "ChatGLM3", "ChatGLM"),  # a local path: the template tells
    ("/data/checkpoints/my-sft", "baichuan2", "Baichuan"),
])
def test_remote_code_detection_by_model_name_or_template(model, template, family):
    data = _load(DATA / "sft-qlora.json") | {"model_name_or_path": model, "template_name": template}
    conv = convert(data)
    assert conv.recipe["model"].get("trust_remote_code") is True, model
    assert f"{family} models ship their own modelling code" in _note(conv, "model.trust_remote_code: true: ")


@pytest.mark.parametrize("model", ["Qwen/Qwen1.5-7B-Chat", "Qwen/Qwen1.5-14B-Chat", "Qwen/Qwen2-7B-Instruct",
                                   "Qwen/Qwen2.5-72B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct",
                                   "deepseek-ai/deepseek-llm-7b-chat", "01-ai/Yi-6B-Chat", "org/tiny-chat-1b"])
def test_models_in_transformers_keep_trust_remote_code_off(model):
    data = _load(DATA / "qwen1.5-7b-dpo-full.json") | {"model_name_or_path": model}
    conv = convert(data)
    assert "trust_remote_code" not in conv.recipe["model"]
    note = _note(conv, "model.trust_remote_code: false: ")
    assert "no code from the model runs" in note
    assert not any(n.startswith("model.trust_remote_code: true") for n in conv.notes)


def test_qwen15_source_config_round_trips_without_remote_code(tmp_path):
    src = DATA / "qwen1.5-7b-dpo-full.json"
    assert run(_args(src, tmp_path)) == 0
    assert load_recipe(tmp_path / "firefly-qwen1.5-7b-dpo-full.yaml").model.trust_remote_code is False


# -- full fine-tuning under the source's ZeRO-3 file ---------------------------------------------------------------

@pytest.mark.parametrize("model,profile", [
    ("org/tiny-chat-1b", "8xh100-zero3"),
    ("Qwen/Qwen1.5-14B-Chat", "8xh100-zero3"),
    ("internlm/internlm2-chat-20b", "8xh100-zero3"),  # 20B × 16 bytes / 8 = 40 GB: at the limit, still on the GPUs
    ("01-ai/Yi-34B-Chat", "8xh100-zero3-offload"),
    ("Qwen/Qwen2.5-72B-Instruct", "8xh100-zero3-offload"),
    ("/data/models/final", "8xh100-zero3"),  # no size in the name: no offload, and the note says so
])
def test_full_zero3_picks_the_shipped_zero3_profile_by_model_size(model, profile, tmp_path):
    from dpo_dist.launch.command import preflight

    data = _load(DATA / "dpo-full.json") | {"model_name_or_path": model}
    conv = convert(data, world_size=8)
    assert conv.profile is None and conv.profile_name == profile
    note = _note(conv, "deepspeed: ./train_args/ds_z3_config.json: not carried over: ")
    assert profile in note
    if profile.endswith("offload"):
        assert "configs/deepspeed/zero3-offload.json" in note and "offloaded to CPU RAM" in note
    if model == "Qwen/Qwen2.5-72B-Instruct":
        assert "72B parameters (from the model name) need about 1152 GB of training state, 144 GB per process" in note
        assert "offload above 20B parameters" in note
    if model == "/data/models/final":
        assert "states no parameter count, so no CPU offload" in note
    src = tmp_path / "in.json"
    src.write_text(json.dumps(data))
    assert run(_args(src, tmp_path / "out", world_size=8)) == 0
    preflight(str(tmp_path / "out" / "tiny-dpo-full.yaml"), load_profile(profile), [], 1, sources=False)


def test_full_zero3_without_a_fitting_profile_writes_a_deepspeed_zero3_profile(tmp_path, capsys):
    """The source's Qwen-7B-Chat full fine-tune (fp16, ZeRO-3 file) fits no shipped profile: the written profile runs
    DeepSpeed ZeRO-3, offloading on one GPU (112 GB of state), not on eight (14 GB each)."""
    from dpo_dist.launch.command import preflight

    src = DATA / "qwen-7b-sft-full.json"
    one = convert(_load(src), source=str(src))
    p = one.profile
    assert (p["launcher"], p["deepspeed_config"], p["num_processes"]) == ("deepspeed",
                                                                          "configs/deepspeed/zero3-offload.json", 1)
    assert (p["micro_batch_size"], p["precision"], p["device"]) == (1, "fp16", "gpu")
    note = _note(one, "deepspeed: ")
    assert "the written profile firefly-qwen-7b-sft-full-profile trains with DeepSpeed ZeRO-3" in note
    assert "7B parameters (from the model name) need about 112 GB of training state, 112 GB per process" in note
    assert "offload above 2.5B parameters" in note

    eight = convert(_load(src), source=str(src), world_size=8)
    p = eight.profile
    assert (p["launcher"], p["deepspeed_config"], p["num_processes"]) == ("deepspeed", "configs/deepspeed/zero3.json",
                                                                          8)
    assert eight.recipe["stages"][0]["train"]["global_batch_size"] == 128  # accumulation stays 16
    assert "14 GB per process, so no CPU offload" in _note(eight, "deepspeed: ")
    assert not any(n.startswith("world_size:") for n in eight.notes)

    # Written, loaded, and accepted by the launcher's pre-flight checks; the command is `dpo-dist launch`.
    assert run(_args(src, tmp_path, world_size=8)) == 0
    printed = capsys.readouterr().out
    profile_path = tmp_path / "firefly-qwen-7b-sft-full-profile.yaml"
    assert profile_path.read_text().startswith("# Launch profile converted from ")
    assert "DeepSpeed ZeRO-3 on 8 processes" in profile_path.read_text()
    profile = load_profile(str(profile_path))
    assert profile.backend == "deepspeed" and profile.world_size == 8
    assert profile.deepspeed_settings()["zero_optimization"]["stage"] == 3
    assert f"dpo-dist launch {tmp_path / 'firefly-qwen-7b-sft-full.yaml'} --profile {profile_path}" in printed
    preflight(str(tmp_path / "firefly-qwen-7b-sft-full.yaml"), profile, [], 1, sources=False)


def test_lora_under_a_deepspeed_file_keeps_its_single_process_fallback():
    """Only full fine-tuning is moved onto a written ZeRO-3 profile; LoRA keeps the note naming a ZeRO-3 profile."""
    data = _load(DATA / "sft-lora.json") | {"deepspeed": "./train_args/ds_z3_config.json"}
    conv = convert(data)
    assert conv.profile["launcher"] == "python"
    assert "choose a ZeRO-3 launch profile such as 8xh100-zero3" in _note(conv, "deepspeed: ")


# -- templates and defaults -------------------------------------------------------------------------------------

def test_minicpm3_template_becomes_chatml(tmp_path):
    src = DATA / "minicpm3-4b-dpo-full.json"
    conv = convert(_load(src), source=str(src))
    assert conv.recipe["model"]["template"] == "chatml" and conv.carried["template_name"] == "model.template"
    note = _note(conv, "template_name: minicpm3: changed to chatml: ")
    assert "ChatML" in note and "You are a helpful assistant." in note
    assert conv.recipe["model"]["trust_remote_code"] is True  # MiniCPM3 ships its own code as well
    assert run(_args(src, tmp_path)) == 0
    assert load_recipe(tmp_path / f"{conv.name}.yaml").model.template == "chatml"


# Every key a minimal input lacks and the importer fills in: key -> (value as the note shows it, where it went, value).
FILLED = {
    "task_type": ("sft", "stages[0].stage", "sft"),
    "train_mode": ("qlora", "method.type", "qlora"),
    "lora_rank": ("64", "method.lora_r", 64),
    "lora_alpha": ("16", "method.lora_alpha", 16),
    "lora_dropout": ("0.05", "method.lora_dropout", 0.05),
    "per_device_train_batch_size": ("8", "profile.micro_batch_size, stages[0].train.global_batch_size", 8),
    "gradient_accumulation_steps": ("1", "stages[0].train.global_batch_size", 8),
    "learning_rate": ("5e-05", "stages[0].train.learning_rate", 5e-5),
    "num_train_epochs": ("3", "stages[0].train.num_epochs", 3),
    "lr_scheduler_type": ("linear", "stages[0].train.lr_scheduler", "linear"),
    "warmup_steps": ("0", "stages[0].train.warmup_steps", 0),
    "weight_decay": ("0.0", "stages[0].train.weight_decay", 0.0),
    "max_grad_norm": ("1.0", "stages[0].train.max_grad_norm", 1.0),
    "optim": ("adamw_torch", "stages[0].train.optim", "adamw_torch"),
    "gradient_checkpointing": ("false", "stages[0].train.gradient_checkpointing", False),
    "fp16": ("false", "stages[0].train.fp16", False),
    "bf16": ("false", "stages[0].train.bf16", False),
    "logging_steps": ("500", "stages[0].train.logging_steps", 500),
    "save_steps": ("500", "stages[0].train.save_steps", 500),
    "save_total_limit": ("null (keep every checkpoint)", "stages[0].train.save_total_limit", None),
    "seed": ("42", "seed", 42),
}
FILLED_DPO = {
    "max_prompt_length": ("512", "stages[0].max_prompt_length", 512),
    "beta": ("0.1", "stages[0].beta", 0.1),
}


def _at(recipe: dict, target: str):
    value = recipe
    for part in target.replace("[0]", ".0").split("."):
        value = value[int(part)] if part.isdigit() else value[part]
    return value


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_every_filled_default_has_its_own_note(task):
    data = {"model_name_or_path": "org/m", "train_file": "d.jsonl", "max_seq_length": 1024, "template_name": "qwen"}
    want = dict(FILLED)
    if task == "dpo":
        data["task_type"] = "dpo"
        del want["task_type"]
        want |= FILLED_DPO
    conv = convert(data, source="minimal.json")
    for key, (shown, target, value) in want.items():
        note = _note(conv, f"{key}: absent: ")
        assert note.startswith(f"{key}: absent: the source's default {shown} is written to {target}"), note
        if not target.startswith("profile."):  # the micro-batch shows in the global batch, 8 × 1
            assert _at(conv.recipe, target) == (pytest.approx(value) if isinstance(value, float) else value), key
    # ... and no other default was filled in without a note.
    filled = {n.split(":", 1)[0] for n in conv.notes if ": absent: the source's default " in n}
    assert filled == set(want)


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
