"""Convert a Firefly train_args JSON into a dpo-dist recipe, plus a launch profile when no shipped one fits.

    dpo-dist import-firefly TRAIN_ARGS.json [--out DIR] [--name NAME] [--world-size N] [--force]

The recipe says what to learn and the launch profile says how to run it, so one input file splits in two. Every
input key ends up either carried over (``Conversion.carried``: input key -> where it went) or in
``Conversion.notes`` (one line per key, naming it and saying why it was not carried over or what changed).
Nothing is dropped silently; keys this importer does not know are reported too.

Mapping (the recipe has a single stage, index 0, written ``stages[0]`` below):

  task_type                     -> stages[0].stage (pretrain | sft | dpo); absent: sft, the format's default
  train_mode                    -> method.type (full | lora | qlora); absent: qlora, the format's default
  model_name_or_path            -> model.name_or_path (required); for a family whose modelling code ships with the
                                   checkpoint (Qwen-1, i.e. Qwen-7B-Chat and the like but not Qwen1.5 or later,
                                   ChatGLM, Baichuan, InternLM, MiniCPM, XVERSE, Orion, DeepSeek-MoE; matched in
                                   model_name_or_path, or by template_name, case-insensitively) also
                                   model.trust_remote_code: true, as the source loads every model with
                                   trust_remote_code=True; noted either way, with a security warning when on
  template_name                 -> model.template when dpo-dist has a template of that name; minicpm3 (ChatML
                                   turns) becomes chatml, noted; otherwise noted and no template is set (the
                                   tokenizer's own applies); pretraining uses none
  train_file                    -> stages[0].data.train, format auto (required)
  eval_file                     -> stages[0].data.eval (empty: none)
  tokenize_num_workers          -> stages[0].data.num_proc
  max_seq_length                -> stages[0].max_length (required)
  max_prompt_length, beta       -> stages[0].max_prompt_length, stages[0].beta (dpo only; noted otherwise);
                                   the dpo stage uses the sigmoid loss, as the source does
  lora_rank/alpha/dropout       -> method.lora_r, method.lora_alpha, method.lora_dropout (noted for full); LoRA goes
                                   on every linear layer but lm_head, as in the source: method.target_modules null
  per_device_train_batch_size   -> the launch profile's micro_batch_size, and a factor of the global batch
  gradient_accumulation_steps   -> stages[0].train.global_batch_size = per_device_train_batch_size ×
                                   gradient_accumulation_steps × world_size (the --world-size argument,
                                   default 1; the product is reported in the notes)
  num_train_epochs, max_steps   -> stages[0].train.num_epochs, stages[0].train.max_steps
  learning_rate                 -> stages[0].train.learning_rate
  lr_scheduler_type             -> stages[0].train.lr_scheduler (one dpo-dist lacks is noted; cosine is used)
  warmup_steps, warmup_ratio    -> stages[0].train.warmup_steps, stages[0].train.warmup_ratio
  weight_decay, max_grad_norm   -> stages[0].train.weight_decay, stages[0].train.max_grad_norm
  logging_steps, save_steps,    -> stages[0].train.logging_steps, .save_steps, .save_total_limit
  save_total_limit
  eval_steps                    -> stages[0].train.eval_steps (only with an eval_file)
  gradient_checkpointing        -> stages[0].train.gradient_checkpointing
  optim                         -> stages[0].train.optim (one the installed transformers no longer has, such as
                                   adamw_hf, becomes adamw_torch, noted)
  fp16, bf16                    -> stages[0].train.fp16 / .bf16, and the launch profile's precision
  seed                          -> seed
  output_dir                    -> output_dir; its last part also names the recipe unless --name is given
                                   (without output_dir: the input file's name)
  deepspeed                     -> not carried: the backend belongs to a launch profile. With train_mode full it
                                   selects a ZeRO-3 profile, with CPU offload for a large model (see Launch profile
                                   below); otherwise the shipped ZeRO profile that fits, or a note naming the ZeRO-3
                                   profile to use. Noted with the profile and the reason
  report_to                     -> train.report_to (tensorboard, wandb, mlflow; none = []); another tracker, or
                                   all, is not carried: noted
  use_unsloth, min_seq_length, disable_tqdm, dataloader_num_workers, save_strategy,
  remove_unused_columns, logging_first_step and other trainer options dpo-dist sets itself
                                -> not carried: noted with the reason (dpo-dist's own behaviour applies)
  anything else                 -> noted as an unknown key

Absent keys take the source trainer's defaults, written out explicitly so the recipe does not depend on
dpo-dist's own defaults where they differ (task_type sft, train_mode qlora, learning_rate 5e-5, num_train_epochs 3,
lr_scheduler_type linear, per_device_train_batch_size 8, gradient_accumulation_steps 1, logging_steps 500,
save_total_limit unset = keep every checkpoint, max_prompt_length 512) nor where they agree (SHARED_DEFAULTS:
warmup_steps, weight_decay, max_grad_norm, optim, save_steps, gradient_checkpointing, seed, beta, the LoRA keys,
fp16, bf16). Every absent key that gets a value has a note of its own: "KEY: absent: the source's default VALUE is
written to TARGET".

Launch profile: a shipped profile (launch/*.yaml) is chosen when it fits exactly: a GPU profile whose
processes equal the world size, whose micro_batch_size equals per_device_train_batch_size, whose precision,
optimizer and gradient checkpointing are either unset or equal to the input's, which accepts the method, and
whose backend is DeepSpeed exactly when the input names a deepspeed file (never FSDP, which the source does
not use); with train_mode full that means a ZeRO-3 profile that offloads to CPU exactly when the model is large.
Large: the parameter count in the model's name ("7B", "14b", "1_8B", "8x7B") × 16 bytes of training state
(weights, gradients, fp32 master weights, Adam moments), split over the world size, exceeds 40 GB per GPU, half an
80 GB H100: above 20B parameters on 8 GPUs, above 2.5B on one; a name without a count means no offload. Otherwise
a custom profile is written: for train_mode full with a deepspeed file, launcher deepspeed with
configs/deepspeed/zero3.json (zero3-offload.json when large) on world-size processes; for anything else a single
process (launcher python, num_processes 1), and the global batch is kept, so gradient accumulation grows by the
world size. Both take micro_batch_size from per_device_train_batch_size and precision from fp16/bf16.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo_dist.config.schema import ConfigError

TASK_TYPES = ("pretrain", "sft", "dpo")
TRAIN_MODES = ("full", "lora", "qlora")
STAGE = "stages[0]"
TRAIN = f"{STAGE}.train"

# Defaults of the source format and of its trainer, used when a key is absent and dpo-dist's default differs.
SOURCE_DEFAULTS = {
    "task_type": "sft",
    "train_mode": "qlora",
    "learning_rate": 5e-5,
    "num_train_epochs": 3,
    "lr_scheduler_type": "linear",
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "logging_steps": 500,
    "save_total_limit": None,
    "max_prompt_length": 512,
}
# Defaults that dpo-dist shares with the source: written explicitly too, and noted like the others.
SHARED_DEFAULTS = {
    "warmup_steps": 0,
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "optim": "adamw_torch",
    "save_steps": 500,
    "gradient_checkpointing": False,
    "seed": 42,
    "beta": 0.1,
    "lora_rank": 64,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "fp16": False,
    "bf16": False,
}

# Types of the keys this importer reads. float accepts integers too.
_TYPES: dict[str, tuple] = {
    "output_dir": (str,), "model_name_or_path": (str,), "train_file": (str,), "eval_file": (str, type(None)),
    "template_name": (str, type(None)), "task_type": (str,), "train_mode": (str,),
    "lr_scheduler_type": (str,), "optim": (str,),
    "per_device_train_batch_size": (int,), "gradient_accumulation_steps": (int,), "max_seq_length": (int,),
    "max_prompt_length": (int,), "logging_steps": (int,), "save_steps": (int,),
    "save_total_limit": (int, type(None)), "warmup_steps": (int,), "lora_rank": (int,), "lora_alpha": (int,),
    "seed": (int,), "max_steps": (int,), "eval_steps": (int, type(None)), "tokenize_num_workers": (int,),
    "learning_rate": (float,), "num_train_epochs": (float,), "lora_dropout": (float,), "beta": (float,),
    "weight_decay": (float,), "max_grad_norm": (float,), "warmup_ratio": (float,),
    "gradient_checkpointing": (bool,), "fp16": (bool,), "bf16": (bool,), "use_unsloth": (bool,),
}
_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true/false", type(None): "null"}

# Trainer options dpo-dist sets itself: not carried over, with the reason.
_TRAINER_OWNED = {
    "disable_tqdm": "dpo-dist always shows the trainer's progress bar",
    "dataloader_num_workers": "dpo-dist loads batches in the main process; data.num_proc sets the tokenization "
                              "processes",
    "remove_unused_columns": "dpo-dist tokenizes the data itself and passes the trainer only the columns it needs",
    "logging_first_step": "dpo-dist always logs the first step",
    "logging_dir": "dpo-dist writes logs into each stage's run directory under output_dir",
    "logging_strategy": "dpo-dist logs every train.logging_steps steps",
    "overwrite_output_dir": "dpo-dist manages its run directories under output_dir; continue a run with --resume",
    "resume_from_checkpoint": "continue a run with `dpo-dist train RECIPE --resume` instead",
    "per_device_eval_batch_size": "evaluation uses the launch profile's micro_batch_size",
    "evaluation_strategy": "evaluation runs every train.eval_steps steps when eval_steps and data.eval are set",
    "eval_strategy": "evaluation runs every train.eval_steps steps when eval_steps and data.eval are set",
    "do_train": "dpo-dist always trains",
    "do_eval": "evaluation runs every train.eval_steps steps when eval_steps and data.eval are set",
    "ddp_find_unused_parameters": "the launch profile decides the distributed settings",
    "ddp_timeout": "the launch profile decides the distributed settings (its collective_timeout_s)",
    "local_rank": "the launcher sets each process's rank",
    "adam_beta1": "dpo-dist uses the optimizer's default betas",
    "adam_beta2": "dpo-dist uses the optimizer's default betas",
    "adam_epsilon": "dpo-dist uses the optimizer's default epsilon",
    "lr_scheduler_kwargs": "the recipe has no scheduler arguments; the scheduler's defaults apply",
    "data_seed": "dpo-dist uses seed for the data order too",
    "gradient_checkpointing_kwargs": "dpo-dist chooses the checkpointing mode per backend",
    "run_name": "the run is named after the recipe and its stage",
}

# Model families whose modelling code ships with the checkpoint instead of with transformers. The source loads every
# model with trust_remote_code=True; these are the families that need it. A family matches when its pattern occurs in
# model_name_or_path or template_name is one of its source templates (both case-insensitive); the template catches
# a local path whose name says nothing. Qwen-1 is Qwen-7B(-Chat), Qwen-1_8B, Qwen-14B, Qwen-72B: Qwen1.5 and later
# are in transformers and share the template name qwen, so only the model name can tell them apart.
_REMOTE_CODE_FAMILIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Qwen-1", r"(?<![a-z0-9])qwen[-_]\d+(?:_\d+)?b(?![a-z0-9])", ()),
    ("ChatGLM", r"chatglm", ("chatglm2", "chatglm3")),
    ("Baichuan", r"baichuan", ("baichuan", "baichuan2")),
    ("InternLM", r"internlm", ("internlm", "internlm2")),
    ("MiniCPM", r"minicpm", ("minicpm", "minicpm3")),
    ("XVERSE", r"xverse", ("xverse",)),
    ("Orion", r"(?<![a-z])orion(?![a-z])", ("orion",)),
    ("DeepSeek-MoE", r"deepseek-moe", ()),
)
_REMOTE_CODE_WARNING = ("security warning: the model's own Python code will run on this machine with your "
                        "permissions; use it only for a model whose code you have read or trust (pin model.revision "
                        "to the commit you read)")

# Source template names that dpo-dist has under another name: source name -> (dpo-dist name, why).
_TEMPLATE_RENAMES = {
    "minicpm3": ("chatml", "the source's minicpm3 template writes ChatML turns (<|im_start|>role ... <|im_end|>), as "
                           "dpo-dist's chatml template (an alias of qwen) does; that template adds the system prompt "
                           "'You are a helpful assistant.' to rows without one"),
}

# Full fine-tuning with mixed-precision AdamW keeps about 16 bytes of model state per parameter: 2 for the
# half-precision weights, 2 for their gradients, 4 for the fp32 master copy and 8 for Adam's two moments (the ZeRO
# paper's count).
# ZeRO-3 splits them evenly across the processes. CPU offload is chosen when one process's share would exceed 40 GB:
# half of an 80 GB H100 (the shipped ZeRO-3 profiles' GPU), leaving the other half for activations, the layers
# gathered for compute and the communication buffers. On 8 GPUs that is above 20B parameters; on one, above 2.5B.
STATE_BYTES_PER_PARAM = 16
ZERO3_GPU_BUDGET_GB = 40
ZERO3_FILE = "configs/deepspeed/zero3.json"
ZERO3_OFFLOAD_FILE = "configs/deepspeed/zero3-offload.json"
# A parameter count in a model name: "Qwen-7B-Chat" 7, "Qwen-1_8B" 1.8, "Qwen2.5-72B" 72, "Mixtral-8x7B" 8 × 7.
_SIZE = re.compile(r"(?<![a-z0-9.])(?:(\d+)x)?(\d+(?:[._]\d+)?)b(?![a-z0-9])")


@dataclass
class Conversion:
    """The result of `convert`: a recipe mapping, a profile mapping (or None for a shipped one), and the notes."""
    name: str
    recipe: dict
    profile: dict | None  # None: the shipped profile `profile_name` fits
    profile_name: str
    notes: list[str] = field(default_factory=list)
    carried: dict[str, str] = field(default_factory=dict)  # input key -> recipe/profile key(s)
    global_batch_size: int = 0

    @property
    def shipped_profile(self) -> bool:
        return self.profile is None


def _show(value: Any) -> str:
    """A value as a note shows it: plain strings bare, anything else (and odd strings) as JSON, on one line."""
    if isinstance(value, str) and value and value.isprintable() and value.strip() == value and ": " not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")


class _Reader:
    """Reads keys from the input, checks their types, and records what happened to every key."""

    def __init__(self, data: dict, source: str):
        self.data = data
        self.source = source
        self.carried: dict[str, str] = {}
        self.notes: list[str] = []
        self.noted: set[str] = set()  # keys with a note of their own

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = _TYPES.get(key)
        if kinds is None:
            return value
        ok = any(isinstance(value, bool) if k is bool else
                 (isinstance(value, (int, float)) and not isinstance(value, bool)) if k is float else
                 (isinstance(value, int) and not isinstance(value, bool)) if k is int else
                 isinstance(value, k) for k in kinds)
        if not ok:
            words = " or ".join(_TYPE_WORDS[k] for k in kinds)
            raise ConfigError(f"{self.source}: {key}: expected {words}, got {json.dumps(value)}")
        return value

    def value(self, key: str, target: str, default: Any = None) -> Any:
        """The key's value (or the default when absent); records it as carried to `target` when present."""
        if key in self.data:
            self.carried[key] = target
            return self.get(key)
        if default is None:
            if key in SOURCE_DEFAULTS:
                default, same = SOURCE_DEFAULTS[key], ""
            elif key in SHARED_DEFAULTS:
                default, same = SHARED_DEFAULTS[key], " (dpo-dist's default too)"
            else:
                return None
            shown = "null (keep every checkpoint)" if key == "save_total_limit" else _show(default)
            self.note(key, f"the source's default {shown} is written to {target}{same}")
        return default

    def required(self, key: str, target: str) -> Any:
        if key not in self.data or self.data[key] in (None, ""):
            raise ConfigError(f"{self.source}: {key}: required key is missing (it becomes {target})")
        return self.value(key, target)

    def positive(self, key: str, value: Any) -> None:
        if value is not None and value <= 0:
            raise ConfigError(f"{self.source}: {key}: must be positive, got {_show(value)}")

    def note(self, key: str, why: str) -> None:
        shown = f"{key}: {_show(self.data[key])}" if key in self.data else f"{key}: absent"
        self.notes.append(f"{shown}: {why}")
        self.noted.add(key)

    def drop(self, key: str, why: str) -> None:
        """Note a present key that is not carried over."""
        if key in self.data:
            self.get(key)  # type-check it anyway: a wrong type is still a mistake worth naming
            self.note(key, f"not carried over: {why}")


def _report_to(r: _Reader, train: dict) -> None:
    """report_to → train.report_to: the trackers dpo-dist reports to are carried, "none" is [], any other is noted."""
    from typing import get_args

    from dpo_dist.config.recipe import Tracker

    report = r.get("report_to")
    targets = [report] if isinstance(report, str) or report is None else list(report) if isinstance(report, list) \
        else [report]
    kept = [t for t in targets if t in get_args(Tracker)]
    other = [t for t in targets if t not in kept and t not in ("none", None)]
    if other:  # "all", or a tracker dpo-dist has no extra for
        r.drop("report_to", f"dpo-dist reports to {', '.join(get_args(Tracker))} (train.report_to) and always "
                            f"writes metrics.jsonl; name the trackers instead of {', '.join(map(str, other))}")
        return
    r.value("report_to", f"{TRAIN}.report_to")  # recorded as carried
    train["report_to"] = kept


def _known_optimizers() -> set[str] | None:
    try:
        from transformers.training_args import OptimizerNames
    except Exception:  # noqa: BLE001 - no transformers: keep the value as given
        return None
    return {o.value for o in OptimizerNames}


def _remote_code_family(model: str, template: Any) -> tuple[str, str] | None:
    """(family, what matched it) for a model whose own code must run, else None. The model name wins over the
    template."""
    for family, pattern, _ in _REMOTE_CODE_FAMILIES:
        if re.search(pattern, model.lower()):
            return family, f"model_name_or_path {model}"
    if isinstance(template, str):
        for family, _, templates in _REMOTE_CODE_FAMILIES:
            if template.lower() in templates:
                return family, f"template_name {template}"
    return None


def _billions(model: str) -> float | None:
    """The parameter count, in billions, that the model's name states (its last path part); None when it has none."""
    sizes = [int(experts or 1) * float(size.replace("_", "."))
             for experts, size in _SIZE.findall((Path(model).name or model).lower())]
    return max(sizes) if sizes else None


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def _zero3_offload(model: str, world_size: int) -> tuple[bool, str]:
    """Whether a full fine-tune of `model` on `world_size` ZeRO-3 processes needs CPU offload, and why (a clause of a
    note). The rule is stated at STATE_BYTES_PER_PARAM."""
    limit = ZERO3_GPU_BUDGET_GB * world_size / STATE_BYTES_PER_PARAM  # billions of parameters
    rule = (f"the rule: {STATE_BYTES_PER_PARAM} bytes of training state per parameter (weights, gradients, fp32 "
            f"master weights, Adam moments) split over {_processes(world_size)}, at most {ZERO3_GPU_BUDGET_GB} GB per "
            f"GPU (half an 80 GB H100), so offload above {limit:g}B parameters")
    billions = _billions(model)
    if billions is None:
        return False, (f"the model's name states no parameter count, so no CPU offload; {rule} (use "
                       f"{ZERO3_OFFLOAD_FILE} for such a model)")
    total = round(billions * STATE_BYTES_PER_PARAM, 1)
    share = round(total / world_size, 1)
    if share > ZERO3_GPU_BUDGET_GB:
        return True, (f"{billions:g}B parameters (from the model name) need about {total:g} GB of training state, "
                      f"{share:g} GB per process, so parameters and optimizer states are offloaded to CPU RAM (about "
                      f"{total:g} GB of it; much slower); {rule}")
    return False, (f"{billions:g}B parameters (from the model name) need about {total:g} GB of training state, "
                   f"{share:g} GB per process, so no CPU offload; {rule}")


def _offloads(profile) -> bool:
    """Whether the profile's ZeRO file moves parameters or optimizer states off the GPU."""
    zero = profile.deepspeed_settings().get("zero_optimization", {})
    devices = [(zero.get(key) or {}).get("device", "none") for key in ("offload_param", "offload_optimizer")]
    return any(str(device) != "none" for device in devices)


def _fitting_profile(method: str, precision: str, micro: int, world_size: int, optim: str, checkpointing: bool,
                     zero: bool, offload: bool = False) -> str | None:
    """The first shipped profile that fits exactly; with `zero`, a ZeRO-3 one that offloads exactly when `offload`."""
    from dpo_dist.config.profiles import load_profile, profile_names

    for name in profile_names():
        try:
            p = load_profile(name)
            backend = p.backend
            zero_fits = (backend == "deepspeed" and _offloads(p) == offload
                         and p.deepspeed_settings().get("zero_optimization", {}).get("stage") == 3)
        except ConfigError:
            continue
        if (p.device == "gpu" and p.world_size == world_size and p.micro_batch_size == micro
                and method in p.methods and p.precision in (None, precision) and p.optim in (None, optim)
                and p.gradient_checkpointing in (None, checkpointing)
                and (zero_fits if zero else backend in ("single", "ddp"))):
            return name
    return None


def convert(train_args: dict, source: str = "train_args.json", world_size: int = 1,
            name: str | None = None) -> Conversion:
    """Convert one train_args mapping. Raises ConfigError naming the key for input that cannot be converted."""
    if not isinstance(train_args, dict):
        raise ConfigError(f"{source}: expected a JSON object of training arguments at the top level")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size <= 0:
        raise ConfigError(f"world_size: must be a positive integer, got {world_size!r}")
    r = _Reader(train_args, source)

    # -- what is trained, and how ------------------------------------------------------------------------------
    stage = r.value("task_type", f"{STAGE}.stage")
    if stage not in TASK_TYPES:
        raise ConfigError(f"{source}: task_type: {_show(stage)} is not one of {', '.join(TASK_TYPES)}")
    method = r.value("train_mode", "method.type")
    if method not in TRAIN_MODES:
        raise ConfigError(f"{source}: train_mode: {_show(method)} is not one of {', '.join(TRAIN_MODES)}")

    model: dict = {"name_or_path": r.required("model_name_or_path", "model.name_or_path")}
    template = r.get("template_name")
    if stage == "pretrain":
        r.drop("template_name", "pretraining reads plain text and uses no chat template")
    elif not r.has("template_name"):
        r.note("template_name", "no template set: dpo-dist uses the tokenizer's own chat template (else default)")
    elif not template:
        r.note("template_name", "empty: no template set: dpo-dist uses the tokenizer's own chat template "
                                "(else default)")
    else:
        from dpo_dist.data.templates import template_names

        if template in template_names():
            r.carried["template_name"] = "model.template"
            model["template"] = template
        elif template in _TEMPLATE_RENAMES:
            model["template"], why = _TEMPLATE_RENAMES[template]
            r.carried["template_name"] = "model.template"
            r.note("template_name", f"changed to {model['template']}: {why}")
        else:
            r.note("template_name", f"not carried over: dpo-dist has no template of that name (it has "
                                    f"{', '.join(template_names())}); no template is set, so the tokenizer's own "
                                    "chat template is used; set model.template to choose one")

    remote = _remote_code_family(model["name_or_path"], template)
    if remote:
        family, matched = remote
        model["trust_remote_code"] = True
        if matched.startswith("model_name_or_path"):
            r.carried["model_name_or_path"] = "model.name_or_path, model.trust_remote_code"
        r.notes.append(f"model.trust_remote_code: true: {family} models ship their own modelling code (matched by "
                       f"{matched}), which the source runs too (it loads every model with trust_remote_code=True); "
                       f"{_REMOTE_CODE_WARNING}")
    else:
        families = ", ".join(family for family, _, _ in _REMOTE_CODE_FAMILIES)
        r.notes.append("model.trust_remote_code: false: the source loads every model with trust_remote_code=True, but "
                       f"this one is not of a family that needs it ({families}), so no code from the model runs; set "
                       "model.trust_remote_code: true only if it fails to load without its own code, and only for "
                       "code you have read or trust")

    method_cfg: dict = {"type": method}
    lora_keys = (("lora_rank", "lora_r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout"))
    if method == "full":
        for key, _ in lora_keys:
            r.drop(key, "train_mode is full, so there are no LoRA adapters")
    else:
        for key, target in lora_keys:
            method_cfg[target] = r.value(key, f"method.{target}")
        method_cfg["target_modules"] = None  # every linear layer but lm_head, as the source does

    # -- data and lengths -----------------------------------------------------------------------------------------
    data: dict = {"train": r.required("train_file", f"{STAGE}.data.train"), "format": "auto"}
    eval_file = r.get("eval_file")
    if eval_file:
        data["eval"] = r.value("eval_file", f"{STAGE}.data.eval")
    elif r.has("eval_file"):
        r.note("eval_file", "empty: no evaluation data")
    if r.has("tokenize_num_workers"):
        data["num_proc"] = r.value("tokenize_num_workers", f"{STAGE}.data.num_proc")
        r.positive("tokenize_num_workers", data["num_proc"])

    max_length = r.required("max_seq_length", f"{STAGE}.max_length")
    stage_cfg: dict = {"stage": stage, "data": data, "max_length": max_length}
    if stage == "dpo":
        if r.has("max_prompt_length"):
            prompt = r.value("max_prompt_length", f"{STAGE}.max_prompt_length")
            if not 0 < prompt < max_length:
                raise ConfigError(f"{source}: max_prompt_length: {prompt} must be between 1 and max_seq_length - 1 "
                                  f"({max_length - 1})")
            stage_cfg["max_prompt_length"] = prompt
        elif SOURCE_DEFAULTS["max_prompt_length"] < max_length:
            stage_cfg["max_prompt_length"] = r.value("max_prompt_length", f"{STAGE}.max_prompt_length")
        else:
            r.note("max_prompt_length", f"the source's default 512 does not fit max_seq_length {max_length}; "
                                        "dpo-dist's default (max_length / 2) applies")
        stage_cfg["beta"] = r.value("beta", f"{STAGE}.beta")
        stage_cfg["loss_type"] = "sigmoid"  # the source's DPO loss
    else:
        for key in ("max_prompt_length", "beta"):
            r.drop(key, f"only applies to dpo, and this run is {stage}")

    # -- hyperparameters ------------------------------------------------------------------------------------------
    fp16 = r.value("fp16", f"{TRAIN}.fp16")
    bf16 = r.value("bf16", f"{TRAIN}.bf16")
    for key in ("fp16", "bf16"):
        if r.has(key):
            r.carried[key] = f"{TRAIN}.{key}, profile.precision"
    if fp16 and bf16:
        raise ConfigError(f"{source}: fp16, bf16: both are true; choose one (fp16 for V100, bf16 for A100/H100)")
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"

    micro = r.value("per_device_train_batch_size", f"profile.micro_batch_size, {TRAIN}.global_batch_size")
    accumulation = r.value("gradient_accumulation_steps", f"{TRAIN}.global_batch_size")
    r.positive("per_device_train_batch_size", micro)
    r.positive("gradient_accumulation_steps", accumulation)
    global_batch = micro * accumulation * world_size
    r.notes.append(f"global_batch_size: {global_batch} = per_device_train_batch_size {micro} × "
                   f"gradient_accumulation_steps {accumulation} × world_size {world_size}"
                   + ("" if world_size > 1 else " (pass --world-size N if the run used N GPUs)"))

    train: dict = {
        "learning_rate": r.value("learning_rate", f"{TRAIN}.learning_rate"),
        "global_batch_size": global_batch,
        "num_epochs": r.value("num_train_epochs", f"{TRAIN}.num_epochs"),
    }
    if r.has("max_steps"):
        train["max_steps"] = r.value("max_steps", f"{TRAIN}.max_steps")

    from dpo_dist.config.recipe import SCHEDULERS

    scheduler = r.get("lr_scheduler_type", SOURCE_DEFAULTS["lr_scheduler_type"])
    if scheduler in SCHEDULERS:
        train["lr_scheduler"] = r.value("lr_scheduler_type", f"{TRAIN}.lr_scheduler")
    else:
        r.drop("lr_scheduler_type", f"dpo-dist's schedulers are {', '.join(SCHEDULERS)}; the recipe uses cosine; "
                                    f"set {TRAIN}.lr_scheduler to choose another")
        train["lr_scheduler"] = "cosine"
    train["warmup_steps"] = r.value("warmup_steps", f"{TRAIN}.warmup_steps")
    if r.has("warmup_ratio"):
        train["warmup_ratio"] = r.value("warmup_ratio", f"{TRAIN}.warmup_ratio")
    train["weight_decay"] = r.value("weight_decay", f"{TRAIN}.weight_decay")
    train["max_grad_norm"] = r.value("max_grad_norm", f"{TRAIN}.max_grad_norm")

    optim = r.get("optim", SHARED_DEFAULTS["optim"])
    known = _known_optimizers()
    if known is not None and optim not in known:
        r.note("optim", f"changed to adamw_torch: the installed transformers has no optimizer {optim!r} "
                        "(adamw_hf was its older AdamW); adamw_torch is the standard AdamW")
        optim = "adamw_torch"
    else:
        r.value("optim", f"{TRAIN}.optim")
    train["optim"] = optim
    checkpointing = r.value("gradient_checkpointing", f"{TRAIN}.gradient_checkpointing")
    train["gradient_checkpointing"] = checkpointing
    train["fp16"] = bool(fp16)
    train["bf16"] = bool(bf16)
    train["logging_steps"] = r.value("logging_steps", f"{TRAIN}.logging_steps")
    train["save_steps"] = r.value("save_steps", f"{TRAIN}.save_steps")
    train["save_total_limit"] = r.value("save_total_limit", f"{TRAIN}.save_total_limit")
    if r.has("eval_steps"):
        if data.get("eval") and r.get("eval_steps"):
            train["eval_steps"] = r.value("eval_steps", f"{TRAIN}.eval_steps")
        else:
            r.drop("eval_steps", "there is no eval_file to evaluate on" if not data.get("eval")
                   else "no evaluation during training")
    elif data.get("eval"):
        r.notes.append(f"eval_steps: absent: data.eval is set, but dpo-dist evaluates only every "
                       f"{TRAIN}.eval_steps steps; set it to evaluate during training")
    stage_cfg["train"] = train

    # -- keys with no recipe equivalent ---------------------------------------------------------------------------
    unsloth = r.get("use_unsloth", False)
    r.drop("use_unsloth", "dpo-dist does not use Unsloth; the profile's attention and checkpointing settings apply"
           if unsloth else "dpo-dist does not use Unsloth (the input did not enable it either)")
    if r.has("report_to"):
        _report_to(r, train)
    r.drop("min_seq_length", "dpo-dist has no minimum-length filter and keeps short rows (pretraining packs them "
                             "into blocks); remove short rows from the data beforehand if that matters")
    save_strategy = r.get("save_strategy")
    if r.has("save_strategy"):
        r.drop("save_strategy", "dpo-dist always saves every train.save_steps steps"
               + ("" if save_strategy == "steps" else f"; {_show(save_strategy)} is not available"))
    for key, why in _TRAINER_OWNED.items():
        r.drop(key, why)

    # -- name, seed, output ---------------------------------------------------------------------------------------
    output_dir = r.get("output_dir")
    if name is None:
        name = _safe_name(Path(output_dir).name) if output_dir else ""
        name = name or _safe_name(Path(source).stem) or "firefly-import"
    elif not name or _safe_name(name) != name:
        raise ConfigError(f"name: {name!r} must be a plain file name (letters, digits, '.', '_', '-')")
    recipe: dict = {"name": name, "seed": r.value("seed", "seed"), "model": model, "method": method_cfg}
    if output_dir:
        recipe["output_dir"] = r.value("output_dir", "output_dir")
    elif r.has("output_dir"):
        r.note("output_dir", f"empty: runs go to runs/{name}")
    recipe["stages"] = [stage_cfg]

    # -- launch profile -------------------------------------------------------------------------------------------
    # A full fine-tune under the source's ZeRO file needs ZeRO-3 here too: one GPU cannot hold a 7B model's states.
    ds_path = r.get("deepspeed")
    zero = bool(ds_path)
    zero3_full = zero and method == "full"
    offload, size_why = _zero3_offload(model["name_or_path"], world_size) if zero3_full else (False, "")
    shipped = _fitting_profile(method, precision, micro, world_size, optim, checkpointing, zero, offload)
    profile_name = shipped or f"{name}-profile"
    ds_file = ZERO3_OFFLOAD_FILE if offload else ZERO3_FILE
    if r.has("deepspeed"):
        stage_hint = re.search(r"(?:z|zero|stage)[_-]?([012])(?![0-9])", Path(str(ds_path)).name.lower())
        other_stage = (f"; the input's file looks like ZeRO stage {stage_hint.group(1)}, and dpo-dist ships ZeRO-3 "
                       "files only (they shard more, so what fitted still fits)") if ds_path and stage_hint else ""
        if not ds_path:
            r.drop("deepspeed", "empty: no DeepSpeed")
        elif shipped:
            from dpo_dist.config.profiles import load_profile

            r.drop("deepspeed", f"the backend is the launch profile's: {shipped} trains with "
                                f"{load_profile(shipped).deepspeed_file().relative_to(_root())}"
                                + (f"; {size_why}" if size_why else "")
                                + f"; compare it with the input's ZeRO file if that sets offloading or another "
                                  f"stage{other_stage}")
        elif zero3_full:
            nodes = ("; the profile puts them on one node: for several nodes set num_nodes and num_processes per node"
                     if world_size > 8 else "")
            r.drop("deepspeed", f"the backend is the launch profile's: no shipped profile fits "
                                f"{_processes(world_size)} × micro-batch {micro}, {precision}, {method}, optim "
                                f"{optim}, so the written profile {profile_name} trains with DeepSpeed ZeRO-3 "
                                f"({ds_file}) on {_processes(world_size)}{nodes}; {size_why}; compare {ds_file} with "
                                f"the input's ZeRO file if that sets other options{other_stage}")
        else:
            suggestion = "8xh100-zero3-qlora" if method == "qlora" else "8xh100-zero3"
            r.drop("deepspeed", f"choose a ZeRO-3 launch profile such as {suggestion} instead (the backend belongs "
                                f"to the launch profile; its global batch must divide by micro-batch × processes)")
    profile: dict | None = None  # None: the shipped profile fits
    if not shipped and zero3_full:
        profile = {
            "name": profile_name,
            "description": f"DeepSpeed ZeRO-3{' + CPU offload' if offload else ''} on {world_size} "
                           f"GPU{'s' if world_size > 1 else ''}, {precision}, micro-batch {micro} (converted from "
                           f"{Path(source).name})",
            "launcher": "deepspeed",
            "device": "gpu",
            "deepspeed_config": ds_file,
            "num_processes": world_size,
            "micro_batch_size": micro,
            "precision": precision,
            "attn_implementation": "auto",
        }
    elif not shipped:
        profile = {
            "name": profile_name,
            "description": f"one GPU, {precision}, micro-batch {micro} (converted from {Path(source).name})",
            "launcher": "python",
            "device": "gpu",
            "num_processes": 1,
            "micro_batch_size": micro,
            "precision": precision,
            "attn_implementation": "auto",
        }
        if world_size > 1:
            r.notes.append(
                f"world_size: {world_size}: no shipped launch profile fits {world_size} processes × micro-batch "
                f"{micro}, {precision}, {method}, optim {optim}; the written profile runs one process with gradient "
                f"accumulation {global_batch // micro}, keeping the global batch {global_batch}; for several GPUs "
                "use a multi-process profile (`dpo-dist profiles` lists them)")

    # -- unknown keys ---------------------------------------------------------------------------------------------
    for key in train_args:
        if key not in r.carried and key not in r.noted:
            r.note(key, "not carried over: unknown key (not a train_args key this importer knows)")

    conversion = Conversion(name=name, recipe=recipe, profile=profile, profile_name=profile_name, notes=r.notes,
                            carried=r.carried, global_batch_size=global_batch)
    _validate(conversion, source)
    return conversion


def _root() -> Path:
    from dpo_dist.config.resources import SHIPPED

    return SHIPPED


def _validate(conv: Conversion, source: str) -> None:
    """Check the mappings the way dpo-dist will read them; an error names the input key it came from."""
    from dpo_dist.config.profiles import Profile, gradient_accumulation, load_profile
    from dpo_dist.config.recipe import recipe_from_dict
    from dpo_dist.config.schema import build

    def blame(err: ConfigError, prefix: str = "") -> ConfigError:
        text = str(err)
        hits = [(len(t), key, t) for key, targets in conv.carried.items() for t in targets.split(", ")
                if t.startswith(prefix) and t[len(prefix):] and t[len(prefix):] in text]
        if hits:
            _, key, target = max(hits)
            return ConfigError(f"{source}: {key} (as {target}): {text}")
        return ConfigError(f"{source}: converted {'profile' if prefix else 'recipe'}: {text}")

    try:
        recipe_from_dict(conv.recipe, source="recipe")
    except ConfigError as err:
        raise blame(ConfigError(str(err).removeprefix("recipe: "))) from None
    try:
        profile = load_profile(conv.profile_name) if conv.profile is None else build(Profile, conv.profile)
    except ConfigError as err:
        raise blame(err, "profile.") from None
    gradient_accumulation(conv.global_batch_size, profile.micro_batch_size, profile.world_size, where=TRAIN,
                          sequence_parallel=profile.sequence_parallel)


# -- CLI ------------------------------------------------------------------------------------------------------------

def read_train_args(path: str | Path) -> tuple[dict, list[str]]:
    """The JSON object in `path`, and a note for each key given more than once (the last value wins)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    seen: dict[str, int] = {}

    def pairs(items: list) -> dict:
        for key, _ in items:
            seen[key] = seen.get(key, 0) + 1
        return dict(items)

    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=pairs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err.reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of training arguments at the top level")
    dupes = [f"{key}: given {count} times in the file; the last value is used (as the source trainer does)"
             for key, count in seen.items() if count > 1]
    return data, dupes


def _yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=110)


def _run_command(recipe_path: Path, profile_arg: str, launcher: str) -> str:
    if launcher == "python":
        return f"dpo-dist train {recipe_path} --profile {profile_arg}"
    return f"dpo-dist launch {recipe_path} --profile {profile_arg}"


def run(args) -> int:
    """`dpo-dist import-firefly`: convert, write, validate what was written, print it with every note."""
    from dpo_dist.config.profiles import load_profile
    from dpo_dist.config.recipe import load_recipe

    source = Path(args.train_args)
    data, dupes = read_train_args(source)
    world_size = getattr(args, "world_size", 1)
    world_size = 1 if world_size is None else world_size
    conv = convert(data, source=str(source), world_size=world_size, name=getattr(args, "name", None) or None)
    conv.notes[:0] = dupes

    out = Path(getattr(args, "out", None) or ".")
    recipe_path = out / f"{conv.name}.yaml"
    profile_path = out / f"{conv.profile_name}.yaml" if conv.profile is not None else None
    targets = [p for p in (recipe_path, profile_path) if p is not None]
    if not getattr(args, "force", False):
        existing = [str(p) for p in targets if p.exists()]
        if existing:
            raise ConfigError(f"{', '.join(existing)}: already exists; pass --force to overwrite, or choose "
                              "another --out or --name")
    profile_arg = str(profile_path) if profile_path else conv.profile_name
    launcher = conv.profile["launcher"] if conv.profile else load_profile(conv.profile_name).launcher
    command = _run_command(recipe_path, profile_arg, launcher)

    header = [f"Converted from a Firefly train_args JSON: {source} (dpo-dist import-firefly).",
              f"Run: {command}",
              "Paths are as in the input; relative ones resolve from the directory dpo-dist runs in."]
    if conv.notes:
        header.append("Not carried over, changed, or worth knowing:")
        header += [f"  - {n}" for n in conv.notes]
    out.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text("".join(f"# {line}\n" for line in header) + _yaml(conv.recipe), encoding="utf-8")
    if profile_path is not None:
        shape = (f"DeepSpeed ZeRO-3 on {_processes(conv.profile['num_processes'])}"
                 if conv.profile["launcher"] == "deepspeed" else "one process")
        prof_header = [f"Launch profile converted from {source} (dpo-dist import-firefly): {shape}, "
                       "micro-batch and precision from the input."]
        profile_path.write_text("".join(f"# {line}\n" for line in prof_header) + _yaml(conv.profile),
                                encoding="utf-8")
    try:
        load_recipe(recipe_path)
        load_profile(profile_arg)
    except ConfigError:
        for path in targets:
            path.unlink(missing_ok=True)
        raise

    print(f"wrote {recipe_path} (recipe {conv.name}, stage {conv.recipe['stages'][0]['stage']}, "
          f"method {conv.recipe['method']['type']})")
    if profile_path is not None:
        print(f"wrote {profile_path} (launch profile: no shipped profile fits)")
    else:
        print(f"launch profile: {conv.profile_name} (shipped; it fits the input exactly)")
    print(f"run it with: {command}")
    if conv.notes:
        print(f"notes ({len(conv.notes)}):")
        for note in conv.notes:
            print(f"  {note}")
    return 0


def add_parser(sub) -> Any:
    """Register `import-firefly` on an argparse subparsers object."""
    p = sub.add_parser("import-firefly", help="convert a Firefly train_args JSON into a recipe (and a launch "
                       "profile when no shipped one fits); prints what was not carried over")
    p.add_argument("train_args", help="the train_args JSON file")
    p.add_argument("--out", default=".", help="directory for NAME.yaml and NAME-profile.yaml (default: .)")
    p.add_argument("--name", help="recipe name (default: the last part of output_dir, else the file name)")
    p.add_argument("--world-size", type=int, default=1,
                   help="GPUs the input ran on; global batch = per-device batch × accumulation × this (default 1)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=run)
    return p


__all__ = ["Conversion", "convert", "read_train_args", "run", "add_parser", "TASK_TYPES", "TRAIN_MODES"]
