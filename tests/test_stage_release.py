"""Chained stages: stage 1's model, optimizer and trainer are gone before stage 2 loads its model (on a 16 GB V100,
Firefly's SFT→DPO chain has no room for both)."""
from __future__ import annotations

import gc
import weakref

import pytest

from dpo_dist.config.profiles import Profile
from dpo_dist.config.recipe import recipe_from_dict
from tests.helpers import write_jsonl

pytestmark = pytest.mark.e2e


def test_stage_one_is_released_before_stage_two_loads(tiny_base, tmp_path, monkeypatch):
    import dpo_dist.models.loading as models
    from dpo_dist.training.run import run_recipe

    sft = write_jsonl(tmp_path / "sft.jsonl", [
        {"conversation": [{"human": f"Tell me about the fox {i}.", "assistant": "It is kind."}]} for i in range(8)])
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": f"Describe the owl {i}.", "chosen": "It is calm.", "rejected": "It is rude."} for i in range(8)])
    recipe = recipe_from_dict({
        "name": "t", "chain": True, "model": {"name_or_path": str(tiny_base), "template": "qwen"},
        "method": {"type": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {"learning_rate": 1e-3, "global_batch_size": 4, "max_steps": 1, "logging_steps": 1,
                  "save_steps": 100, "lr_scheduler": "constant"},
        "output_dir": str(tmp_path / "run"),
        "stages": [{"stage": "sft", "data": {"train": str(sft)}, "max_length": 48},
                   {"stage": "dpo", "data": {"train": str(dpo)}, "max_length": 48, "max_prompt_length": 24}]})
    loaded, alive_at_next_load = [], []
    real_load = models.load_model

    def load_model(*args, **kwargs):
        # Before loading, without collecting garbage here: run_recipe must have dropped (and collected) stage 1.
        alive_at_next_load.extend(ref() is not None for ref in loaded)
        model = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(models, "load_model", load_model)
    gc.disable()  # the collector must not happen to run on its own between the stages: run_recipe has to
    try:
        results = run_recipe(recipe, Profile(name="t", micro_batch_size=2, precision="fp32",
                                             attn_implementation="sdpa"), log=lambda *_: None)
    finally:
        gc.enable()
    assert [r.name for r in results] == ["sft", "dpo"] and len(loaded) == 2, (alive_at_next_load, len(loaded))
    assert alive_at_next_load == [False]  # stage 1's model was gone when stage 2 loaded
