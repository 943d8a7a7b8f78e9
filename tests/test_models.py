"""Model-loading choices that need no training."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from dpo_dist.models import adapter_dtype, model_dtype, pick_attn_implementation


def test_attention_is_sdpa_by_default_on_cpu():
    # cuda=False: a CPU process (its profile's device), whether or not this machine has a GPU
    assert pick_attn_implementation("auto", "bf16", cuda=False) == "sdpa"
    assert pick_attn_implementation("eager", cuda=False) == "eager"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_the_package_is_refused_with_the_fix():
    with pytest.raises(RuntimeError, match="flash-attn.*sdpa"):
        pick_attn_implementation("flash_attention_2")


def test_dtypes_follow_the_precision():
    assert model_dtype("qlora", "fp16") == torch.float16 and model_dtype("lora", "bf16") == torch.bfloat16
    assert model_dtype("full", "fp16") == torch.float32  # mixed precision keeps fp32 master weights
    assert adapter_dtype("fp16") == torch.float32 and adapter_dtype("bf16") == torch.bfloat16
    assert adapter_dtype("fp16", "fsdp") == torch.float32 and adapter_dtype("bf16", "deepspeed") == torch.bfloat16
    assert adapter_dtype("fp16", "deepspeed") == torch.float16  # DeepSpeed keeps its own fp32 master copy
    assert adapter_dtype("fp32", "deepspeed") == torch.float32
