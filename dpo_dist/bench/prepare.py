"""`dpo-dist bench --workload data`: preparing data, a plain `datasets` script (A) against dpo-dist's prepare (B).

- A: `datasets.load_dataset("json")` on the file, then a batched `map` of the tokenizer over each row's text (for
  SFT, the turns' texts joined), with the same `num_proc`. No template, no label masks, no validation.
- B: `dpo_dist.data.tokenize.prepare_dataset`, the code `dpo-dist prepare` and training run: rows read and checked,
  the qwen template rendered, label masks built (SFT), or blocks packed (pretraining), written to the cache.

Both run on the same generated file, at each requested size, interleaved A B A B, each in a fresh process with its
own empty caches. The parent samples the memory of each child's whole process tree (its tokenization workers
included) every 20 ms and keeps the peaks: RSS, and its anonymous part (RSS less the pages of memory-mapped files).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dpo_dist.commands.bench import progress

KINDS = ("sft", "pretrain")
SFT_MAX_LENGTH = 4096  # long enough that no generated row is truncated: both sides tokenize every token
PRETRAIN_BLOCK = 2048


# ---- the generated data -------------------------------------------------------------------------------------------


def _words() -> list[str]:
    import re

    from dpo_dist.demo.build import DATA_DIR, _corpus

    return sorted({w for text in _corpus(DATA_DIR) for w in re.findall(r"[A-Za-z]+", text)})


def _sentences(rng: np.random.Generator, words: np.ndarray, n_words: int) -> str:
    picked = words[rng.integers(len(words), size=max(1, n_words))]
    return " ".join(picked.tolist()) + "."


def write_file(path: Path, kind: str, rows: int, seed: int) -> dict:
    """Firefly-format multi-turn SFT (1-4 turns, long-tailed turn lengths, a system prompt in a third of the rows)
    or `{"text"}` pretraining documents; written in chunks, never held whole. Returns the file's facts."""
    rng = np.random.default_rng(seed)
    words = np.array(_words())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            if kind == "sft":
                turns = [{"human": _sentences(rng, words, int(rng.lognormal(3.5, 0.8))),
                          "assistant": _sentences(rng, words, int(rng.lognormal(4.5, 0.8)))}
                         for _ in range(int(rng.integers(1, 5)))]
                row = {"conversation_id": int(rng.integers(1 << 30)), "category": "Brainstorming",
                       "conversation": turns}
                if rng.random() < 1 / 3:
                    row["system"] = "You are a careful assistant."
            else:
                row = {"text": _sentences(rng, words, int(rng.lognormal(5.0, 0.7)))}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"rows": rows, "bytes": path.stat().st_size}


# ---- one side-run, in a fresh process ---------------------------------------------------------------------------


def _side_a(spec: dict, tokenizer) -> dict:
    from datasets import load_dataset

    ds = load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["hf_cache"])
    kind = spec["kind"]

    def tokenize(batch):
        if kind == "sft":
            texts = ["\n".join(t for turn in conv for t in (turn["human"], turn["assistant"]))
                     for conv in batch["conversation"]]
        else:
            texts = batch["text"]
        return {"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]}

    out = ds.map(tokenize, batched=True, num_proc=spec["num_proc"], remove_columns=ds.column_names,
                 desc="A: tokenizing")
    import pyarrow.compute as pc

    tokens = int(pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py())
    return {"rows": len(out), "tokens": tokens}


def _side_b(spec: dict, tokenizer) -> dict:
    from dpo_dist.data.render import Renderer
    from dpo_dist.data.tokenize import prepare_dataset

    os.environ["DPO_DIST_CACHE"] = spec["cache"]
    max_length = SFT_MAX_LENGTH if spec["kind"] == "sft" else PRETRAIN_BLOCK
    prepared = prepare_dataset(spec["kind"], spec["data"], tokenizer, Renderer(tokenizer, "qwen"),
                               max_length=max_length, num_proc=spec["num_proc"], log=lambda *_: None)
    return {"rows": prepared.report["rows"], "tokens": prepared.report["tokens"],
            "truncated": prepared.report.get("truncated", 0), "examples": prepared.report["examples"]}


def worker(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    started = time.perf_counter()
    result = (_side_a if spec["side"] == "A" else _side_b)(spec, tokenizer)
    result["seconds"] = time.perf_counter() - started
    Path(out_path).write_text(json.dumps(result))
    return 0


def _tree_memory(proc) -> tuple[int, int]:
    """(RSS, anonymous RSS) in bytes, summed over ``proc`` and its descendants. RSS includes the pages of the
    memory-mapped Arrow files, which the kernel can drop at any time; the anonymous part is the memory that really
    has to fit (on Linux, from /proc; elsewhere it is reported as the RSS)."""
    import psutil

    rss = anon = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            anon += _anon_rss(p.pid)
        except (psutil.Error, OSError):
            pass
    return rss, anon


def _anon_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.Process(pid).memory_info().rss  # no /proc: count it all


def side_run(spec: dict, work: Path, tag: str) -> dict:
    import psutil

    spec_path, out, log = work / f"{tag}.spec.json", work / f"{tag}.result.json", work / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as fh:
        child = subprocess.Popen([sys.executable, "-m", "dpo_dist.bench.prepare", str(spec_path), str(out)],
                                 stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(work))
        proc, peak, peak_anon = psutil.Process(child.pid), 0, 0
        while child.poll() is None:
            rss, anon = _tree_memory(proc)
            peak, peak_anon = max(peak, rss), max(peak_anon, anon)
            time.sleep(0.02)
    if child.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"side {spec['side']} run {tag} failed (exit {child.returncode}); {log}:\n{tail}")
    result = json.loads(out.read_text())
    result["peak_tree_rss_mib"] = peak / 2**20
    result["peak_tree_anon_mib"] = peak_anon / 2**20
    result["rows_per_s"] = result["rows"] / result["seconds"]
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


# ---- the command --------------------------------------------------------------------------------------------------

FIGURES = (("rows/s", "rows_per_s"), ("tokens/s", "tokens_per_s"), ("seconds", "seconds"),
           ("peak tree RSS (MiB)", "peak_tree_rss_mib"), ("peak tree anon RSS (MiB)", "peak_tree_anon_mib"))


def bench_prepare(args) -> dict:
    from dpo_dist.bench.data import build_tokenizer

    started = time.time()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dpo-dist-bench-data-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = work / "tokenizer"
    build_tokenizer().save_pretrained(tokenizer_dir)
    from dpo_dist.data.tokenize import cores

    num_proc = args.num_proc or cores()
    sizes = [int(s) for s in args.data_rows.split(",")]
    kinds = args.data_kinds.split(",")
    report = {"command": command_line(args, num_proc), "num_proc": num_proc, "repeats": args.repeats,
              "cpus": os.cpu_count(), "results": []}
    for kind in kinds:
        for rows in sizes:
            data = work / f"{kind}-{rows}.jsonl"
            facts = write_file(data, kind, rows, args.seed)
            progress(f"{kind}, {rows} rows, {facts['bytes'] / 2**20:.1f} MiB: {data}")
            runs: dict[str, list[dict]] = {"A": [], "B": []}
            for r in range(args.repeats):
                for side in ("A", "B"):
                    tag = f"{kind}-{rows}-{side}{r + 1}"
                    spec = {"side": side, "kind": kind, "data": str(data), "tokenizer": str(tokenizer_dir),
                            "num_proc": num_proc, "hf_cache": str(work / tag / "hf"), "cache": str(work / tag / "dd")}
                    result = side_run(spec, work, tag)
                    runs[side].append(result)
                    progress(f"  {tag}: {result['rows_per_s']:,.0f} rows/s, {result['tokens_per_s']:,.0f} tokens/s, "
                             f"{result['seconds']:.1f} s, peak tree RSS {result['peak_tree_rss_mib']:,.0f} MiB")
                    import shutil

                    shutil.rmtree(work / tag, ignore_errors=True)  # each run starts from empty caches
            med = {side: {key: statistics.median(r[key] for r in runs[side]) for _, key in FIGURES}
                   for side in runs}
            report["results"].append({
                "kind": kind, "rows": rows, "mib": round(facts["bytes"] / 2**20, 1), "medians": med,
                "ratios": {key: med["B"][key] / med["A"][key] for _, key in FIGURES},
                "tokens": {side: runs[side][0]["tokens"] for side in runs},
                "same_work": same_work(kind, runs),
                "runs": runs,
            })
    report["growth"] = growth(report["results"])
    report["wall_s"] = round(time.time() - started, 1)
    if not args.work_dir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return report


def same_work(kind: str, runs: dict[str, list[dict]]) -> dict:
    """Both sides read every row; for pretraining, B's tokens are A's plus the one EOS B puts after each document
    (SFT: B's include the template's, so only the rows can be compared)."""
    a, b = runs["A"][0], runs["B"][0]
    out = {"rows_a": a["rows"], "rows_b": b["rows"], "equal": a["rows"] == b["rows"]}
    if kind == "pretrain":
        out["equal"] = out["equal"] and b["tokens"] == a["tokens"] + a["rows"]
        out["check"] = "B tokens = A tokens + one EOS per document"
    return out


def growth(results: list[dict]) -> dict:
    """Per kind, from the smallest and the largest size: B's peak-memory ratio, and a straight line through B's time
    and memory (a fixed start-up part plus a part per row), extrapolated to 1M rows and to a 10 GiB file."""
    out = {}
    for kind in {r["kind"] for r in results}:
        of_kind = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["rows"])
        if len(of_kind) < 2:
            continue
        small, large = of_kind[0], of_kind[-1]
        b0, b1 = small["medians"]["B"], large["medians"]["B"]
        extra = large["rows"] - small["rows"]
        line = {key: ((b1[key] - b0[key]) / extra, b0[key] - (b1[key] - b0[key]) / extra * small["rows"])
                for key in ("seconds", "peak_tree_rss_mib", "peak_tree_anon_mib")}  # (per row, at 0 rows)
        mib_per_row = large["mib"] / large["rows"]

        def at(rows: float) -> dict:
            return {"rows": round(rows), **{key: slope * rows + start for key, (slope, start) in line.items()}}

        out[kind] = {"rows": [small["rows"], large["rows"]],
                     "peak_rss_ratio_large_over_small": b1["peak_tree_rss_mib"] / b0["peak_tree_rss_mib"],
                     "peak_anon_ratio_large_over_small": b1["peak_tree_anon_mib"] / b0["peak_tree_anon_mib"],
                     "per_1k_rows": {key: slope * 1000 for key, (slope, _) in line.items()},
                     "file_mib_per_1k_rows": mib_per_row * 1000,
                     "at_1m_rows": at(1e6), "at_10_gib_file": at(10 * 1024 / mib_per_row)}
    return out


def command_line(args, num_proc: int) -> str:
    return (f"dpo-dist bench --workload data --data-rows {args.data_rows} --data-kinds {args.data_kinds} "
            f"--num-proc {num_proc} --repeats {args.repeats} --seed {args.seed}")


def format_table(report: dict) -> str:
    lines = [f"data preparation · num_proc {report['num_proc']} · {report['repeats']} repeat(s) per side (medians)",
             f"{'kind':<9}{'rows':>8}{'MiB':>7}  {'figure':<22}{'A: datasets':>13}{'B: dpo-dist':>13}{'B/A':>7}",
             "-" * 79]
    for r in report["results"]:
        for i, (label, key) in enumerate(FIGURES):
            head = f"{r['kind']:<9}{r['rows']:>8}{r['mib']:>7.1f}  " if i == 0 else " " * 26
            a, b = r["medians"]["A"][key], r["medians"]["B"][key]
            lines.append(f"{head}{label:<22}{a:>13,.1f}{b:>13,.1f}{r['ratios'][key]:>7.2f}")
        work = r["same_work"]
        lines.append(f"{'':26}tokens: A {r['tokens']['A']:,} / B {r['tokens']['B']:,}; rows A {work['rows_a']:,} / "
                     f"B {work['rows_b']:,}; {work.get('check', 'B adds the template tokens')} → "
                     f"{'same work' if work['equal'] else 'NOT the same work'}")
    for kind, g in sorted(report["growth"].items()):
        per = g["per_1k_rows"]
        lines.append(f"{kind}: B's peak RSS at {g['rows'][1]:,} rows is {g['peak_rss_ratio_large_over_small']:.2f}× "
                     f"that at {g['rows'][0]:,} (anonymous: {g['peak_anon_ratio_large_over_small']:.2f}×); per 1,000 "
                     f"more rows ({g['file_mib_per_1k_rows']:.2f} MiB of file) B takes {per['seconds']:.2f} s more, "
                     f"{per['peak_tree_rss_mib']:+.2f} MiB RSS, {per['peak_tree_anon_mib']:+.2f} MiB anonymous")
        for label, key in (("1M rows", "at_1m_rows"), ("a 10 GiB file", "at_10_gib_file")):
            x = g[key]
            lines.append(f"  extrapolated to {label} ({x['rows']:,} rows): {x['seconds'] / 60:,.0f} min, peak RSS "
                         f"{x['peak_tree_rss_mib'] / 1024:.1f} GiB, anonymous {x['peak_tree_anon_mib'] / 1024:.1f} GiB")
    return "\n".join(lines)


def run(args) -> int:
    if args.repeats <= 0:
        print("error: --repeats must be positive", file=sys.stderr)
        return 2
    try:
        sizes = [int(s) for s in args.data_rows.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) <= 0:
        print(f"error: --data-rows {args.data_rows!r}: give positive row counts, e.g. 20000,100000", file=sys.stderr)
        return 2
    bad = [k for k in args.data_kinds.split(",") if k not in KINDS]
    if bad:
        print(f"error: --data-kinds: {', '.join(bad)} not one of {', '.join(KINDS)}", file=sys.stderr)
        return 2
    from dpo_dist.commands.bench import emit

    report = bench_prepare(args)
    emit(report, format_table(report), args.json)
    return 0 if all(r["same_work"]["equal"] for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(worker(*sys.argv[1:3]))
