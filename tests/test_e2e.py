"""End to end on CPU: a tiny Qwen2 trains through recipe → data → model → trainer, then the files, the metrics
and a resume are checked."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dpo_dist.config.profiles import Profile
from dpo_dist.config.recipe import recipe_from_dict
from dpo_dist.training.common import read_metrics
from dpo_dist.training.run import run_recipe
from tests.helpers import write_jsonl

pytestmark = pytest.mark.e2e
PROFILE = Profile(name="test", micro_batch_size=2, precision="fp32", attn_implementation="sdpa")
DPO_KEYS = {"loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
            "rewards/margins", "logps/chosen", "logps/rejected", "tokens_per_s"}


@pytest.fixture
def data(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [
        {"conversation": [{"human": f"Tell me about the fox {i}.", "assistant": "It is kind. It sleeps."}]}
        for i in range(16)])
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": f"Describe the owl {i}.", "chosen": "It is calm.", "rejected": "It is rude."} for i in range(16)])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "The fox is kind. It sleeps in the sun."}] * 40)
    return {"sft": str(sft), "dpo": str(dpo), "pretrain": str(text)}


def make_recipe(base, out, stages, data, method="lora", **extra):
    stage_list = [{"stage": s, "data": {"train": data[s]}, "max_length": 48,
                   **({"max_prompt_length": 24} if s == "dpo" else {})} for s in stages]
    return recipe_from_dict({
        "name": "t", "model": {"name_or_path": str(base), "template": "qwen"},
        "method": {"type": method, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {"learning_rate": 1e-3, "global_batch_size": 4, "max_steps": 4, "logging_steps": 1,
                  "save_steps": 2, "save_total_limit": 3, "lr_scheduler": "constant"},
        "output_dir": str(out), "stages": stage_list, **extra})


def test_sft_lora_writes_adapter_metrics_summary_and_resumes(tiny_base, tmp_path, data):
    recipe = make_recipe(tiny_base, tmp_path / "run", ["sft"], data)
    (result,) = run_recipe(recipe, PROFILE, log=lambda *_: None)
    run = result.run_dir
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json", "data_report.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json"):
        assert (run / name).is_file(), name
    metrics = [m for m in read_metrics(run) if "loss" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all({"loss", "grad_norm", "learning_rate", "tokens_per_s"} <= m.keys() for m in metrics)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["data"]["rows"] == 16 and summary["method"] == "lora"
    adapter = load_file(run / "adapter/adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # it trained
    assert not any("lm_head" in k for k in adapter)  # all linear layers except the output layer
    assert {p.name for p in (run / "checkpoints").glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}

    # A finished stage is skipped by --resume: nothing is retrained or rewritten.
    summary_text = (run / "summary.json").read_text()
    assert run_recipe(recipe, PROFILE, resume=True, log=lambda *_: None) == []
    assert (run / "summary.json").read_text() == summary_text

    # Resume from checkpoint-2 (as after a crash after step 3: no checkpoint-4, no final adapter or summary):
    # the same final adapter, the same step-3/4 losses.
    import shutil
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (resumed,) = run_recipe(recipe, PROFILE, resume=True, log=lambda *_: None)
    again = load_file(run / "adapter/adapter_model.safetensors")
    for key in adapter:
        torch.testing.assert_close(again[key], adapter[key], rtol=1e-5, atol=1e-6)
    after = [m for m in read_metrics(run) if "loss" in m]
    assert [m["step"] for m in after] == [1, 2, 3, 4]
    for a, b in zip(after[2:], metrics[2:]):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5)


def test_pretrain_full_packs_text_and_saves_a_model(tiny_base, tmp_path, data):
    recipe = make_recipe(tiny_base, tmp_path / "run", ["pretrain"], data, method="full")
    (result,) = run_recipe(recipe, PROFILE, log=lambda *_: None)
    assert (result.output / "model.safetensors").is_file() and (result.output / "config.json").is_file()
    report = json.loads((result.run_dir / "data_report.json").read_text())["train"]
    assert report["rows"] == 40 and report["examples"] == math.ceil(report["tokens"] / 48)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dpo_trains_and_logs_preference_metrics(tiny_base, tmp_path, data, method):
    recipe = make_recipe(tiny_base, tmp_path / "run", ["dpo"], data, method=method)
    (result,) = run_recipe(recipe, PROFILE, log=lambda *_: None)
    metrics = [m for m in read_metrics(result.run_dir) if "loss" in m]
    assert len(metrics) == 4
    assert all(DPO_KEYS <= m.keys() for m in metrics[1:]), metrics[1].keys()
    first = metrics[0]  # step 1 is logged from the untrained adapter: policy == reference
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert math.isclose(first["loss"], math.log(2), abs_tol=1e-6)
    assert metrics[-1]["rewards/margins"] > 0  # it learned the preference
    adapter = load_file(result.output / "adapter_model.safetensors")
    # trl stores QLoRA adapters in bf16; dpo_dist.models.loading.cast_trainable keeps them at the fp32 precision.
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())


def test_qlora_loads_nf4_with_double_quant_and_storage_at_model_dtype(tiny_base):
    import bitsandbytes as bnb

    from dpo_dist.models.loading import load_model
    from dpo_dist.config.recipe import ModelConfig

    model = load_model(ModelConfig(name_or_path=str(tiny_base)), "qlora", "fp32", "sdpa")
    q = model.config.quantization_config
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float32 and q.bnb_4bit_quant_storage == torch.float32
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.dtype == torch.float32 for m in layers)  # packed 4-bit in fp32 storage

    # The summary counts bitsandbytes' layers once, not again for the LoRA wrappers that share their class name.
    from peft import get_peft_model

    from dpo_dist.models.loading import lora_config
    from dpo_dist.config.recipe import MethodConfig
    from dpo_dist.training.common import model_facts

    wrapped = get_peft_model(model, lora_config(MethodConfig(type="qlora")))
    assert model_facts(wrapped)["linear4bit_modules"] == len(layers)


def test_simpo_loss_is_reference_free_and_trains(tiny_base, tmp_path, data):
    recipe = make_recipe(tiny_base, tmp_path / "run", ["dpo"], data, **{})
    recipe.stages[0].loss_type = "simpo"
    (result,) = run_recipe(recipe, PROFILE, log=lambda *_: None)
    metrics = [m for m in read_metrics(result.run_dir) if "loss" in m]
    # Without a reference the step-1 rewards are β·mean log-probs, not 0, and the loss is not ln 2.
    assert metrics[0]["rewards/chosen"] < 0 and not math.isclose(metrics[0]["loss"], math.log(2), abs_tol=1e-3)
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_chained_sft_then_dpo_starts_from_the_merged_sft_model(tiny_base, tmp_path, data, monkeypatch):
    import dpo_dist.data.tokenize as tk
    from dpo_dist.training.prepare import prepare_recipe

    recipe = make_recipe(tiny_base, tmp_path / "run", ["sft", "dpo"], data)
    assert prepare_recipe(recipe, log=lambda *_: None) == 0  # `dpo-dist prepare`: the tokenizer only

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("training tokenized data that prepare had tokenized")

    monkeypatch.setattr(tk, "_build", no_tokenizing)
    sft, dpo = run_recipe(recipe, PROFILE, log=lambda *_: None)
    # Both stages, the chained DPO stage on the merged SFT model included, read what prepare wrote.
    assert sft.summary["data"]["from_cache"] and dpo.summary["data"]["from_cache"]
    merged = sft.run_dir / "merged"
    assert sft.model_path == str(merged) and (merged / "model.safetensors").is_file()
    assert (merged / "tokenizer.json").is_file()
    assert json.loads((dpo.run_dir / "summary.json").read_text())["base"] == str(merged)
    # The DPO reference is the SFT model: at step 1 the rewards are exactly 0 against it.
    first = next(m for m in read_metrics(dpo.run_dir) if "loss" in m)
    assert first["rewards/chosen"] == 0.0 and math.isclose(first["loss"], math.log(2), abs_tol=1e-6)
    # The merged weights are the base plus the SFT adapter, not the base.
    base = load_file(tiny_base / "model.safetensors")
    merged_w = load_file(merged / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[key], merged_w[key])
    # Merged logits equal base + adapter logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 40, 77, 2]])
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                                                 str(sft.output))(ids).logits
    torch.testing.assert_close(merged_logits, with_adapter, rtol=1e-4, atol=1e-4)
    # Re-running only the DPO stage starts from the finished SFT stage's recorded result.
    (again,) = run_recipe(recipe, PROFILE, only="dpo", log=lambda *_: None)
    assert again.summary["base"] == str(merged)


def test_full_bf16_keeps_fp32_masters_exports_bf16_and_chains(tiny_base, tmp_path, data):
    """Full-parameter bf16 trains fp32 master weights on one process too, as FSDP2 and ZeRO-3 do: an update far
    below bf16's resolution is kept, not rounded away. The exported model is bf16, and the chained DPO stage trains it
    in fp32 against a reference loaded like the policy."""
    lr = 1e-6  # Adam's first step moves each weight by about lr: 1 ± 1e-6 is 1.0 again in bf16, not in fp32
    recipe = make_recipe(tiny_base, tmp_path / "run", ["sft", "dpo"], data, method="full")
    for stage in recipe.stages:
        stage.train.max_steps, stage.train.save_steps, stage.train.learning_rate = 1, 1, lr
    bf16 = Profile(name="test-bf16", micro_batch_size=2, precision="bf16", attn_implementation="sdpa")
    sft, dpo = run_recipe(recipe, bf16, keep_trainer=True, log=lambda *_: None)
    for result in (sft, dpo):
        assert result.summary["precision"] == "bf16"
        assert result.summary["model"]["trainable_dtypes"] == ["float32"]
        assert result.summary["model"]["param_dtypes"] == ["float32"]

    # The masters after one step (the checkpoint holds them as trained): every weight moved by about lr, and the
    # norms, which start at exactly 1.0, moved by an amount bf16 cannot hold.
    base = load_file(tiny_base / "model.safetensors")
    masters = load_file(sft.run_dir / "checkpoints" / "checkpoint-1" / "model.safetensors")
    assert masters.keys() == base.keys()
    norms = [k for k in masters if k.endswith("norm.weight")]
    assert norms
    for key, after in masters.items():
        assert after.dtype == torch.float32, key
        delta = after - base[key]
        assert 0 < delta.abs().max() <= 2 * lr, key  # the update, and no bf16 rounding of the start
    for key in norms:
        assert torch.equal(base[key], torch.ones_like(base[key]))
        moved = masters[key] != 1.0
        assert moved.float().mean() > 0.9, key
        rounded = (torch.ones_like(base[key], dtype=torch.bfloat16) + (masters[key] - 1.0).to(torch.bfloat16))
        assert torch.equal(rounded, torch.ones_like(rounded)), key  # bf16 weights would have kept 1.0

    # The export is the masters in bf16, tied embeddings still tied, and says so in its config.
    exported = load_file(sft.output / "model.safetensors")
    assert exported.keys() == masters.keys()
    for key, tensor in exported.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, masters[key].to(torch.bfloat16)), key
    assert json.loads((sft.output / "config.json").read_text())["dtype"] == "bfloat16"

    # The chained DPO stage loads that export as fp32 masters, and trl loads the reference in the policy's dtype (as
    # dpo-dist plan counts it: 4 B per parameter on one GPU), so at step 1 the two compute alike: rewards 0, loss ln 2.
    assert dpo.summary["base"] == str(sft.output)
    trainer = dpo.trainer
    assert {p.dtype for p in trainer.ref_model.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    first = next(m for m in read_metrics(dpo.run_dir) if "loss" in m)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert math.isclose(first["loss"], math.log(2), abs_tol=1e-6)
    assert {t.dtype for t in load_file(dpo.output / "model.safetensors").values()} == {torch.bfloat16}
