"""Merge a LoRA/QLoRA adapter into a full-precision copy of its base model (never into 4-bit weights)."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextmanager
def _zero3_off():
    """A ZeRO-3 run leaves transformers' global DeepSpeed config set, so from_pretrained would partition the base
    across ranks (a collective) while only rank 0 merges, and hang. Load it whole, then restore the setting."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


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
    if trust_remote_code:
        from dpo_dist.models import warn_remote_code

        warn_remote_code(base)
    with _zero3_off():
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
