"""Per-rank entry point: `python -m dpo_dist.train RECIPE [--profile P] [--stage NAME] [--resume] [key=value ...]`.

One recipe runs its stages in order. Each stage: data → model → trainer → train → save, in its own run directory:
recipe.yaml (resolved), metrics.jsonl, summary.json, data_report.json, checkpoints/, adapter/ or model/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import yaml

from dpo_dist.config.preflight import check_recipe
from dpo_dist.distributed.backends import (Backend, Launch, check_run, dynamo_plugin, init_fsdp_state,
                               init_process_group, on_cuda, resolve, trainer_overrides)
from dpo_dist.config.profiles import Profile, load_profile
from dpo_dist.config.recipe import Recipe, StageConfig, load_recipe
from dpo_dist.config.schema import ConfigError
from dpo_dist.distributed.ranks import is_main_process, rank, world_size
from dpo_dist.distributed.devices import peak_rss_mib_per_rank


@dataclass
class StageResult:
    name: str
    run_dir: Path
    output: Path  # adapter/ or model/
    model_path: str  # what a following stage loads: merged/ or model/ (or the base when nothing was trained)
    summary: dict
    trainer: object = None  # the live trainer (sharded model included); None once released


class Stopped(Exception):
    """Training stopped on request after saving a complete checkpoint (see dpo_dist.reliability.checkpoints)."""


def sequence_parallel_facts(degree: int) -> dict:
    """The degree, and per rank what it split during the stage (dpo_dist.distributed.sequence.POSITIONS).
    Collective."""
    from dpo_dist.distributed import sequence

    return {"degree": degree, "ranks": sequence.facts()}


def run_stage(recipe: Recipe, stage: StageConfig, profile: Profile, base_path: str, run_dir: Path,
              resume: bool = False, has_next: bool = False, log=print, backend: Backend | None = None,
              keep_trainer: bool = False) -> StageResult:
    from accelerate import PartialState
    from accelerate.utils import is_compiled_module
    from transformers import set_seed

    from dpo_dist.models.export import write_generation_config
    from dpo_dist.inference.merge import merge_adapter
    from dpo_dist.models.loading import adapter_dtype, cast_trainable, load_model, lora_config
    from dpo_dist.training.prepare import data_tokenizer, prepare_stage_data
    from dpo_dist.reliability.checkpoints import CheckpointMarker, StopOnRequest, latest_complete
    from dpo_dist.reliability.faults import Faults, fault_callbacks
    from dpo_dist.reliability.guard import Guard, GuardCallback
    from dpo_dist.distributed.safe_loading import harden_checkpoint_loading
    from dpo_dist.training.common import (MetricsLogger, StopAtStep, TrackerConfig, model_facts, precision_of,
                                          save_trained)
    from dpo_dist.training.dpo.trainer import build_dpo_trainer, dpo_args
    from dpo_dist.training.preference import (build_kto_trainer, build_pair_trainer, cpo_args, kto_args,
                                              orpo_args)
    from dpo_dist.training.sft import build_sft_trainer, sft_args

    started = time.time()
    backend = backend or resolve(profile, Launch.from_env())
    precision = precision_of(stage, profile)
    method_cfg = recipe.method_of(stage)
    method = method_cfg.type
    kind = stage.stage

    # ---- arguments ------------------------------------------------------------------------------------------------
    # Built before the model: under ZeRO-3 they make from_pretrained load each rank's shard only.
    checkpointing = (stage.train.gradient_checkpointing if profile.gradient_checkpointing is None
                     else profile.gradient_checkpointing)
    overrides = trainer_overrides(profile, backend, checkpointing, peft=method != "full")
    overrides["run_name"] = f"{recipe.name}/{stage.name}"  # the trackers' run name
    timeout = timedelta(seconds=profile.collective_timeout_s)
    cuda = on_cuda(profile)  # the profile's device, never merely a visible GPU
    init_process_group(backend, Launch.from_env(), timeout, cuda)
    harden_checkpoint_loading()  # before any checkpoint (DeepSpeed's, FSDP's sharded ones) can be read
    make_args = {"dpo": dpo_args, "kto": kto_args, "orpo": orpo_args, "cpo": cpo_args}.get(kind, sft_args)
    args = make_args(stage, profile, run_dir, recipe.seed, world_size(), overrides)
    state = PartialState(cpu=overrides["use_cpu"], timeout=timeout)
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        if not resume:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            (run_dir / "samples.jsonl").unlink(missing_ok=True)

    # ---- tokenizer & data ---------------------------------------------------------------------------------------
    # A chained stage loads the previous stage's result; revision and tokenizer refer to the original only, and the
    # data is tokenized with the recipe's own tokenizer, as `dpo-dist prepare` does (same cache entries).
    model_cfg = recipe.model if base_path == recipe.model.name_or_path else replace(
        recipe.model, name_or_path=base_path, tokenizer=None, revision=None)
    tokenizer, renderer = data_tokenizer(recipe, log=log if state.is_main_process else _quiet)
    # No collective here: every rank asks the cache, one builds each entry and the others wait on the entry itself
    # (dpo_dist.data.cache), so tokenizing for longer than collective_timeout_s is fine.
    data = prepare_stage_data(stage, tokenizer, renderer, log=log if state.is_main_process else _quiet,
                              wait_log=_rank_log)
    train, evaluation = data.train, data.eval
    if state.is_main_process:
        report = {"train": train.report, "eval": evaluation.report if evaluation else None}
        (run_dir / "data_report.json").write_text(json.dumps(report, indent=1))

    # ---- model ----------------------------------------------------------------------------------------------------
    if profile.sequence_parallel > 1:  # the local-model check of check_run, for any model (hub, a chained stage)
        from transformers import AutoConfig

        from dpo_dist.distributed.backends import check_heads

        config = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision).to_dict()
        check_heads(config, profile.sequence_parallel, model_cfg.name_or_path, f"profile {profile.name}")
    set_seed(recipe.seed)  # adapters are initialised randomly: same seed, same start on every rank and profile
    model = load_model(model_cfg, method, precision, profile.attn_implementation,
                       sharded=backend.kind in ("fsdp", "deepspeed"), cuda=cuda)
    peft_config = lora_config(method_cfg) if method in ("lora", "qlora") else None
    if getattr(args, "parallelism_config", None) is not None and args.parallelism_config.sp_enabled:
        # Ulysses wraps the attention the model was loaded with (sdpa or flash), and must be told which
        args.parallelism_config.sp_handler.sp_attn_implementation = model.config._attn_implementation
        from dpo_dist.distributed import sequence

        sequence.release()  # an earlier stage's groups (every rank reaches this together)

    # ---- trainer --------------------------------------------------------------------------------------------------
    stop = StopOnRequest(stage.name, log=log)
    faults = Faults()
    guard = Guard(stage.name, run_dir, stage.train.on_nonfinite_loss, stage.train.max_nonfinite_skips,
                  profile.collective_timeout_s, faults, log)
    callbacks = [MetricsLogger(run_dir / "metrics.jsonl"), CheckpointMarker(stage.train.save_total_limit, log), stop,
                 GuardCallback(guard), *fault_callbacks(faults),
                 TrackerConfig({"recipe": recipe.to_dict(), "stage": stage.name, "profile": asdict(profile),
                                "backend": backend.kind})]
    if stage.train.stop_at_step:
        callbacks.append(StopAtStep(stage.train.stop_at_step))
    sampler = None
    if stage.train.sample_prompts:  # weights sharded across ranks: every rank takes part in each forward
        from dpo_dist.training.samples import SampleCallback, read_sample_prompts

        sharded = backend.kind == "fsdp" or (backend.kind == "deepspeed" and backend.zero_stage == 3)
        sampler = SampleCallback(read_sample_prompts(stage.train.sample_prompts), tokenizer, renderer,
                                 stage.train.every_sample, stage.train.sample_max_new_tokens, run_dir / "samples.jsonl",
                                 sharded, log=log if state.is_main_process else _quiet)
        callbacks.append(sampler)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")  # read by transformers' TB callback
    build = {"dpo": build_dpo_trainer, "kto": build_kto_trainer, "orpo": build_pair_trainer,
             "cpo": build_pair_trainer}.get(kind)
    init_fsdp_state(backend, {"fp32": "no"}.get(precision, precision), cuda, dynamo_plugin(args))
    preference = {} if build is None else {"log": log if state.is_main_process else _quiet}
    trainer = (build or build_sft_trainer)(stage, args, model, tokenizer, train.dataset,
                                           evaluation.dataset if evaluation else None, peft_config, callbacks,
                                           **preference)
    trainer.guard = guard
    if sampler is not None:
        sampler.attach(trainer)
    if peft_config is not None:
        # trl stores QLoRA adapters in bf16 and peft LoRA adapters in fp32 whatever the precision; keep them in
        # the one dtype the precision and backend can train (see adapter_dtype).
        cast_trainable(trainer.model, adapter_dtype(precision, backend.kind))

    # ---- train ----------------------------------------------------------------------------------------------------
    checkpoint = latest_complete(run_dir, log=log) if resume else None
    if checkpoint:
        log(f"[train] resuming {stage.name} from {checkpoint}")
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as err:
        failure = guard.explain(err, trainer.state.global_step + 1)
        if failure is None:
            raise
        raise failure from err
    if stop.stopped_at is not None:
        saved = run_dir / "checkpoints" / f"checkpoint-{stop.stopped_at}"
        if is_main_process():
            stop.acknowledge(saved)
        raise Stopped(f"{stage.name} stopped at step {stop.stopped_at} after saving {saved}; "
                      "run it again with --resume to continue")

    # ---- save -----------------------------------------------------------------------------------------------------
    output = run_dir / ("adapter" if peft_config is not None else "model")
    save_trained(trainer, output, peft=peft_config is not None)
    model_path = str(output)
    eos_ids = None
    if is_main_process():
        if renderer.template is not None:  # the exported tokenizer renders chats as training did, in any tool
            tokenizer.chat_template = renderer.template.standalone_source()
        tokenizer.save_pretrained(str(output))
        # ... and its generation config stops where training taught the model to stop (dpo_dist.models.export)
        eos_ids = write_generation_config(output, base_path, tokenizer, renderer.eot_token,
                                          trust_remote_code=recipe.model.trust_remote_code)
        log(f"[train] {output}: generation stops at token ids {eos_ids} (EOS and end of turn)")
    trainer.accelerator.wait_for_everyone()
    if peft_config is not None and has_next:  # the next stage starts from this one's result
        merged = run_dir / "merged"
        if is_main_process():
            log(f"[train] merging {stage.name} adapter into a {precision} copy of {base_path}")
            merge_adapter(base_path, output, merged, dtype=precision,
                          trust_remote_code=recipe.model.trust_remote_code)
        trainer.accelerator.wait_for_everyone()
        model_path = str(merged)
    summary = {
        "stage": stage.stage,
        "name": stage.name,
        "method": method,
        "precision": precision,
        "base": base_path,
        "backend": backend.kind,
        "world_size": world_size(),
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        **({"sequence_parallel": sequence_parallel_facts(profile.sequence_parallel)}
           if profile.sequence_parallel > 1 else {}),
        "model": model_facts(trainer.model),
        "peak_rss_mib": peak_rss_mib_per_rank(),
        # train.torch_compile as applied: the model the Trainer stepped is a torch.compile module
        "compiled": is_compiled_module(trainer.model_wrapped),
        "output": str(output),
        "model_path": model_path,  # what a chained next stage loads
        "global_step": trainer.state.global_step,
        "nonfinite_skipped_steps": guard.skipped_steps,
        "train_loss": result.training_loss,
        # Pad tokens in this run's training micro-batches, all ranks (train.group_by_length lowers it).
        "pad_token_pct": trainer.pad_token_pct(),
        # DPO with train.ref_logps_cache: pairs found in the cache, computed before the first step, and that pass's time
        "ref_logps": trainer.ref_cache.stats if getattr(trainer, "ref_cache", None) else None,
        "train_runtime_s": round(time.time() - started, 2),
        "final": _last_train_log(trainer.state.log_history),
        "data": {"rows": train.report["rows"], "skipped": len(train.report["skipped"]),
                 "left_out": len(train.report.get("no_supervised_tokens") or []),
                 "tokens": train.report["tokens"], "from_cache": train.from_cache},
        "template": renderer.choice.as_dict(),
        "eos_token_id": eos_ids,
    }
    if is_main_process():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    done = StageResult(stage.name, run_dir, output, model_path, summary, trainer if keep_trainer else None)
    if not keep_trainer:
        # Nothing of this stage may outlive it: a stray reference to this frame (an exception traceback kept by a
        # log handler, say) would otherwise keep the model and optimizer alive while the next stage loads.
        drop_trainer(trainer)
        del trainer, model
    return done


def drop_trainer(trainer) -> None:
    """Cut a finished trainer's references to the model, the reference, the optimizer and the scheduler, and the
    accelerator's (accelerate keeps its own lists of everything it prepared)."""
    trainer.accelerator.free_memory()
    for name in ("model", "model_wrapped", "ref_model", "optimizer", "lr_scheduler", "deepspeed"):
        if hasattr(trainer, name):
            setattr(trainer, name, None)


def _quiet(*_args, **_kwargs) -> None:
    pass


def _rank_log(line: str) -> None:
    print(f"[rank {rank()}] {line}", flush=True)


def _last_train_log(history: list[dict]) -> dict:
    for entry in reversed(history):
        if "loss" in entry:
            return entry
    return {}


def run_recipe(recipe: Recipe, profile: Profile, only: str | None = None, resume: bool = False,
               log=print, backend: Backend | None = None, keep_trainer: bool = False) -> list[StageResult]:
    if backend is None:
        launch = Launch.from_env()
        backend = resolve(profile, launch)
        check_run(recipe, profile, launch, backend)
    if not is_main_process():
        log = _quiet
    from dpo_dist.distributed.backends import precision_notes

    for line in precision_notes(recipe, profile):
        log(line)
    results: list[StageResult] = []
    base = recipe.model.name_or_path
    out = Path(recipe.output_dir)
    for i, stage in enumerate(recipe.stages):
        run_dir = out / stage.name
        # Whether the next stage starts from this one's result (and so needs its adapter merged)
        has_next = recipe.chain and i + 1 < len(recipe.stages) and not recipe.stages[i + 1].start_from
        if stage.start_from:
            base = stage.start_from
        done = run_dir / "summary.json"
        if (only and stage.name != only) or (resume and not only and done.is_file()):
            if resume and not only:
                log(f"[train] stage {i + 1}/{len(recipe.stages)}: {stage.name} finished earlier ({done}); skipping it")
            if recipe.chain and done.is_file():  # a finished earlier stage feeds the next one
                base = json.loads(done.read_text())["model_path"]
            continue
        log(f"[train] stage {i + 1}/{len(recipe.stages)}: {stage.name} ({stage.stage}, {recipe.method_of(stage).type}) "
            f"from {base} → {run_dir}")
        result = run_stage(recipe, stage, profile, base, run_dir, resume=resume, has_next=has_next, log=log,
                           backend=backend, keep_trainer=keep_trainer)
        results.append(result)
        if recipe.chain:
            base = result.model_path
        if i + 1 < len(recipe.stages) and not keep_trainer:
            release_memory(log)
    return results


def release_memory(log=print) -> None:
    """Free what a finished stage held before the next one loads: its model, optimizer and trainer are unreachable
    once run_stage returns, but parts of them form reference cycles (bound-method forwards, the accelerate wrappers)
    that only the cycle collector frees; then the CUDA cache is handed back so the next model can use it."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        log(f"[train] GPU memory before the next stage: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated, "
            f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB reserved")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.sft.train.learning_rate=1e-4")
    parser.add_argument("--profile", help="launch profile name (launch/*.yaml) or path")
    parser.add_argument("--stage", help="run only this stage (earlier chained stages must have finished)")
    parser.add_argument("--resume", action="store_true", help="resume each stage from its latest checkpoint")
    parser.add_argument("--deepspeed", help="ZeRO JSON (configs/deepspeed/*.json); default: the profile's")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        profile = load_profile(args.profile)
        if args.stage and args.stage not in [s.name for s in recipe.stages]:
            raise ConfigError(f"--stage {args.stage}: no such stage; stages are {[s.name for s in recipe.stages]}")
        launch = Launch.from_env()
        backend = resolve(profile, launch, args.deepspeed)
        check_run(recipe, profile, launch, backend)
        check_recipe(recipe)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from dpo_dist.data.cache import BuildFailed
    from dpo_dist.data.formats import DataError
    from dpo_dist.data.render import TemplateError
    from dpo_dist.reliability.guard import TrainingFault

    try:
        run_recipe(recipe, profile, only=args.stage, resume=args.resume, backend=backend)
    except ConfigError as err:  # found on the rank itself: e.g. an attention implementation this GPU cannot run
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except (TrainingFault, DataError, TemplateError, BuildFailed) as fault:
        print(f"error: {fault}", file=sys.stderr, flush=True)
        return 1
    except Stopped as stopped:
        if is_main_process():
            print(f"[train] {stopped}", flush=True)
        finish_distributed()
        return 0  # a clean, requested stop: launchers treat any other code as a crashed rank
    finish_distributed()
    return 0


def finish_distributed() -> None:
    """After a run that ended normally on every rank: wait for all of them, then tear the process group down.

    Left to interpreter exit, a rank whose peers have already gone can abort in the communication library's teardown
    ("terminate called without an active exception", exit -6) after its work is done, and the launcher then reports
    the whole job as failed. Not called after a fault: the peers may be gone, and a barrier would wait for them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
