"""KTO, ORPO and CPO: TRL's own trainers (KTOTrainer; ORPOTrainer and CPOTrainer from trl.experimental) on rows
tokenized by dpo_dist.data, so every method renders and truncates exactly as DPO does.

- kto: unpaired rows (prompt_ids, completion_ids, label). With LoRA/QLoRA the reference is the adapter-disabled
  base (TRL's own peft path). The KL pairs are built as TRL builds them, each completion with its neighbour's
  prompt, but within the optimizer step's global batch rather than one micro-batch, and the KL baseline is the mean
  over that global batch: neither depends on how a profile splits it. Rows keep their order (TRL needs sequential
  sampling) and are not length-grouped.
- orpo, cpo: reference-free, on the DPO pairs. TRL scores them with the model's full logits (its own
  concatenated forward), so train.compact_logps does not apply to them. Their NLL term is a token mean over the
  global batch, as SFT's loss is.

Both measure a global-batch quantity once per optimizer step, in get_batch_samples: the Trainer collects that step's
micro-batches there, before the first forward, and every rank calls it the same number of times.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from trl import KTOConfig, KTOTrainer
from trl.trainer.utils import use_adapter

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
    """KTOTrainer on rows already holding prompt_ids/completion_ids/label, with the KL baseline of the global batch."""

    _step_kl: torch.Tensor | None = None  # this optimizer step's KL baseline, measured over its global batch
    _kl_calls = 0

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # compat: trl-kto-pretokenized-rows
        # TRL 1.16 extracts, unpairs, templates and re-tokenizes every row; ours are tokenized with the recipe's
        # template and max_prompt_length. What remains of its preparation is the KL pairing: each completion goes with
        # the previous row's prompt, rotating within each global batch of the row order (TRL rotates within each
        # micro-batch; a global batch is the same rows under every profile, so its pairs are too).
        if "prompt_ids" not in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self.calculate_KL:
            dataset = dataset.map(_rotate_completions, batched=True, batch_size=global_batch(args),
                                  desc=f"Pairing KL completions ({dataset_name})")
        return dataset

    # compat: trl-kto-global-kl
    # TRL 1.16 estimates the KL baseline per micro-batch and averages it over the ranks of that micro-batch only, so
    # one process with 4 accumulation steps and 2 ranks with 2 each weight the same rows differently. Here it is the
    # mean over every KL pair of the optimizer step (all ranks, all accumulation steps), clamped at 0 as TRL does,
    # measured before the step's first forward. TRL's loss then reads it through _compute_kl_logps: the policy's call
    # returns the baseline and the reference's returns 0, so (policy - reference).mean() is that baseline.
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_kl = self._global_kl(batches) if self.calculate_KL and self.loss_type == "kto" else None
        return batches, num_items

    def _global_kl(self, batches: list) -> torch.Tensor:
        device = self.accelerator.device
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # sum of log-ratios, number of KL pairs
        adapter_off = self.ref_model is None and is_peft_model(self.model)  # TRL's own choice of reference
        self.model_wrapped.train()  # as training_step leaves it (dropout, 4-bit kernels), before the step's first call
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.no_grad(), self.compute_loss_context_manager():
                policy = super()._compute_kl_logps(self.model_wrapped, batch)
                if self.precompute_ref_logps:
                    reference = batch["ref_KL_logps"]
                elif adapter_off:
                    unwrapped = self.accelerator.unwrap_model(self.model)
                    with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                        reference = super()._compute_kl_logps(self.model_wrapped, batch)
                else:
                    reference = super()._compute_kl_logps(self.ref_model, batch)
            totals[0] += (policy.double() - reference.double()).sum()
            totals[1] += policy.numel()
        totals = self.accelerator.reduce(totals, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1)).clamp(min=0).float()

    def _compute_loss(self, model, inputs, return_outputs):
        self._kl_calls = 0
        if self._use_step_kl() and self.precompute_ref_logps:
            inputs = {**inputs, "ref_KL_logps": torch.zeros_like(inputs["ref_KL_logps"])}
        return super()._compute_loss(model, inputs, return_outputs)

    def _compute_kl_logps(self, model, batch):
        if not self._use_step_kl():
            return super()._compute_kl_logps(model, batch)
        self._kl_calls += 1
        value = self._step_kl if self._kl_calls == 1 else torch.zeros((), device=self._step_kl.device)
        return value.to(self.accelerator.device).expand(len(batch["label"]))

    def _use_step_kl(self) -> bool:
        return self._step_kl is not None and self.model.training


def global_batch(args) -> int:
    """Rows per optimizer step (the Trainer's arguments: micro-batch × accumulation × processes)."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


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
        __doc__ = (f"{base.__name__} on rows already holding prompt_ids/chosen_ids/rejected_ids, with its NLL term a "
                   "token mean over the global batch.")
        _step_nll: torch.Tensor | None = None  # (NLL tokens, micro-batches) of this optimizer step, all ranks

        def tokenize_row(self, feature, model=None):
            # compat: trl-orpo-cpo-pretokenized-rows
            # TRL's ORPO/CPO tokenize each row in __init__ (after templating it); ours are tokenized with the
            # recipe's template and lengths, and only take TRL's column layout here.
            if "prompt_ids" in feature:
                return pair_columns(feature)
            return super().tokenize_row(feature, model)

        # compat: trl-orpo-cpo-global-nll
        # TRL 1.16 averages the NLL term over the tokens of each micro-batch, so a profile that splits the global
        # batch differently weights the rows differently. Each micro-batch's term is rescaled to its share of the
        # step's token mean: term × its tokens × micro-batches / the step's tokens; the Trainer's 1/accumulation and
        # the ranks' gradient mean then give Σ token NLL / Σ tokens over the global batch.
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            totals = torch.tensor([float(sum(int(self._nll_tokens(b)) for b in batches)), float(len(batches))],
                                  dtype=torch.float64, device=self.accelerator.device)
            self._step_nll = self.accelerator.reduce(totals, reduction="sum")
            return batches, num_items

        def concatenated_forward(self, model, batch):
            out = super().concatenated_forward(model, batch)
            if self._step_nll is None or not self.model.training:
                return out
            tokens, micro_batches = self._step_nll
            scale = (self._nll_tokens(batch) * micro_batches / tokens.clamp(min=1)).to(out[4].dtype)
            return (*out[:4], out[4] * scale.to(out[4].device), *out[5:])

        def _nll_tokens(self, batch) -> torch.Tensor:
            """The tokens TRL's NLL term averages over in this micro-batch's chosen rows (targets, after the shift)."""
            if base.__name__ == "ORPOTrainer":  # the whole chosen sequence, prompt included
                return batch["chosen_attention_mask"][:, 1:].sum()
            return (batch["chosen_labels"][:, 1:] != IGNORE).sum()

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
