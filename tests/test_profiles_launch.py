"""Profiles, backend resolution, refusals before any weights load, and the launcher commands (no ranks started)."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from dpo_dist import cli
from dpo_dist.distributed.backends import Backend, Launch, check_run, resolve, trainer_overrides
from dpo_dist.launch.command import Nodes, build_command, deepspeed_hostfile, write_deepspeed_hostfile
from dpo_dist.models.loading import load_kwargs
from dpo_dist.config.profiles import Profile, load_profile, profile_names
from dpo_dist.config.resources import SHIPPED as ROOT
from dpo_dist.config.recipe import MethodConfig, ModelConfig, recipe_from_dict
from dpo_dist.config.schema import ConfigError, load_yaml

GPU_PROFILES = ["v100-qlora", "1gpu-bf16", "8gpu-ddp-qlora", "8xh100-fsdp-qlora", "8xh100-fsdp-qlora-offload",
                "8xh100-fsdp-lora", "8xh100-zero3", "8xh100-zero3-offload", "8xh100-zero3-qlora"]
CPU_PROFILES = ["cpu", "cpu-bf16", "cpu-ddp-2", "cpu-fsdp-2", "cpu-fsdp-qlora-2", "cpu-zero3-2", "cpu-zero3-qlora-2"]
ACCELERATE_FILES = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
DEEPSPEED_FILES = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))


def recipe(method="lora", global_batch=8, **stage):
    return recipe_from_dict({
        "name": "t", "model": {"name_or_path": "m", "template": "qwen"}, "method": {"type": method},
        "stages": [{"stage": "sft", "data": {"train": "x.jsonl"}, "train": {"global_batch_size": global_batch},
                    **stage}]})


def backend_of(profile: Profile) -> Backend:
    ds = profile.deepspeed_file()
    stage = profile.deepspeed_settings().get("zero_optimization", {}).get("stage", 0)
    return Backend(profile.backend, ds, stage, profile.fsdp_settings())


def launched(profile: Profile) -> Launch:
    return Launch(profile.world_size, 0, 0, accelerate_fsdp=profile.backend == "fsdp", accelerate_deepspeed=False)


def test_the_issue_profiles_exist():
    assert set(GPU_PROFILES + CPU_PROFILES) <= set(profile_names())


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=lambda p: p.name)
def test_accelerate_files_load(path):
    data = load_yaml(path)
    assert data["distributed_type"] in ("FSDP", "DEEPSPEED")
    if data["distributed_type"] == "FSDP":
        fsdp = data["fsdp_config"]
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    else:
        assert (ROOT / data["deepspeed_config"]["deepspeed_config_file"]).is_file()


@pytest.mark.parametrize("path", DEEPSPEED_FILES, ids=lambda p: p.name)
def test_deepspeed_files_leave_the_batch_to_the_recipe(path):
    data = json.loads(path.read_text())
    assert data["zero_optimization"]["stage"] == 3
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert data[key] == "auto"


@pytest.mark.parametrize("name", GPU_PROFILES + CPU_PROFILES)
def test_profile_backend_matches_its_file(name):
    p = load_profile(name)
    expected = {"accelerate": "fsdp", "deepspeed": "deepspeed"}.get(p.launcher, "ddp" if p.world_size > 1 else "single")
    assert p.backend == expected
    if "qlora" in name and name not in ("v100-qlora", "8gpu-ddp-qlora"):
        assert p.methods == ["qlora"] and p.precision == "bf16"


def test_8xh100_fsdp_qlora_is_the_72b_target():
    p = load_profile("8xh100-fsdp-qlora")
    fsdp = p.fsdp_settings()
    assert (p.world_size, p.precision, p.micro_batch_size) == (8, "bf16", 1)
    assert fsdp["fsdp_cpu_ram_efficient_loading"] and fsdp["fsdp_activation_checkpointing"]
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert load_profile("8xh100-fsdp-qlora-offload").fsdp_settings()["fsdp_offload_params"] is True


def test_v100_profile_is_fireflys_setting():
    p = load_profile("v100-qlora")
    assert (p.precision, p.attn_implementation, p.optim, p.gradient_checkpointing, p.world_size) == (
        "fp16", "sdpa", "paged_adamw_32bit", True, 1)


# ---- dry runs: a sensible command for every GPU profile -------------------------------------------------------

@pytest.mark.parametrize("name", GPU_PROFILES)
def test_dry_run_prints_the_launcher_command(name, capsys):
    p = load_profile(name)
    target = ("configs/recipes/qwen2.5-72b-dpo-qlora.yaml" if "qlora" in p.methods
              else "configs/recipes/llama3.1-8b-sft-dpo-qlora.yaml")
    overrides = [] if "qlora" in p.methods else ["method.type=lora"]
    assert cli.main(["launch", target, "--profile", name, "--dry-run", *overrides]) == 0
    cmd = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    tool = Path(cmd[0]).name
    assert tool == {"python": Path(cmd[0]).name if "python" in tool else "python", "torchrun": "torchrun",
                    "accelerate": "accelerate", "deepspeed": "deepspeed"}[p.launcher]
    assert cmd[cmd.index("--profile") + 1] == name and target in cmd
    if p.launcher == "torchrun":
        assert "--nproc_per_node=8" in cmd and cmd[cmd.index("-m") + 1] == "dpo_dist.train"
    elif p.launcher == "accelerate":
        assert cmd[1] == "launch" and Path(cmd[cmd.index("--config_file") + 1]).is_file()
        assert cmd[cmd.index("--num_processes") + 1] == "8" and cmd[cmd.index("-m") + 1] == "dpo_dist.train"
    elif p.launcher == "deepspeed":
        assert cmd[cmd.index("--num_gpus") + 1] == "8" and cmd[cmd.index("--module") + 1] == "dpo_dist.train"
        assert Path(cmd[cmd.index("--deepspeed") + 1]).is_file()
    else:
        assert cmd[1:3] == ["-m", "dpo_dist.train"]


def test_multi_node_flags():
    p = load_profile("8xh100-fsdp-qlora")
    cmd = build_command("r.yaml", p, "8xh100-fsdp-qlora", Nodes(2, 1, "10.0.0.5", 29400))
    joined = " ".join(cmd)
    assert ("--num_processes 16 --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.5 "
            "--main_process_port 29400") in joined
    cmd = build_command("r.yaml", load_profile("8xh100-zero3-qlora"), "8xh100-zero3-qlora", Nodes(4, 3, "h0", 29400))
    hostfile = str(deepspeed_hostfile(4, 8))
    assert (f"--num_gpus 8 --hostfile {hostfile} --num_nodes 4 --node_rank 3 --no_ssh --master_addr h0 "
            "--master_port 29400") in " ".join(cmd)
    assert write_deepspeed_hostfile(4, 8).read_text() == "".join(f"node{i} slots=8\n" for i in range(4))
    # --nproc-per-node changes the processes per node, never the profile's other settings
    cmd = build_command("r.yaml", p, "8xh100-fsdp-qlora", Nodes(2, 0, "h0", 29400, procs=1))
    assert "--num_processes 2 --num_machines 2 --machine_rank 0" in " ".join(cmd)
    cmd = build_command("r.yaml", load_profile("8gpu-ddp-qlora"), "8gpu-ddp-qlora", Nodes(2, 0, "h0", 29400))
    assert "--nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=h0 --master_port=29400" in " ".join(cmd)
    with pytest.raises(ConfigError, match="node-rank 2"):
        build_command("r.yaml", p, "x", Nodes(2, 2))
    with pytest.raises(ConfigError, match="multi-node"):
        build_command("r.yaml", load_profile("v100-qlora"), "v100-qlora", Nodes(2, 0))


# ---- refusals, before any weights load ------------------------------------------------------------------------

def test_multi_process_profile_in_one_process_is_refused(tmp_path, monkeypatch, capsys):
    import dpo_dist.models.loading

    def no_loading(*_a, **_k):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(dpo_dist.models.loading, "load_model", no_loading)
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe().to_dict()))
    from dpo_dist.training.run import main

    assert main([str(path), "--profile", "cpu-fsdp-2"]) == 2
    err = capsys.readouterr().err
    assert "runs 2 processes, but this is a single process" in err and "dpo-dist launch" in err


def test_fsdp_profile_without_accelerate_fsdp_is_refused():
    p = load_profile("cpu-fsdp-2")
    torchrun = Launch(2, 0, 0, accelerate_fsdp=False, accelerate_deepspeed=False)
    with pytest.raises(ConfigError, match="accelerate launch --config_file configs/accelerate/cpu-fsdp-2.yaml"):
        check_run(recipe(), p, torchrun, resolve(p, torchrun), cuda=False)


def test_method_the_profile_does_not_support_is_refused_with_alternatives():
    p = load_profile("cpu-fsdp-2")
    with pytest.raises(ConfigError, match=r"method qlora is not supported .* profiles for qlora: cpu-fsdp-qlora-2"):
        check_run(recipe("qlora"), p, launched(p), backend_of(p), cuda=False)


def test_uneven_global_batch_is_refused_by_launch(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe(global_batch=6).to_dict()))
    assert cli.main(["launch", str(path), "--profile", "cpu-ddp-2", "--dry-run"]) == 2
    assert "global_batch_size: 6 is not divisible by micro-batch 2 × 2 process(es) = 4" in capsys.readouterr().err


def test_fp16_qlora_under_fsdp_is_refused():
    p = Profile(name="x", launcher="accelerate", accelerate_config="configs/accelerate/cpu-fsdp-qlora-2.yaml",
                num_processes=2, precision="fp16")
    with pytest.raises(ConfigError, match="FSDP2 shards each layer as one dtype"):
        check_run(recipe("qlora"), p, launched(p), Backend("fsdp", None, 0, {}), cuda=False)


def test_flash_attention_in_fp32_is_refused():
    p = Profile(name="x", precision="fp32", attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match="flash_attention_2 needs fp16 or bf16"):
        check_run(recipe(), p, launched(p), backend_of(p), cuda=False)


def test_zero_json_that_fixes_the_batch_is_refused(tmp_path):
    bad = tmp_path / "zero3.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}))
    p = load_profile("cpu-zero3-2")
    launch = launched(p)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 4; set it to \"auto\""):
        check_run(recipe(), p, launch, resolve(p, launch, str(bad)), cuda=False)


@pytest.mark.parametrize("data, match", [
    ({"launcher": "python", "num_processes": 2}, "python runs one process"),
    ({"launcher": "accelerate"}, "accelerate_config: the accelerate launcher needs"),
    ({"launcher": "deepspeed", "num_processes": 2}, "deepspeed_config: the deepspeed launcher needs"),
    ({"launcher": "accelerate", "accelerate_config": "configs/accelerate/nope.yaml"}, "does not exist"),
    ({"launcher": "accelerate", "accelerate_config": "configs/accelerate/cpu-fsdp-2.yaml", "num_processes": 4},
     "differs from num_processes: 2"),
    ({"launcher": "accelerate", "accelerate_config": "configs/accelerate/cpu-fsdp-2.yaml", "num_processes": 2,
      "precision": "bf16"}, "precision: bf16 differs from mixed_precision: no"),
    ({"methods": []}, "methods: list at least one"),
])
def test_bad_profiles_are_refused(tmp_path, data, match):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=match):
        load_profile(str(path))


# ---- what the backend asks of TrainingArguments and of model loading ------------------------------------------

def test_trainer_overrides_per_backend():
    fsdp_ckpt = Backend("fsdp", None, 0, {"fsdp_activation_checkpointing": True})
    out = trainer_overrides(load_profile("cpu-fsdp-qlora-2"), fsdp_ckpt, checkpointing=True, peft=True)
    assert out["gradient_checkpointing"] is False  # FSDP checkpoints the layers itself
    zero3 = Backend("deepspeed", Path("configs/deepspeed/zero3.json"), 3, {})
    out = trainer_overrides(load_profile("cpu-zero3-2"), zero3, checkpointing=True, peft=True)
    assert out["gradient_checkpointing_kwargs"] == {"use_reentrant": True} and out["deepspeed"].endswith("zero3.json")
    out = trainer_overrides(load_profile("cpu-ddp-2"), Backend("ddp", None, 0, {}), checkpointing=True, peft=True)
    assert out["gradient_checkpointing_kwargs"] == {"use_reentrant": False} and "deepspeed" not in out
    assert out["use_cpu"] is (not torch.cuda.is_available())


def test_qlora_load_kwargs_no_device_map_when_sharded(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    cfg = ModelConfig(name_or_path="m")
    alone = load_kwargs(cfg, "qlora", "bf16", "sdpa", sharded=False, cuda=True)
    assert alone["device_map"] == {"": 3}
    sharded = load_kwargs(cfg, "qlora", "bf16", "sdpa", sharded=True, cuda=True)
    assert "device_map" not in sharded
    q = sharded["quantization_config"]
    assert q.bnb_4bit_quant_storage == "bfloat16" or q.bnb_4bit_quant_storage == torch.bfloat16
    assert sharded["dtype"] == torch.bfloat16  # quant storage = parameter dtype, so FSDP shards them together
    assert load_kwargs(cfg, "lora", "bf16", "sdpa", sharded=False, cuda=True).get("device_map") is None


def test_profiles_command_lists_every_profile(capsys):
    assert cli.main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in profile_names())


def test_a_cpu_profile_stays_on_the_cpu_when_a_gpu_is_visible(monkeypatch, tiny_base):
    """The decision a GPU host makes, taken here with a GPU reported visible: the profile's device decides."""
    import torch

    from dpo_dist.distributed.backends import on_cuda
    from dpo_dist.models.loading import load_kwargs, pick_attn_implementation
    from dpo_dist.config.recipe import ModelConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu, gpu = load_profile("cpu-ddp-2"), load_profile("1gpu-bf16")
    assert not on_cuda(cpu) and on_cuda(gpu)
    ddp = Backend("ddp", None, 0, {})
    assert trainer_overrides(cpu, ddp, checkpointing=False, peft=True)["use_cpu"] is True  # gloo, CPU tensors
    assert trainer_overrides(gpu, ddp, checkpointing=False, peft=True)["use_cpu"] is False
    # QLoRA on a CPU profile is not dispatched to a GPU; flash-attention is never picked for a CPU process.
    cfg = ModelConfig(name_or_path=str(tiny_base))
    assert "device_map" not in load_kwargs(cfg, "qlora", "bf16", "sdpa", sharded=False, cuda=on_cuda(cpu))
    assert pick_attn_implementation("auto", "bf16", cuda=on_cuda(cpu)) == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not on_cuda(gpu)  # a GPU profile on a machine without one runs on the CPU, as before


# ---- GPU-only decisions, tested with the device facts patched ---------------------------------------------------

def _fake_gpus(monkeypatch, count=1, bf16_native=True, name="NVIDIA H100"):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    # emulation counts by default in torch: a V100 answers True unless including_emulation=False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: bf16_native or including_emulation)


def _gpu_check(recipe_args: list[str], profile_name: str, world: int = 1, backend_kind: str = "single"):
    from dpo_dist.config.recipe import load_recipe

    recipe = load_recipe("configs/recipes/qwen2.5-7b-sft-dpo-qlora.yaml", recipe_args)  # qlora
    profile = load_profile(profile_name)
    launch = Launch(world_size=world, rank=0, local_rank=0, accelerate_fsdp=backend_kind == "fsdp",
                    accelerate_deepspeed=False)
    check_run(recipe, profile, launch, Backend(backend_kind, None, 0, {}), cuda=True)


def test_bf16_on_a_gpu_that_only_emulates_it_is_refused(monkeypatch):
    _fake_gpus(monkeypatch, bf16_native=False, name="Tesla V100-SXM2-16GB")
    with pytest.raises(ConfigError, match=r"this GPU \(Tesla V100-SXM2-16GB\) has no native bf16.*v100-qlora"):
        _gpu_check([], "1gpu-bf16")
    _fake_gpus(monkeypatch, bf16_native=True)
    _gpu_check([], "1gpu-bf16")


def test_more_gpu_processes_than_visible_gpus_are_refused(monkeypatch):
    from dpo_dist.distributed.backends import Launch, check_devices

    _fake_gpus(monkeypatch, count=2)
    profile = load_profile("8xh100-fsdp-qlora")
    with pytest.raises(ConfigError, match=r"runs 8 GPU processes but 2 GPU\(s\) are visible.*--nproc-per-node"):
        check_devices(profile, 8, 0, cuda=True)
    check_devices(profile, 2, 1, cuda=True)
    check_devices(profile, 8, 0, cuda=False)  # a CPU process needs no GPU
    # on a rank: the launcher's LOCAL_WORLD_SIZE, or its own local rank
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="runs 4 GPU processes but 2"):
        _gpu_check([], "1gpu-bf16")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    _gpu_check([], "1gpu-bf16")
    # `dpo-dist launch` refuses it before starting the ranks
    monkeypatch.setattr("dpo_dist.distributed.backends.on_cuda", lambda profile: True)
    monkeypatch.setattr("dpo_dist.launch.command.on_cuda", lambda profile: True)
    assert cli.main(["launch", "configs/recipes/qwen2.5-72b-dpo-qlora.yaml", "--profile", "8xh100-fsdp-qlora",
                     "--dry-run"]) == 2


def test_bitsandbytes_optimizers_are_refused_under_fsdp_only(monkeypatch):
    _fake_gpus(monkeypatch, count=8)
    with pytest.raises(ConfigError, match=r"stages\.sft\.train\.optim: paged_adamw_8bit is a bitsandbytes "
                                          r"optimizer.*adamw_torch_fused"):
        _gpu_check(["train.optim=paged_adamw_8bit"], "8xh100-fsdp-qlora", world=8, backend_kind="fsdp")
    _gpu_check(["train.optim=adamw_torch_fused"], "8xh100-fsdp-qlora", world=8, backend_kind="fsdp")
    _gpu_check(["train.optim=paged_adamw_32bit"], "8gpu-ddp-qlora", world=8, backend_kind="ddp")


def test_the_bitsandbytes_optimizer_names_are_those_transformers_builds_from_bitsandbytes(tmp_path):
    from transformers import Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    from dpo_dist.distributed.backends import BITSANDBYTES_OPTIMIZERS

    found = set()
    for name in OptimizerNames:
        try:
            args = TrainingArguments(output_dir=str(tmp_path), optim=name.value, use_cpu=True, report_to=[])
            cls, _ = Trainer.get_optimizer_cls_and_kwargs(args)
        except (ImportError, ValueError, RuntimeError):  # needs a package or a device this machine lacks
            continue
        if getattr(cls, "__module__", "").startswith("bitsandbytes"):
            found.add(name.value)
    assert found == BITSANDBYTES_OPTIMIZERS


def test_zero_offload_without_a_way_to_build_cpu_adam_is_refused(monkeypatch):
    # DeepSpeed JIT-builds its CPU Adam at the first step of an offload run: without a compiler that step fails after
    # the whole model has loaded. Here a compiler and ninja exist (the check passes); then the compiler is taken away.
    import shutil

    from dpo_dist.distributed.backends import cpu_adam_facts

    assert cpu_adam_facts()["ok"], cpu_adam_facts()
    args = ["configs/recipes/qwen2.5-72b-dpo-qlora.yaml", "--profile", "8xh100-zero3-offload", "--dry-run",
            "method.type=full"]
    assert cli.main(["launch", *args]) == 0
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name in ("c++", "g++") else real_which(name))
    facts = cpu_adam_facts()
    assert not facts["ok"] and facts["detail"] == "not prebuilt, and cannot be built here: no C++ compiler (c++ or $CXX)"
    with pytest.raises(ConfigError, match=r"zero3-offload.json: offload_optimizer on the CPU steps with DeepSpeed's "
                                          r"CPU Adam, not prebuilt, and cannot be built here.*install a C\+\+ compiler"):
        from dpo_dist.launch.command import preflight

        preflight(args[0], load_profile("8xh100-zero3-offload"), ["method.type=full"], 1, sources=False)


def test_a_profile_that_changes_the_optimizer_says_so():
    from dpo_dist.distributed.backends import precision_notes
    from dpo_dist.config.recipe import load_recipe

    recipe = load_recipe("configs/recipes/qwen2.5-7b-sft-dpo-qlora.yaml")
    notes = precision_notes(recipe, load_profile("v100-qlora"))
    assert ("[train] stages.sft: profile v100-qlora steps with paged_adamw_32bit, not the recipe's train.optim "
            "adamw_torch") in notes
    assert not [n for n in precision_notes(recipe, load_profile("1gpu-bf16")) if "steps with" in n]
