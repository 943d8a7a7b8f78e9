"""Merge a LoRA/QLoRA adapter into a full-precision copy of its base model (never into 4-bit weights)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def merge_adapter(base: str, adapter: str | Path, out: str | Path, dtype: str = "bf16",
                  trust_remote_code: bool = False, max_shard_size: str = "5GB") -> Path:
    """Load `base` at `dtype`, apply `adapter`, merge, and save sharded safetensors plus the tokenizer to `out`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: no adapter_config.json; expected a saved LoRA adapter directory")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
