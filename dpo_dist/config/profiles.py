"""Launch profiles: how a recipe runs on a hardware shape (never what it learns).

A profile names its launcher, its backend file (configs/accelerate/*.yaml or configs/deepspeed/*.json), the
processes per node, precision, attention, optimizer, micro-batch and gradient checkpointing. The global batch
always comes from the recipe; gradient accumulation is derived from it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dpo_dist.config.resources import PROFILES as LAUNCH_DIR, find, shipped_names
from dpo_dist.config.schema import ConfigError, build, load_yaml

METHODS = ("full", "lora", "qlora")
ACCELERATE_PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass
class Profile:
    name: str
    description: str = ""
    launcher: Literal["python", "accelerate", "deepspeed", "torchrun"] = "python"
    device: Literal["gpu", "cpu"] = "gpu"  # what each process runs on; Slurm jobs request GPUs only for gpu
    # configs/accelerate/*.yaml; a relative path resolves against the directory that holds the profile's launch/
    # folder, then the working directory, then the shipped files (dpo_dist.config.resources)
    accelerate_config: str | None = None
    deepspeed_config: str | None = None  # configs/deepspeed/*.json
    num_processes: int = 1  # per node
    num_nodes: int = 1
    methods: list[Literal["full", "lora", "qlora"]] = field(default_factory=lambda: list(METHODS))
    micro_batch_size: int = 1
    precision: Literal["fp32", "fp16", "bf16"] | None = None  # null = the recipe's fp16/bf16 keys
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    optim: str | None = None  # null = the recipe's optimizer
    gradient_checkpointing: bool | None = None  # null = the recipe's setting
    # Sequence parallelism: each sequence is split along its length over this many processes, which run it together
    # (activations and logits per process fall by the factor). The data-parallel degree is then processes / N, and
    # gradient accumulation is derived from that, so the global batch stays the recipe's. 1 = off.
    sequence_parallel: int = 1
    # deepspeed: DeepSpeed's Ulysses (all-to-all of attention heads), under ZeRO-3 only. torch: torch's context
    # parallelism under FSDP2, which dpo-dist refuses for now (see the error).
    sequence_parallel_backend: Literal["deepspeed", "torch"] = "deepspeed"
    # Seconds a collective may wait for the other ranks before the run fails with an error naming the step (a hung or
    # dead rank). It must cover the longest wait of a healthy run: the model download while the others wait, a step, an
    # evaluation, a checkpoint save with its fsync. Tokenizing the data is not in it: the ranks that wait for a
    # cache entry wait on the entry, not in a collective (dpo_dist.data.cache).
    collective_timeout_s: int = 1800
    source: str = ""  # the file it was read from

    def check(self, where: str) -> None:
        at = f"{where}." if where else ""
        for key in ("num_processes", "num_nodes", "micro_batch_size", "collective_timeout_s", "sequence_parallel"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{at}{key}: must be positive, got {getattr(self, key)}")
        if not self.methods:
            raise ConfigError(f"{at}methods: list at least one of {', '.join(METHODS)}")
        if self.launcher == "python" and self.world_size > 1:
            raise ConfigError(f"{at}launcher: python runs one process; use torchrun, accelerate or deepspeed "
                              f"for {self.world_size} processes")
        if self.launcher == "accelerate" and not self.accelerate_config:
            raise ConfigError(f"{at}accelerate_config: the accelerate launcher needs a configs/accelerate/*.yaml file")
        if self.launcher == "deepspeed" and not self.deepspeed_config:
            raise ConfigError(f"{at}deepspeed_config: the deepspeed launcher needs a configs/deepspeed/*.json file")
        if self.accelerate_config and self.deepspeed_config:
            raise ConfigError(f"{at}deepspeed_config: set either accelerate_config or deepspeed_config, not both; "
                              "an accelerate file names its own deepspeed_config_file")
        for key in ("accelerate_config", "deepspeed_config"):
            if getattr(self, key) and not self.path_of(key).is_file():
                raise ConfigError(f"{at}{key}: {self.path_of(key)} does not exist")
        acc = self.accelerate_settings()
        if acc:
            if acc.get("num_processes", self.world_size) != self.world_size:
                raise ConfigError(f"{at}num_processes: {self.num_processes} × {self.num_nodes} node(s) differs from "
                                  f"num_processes: {acc['num_processes']} in {self.accelerate_config}")
            mp = ACCELERATE_PRECISION.get(str(acc.get("mixed_precision", "no")))
            if self.precision and mp and mp != self.precision:
                raise ConfigError(f"{at}precision: {self.precision} differs from mixed_precision: "
                                  f"{acc['mixed_precision']} in {self.accelerate_config}")
        if self.sequence_parallel > 1:
            self._check_sequence_parallel(at)

    def _check_sequence_parallel(self, at: str) -> None:
        sp = self.sequence_parallel
        if self.sequence_parallel_backend == "torch":
            why = ("torch's context parallelism shards SDPA only through its GPU kernels (the CPU kernel has no "
                   "sharding rule)" if self.device == "cpu" else
                   "dpo-dist does not run torch's context parallelism yet (FSDP2's DPO log-probs are not split "
                   "along the sequence)")
            raise ConfigError(f"{at}sequence_parallel_backend: torch is not available: {why}; use "
                              "sequence_parallel_backend: deepspeed with a ZeRO-3 file (Ulysses), e.g. the "
                              "cpu-zero3-sp-2 or 8xh100-zero3-qlora-sp4 profile")
        if self.world_size % sp:
            raise ConfigError(f"{at}sequence_parallel: {sp} does not divide the {self.world_size} processes; pick a "
                              "divisor, so that processes / sequence_parallel ranks train data-parallel")
        stage = self.deepspeed_settings().get("zero_optimization", {}).get("stage") if self.deepspeed_file() else None
        if stage != 3:
            have = f"ZeRO stage {stage}" if stage is not None else f"the {self.backend} backend"
            raise ConfigError(
                f"{at}sequence_parallel: {sp} needs DeepSpeed ZeRO-3 (Ulysses runs inside DeepSpeed), and this profile "
                f"has {have}. Under ZeRO-1/2 the gradients would come out {sp}× too large (they are divided by the "
                "data-parallel ranks only, ZeRO-3 divides by all of them); name a ZeRO-3 file in deepspeed_config")
        if self.attn_implementation == "eager":
            raise ConfigError(f"{at}attn_implementation: eager cannot be split along the sequence (it needs the whole "
                              "4-D mask); use sdpa or flash_attention_2 with sequence_parallel")

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_nodes

    @property
    def data_parallel_size(self) -> int:
        """Ranks that train on different rows: the processes over the sequence-parallel degree."""
        return max(self.world_size // self.sequence_parallel, 1)

    def _project(self) -> list[Path]:
        return [Path(self.source).resolve().parent.parent] if self.source else []

    def path_of(self, key: str) -> Path:
        return find(getattr(self, key), *self._project())

    def accelerate_settings(self) -> dict:
        return load_yaml(self.path_of("accelerate_config")) if self.accelerate_config else {}

    def deepspeed_file(self) -> Path | None:
        """The ZeRO JSON this profile trains with, whether named directly or through its accelerate file."""
        if self.deepspeed_config:
            return self.path_of("deepspeed_config")
        ds = self.accelerate_settings().get("deepspeed_config", {}).get("deepspeed_config_file")
        # relative to the project that holds configs/accelerate/, as accelerate itself reads it from there
        return find(ds, self.path_of("accelerate_config").resolve().parents[2], *self._project()) if ds else None

    @property
    def backend(self) -> str:
        """single | ddp | fsdp | deepspeed"""
        if self.deepspeed_file():
            return "deepspeed"
        if self.accelerate_settings().get("distributed_type") == "FSDP":
            return "fsdp"
        return "ddp" if self.world_size > 1 else "single"

    def fsdp_settings(self) -> dict:
        return self.accelerate_settings().get("fsdp_config", {}) if self.backend == "fsdp" else {}

    def deepspeed_settings(self) -> dict:
        path = self.deepspeed_file()
        if path is None:
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None


DEFAULT_PROFILE = Profile(name="default", description="one process, micro-batch 1")


def profile_names() -> list[str]:
    """The shipped profiles."""
    return shipped_names(LAUNCH_DIR)


def load_profile(name_or_path: str | None) -> Profile:
    """`name_or_path` is a profile name from launch/ or a YAML path. None = one process, micro-batch 1."""
    if name_or_path is None:
        return DEFAULT_PROFILE
    path = Path(name_or_path)
    if not path.suffix:
        path = LAUNCH_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"profile {name_or_path!r} not found in {LAUNCH_DIR}; available: "
                              f"{', '.join(profile_names())}")
    data = load_yaml(path)
    data.setdefault("name", path.stem)
    data["source"] = str(path)
    try:
        return build(Profile, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def gradient_accumulation(global_batch: int, micro_batch: int, world_size: int, where: str = "train",
                          sequence_parallel: int = 1) -> int:
    """Micro-batches each rank accumulates per optimizer step. Under sequence parallelism the ranks of one group run
    the same micro-batch, so only world_size / sequence_parallel of them add rows."""
    data_parallel = max(world_size // sequence_parallel, 1)
    per_step = micro_batch * data_parallel
    if global_batch % per_step:
        ranks = (f"{data_parallel} data-parallel rank(s) ({world_size} processes / sequence_parallel "
                 f"{sequence_parallel})" if sequence_parallel > 1 else f"{world_size} process(es)")
        raise ConfigError(
            f"{where}.global_batch_size: {global_batch} is not divisible by micro-batch {micro_batch} × "
            f"{ranks} = {per_step}; pick a global batch that is a multiple of {per_step}, "
            "or a profile with another micro-batch"
        )
    return global_batch // per_step
