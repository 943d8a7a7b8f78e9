"""What every stage shares: TrainingArguments from recipe + profile, and the run-directory metrics log."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from dpo_dist.config.profiles import Profile, gradient_accumulation
from dpo_dist.config.recipe import StageConfig
from dpo_dist.distributed.devices import local_tensor


def precision_of(stage: StageConfig, profile: Profile) -> str:
    """The one decision of a stage's precision: the profile's when it sets one, else the recipe's fp16/bf16 keys.
    Everything after it (TrainingArguments, the FSDP state, the reference cache key, the export dtype) reads it
    back from the arguments with `args_precision`."""
    return profile.precision or stage.train.precision


def args_precision(args) -> str:
    """fp32 | fp16 | bf16, as `training_kwargs` wrote it into TrainingArguments."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def training_kwargs(stage: StageConfig, profile: Profile, run_dir: Path, seed: int, world_size: int) -> dict:
    """The TrainingArguments keys shared by every stage (TRL's SFTConfig and DPOConfig both take them)."""
    t = stage.train
    precision = precision_of(stage, profile)
    checkpointing = t.gradient_checkpointing if profile.gradient_checkpointing is None else profile.gradient_checkpointing
    if t.report_to is not None:
        report_to = list(t.report_to)
    else:
        report_to = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        seed=seed,
        data_seed=seed,
        per_device_train_batch_size=profile.micro_batch_size,
        per_device_eval_batch_size=profile.micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation(
            t.global_batch_size, profile.micro_batch_size, world_size, where=f"stages.{stage.name}.train",
            sequence_parallel=profile.sequence_parallel),
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps or t.warmup_ratio,  # transformers 5: a value below 1 is a ratio
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=profile.optim or t.optim,
        # Token-level losses (SFT, pretraining): the Trainer counts the label tokens of every micro-batch in the
        # optimizer step (num_items_in_batch), sums that count over ranks, and each micro-batch's loss is its token
        # sum divided by the global count; so any split into ranks and accumulation steps gives the one-process
        # per-token mean. Stated explicitly because the parity guarantee depends on it.
        average_tokens_across_devices=True,
        gradient_checkpointing=checkpointing,
        # Non-reentrant checkpointing works with frozen inputs and LoRA; reentrant is opt-in per backend.
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        # The Trainer's own rotation deletes old checkpoints before the new one is complete; CheckpointMarker rotates
        # (train.save_total_limit) only after it is.
        save_total_limit=None,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        report_to=report_to,
        dataloader_num_workers=0,
        disable_tqdm=False,
        torch_compile=t.torch_compile,
        **({"torch_compile_backend": t.torch_compile_backend, "torch_compile_mode": t.torch_compile_mode}
           if t.torch_compile else {}),
    )


class TrackerConfig(TrainerCallback):
    """The resolved recipe and profile as the run's config, in each tracker the run reports to (rank 0 only), and one
    tracker run per stage. The Trainer's own integration callbacks come first in its list, so their runs are open by
    on_train_begin and they have finished their own on_train_end before this one's."""

    def __init__(self, config: dict):
        self.config = json.loads(json.dumps(config, default=str))  # paths as text

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if "mlflow" in args.report_to:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_dict(self.config, "dpo_dist_config.json")
        if "wandb" in args.report_to:
            import wandb

            if wandb.run is not None:
                wandb.config.update({"dpo_dist": self.config}, allow_val_change=True)

    def on_train_end(self, args, state, control, **kwargs):
        # transformers' W&B callback leaves its run open and the next stage's callback would log into it (it only
        # starts a run when none is open); MLflow's callback ends its own run.
        if state.is_world_process_zero and "wandb" in args.report_to:
            import wandb

            if wandb.run is not None:
                wandb.finish()


def drop_rows_after(path: Path, step: int) -> None:
    """Resuming from checkpoint-`step` (0: no complete checkpoint): the rows of a per-step JSONL log (metrics.jsonl,
    samples.jsonl) written after that step by the interrupted run are redone, so drop them."""
    if path.is_file():
        rows = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")


class StopAtStep(TrainerCallback):
    """train.stop_at_step: the run ends after that optimizer step, its schedule unchanged (the Trainer's own stop)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class MetricsLogger(TrainerCallback):
    """Appends one JSON object per logging step to metrics.jsonl (rank 0 only), with real tokens per second."""

    def __init__(self, path: Path):
        self.path = path
        self._last_tokens = 0.0
        self._last_time = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = 0.0
        for entry in state.log_history:  # resuming: continue the token count where it was
            self._last_tokens = entry.get("num_tokens", self._last_tokens)
        if state.is_world_process_zero:
            drop_rows_after(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        now = time.perf_counter()
        if "num_tokens" in logs and "train_runtime" not in logs:
            elapsed = now - self._last_time
            if elapsed > 0 and logs["num_tokens"] > self._last_tokens:
                row["tokens_per_s"] = round((logs["num_tokens"] - self._last_tokens) / elapsed, 2)
            self._last_tokens, self._last_time = logs["num_tokens"], now
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_trained(trainer, out: Path, peft: bool) -> None:
    """Write the complete adapter (or model) to `out`, whichever backend sharded it. Collective: call on every rank.
    Weights holding NaN/inf are refused (dpo_dist.reliability.guard.Guard.check_weights) before anything is written.

    A full-parameter model is exported in the dtype it trained at (export_dtype): a bf16 run writes bf16 weights on
    every profile, as ZeRO-3's 16-bit gather does, though it trained fp32 master weights (dpo_dist.models.loading.model_dtype).
    The masters stay in the checkpoints, which resume from them."""
    guard = getattr(trainer, "guard", None)
    if guard is not None:
        guard.check_weights(trainer.model, trainer.state.global_step, str(out))
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    sharded = plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type)
    if trainer.is_deepspeed_enabled or (peft and not sharded):
        trainer.save_model(str(out))  # an adapter (single, DDP, FSDP full state dict); ZeRO-3 gathers 16-bit weights
        if trainer.accelerator.is_main_process:
            # The Trainer adds its pickled arguments; an exported adapter or model holds safetensors and JSON only
            # (the run's settings are in the run directory's recipe.yaml).
            (out / "training_args.bin").unlink(missing_ok=True)
        return
    # compat: peft-sharded-adapter-save
    # A sharded FSDP adapter (Trainer.save_model writes nothing for a sharded state dict): gather it alone (not the
    # 4-bit base) from its shards. A full model, on any backend but ZeRO-3: its whole state dict.
    if peft:
        state = {}
        for name, param in trainer.model.named_parameters():
            if param.requires_grad:
                full = param.full_tensor() if hasattr(param, "full_tensor") else param
                state[name.replace("_checkpoint_wrapped_module.", "")] = full.detach().cpu()
    else:
        state = trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.accelerator.is_main_process:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if peft:
        _write_adapter(model, state, out)
        return
    dtype = export_dtype(trainer.args)
    model.save_pretrained(str(out), state_dict=cast_floats(without_tied_copies(model, state), dtype))
    # save_pretrained records the live model's dtype (fp32 masters) in config.json; record the saved one.
    config = copy.deepcopy(model.config)
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(str(out))


def without_tied_copies(model, state: dict) -> dict:
    """`state` with each tied parameter once, under the name the model itself gives it (named_parameters, which
    lists a shared parameter once): a gathered FSDP2 state dict holds a tied lm_head.weight as a separate tensor,
    which save_pretrained would write, though a single-process export holds it once."""
    wrappers = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")

    def clean(name: str) -> str:
        for w in wrappers:
            name = name.replace(w, "")
        return name

    kept = {id(p): clean(n) for n, p in model.named_parameters()}
    copies = {clean(n) for n, p in model.named_parameters(remove_duplicate=False) if kept[id(p)] != clean(n)}
    return {k: v for k, v in state.items() if clean(k) not in copies}


def export_dtype(args):
    """The dtype an exported full model is written in: the run's precision (TrainingArguments bf16 / fp16)."""
    from dpo_dist.models.loading import DTYPES

    return DTYPES[args_precision(args)]


def cast_floats(state: dict, dtype) -> dict:
    """`state` with its floating-point tensors cast to `dtype`. Tensors that share storage (tied embeddings) stay
    shared, so save_pretrained still recognises and drops the tied copy."""
    import torch

    cast: dict = {}
    out = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            out[key] = tensor
            continue
        ident = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident not in cast:
            cast[ident] = tensor.to(dtype)
            if dtype == torch.float16 and not bool(torch.isfinite(cast[ident]).all()):
                raise ValueError(f"{key} has values beyond fp16's range (65504): it cannot be exported in fp16")
        out[key] = cast[ident]
    return out


def _write_adapter(model, state: dict, out: Path) -> None:
    """Write a PEFT adapter directory from gathered weights named as in `model.named_parameters()`.

    peft's own save_pretrained(state_dict=...) selects adapter entries by the module paths it finds in the model; under
    FSDP activation checkpointing those paths contain the checkpoint wrapper, the gathered names do not, and it writes
    an empty file. The file format is peft's: adapter name removed from each key, safetensors, adapter_config.json."""
    from safetensors.torch import save_file

    name = model.active_adapter
    weights = {}
    for key, tensor in state.items():
        if f".{name}." not in key:
            raise RuntimeError(f"trainable parameter {key} is not part of adapter {name!r}; cannot save it as an adapter")
        weights[key.replace(f".{name}.", ".")] = tensor.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[name])
    config.inference_mode = True
    config.save_pretrained(str(out))


def model_facts(model) -> dict:
    """Parameter counts and dtypes as this rank holds them: what the summary reports about the trained model."""
    total = trainable = 0
    dtypes, all_dtypes, quantized = set(), set(), 0
    for module in model.modules():
        # bitsandbytes' own layer; peft's LoRA wrapper around it shares the class name
        if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes"):
            quantized += 1
    for param in model.parameters():
        n = local_tensor(param).numel()
        total += n
        dtype = str(param.dtype).replace("torch.", "")
        all_dtypes.add(dtype)
        if param.requires_grad:
            trainable += n
            dtypes.add(dtype)
    return {"params_on_rank": total, "trainable_on_rank": trainable, "trainable_dtypes": sorted(dtypes),
            "param_dtypes": sorted(all_dtypes), "linear4bit_modules": quantized}
