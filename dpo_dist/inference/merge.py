"""Merge a LoRA/QLoRA adapter into a full-precision copy of its base model (never into 4-bit weights).

The adapter may be an exported adapter directory, a stage's run directory, or one of its Trainer checkpoints,
including the sharded ones FSDP (torch.distributed.checkpoint shards) and ZeRO-3 (per-rank partitions) write.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from dpo_dist import compat
from dpo_dist.models.export import stop_ids, write_generation_config
from dpo_dist.models.loading import DTYPES
from dpo_dist.config.schema import ConfigError

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@contextmanager
def _zero3_off():
    """A ZeRO-3 run leaves transformers' global DeepSpeed config set, so from_pretrained would partition the base
    across ranks (a collective) while only rank 0 merges, and hang. Load it whole, then restore the setting."""
    from transformers.integrations import deepspeed as hf_deepspeed

    compat.patch("transformers-zero3-merge")
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def merge_adapter(base: str, adapter: str | Path, out: str | Path, dtype: str = "bf16",
                  trust_remote_code: bool = False, max_shard_size: str = "5GB", log=print) -> Path:
    """Load `base` at `dtype`, apply `adapter`, merge, and save sharded safetensors plus the tokenizer (with the chat
    template the adapter was trained with) to `out`."""
    from transformers import AutoConfig

    from dpo_dist.inference.loader import load_model

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if trust_remote_code:
        from dpo_dist.models.loading import warn_remote_code

        warn_remote_code(base)
    quantized = getattr(AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code), "quantization_config",
                        None)
    if quantized:  # merging into NF4/int8 weights would round the adapter's update away
        raise ConfigError(f"--base {base}: the base is stored quantized ({quantized.get('quant_method', 'unknown')}); "
                          "give the full-precision base the adapter was trained on (QLoRA quantizes it on load)")
    with tempfile.TemporaryDirectory(prefix="dpo-dist-adapter-") as scratch:
        adapter_dir = resolve_adapter(Path(adapter), base, Path(scratch), log)
        with _zero3_off():
            model = load_model(base, str(adapter_dir), dtype=dtype, trust_remote_code=trust_remote_code,
                               what="--base", merge=True)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer = _tokenizer(adapter_dir, Path(adapter), base, trust_remote_code)
        tokenizer.save_pretrained(tmp)
        # Stop where the adapter was trained to stop: the ids its export recorded, else its template's end of turn.
        write_generation_config(tmp, base, tokenizer, _end_of_turn(tokenizer),
                                also=stop_ids(adapter_dir) or stop_ids(Path(adapter)),
                                trust_remote_code=trust_remote_code)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def resolve_adapter(adapter: Path, base: str, scratch: Path, log=print) -> Path:
    """A PEFT adapter directory for `adapter`: itself when it is one; a run directory's adapter/ (else its newest
    complete checkpoint); a checkpoint's adapter, rebuilt in `scratch` from FSDP or ZeRO-3 shards when needed."""
    from dpo_dist.reliability.checkpoints import latest_complete

    if not adapter.is_dir():
        raise ConfigError(f"--adapter {adapter}: no such directory")
    if _has_adapter_weights(adapter):
        return adapter
    if (adapter / "checkpoints").is_dir() or (adapter / "adapter").is_dir():  # a stage's run directory
        if _has_adapter_weights(adapter / "adapter"):
            return adapter / "adapter"
        ckpt = latest_complete(adapter)
        if ckpt is None:
            raise ConfigError(f"--adapter {adapter}: a run directory with neither adapter/ nor a complete checkpoint")
        log(f"[merge] {adapter} has no exported adapter; using its newest complete checkpoint {ckpt.name}")
        adapter = ckpt
    fsdp = sorted(adapter.glob("pytorch_model_fsdp_*"))
    zero = (adapter / "latest").is_file() or any(adapter.glob("global_step*"))
    if not fsdp and not zero:
        raise ConfigError(f"--adapter {adapter}: not a LoRA adapter (no adapter_config.json and {ADAPTER_WEIGHTS}), "
                          "a run directory, or an FSDP/ZeRO-3 checkpoint")
    weights = _from_fsdp(fsdp[0]) if fsdp else _from_zero(adapter)
    if not weights:
        raise ConfigError(f"--adapter {adapter}: the checkpoint holds no LoRA weights; it is not from a LoRA/QLoRA run")
    log(f"[merge] rebuilt the adapter ({len(weights)} tensors) from the "
        f"{'FSDP' if fsdp else 'ZeRO-3'} shards of {adapter}")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(scratch / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if (adapter / "adapter_config.json").is_file():
        shutil.copy(adapter / "adapter_config.json", scratch / "adapter_config.json")
    else:
        _adapter_config(adapter, base).save_pretrained(str(scratch))
    return scratch


def _has_adapter_weights(path: Path) -> bool:
    """An adapter directory with weights in it: a ZeRO-3 checkpoint saved without gathering holds an empty file."""
    if not ((path / "adapter_config.json").is_file() and (path / ADAPTER_WEIGHTS).is_file()):
        return False
    from safetensors import safe_open

    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        return any(f.get_slice(k).get_shape() and 0 not in f.get_slice(k).get_shape() for k in f.keys())


def _from_fsdp(shards: Path) -> dict[str, torch.Tensor]:
    """Read an FSDP sharded state dict (torch.distributed.checkpoint) on one process. A PEFT model's holds only the
    adapter, keyed as the wrapped module saw it: `model.` + the name PEFT's own files use."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from dpo_dist.distributed.safe_loading import harden_dcp_loading

    harden_dcp_loading()  # DCP unpickles .metadata; only allowlisted classes pass
    reader = dcp.FileSystemReader(str(shards))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return {k.removeprefix("model."): v for k, v in state.items() if ".lora_" in k}


def _from_zero(ckpt: Path) -> dict[str, torch.Tensor]:
    """Rebuild the trainable (adapter) weights from ZeRO-3's per-rank fp32 partitions, for checkpoints saved without
    stage3_gather_16bit_weights_on_model_save."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dpo_dist.distributed.safe_loading import harden_deepspeed_loading

    harden_deepspeed_loading()
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    # PEFT's files drop the adapter name that the live module names carry (`lora_A.default.weight`).
    return {_drop_adapter_name(k): v for k, v in state.items() if ".lora_" in k}


def _drop_adapter_name(key: str) -> str:
    return re.sub(r"(\.lora_\w+?)\.[^.]+(?=\.(weight|bias)$)", r"\1", key)


def _run_recipe(path: Path):
    """The resolved recipe a stage's run directory keeps, when `path` is that directory, its adapter/ or one of its
    checkpoints/checkpoint-N; else None. Returns (recipe, run_dir)."""
    from dpo_dist.config.recipe import load_recipe

    for run_dir, fits in ((path, (path / "checkpoints").is_dir() or (path / "adapter").is_dir()),
                          (path.parent, path.name == "adapter"),
                          (path.parent.parent, path.parent.name == "checkpoints")):
        if fits and (run_dir / "recipe.yaml").is_file():
            return load_recipe(run_dir / "recipe.yaml"), run_dir
    return None, path.parent.parent


def _adapter_config(ckpt: Path, base: str):
    """FSDP checkpoints carry weights only; the LoRA settings come from the run's saved recipe."""
    from dpo_dist.models.loading import lora_config

    recipe, run_dir = _run_recipe(ckpt)
    if recipe is None:
        raise ConfigError(f"--adapter {ckpt}: a sharded checkpoint without adapter_config.json, and no recipe.yaml in "
                          f"{run_dir} to take the LoRA settings from")
    try:
        stage = recipe.stage(run_dir.name)
    except KeyError:
        raise ConfigError(f"--adapter {ckpt}: {run_dir / 'recipe.yaml'} has no stage named {run_dir.name!r}") from None
    config = lora_config(recipe.method_of(stage))
    config.base_model_name_or_path = str(base)
    config.inference_mode = True
    return config


def _tokenizer(adapter_dir: Path, given: Path, base: str, trust_remote_code: bool):
    """The tokenizer saved with the adapter (else the base's), with the chat template the run trained with: an
    exported adapter's tokenizer already carries it; a checkpoint's takes it from the run's recipe."""
    from transformers import AutoTokenizer

    saved = next((d for d in (adapter_dir, given) if (d / "tokenizer_config.json").is_file()), None)
    tokenizer = AutoTokenizer.from_pretrained(str(saved or base), trust_remote_code=trust_remote_code)
    recipe, _ = _run_recipe(given)
    if recipe is not None and recipe.model.template:
        from dpo_dist.data.templates import get_template

        tokenizer.chat_template = get_template(recipe.model.template).standalone_source()
    return tokenizer


def _end_of_turn(tokenizer) -> str | None:
    """The end-of-turn token of the tokenizer's chat template (the one training saved with it), if it has one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    from dpo_dist.data.render import Renderer, TemplateError

    try:
        return Renderer(tokenizer).eot_token
    except TemplateError:
        return None


def describe(out: Path) -> str:
    """What was written: shards and size."""
    shards = sorted(Path(out).glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards) / 2**20
    return f"{len(shards)} safetensors shard{'s' if len(shards) != 1 else ''}, {size:.1f} MiB"
