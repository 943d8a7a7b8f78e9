"""One side-run of `dpo-dist bench`, in its own process so its peak memory is its own.

`python -m dpo_dist.bench.worker SPEC.json OUT.json`

- side A: the plain TRL script a user would write (DPOTrainer / SFTTrainer, defaults, random order, LoRA);
- side B: the same run through dpo-dist's recipe → train path (dpo_dist.training.run.run_recipe, the `cpu` profile).

Both sides are measured by the same instrumentation, installed on transformers' Trainer before either is built: a
callback timing each optimizer step, and a wrapper on Trainer.training_step counting the real (attention-mask) and
padded tokens of every micro-batch actually fed to the model.

Warm-up: when training begins (after the model, optimizer and dataloader are set up), the callback runs one extra
micro-batch, the dataset's first rows (the same rows on both sides), through the trainer's own collator and
training_step, then discards its gradients. First-call costs (allocator growth, thread pools, lazy initialisation)
land there, and every optimizer step of the epoch is timed. Excluding the epoch's first step instead would not be
fair: dpo-dist's length-grouped order deliberately puts its longest batch first, the baseline's first batch is random.

Side B's reference pass (train.ref_logps_cache: the reference log-probs of every pair, computed before the first
step) runs inside that warm-up call. Its time is added to the timed window (`ref_prepass_s`), and every side-run gets
its own empty cache directory, so B pays for the pass in full every time and never reads another run's results.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path


class Probe:
    """Step end times and per-micro-batch token counts, keyed by the optimizer step they belong to."""

    def __init__(self):
        self.step_end: dict[int, float] = {}
        self.train_begin: float | None = None
        self.batches: list[dict] = []
        self.trainer = None
        self.warming = False
        self.warmup_s: float | None = None

    def callback(self):
        from transformers import TrainerCallback

        probe = self

        class _Timing(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                started = time.perf_counter()
                probe.warm_up(model)
                probe.train_begin = time.perf_counter()
                probe.warmup_s = probe.train_begin - started

            def on_step_end(self, args, state, control, **kwargs):
                probe.step_end[state.global_step] = time.perf_counter()

        return _Timing()

    def install(self) -> None:
        from transformers import Trainer

        from dpo_dist import compat

        compat.patch("transformers-trainer-bench-probe")
        probe, init, training_step = self, Trainer.__init__, Trainer.training_step

        def patched_init(trainer, *args, **kwargs):
            init(trainer, *args, **kwargs)
            trainer.add_callback(probe.callback())
            probe.trainer = trainer

        def patched_training_step(trainer, model, inputs, *args, **kwargs):
            if probe.warming:
                return training_step(trainer, model, inputs, *args, **kwargs)
            mask = inputs.get("attention_mask")
            ids = inputs["input_ids"]
            real = int(mask.sum()) if mask is not None else ids.numel()
            probe.batches.append({"step": trainer.state.global_step + 1, "sequences": int(ids.shape[0]),
                                  "real": real, "total": int(ids.numel())})
            return training_step(trainer, model, inputs, *args, **kwargs)

        Trainer.__init__ = patched_init
        Trainer.training_step = patched_training_step

    def warm_up(self, model) -> None:
        """One micro-batch of the first rows through the trainer's collator and training_step; gradients dropped."""
        trainer = self.trainer
        dataset = trainer.train_dataset
        # compat: transformers-trainer-input-pipeline
        if hasattr(dataset, "column_names"):
            dataset = trainer._remove_unused_columns(dataset, description="warm-up")
        n = min(trainer.args.per_device_train_batch_size, len(dataset))
        batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(n)]))
        # Set by the training loop for each step, which has not started yet; the loop sets it again before step 1.
        if not hasattr(trainer, "current_gradient_accumulation_steps"):
            trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
        self.warming = True
        try:
            trainer.training_step(model, batch)
        finally:
            self.warming = False
        model.zero_grad(set_to_none=True)

    def summary(self, rows_per_sequence: int) -> dict:
        steps = sorted(self.step_end)
        if not steps or self.train_begin is None:
            raise RuntimeError("no optimizer step was timed")
        cache = getattr(self.trainer, "ref_cache", None)
        prepass = cache.seconds if cache is not None else 0.0
        elapsed = self.step_end[steps[-1]] - self.train_begin + prepass
        real = sum(b["real"] for b in self.batches)
        total = sum(b["total"] for b in self.batches)
        return {
            "steps": len(steps),
            "timed_steps": len(steps),
            "timed_s": elapsed,
            "warmup_s": self.warmup_s,
            "ref_prepass_s": prepass,  # included in timed_s
            "step_time_s": elapsed / len(steps),
            "real_tokens_per_s": real / elapsed,
            "padding_fraction": 1 - real / total,
            "pairs": sum(b["sequences"] for b in self.batches) // rows_per_sequence,
            "real_tokens": real,
            "total_tokens": total,
            "micro_batches": len(self.batches),
            "step_times_s": [round(self.step_end[s] - self.step_end.get(s - 1, self.train_begin), 4) for s in steps],
            "step_real_tokens": [sum(b["real"] for b in self.batches if b["step"] == s) for s in steps],
        }


def peak_memory() -> dict:
    import torch

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def row_tokens(dataset, workload: str) -> list[dict]:
    """Per row: the token lengths each side trains on, and a digest of the ids themselves."""
    keys = ("prompt_ids", "chosen_ids", "rejected_ids") if workload == "dpo" else ("input_ids",)
    rows = []
    for row in dataset.select_columns(list(keys)):
        ids = [list(row[k]) for k in keys]
        rows.append({"lengths": [len(x) for x in ids],
                     "digest": hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16]})
    return rows


def lora_settings(spec: dict) -> dict:
    return {"r": spec["lora_r"], "lora_alpha": spec["lora_alpha"], "lora_dropout": 0.0}


# ---- side A: the plain TRL script ----------------------------------------------------------------------------------


def run_trl(spec: dict):
    """What a user writes from TRL's docs: load, LoRA config, trainer with defaults, train."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, workload = spec["model_dir"], spec["workload"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(line) for line in Path(spec["data"]["a"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    peft_config = LoraConfig(**lora_settings(spec), target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(
        output_dir=str(Path(spec["run_dir"]) / "out"),
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["grad_accum"],
        num_train_epochs=1,
        learning_rate=spec["learning_rate"],
        max_length=spec["max_length"],
        seed=spec["seed"],
        logging_steps=spec["logging_steps"],
        save_strategy="no",
        report_to="none",
        use_cpu=spec["device"] == "cpu",
        # DPOConfig and SFTConfig default to bf16 autocast and gradient checkpointing; both change the work done
        # (on a CPU without bf16 units, autocast alone makes a step ~3× slower). Set to side B's profile values so
        # both sides do the same arithmetic: fp32, no checkpointing.
        bf16=spec["precision"] == "bf16",
        gradient_checkpointing=spec["gradient_checkpointing"],
    )
    if workload == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)
    trainer.train()
    return trainer


# ---- side B: dpo-dist ----------------------------------------------------------------------------------------------


def recipe_dict(spec: dict) -> dict:
    workload = spec["workload"]
    stage = {
        "stage": workload,
        "data": {"train": spec["data"]["b"], "format": "pair" if workload == "dpo" else "openai"},
        "max_length": spec["max_length"],
        "train": {"learning_rate": spec["learning_rate"], "num_epochs": 1,
                  "global_batch_size": spec["micro_batch"] * spec["grad_accum"],
                  "logging_steps": spec["logging_steps"], "save_steps": 10**9, "save_total_limit": 1},
    }
    return {
        "name": "bench",
        "seed": spec["seed"],
        "model": {"name_or_path": spec["model_dir"], "template": spec["template"]},
        "method": {"type": "lora", "lora_r": spec["lora_r"], "lora_alpha": spec["lora_alpha"], "lora_dropout": 0.0},
        "output_dir": str(Path(spec["run_dir"]) / "runs"),
        "stages": [stage],
    }


def run_dpo_dist(spec: dict):
    from dpo_dist.config.profiles import load_profile
    from dpo_dist.config.recipe import recipe_from_dict
    from dpo_dist.training.run import run_recipe

    recipe = recipe_from_dict(recipe_dict(spec), spec.get("overrides", []), source="bench")
    profile = replace(load_profile(spec["profile"]), micro_batch_size=spec["micro_batch"])
    (result,) = run_recipe(recipe, profile, keep_trainer=True, log=lambda *a, **k: print(*a, file=sys.stderr))
    return result.trainer


def _sampler_name(trainer) -> str | None:
    try:
        return type(trainer._get_train_sampler(trainer.train_dataset)).__name__
    except Exception:  # a diagnostic only; the private hook may change
        return None


def main(argv: list[str] | None = None) -> int:
    spec_path, out_path = (argv or sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["DPO_DIST_CACHE"] = spec["cache_dir"]
    import torch

    torch.manual_seed(spec["seed"])
    probe = Probe()
    probe.install()
    started = time.perf_counter()
    trainer = (run_trl if spec["side"] == "A" else run_dpo_dist)(spec)
    result = {
        "side": spec["side"],
        **probe.summary(rows_per_sequence=2 if spec["workload"] == "dpo" else 1),
        **peak_memory(),
        "wall_s": time.perf_counter() - started,
        "trainer_class": type(trainer).__name__,
        "sampler": _sampler_name(trainer),
        "rows": row_tokens(trainer.train_dataset, spec["workload"]) if spec.get("check_rows") else None,
    }
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
