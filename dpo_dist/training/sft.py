"""SFT and continued pretraining: TRL's SFTTrainer on pre-tokenized rows (input_ids + labels)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from dpo_dist import compat
from dpo_dist.data.grouping import LengthGroupedTrainer, grouping_for
from dpo_dist.distributed import sequence
from dpo_dist.config.profiles import Profile
from dpo_dist.config.recipe import StageConfig
from dpo_dist.reliability.guard import GuardedTrainer
from dpo_dist.training.common import training_kwargs


def sft_args(stage: StageConfig, profile: Profile, run_dir: Path, seed: int, world_size: int,
             overrides: dict | None = None) -> SFTConfig:
    return SFTConfig(
        **{**training_kwargs(stage, profile, run_dir, seed, world_size), **(overrides or {})},
        max_length=stage.max_length,
        packing=False,  # pretraining data is already packed into blocks; SFT rows keep their own masks
        # Rows come tokenized, truncated and with labels (dpo_dist.data.tokenize). TRL's own preparation would map
        # over every row again, on rank 0 alone while the other ranks wait in a collective, and drop rows silently.
        dataset_kwargs={"skip_prepare_dataset": True},
    )


class StepTokenMean(Trainer):
    """Under sequence parallelism, the loss is the token mean over the optimizer step, as without it.

    compat: transformers-sequence-parallel-global-token-mean
    transformers 5 averages each micro-batch's loss over that micro-batch's tokens under sequence parallelism
    (deepspeed_sp_compute_loss), so a profile that splits the step differently weights the tokens differently.
    Here every rank counts the targets of its parts of the step's micro-batches (dpo_dist.distributed.sequence hands
    them as pre-shifted `shift_labels`), the count is summed over all ranks, and each micro-batch's loss is its group's
    summed token NLL over that count, times the data-parallel degree (the ranks' gradient mean divides by it; the
    group's gather and ZeRO-3's division by every rank cancel, dpo_dist.distributed.sequence). Sits under TRL's
    SFTTrainer, which calls it for the loss and reads its metrics from the outputs."""

    _step_tokens = None  # the targets of this optimizer step, all ranks (a tensor), under sequence parallelism

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.get_sp_size() > 1:
            # compat: accelerate-ulysses-batches
            # DeepSpeed's adapter gathers each tensor at every rank's own length, which gloo refuses when the
            # ranks' batches differ in length; dpo_dist.distributed.sequence exchanges them whole and splits them
            # the same way.
            compat.patch("accelerate-ulysses-batches")
            self.accelerator.deepspeed_ulysses_dl_adapter = self._group_batches

    def _group_batches(self, loader, model):
        sequence.any_batch_size()
        sequence.skip_group_batches()
        return sequence.GroupBatches(loader, sequence.group(), self.accelerator.device, sequence.split_lm_batch)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.get_sp_size() > 1:
            compat.patch("transformers-sequence-parallel-global-token-mean")
            self.loss_is_scaled_for_ga = True  # divided by the step's tokens, not by the accumulation steps
            local = sum((b["shift_labels"] != -100).sum() for b in batches if "shift_labels" in b)
            count = torch.as_tensor(local, dtype=torch.float64, device=self.accelerator.device)
            self._step_tokens = self.accelerator.reduce(count, reduction="sum")
        return batches, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._step_tokens is None or not self.model.training or "shift_labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from torch.distributed.nn.functional import all_gather

        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**inputs)
        log_probs = getattr(outputs, "log_probs", None)
        targets = (inputs["shift_labels"] != -100).sum()
        local = -log_probs.sum() if log_probs is not None else outputs.loss * targets
        group = sequence.group()
        total = torch.stack(all_gather(local.reshape(()), group=group)).sum()
        data_parallel = self.accelerator.num_processes // self.get_sp_size()
        loss = total * data_parallel / self._step_tokens.to(total.dtype).clamp(min=1)
        return (loss, outputs) if return_outputs else loss


class GuardedSFTTrainer(LengthGroupedTrainer, GuardedTrainer, SFTTrainer, StepTokenMean):
    """TRL's SFTTrainer with dpo-dist's staged checkpoints and loss guard (dpo_dist.reliability.guard), length-grouped
    batches (dpo_dist.data.grouping) and the step's token mean under sequence parallelism (StepTokenMean)."""


def build_sft_trainer(stage: StageConfig, args: SFTConfig, model, tokenizer, train_ds, eval_ds, peft_config,
                      callbacks):
    return GuardedSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        length_grouping=grouping_for(stage),
    )
