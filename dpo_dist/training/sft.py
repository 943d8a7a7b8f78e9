"""SFT and continued pretraining: TRL's SFTTrainer on pre-tokenized rows (input_ids + labels)."""
from __future__ import annotations

from pathlib import Path

from trl import SFTConfig, SFTTrainer

from dpo_dist.data.grouping import LengthGroupedTrainer, grouping_for
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


class GuardedSFTTrainer(LengthGroupedTrainer, GuardedTrainer, SFTTrainer):
    """TRL's SFTTrainer with dpo-dist's staged checkpoints and loss guard (dpo_dist.reliability.guard), and length-grouped
    batches (dpo_dist.data.grouping)."""


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
