"""`dpo-dist bench`: the plain TRL script (side A) against dpo-dist (side B) on one fixed workload.

Same model (random-weight Qwen2 from a seed), same rows, same seed, same LoRA; the sides run interleaved
A B A B … in one invocation, each side-run in a fresh process so its peak memory is its own. Reports the median over
repeats of each figure, with the B/A ratio, and checks that both sides did the same work. docs/benchmarks.md has the
measured tables and says what each number means.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = {"A": "TRL baseline (plain DPOTrainer/SFTTrainer script)", "B": "dpo-dist (recipe → dpo_dist.train)"}
TARGETS = {  # the CPU targets: B/A ratios measured in the same run
    "realistic": ("ratio_real_tokens_per_s", ">=", 1.3),
    "uniform": ("ratio_real_tokens_per_s", ">=", 0.98),
    "logits": ("ratio_logits_peak_mem", "<=", 0.5),
}
MEDIAN_KEYS = ("real_tokens_per_s", "step_time_s", "padding_fraction", "peak_mem_mib")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark dpo-dist against a plain TRL script on one workload (A B A B …)")
    p.add_argument("--workload", choices=("dpo", "sft", "data", "sp"), default="dpo",
                   help="dpo or sft: training steps; data: preparing data (a plain datasets script against "
                        "dpo-dist's prepare), see --data-rows; sp: long-sequence DPO under a data-parallel and a "
                        "sequence-parallel profile, see --sp-seq")
    p.add_argument("--lengths", choices=("realistic", "uniform"), default="realistic",
                   help="realistic: long-tailed prompt/response lengths like UltraFeedback; uniform: all alike")
    p.add_argument("--micro-batch", type=int, default=4, metavar="N", help="pairs (dpo) or rows (sft) per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N", help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=12, metavar="N",
                   help="optimizer steps per side-run: one epoch over steps × micro-batch × grad-accum rows, all "
                        "timed (a separate warm-up micro-batch runs first)")
    p.add_argument("--repeats", type=int, default=3, metavar="R", help="side-runs per side; medians are reported")
    p.add_argument("--model-size", choices=("tiny", "small"), default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="cpu", help="side B's launch profile (default cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="a recipe override for side B, as `dpo-dist train` takes them (e.g. train.padding_free=true, "
                        "train.ref_logps_cache=false); repeatable")
    p.add_argument("--logits-vocab", type=int, default=151936, metavar="V", help="logits micro-benchmark vocabulary")
    p.add_argument("--logits-hidden", type=int, default=896, metavar="H")
    p.add_argument("--logits-seq", type=int, default=32, metavar="S",
                   help="tokens per sequence; the micro-benchmark scores 2 × micro-batch sequences (kept short "
                        "by default: the full-vocabulary matmuls are slow on a small CPU)")
    p.add_argument("--no-logits", action="store_true", help="skip the logits micro-benchmark")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write the results as JSON (- or no value: "
                   "stdout, with the table on stderr)")
    p.add_argument("--data-rows", default="20000,100000", metavar="N,N",
                   help="--workload data: the sizes to run, in rows (default 20000,100000)")
    p.add_argument("--data-kinds", default="sft,pretrain", metavar="KINDS",
                   help="--workload data: sft (Firefly multi-turn) and/or pretrain ({\"text\"}), comma-separated")
    p.add_argument("--num-proc", type=int, metavar="N", help="--workload data: tokenization processes on both sides "
                   "(default: the cores available, as data.num_proc)")
    p.add_argument("--sp-seq", type=int, default=4096, metavar="T",
                   help="--workload sp: tokens per chosen/rejected sequence (prompt + answer; default 4096)")
    p.add_argument("--sp-profiles", default="cpu-zero3-2,cpu-zero3-sp-2", metavar="A,B",
                   help="--workload sp: the two profiles compared (default cpu-zero3-2,cpu-zero3-sp-2)")
    p.add_argument("--work-dir", help="keep the model, data, runs and logs here (default: a temporary directory)")
    p.set_defaults(func=run)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---- running the side-runs ------------------------------------------------------------------------------------------


def _child_env(work: Path) -> dict:
    env = dict(os.environ)
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(work / "hf-datasets"), PYTHONUNBUFFERED="1")
    return env


def _run_child(module: str, args: list[str], log: Path, work: Path, what: str) -> None:
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", module, *args], stdout=fh, stderr=subprocess.STDOUT,
                              env=_child_env(work), cwd=str(work))
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); the last lines of {log}:\n{tail}")


def side_run(spec: dict, work: Path, tag: str) -> dict:
    spec_path, out = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    _run_child("dpo_dist.bench.worker", [str(spec_path), str(out)], work / f"{tag}.log", work,
               f"side {spec['side']} run {tag}")
    result = json.loads(out.read_text())
    result["peak_mem_mib"] = result.get("cuda_max_allocated_mib", result["peak_rss_mib"])
    return result


def logits_run(path: str, args, work: Path) -> dict:
    out = work / f"logits-{path}.json"
    _run_child("dpo_dist.bench.logits",
               [path, str(out), "--vocab", str(args.logits_vocab), "--hidden", str(args.logits_hidden),
                "--seq", str(args.logits_seq), "--micro-batch", str(args.micro_batch), "--seed", str(args.seed)],
               work / f"logits-{path}.log", work, f"logits micro-benchmark ({path})")
    return json.loads(out.read_text())


# ---- summarising --------------------------------------------------------------------------------------------------


def ratio(b: float | None, a: float | None) -> float | None:
    return None if a in (None, 0) or b is None else b / a


def medians(runs: list[dict]) -> dict:
    """Medians over repeats. Each repeat of a side trains the same batches in the same order (same seed), so the time
    of each step is the median of that step over the repeats, and the epoch's time is the sum of those: a stall from
    another process on the machine is dropped unless it hits the same step in most repeats. Falls back to the median
    of the per-run figures when the repeats' batches differ."""
    out = {key: statistics.median(r[key] for r in runs) for key in MEDIAN_KEYS}
    out["ref_prepass_s"] = statistics.median(r.get("ref_prepass_s", 0.0) for r in runs)
    out["method"] = "median of per-run figures"
    per_step = [r["step_real_tokens"] for r in runs]
    if all(tokens == per_step[0] for tokens in per_step):
        times = [statistics.median(ts) for ts in zip(*(r["step_times_s"] for r in runs))]
        epoch = sum(times) + statistics.median(r.get("ref_prepass_s", 0.0) for r in runs)
        out["step_time_s"] = epoch / len(times)
        out["real_tokens_per_s"] = sum(per_step[0]) / epoch
        out["method"] = "per-step median over repeats (same batches each repeat)"
    return out


def compare_rows(a: list[dict] | None, b: list[dict] | None) -> dict:
    """The honest check: per row, the token lengths (and ids) each side trains on."""
    if a is None or b is None:
        return {"checked": False}
    out = {"checked": True, "rows_a": len(a), "rows_b": len(b),
           "rows_identical_ids": sum(x["digest"] == y["digest"] for x, y in zip(a, b)),
           "rows_with_length_difference": 0, "examples": []}
    for i, (x, y) in enumerate(zip(a, b)):
        if x["lengths"] != y["lengths"]:
            out["rows_with_length_difference"] += 1
            if len(out["examples"]) < 5:
                out["examples"].append({"row": i, "lengths_a": x["lengths"], "lengths_b": y["lengths"]})
    out["token_counts_agree"] = len(a) == len(b) and out["rows_with_length_difference"] == 0
    return out


def same_work(runs: dict[str, list[dict]], rows: dict) -> dict:
    work = {}
    for side in ("A", "B"):
        pairs = {r["pairs"] for r in runs[side]}
        tokens = {r["real_tokens"] for r in runs[side]}
        work[f"pairs_{side.lower()}"] = pairs.pop() if len(pairs) == 1 else sorted(pairs)
        work[f"real_tokens_{side.lower()}"] = tokens.pop() if len(tokens) == 1 else sorted(tokens)
    work["equal"] = (work["pairs_a"] == work["pairs_b"] and work["real_tokens_a"] == work["real_tokens_b"]
                     and isinstance(work["pairs_a"], int) and isinstance(work["real_tokens_a"], int))
    work["rows"] = rows
    if not work["equal"]:
        work["note"] = "A and B did NOT feed the same work to the model; the ratios are not comparable"
    elif rows.get("checked") and not rows["token_counts_agree"]:
        work["note"] = ("same totals, but some rows tokenize to different lengths on the two sides "
                        f"({rows['rows_with_length_difference']} rows)")
    return work


def targets(report: dict) -> dict:
    out = {}
    for name, (key, op, bound) in TARGETS.items():
        if name in ("realistic", "uniform") and name != report["lengths"]:
            continue
        value = report.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[f"{key}_{name}" if name != "logits" else key] = {"target": f"{op} {bound}", "value": value, "met": met}
    return out


def machine() -> dict:
    import torch
    import transformers
    import trl

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
    }


def data_stats(rows_lengths: list[tuple[int, int, int]]) -> dict:
    import numpy as np

    out = {}
    for i, name in enumerate(("prompt", "chosen", "rejected")):
        values = np.array([r[i] for r in rows_lengths])
        out[name] = {"mean": round(float(values.mean()), 1), "p50": int(np.percentile(values, 50)),
                     "p90": int(np.percentile(values, 90)), "max": int(values.max())}
    return out


def command_line(args) -> str:
    """The invocation, spelled out with every workload option (defaults included) so it can be rerun."""
    parts = ["dpo-dist", "bench", "--workload", args.workload, "--lengths", args.lengths,
             "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum), "--steps", str(args.steps),
             "--repeats", str(args.repeats), "--model-size", args.model_size, "--seed", str(args.seed)]
    if args.profile != "cpu":
        parts += ["--profile", args.profile]
    for override in args.overrides:
        parts += ["--set", override]
    if args.no_logits:
        parts.append("--no-logits")
    else:
        parts += ["--logits-vocab", str(args.logits_vocab), "--logits-hidden", str(args.logits_hidden),
                  "--logits-seq", str(args.logits_seq)]
    return shlex.join(parts)


# ---- the command --------------------------------------------------------------------------------------------------


def bench(args) -> dict:
    from dpo_dist.bench import data as bench_data

    started = time.time()
    command = command_line(args)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dpo-dist-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    size = bench_data.SIZES[args.model_size]
    n_rows = args.steps * args.micro_batch * args.grad_accum

    progress(f"{args.workload}, {args.lengths} lengths, micro-batch {args.micro_batch}, {args.steps} steps × "
             f"{args.repeats} repeats per side, model {args.model_size}; work dir {work}")
    model_dir = bench_data.build_model_dir(work / "model", args.model_size, args.seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = bench_data.synth_rows(tokenizer, args.lengths, args.model_size, n_rows, args.seed)
    files = bench_data.write_data(work / "data", rows)
    lengths = bench_data.draw_lengths(args.lengths, args.model_size, n_rows, args.seed,
                                      bench_data.template_overhead(tokenizer))

    from dpo_dist.config.profiles import load_profile

    profile = load_profile(args.profile)
    base = {
        "workload": args.workload, "model_dir": str(model_dir), "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum, "max_length": size.max_length, "seed": args.seed, "learning_rate": 5e-5,
        "logging_steps": 10, "lora_r": 16, "lora_alpha": 32, "template": bench_data.TEMPLATE, "profile": args.profile,
        "device": "cpu" if profile.device == "cpu" else "gpu", "cache_dir": None,
        "precision": profile.precision or "fp32", "overrides": list(args.overrides),
        "gradient_checkpointing": bool(profile.gradient_checkpointing),
        "data": {"a": str(files[f"{args.workload}_a"]), "b": str(files[f"{args.workload}_b"])},
    }
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    total = 2 * args.repeats
    for r in range(args.repeats):
        for side in ("A", "B"):
            tag = f"{side}{r + 1}"
            t0 = time.time()
            progress(f"run {len(runs['A']) + len(runs['B']) + 1}/{total}: side {side} ({SIDES[side]}), "
                     f"repeat {r + 1}")
            result = side_run({**base, "side": side, "run_dir": str(work / tag), "check_rows": r == 0,
                               "cache_dir": str(work / tag / "cache")}, work, tag)  # nothing carried between runs
            runs[side].append(result)
            progress(f"  {tag}: {result['real_tokens_per_s']:.0f} real tok/s, {result['step_time_s']:.3f} s/step, "
                     f"padding {result['padding_fraction']:.1%}, peak {result['peak_mem_mib']:.0f} MiB "
                     f"({time.time() - t0:.0f} s)")

    logits = {}
    if not args.no_logits:
        for path in ("trl", "dpo_dist", "materialized"):
            t0 = time.time()
            progress(f"logits→logps peak memory: {path} (vocab {args.logits_vocab}, hidden {args.logits_hidden}, "
                     f"{2 * args.micro_batch} × {args.logits_seq} tokens)")
            logits[path] = logits_run(path, args, work)
            progress(f"  {path}: peak {logits[path]['peak_mib']:.0f} MiB ({time.time() - t0:.0f} s)")

    med = {side: medians(runs[side]) for side in ("A", "B")}
    report = {
        "command": command,
        "workload": args.workload, "lengths": args.lengths, "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum, "steps": args.steps, "repeats": args.repeats, "seed": args.seed,
        "model_size": args.model_size, "profile": args.profile,
        "machine": machine(),
        "data": {**bench_data.describe_lengths(args.lengths, args.model_size), "rows": n_rows,
                 "content_tokens": data_stats(lengths)},
        "sides": SIDES,
        "medians": med,
    }
    for key in MEDIAN_KEYS:
        report[f"ratio_{key}"] = ratio(med["B"][key], med["A"][key])
    # The plain per-run medians too, for transparency (noisier when other processes share the CPU).
    report["medians_of_runs"] = {side: {key: statistics.median(r[key] for r in runs[side]) for key in MEDIAN_KEYS}
                                 for side in ("A", "B")}
    if logits:
        report["logits"] = logits
        report["ratio_logits_peak_mem"] = ratio(logits["dpo_dist"]["peak_mib"], logits["trl"]["peak_mib"])
        report["ratio_logits_peak_mem_vs_materialized"] = ratio(logits["dpo_dist"]["peak_mib"],
                                                                logits["materialized"]["peak_mib"])
    else:
        report["ratio_logits_peak_mem"] = None
    report["same_work"] = same_work(runs, compare_rows(runs["A"][0].get("rows"), runs["B"][0].get("rows")))
    report["targets"] = targets(report)
    for side in ("A", "B"):
        for result in runs[side]:
            result.pop("rows", None)
    report["runs"] = runs
    report["work_dir"] = str(work) if args.work_dir else None
    report["wall_s"] = round(time.time() - started, 1)
    if not args.work_dir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return report


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "%":
        return f"{value:.1%}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:,.0f}"


def format_table(report: dict) -> str:
    med = report["medians"]
    rows = [("real tokens/s", "real_tokens_per_s", ""), ("step time (s)", "step_time_s", ""),
            ("padding fraction", "padding_fraction", "%"), ("peak memory (MiB)", "peak_mem_mib", "")]
    lines = [f"{report['workload']} · {report['lengths']} lengths · micro-batch {report['micro_batch']} · "
             f"{report['steps']} steps × {report['repeats']} repeats (medians)",
             f"{'figure':<28}{'A: TRL':>12}{'B: dpo-dist':>14}{'B/A':>8}", "-" * 62]
    for label, key, unit in rows:
        lines.append(f"{label:<28}{_fmt(med['A'][key], unit):>12}{_fmt(med['B'][key], unit):>14}"
                     f"{_fmt(report[f'ratio_{key}']):>8}")
    if report.get("logits"):
        lg = report["logits"]
        lines.append(f"{'logits→logps peak (MiB)':<28}{_fmt(lg['trl']['peak_mib']):>12}"
                     f"{_fmt(lg['dpo_dist']['peak_mib']):>14}{_fmt(report['ratio_logits_peak_mem']):>8}")
        lines.append(f"{'  materialized logits (MiB)':<28}{_fmt(lg['materialized']['peak_mib']):>12}"
                     f"{'':>14}{'':>8}   (context: B/materialized "
                     f"{_fmt(report['ratio_logits_peak_mem_vs_materialized'])})")
    if med["B"].get("ref_prepass_s"):
        lines.append(f"B's reference pass before step 1: {med['B']['ref_prepass_s']:.2f} s (counted in B's time; "
                     "A runs its reference forward inside each step)")
    work = report["same_work"]
    lines.append(f"same work: pairs A {work['pairs_a']} / B {work['pairs_b']}, real tokens A {work['real_tokens_a']} / "
                 f"B {work['real_tokens_b']} → {'equal' if work['equal'] else 'NOT EQUAL'}")
    rows_check = work["rows"]
    if rows_check.get("checked"):
        lines.append(f"per-row token counts: {rows_check['rows_a'] - rows_check['rows_with_length_difference']}/"
                     f"{rows_check['rows_a']} rows agree, {rows_check['rows_identical_ids']} with identical ids")
    if work.get("note"):
        lines.append(f"WARNING: {work['note']}")
    for name, t in report["targets"].items():
        state = "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"
        lines.append(f"target {name} {t['target']}: {_fmt(t['value'])} → {state}")
    return "\n".join(lines)


def run(args) -> int:
    if args.workload == "data":
        from dpo_dist.bench import prepare as bench_prepare

        return bench_prepare.run(args)
    if args.workload == "sp":
        return run_sequence_parallel(args)
    for name in ("micro_batch", "grad_accum", "repeats"):
        if getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    if args.steps < 1:
        print("error: --steps must be positive", file=sys.stderr)
        return 2
    if args.overrides:  # a bad --set fails now, not after side A's first run
        from dpo_dist.config.recipe import ConfigError, recipe_from_dict

        try:
            recipe_from_dict({"name": "bench", "model": {"name_or_path": "check"},
                              "stages": [{"stage": args.workload, "data": {"train": "check.jsonl"}}]},
                             args.overrides, source="--set")
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    report = bench(args)
    emit(report, format_table(report), args.json)
    return 0 if report["same_work"]["equal"] else 1


def run_sequence_parallel(args) -> int:
    import shutil

    from dpo_dist.bench import sequence

    if len(args.sp_profiles.split(",")) != 2 or args.sp_seq < 64 or args.steps < 1 or args.repeats < 1:
        print("error: --workload sp needs --sp-profiles A,B, --sp-seq of 64 or more, and positive --steps and "
              "--repeats", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dpo-dist-bench-sp-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = sequence.bench_sequence_parallel(args, work, progress)
    report["machine"] = machine()
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    emit(report, sequence.format_table(report), args.json)
    return 0 if report["same_first_loss"] else 1


def emit(report: dict, table: str, json_to: str | None) -> None:
    """The table on stdout (on stderr with --json -, when stdout holds the JSON), the JSON where asked."""
    if json_to == "-":
        from dpo_dist.cli import json_stdout

        print(table, file=sys.stderr)
        print(json.dumps(report, indent=1), file=json_stdout(), flush=True)
    else:
        print(table)
        if json_to:
            Path(json_to).write_text(json.dumps(report, indent=1) + "\n")
            progress(f"results written to {json_to}")
    progress(f"finished in {report['wall_s']:.0f} s")
