"""The recipe: what to learn (model, data, stages, method, hyperparameters). Never hardware.

Precedence, stated once: command-line `key=value` overrides > the recipe file > the defaults below.
A recipe-level `train:` block holds defaults that each stage's own `train:` block overrides key by key.
"""
from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from dpo_dist.config.schema import ConfigError, apply_override, build, load_yaml, to_dict

Stage = Literal["pretrain", "sft", "dpo", "kto", "orpo", "cpo"]
PREFERENCE_STAGES = ("dpo", "kto", "orpo", "cpo")  # trained on preferences: pairs (dpo, orpo, cpo) or labels (kto)
Method = Literal["full", "lora", "qlora"]
# TRL 1.16's DPO losses (DPOConfig.loss_type), and dpo-dist's own reference-free simpo.
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo")
KTO_LOSSES = ("kto", "apo_zero_unpaired")  # KTOConfig.loss_type
CPO_LOSSES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")  # CPOConfig.loss_type
LOSSES = {"dpo": DPO_LOSSES, "kto": KTO_LOSSES, "cpo": CPO_LOSSES}  # each stage's losses; its first is the default
LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo", "kto",
                   "apo_zero_unpaired", "alphapo"]
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
# The losses TRL computes from f-divergence scores; the others read the plain log-ratios (DPOTrainer refuses them).
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# The stage keys that apply to some stage types only (the others are refused when set away from their default).
STAGE_KEYS = {
    "max_prompt_length": PREFERENCE_STAGES, "beta": PREFERENCE_STAGES, "loss_type": ("dpo", "kto", "cpo"),
    "label_smoothing": ("dpo", "cpo"), "simpo_gamma": ("dpo", "cpo"), "loss_weights": ("dpo",), "ld_alpha": ("dpo",),
    "f_divergence_type": ("dpo",), "f_alpha_divergence_coef": ("dpo",), "discopop_tau": ("dpo",),
    "sft_weight": ("dpo",), "desirable_weight": ("kto",), "undesirable_weight": ("kto",), "cpo_alpha": ("cpo",),
    "alphapo_alpha": ("cpo",),
}
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr", "polynomial")


@dataclass
class ModelConfig:
    name_or_path: str  # the base model: a Hugging Face model id or a local model directory
    tokenizer: str | None = None  # a tokenizer id or directory; null = name_or_path
    revision: str | None = None  # hub branch, tag or commit of name_or_path and tokenizer; null = the default branch
    trust_remote_code: bool = False  # let transformers run the model repository's own Python code (a warning is shown)
    # Chat template name from dpo_dist.data.templates; null = the tokenizer's own template, else "default".
    template: str | None = None

    def check(self, where: str) -> None:
        if self.template is not None:
            from dpo_dist.data.templates import get_template

            try:
                get_template(self.template)
            except ValueError as err:
                raise ConfigError(f"{where}.template: {err}") from None


@dataclass
class MethodConfig:
    # full: train every weight; lora: LoRA adapters on a frozen base; qlora: LoRA adapters on a 4-bit (NF4) base.
    type: Method = "lora"
    lora_r: int = 64  # lora/qlora: the adapters' rank
    lora_alpha: int = 16  # lora/qlora: the adapters' scale is lora_alpha / lora_r
    lora_dropout: float = 0.05  # lora/qlora: dropout on the adapters' input
    # Module names that get adapters (peft's target_modules, e.g. [q_proj, v_proj]); null = every linear layer except
    # lm_head.
    target_modules: list[str] | None = None

    def check(self, where: str) -> None:
        if self.lora_r <= 0:
            raise ConfigError(f"{where}.lora_r: must be positive, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"{where}.lora_alpha: must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"{where}.lora_dropout: must be in [0, 1), got {self.lora_dropout}")


@dataclass
class DataConfig:
    train: str  # a .jsonl/.json/.parquet file, a directory (pretrain), or a Hugging Face dataset name
    eval: str | None = None  # evaluation data, the same kinds of source as train; scored every train.eval_steps
    format: str = "auto"  # the rows' format; auto = detected per file from the first usable row's keys
    split: str = "train"  # the split read from a Hugging Face dataset (or a saved dataset directory)
    # A row that cannot be used: error = stop, naming its file:line; skip = leave it out, listed in data_report.json.
    on_bad_row: Literal["error", "skip"] = "error"
    max_rows: int | None = None  # use the first N rows (after validation)
    num_proc: int | None = None  # tokenization processes; null = the cores available (fewer for a small source)

    def check(self, where: str) -> None:
        if self.max_rows is not None and self.max_rows <= 0:
            raise ConfigError(f"{where}.max_rows: must be positive, got {self.max_rows}")


Tracker = Literal["tensorboard", "wandb", "mlflow"]  # each is also the name of its module and of its pip extra


@dataclass
class TrainConfig:
    learning_rate: float = 2e-4  # the peak learning rate (after warmup)
    # Rows per optimizer step over all processes, whatever the profile: gradient accumulation = global batch /
    # (micro-batch × processes), and a global batch that does not divide is refused.
    global_batch_size: int = 32
    num_epochs: float = 1.0  # passes over the training data (may be fractional)
    max_steps: int = -1  # > 0 overrides num_epochs
    # Stop after this many optimizer steps, the schedule staying the whole run's (the first N steps of the real run:
    # a preview, or `dpo-dist parity --steps`); the adapter or model is exported at that step. null = to the end.
    stop_at_step: int | None = None
    lr_scheduler: str = "cosine"  # the learning-rate schedule (transformers' lr_scheduler_type)
    warmup_steps: int = 0  # steps of linear warmup; > 0 overrides warmup_ratio
    warmup_ratio: float = 0.0  # warmup as a fraction of the total steps, used when warmup_steps is 0
    weight_decay: float = 0.0  # the optimizer's weight decay
    max_grad_norm: float = 1.0  # gradients are clipped to this global norm
    # transformers' optimizer name (TrainingArguments.optim), e.g. paged_adamw_32bit; a profile's optim overrides it.
    optim: str = "adamw_torch"
    # Recompute activations in the backward pass (less memory, more compute); a profile's setting overrides it.
    gradient_checkpointing: bool = False
    fp16: bool = False  # fp16 mixed precision (V100); neither fp16 nor bf16 = fp32; a profile's precision overrides
    bf16: bool = False  # bf16 mixed precision (A100/H100); see fp16
    logging_steps: int = 10  # write metrics (metrics.jsonl, TensorBoard) every this many optimizer steps
    save_steps: int = 500  # save a checkpoint every this many optimizer steps
    save_total_limit: int | None = 2  # complete checkpoints kept (older ones deleted after a save); null = all
    eval_steps: int | None = None  # evaluate on data.eval every this many steps; null = no evaluation
    # A step whose loss is NaN/inf: stop (naming the step and the last good checkpoint), or skip its update.
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = 10  # with skip: stop once this many steps were skipped
    # Order rows so each global batch holds rows of similar length (less padding); shuffled per epoch, and keyed to
    # the global batch only, so every profile trains on the same batches (dpo_dist.data.grouping). Not for pretrain.
    group_by_length: bool = True
    group_window: int = 16  # rows are sorted by length within windows of this many global batches
    # DPO: project only completion tokens through the LM head, in vocabulary tiles of logps_vocab_chunk columns
    # (dpo_dist.training.dpo.logps); false leaves TRL's fused head as it is.
    compact_logps: bool = True
    logps_vocab_chunk: int = 8192  # DPO with compact_logps: vocabulary columns per tile of the LM head
    # DPO: run the backbone on the real tokens packed into one row (needs compact_logps). auto = only with flash
    # attention's varlen kernels; true also under SDPA/eager (a dense block-diagonal mask: correct, rarely faster).
    padding_free: bool | Literal["auto"] = "auto"
    # DPO: reference log-probs computed once per pair before the first step and cached on disk, keyed by the rows'
    # tokens and the reference model (dpo_dist.training.dpo.ref_cache); false runs the reference forward in every step.
    ref_logps_cache: bool = True
    ref_logps_batch_size: int | None = None  # pairs per forward of that pass; null = 4 × the profile's micro-batch
    # Compile the model with torch.compile (TrainingArguments.torch_compile). Off by default: the first steps pay
    # the compilation, and each new batch length recompiles (measured in docs/benchmarks.md).
    torch_compile: bool = False
    torch_compile_backend: str = "inductor"  # with torch_compile: one of torch.compiler.list_backends()
    torch_compile_mode: str | None = None  # e.g. "reduce-overhead", "max-autotune"; null = the backend's default
    # Experiment trackers the Trainer reports to, through its own integrations (rank 0 only); null = [tensorboard]
    # when TensorBoard is installed, [] = none. metrics.jsonl is written whatever this says.
    report_to: list[Tracker] | None = None
    # A JSONL file of prompts (`dpo-dist generate`'s format) the model answers greedily every sample_every steps,
    # into the run directory's samples.jsonl and the trackers. Sampling never changes the training numbers.
    sample_prompts: str | None = None
    sample_every: int | None = None  # with sample_prompts: steps between samples; null = logging_steps
    sample_max_new_tokens: int = 64  # with sample_prompts: the longest answer in tokens

    def check(self, where: str) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"{where}.learning_rate: must be positive, got {self.learning_rate}")
        if self.global_batch_size <= 0:
            raise ConfigError(f"{where}.global_batch_size: must be positive, got {self.global_batch_size}")
        if self.num_epochs <= 0 and self.max_steps <= 0:
            raise ConfigError(f"{where}.num_epochs: must be positive unless max_steps is set")
        if self.stop_at_step is not None and self.stop_at_step <= 0:
            raise ConfigError(f"{where}.stop_at_step: must be positive (or null to train to the end), got "
                              f"{self.stop_at_step}")
        if self.fp16 and self.bf16:
            raise ConfigError(f"{where}: fp16 and bf16 are both true; choose one (fp16 for V100, bf16 for A100/H100)")
        if self.lr_scheduler not in SCHEDULERS:
            raise ConfigError(f"{where}.lr_scheduler: {self.lr_scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{where}.warmup_steps/warmup_ratio: must be >= 0 and ratio < 1")
        for name in ("logging_steps", "save_steps", "max_nonfinite_skips", "group_window", "logps_vocab_chunk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name}: must be positive, got {getattr(self, name)}")
        if self.padding_free not in (True, False, "auto"):
            raise ConfigError(f"{where}.padding_free: must be true, false or auto, got {self.padding_free!r}")
        if self.padding_free is True and not self.compact_logps:
            raise ConfigError(f"{where}.padding_free: true needs compact_logps: true (the packed rows are scored by "
                              "dpo-dist's log-prob path)")
        if self.torch_compile:
            import torch

            if self.torch_compile_backend not in torch.compiler.list_backends(exclude_tags=()):
                raise ConfigError(f"{where}.torch_compile_backend: {self.torch_compile_backend!r} is not a "
                                  f"torch.compile backend ({', '.join(torch.compiler.list_backends())})")
        if self.ref_logps_batch_size is not None and self.ref_logps_batch_size <= 0:
            raise ConfigError(f"{where}.ref_logps_batch_size: must be positive, or null for 4 × the micro-batch; "
                              f"got {self.ref_logps_batch_size}")
        for i, tracker in enumerate(self.report_to or []):
            if tracker in self.report_to[:i]:
                raise ConfigError(f"{where}.report_to: {tracker} is listed twice")
            if importlib.util.find_spec(tracker) is None:
                raise ConfigError(f"{where}.report_to: {tracker} is not installed; pip install 'dpo-dist[{tracker}]', "
                                  "or take it off the list")
        self._check_samples(where)
        if self.save_total_limit is not None and self.save_total_limit <= 0:
            raise ConfigError(f"{where}.save_total_limit: must be positive (the number of checkpoints kept), or null "
                              f"to keep all; got {self.save_total_limit}")

    def _check_samples(self, where: str) -> None:
        if self.sample_prompts is None:
            for key in ("sample_every", "sample_max_new_tokens"):
                if getattr(self, key) != getattr(TrainConfig, key):
                    raise ConfigError(f"{where}.{key}: set, but there is no {where}.sample_prompts to answer; add "
                                      "one (a JSONL of prompts) or remove it")
            return
        for key in ("sample_every", "sample_max_new_tokens"):  # the file itself: config.preflight.check_data
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{where}.{key}: must be positive, got {value}")

    @property
    def every_sample(self) -> int:
        """Steps between samples (sample_every, else logging_steps)."""
        return self.sample_every or self.logging_steps

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "bf16" if self.bf16 else "fp32"


@dataclass
class StageConfig:
    # What this stage trains: pretrain (raw text), sft (conversations), dpo, orpo or cpo (preference pairs), or kto
    # (single completions labelled desirable or not).
    stage: Stage
    data: DataConfig  # this stage's data
    # This stage's hyperparameters; each key given here overrides the recipe-level train: block's.
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str | None = None  # run-directory name; defaults to the stage type
    # A model directory this stage starts from instead of the previous stage's result (or model.name_or_path): an
    # earlier run's <stage>/model or <stage>/merged, say. Tokenizer and template stay the recipe's. null = the chain's.
    start_from: str | None = None
    # Replaces the recipe's method for this stage, whole: a key left out takes its default, not the recipe's value.
    method: MethodConfig | None = None
    # Tokens per sequence: SFT rows are cut to it, a preference row's prompt + response is cut to fit it, pretraining
    # text is packed into blocks of it.
    max_length: int = 2048
    # Preference stages: prompt tokens kept (cut from the left, before the responses); null = half of max_length.
    max_prompt_length: int | None = None
    # Preference stages: dpo, kto, cpo: weight of the pull to the reference (higher = stay closer; cpo's reward scale);
    # orpo: the weight λ of its odds-ratio term.
    beta: float = 0.1
    # The preference loss. dpo: one of TRL's DPO losses (sigmoid = the DPO paper's; simpo is reference-free), or a
    # list of them whose losses are added with loss_weights (MPO-style mixtures, e.g. [sigmoid, bco_pair, sft]);
    # kto: kto or apo_zero_unpaired; cpo: sigmoid, hinge, ipo, simpo or alphapo. null = the first of these.
    loss_type: LossType | list[LossType] | None = None
    loss_weights: list[float] | None = None  # DPO: one weight per loss_type entry; null = 1.0 each
    label_smoothing: float = 0.0  # DPO, CPO: assumed label-noise rate (robust: [0, 0.5); exo_pair: above 0; aot)
    # DPO: LD-DPO's weight (0..1) of the completion tokens past the shorter completion's length; null = 1 (plain DPO).
    ld_alpha: float | None = None
    f_divergence_type: FDivergence = "reverse_kl"  # DPO: the divergence to the reference (reverse_kl = DPO's)
    f_alpha_divergence_coef: float = 0.5  # DPO, alpha_divergence: its alpha
    discopop_tau: float = 0.05  # DPO, discopop loss: the temperature of its log-ratio modulation
    simpo_gamma: float = 0.5  # DPO and CPO, simpo loss: target reward margin
    # DPO: weight of an NLL term on the chosen response added to the preference loss (RPO); keeps the chosen
    # response's likelihood from falling along with the rejected one's. 0 = plain DPO.
    sft_weight: float = 0.0
    # KTO: weight of the desirable (label true) rows' losses; with unbalanced labels, set the two weights so that
    # desirable_weight × desirable rows / (undesirable_weight × undesirable rows) lies in [1, 4/3].
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0  # KTO: weight of the undesirable (label false) rows' losses
    cpo_alpha: float = 1.0  # CPO: weight of the NLL (behaviour cloning) term on the chosen response
    alphapo_alpha: float = 0.0  # CPO: AlphaPO's reward shape, r = (1 - p^-alpha) / alpha; 0 = log-prob rewards

    @property
    def data_kind(self) -> str:
        """The data this stage reads (dpo_dist.data.formats.FORMATS): orpo and cpo read dpo's pairs."""
        return "dpo" if self.stage in ("orpo", "cpo") else self.stage

    @property
    def loss_types(self) -> list[str]:
        """loss_type as a list (a single name is a list of one; null is the stage's default loss)."""
        if self.loss_type is None:
            return [LOSSES[self.stage][0]] if self.stage in LOSSES else []
        return list(self.loss_type) if isinstance(self.loss_type, list) else [self.loss_type]

    def _check_losses(self, where: str) -> None:
        """What DPOTrainer would refuse (some only at its first step), refused here, naming the key."""
        losses = self.loss_types
        wrong = [x for x in losses if x not in DPO_LOSSES]
        if wrong:
            raise ConfigError(f"{where}.loss_type: {wrong[0]} is not a dpo loss (it is one of "
                              f"{'kto' if wrong[0] in KTO_LOSSES else 'cpo'}'s); dpo stages take "
                              f"{', '.join(DPO_LOSSES)}")
        if not losses:
            raise ConfigError(f"{where}.loss_type: an empty list; give one loss or a list of them")
        if len(set(losses)) != len(losses):
            raise ConfigError(f"{where}.loss_type: {losses} names a loss twice; give each once (weights go in "
                              "loss_weights)")
        if "simpo" in losses and len(losses) > 1:
            raise ConfigError(f"{where}.loss_type: simpo is reference-free and runs on its own; it cannot be mixed "
                              f"with {[x for x in losses if x != 'simpo']}")
        if self.loss_weights is not None:
            if len(self.loss_weights) != len(losses):
                raise ConfigError(f"{where}.loss_weights: {len(self.loss_weights)} weights for {len(losses)} "
                                  f"loss types {losses}; give one weight per loss_type entry")
            if any(w < 0 for w in self.loss_weights) or not any(self.loss_weights):
                raise ConfigError(f"{where}.loss_weights: weights must be >= 0 and not all 0, got "
                                  f"{self.loss_weights}")
            if "simpo" in losses:
                raise ConfigError(f"{where}.loss_weights: not used by loss_type simpo; remove it")
        if self.sft_weight < 0:
            raise ConfigError(f"{where}.sft_weight: must be >= 0, got {self.sft_weight}")
        if self.sft_weight and "simpo" in losses:
            raise ConfigError(f"{where}.sft_weight: not supported with loss_type simpo")
        if self.sft_weight and "sft" in losses:
            raise ConfigError(f"{where}.sft_weight: loss_type already lists sft; weight it in loss_weights instead")
        if "robust" in losses and not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{where}.label_smoothing: the robust loss needs a value in [0, 0.5)")
        if "exo_pair" in losses and not 0.0 < self.label_smoothing < 1.0:
            raise ConfigError(f"{where}.label_smoothing: the exo_pair loss needs a value in (0, 1), e.g. 1e-3; got "
                              f"{self.label_smoothing}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{where}.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"{where}.ld_alpha: must be in [0, 1] (or null for plain DPO), got {self.ld_alpha}")
        if self.ld_alpha is not None and "simpo" in losses:
            raise ConfigError(f"{where}.ld_alpha: not used by loss_type simpo; remove it")
        if self.f_divergence_type != "reverse_kl":
            other = [x for x in losses if x not in F_DIVERGENCE_LOSSES]
            if other:
                raise ConfigError(f"{where}.f_divergence_type: {self.f_divergence_type} works only with the losses "
                                  f"{', '.join(F_DIVERGENCE_LOSSES)}; loss_type has {', '.join(other)}")
        if self.f_divergence_type == "alpha_divergence" and not 0.0 < self.f_alpha_divergence_coef:
            raise ConfigError(f"{where}.f_alpha_divergence_coef: must be above 0, got {self.f_alpha_divergence_coef}")
        if self.discopop_tau <= 0:
            raise ConfigError(f"{where}.discopop_tau: must be above 0, got {self.discopop_tau}")

    def check(self, where: str) -> None:
        if self.name is None:
            self.name = self.stage
        if self.max_length <= 1:
            raise ConfigError(f"{where}.max_length: must be > 1, got {self.max_length}")
        from dpo_dist.data.formats import FORMATS

        formats = FORMATS[self.data_kind]
        if self.data.format not in formats:
            from dpo_dist.config.schema import closest

            hint = closest(self.data.format, formats)
            raise ConfigError(f"{where}.data.format: {self.data.format!r} is not a {self.data_kind} format "
                              f"({', '.join(formats)})" + (f"; did you mean {hint!r}?" if hint else ""))
        defaults = {f.name: f.default for f in fields(StageConfig)}
        for key, stages in STAGE_KEYS.items():
            if self.stage not in stages and getattr(self, key) != defaults[key]:
                kinds = ", ".join(stages[:-1]) + f" and {stages[-1]}" if len(stages) > 1 else stages[0]
                raise ConfigError(f"{where}.{key}: only applies to {kinds} stages, this stage is {self.stage}")
        if self.stage not in PREFERENCE_STAGES:
            return
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta: must be positive, got {self.beta}")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"{where}.max_prompt_length: must be between 1 and max_length-1 ({self.max_length - 1}), "
                f"got {self.max_prompt_length}"
            )
        if self.stage == "dpo":
            self._check_losses(where)
        elif self.stage in LOSSES:
            if isinstance(self.loss_type, list):
                raise ConfigError(f"{where}.loss_type: a list of losses is for dpo stages; {self.stage} takes one "
                                  f"of {', '.join(LOSSES[self.stage])}")
            if self.loss_type is not None and self.loss_type not in LOSSES[self.stage]:
                raise ConfigError(f"{where}.loss_type: {self.loss_type} is not a {self.stage} loss; {self.stage} "
                                  f"stages take {', '.join(LOSSES[self.stage])}")
        if self.stage == "kto":
            for key in ("desirable_weight", "undesirable_weight"):
                if getattr(self, key) <= 0:
                    raise ConfigError(f"{where}.{key}: must be positive, got {getattr(self, key)}")
        if self.stage == "cpo":
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ConfigError(f"{where}.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
            if self.cpo_alpha < 0:
                raise ConfigError(f"{where}.cpo_alpha: must be >= 0, got {self.cpo_alpha}")
            if self.loss_types == ["alphapo"] and self.cpo_alpha != 1.0:
                raise ConfigError(f"{where}.cpo_alpha: loss_type alphapo sets it to 0 (no NLL term); remove it, or "
                                  "use loss_type simpo with cpo_alpha and alphapo_alpha")


@dataclass
class Recipe:
    name: str  # the recipe's name; the default output_dir is runs/<name>
    model: ModelConfig  # the base model every stage starts from (the first stage, when chained)
    stages: list[StageConfig]  # the stages, run in order; each trains into output_dir/<its name>
    method: MethodConfig = field(default_factory=MethodConfig)  # how every stage trains, unless it has its own
    seed: int = 42  # seeds adapter initialisation, data order and length grouping: the same on every profile
    output_dir: str | None = None  # defaults to runs/<name>
    # Each stage starts from the previous stage's result (LoRA adapters merged into a full-precision base).
    chain: bool = True
    # Defaults for every stage's train: block (TrainConfig keys); a stage's own train: overrides them key by key.
    train: dict | None = None

    def check(self, where: str) -> None:
        if not self.stages:
            raise ConfigError(f"{where + '.' if where else ''}stages: at least one stage is required")
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"stages: two stages share the name {dupes[0]!r}; give them distinct `name:` keys")
        if self.chain:
            order = {"pretrain": 0, "sft": 1, **{kind: 2 for kind in PREFERENCE_STAGES}}
            for prev, cur in zip(self.stages, self.stages[1:]):
                if order[cur.stage] < order[prev.stage]:
                    raise ConfigError(
                        f"stages: {cur.stage} after {prev.stage} with chain: true would train in the wrong order; "
                        "use pretrain → sft → a preference stage, or set chain: false to run the stages independently"
                    )
        if self.output_dir is None:
            self.output_dir = f"runs/{self.name}"

    def to_dict(self) -> dict:
        return to_dict(self)

    def method_of(self, stage: StageConfig) -> MethodConfig:
        return stage.method or self.method

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


def _stage_alias(items: list, part: str) -> int | None:
    for i, item in enumerate(items):
        if isinstance(item, dict) and part in (item.get("name"), item.get("stage")):
            return i
    return None


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipe_from_dict(data: dict, overrides: list[str] = (), source: str = "recipe") -> Recipe:
    data = copy.deepcopy(data)
    try:
        for assignment in overrides:
            apply_override(data, assignment, _stage_alias)
        defaults = data.get("train") or {}
        if not isinstance(defaults, dict):
            raise ConfigError("train: expected a mapping of training defaults")
        stages = data.get("stages")
        if isinstance(stages, list):
            for i, stage in enumerate(stages):
                if isinstance(stage, str):  # shorthand `stages: [sft, dpo]` is not enough: each needs data
                    raise ConfigError(f"stages[{i}]: expected a mapping with at least `stage:` and `data:`")
                if isinstance(stage, dict) and (defaults or "train" in stage):
                    stage["train"] = _merge(defaults, stage.get("train") or {})
        # Validate the defaults on their own so a typo there names `train.x`, not a stage.
        build(TrainConfig, defaults, "train")
        return build(Recipe, data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """`path` is a recipe file, or the name of a shipped recipe (dpo_dist.config.resources.recipe_file)."""
    from dpo_dist.config.resources import recipe_file

    path = recipe_file(path)
    return recipe_from_dict(load_yaml(path), overrides, source=str(path))
