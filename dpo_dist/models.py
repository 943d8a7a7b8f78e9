"""Tokenizer and model loading for full, LoRA and QLoRA training."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import torch

from dpo_dist.recipe import MethodConfig, ModelConfig
from dpo_dist.schema import ConfigError, error_line

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


_WARNED: set[str] = set()


def warn_remote_code(source: str) -> None:
    """trust_remote_code runs Python shipped with the model: off unless the recipe says so, and loud when on."""
    if source not in _WARNED:
        _WARNED.add(source)
        print(f"warning: trust_remote_code is on: Python code from {source} will run on this machine with your "
              "permissions; use it only for a model whose code you have read or trust", file=sys.stderr, flush=True)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.trust_remote_code:
        warn_remote_code(cfg.tokenizer or cfg.name_or_path)
    tok = AutoTokenizer.from_pretrained(
        cfg.tokenizer or cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


_FLASH: dict[bool, tuple[bool, str]] = {}


def flash_attn_status(cuda: bool | None = None) -> tuple[bool, str]:
    """(usable, why) for flash_attention_2 in this process, found by trying it rather than by finding the package:
    a flash-attn built for another torch or CUDA is found, but fails at import (an undefined symbol) or at its first
    kernel launch. Checks, in order: a GPU (``cuda``, default: one is visible), Ampere or newer, the package imports,
    and one tiny causal forward runs on the GPU in bf16 (fp16 where bf16 is not native). Probed once per process."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda in _FLASH:
        return _FLASH[cuda]
    _FLASH[cuda] = status = _probe_flash(cuda)
    return status


def _probe_flash(cuda: bool) -> tuple[bool, str]:
    if importlib.util.find_spec("flash_attn") is None:
        return False, "the flash-attn package is not installed"
    if not cuda:
        return False, "flash-attn runs on an NVIDIA GPU only, and this process trains on the CPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"flash-attn 2 needs compute capability 8.0 or newer (Ampere); this GPU is {major}.{minor}"
    try:
        from flash_attn import flash_attn_func
    except Exception as err:  # an ABI mismatch raises ImportError or OSError, a broken build anything
        return False, f"flash-attn is installed but does not import: {error_line(err)}"
    try:
        from dpo_dist.backends import bf16_native

        dtype = torch.bfloat16 if bf16_native() else torch.float16
        q = torch.randn(1, 16, 2, 64, device="cuda", dtype=dtype)
        out = flash_attn_func(q, q, q, causal=True)
        torch.cuda.synchronize()
        if not bool(torch.isfinite(out).all()):
            return False, "flash-attn's test forward returned non-finite values"
    except Exception as err:
        return False, f"flash-attn imports but its kernel fails on this GPU: {error_line(err)}"
    import flash_attn

    return True, f"flash-attn {getattr(flash_attn, '__version__', '?')} runs on this GPU"


def pick_attn_implementation(requested: str = "auto", precision: str = "fp32", cuda: bool | None = None) -> str:
    """sdpa by default; flash_attention_2 when it really runs here (flash_attn_status) at half precision; eager as
    a fallback. An installed flash-attn that fails its probe falls back to sdpa with a warning saying why; an explicit
    flash_attention_2 that cannot run is refused. ``cuda``: this process trains on a GPU
    (dpo_dist.backends.on_cuda); default: one is visible."""
    if requested != "auto":
        if requested == "flash_attention_2":
            usable, why = flash_attn_status(cuda)
            if not usable:
                raise ConfigError(f"attn_implementation flash_attention_2 cannot run here: {why}; use sdpa (or auto)")
        return requested
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and precision in ("fp16", "bf16") and importlib.util.find_spec("flash_attn") is not None:
        usable, why = flash_attn_status(cuda)
        if usable:
            return "flash_attention_2"
        _warn_once(f"warning: not using flash-attention: {why}; attention runs on sdpa")
    if hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return "sdpa"
    return "eager"


def _warn_once(line: str) -> None:
    if line not in _WARNED:
        _WARNED.add(line)
        print(line, file=sys.stderr, flush=True)


def model_dtype(method: str, precision: str) -> torch.dtype:
    """The dtype the model is loaded in. Full-parameter fine-tuning in bf16 or fp16 loads fp32 weights, the master
    weights the optimizer updates, and the Trainer's autocast computes in the half dtype: so every profile keeps fp32
    masters (FSDP2 upcasts trainable weights to fp32 itself, ZeRO-3 keeps its own fp32 copy), and an update smaller
    than half a bf16 step is kept rather than rounded away on one GPU only. LoRA and QLoRA load the frozen base at
    the precision; their adapters follow adapter_dtype."""
    if method == "full" and precision in ("fp16", "bf16"):
        return torch.float32
    return DTYPES[precision]


def quantization_config(precision: str):
    from transformers import BitsAndBytesConfig

    dtype = DTYPES[precision]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # equal to the model dtype, so FSDP can shard it with the rest
    )


def load_kwargs(cfg: ModelConfig, method: str, precision: str, attn: str, sharded: bool, cuda: bool) -> dict:
    kwargs = dict(
        dtype=model_dtype(method, precision),
        attn_implementation=attn,
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
    )
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config(precision)
        # bitsandbytes quantizes on the device it loads to: this rank's GPU. FSDP and ZeRO-3 place (and shard)
        # the weights themselves, and refuse a model already dispatched by a device_map.
        if cuda and not sharded:
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return kwargs


def load_model(cfg: ModelConfig, method: str, precision: str, attn_implementation: str = "auto",
               sharded: bool = False, cuda: bool | None = None):
    """Load the base model named by `cfg` for `method` (full | lora | qlora) at `precision`.

    `sharded`: FSDP or ZeRO-3 will shard the model, so it is loaded without a device_map. `cuda`: this process
    trains on a GPU (dpo_dist.backends.on_cuda: never under a CPU profile); default: one is visible."""
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available() if cuda is None else cuda
    attn = pick_attn_implementation(attn_implementation, precision, cuda)
    if cfg.trust_remote_code:
        warn_remote_code(cfg.name_or_path)
    kwargs = load_kwargs(cfg, method, precision, attn, sharded, cuda)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    except ValueError as err:
        if attn_implementation != "auto" or attn == "eager" or "attention" not in str(err).lower():
            raise
        log.warning("%s does not support %s attention; falling back to eager", cfg.name_or_path, attn)
        kwargs["attn_implementation"] = "eager"
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    model.config.use_cache = False
    return model


def lora_config(method: MethodConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=method.lora_r,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.lora_dropout,
        target_modules=method.target_modules or "all-linear",  # peft's all-linear excludes the output layer
        bias="none",
        task_type="CAUSAL_LM",
    )


def adapter_dtype(precision: str, backend: str = "single") -> torch.dtype:
    """One dtype for every trainable adapter weight.

    bf16: bf16, so FSDP2 (one dtype per sharded layer) and ZeRO-3 (whose coalesced all-gather of persistent
    parameters assumed one dtype, DeepSpeed #8072) see the same dtype as the bf16 base. fp16: fp32 master weights
    for torch's gradient scaler, except under DeepSpeed, which keeps its own fp32 master copy of fp16 weights."""
    if precision == "bf16" or (precision == "fp16" and backend == "deepspeed"):
        return DTYPES[precision]
    return torch.float32


def cast_trainable(model, dtype: torch.dtype) -> int:
    """Cast every trainable parameter to `dtype`. Returns how many were cast."""
    n = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
            n += 1
    return n


def _is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def resolve_base_and_adapter(model: str, adapter: str | None) -> tuple[str, str | None]:
    """(base model, adapter directory or None) for the tools that load a model: MODEL may itself be a LoRA adapter
    directory, whose base is the one its adapter_config.json records."""
    if _is_adapter(model):
        if adapter:
            raise ConfigError(f"{model} is a LoRA adapter directory and --adapter {adapter} was given too; "
                              "give MODEL as the base model, or drop --adapter")
        adapter = model
        config = json.loads((Path(model) / "adapter_config.json").read_text(encoding="utf-8"))
        model = config.get("base_model_name_or_path")
        if not model:
            raise ConfigError(f"{adapter}/adapter_config.json names no base_model_name_or_path; "
                              "give the base as MODEL and the adapter with --adapter")
    elif adapter and not _is_adapter(adapter):
        raise ConfigError(f"--adapter {adapter}: no adapter_config.json there; expected a saved LoRA adapter directory")
    return model, adapter


def tokenizer_source(base: str, adapter: str | None) -> str:
    """Where the tools load the tokenizer from: a trained adapter's directory when it holds one (training exports it
    there, with the chat template it trained with), else the base."""
    return adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base
