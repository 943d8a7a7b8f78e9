"""Model-loading choices that need no training."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from dpo_dist.config.schema import ConfigError
from dpo_dist.models.loading import adapter_dtype, model_dtype, pick_attn_implementation


def test_attention_is_sdpa_by_default_on_cpu():
    # cuda=False: a CPU process (its profile's device), whether or not this machine has a GPU
    assert pick_attn_implementation("auto", "bf16", cuda=False) == "sdpa"
    assert pick_attn_implementation("eager", cuda=False) == "eager"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_the_package_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="flash_attention_2 cannot run here: the flash-attn package is not "
                                          "installed; use sdpa"):
        pick_attn_implementation("flash_attention_2")


def test_dtypes_follow_the_precision():
    assert model_dtype("qlora", "fp16") == torch.float16 and model_dtype("lora", "bf16") == torch.bfloat16
    # Full-parameter mixed precision keeps fp32 master weights on every profile; autocast computes in 16-bit.
    assert model_dtype("full", "fp16") == torch.float32 and model_dtype("full", "bf16") == torch.float32
    assert model_dtype("full", "fp32") == torch.float32 and model_dtype("lora", "fp32") == torch.float32
    assert adapter_dtype("fp16") == torch.float32 and adapter_dtype("bf16") == torch.bfloat16
    assert adapter_dtype("fp16", "fsdp") == torch.float32 and adapter_dtype("bf16", "deepspeed") == torch.bfloat16
    assert adapter_dtype("fp16", "deepspeed") == torch.float16  # DeepSpeed keeps its own fp32 master copy
    assert adapter_dtype("fp32", "deepspeed") == torch.float32


def test_a_flash_attn_that_does_not_import_falls_back_to_sdpa_with_the_reason(tmp_path, monkeypatch, capsys):
    # What a flash-attn wheel built for another torch does: it is found, then fails to import.
    import dpo_dist.distributed.devices as models

    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(models, "_FLASH", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert models.pick_attn_implementation("auto", "bf16", cuda=True) == "sdpa"
    err = capsys.readouterr().err
    assert "not using flash-attention: flash-attn is installed but does not import: ImportError" in err
    assert "undefined symbol" in err
    with pytest.raises(ConfigError, match="flash_attention_2 cannot run here: flash-attn is installed but does not"):
        models.pick_attn_implementation("flash_attention_2", "bf16", cuda=True)
    monkeypatch.setattr(models, "_FLASH", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert models.flash_attn_status(cuda=True) == (
        False, "flash-attn 2 needs compute capability 8.0 or newer (Ampere); this GPU is 7.0")


def test_export_cast_keeps_tied_weights_shared_and_refuses_fp16_overflow():
    from types import SimpleNamespace

    from dpo_dist.training.common import cast_floats, export_dtype

    assert export_dtype(SimpleNamespace(bf16=True, fp16=False)) == torch.bfloat16
    assert export_dtype(SimpleNamespace(bf16=False, fp16=True)) == torch.float16
    assert export_dtype(SimpleNamespace(bf16=False, fp16=False)) == torch.float32
    embed = torch.randn(4, 3)
    state = {"embed.weight": embed, "lm_head.weight": embed, "norm.weight": torch.ones(3),
             "position_ids": torch.arange(3)}
    out = cast_floats(state, torch.bfloat16)
    assert out["embed.weight"] is out["lm_head.weight"]  # save_pretrained finds tied copies by shared storage
    assert out["norm.weight"].dtype == torch.bfloat16 and out["position_ids"].dtype == torch.int64
    with pytest.raises(ValueError, match="big.weight.*fp16"):
        cast_floats({"big.weight": torch.tensor([7e4])}, torch.float16)
