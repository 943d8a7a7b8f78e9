"""Every shipped recipe and launch profile loads, and the Firefly recipes carry the published numbers."""
from __future__ import annotations

from pathlib import Path

import pytest

from dpo_dist.config.profiles import load_profile
from dpo_dist.config.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
PROFILES = sorted((ROOT / "launch").glob("*.yaml"))


def test_configs_exist():
    assert RECIPES and PROFILES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.stages
    assert recipe.name


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_profile_loads(path):
    profile = load_profile(str(path))
    assert profile.name == path.stem or profile.name


def _check_firefly_common(recipe, stage):
    method = recipe.method_of(stage)
    assert (method.type, method.lora_r, method.lora_alpha, method.lora_dropout) == ("qlora", 64, 16, 0.05)
    assert method.target_modules is None
    t = stage.train
    assert t.learning_rate == pytest.approx(2e-4)
    assert t.global_batch_size == 32
    assert t.lr_scheduler == "constant_with_warmup"
    assert t.optim == "paged_adamw_32bit"
    assert t.gradient_checkpointing is True
    assert recipe.model.template == "qwen"


def _check_firefly_sft(recipe, stage):
    _check_firefly_common(recipe, stage)
    assert stage.stage == "sft"
    assert stage.max_length == 2048
    assert stage.train.warmup_steps == 700
    assert stage.data.format == "firefly"


def _check_firefly_dpo(recipe, stage):
    _check_firefly_common(recipe, stage)
    assert stage.stage == "dpo"
    assert stage.max_length == 1600
    assert stage.max_prompt_length == 500
    assert stage.train.warmup_steps == 200
    assert stage.beta == pytest.approx(0.1)
    assert stage.loss_type == "sigmoid"
    assert stage.data.format == "ultrafeedback"


RECIPE_DIR = ROOT / "configs" / "recipes"


def test_firefly_sft_published_values():
    recipe = load_recipe(RECIPE_DIR / "firefly-qwen1.5-7b-sft-qlora.yaml")
    assert recipe.model.name_or_path == "Qwen/Qwen1.5-7B"
    (stage,) = recipe.stages
    _check_firefly_sft(recipe, stage)
    t = stage.train
    assert t.fp16 is True and t.bf16 is False
    assert t.num_epochs == 1
    assert t.weight_decay == 0
    assert t.max_grad_norm == pytest.approx(0.3)
    assert (t.logging_steps, t.save_steps) == (100, 500)


def test_firefly_dpo_published_values():
    recipe = load_recipe(RECIPE_DIR / "firefly-qwen1.5-7b-dpo-qlora.yaml")
    (stage,) = recipe.stages
    _check_firefly_dpo(recipe, stage)
    assert stage.train.fp16 is True and stage.train.bf16 is False


@pytest.mark.parametrize("name, precision", [
    ("firefly-qwen1.5-7b-sft-dpo-qlora.yaml", "fp16"),
    ("qwen2.5-7b-sft-dpo-qlora.yaml", "bf16"),
    ("llama3.1-8b-sft-dpo-qlora.yaml", "bf16"),
])
def test_chained_recipes(name, precision):
    recipe = load_recipe(RECIPE_DIR / name)
    assert recipe.chain is True
    sft, dpo = recipe.stages
    for stage in (sft, dpo):
        assert stage.train.precision == precision
    if name.startswith("firefly"):
        assert recipe.model.name_or_path == "Qwen/Qwen1.5-7B"
        _check_firefly_sft(recipe, sft)
        _check_firefly_dpo(recipe, dpo)
    else:
        assert [s.stage for s in recipe.stages] == ["sft", "dpo"]
        assert (sft.max_length, sft.train.warmup_steps) == (2048, 700)
        assert (dpo.max_length, dpo.max_prompt_length, dpo.train.warmup_steps) == (1600, 500, 200)


def test_qwen25_72b_dpo():
    recipe = load_recipe(RECIPE_DIR / "qwen2.5-72b-dpo-qlora.yaml")
    (stage,) = recipe.stages
    assert recipe.model.name_or_path == "Qwen/Qwen2.5-72B-Instruct"
    m = recipe.method
    assert (m.type, m.lora_r, m.lora_alpha, m.lora_dropout) == ("qlora", 16, 32, 0.05)
    assert (stage.max_length, stage.max_prompt_length, stage.beta) == (2048, 1024, 0.1)
    t = stage.train
    assert t.bf16 and not t.fp16 and t.gradient_checkpointing
    assert (t.global_batch_size, t.lr_scheduler, t.warmup_ratio, t.optim) == (64, "cosine", 0.1, "adamw_torch")
    assert t.learning_rate == pytest.approx(5e-5)
