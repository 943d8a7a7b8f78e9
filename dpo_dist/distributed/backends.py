"""What the launcher set up, what the profile asks for, and the combinations refused before any weights load.

The entry point never fights its launcher: world size and rank come from the environment, FSDP from
`accelerate launch`'s settings, ZeRO from `accelerate launch` or the `--deepspeed` file. The profile fills in
only what a launcher cannot say (micro-batch, precision, attention, the ZeRO file under a plain launcher).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.config.profiles import Profile, profile_names, load_profile
from dpo_dist.config.recipe import Recipe
from dpo_dist.config.schema import ConfigError, error_line
from dpo_dist.distributed import ranks
from dpo_dist.distributed.devices import bf16_native, pick_attn_implementation

ZERO_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


@dataclass
class Launch:
    """This process as its launcher started it."""
    world_size: int
    rank: int
    local_rank: int
    accelerate_fsdp: bool  # `accelerate launch` with an FSDP config
    accelerate_deepspeed: bool  # `accelerate launch` with a DeepSpeed config

    @classmethod
    def from_env(cls) -> "Launch":
        return cls(world_size=ranks.world_size(), rank=ranks.rank(), local_rank=ranks.local_rank(),
                   accelerate_fsdp=_flag("ACCELERATE_USE_FSDP"), accelerate_deepspeed=_flag("ACCELERATE_USE_DEEPSPEED"))


@dataclass
class Backend:
    """How this run shards: resolved from the launch first, then the profile."""
    kind: str  # single | ddp | fsdp | deepspeed
    deepspeed_file: Path | None  # passed to TrainingArguments when no accelerate launch set DeepSpeed up
    zero_stage: int
    fsdp: dict  # the accelerate fsdp_config the launcher applied (empty unless FSDP)


def resolve(profile: Profile, launch: Launch, deepspeed_arg: str | None = None) -> Backend:
    if launch.accelerate_fsdp:
        return Backend("fsdp", None, 0, _fsdp_env() or profile.fsdp_settings())
    if launch.accelerate_deepspeed:
        zero = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
        return Backend("deepspeed", None, zero or profile.deepspeed_settings().get("zero_optimization", {}).get("stage", 0), {})
    ds = Path(deepspeed_arg) if deepspeed_arg else profile.deepspeed_file()
    if ds is not None:
        import json
        try:
            stage = json.loads(ds.read_text()).get("zero_optimization", {}).get("stage", 0)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--deepspeed {ds}: cannot read it: {err}") from None
        return Backend("deepspeed", ds, stage, {})
    return Backend("ddp" if launch.world_size > 1 else "single", None, 0, {})


def precision_notes(recipe: Recipe, profile: Profile) -> list[str]:
    """One line per stage whose precision or optimizer the profile changes (the profile's wins over the recipe's:
    both are how a run fits the hardware)."""
    out = []
    for stage in recipe.stages:
        own = stage.train.precision
        if profile.precision and profile.precision != own:
            given = {"fp16": "fp16: true", "bf16": "bf16: true"}.get(own, "no fp16/bf16 key, so fp32")
            out.append(f"[train] stages.{stage.name}: profile {profile.name} trains in {profile.precision}, not the "
                       f"recipe's {own} ({given})")
        if profile.optim and profile.optim != stage.train.optim:
            out.append(f"[train] stages.{stage.name}: profile {profile.name} steps with {profile.optim}, not the "
                       f"recipe's train.optim {stage.train.optim}")
    return out


def _fsdp_env() -> dict:
    """The FSDP settings accelerate launch exported (FSDP_* variables), in accelerate-YAML key form."""
    out = {}
    for key, value in os.environ.items():
        if key.startswith("FSDP_"):
            out["fsdp_" + key[5:].lower()] = value.lower() in ("true", "1") if value.lower() in ("true", "false", "1", "0") else value
    return out


def _suggest(method: str, backend: str, world_size: int) -> str:
    fits = []
    for name in profile_names():
        try:
            p = load_profile(name)
        except ConfigError:
            continue
        if method in p.methods:
            fits.append((p.backend != backend, p.world_size != world_size, name))
    return ", ".join(fit[-1] for fit in sorted(fits)[:4]) or "none"


def on_cuda(profile: Profile) -> bool:
    """Whether this process trains on a GPU: the profile's `device`, never merely a visible GPU. A CPU profile on a GPU
    host stays on the CPU (gloo, CPU tensors); a GPU profile on a machine without one runs on the CPU."""
    import torch

    return profile.device == "gpu" and torch.cuda.is_available()


# transformers' optimizer names (OptimizerNames) whose classes come from bitsandbytes (checked against transformers
# in tests/test_profiles_launch.py). Their update kernels take plain tensors: FSDP2's DTensor parameters have no
# sharding strategy registered for them.
BITSANDBYTES_OPTIMIZERS = frozenset({
    "adamw_bnb_8bit", "adamw_8bit", "ademamix", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
    "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
    "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"})


def check_devices(profile: Profile, per_node: int, local_rank: int, cuda: bool) -> None:
    """Each GPU process of a node needs its own GPU: with fewer visible GPUs than processes, two ranks would share
    one (NCCL refuses a duplicate GPU) or a rank would ask for a device that does not exist."""
    import torch

    if not cuda:
        return
    visible = torch.cuda.device_count()
    per_node = max(per_node, local_rank + 1)
    if per_node > visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            f"profile {profile.name}: this node runs {per_node} GPU processes but {visible} GPU(s) are visible"
            + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "")
            + "; start one process per GPU (`dpo-dist launch ... --nproc-per-node N`) or make more GPUs visible")


def _local_world_size(launch: Launch) -> int:
    """Processes on this node, as the launcher says (torchrun and accelerate: LOCAL_WORLD_SIZE; deepspeed:
    LOCAL_SIZE); at least this rank's local rank + 1."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return launch.local_rank + 1


def check_run(recipe: Recipe, profile: Profile, launch: Launch, backend: Backend, cuda: bool | None = None) -> None:
    """Refuse, before any weights load, a combination that cannot work. Says why and what to use instead."""
    import torch

    cuda = on_cuda(profile) if cuda is None else cuda
    where = f"profile {profile.name}" + (f" ({profile.source})" if profile.source else "")
    check_devices(profile, _local_world_size(launch), launch.local_rank, cuda)
    if profile.world_size > 1 and launch.world_size == 1:
        raise ConfigError(
            f"{where} runs {profile.world_size} processes, but this is a single process. Start it with "
            f"`dpo-dist launch RECIPE --profile {profile.name}` (or the launcher command it prints with --dry-run)")
    if profile.backend == "fsdp" and backend.kind != "fsdp":
        raise ConfigError(
            f"{where} shards with FSDP, which `accelerate launch --config_file {profile.accelerate_config}` sets up; "
            f"this process was started without it. Use `dpo-dist launch RECIPE --profile {profile.name}`")
    for stage in recipe.stages:
        method = recipe.method_of(stage).type
        precision = profile.precision or stage.train.precision
        at = f"stages.{stage.name}"
        if method not in profile.methods:
            raise ConfigError(
                f"{at}: method {method} is not supported by {where}, which supports {', '.join(profile.methods)}; "
                f"profiles for {method}: {_suggest(method, profile.backend, profile.world_size)}")
        if stage.stage == "kto" and stage.loss_types == ["kto"] and profile.micro_batch_size < 2:
            raise ConfigError(
                f"{at}: the kto loss estimates its KL term from the other rows of each micro-batch (TRL), so it needs "
                f"a micro-batch of 2 or more, and {where} has micro_batch_size {profile.micro_batch_size}; use a "
                "profile with a larger micro-batch, or loss_type: apo_zero_unpaired (no KL term)")
        if profile.attn_implementation == "flash_attention_2" and precision == "fp32":
            raise ConfigError(f"{at}: flash_attention_2 needs fp16 or bf16, but {where} trains in fp32; use "
                              "attn_implementation: sdpa or a half-precision profile")
        if cuda and profile.attn_implementation == "flash_attention_2":
            try:  # the refusal model loading would make, made here before any weights load
                pick_attn_implementation("flash_attention_2", precision, cuda)
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
        if cuda and precision == "bf16" and not bf16_native():
            name = torch.cuda.get_device_name()
            raise ConfigError(f"{at}: {where} trains in bf16, but this GPU ({name}) has no native bf16 (torch "
                              "would emulate it, slowly and with different numerics); use a fp16 profile such as "
                              "v100-qlora")
        optim = profile.optim or stage.train.optim
        if backend.kind == "fsdp" and optim in BITSANDBYTES_OPTIMIZERS:
            key = f"{where}: optim" if profile.optim else f"{at}.train.optim"
            raise ConfigError(
                f"{key}: {optim} is a bitsandbytes optimizer, which cannot step FSDP2's sharded (DTensor) "
                f"parameters (it fails at the first step); under {where} use adamw_torch_fused (GPU) or adamw_torch, "
                "or keep the bitsandbytes optimizer on a single-GPU, DDP or ZeRO-3 profile")
        if stage.train.on_nonfinite_loss == "skip" and backend.kind == "deepspeed":
            raise ConfigError(
                f"{at}.train.on_nonfinite_loss: skip is not available under DeepSpeed, whose engine applies the update "
                "inside the backward pass; use stop (the default) and --resume from the last checkpoint, or an FSDP "
                "profile")
        if method in ("lora", "qlora") and precision == "fp16" and backend.kind == "fsdp":
            raise ConfigError(
                f"{at}: FSDP2 shards each layer as one dtype, but fp16 {method} keeps fp32 adapters (for the "
                "gradient scaler) beside the fp16 base; use bf16 (A100/H100), a ZeRO-3 profile, or the "
                "single-GPU v100-qlora profile")
    if backend.kind == "deepspeed":
        _check_zero_file(profile, backend)
    if profile.sequence_parallel > 1:
        check_sequence_parallel(recipe, profile, launch, where)


SEQUENCE_PARALLEL_STAGES = ("sft", "pretrain", "dpo")


def check_sequence_parallel(recipe: Recipe, profile: Profile, launch: Launch, where: str) -> None:
    """What sequence parallelism (dpo_dist.distributed.sequence) cannot split, refused before any weights load."""
    sp = profile.sequence_parallel
    if launch.world_size % sp:
        raise ConfigError(f"{where}: sequence_parallel {sp} does not divide the {launch.world_size} processes of this "
                          "launch; start a multiple of it")
    for stage in recipe.stages:
        at = f"stages.{stage.name}"
        if stage.stage not in SEQUENCE_PARALLEL_STAGES:
            raise ConfigError(f"{at}: {stage.stage} does not run under sequence parallelism ({where} has "
                              f"sequence_parallel: {sp}); it runs for sft, pretrain and dpo stages. Use a profile "
                              "without sequence_parallel for this stage")
        if stage.train.padding_free is True:
            raise ConfigError(f"{at}.train.padding_free: true packs a batch into one row, which sequence "
                              f"parallelism does not split ({where}); set it to auto or false")
        if stage.stage == "dpo" and not stage.train.compact_logps:
            raise ConfigError(f"{at}.train.compact_logps: false uses TRL's head, which does not split the sequence "
                              f"under {where}; keep compact_logps: true (the default)")
    config = Path(recipe.model.name_or_path) / "config.json"
    if config.is_file():  # a hub model is checked on the ranks, once its config is there (check_heads)
        import json

        check_heads(json.loads(config.read_text()), sp, f"model.name_or_path {recipe.model.name_or_path}", where)


def check_heads(config: dict, sp: int, model: str, where: str) -> None:
    """Ulysses gives each rank of the group 1/N of the attention heads: the query heads must divide by N, and the
    key/value heads must divide by N or divide N (they are then repeated)."""
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    if heads is None:
        return
    if heads % sp or (kv % sp and sp % kv):
        raise ConfigError(f"{where}: sequence_parallel {sp} splits the attention heads, but {model} has {heads} "
                          f"query and {kv} key/value heads; use a sequence_parallel that divides {heads} and divides "
                          f"or is divided by {kv}")


def _check_zero_file(profile: Profile, backend: Backend) -> None:
    settings = profile.deepspeed_settings() if backend.deepspeed_file is None else _read_json(backend.deepspeed_file)
    source = backend.deepspeed_file or profile.deepspeed_file()
    for key in ZERO_BATCH_KEYS:
        if key in settings and settings[key] != "auto":
            raise ConfigError(f"{source}: {key} is {settings[key]!r}; set it to \"auto\": the recipe's global batch "
                              "and the profile's micro-batch decide it")
    offload = settings.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload == "cpu":
        facts = cpu_adam_facts()
        if not facts["ok"]:
            raise ConfigError(
                f"{source}: offload_optimizer on the CPU steps with DeepSpeed's CPU Adam, {facts['detail']}; "
                "install a C++ compiler and ninja (DeepSpeed builds it at the first step), or reinstall deepspeed "
                "with it prebuilt (DS_BUILD_CPU_ADAM=1 pip install deepspeed), or use a profile without offload")
    for key, precision in (("fp16", "fp16"), ("bf16", "bf16")):
        enabled = settings.get(key, {}).get("enabled", "auto")
        if enabled not in ("auto", False) and profile.precision and profile.precision != precision:
            raise ConfigError(f"{source}: {key}.enabled is {enabled!r} but the profile trains in {profile.precision}; "
                              "set it to \"auto\"")


def cpu_adam_facts() -> dict:
    """DeepSpeed's CPU Adam, which ZeRO's optimizer offload steps with, and which DeepSpeed JIT-builds at the first
    step unless it came prebuilt: prebuilt, already JIT-built, or buildable (a compiler, ninja, the builder's own
    check). Nothing is built here. Shared by the offload preflight (check_run) and `dpo-dist doctor`."""
    import importlib.util
    import shutil
    import sys

    out = {"ok": False, "status": "unavailable", "compiler": None, "ninja": False}
    if importlib.util.find_spec("deepspeed") is None:
        return {**out, "detail": "deepspeed is not installed"}
    import torch
    from torch.utils.cpp_extension import get_default_build_root, is_ninja_available

    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder import CPUAdamBuilder

        builder = CPUAdamBuilder()
        compatible = builder.is_compatible(verbose=False)
    except Exception as err:
        return {**out, "detail": f"deepspeed's op builder fails: {error_line(err)}"}
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    out.update(compiler=compiler, ninja=is_ninja_available())
    if installed_ops.get(builder.name):
        return {**out, "ok": True, "status": "prebuilt", "detail": "prebuilt into the installed deepspeed"}
    # torch.utils.cpp_extension.load builds into <root>/py<XY>_<cpu|cuXYZ>/<name>; a finished build leaves <name>.so
    cu = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    built = root / f"py{sys.version_info.major}{sys.version_info.minor}_{cu}" / builder.name / f"{builder.name}.so"
    if built.is_file():
        return {**out, "ok": True, "status": "jit-built", "detail": f"already JIT-built in {built.parent}"}
    lacking = [what for what, ok in (("no C++ compiler (c++ or $CXX)", compiler), ("no ninja", out["ninja"]),
                                     ("its builder's compatibility check fails", compatible)) if not ok]
    if lacking:
        return {**out, "detail": f"not prebuilt, and cannot be built here: {', '.join(lacking)}"}
    return {**out, "ok": True, "status": "buildable",
            "detail": f"not prebuilt; DeepSpeed builds it at the first step ({compiler}, ninja found)"}


def _read_json(path: Path) -> dict:
    import json
    return json.loads(Path(path).read_text())


def init_process_group(backend: Backend, launch: Launch, timeout, cuda: bool | None = None) -> None:
    """Start the process group before anything else can, with `timeout` on every collective: a hung one becomes an
    error instead of a silent stall.

    - DeepSpeed: deepspeed.comm must come first, since ZeRO-3's zero.Init (inside from_pretrained) reads the world size
      from it; accelerate does this itself only on GPUs.
    - CPU ranks: transformers' TrainingArguments (5.x) hands its ddp_timeout to the process group only on GPUs, so on
      CPU (gloo) the group would wait 30 minutes. accelerate reuses a group that already exists."""
    import torch
    import torch.distributed as dist

    if launch.world_size <= 1 or dist.is_initialized():
        return
    if backend.kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(timeout=timeout)
    elif not (torch.cuda.is_available() if cuda is None else cuda):
        dist.init_process_group("gloo", timeout=timeout)


def dynamo_plugin(args):
    """The torch.compile settings of TrainingArguments `args`, as the Trainer itself hands them to its Accelerator."""
    from accelerate.utils import TorchDynamoPlugin

    return TorchDynamoPlugin(backend=args.torch_compile_backend, mode=args.torch_compile_mode)


def init_fsdp_state(backend: Backend, mixed_precision: str, cuda: bool | None = None, dynamo=None) -> bool:
    """Set up accelerate's FSDP state before the Trainer creates its Accelerator. Three fixes in one place:

    - Precision. accelerate's default FSDP2 policy for bf16/fp16 reduces gradients and returns the model's outputs
      (the loss, DPO's log-probs) in half precision, so a sharded run rounds where a single-process autocast run
      does not. The policy here computes in the half dtype but reduces gradients and returns outputs in fp32.
    - CPU ranks. accelerate (1.15) turns `ACCELERATE_USE_FSDP` into an FSDP state only for GPU-like distributed
      types; on CPU (MULTI_CPU, gloo) it drops the plugin silently and the Trainer trains plain DDP. torch's FSDP2
      runs on CPU with gloo, so the state is marked FSDP here.
    - torch.compile. The state made here is the one the Trainer's Accelerator reuses, so its dynamo plugin is the
      one that counts: `dynamo` (dynamo_plugin(args)) carries train.torch_compile; a default plugin would drop it.

    The plugin reads the launcher's FSDP_* environment, as accelerate's own would. Returns True when FSDP is set."""
    import torch
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from dpo_dist import compat

    if backend.kind != "fsdp":
        return False
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    policy = (MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32, output_dtype=torch.float32)
              if half is not None else None)
    plugin = FullyShardedDataParallelPlugin(mixed_precision_policy=policy)
    cpu = not (torch.cuda.is_available() if cuda is None else cuda)
    compat.patch("accelerate-fsdp-state-first")
    state = AcceleratorState(mixed_precision=mixed_precision, cpu=cpu, fsdp_plugin=plugin,
                             dynamo_plugin=dynamo or TorchDynamoPlugin(), _from_accelerator=True)
    if state.distributed_type == DistributedType.FSDP:
        return True
    if not cpu or state.distributed_type != DistributedType.MULTI_CPU:
        raise ConfigError(f"FSDP needs a multi-process launch; accelerate reports {state.distributed_type}")
    # Every later AcceleratorState() re-copies PartialState's fields, so both record FSDP.
    compat.patch("accelerate-fsdp-on-cpu")
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    return True


def trainer_overrides(profile: Profile, backend: Backend, checkpointing: bool, peft: bool) -> dict:
    """TrainingArguments keys that depend on the backend, not on the recipe."""
    out: dict = {"use_cpu": not on_cuda(profile),  # CPU ranks (a CPU profile even beside a GPU): accelerate picks gloo
                 "ddp_timeout": profile.collective_timeout_s}
    if backend.deepspeed_file is not None:
        out["deepspeed"] = str(backend.deepspeed_file)
    if profile.sequence_parallel > 1:
        from accelerate.parallelism_config import ParallelismConfig

        # DeepSpeed builds the groups itself; dp_shard_size carries the data-parallel degree into the batch size
        # accelerate writes into the ZeRO config (micro-batch × accumulation × data-parallel ranks)
        sp = profile.sequence_parallel
        out["parallelism_config"] = ParallelismConfig(sp_size=sp, sp_backend="deepspeed",
                                                      dp_shard_size=max(ranks.world_size() // sp, 1))
    if backend.kind == "fsdp" and backend.fsdp.get("fsdp_activation_checkpointing"):
        out["gradient_checkpointing"] = False  # FSDP checkpoints each wrapped layer itself; both at once is refused
        out["gradient_checkpointing_kwargs"] = None
    elif checkpointing:
        # ZeRO-3 frees frozen params during a non-reentrant recompute (DeepSpeed #4332): reentrant there.
        # compat: deepspeed-zero3-reentrant-checkpointing
        reentrant = backend.kind == "deepspeed" and backend.zero_stage == 3 and peft
        out["gradient_checkpointing_kwargs"] = {"use_reentrant": reentrant}
    return out
