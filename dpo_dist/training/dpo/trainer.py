"""DPO: TRL's DPOTrainer on rows tokenized by dpo_dist.data, plus a reference-free SimPO-style loss.

With LoRA/QLoRA the trainer gets the base model and a peft_config, so the reference is the same weights with the
adapter disabled: no second copy is ever loaded. Full-parameter DPO loads a frozen reference.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer

from dpo_dist import compat
from dpo_dist.data.grouping import LengthGroupedTrainer, grouping_for
from dpo_dist.distributed import sequence
from dpo_dist.config.profiles import Profile
from dpo_dist.config.recipe import StageConfig
from dpo_dist.reliability.guard import GuardedTrainer
from dpo_dist.training.common import args_precision, training_kwargs
from dpo_dist.training.dpo.logps import install_compact_head, padding_free_for
from dpo_dist.training.dpo.ref_cache import KeyedCollator, RefLogpsCache, cache_dir, model_key, without_pair_keys


class PretokenizedDPOTrainer(LengthGroupedTrainer, GuardedTrainer, DPOTrainer):
    """DPOTrainer that accepts rows already holding prompt_ids/chosen_ids/rejected_ids."""

    def __init__(self, *args, simpo_gamma: float = 0.5, **kwargs):
        self.simpo_gamma = simpo_gamma
        self.ref_cache: RefLogpsCache | None = None  # set by build_dpo_trainer (train.ref_logps_cache)
        super().__init__(*args, **kwargs)
        if self.get_sp_size() > 1:
            # compat: accelerate-ulysses-batches
            # The Trainer hands its training loader to accelerate's Ulysses adapter, which splits input_ids/labels
            # batches; DPO's batches go whole to every rank of the group instead (dpo_dist.distributed.sequence),
            # and the compact head splits them.
            compat.patch("accelerate-ulysses-batches")
            self.accelerator.deepspeed_ulysses_dl_adapter = self._group_batches
            # compat: trl-dpo-tokens-under-sequence-parallel
            # TRL sums num_tokens over every rank and divides by its tensor-parallel size, the ranks that share a
            # batch; under sequence parallelism the ranks of a group share it.
            compat.patch("trl-dpo-tokens-under-sequence-parallel")
            self._tp_size = self._tp_size * self.get_sp_size()

    def _group_batches(self, loader, model):
        sequence.any_batch_size()
        sequence.skip_group_batches()
        return sequence.GroupBatches(loader, sequence.group(), self.accelerator.device)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # compat: trl-dpo-pretokenized-rows
        # trl 1.16 re-renders and re-tokenizes every row unconditionally; ours are tokenized with the recipe's
        # template and max_prompt_length (which trl 1.x dropped), so they are used as they are.
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    # compat: trl-dpo-global-sft-nll
    # TRL 1.16's sft loss (sft_weight, or an sft entry of loss_type) is a token mean over each micro-batch's chosen
    # completions, so a profile that splits the global batch differently weights the rows differently. Each
    # micro-batch's weight is rescaled to its share of the step's token mean: weight × its tokens × micro-batches /
    # the step's tokens; the Trainer's 1/accumulation and the ranks' gradient mean then give Σ token NLL / Σ tokens
    # over the global batch, as SFT's loss is.
    _step_sft = None  # (chosen completion tokens, micro-batches) of this optimizer step, all ranks

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if "sft" in self.loss_types:
            totals = torch.tensor([float(sum(int(_chosen_tokens(b)) for b in batches)), float(len(batches))],
                                  dtype=torch.float64, device=self.accelerator.device)
            self._step_sft = self.accelerator.reduce(totals, reduction="sum")
        return batches, num_items

    def _compute_loss(self, model, inputs, return_outputs):
        if self._step_sft is None or not self.model.training:
            return self._compute_dpo_loss(model, inputs, return_outputs)
        tokens, micro_batches = self._step_sft.tolist()
        scale = float(_chosen_tokens(inputs)) * micro_batches / max(tokens, 1.0)
        weights = self.loss_weights
        self.loss_weights = [w * scale if t == "sft" else w for t, w in zip(self.loss_types, weights)]
        try:
            return self._compute_dpo_loss(model, inputs, return_outputs)
        finally:
            self.loss_weights = weights

    def _compute_dpo_loss(self, model, inputs, return_outputs):
        # compat: trl-dpo-cached-ref-logps
        model_inputs = without_pair_keys(inputs)  # TRL passes the batch's other keys on to the model's forward
        if self.loss_types == ["simpo"]:
            return self._simpo_loss(model, model_inputs)
        if self.ref_cache is None or not self.model.training:
            return super()._compute_loss(model, model_inputs, return_outputs)
        chosen, rejected = self.ref_cache.lookup(self, inputs)  # by the collator's pair keys: no device→host copy
        inputs = {**model_inputs, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
        self.precompute_ref_logps = True  # TRL's loss then reads the reference values from the batch
        try:
            return super()._compute_loss(model, inputs, return_outputs)
        finally:
            self.precompute_ref_logps = False

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(model, without_pair_keys(inputs))

    def _simpo_loss(self, model, inputs):
        """Reference-free: -log σ(β·(mean logp chosen − mean logp rejected) − γ). No reference pass is run."""
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(mask == 0, -100)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                    use_cache=False, fused_lm_head=True)
        shift_mask = mask[:, 1:]
        logps = out.log_probs[:, -shift_mask.size(1):].sum(dim=1)
        mean_logps = logps / shift_mask.sum(dim=1).clamp(min=1)
        chosen, rejected = mean_logps.chunk(2, dim=0)
        loss = -F.logsigmoid(self.beta * (chosen - rejected) - self.simpo_gamma).mean()
        chosen_rewards, rejected_rewards = (self.beta * chosen).detach(), (self.beta * rejected).detach()
        gather = self.accelerator.gather
        # compat: trl-dpo-simpo-metrics
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        logps_c, logps_r = logps.detach().chunk(2, dim=0)
        metrics["logps/chosen"].append(gather(logps_c).mean().item())
        metrics["logps/rejected"].append(gather(logps_r).mean().item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        return loss


def _chosen_tokens(batch) -> torch.Tensor:
    """The tokens TRL's sft loss averages over in a micro-batch: the chosen half's completion targets."""
    return batch["completion_mask"][:, 1:].chunk(2, dim=0)[0].sum()


def dpo_args(stage: StageConfig, profile: Profile, run_dir: Path, seed: int, world_size: int,
             overrides: dict | None = None) -> DPOConfig:
    losses, weights = stage.loss_types, stage.loss_weights
    if stage.sft_weight:  # RPO: TRL's sft loss added at that weight
        losses, weights = losses + ["sft"], (weights or [1.0] * len(losses)) + [stage.sft_weight]
    return DPOConfig(
        **{**training_kwargs(stage, profile, run_dir, seed, world_size), **(overrides or {})},
        max_length=stage.max_length,  # rows are already cut to fit; this only guards the collator
        beta=stage.beta,
        loss_type=losses,
        loss_weights=weights,
        label_smoothing=stage.label_smoothing,
        ld_alpha=stage.ld_alpha,
        f_divergence_type=stage.f_divergence_type,
        f_alpha_divergence_coef=stage.f_alpha_divergence_coef,
        discopop_tau=stage.discopop_tau,
        precompute_ref_log_probs=False,
    )


MICRO_BATCH_LOSSES = ("aot", "aot_unpaired")  # TRL sorts their log-ratios over the rows of one micro-batch


def build_dpo_trainer(stage: StageConfig, args: DPOConfig, model, tokenizer, train_ds, eval_ds, peft_config,
                      callbacks, ref_model=None, log=print):
    sorted_losses = [loss for loss in stage.loss_types if loss in MICRO_BATCH_LOSSES]
    if sorted_losses:
        log(f"[train] {stage.name}: loss {', '.join(sorted_losses)} sorts the log-ratios within each micro-batch, so "
            f"its numbers depend on the profile's micro_batch_size ({args.per_device_train_batch_size} here); "
            "profiles with the same micro-batch size agree")
    trainer = PretokenizedDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        simpo_gamma=stage.simpo_gamma,
        length_grouping=grouping_for(stage),
    )
    if trainer.ref_model is not None:  # full-parameter DPO: trl runs it under no_grad but leaves it trainable
        trainer.ref_model.requires_grad_(False)
    policy = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    # Full-parameter DPO: TRL has already wrapped the frozen reference (a DeepSpeed engine, or a DDP module); its
    # head goes on the model inside, where TRL put its own, so the wrapper's forward still runs around it.
    reference = getattr(trainer.ref_model, "module", trainer.ref_model)
    if stage.train.compact_logps:
        # The fields TRL's DPOTrainer asks its own head for: log-probs, plus what its metrics (and WPO) read.
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + (
            ("log_sum_sq_probs",) if trainer.use_weighting else ())
        # compat: transformers-config-attn-implementation
        packed = padding_free_for(stage.train.padding_free, getattr(policy.config, "_attn_implementation", None))
        install_compact_head(policy, outputs, stage.train.logps_vocab_chunk, packed)
        if reference is not None:
            install_compact_head(reference, ("log_probs",), stage.train.logps_vocab_chunk, packed)
    if stage.train.ref_logps_cache and "simpo" not in stage.loss_types:
        head = ["compact", stage.train.logps_vocab_chunk] if stage.train.compact_logps else ["trl"]
        key = model_key(reference if reference is not None else policy, args_precision(args),
                        {"ld_alpha": trainer.ld_alpha, "head": head})
        trainer.ref_cache = RefLogpsCache(cache_dir() / f"{key}.jsonl",
                                          stage.train.ref_logps_batch_size or 4 * args.per_device_train_batch_size,
                                          log=log)
        trainer.data_collator = KeyedCollator(trainer.data_collator)  # each batch carries its pairs' cache keys
    return trainer
