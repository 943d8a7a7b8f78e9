"""`dpo-dist bench --workload sp`: one long-sequence DPO recipe under a data-parallel profile and under its
sequence-parallel twin (cpu-zero3-2 and cpu-zero3-sp-2 by default), interleaved A B A B …, each run a fresh launch.

Reported per side (medians over repeats): real tokens per second of training and each rank's peak RSS (from the
run summary, dpo_dist.training.run), with the B/A ratios. Both sides train the same rows with the same global batch;
the loss of their first step is compared as a check that they did the same work.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

PROFILES = ("cpu-zero3-2", "cpu-zero3-sp-2")


def long_pairs(tokenizer, n: int, prompt_tokens: int, answer_tokens: int, seed: int) -> list[dict]:
    """`n` preference pairs of about the given token lengths (prompt, and each of chosen/rejected), from words drawn
    from the tokenizer's own vocabulary."""
    rng = np.random.default_rng(seed)
    vocab = [t for t, i in tokenizer.get_vocab().items() if t.isalpha() and t.isascii() and len(t) > 2]
    words = np.array(sorted(vocab))

    def text(tokens: int) -> str:
        out = " ".join(rng.choice(words, size=tokens))
        ids = tokenizer(out, add_special_tokens=False)["input_ids"][:tokens]
        return tokenizer.decode(ids)

    return [{"prompt": text(prompt_tokens), "chosen": text(answer_tokens), "rejected": text(answer_tokens)}
            for _ in range(n)]


def recipe(model_dir: Path, data: Path, seq: int, steps: int, global_batch: int, seed: int) -> dict:
    return {
        "name": "bench-sp", "seed": seed,
        "model": {"name_or_path": str(model_dir), "template": "qwen"},
        "method": {"type": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        "train": {"learning_rate": 5e-5, "global_batch_size": global_batch, "max_steps": steps, "logging_steps": 1,
                  "save_steps": 10_000, "lr_scheduler": "constant", "gradient_checkpointing": True,
                  "report_to": [], "ref_logps_cache": False},
        "stages": [{"stage": "dpo", "data": {"train": str(data), "format": "pair"}, "max_length": seq,
                    "max_prompt_length": seq // 2}],
    }


def side_run(recipe_path: Path, profile: str, out: Path, log: Path) -> dict:
    from dpo_dist.launch.command import _tool

    cmd = [_tool("dpo-dist"), "launch", str(recipe_path), "--profile", profile, f"output_dir={out}"]
    with open(log, "w", encoding="utf-8") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f"{profile} failed (exit {code}); see {log}")
    summary = json.loads((out / "dpo" / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines() if line]
    steps = [m for m in metrics if "loss" in m]
    tokens = max(m.get("num_tokens", 0) for m in steps)
    return {"profile": profile, "train_runtime_s": summary["train_runtime_s"], "tokens": tokens,
            "real_tokens_per_s": tokens / summary["train_runtime_s"], "peak_rss_mib": summary["peak_rss_mib"],
            "max_rank_peak_rss_mib": max(summary["peak_rss_mib"]), "first_loss": steps[0]["loss"],
            "sequence_parallel": summary.get("sequence_parallel")}


def bench_sequence_parallel(args, work: Path, progress) -> dict:
    from transformers import AutoTokenizer

    from dpo_dist.bench import data as bench_data

    started = time.time()
    seq = args.sp_seq
    model_dir = bench_data.build_model_dir(work / "model", args.model_size, args.seed, max_positions=seq)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    global_batch = 4
    rows = long_pairs(tokenizer, args.steps * global_batch, seq // 2 - 16, seq // 2 - 16, args.seed)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe(model_dir, data, seq, args.steps, global_batch, args.seed)))
    profiles = args.sp_profiles.split(",")
    runs = {p: [] for p in profiles}
    for r in range(args.repeats):
        for profile in profiles:
            tag = f"{profile}-{r + 1}"
            progress(f"run {tag}: {args.steps} DPO steps of {global_batch} pairs × 2 × {seq} tokens")
            res = side_run(recipe_path, profile, work / tag, work / f"{tag}.log")
            runs[profile].append(res)
            progress(f"  {tag}: {res['real_tokens_per_s']:.0f} tok/s, peak RSS per rank {res['peak_rss_mib']} MiB")
    med = {p: {k: statistics.median(r[k] for r in runs[p]) for k in ("real_tokens_per_s", "max_rank_peak_rss_mib")}
           for p in profiles}
    a, b = profiles
    return {
        "workload": "sp", "seq": seq, "steps": args.steps, "global_batch": global_batch, "repeats": args.repeats,
        "model_size": args.model_size, "profiles": profiles, "medians": med,
        "ratio_real_tokens_per_s": med[b]["real_tokens_per_s"] / med[a]["real_tokens_per_s"],
        "ratio_max_rank_peak_rss": med[b]["max_rank_peak_rss_mib"] / med[a]["max_rank_peak_rss_mib"],
        "same_first_loss": abs(runs[a][0]["first_loss"] - runs[b][0]["first_loss"])
        <= 1e-4 * abs(runs[a][0]["first_loss"]),
        "runs": runs, "wall_s": round(time.time() - started, 1),
        "command": " ".join(["dpo-dist", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
    }


def format_table(report: dict) -> str:
    a, b = report["profiles"]
    lines = [f"long-sequence DPO: {report['steps']} steps of {report['global_batch']} pairs, chosen and rejected "
             f"{report['seq']} tokens each, model {report['model_size']}; medians of {report['repeats']} runs",
             f"{'':<34}{a:>16}{b:>16}{'B/A':>8}"]
    for key, label in (("real_tokens_per_s", "real tokens/s"),
                       ("max_rank_peak_rss_mib", "peak RSS, largest rank (MiB)")):
        va, vb = report["medians"][a][key], report["medians"][b][key]
        lines.append(f"{label:<34}{va:>16.1f}{vb:>16.1f}{vb / va:>8.2f}")
    lines.append(f"same work (first-step loss within 1e-4): {'yes' if report['same_first_loss'] else 'NO'}")
    return "\n".join(lines)
