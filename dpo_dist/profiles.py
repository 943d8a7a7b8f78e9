"""Launch profiles: how a recipe runs on a hardware shape (never what it learns).

A profile may set precision, attention, optimizer, micro-batch and gradient checkpointing. The global batch
always comes from the recipe; gradient accumulation is derived from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dpo_dist.schema import ConfigError, build, load_yaml

LAUNCH_DIR = Path(__file__).resolve().parent.parent / "launch"


@dataclass
class Profile:
    name: str
    description: str = ""
    launcher: Literal["python", "accelerate", "deepspeed", "torchrun"] = "python"
    num_processes: int = 1
    micro_batch_size: int = 1
    precision: Literal["fp32", "fp16", "bf16"] | None = None  # null = the recipe's fp16/bf16 keys
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    optim: str | None = None  # null = the recipe's optimizer
    gradient_checkpointing: bool | None = None  # null = the recipe's setting

    def check(self, where: str) -> None:
        for key in ("num_processes", "micro_batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where + '.' if where else ''}{key}: must be positive, got {getattr(self, key)}")


DEFAULT_PROFILE = Profile(name="default", description="one process, micro-batch 1")


def load_profile(name_or_path: str | None) -> Profile:
    """`name_or_path` is a profile name from launch/ or a YAML path. None = one process, micro-batch 1."""
    if name_or_path is None:
        return DEFAULT_PROFILE
    path = Path(name_or_path)
    if not path.suffix:
        path = LAUNCH_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in LAUNCH_DIR.glob("*.yaml"))
            raise ConfigError(f"profile {name_or_path!r} not found in {LAUNCH_DIR}; available: {', '.join(names)}")
    data = load_yaml(path)
    data.setdefault("name", path.stem)
    try:
        return build(Profile, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def gradient_accumulation(global_batch: int, micro_batch: int, world_size: int, where: str = "train") -> int:
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ConfigError(
            f"{where}.global_batch_size: {global_batch} is not divisible by micro-batch {micro_batch} × "
            f"{world_size} process(es) = {per_step}; pick a global batch that is a multiple of {per_step}, "
            "or a profile with another micro-batch"
        )
    return global_batch // per_step
