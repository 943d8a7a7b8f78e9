"""`dpo-dist plan`: will a model fit, in which layout, with which shipped profile, at which micro-batch?

    dpo-dist plan --model <preset | config.json | model dir | recipe.yaml> --method full|lora|qlora
                  --stage sft|dpo|pretrain --gpus N --gpu-mem GIB --seq N --micro-batch N [--layout L] [--offload]
                  [--lora-r R] [--optim O] [--precision P] [--[no-]gradient-checkpointing] [--json]

It prints the per-GPU memory item by item with the arithmetic of each (dpo_dist.planner.model), picks the first
layout that fits (replicated before sharded before offloaded), the largest micro-batch that fits, and the shipped
launch profile that runs that layout. With a recipe, method, sequence length, LoRA rank, optimizer, precision and
checkpointing come from the chosen stage; flags override them. docs/planner.md explains the model and its accuracy.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from dpo_dist.config.schema import ConfigError
from dpo_dist.planner.arch import Arch, config_arch, find_preset, fmt_count, preset_arch, preset_names
from dpo_dist.planner.constants import (LAYOUT_TEXT, LAYOUTS, METHODS, OPTIMIZERS, PRECISIONS, STAGES,
                                           TIGHT_FRACTION)
from dpo_dist.planner.model import (Plan, PlanInput, candidate_layouts, largest_micro_batch, longest_seq, plan,
                                    sp_traffic_bytes)

DEFAULTS = dict(method="qlora", stage="sft", seq=2048, lora_r=8, lora_dropout=0.05, optim="adamw_torch",
                precision="bf16", gradient_checkpointing=True)


# ---- the model: a preset, a config.json / model directory, or a recipe --------------------------------------------

def resolve_model(spec: str) -> tuple[Arch, dict, str]:
    """(architecture, settings taken from a recipe's stage (empty otherwise), where the architecture came from)."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"--model: {spec}: file not found")
        return _from_recipe(path)
    if path.suffix == ".json" or path.is_dir():
        arch = config_arch(path)
        return arch, {}, str(path / "config.json" if path.is_dir() else path)
    return preset_arch(spec), {}, "preset"


def _from_recipe(path: Path) -> tuple[Arch, dict, str]:
    from dpo_dist.config.preflight import check_model, looks_local
    from dpo_dist.config.recipe import load_recipe

    recipe = load_recipe(path)
    # the keys and the model, as every command checks them; not the data: a run is planned before its data exists
    name = recipe.model.name_or_path
    if not find_preset(name) and looks_local(name) and not (path.parent / name / "config.json").is_file():
        check_model(name, "model.name_or_path")  # a missing directory: the one-line error every command gives
    if find_preset(name):
        arch, source = preset_arch(name), f"{path}: model.name_or_path {name} (preset)"
    elif (Path(name) / "config.json").is_file() or (path.parent / name / "config.json").is_file():
        local = Path(name) if (Path(name) / "config.json").is_file() else path.parent / name
        arch, source = config_arch(local), f"{path}: model.name_or_path {local}/config.json"
    else:
        raise ConfigError(f"{path}: model.name_or_path: {name!r} is neither a preset nor a local model directory "
                          f"with a config.json (presets: {', '.join(preset_names())})")
    return arch, {"recipe": recipe, "path": path}, source


def recipe_settings(recipe, path: Path, stage: str | None) -> dict:
    """The planner's inputs that a recipe stage decides: `stage` is a stage name or type; default the last stage."""
    stages = recipe.stages
    chosen = stages[-1] if stage is None else next(
        (s for s in stages if s.name == stage), next((s for s in reversed(stages) if s.stage == stage), None))
    if chosen is None:
        raise ConfigError(f"--stage: {stage!r} is not a stage of {path} (stages: "
                          f"{', '.join(s.name for s in stages)})")
    method, train = recipe.method_of(chosen), chosen.train
    return dict(stage=chosen.stage, stage_name=chosen.name, method=method.type, seq=chosen.max_length,
                lora_r=method.lora_r, lora_dropout=method.lora_dropout,
                target_modules=tuple(method.target_modules) if method.target_modules else None,
                optim=train.optim, precision=train.precision, gradient_checkpointing=train.gradient_checkpointing)


def build_input(args) -> tuple[PlanInput, str]:
    arch, recipe, source = resolve_model(args.model)
    settings = dict(DEFAULTS)
    if recipe:
        settings.update(recipe_settings(recipe["recipe"], recipe["path"], args.stage))
        source += f", stage {settings['stage_name']}"
    elif args.stage:
        settings["stage"] = args.stage
    for key in ("method", "seq", "lora_r", "lora_dropout", "optim", "precision", "gradient_checkpointing"):
        if getattr(args, key) is not None:  # CLI > recipe > defaults
            settings[key] = getattr(args, key)
    if settings["stage"] not in STAGES:
        raise ConfigError(f"--stage: {settings['stage']!r} is not one of {', '.join(STAGES)}")
    inp = PlanInput(arch=arch, method=settings["method"], stage=settings["stage"], gpus=args.gpus,
                    gpu_mem_gib=args.gpu_mem, seq=settings["seq"], micro_batch=args.micro_batch,
                    lora_r=settings["lora_r"], lora_dropout=settings["lora_dropout"],
                    target_modules=settings.get("target_modules"), optim=settings["optim"],
                    precision=settings["precision"], gradient_checkpointing=settings["gradient_checkpointing"],
                    layout="single" if args.gpus == 1 else "zero3" if args.sp > 1 else "ddp",
                    upcast_unquantized=args.upcast_unquantized,
                    fp32_adapters=args.fp32_adapters, grad_accum=args.grad_accum, sp=args.sp)
    return inp, source


# ---- choosing a layout and a profile --------------------------------------------------------------------------------

def requested_layout(args) -> str | None:
    layout = args.layout
    if args.offload:
        if layout in ("single", "ddp"):
            raise ConfigError(f"--offload: parameter CPU offload needs --layout fsdp or zero3, not {layout}")
        if layout in ("fsdp", "zero3"):
            layout += "-offload"
    return layout


def choose(inp: PlanInput, layout: str | None, offload_only: bool) -> dict:
    """The layout to print and recommend: the requested one, or the first candidate that fits (at the asked
    micro-batch, else at micro-batch 1). When the requested one does not fit, `alternative` names one that does;
    when nothing fits, `smallest` names the layout needing the least memory."""
    candidates = [lay for lay in preferred_layouts(inp) if not offload_only or lay.endswith("-offload")]
    result = None
    if layout is not None:
        result = {"plan": plan(replace(inp, layout=layout)), "requested": True}
        if result["plan"].fits:
            return result
        candidates = [lay for lay in candidates if lay != layout]
    for micro in dict.fromkeys((inp.micro_batch, 1)):
        for lay in candidates:
            if plan(replace(inp, layout=lay, micro_batch=micro)).fits:
                if result is None:
                    return {"plan": plan(replace(inp, layout=lay)), "requested": False}
                return {**result, "alternative": lay, "alternative_micro_batch": micro}
    options = candidates + ([layout] if layout else [])
    smallest = min((plan(replace(inp, layout=lay, micro_batch=1)) for lay in options), key=lambda p: p.per_gpu_gib)
    if result is None:
        result = {"plan": plan(replace(inp, layout=smallest.inp.layout)), "requested": False}
    result["smallest"] = (smallest.inp.layout, smallest.per_gpu_gib)
    return result


def preferred_layouts(inp: PlanInput) -> list[str]:
    """candidate_layouts' order (replicated, sharded, offloaded), and within each tier the layouts that a shipped
    profile runs for this method first: FSDP before ZeRO-3 unless only ZeRO-3 has a profile for the method."""
    from dpo_dist.config.profiles import load_profile, profile_names

    shipped = set()
    for name in profile_names():
        prof = load_profile(name)
        if inp.method in prof.methods:
            shipped.add(profile_layout(prof))
    tier = {"single": 0, "ddp": 0, "fsdp": 1, "zero3": 1, "fsdp-offload": 2, "zero3-offload": 2}
    return sorted(candidate_layouts(inp), key=lambda lay: (tier[lay], lay not in shipped))


def profile_layout(profile) -> str | None:
    """The planner's layout for a shipped GPU profile (None for CPU profiles and other ZeRO stages)."""
    if profile.device != "gpu":
        return None
    backend = profile.backend
    if backend == "fsdp":
        return "fsdp-offload" if profile.fsdp_settings().get("fsdp_offload_params") else "fsdp"
    if backend == "deepspeed":
        zero = profile.deepspeed_settings().get("zero_optimization", {})
        return None if zero.get("stage") != 3 else "zero3-offload" if zero.get("offload_param") else "zero3"
    return backend  # single | ddp


def recommend_profile(inp: PlanInput, layout: str) -> dict:
    """A shipped profile that runs `layout` with this method on this many GPUs, else the closest and what to change."""
    from dpo_dist.config.profiles import load_profile, profile_names

    scored = []
    for name in profile_names():
        prof = load_profile(name)
        lay = profile_layout(prof)
        if lay is None:
            continue
        diffs = []
        if lay != layout:
            diffs.append(f"it runs {lay}, not {layout}")
        if prof.sequence_parallel != inp.sp:
            diffs.append(f"its sequence_parallel is {prof.sequence_parallel}: set sequence_parallel: {inp.sp}")
        if inp.method not in prof.methods:
            diffs.append(f"its methods are {', '.join(prof.methods)}: add {inp.method}")
        if prof.world_size != inp.gpus:
            diffs.append(f"it starts {prof.world_size} processes: set num_processes: {inp.gpus}"
                         + (" (and in its accelerate file)" if prof.accelerate_config else ""))
        precision_ok = prof.precision in (None, inp.precision)
        rank = (lay != layout, prof.sequence_parallel != inp.sp, inp.method not in prof.methods,
                abs(prof.world_size - inp.gpus), not precision_ok)
        scored.append((rank, name, prof, diffs))
    scored.sort(key=lambda s: s[:2])
    rank, name, prof, diffs = scored[0]
    planned = (("precision", inp.precision), ("optim", inp.optim),
               ("gradient_checkpointing", inp.gradient_checkpointing))
    notes = [f"{key} {getattr(prof, key)} (plan: {value})" for key, value in planned
             if getattr(prof, key) is not None and getattr(prof, key) != value]
    return {"profile": name if not diffs else None, "closest": name, "changes": diffs, "profile_overrides": notes,
            "profile_micro_batch": prof.micro_batch_size, "launcher": prof.launcher}


# ---- output ----------------------------------------------------------------------------------------------------------

def describe(inp: PlanInput, source: str) -> str:
    lora = f", LoRA r {inp.lora_r} (dropout {inp.lora_dropout})" if inp.method != "full" else ""
    return (f"{inp.arch.name} ({source}): {inp.method}, {inp.stage}, {inp.gpus} × {inp.gpu_mem_gib:g} GiB, "
            f"seq {inp.seq}, micro-batch {inp.micro_batch}{lora}, {inp.precision}, {inp.optim}, "
            f"gradient checkpointing {'on' if inp.gradient_checkpointing else 'off'}")


def params_line(arch: Arch) -> str:
    c = arch.counts()
    parts = [f"{k} {fmt_count(v)}" for k, v in c.items() if v]
    return f"parameters: {fmt_count(arch.total_params())} = " + " + ".join(parts) + " (computed from the architecture)"


def render(result: dict) -> str:
    p: Plan = result["plan"]
    inp = p.inp
    lines = [f"dpo-dist plan: {describe(inp, result['source'])}", params_line(inp.arch),
             f"layout: {inp.layout} ({LAYOUT_TEXT[inp.layout]}" + (f", {inp.gpus} GPUs" if inp.gpus > 1 else "") + ")",
             "", f"  {'per GPU':<56}{'GiB':>8}   arithmetic"]
    for item in p.items:
        if item.where == "gpu":
            lines.append(f"  {item.label:<56}{item.gib:>8.2f}   {item.formula}")
    lines.append(f"  {'total per GPU':<56}{p.per_gpu_gib:>8.2f}   of {inp.gpu_mem_gib:g} GiB: "
                 + (("fits" + (f" (tight: above {TIGHT_FRACTION:.0%} of the card; published runs measured up to "
                                "about 25% above their plans, see docs/planner.md)" if p.per_gpu_gib > TIGHT_FRACTION
                               * inp.gpu_mem_gib else "")) if p.fits else "does not fit"))
    offloaded = [i for i in p.items if i.where == "cpu"]
    if offloaded:
        lines.append(f"  offloaded to CPU RAM, per process: {p.cpu_gib:.2f} GiB ("
                     + ", ".join(f"{i.label} {i.gib:.2f}" for i in offloaded) + ")")
    lines.append("")
    lines += sequence_parallel_lines(result)
    lines += recommendation_lines(result)
    return "\n".join(lines)


def sequence_parallel_lines(result: dict) -> list[str]:
    sp = result.get("sequence_parallel")
    if not sp:
        return []
    inp = result["plan"].inp
    mib = sp["traffic_bytes_per_layer"] / 2 ** 20
    return [f"sequence parallel {inp.sp}: each GPU holds {inp.local_tokens} of the micro-batch's {inp.tokens} tokens; "
            f"Ulysses all-to-all per decoder layer: {mib:.1f} MiB sent per GPU forward, as much again backward "
            f"(({inp.local_tokens} tokens × (2×{inp.arch.q_dim} + 2×{inp.arch.kv_dim}) × "
            f"{PRECISIONS[inp.precision]} B) × {inp.sp - 1}/{inp.sp})",
            f"longest sequence that fits (micro-batch {inp.micro_batch}, {inp.layout}): {sp['longest_seq']} tokens "
            f"with --sp {inp.sp}, {sp['longest_seq_without']} without (arithmetic, multiples of 256)", ""]


def recommendation_lines(result: dict) -> list[str]:
    p, rec = result["plan"], result["recommendation"]
    inp, out = p.inp, []
    if not p.fits:
        alt = result.get("alternative")
        if result["requested"] and alt:
            out.append(f"does not fit: {inp.layout} needs {p.per_gpu_gib:.2f} GiB per GPU; {alt} fits "
                       f"(micro-batch {result['alternative_micro_batch']}): rerun with --layout {alt}")
        elif result["largest_micro_batch"]:
            out.append(f"does not fit at micro-batch {inp.micro_batch}: {p.per_gpu_gib:.2f} GiB per GPU with "
                       f"{inp.layout}")
        else:
            lay, gib = result["smallest"]
            out.append(f"does not fit: no layout holds this on {inp.gpus} × {inp.gpu_mem_gib:g} GiB; the smallest is "
                       f"{lay} at micro-batch 1 with {gib:.2f} GiB per GPU; use more GPUs, a larger card, a shorter "
                       "--seq, or --method qlora")
    largest = result["largest_micro_batch"]
    if largest:
        out.append(f"largest micro-batch that fits with {inp.layout}: {largest}" + (" (the search stops at 256)"
                                                                                     if largest == 256 else ""))
    layout = result.get("alternative") or inp.layout
    if rec["profile"]:
        out.append(f"recommended profile: {rec['profile']} ({rec['launcher']}, {layout}, {inp.gpus} process"
                   f"{'es' if inp.gpus > 1 else ''}); its micro_batch_size is {rec['profile_micro_batch']}")
    else:
        out.append(f"no shipped profile runs {layout} with {inp.method} on {inp.gpus} GPU(s); closest: "
                   f"{rec['closest']}: copy launch/{rec['closest']}.yaml and change: " + "; ".join(rec["changes"]))
    if rec["profile_overrides"]:
        out.append("note: that profile sets " + ", ".join(rec["profile_overrides"]) + "; rerun with those to plan it")
    return out


def to_json(result: dict) -> dict:
    p: Plan = result["plan"]
    inp = asdict(p.inp)
    inp["arch"] = asdict(p.inp.arch)
    return {
        "model": p.inp.arch.name, "source": result["source"], "inputs": inp,
        "parameters": {**p.inp.arch.counts(), "total": p.inp.arch.total_params(),
                       "lora": p.inp.arch.lora_params(p.inp.lora_r, list(p.inp.target_modules)
                                                      if p.inp.target_modules else None)},
        "layout": p.inp.layout,
        "items": [{"key": i.key, "label": i.label, "gib": round(i.gib, 4), "formula": i.formula, "where": i.where}
                  for i in p.items],
        "per_gpu_gib": round(p.per_gpu_gib, 4), "cpu_offload_gib": round(p.cpu_gib, 4),
        "gpu_mem_gib": p.inp.gpu_mem_gib, "fits": p.fits, "largest_micro_batch": result["largest_micro_batch"],
        "alternative_layout": result.get("alternative"), "recommendation": result["recommendation"],
        "sequence_parallel": result.get("sequence_parallel"),
    }


# ---- entry point -----------------------------------------------------------------------------------------------------

def make_plan(args) -> dict:
    inp, source = build_input(args)
    layout = requested_layout(args)
    replace(inp, layout=layout or inp.layout).check()  # flag errors before any search
    result = choose(inp, layout, offload_only=args.offload)
    chosen = result["plan"].inp
    result["source"] = source
    result["largest_micro_batch"] = largest_micro_batch(chosen)
    target = replace(chosen, layout=result["alternative"]) if result.get("alternative") else chosen
    result["recommendation"] = recommend_profile(target, target.layout)
    if chosen.sp > 1:
        result["sequence_parallel"] = {"degree": chosen.sp, "traffic_bytes_per_layer": sp_traffic_bytes(chosen),
                                       "longest_seq": longest_seq(chosen),
                                       "longest_seq_without": longest_seq(replace(chosen, sp=1))}
    return result


def run(args) -> int:
    result = make_plan(args)
    if args.json:
        from dpo_dist.cli import json_stdout

        print(json.dumps(to_json(result), indent=2), file=json_stdout(), flush=True)
    else:
        print(render(result))
    return 0 if result["plan"].fits else 1


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory of a training run, the layout and shipped profile that fit, and "
                       "the largest micro-batch", description="Exit status 0 when the printed plan fits, 1 when it "
                       "does not; docs/planner.md explains the arithmetic.")
    p.add_argument("--model", "--recipe", dest="model", required=True, help="a preset (e.g. qwen2.5-7b; see docs/planner.md), an HF config.json "
                   "or model directory, or a dpo-dist recipe .yaml")
    p.add_argument("--method", choices=METHODS, help="default: the recipe's, else qlora")
    p.add_argument("--stage", help="sft, dpo, kto, orpo, cpo or pretrain; with a recipe, which of its stages (name "
                   "or type; default the last)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs, one process each (default 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB", help="memory per GPU in GiB (default 80)")
    p.add_argument("--seq", type=int, help="tokens per sequence (DPO: per chosen/rejected sequence); default: the "
                   "recipe stage's max_length, else 2048")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences (DPO: pairs) per GPU per forward (default 1)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default: the recipe's, else 8)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (default: the recipe's, else 0.05)")
    p.add_argument("--optim", choices=sorted(OPTIMIZERS), metavar="OPTIM",
                   help="Trainer optimizer name (default: the recipe's, else adamw_torch): " + ", ".join(OPTIMIZERS))
    p.add_argument("--precision", choices=list(PRECISIONS), help="default: the recipe's, else bf16")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="default: the recipe's, else on")
    p.add_argument("--layout", choices=LAYOUTS, help="plan this layout (default: the first that fits of ddp, fsdp, "
                   "zero3, fsdp-offload, zero3-offload; single on one GPU)")
    p.add_argument("--offload", action="store_true", help="parameter CPU offload (FSDP cpu offload / ZeRO-3 "
                   "offload_param)")
    p.add_argument("--upcast-unquantized", action="store_true", help="QLoRA with peft's "
                   "prepare_model_for_kbit_training (fp32 non-quantized weights), which dpo-dist does not call")
    p.add_argument("--fp32-adapters", action="store_true", help="adapters kept fp32 (peft's default "
                   "autocast_adapter_dtype), where dpo-dist casts them to the base's dtype")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1); FSDP keeps "
                   "unsharded gradients between them (no_sync)")
    p.add_argument("--sp", type=int, default=1, metavar="N", help="sequence parallelism: each sequence split over N "
                   "GPUs (DeepSpeed Ulysses, --layout zero3); activations and logits are planned for 1/N of the "
                   "tokens, and the longest sequence that fits is given with and without it (default 1: off)")
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON (per-GPU total: per_gpu_gib)")
    p.set_defaults(func=run)

