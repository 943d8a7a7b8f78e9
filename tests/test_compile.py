"""train.torch_compile: the same DPO run compiled (inductor) and eager gives the same numbers."""
from __future__ import annotations

import pytest

from dpo_dist.config.profiles import Profile
from dpo_dist.config.recipe import ConfigError, TrainConfig, recipe_from_dict
from tests.helpers import write_jsonl

pytestmark = pytest.mark.e2e


def test_compiled_dpo_run_matches_eager(tiny_base, tmp_path):
    import torch._dynamo

    from dpo_dist.training.run import run_recipe

    data = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": f"Describe the owl {i}." + " And the fox." * (i % 3), "chosen": "It is calm." * (1 + i % 2),
         "rejected": "It is rude."} for i in range(8)])
    profile = Profile(name="t", micro_batch_size=4, precision="fp32", attn_implementation="sdpa")
    history = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        recipe = recipe_from_dict({
            "name": "t", "model": {"name_or_path": str(tiny_base), "template": "qwen"},
            "method": {"type": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
            "train": {"learning_rate": 1e-3, "global_batch_size": 4, "max_steps": 2, "logging_steps": 1,
                      "save_steps": 100, "lr_scheduler": "constant", "torch_compile": compiled,
                      # aot_eager: dynamo's graphs and AOTAutograd's joint forward/backward, as inductor gets them,
                      # without inductor's C++ code generation (minutes on 2 cores; its kernels are torch's to test)
                      "torch_compile_backend": "aot_eager"},
            "output_dir": str(tmp_path / f"run-{compiled}"),
            "stages": [{"stage": "dpo", "data": {"train": str(data)}, "max_length": 96}]})
        (result,) = run_recipe(recipe, profile, log=lambda *_: None, keep_trainer=True)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled, graphs  # really compiled, and only when asked
        history[compiled] = [(m["loss"], m["grad_norm"], m["rewards/margins"])
                             for m in result.trainer.state.log_history if "loss" in m]
    assert len(history[True]) == len(history[False]) == 2
    for eager, compiled in zip(history[False], history[True]):
        assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-6)
    assert history[False][1][2] != 0.0  # the policy moved, so agreement is not between untouched weights


def test_backend_is_checked():
    with pytest.raises(ConfigError, match=r"train\.torch_compile_backend: 'inductr' is not a torch\.compile backend"):
        TrainConfig(torch_compile=True, torch_compile_backend="inductr").check("stages[0].train")
    TrainConfig(torch_compile=False, torch_compile_backend="inductr").check("stages[0].train")  # unused: not checked
