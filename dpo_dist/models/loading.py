"""Tokenizer and model loading for full, LoRA and QLoRA training."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from dpo_dist.config.recipe import MethodConfig, ModelConfig
from dpo_dist.config.preflight import check_model
from dpo_dist.config.schema import ConfigError
from dpo_dist.distributed.devices import pick_attn_implementation
from dpo_dist.distributed.ranks import local_rank

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
            kwargs["device_map"] = {"": local_rank()}
    return kwargs


def load_model(cfg: ModelConfig, method: str, precision: str, attn_implementation: str = "auto",
               sharded: bool = False, cuda: bool | None = None):
    """Load the base model named by `cfg` for `method` (full | lora | qlora) at `precision`.

    `sharded`: FSDP or ZeRO-3 will shard the model, so it is loaded without a device_map. `cuda`: this process
    trains on a GPU (dpo_dist.distributed.backends.on_cuda: never under a CPU profile); default: one is visible."""
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
    # compat: deepspeed-zero3-adapter-dtype
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
        check_model(model, f"{adapter}/adapter_config.json: base_model_name_or_path")
        return model, adapter
    if adapter and not _is_adapter(adapter):
        raise ConfigError(f"--adapter {adapter}: no adapter_config.json there; expected a saved LoRA adapter directory")
    check_model(model, "MODEL")
    return model, adapter


def tokenizer_source(base: str, adapter: str | None) -> str:
    """Where the tools load the tokenizer from: a trained adapter's directory when it holds one (training exports it
    there, with the chat template it trained with), else the base."""
    return adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base
