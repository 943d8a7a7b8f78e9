"""One registry of every patch dpo-dist applies to another library's private or internal API, and the import-time
check that the installed libraries are the versions those patches were tested with.

- PATCHES: one Patch per monkeypatch, override of a private method, or reliance on a private attribute: what it
  patches and why, the test that fails without it, and when it can go. Each patch site names its entry, as
  `compat.patch("name")` where the patch is applied at run time or `# compat: name` where it is a subclass override
  or a private read; tests/test_compat.py checks both directions.
- TESTED: the major.minor range of each pinned library the test suite ran against. setup.cfg's install_requires
  repeats exactly these ranges (tests/test_compat.py).
- check_versions(), run at import: a pinned library installed outside its range gives one UntestedVersionWarning,
  one line per library, naming the patches at risk. Cheap: importlib.metadata only, none of the libraries is imported.
- markdown(): the "Library patches" section of docs/compat.md (`python -m dpo_dist.compat` rewrites it).
"""
from __future__ import annotations

import importlib.metadata
import re
import warnings
from dataclasses import dataclass

__all__ = ["PATCHES", "TESTED", "TORCH_TESTED", "Patch", "Tested", "UntestedVersionWarning", "applied",
           "check_versions", "markdown", "patch"]


@dataclass(frozen=True)
class Tested:
    """A range of major.minor releases, both ends included: Tested("1.16", "1.16") is every 1.16.x."""
    low: str
    high: str

    @staticmethod
    def _parts(version: str) -> tuple[int, int]:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)

    def requirement(self) -> str:
        """The install_requires specifier: `>=low,<the minor after high`."""
        major, minor = self._parts(self.high)
        return f">={self.low},<{major}.{minor + 1}"

    def covers(self, major_minor: tuple[int, int]) -> bool:
        return self._parts(self.low) <= major_minor <= self._parts(self.high)

    def __str__(self) -> str:
        return self.low if self.low == self.high else f"{self.low}-{self.high}"


# What CI installs (the newest versions setup.cfg allows) and the only ones the test suite has run against.
# install_requires in setup.cfg must say exactly `<name><Tested.requirement()>` for each (tests/test_compat.py).
TESTED: dict[str, Tested] = {
    "trl": Tested("1.16", "1.16"),
    "transformers": Tested("5.24", "5.24"),
    "accelerate": Tested("1.16", "1.16"),
    "peft": Tested("0.21", "0.21"),
    "deepspeed": Tested("0.19", "0.19"),
}
# torch is not pinned (setup.cfg: torch>=2.4; the wheel follows the machine's CUDA, scripts/torch-wheel) and is not
# version-checked at import; its patches were tested with the Makefile's TORCH_VERSION.
TORCH_TESTED = "2.13"


@dataclass(frozen=True)
class Patch:
    name: str
    library: str  # the distribution name (importlib.metadata)
    target: str  # the patched or relied-on API, dotted
    kind: str  # monkeypatch | override | private | workaround
    why: str
    test: str | None  # tests/<file>.py::<test>[<param>]: fails without the patch; None: no such test
    remove_when: str
    sites: tuple[str, ...]  # the dpo_dist files that apply it (each names the entry)

    @property
    def tested(self) -> str:
        return str(TESTED[self.library]) if self.library in TESTED else TORCH_TESTED


PATCHES: tuple[Patch, ...] = (
    # ---- trl -------------------------------------------------------------------------------------------------------
    Patch(
        name="trl-triton-capability",
        library="trl",
        target="trl.kernels.chunked_logprob._use_triton",
        kind="monkeypatch",
        why="TRL picks its Triton log-prob kernels on any CUDA device where Triton imports (its private "
            "_TRITON_AVAILABLE), but they need compute capability 8.0: on a V100 or T4 the first DPO step failed to "
            "compile. The module function, which the kernel calls at every call, is replaced by triton_runs_on.",
        test="tests/test_logps.py::test_triton_kernels_run_only_where_the_gpu_can_run_them",
        remove_when="when trl's chunked_logprob checks the GPU's compute capability before choosing Triton",
        sites=("dpo_dist/training/dpo/logps.py",),
    ),
    Patch(
        name="trl-compact-lm-head",
        library="trl",
        target="trl.trainer.utils.add_fused_lm_head",
        kind="monkeypatch",
        why="The forward TRL's DPOTrainer installs on the model is replaced, per instance, by one that scores only "
            "completion tokens on every device, in narrower vocabulary tiles (train.logps_vocab_chunk), optionally "
            "padding-free; it calls trl.kernels.ChunkedLogProbFunction and returns TRL's FusedCausalLMOutput.",
        test="tests/test_logps.py::test_compact_head_gives_trls_loss_metrics_and_gradients",
        remove_when="when TRL's fused head gathers the scored positions on every device, takes a tile width and "
                    "supports padding-free DPO (trl 1.16 does none of these); train.compact_logps: false is the "
                    "fallback meanwhile",
        sites=("dpo_dist/training/dpo/logps.py",),
    ),
    Patch(
        name="trl-dpo-pretokenized-rows",
        library="trl",
        target="trl.DPOTrainer._prepare_dataset",
        kind="override",
        why="trl 1.16 re-renders and re-tokenizes every row unconditionally; dpo-dist's rows are already tokenized "
            "with the recipe's template and max_prompt_length (which trl 1.x dropped), so they are used as they are.",
        test="tests/test_dpo_reference.py::test_reference_is_the_adapter_disabled_base",
        remove_when="when DPOTrainer leaves a dataset that already holds prompt_ids/chosen_ids/rejected_ids as it is",
        sites=("dpo_dist/training/dpo/trainer.py",),
    ),
    Patch(
        name="trl-kto-pretokenized-rows",
        library="trl",
        target="trl.KTOTrainer._prepare_dataset",
        kind="override",
        why="trl 1.16 extracts, unpairs, templates and re-tokenizes every row unconditionally; dpo-dist's kto rows "
            "are tokenized with the recipe's template and max_prompt_length, so only TRL's KL pairing (each "
            "completion with the previous row's prompt) is redone, within each global batch instead of each "
            "micro-batch so that the pairs are the same under every profile.",
        test="tests/test_preference.py::test_kto_chains_after_sft_with_the_adapter_off_reference_and_the_compact_"
             "head_gives_trls_numbers",
        remove_when="when KTOTrainer leaves a dataset that already holds prompt_ids/completion_ids/label as it is "
                    "(adding only its KL column)",
        sites=("dpo_dist/training/preference.py",),
    ),
    Patch(
        name="trl-orpo-cpo-pretokenized-rows",
        library="trl",
        target="trl.experimental.orpo.ORPOTrainer.tokenize_row, trl.experimental.cpo.CPOTrainer.tokenize_row",
        kind="override",
        why="trl 1.16's ORPO and CPO template and tokenize every row in __init__ (trl.experimental, no "
            "pre-tokenized path); dpo-dist's pairs are tokenized as for DPO and only take TRL's column layout.",
        test="tests/test_preference.py::test_orpo_and_cpo_train_reference_free_on_the_dpo_pairs",
        remove_when="when ORPO/CPO accept rows that already hold prompt_ids/chosen_ids/rejected_ids",
        sites=("dpo_dist/training/preference.py",),
    ),
    Patch(
        name="trl-kto-global-kl",
        library="trl",
        target="trl.KTOTrainer._compute_kl_logps (and get_batch_samples, _compute_loss)",
        kind="override",
        why="trl 1.16 estimates KTO's KL baseline per micro-batch, averaged over the ranks of that micro-batch, so "
            "profiles that split the global batch differently train on different baselines; dpo-dist measures it "
            "once per optimizer step over the whole global batch and TRL's loss reads that value.",
        test="tests/test_distributed.py::test_parity_fp32_kto_orpo_cpo_across_ddp_fsdp_zero3",
        remove_when="when KTOTrainer estimates the KL baseline over the optimizer step's global batch",
        sites=("dpo_dist/training/preference.py",),
    ),
    Patch(
        name="trl-dpo-global-sft-nll",
        library="trl",
        target="trl.DPOTrainer._compute_loss (its sft loss)",
        kind="override",
        why="trl 1.16 averages DPO's sft loss (dpo-dist's sft_weight) over each micro-batch's chosen tokens, so "
            "profiles that split the global batch differently weight rows differently; dpo-dist rescales each "
            "micro-batch's sft weight so the step's term is a token mean over the global batch.",
        test="tests/test_distributed.py::test_parity_demo_recipe_across_cpu_profiles",
        remove_when="when DPO takes its sft loss's token count over the global batch (num_items_in_batch)",
        sites=("dpo_dist/training/dpo/trainer.py",),
    ),
    Patch(
        name="accelerate-ulysses-batches",
        library="accelerate",
        target="accelerate.Accelerator.deepspeed_ulysses_dl_adapter (on the SFT and DPO trainers' accelerator)",
        kind="override",
        why="under sequence parallelism the Trainer wraps its training loader in DeepSpeed's Ulysses adapter, which "
            "gathers every tensor at each rank's own length (gloo refuses unequal shapes) and splits input_ids/labels "
            "batches only; dpo-dist exchanges the group's batches whole, splits SFT batches the same way, and hands "
            "DPO batches (chosen and rejected rows with a completion mask) whole to its compact head, which splits "
            "them.",
        test="tests/test_distributed.py::test_parity_demo_recipe_across_cpu_profiles",
        remove_when="when the adapter gathers batches of unequal lengths and splits preference batches",
        sites=("dpo_dist/training/dpo/trainer.py", "dpo_dist/training/sft.py"),
    ),
    Patch(
        name="deepspeed-ulysses-once-per-process",
        library="deepspeed",
        target="deepspeed.runtime.sequence_parallel (parallel_state_sp groups, groups.mpu, its attention entry)",
        kind="private",
        why="UlyssesSPAttentionHF.register_with_transformers sets up its groups once per process and replaces "
            "transformers' core attention entry with its wrapper, and the engine records the groups in groups.mpu; "
            "a recipe's second stage in the same process would be refused (groups already set up), wrap the "
            "wrapper, or (full-parameter DPO's reference engine) ask for released groups. Between stages all three "
            "are undone.",
        test="tests/test_distributed.py::test_full_parameter_dpo_after_sft_under_sequence_parallel_matches_one_process",
        remove_when="when the registration can be undone through a public call",
        sites=("dpo_dist/distributed/sequence.py",),
    ),
    Patch(
        name="deepspeed-ulysses-any-batch-size",
        library="deepspeed",
        target="deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF.batch_size",
        kind="private",
        why="Ulysses attention is built for one batch size (the micro-batch) and asserts it on every call; a DPO "
            "batch has twice the rows (chosen and rejected), a reference-cache batch more, the last batch fewer. "
            "The batch size is set from each call's query before its check.",
        test="tests/test_distributed.py::test_parity_demo_recipe_across_cpu_profiles",
        remove_when="when Ulysses treats the batch size as variable, as it does the sequence length",
        sites=("dpo_dist/distributed/sequence.py",),
    ),
    Patch(
        name="transformers-skip-first-batches-group",
        library="transformers",
        target="transformers.trainer.skip_first_batches (for dpo-dist's sequence-parallel loader)",
        kind="monkeypatch",
        why="a resumed run skips its trained batches with accelerate's skip_first_batches, which rebuilds a plain "
            "DataLoader from the loader's attributes; a sequence-parallel group's loader would lose its exchange and "
            "each rank would run its own rows through attention that joins the group's sequences. The group loader "
            "skips in its own loaders instead.",
        test="tests/test_distributed.py::test_kill_and_resume_matches_uninterrupted",
        remove_when="when the Trainer skips batches through the loader it was given (or a sequence-parallel adapter "
                    "supports resuming)",
        sites=("dpo_dist/distributed/sequence.py",),
    ),
    Patch(
        name="trl-dpo-tokens-under-sequence-parallel",
        library="trl",
        target="trl.DPOTrainer._tp_size (its num_tokens divisor)",
        kind="private",
        why="trl 1.16 sums num_tokens over all ranks and divides by the tensor-parallel size only; the ranks of a "
            "sequence-parallel group share one batch, so the count is divided by their number too.",
        test="tests/test_distributed.py::test_parity_demo_recipe_across_cpu_profiles",
        remove_when="when TRL counts the tokens of a batch once per sequence-parallel group",
        sites=("dpo_dist/training/dpo/trainer.py",),
    ),
    Patch(
        name="transformers-sequence-parallel-global-token-mean",
        library="transformers",
        target="transformers.Trainer.compute_loss / get_batch_samples (under DeepSpeed sequence parallelism)",
        kind="override",
        why="under sequence parallelism transformers 5 averages the loss over each micro-batch's tokens (its "
            "deepspeed_sp_compute_loss) and then over the accumulation steps, where dpo-dist's SFT and pretraining "
            "loss is the token mean over the whole optimizer step; the step's tokens are counted over all ranks and "
            "each micro-batch's summed loss is divided by that count.",
        test="tests/test_distributed.py::test_parity_demo_recipe_across_cpu_profiles",
        remove_when="when the Trainer keeps num_items_in_batch under sequence parallelism",
        sites=("dpo_dist/training/sft.py",),
    ),
    Patch(
        name="trl-orpo-cpo-global-nll",
        library="trl",
        target="trl.experimental.orpo.ORPOTrainer.concatenated_forward, "
               "trl.experimental.cpo.CPOTrainer.concatenated_forward",
        kind="override",
        why="trl 1.16 averages the ORPO/CPO NLL term over each micro-batch's tokens, so profiles that split the "
            "global batch differently weight rows differently; dpo-dist rescales each micro-batch's term so the "
            "step's NLL is a token mean over the global batch, as SFT's loss is.",
        test="tests/test_distributed.py::test_parity_fp32_kto_orpo_cpo_across_ddp_fsdp_zero3",
        remove_when="when ORPO/CPO take the NLL term's token count over the global batch (num_items_in_batch)",
        sites=("dpo_dist/training/preference.py",),
    ),
    Patch(
        name="trl-dpo-cached-ref-logps",
        library="trl",
        target="trl.DPOTrainer._compute_loss",
        kind="override",
        why="train.ref_logps_cache puts each pair's cached reference log-probs in the batch and sets TRL's internal "
            "precompute_ref_logps flag for that one call, so TRL's loss reads them instead of running the reference "
            "forward; the batch's pair_keys are dropped before TRL passes the batch's keys on to the model.",
        test="tests/test_ref_cache.py::test_cached_reference_gives_the_inline_loss_without_a_reference_forward",
        remove_when="when DPOTrainer takes precomputed reference log-probs per batch through a public argument",
        sites=("dpo_dist/training/dpo/trainer.py",),
    ),
    Patch(
        name="trl-dpo-simpo-metrics",
        library="trl",
        target="trl.DPOTrainer._metrics",
        kind="private",
        why="dpo-dist's reference-free SimPO loss logs its rewards and token count into DPOTrainer's private "
            "_metrics and _total_train_tokens (and reads loss_types), so it reports the same metrics as TRL's losses.",
        test="tests/test_e2e.py::test_simpo_loss_is_reference_free_and_trains",
        remove_when="when TRL's DPOTrainer has a reference-free SimPO loss of its own (trl 1.16 has none)",
        sites=("dpo_dist/training/dpo/trainer.py",),
    ),
    Patch(
        name="trl-bench-chunk-width",
        library="trl",
        target="trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE",
        kind="private",
        why="The logits micro-benchmark runs TRL's kernel with TRL's own tile width; the private constant is read, "
            "with 32,768 (trl 1.16's value) as the fallback.",
        test=None,
        remove_when="when TRL makes the tile width a public setting (until then the fallback keeps the benchmark "
                    "running)",
        sites=("dpo_dist/bench/logits.py",),
    ),
    # ---- transformers ----------------------------------------------------------------------------------------------
    Patch(
        name="transformers-trainer-staged-checkpoints",
        library="transformers",
        target="transformers.Trainer._save_checkpoint",
        kind="override",
        why="GuardedTrainer overrides _save_checkpoint, _get_output_dir and _save_optimizer_and_scheduler so that a "
            "checkpoint is written under checkpoints/.staging and renamed into place only once complete, weights "
            "with NaN/inf are never saved, and a failed write is one clear error.",
        test="tests/test_faults.py::test_crash_while_saving_keeps_the_previous_checkpoint_and_resume_is_exact",
        remove_when="when transformers' Trainer writes each checkpoint under a temporary name and renames it into "
                    "place only when complete",
        sites=("dpo_dist/reliability/guard.py",),
    ),
    Patch(
        name="transformers-trainer-loss-guard",
        library="transformers",
        target="transformers.Trainer._run_epoch",
        kind="private",
        why="The non-finite loss check runs once per optimizer step, on the micro-batch where "
            "accelerator.sync_gradients is True, which transformers 5's private _run_epoch sets before each "
            "training_step; a skipped step wraps the optimizer's step (create_optimizer). Guard.end_step raises if "
            "the check never ran.",
        test="tests/test_faults.py::test_nan_in_one_micro_batch_stops_before_the_update_with_one_check_per_step",
        remove_when="when transformers' Trainer offers a hook between a step's last forward and its backward",
        sites=("dpo_dist/reliability/guard.py",),
    ),
    Patch(
        name="transformers-trainer-length-sampler",
        library="transformers",
        target="transformers.Trainer._get_train_sampler",
        kind="override",
        why="Length-grouped global batches (train.length_grouping): transformers 5's get_train_dataloader asks the "
            "private _get_train_sampler(train_dataset) for its sampler.",
        test="tests/test_grouping.py::test_training_with_grouping_pads_less_than_without",
        remove_when="when transformers' Trainer takes a train sampler through a public argument",
        sites=("dpo_dist/data/grouping.py",),
    ),
    Patch(
        name="transformers-trainer-input-pipeline",
        library="transformers",
        target="transformers.Trainer._prepare_inputs",
        kind="private",
        why="The reference log-prob pre-pass (and the bench warm-up) run batches outside the training loop through "
            "the Trainer's private _remove_unused_columns and _prepare_inputs, so they see the columns and devices "
            "the training steps see.",
        test="tests/test_ref_cache.py::test_cached_reference_gives_the_inline_loss_without_a_reference_forward",
        remove_when="when transformers makes both public (a rename fails the test first)",
        sites=("dpo_dist/training/dpo/ref_cache.py", "dpo_dist/bench/worker.py"),
    ),
    Patch(
        name="transformers-config-attn-implementation",
        library="transformers",
        target="transformers.PretrainedConfig._attn_implementation",
        kind="private",
        why="train.padding_free: auto packs only under flash-attention's varlen kernels, and the reference-cache key "
            "includes the attention; both read the loaded model's private config._attn_implementation (with "
            "getattr(..., None), so a rename would silently turn auto off, not fail).",
        test=None,
        remove_when="when transformers exposes the loaded attention implementation publicly",
        sites=("dpo_dist/training/dpo/trainer.py", "dpo_dist/training/dpo/ref_cache.py"),
    ),
    Patch(
        name="transformers-zero3-merge",
        library="transformers",
        target="transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref",
        kind="private",
        why="A ZeRO-3 run leaves transformers' global DeepSpeed config set, so the chained merge on rank 0 would "
            "partition the base across ranks in from_pretrained (a collective) and hang; the merge unsets it and "
            "restores the private reference afterwards.",
        test="tests/test_distributed.py::test_sharded_adapter_reloads_with_same_logits_and_merges[zero3]",
        remove_when="when from_pretrained can load a model whole while a ZeRO-3 config is active, or transformers "
                    "offers a public way to save and restore that config",
        sites=("dpo_dist/inference/merge.py",),
    ),
    Patch(
        name="transformers-trainer-bench-probe",
        library="transformers",
        target="transformers.Trainer.training_step",
        kind="monkeypatch",
        why="`dpo-dist bench` replaces Trainer.__init__ and Trainer.training_step in its own worker process (never "
            "in training) to count each side's real and padded tokens per micro-batch, for TRL's trainer and "
            "dpo-dist's alike, and to run a warm-up step.",
        test="tests/test_bench.py::test_both_sides_did_the_same_work",
        remove_when="when transformers has a callback that sees each micro-batch's inputs",
        sites=("dpo_dist/bench/worker.py",),
    ),
    # ---- accelerate ------------------------------------------------------------------------------------------------
    Patch(
        name="accelerate-fsdp-on-cpu",
        library="accelerate",
        target="accelerate.state.PartialState._shared_state",
        kind="private",
        why="accelerate (1.15, 1.16) turns ACCELERATE_USE_FSDP into an FSDP state only for GPU-like distributed "
            "types; on CPU ranks (MULTI_CPU, gloo) it drops the plugin silently and the Trainer trains plain DDP. "
            "torch's FSDP2 runs on CPU with gloo, so the shared state is marked FSDP.",
        test="tests/test_distributed.py::test_parity_demo_recipe_across_cpu_profiles",
        remove_when="when accelerate keeps the FSDP plugin for MULTI_CPU launches",
        sites=("dpo_dist/distributed/backends.py",),
    ),
    Patch(
        name="accelerate-fsdp-state-first",
        library="accelerate",
        target="accelerate.state.AcceleratorState._from_accelerator",
        kind="private",
        why="The FSDP state is made (with the private _from_accelerator=True) before the Trainer's Accelerator, "
            "which reuses it: its FSDP2 policy reduces gradients and returns outputs in fp32 (accelerate's default "
            "keeps them in bf16/fp16), and its dynamo plugin carries train.torch_compile, which a default one drops.",
        test="tests/test_distributed.py::test_fsdp_keeps_torch_compile",
        remove_when="when the Trainer can hand accelerate an FSDP2 MixedPrecisionPolicy, and accelerate's default "
                    "reduces in fp32",
        sites=("dpo_dist/distributed/backends.py",),
    ),
    Patch(
        name="accelerate-resume-set-epoch",
        library="accelerate",
        target="accelerate.data_loader.DataLoaderShard.set_sampler",
        kind="workaround",
        why="A resumed run's SkipBatchSampler wraps the length-grouped sampler, and DataLoaderShard.set_epoch looks "
            "only two levels down, so a resumed epoch replayed epoch 0's order; set_sampler puts the sampler where "
            "set_epoch looks, as accelerate does for its own SeedableRandomSampler.",
        test="tests/test_grouping.py::test_a_resumed_run_skips_to_the_same_rows_in_a_later_epoch",
        remove_when="when DataLoaderShard.set_epoch reaches a custom sampler under SkipBatchSampler",
        sites=("dpo_dist/data/grouping.py",),
    ),
    # ---- peft ------------------------------------------------------------------------------------------------------
    Patch(
        name="peft-sharded-adapter-save",
        library="peft",
        target="peft.PeftModel.save_pretrained",
        kind="workaround",
        why="A sharded FSDP adapter is written in peft's format by dpo-dist (Trainer.save_model writes nothing for a "
            "sharded state dict): peft's save_pretrained(state_dict=...) matches entries by module path, which under "
            "FSDP activation checkpointing holds torch's private _checkpoint_wrapped_module, and wrote an empty file.",
        test="tests/test_distributed.py::test_parity_bf16_qlora_across_fsdp_and_zero3",
        remove_when="when peft's save_pretrained(state_dict=...) finds the adapter weights of a checkpoint-wrapped "
                    "FSDP model",
        sites=("dpo_dist/training/common.py",),
    ),
    # ---- deepspeed -------------------------------------------------------------------------------------------------
    Patch(
        name="deepspeed-safe-checkpoint-load",
        library="deepspeed",
        target="deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine.TorchCheckpointEngine.load",
        kind="monkeypatch",
        why="DeepSpeed reads ZeRO checkpoint files with torch.load(weights_only=False), which runs any code pickled "
            "into a tampered checkpoint; the replacement loads with weights_only=True, allowing only the DeepSpeed "
            "classes ZeRO optimizer states hold.",
        test="tests/test_security.py::test_deepspeed_checkpoint_loading_refuses_pickled_code",
        remove_when="never while DeepSpeed loads with weights_only=False: security hardening of an unsafe default",
        sites=("dpo_dist/distributed/safe_loading.py",),
    ),
    Patch(
        name="deepspeed-zero3-adapter-dtype",
        library="deepspeed",
        target="deepspeed.runtime.zero.stage3",
        kind="workaround",
        why="ZeRO-3's coalesced all-gather of persistent parameters assumed one dtype (DeepSpeed #8072), so bf16 "
            "runs keep their adapters in bf16, the base's dtype (adapter_dtype); FSDP2 needs one dtype per layer too.",
        test="tests/test_distributed.py::test_parity_bf16_qlora_across_fsdp_and_zero3",
        remove_when="the DeepSpeed reason goes when DeepSpeed #8072 is fixed; the code stays for FSDP2",
        sites=("dpo_dist/models/loading.py",),
    ),
    Patch(
        name="deepspeed-zero3-reentrant-checkpointing",
        library="deepspeed",
        target="deepspeed.runtime.zero.stage3",
        kind="workaround",
        why="ZeRO-3 frees frozen parameters during a non-reentrant activation-checkpointing recompute "
            "(DeepSpeed #4332), so LoRA/QLoRA under ZeRO-3 uses reentrant checkpointing.",
        test="tests/test_profiles_launch.py::test_trainer_overrides_per_backend",
        remove_when="when DeepSpeed #4332 is fixed in the tested DeepSpeed",
        sites=("dpo_dist/distributed/backends.py",),
    ),
    # ---- torch -----------------------------------------------------------------------------------------------------
    Patch(
        name="torch-dcp-safe-metadata",
        library="torch",
        target="torch.distributed.checkpoint.filesystem.FileSystemReader.read_metadata",
        kind="monkeypatch",
        why="torch.distributed.checkpoint (FSDP's sharded checkpoints) pickle.loads a checkpoint's .metadata; the "
            "replacement, a copy of torch 2.13's using its private _get_metadata_path, unpickles only the classes "
            "such a file is made of.",
        test="tests/test_security.py::test_sharded_checkpoint_loading_refuses_pickled_code",
        remove_when="never while torch unpickles .metadata unrestricted: security hardening of an unsafe default",
        sites=("dpo_dist/distributed/safe_loading.py",),
    ),
    Patch(
        name="torch-dcp-safe-load-bytes",
        library="torch",
        target="torch.distributed.checkpoint.default_planner.DefaultLoadPlanner.load_bytes",
        kind="monkeypatch",
        why="It torch.loads non-tensor checkpoint entries (optimizer param groups) with weights_only=False; the "
            "replacement loads them with weights_only=True (and the private _traverse.set_element, as torch does).",
        test="tests/test_security.py::test_sharded_checkpoint_loading_refuses_pickled_code",
        remove_when="never while load_bytes uses weights_only=False: security hardening of an unsafe default",
        sites=("dpo_dist/distributed/safe_loading.py",),
    ),
    Patch(
        name="torch-cuda-driver-version",
        library="torch",
        target="torch._C._cuda_getDriverVersion",
        kind="private",
        why="`dpo-dist doctor` reports the CUDA version the driver supports from torch's private binding when "
            "nvidia-smi is missing (hasattr-guarded: without it the driver is reported unknown).",
        test=None,
        remove_when="when torch exposes the driver's CUDA version publicly",
        sites=("dpo_dist/commands/doctor.py",),
    ),
)


DOC = "docs/compat.md"
_BY_NAME = {p.name: p for p in PATCHES}
_APPLIED: set[str] = set()


class UntestedVersionWarning(UserWarning):
    """An installed library is outside the major.minor range dpo-dist's patches were tested with."""


def patch(name: str) -> Patch:
    """The registry entry `name`, recorded as applied in this process. Called where a patch is applied, so a
    patch site cannot name an entry that does not exist (KeyError)."""
    try:
        entry = _BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a patch in dpo_dist.compat.PATCHES") from None
    _APPLIED.add(name)
    return entry


def applied() -> list[str]:
    """The patches applied so far in this process, by name."""
    return sorted(_APPLIED)


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions() -> list[str]:
    """Warn once (one UntestedVersionWarning, one line per library) for each library of TESTED installed at a
    major.minor outside its tested range. Returns the lines; empty when everything installed is tested. A library
    that is not installed is not reported (its patches are not applied either)."""
    lines = []
    for lib, tested in TESTED.items():
        version = _installed(lib)
        if version is None:
            continue
        found = re.match(r"(\d+)\.(\d+)", version)
        if found and tested.covers((int(found[1]), int(found[2]))):
            continue
        at_risk = ", ".join(p.name for p in PATCHES if p.library == lib) or "none registered"
        lines.append(f"{lib} {version} is installed, but dpo-dist was tested with {lib} {tested} "
                     f"({lib}{tested.requirement()}); patches at risk: {at_risk} (see {DOC})")
    if lines:
        warnings.warn("\n".join(lines), UntestedVersionWarning, stacklevel=2)
    return lines


def markdown() -> str:
    """The "Library patches" section of docs/compat.md, generated from the registry."""
    out = ["## Library patches", "",
           "Generated from `dpo_dist/compat/__init__.py` by `python -m dpo_dist.compat`; tests/test_compat.py fails "
           "when this section and the registry disagree.", "",
           "Tested versions: setup.cfg's install_requires says exactly these ranges, and importing dpo_dist.compat "
           "(every patch site does) gives one warning, one line per library, when an installed one is outside them:",
           ""]
    out += [f"- {lib}: {t} (`{lib}{t.requirement()}`)" for lib, t in TESTED.items()]
    out += [f"- torch: {TORCH_TESTED} (the Makefile's TORCH_VERSION; setup.cfg allows any torch>=2.4)", ""]
    out += ["| Patch | Library | Target | Kind | Tested with | Test | Can go |",
            "|---|---|---|---|---|---|---|"]
    for p in PATCHES:
        test = f"`{p.test}`" if p.test else "none"
        out.append(f"| `{p.name}` | {p.library} | `{p.target}` | {p.kind} | {p.tested} | {test} | "
                   f"{p.remove_when} |")
    out.append("")
    for p in PATCHES:
        out += [f"### `{p.name}`", "",
                f"{p.why}", "",
                f"- Applied in: {', '.join(f'`{s}`' for s in p.sites)}",
                f"- Test: {f'`{p.test}`' if p.test else 'none fails without it'}",
                f"- Can go: {p.remove_when}", ""]
    return "\n".join(out)


check_versions()
