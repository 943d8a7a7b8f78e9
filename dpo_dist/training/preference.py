"""KTO, ORPO and CPO: TRL's own trainers (KTOTrainer; ORPOTrainer and CPOTrainer from trl.experimental) on rows
tokenized by dpo_dist.data, so every method renders and truncates exactly as DPO does.

- kto: unpaired rows (prompt_ids, completion_ids, label). With LoRA/QLoRA the reference is the adapter-disabled
  base (TRL's own peft path); the KL baseline is TRL's: each completion is paired with its neighbour's prompt within
  a micro-batch, so rows keep their order (TRL needs sequential sampling) and are not length-grouped.
- orpo, cpo: reference-free, on the DPO pairs. TRL scores them with the model's full logits (its own
  concatenated forward), so train.compact_logps does not apply to them.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from trl import KTOConfig, KTOTrainer

from dpo_dist.config.profiles import Profile
from dpo_dist.config.recipe import StageConfig
from dpo_dist.data.grouping import LengthGroupedTrainer, grouping_for
from dpo_dist.data.tokenize import IGNORE
from dpo_dist.reliability.guard import GuardedTrainer
from dpo_dist.training.common import training_kwargs
from dpo_dist.training.dpo.logps import install_compact_head


def _experimental():
    """ORPO and CPO classes; trl.experimental's import notice is about its API's stability, which compat/ tracks."""
    from trl.import_utils import TRLExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TRLExperimentalWarning)
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer, CPOConfig, CPOTrainer


# ---- KTO ------------------------------------------------------------------------------------------------------------

class PretokenizedKTOTrainer(LengthGroupedTrainer, GuardedTrainer, KTOTrainer):
    """KTOTrainer on rows already holding prompt_ids/completion_ids/label."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # compat: trl-kto-pretokenized-rows
        # TRL 1.16 extracts, unpairs, templates and re-tokenizes every row; ours are tokenized with the recipe's
        # template and max_prompt_length. What remains of its preparation is the KL pairing, done the same way: each
        # completion goes with the previous row's prompt, rotating within each micro-batch of the row order.
        if "prompt_ids" not in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self.calculate_KL:
            dataset = dataset.map(_rotate_completions, batched=True, batch_size=args.per_device_train_batch_size,
                                  desc=f"Pairing KL completions ({dataset_name})")
        return dataset


def _rotate_completions(batch: dict) -> dict:
    ids = batch["completion_ids"]
    return {"KL_completion_ids": ids[-1:] + ids[:-1]}


def kto_args(stage: StageConfig, profile: Profile, run_dir: Path, seed: int, world_size: int,
             overrides: dict | None = None) -> KTOConfig:
    (loss,) = stage.loss_types
    return KTOConfig(
        **{**training_kwargs(stage, profile, run_dir, seed, world_size), **(overrides or {})},
        max_length=stage.max_length,  # rows are already cut to fit
        beta=stage.beta,
        loss_type=loss,
        desirable_weight=stage.desirable_weight,
        undesirable_weight=stage.undesirable_weight,
        # The KL pairs are built in row order: TRL refuses any other sampling for the kto loss.
        train_sampling_strategy="sequential" if loss == "kto" else "random",
    )


def build_kto_trainer(stage: StageConfig, args: KTOConfig, model, tokenizer, train_ds, eval_ds, peft_config,
                      callbacks, log=print):
    import pyarrow.compute as pc

    desirable = int(pc.sum(train_ds.data.column("label")).as_py() or 0)  # counted in Arrow, no row decoded
    log(f"[train] {stage.name}: {desirable} desirable and {len(train_ds) - desirable} undesirable rows; "
        f"desirable_weight {stage.desirable_weight}, undesirable_weight {stage.undesirable_weight}")
    if stage.train.group_by_length:
        log(f"[train] {stage.name}: rows keep their order (train.group_by_length does not apply to kto: TRL builds "
            "its KL pairs from neighbouring rows)")
    trainer = PretokenizedKTOTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        length_grouping=None,
    )
    if trainer.ref_model is not None:  # full-parameter KTO: a frozen copy of the start
        trainer.ref_model.requires_grad_(False)
    if stage.train.compact_logps:
        # TRL's KTO asks the model's fused head for log-probs, entropy and mean logits: the compact head gives them
        # from the completion tokens only.
        policy = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        reference = getattr(trainer.ref_model, "module", trainer.ref_model)
        for model in (policy, reference) if reference is not None else (policy,):
            install_compact_head(model, ("log_probs", "entropy", "mean_logits"), stage.train.logps_vocab_chunk, False)
    return trainer


# ---- ORPO and CPO ---------------------------------------------------------------------------------------------------

def pair_columns(feature: dict) -> dict:
    """Our DPO row → the columns TRL's ORPO/CPO collator pads: the prompt, and prompt + each response with labels
    that mask the prompt."""
    prompt = list(feature["prompt_ids"])
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        ids = prompt + list(feature[f"{side}_ids"])
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = [1] * len(ids)
        out[f"{side}_labels"] = [IGNORE] * len(prompt) + list(feature[f"{side}_ids"])
    return out


def _pretokenized(base):
    class Pretokenized(LengthGroupedTrainer, GuardedTrainer, base):
        __doc__ = f"{base.__name__} on rows already holding prompt_ids/chosen_ids/rejected_ids."

        def tokenize_row(self, feature, model=None):
            # compat: trl-orpo-cpo-pretokenized-rows
            # TRL's ORPO/CPO tokenize each row in __init__ (after templating it); ours are tokenized with the
            # recipe's template and lengths, and only take TRL's column layout here.
            if "prompt_ids" in feature:
                return pair_columns(feature)
            return super().tokenize_row(feature, model)

    Pretokenized.__name__ = Pretokenized.__qualname__ = f"Pretokenized{base.__name__}"
    return Pretokenized


def orpo_args(stage: StageConfig, profile: Profile, run_dir: Path, seed: int, world_size: int,
              overrides: dict | None = None):
    ORPOConfig = _experimental()[0]
    return ORPOConfig(
        **{**training_kwargs(stage, profile, run_dir, seed, world_size), **(overrides or {})},
        max_length=stage.max_length,
        beta=stage.beta,
        remove_unused_columns=False,  # TRL's pair collator reads its own columns
    )


def cpo_args(stage: StageConfig, profile: Profile, run_dir: Path, seed: int, world_size: int,
             overrides: dict | None = None):
    CPOConfig = _experimental()[2]
    (loss,) = stage.loss_types
    return CPOConfig(
        **{**training_kwargs(stage, profile, run_dir, seed, world_size), **(overrides or {})},
        max_length=stage.max_length,
        beta=stage.beta,
        loss_type=loss,
        label_smoothing=stage.label_smoothing,
        cpo_alpha=stage.cpo_alpha,
        simpo_gamma=stage.simpo_gamma,
        alpha=stage.alphapo_alpha,
        remove_unused_columns=False,
    )


def build_pair_trainer(stage: StageConfig, args, model, tokenizer, train_ds, eval_ds, peft_config, callbacks,
                       log=print):
    _, ORPOTrainer, _, CPOTrainer = _experimental()
    if stage.train.compact_logps:
        log(f"[train] {stage.name}: TRL's {stage.stage} trainer scores the full logits (train.compact_logps applies to "
            "dpo and kto only)")
    cls = _pretokenized(ORPOTrainer if stage.stage == "orpo" else CPOTrainer)
    return cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        length_grouping=grouping_for(stage),
    )
