"""Canonical rows → token ids + label masks, in parallel, cached on disk.

- SFT: every assistant turn is supervised (including its end-of-turn token); everything else is -100.
- DPO: system + history + prompt rendered with the chat template; the prompt is truncated from the left to
  `max_prompt_length` first, then the responses are cut so prompt + response fits `max_length`.
- Pretrain: each text + EOS, concatenated and cut into `max_length` blocks; the last, shorter block is kept.

The cache key covers the data bytes, the format options, the tokenizer, the template and the lengths, so a
second run with the same inputs reads the tokenized dataset from disk and does no tokenization.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, load_from_disk

from dpo_dist.data.formats import LoadResult, RowWarning, count_warnings, describe_warning_counts, read_source
from dpo_dist.data.render import Renderer

CACHE_VERSION = "2"  # bump when the tokenized layout changes
IGNORE = -100
SKIPPED_LOG_MAX = 50  # skipped rows logged one per line; data_report.json lists every one


@dataclass
class Prepared:
    dataset: Dataset
    report: dict = field(default_factory=dict)  # rows, skipped rows, truncations, tokens
    from_cache: bool = False


def cache_home() -> Path:
    """Where dpo-dist keeps its caches: $DPO_DIST_CACHE, else ~/.cache/dpo_dist."""
    return Path(os.environ.get("DPO_DIST_CACHE", Path.home() / ".cache" / "dpo_dist"))


def cache_root() -> Path:
    return cache_home() / "tokenized"


def _hash_path(path: Path, h) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()[:16]


def _cache_key(source: str, options: dict, tokenizer, renderer: Renderer) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    path = Path(source)
    if path.exists():
        _hash_path(path, h)
    else:  # a Hugging Face dataset: its name and split identify it (datasets keeps its own download cache)
        h.update(source.encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(renderer.fingerprint.encode())
    return h.hexdigest()[:24]


# --- per-row tokenizers (module level so datasets can pickle them for num_proc > 1) -----------------------------


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_sft(row: dict, tokenizer, renderer: Renderer, max_length: int) -> dict:
    input_ids: list[int] = []
    labels: list[int] = []
    for text, supervised in renderer.segments(renderer.prepare(row["messages"])):
        ids = _ids(tokenizer, text)
        input_ids += ids
        labels += ids if supervised else [IGNORE] * len(ids)
    truncated = len(input_ids) > max_length
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length], "truncated": truncated}


def tokenize_dpo(row: dict, tokenizer, renderer: Renderer, max_length: int, max_prompt_length: int) -> dict:
    prompt_text, (chosen_text, rejected_text) = renderer.prompt_and_completions(
        renderer.prepare(row["prompt"]), [row["chosen"], row["rejected"]]
    )
    prompt_ids = _ids(tokenizer, prompt_text)
    chosen_ids = _ids(tokenizer, chosen_text)
    rejected_ids = _ids(tokenizer, rejected_text)
    prompt_truncated = len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end: the latest turn matters most
    budget = max_length - len(prompt_ids)
    response_truncated = len(chosen_ids) > budget or len(rejected_ids) > budget
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids[:budget],
        "rejected_ids": rejected_ids[:budget],
        "truncated": prompt_truncated or response_truncated,
        "prompt_truncated": prompt_truncated,
    }


def prompt_budget(max_length: int, max_prompt_length: int | None) -> int:
    """A DPO prompt's token budget: max_prompt_length, or half of max_length when the recipe leaves it unset."""
    return max_length // 2 if max_prompt_length is None else max_prompt_length


def token_length_warnings(row: dict, kind: str, tokenizer, renderer: Renderer, max_length: int,
                          max_prompt_length: int | None = None) -> list[RowWarning]:
    """Warnings for a canonical row that tokenization would truncate (same lengths as tokenize_sft/_dpo)."""
    loc = row.get("loc", "?")
    if kind == "sft":
        n = sum(len(_ids(tokenizer, text)) for text, _ in renderer.segments(renderer.prepare(row["messages"])))
        if n > max_length:
            return [RowWarning(loc, "row", "sft_too_long",
                               f"row is {n} tokens, over max_length={max_length} (it will be truncated)")]
        return []
    if kind != "dpo":
        return []  # pretraining text is packed into blocks: nothing is cut
    max_prompt_length = prompt_budget(max_length, max_prompt_length)
    prompt_text, completions = renderer.prompt_and_completions(
        renderer.prepare(row["prompt"]), [row["chosen"], row["rejected"]])
    prompt = len(_ids(tokenizer, prompt_text))
    out = []
    if prompt > max_prompt_length:
        out.append(RowWarning(loc, "prompt", "prompt_too_long",
                              f"prompt is {prompt} tokens, longer than max_prompt_length={max_prompt_length} "
                              "(it will be truncated from the left)"))
    kept = min(prompt, max_prompt_length)
    (chosen, rejected) = (len(_ids(tokenizer, text)) for text in completions)
    side, longest = ("chosen", chosen) if chosen >= rejected else ("rejected", rejected)
    if kept + longest > max_length:
        out.append(RowWarning(loc, side, "response_truncated",
                              f"prompt + {side} response is {kept + longest} tokens, over max_length={max_length} "
                              f"(the response will be cut to {max_length - kept} tokens)"))
    return out


def tokenize_text(row: dict, tokenizer) -> dict:
    ids = _ids(tokenizer, row["text"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)  # documents are separated by EOS in the packed stream
    return {"input_ids": ids}


def pack_blocks(token_lists: list[list[int]], block: int) -> list[list[int]]:
    stream = np.fromiter((t for ids in token_lists for t in ids), dtype=np.int64)
    return [stream[i : i + block].tolist() for i in range(0, len(stream), block)]


# --- entry point ---------------------------------------------------------------------------------------------------


def _log_problems(source: str, skipped: list[str], warning_counts: dict[str, int], log) -> None:
    """One line per skipped row (capped; the data report has them all), then the warning counts."""
    for line in skipped[:SKIPPED_LOG_MAX]:
        log(f"[data] skipped {line}")
    if len(skipped) > SKIPPED_LOG_MAX:
        log(f"[data] ... and {len(skipped) - SKIPPED_LOG_MAX} more: all {len(skipped)} are listed in "
            "data_report.json")
    if warning_counts:
        total = sum(warning_counts.values())
        log(f"[data] {source}: {total} warning{'' if total == 1 else 's'} "
            f"({describe_warning_counts(warning_counts)}); `dpo-dist validate` lists them")


def _num_proc(requested: int | None, rows: int) -> int | None:
    n = requested if requested is not None else min(4, os.cpu_count() or 1)
    n = min(n, max(1, rows // 256))  # spawning workers costs more than tokenizing a small file
    return n if n > 1 else None


def prepare_dataset(
    kind: str,
    source: str,
    tokenizer,
    renderer: Renderer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    fmt: str = "auto",
    on_bad_row: str = "error",
    split: str = "train",
    max_rows: int | None = None,
    num_proc: int | None = None,
    log=print,
) -> Prepared:
    if kind == "dpo":
        max_prompt_length = prompt_budget(max_length, max_prompt_length)
    options = dict(kind=kind, fmt=fmt, on_bad_row=on_bad_row, split=split, max_rows=max_rows,
                   max_length=max_length, max_prompt_length=max_prompt_length)
    key = _cache_key(source, options, tokenizer, renderer)
    target = cache_root() / key
    if (target / "report.json").is_file():
        report = json.loads((target / "report.json").read_text())
        log(f"[data] {source}: tokenized cache hit ({report['rows']} rows) at {target}")
        _log_problems(source, report["skipped"], report.get("warnings", {}), log)
        return Prepared(load_from_disk(str(target / "dataset")), report, from_cache=True)

    loaded: LoadResult = read_source(source, kind, fmt=fmt, on_bad_row=on_bad_row, split=split)
    log(f"[data] {loaded.summary()}")
    warning_counts = count_warnings(loaded.warnings)
    _log_problems(source, [str(b) for b in loaded.skipped], warning_counts, log)
    rows = loaded.rows[:max_rows] if max_rows else loaded.rows
    raw = Dataset.from_list(rows)
    nproc = _num_proc(num_proc, len(rows))
    common = dict(num_proc=nproc, desc=f"Tokenizing {Path(source).name} ({kind})")
    if kind == "sft":
        ds = raw.map(tokenize_sft, fn_kwargs=dict(tokenizer=tokenizer, renderer=renderer, max_length=max_length),
                     remove_columns=["messages"], **common)
    elif kind == "dpo":
        ds = raw.map(tokenize_dpo, fn_kwargs=dict(tokenizer=tokenizer, renderer=renderer, max_length=max_length,
                                                  max_prompt_length=max_prompt_length),
                     remove_columns=["prompt", "chosen", "rejected"], **common)
    elif kind == "pretrain":
        tok = raw.map(tokenize_text, fn_kwargs=dict(tokenizer=tokenizer), remove_columns=["text"], **common)
        blocks = pack_blocks(tok["input_ids"], max_length)
        ds = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    else:
        raise ValueError(f"unknown data kind {kind!r}")

    report = {
        "source": source,
        "format": loaded.fmt,
        "rows": len(rows),
        "rows_read": len(loaded.rows),
        "skipped": [str(b) for b in loaded.skipped],
        "warnings": warning_counts,
        "examples": len(ds),
        "template": renderer.name,
        "eot_token": renderer.eot_token,
    }
    if "truncated" in ds.column_names:
        report["truncated"] = int(sum(ds["truncated"]))
        if report["truncated"]:
            log(f"[data] {source}: {report['truncated']} of {len(ds)} rows truncated to max_length={max_length}")
    lengths = [len(x) for x in ds["input_ids"]] if "input_ids" in ds.column_names else [
        len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    report["tokens"] = int(sum(lengths))

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp / "dataset"))
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    try:
        os.replace(tmp, target)  # atomic: a half-written cache entry is never read
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(load_from_disk(str(target / "dataset")), report)
