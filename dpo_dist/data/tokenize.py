"""Canonical rows → token ids + label masks, in parallel, cached on disk.

- SFT: each assistant turn's text after its header is supervised: the answer, its end-of-turn token, and what the
  template writes after that token in the turn (ChatML's newline); everything else (system, user and header text)
  is -100. A row with no supervised token within `max_length` is refused (`on_bad_row: error`) or left out and
  named in the report (`skip`).
- BOS: where the tokenizer's model expects one (dpo_dist.data.render.expected_bos), every SFT sequence, DPO prompt
  and pretraining document starts with exactly one.
- DPO: system + history + prompt rendered with the chat template (each completion is the same span as SFT
  supervises); the prompt is truncated from the left to
  `max_prompt_length` first, then the responses are cut so prompt + response fits `max_length`. ORPO and CPO read
  the same rows.
- KTO: one completion per row with its label (true = desirable), rendered and cut exactly as a DPO response.
- Pretrain: each text (+ BOS first, where expected) + EOS, concatenated and cut into `max_length` blocks; the last, shorter block is kept.

The pipeline streams: rows go from the source into an Arrow file a bounded batch at a time (validated on the way,
dpo_dist.data.formats.RowStream), are tokenized in batches by `data.num_proc` processes into Arrow files
(`datasets.Dataset.map`), and pretraining blocks are packed from those files as they fill. No step holds the corpus
in Python memory.

The cache key covers the data bytes, the format options, the tokenizer, the template and the lengths, so a
second run with the same inputs reads the tokenized dataset from disk and does no tokenization (dpo_dist.data.cache).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, concatenate_datasets

from dpo_dist.data import cache
from dpo_dist.data.cache import cache_home, cache_root, tokenizer_fingerprint  # noqa: F401  (public here too)
from dpo_dist.data.formats import DataError, RowStream, RowWarning, describe_warning_counts, count_warnings, no_rows_error
from dpo_dist.data.render import Renderer, TemplateError

IGNORE = -100
SKIPPED_LOG_MAX = 50  # skipped rows logged one per line; data_report.json lists every one
ROWS_BATCH = 1000  # rows per Arrow record batch, and per tokenizer call
SMALL_FILE_ROWS = 256  # below this many rows per process, spawning workers costs more than it saves

_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
ROW_SCHEMAS = {  # canonical rows (dpo_dist.data.converters) as Arrow
    "sft": pa.schema([("messages", _MESSAGES), ("loc", pa.string())]),
    "dpo": pa.schema([("prompt", _MESSAGES), ("chosen", pa.string()), ("rejected", pa.string()),
                      ("loc", pa.string())]),
    "kto": pa.schema([("prompt", _MESSAGES), ("completion", pa.string()), ("label", pa.bool_()),
                      ("loc", pa.string())]),
    "pretrain": pa.schema([("text", pa.string()), ("loc", pa.string())]),
}
_IDS = pa.list_(pa.int32())


@dataclass
class Prepared:
    dataset: Dataset
    report: dict = field(default_factory=dict)  # rows, skipped rows, truncations, tokens
    from_cache: bool = False
    path: Path | None = None  # the cache entry


# --- tokenizers: batched (one tokenizer call per batch of rows); module level so datasets can pickle them -------


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]``; for a fast tokenizer, straight from its Rust
    backend, which skips building a BatchEncoding (tests/test_data_pipeline.py checks the ids are the same)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    # transformers leaves the padding and truncation of its last call set on the backend (a padded generate batch,
    # say), and sets split_special_tokens on it per call; it resets them only inside its own call. So the backend is
    # used directly only while it is in the state that call would put it in.
    if (backend is not None and backend.padding is None and backend.truncation is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_sft(conversations: list[list[dict]], tokenizer, renderer: Renderer, max_length: int) -> pa.Table:
    """Token ids and labels for each conversation, as an Arrow table (input_ids, labels, truncated, supervised).

    Each segment of the template is tokenized on its own; the rows are then assembled with array operations, so no
    Python work is done per token. ``supervised``: some assistant token falls within ``max_length``."""
    segments = [renderer.segments(renderer.prepare(messages)) for messages in conversations]
    pieces = pa.array(_encode(tokenizer, [text for segs in segments for text, _ in segs]), type=_IDS)
    values = pieces.values.to_numpy(zero_copy_only=False)
    offsets = pieces.offsets.to_numpy()
    is_assistant = np.fromiter((sup for segs in segments for _, sup in segs), dtype=bool, count=len(pieces))
    labels = np.where(np.repeat(is_assistant, np.diff(offsets)), values, IGNORE).astype(np.int32)
    # Token offsets of each row: its segments are consecutive.
    row_offsets = offsets[np.concatenate([[0], np.cumsum([len(segs) for segs in segments])])]
    lengths = np.diff(row_offsets)
    kept = np.minimum(lengths, max_length)
    starts = np.concatenate([[0], np.cumsum(kept)])
    take = np.repeat(row_offsets[:-1] - starts[:-1], kept) + np.arange(starts[-1])  # the first max_length tokens
    kept_labels = labels[take]
    out_offsets = pa.array(starts.astype(np.int32))
    supervised = np.zeros(len(segments), dtype=bool)
    has_tokens = kept > 0
    supervised[has_tokens] = np.add.reduceat(kept_labels != IGNORE, starts[:-1][has_tokens]) > 0
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(out_offsets, pa.array(values[take], pa.int32())),
        "labels": pa.ListArray.from_arrays(out_offsets, pa.array(kept_labels, pa.int32())),
        "truncated": pa.array(lengths > max_length),
        "supervised": pa.array(supervised),
    })


def _cut(prompt_ids: list[int], completions: list[list[int]], max_length: int, max_prompt_length: int,
         bos: int | None) -> dict:
    """A preference row's prompt cut from the left to max_prompt_length (keeping the model's BOS), then each
    completion cut so prompt + completion fits max_length."""
    prompt_truncated = len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        # Keep the end (the latest turn matters most), and the sequence's BOS where the model expects one.
        keep = max_prompt_length - (bos is not None)
        prompt_ids = ([bos] if bos is not None else []) + prompt_ids[len(prompt_ids) - keep:]
    budget = max_length - len(prompt_ids)
    return {"prompt_ids": prompt_ids, "completions": [ids[:budget] for ids in completions],
            "truncated": prompt_truncated or any(len(ids) > budget for ids in completions),
            "prompt_truncated": prompt_truncated}


def _preference_texts(rows: list[dict], sides: tuple[str, ...], renderer: Renderer) -> list[str]:
    """Per row: the rendered prompt, then each completion in ``sides``."""
    texts = []
    for row in rows:
        prompt_text, completions = renderer.prompt_and_completions(renderer.prepare(row["prompt"]),
                                                                   [row[side] for side in sides])
        texts += [prompt_text, *completions]
    return texts


def _encode_preference(rows: list[dict], sides: tuple[str, ...], tokenizer, renderer: Renderer, max_length: int,
                       max_prompt_length: int) -> list[dict]:
    """Each row's prompt (system + history + prompt, with the chat template) and its completions ``sides``, each
    completion the same span SFT supervises."""
    ids = _encode(tokenizer, _preference_texts(rows, sides, renderer))
    bos = tokenizer.convert_tokens_to_ids(renderer.bos) if renderer.bos else None
    width = 1 + len(sides)
    return [_cut(ids[width * k], ids[width * k + 1: width * k + width], max_length, max_prompt_length, bos)
            for k in range(len(rows))]


def encode_dpo(rows: list[dict], tokenizer, renderer: Renderer, max_length: int, max_prompt_length: int) -> list[dict]:
    out = []
    for cut in _encode_preference(rows, ("chosen", "rejected"), tokenizer, renderer, max_length, max_prompt_length):
        chosen, rejected = cut.pop("completions")
        out.append({**cut, "chosen_ids": chosen, "rejected_ids": rejected})
    return out


def encode_kto(rows: list[dict], tokenizer, renderer: Renderer, max_length: int, max_prompt_length: int) -> list[dict]:
    """KTO's unpaired rows: prompt_ids, completion_ids and the label (true = desirable), cut as DPO's are."""
    out = []
    for row, cut in zip(rows, _encode_preference(rows, ("completion",), tokenizer, renderer, max_length,
                                                 max_prompt_length)):
        (completion,) = cut.pop("completions")
        out.append({**cut, "completion_ids": completion, "label": row["label"]})
    return out


def tokenize_sft(row: dict, tokenizer, renderer: Renderer, max_length: int) -> dict:
    return encode_sft([row["messages"]], tokenizer, renderer, max_length).drop(["supervised"]).to_pylist()[0]


def tokenize_dpo(row: dict, tokenizer, renderer: Renderer, max_length: int, max_prompt_length: int) -> dict:
    return encode_dpo([row], tokenizer, renderer, max_length, max_prompt_length)[0]


def tokenize_kto(row: dict, tokenizer, renderer: Renderer, max_length: int, max_prompt_length: int) -> dict:
    return encode_kto([row], tokenizer, renderer, max_length, max_prompt_length)[0]


def _table(rows: list[dict], locs: list[str], columns: dict[str, pa.DataType]) -> pa.Table:
    """Rows as an Arrow table with exact column types (cheaper than letting datasets infer them)."""
    arrays = {name: pa.array([r[name] for r in rows], type=typ) for name, typ in columns.items()}
    arrays["loc"] = pa.array(locs, type=pa.string())
    return pa.table(arrays)


_DPO_COLUMNS = {"prompt_ids": _IDS, "chosen_ids": _IDS, "rejected_ids": _IDS, "truncated": pa.bool_(),
                "prompt_truncated": pa.bool_()}
_KTO_COLUMNS = {"prompt_ids": _IDS, "completion_ids": _IDS, "label": pa.bool_(), "truncated": pa.bool_(),
                "prompt_truncated": pa.bool_()}


def _located(batch: dict, render_one, encode):
    """``encode()``; when the chat template refuses a row, a DataError naming the first such row's location."""
    try:
        return encode()
    except TemplateError as err:
        for k, loc in enumerate(batch["loc"]):
            try:
                render_one(k)
            except TemplateError as row_err:
                raise DataError(f"{loc}: {row_err}; fix or drop the row, or choose another `model.template`") from None
        raise DataError(f"{batch['loc'][0]}: {err}") from None


def _sft_batch(batch: dict, tokenizer, renderer: Renderer, max_length: int) -> pa.Table:
    # ``supervised`` stays: a row whose assistant tokens all fall past max_length teaches nothing, and _build reports
    # it by its location (TRL would drop it without a word) before leaving it out.
    table = _located(batch, lambda k: renderer.segments(renderer.prepare(batch["messages"][k])),
                     lambda: encode_sft(batch["messages"], tokenizer, renderer, max_length))
    return table.append_column("loc", pa.array(batch["loc"], pa.string()))


def _supervised_only(table: pa.Table) -> pa.Table:
    return table.filter(table.column("supervised"))


def _dpo_batch(batch: dict, tokenizer, renderer: Renderer, max_length: int, max_prompt_length: int) -> pa.Table:
    rows = [{"prompt": p, "chosen": c, "rejected": r}
            for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"])]
    encoded = _located(batch, lambda k: renderer.prompt_and_completions(renderer.prepare(rows[k]["prompt"]),
                                                                        [rows[k]["chosen"], rows[k]["rejected"]]),
                       lambda: encode_dpo(rows, tokenizer, renderer, max_length, max_prompt_length))
    return _table(encoded, batch["loc"], _DPO_COLUMNS)


def _kto_batch(batch: dict, tokenizer, renderer: Renderer, max_length: int, max_prompt_length: int) -> pa.Table:
    rows = [{"prompt": p, "completion": c, "label": y}
            for p, c, y in zip(batch["prompt"], batch["completion"], batch["label"])]
    encoded = _located(batch, lambda k: renderer.prompt_and_completions(renderer.prepare(rows[k]["prompt"]),
                                                                        [rows[k]["completion"]]),
                       lambda: encode_kto(rows, tokenizer, renderer, max_length, max_prompt_length))
    return _table(encoded, batch["loc"], _KTO_COLUMNS)


def _text_batch(batch: dict, tokenizer, bos: str | None = None) -> pa.Table:
    """Each document's ids, starting with one BOS where the model expects one, ending with EOS (which separates
    documents in the packed stream)."""
    ids = _encode(tokenizer, batch["text"])
    bos_id = tokenizer.convert_tokens_to_ids(bos) if bos else None
    eos_id = tokenizer.eos_token_id
    if bos_id is not None or eos_id is not None:
        ids = [([bos_id] if bos_id is not None and piece[:1] != [bos_id] else []) + piece
               + ([eos_id] if eos_id is not None else []) for piece in ids]
    return pa.table({"input_ids": pa.array(ids, type=_IDS)})


def prompt_budget(max_length: int, max_prompt_length: int | None) -> int:
    """A DPO prompt's token budget: max_prompt_length, or half of max_length when the recipe leaves it unset."""
    return max_length // 2 if max_prompt_length is None else max_prompt_length


def token_length_warnings(rows: list[dict], kind: str, tokenizer, renderer: Renderer, max_length: int,
                          max_prompt_length: int | None = None) -> list[RowWarning]:
    """Warnings for the canonical rows that tokenization would truncate (same lengths as encode_sft/_dpo), with one
    tokenizer call for the whole batch."""
    if kind == "sft":
        segments = [renderer.segments(renderer.prepare(row["messages"])) for row in rows]
        lengths = iter([len(ids) for ids in _encode(tokenizer, [text for segs in segments for text, _ in segs])])
        out = []
        for row, segs in zip(rows, segments):
            n, first_supervised = 0, None
            for _, is_assistant in segs:
                size = next(lengths)
                if is_assistant and size and first_supervised is None:
                    first_supervised = n
                n += size
            if n <= max_length:
                continue
            if first_supervised is None or first_supervised >= max_length:
                out.append(RowWarning(row.get("loc", "?"), "row", "no_supervised_tokens",
                                      f"row is {n} tokens, over max_length={max_length}, and no assistant token falls "
                                      "within it, so training leaves the row out"))
            else:
                out.append(RowWarning(row.get("loc", "?"), "row", "sft_too_long",
                                      f"row is {n} tokens, over max_length={max_length} (it will be truncated)"))
        return out
    if kind not in ("dpo", "kto"):
        return []  # pretraining text is packed into blocks: nothing is cut
    max_prompt_length = prompt_budget(max_length, max_prompt_length)
    sides = ("chosen", "rejected") if kind == "dpo" else ("completion",)
    lengths = [len(ids) for ids in _encode(tokenizer, _preference_texts(rows, sides, renderer))]
    width = 1 + len(sides)
    out = []
    for k, row in enumerate(rows):
        loc = row.get("loc", "?")
        prompt, completions = lengths[width * k], lengths[width * k + 1: width * k + width]
        if prompt > max_prompt_length:
            out.append(RowWarning(loc, "prompt", "prompt_too_long",
                                  f"prompt is {prompt} tokens, longer than max_prompt_length={max_prompt_length} "
                                  "(it will be truncated from the left)"))
        kept = min(prompt, max_prompt_length)
        longest = max(completions)
        side = sides[completions.index(longest)]
        if kept + longest > max_length:
            what, noun, cut = (("response_truncated", f"{side} response", "response") if kind == "dpo"
                               else ("completion_truncated", "completion", "completion"))
            out.append(RowWarning(loc, side, what,
                                  f"prompt + {noun} is {kept + longest} tokens, over max_length="
                                  f"{max_length} (the {cut} will be cut to {max_length - kept} tokens)"))
    return out


class BlockPacker:
    """Cuts a stream of token ids into ``block``-token blocks as it arrives: memory is one block plus one batch."""

    def __init__(self, block: int):
        self.block = block
        self._carry = np.empty(0, dtype=np.int32)

    def add(self, ids: np.ndarray) -> np.ndarray:
        """Append ``ids``; return the blocks completed so far, as a [n, block] array."""
        stream = np.concatenate([self._carry, ids.astype(np.int32, copy=False)])
        full = len(stream) // self.block * self.block
        self._carry = stream[full:]
        return stream[:full].reshape(-1, self.block)

    def finish(self) -> np.ndarray:
        """The last, shorter block (kept), or an empty array."""
        rest, self._carry = self._carry, np.empty(0, dtype=np.int32)
        return rest


def pack_blocks(token_lists: list[list[int]], block: int) -> list[list[int]]:
    packer = BlockPacker(block)
    blocks = [b.tolist() for ids in token_lists for b in packer.add(np.asarray(ids, dtype=np.int32))]
    rest = packer.finish()
    return blocks + ([rest.tolist()] if len(rest) else [])


def _write_blocks(tokenized: Dataset, block: int, path: Path, progress) -> None:
    """Pack the ``input_ids`` of ``tokenized`` into blocks, written to an Arrow file batch by batch."""
    schema = pa.schema([("input_ids", _IDS), ("labels", _IDS)])
    packer = BlockPacker(block)

    def write(writer, blocks: list[np.ndarray]) -> None:
        if not blocks:
            return
        lengths = np.array([len(b) for b in blocks], dtype=np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        ids = pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(blocks), pa.int32()))
        writer.write_table(pa.table({"input_ids": ids, "labels": ids}, schema=schema))

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for table in tokenized.with_format("arrow").iter(batch_size=ROWS_BATCH):
            flat = pc.list_flatten(table.column("input_ids")).to_numpy()
            write(writer, list(packer.add(flat)))
            progress(table.num_rows)
        rest = packer.finish()
        write(writer, [rest] if len(rest) else [])


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


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _num_proc(requested: int | None, rows: int) -> int | None:
    n = requested if requested is not None else cores()
    n = min(n, max(1, rows // SMALL_FILE_ROWS))  # spawning workers costs more than tokenizing a small file
    return n if n > 1 else None


class _Progress:
    """A tqdm bar when stderr is a terminal or progress is forced; a no-op otherwise."""

    def __init__(self, desc: str, unit: str, show: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=desc, unit=unit, unit_scale=True, disable=not show, mininterval=1.0)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _write_rows(stream: RowStream, kind: str, path: Path, max_rows: int | None, show: bool) -> int:
    """Stream the usable rows into an Arrow file; every row is read (and checked) even past ``max_rows``."""
    schema = ROW_SCHEMAS[kind]
    written, batch = 0, []
    progress = _Progress(f"Reading {Path(stream.source).name}", " rows", show)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for read, row in enumerate(stream, 1):
            if read % ROWS_BATCH == 0:
                progress(ROWS_BATCH)
            if max_rows is not None and written + len(batch) >= max_rows:
                continue
            batch.append(row)
            if len(batch) == ROWS_BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                written, batch = written + len(batch), []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            written += len(batch)
    progress.close()
    return written


def _leave_out_unsupervised(ds: Dataset, source: str, n: int, max_length: int, on_bad_row: str, tmp: Path,
                            log) -> tuple[list[str], Dataset]:
    """SFT rows with no assistant token within max_length teach nothing: refused under on_bad_row error, else left
    out, each named by its location in the log (capped) and in the report."""
    supervised = ds.data.column("supervised")
    if pc.all(supervised).as_py() is not False:
        return [], ds
    locs = ds.data.column("loc").filter(pc.invert(supervised)).to_pylist()
    why = f"no assistant token falls within max_length={max_length}"
    if on_bad_row == "error":
        more = f" (and {len(locs) - 1} more rows)" if len(locs) > 1 else ""
        raise DataError(f"{locs[0]}: {why}{more}; raise max_length, or set data.on_bad_row: skip to leave such rows "
                        "out (`dpo-dist validate` lists them)")
    if len(locs) == n:
        raise DataError(f"{source}: no row has an assistant token within max_length={max_length}; raise max_length "
                        "(`dpo-dist validate` lists the rows over it)")
    for loc in locs[:SKIPPED_LOG_MAX]:
        log(f"[data] left out {loc}: {why}")
    if len(locs) > SKIPPED_LOG_MAX:
        log(f"[data] ... and {len(locs) - SKIPPED_LOG_MAX} more: all {len(locs)} are listed in data_report.json")
    log(f"[data] {source}: {len(locs)} of {n} rows left out: {why}")
    kept = ds.with_format("arrow").map(_supervised_only, batched=True, batch_size=ROWS_BATCH,
                                       cache_file_name=str(tmp / "supervised.arrow"), load_from_cache_file=False,
                                       desc="Leaving out unsupervised rows")
    return locs, kept.with_format(None)


def _list_tokens(ds: Dataset, column: str) -> int:
    return int(pc.sum(pc.list_value_length(ds.data.column(column))).as_py() or 0)


def _build(tmp: Path, kind: str, source: str, tokenizer, renderer: Renderer, *, max_length: int,
           max_prompt_length: int | None, fmt: str, on_bad_row: str, split: str, max_rows: int | None,
           num_proc: int | None, log, show_progress: bool) -> dict:
    """Tokenize ``source`` into the directory ``tmp``; return the entry's report."""
    started = time.time()
    tmp.mkdir(parents=True)
    stream = RowStream(source, kind, fmt=fmt, on_bad_row=on_bad_row, split=split)
    n = _write_rows(stream, kind, tmp / "rows.arrow", max_rows, show_progress)
    loaded = stream.result()
    del stream  # frees the reader's duplicate index before the tokenizing workers are forked with a copy of it
    log(f"[data] {loaded.summary()}")
    warning_counts = count_warnings(loaded.warnings)
    _log_problems(source, [str(b) for b in loaded.skipped], warning_counts, log)
    if not n:
        raise no_rows_error(loaded)

    raw = Dataset.from_file(str(tmp / "rows.arrow"))
    common = dict(batched=True, batch_size=ROWS_BATCH, num_proc=_num_proc(num_proc, n), load_from_cache_file=False,
                  cache_file_name=str(tmp / "tokens.arrow"), desc=f"Tokenizing {Path(source).name} ({kind})")
    if kind == "sft":
        ds = raw.map(_sft_batch, fn_kwargs=dict(tokenizer=tokenizer, renderer=renderer, max_length=max_length),
                     remove_columns=raw.column_names, **common)
    elif kind == "dpo":
        ds = raw.map(_dpo_batch, fn_kwargs=dict(tokenizer=tokenizer, renderer=renderer, max_length=max_length,
                                                max_prompt_length=max_prompt_length),
                     remove_columns=raw.column_names, **common)
    elif kind == "kto":
        ds = raw.map(_kto_batch, fn_kwargs=dict(tokenizer=tokenizer, renderer=renderer, max_length=max_length,
                                                max_prompt_length=max_prompt_length),
                     remove_columns=raw.column_names, **common)
    elif kind == "pretrain":
        tok = raw.map(_text_batch, fn_kwargs=dict(tokenizer=tokenizer, bos=renderer.bos),
                      remove_columns=raw.column_names, **common)
        progress = _Progress(f"Packing {Path(source).name}", " docs", show_progress)
        _write_blocks(tok, max_length, tmp / "blocks.arrow", progress)
        progress.close()
        ds = Dataset.from_file(str(tmp / "blocks.arrow"))
    else:
        raise ValueError(f"unknown data kind {kind!r}")

    left_out = []
    if kind == "sft":
        left_out, ds = _leave_out_unsupervised(ds, source, n, max_length, on_bad_row, tmp, log)
    report = {
        "source": source,
        "format": loaded.fmt,
        "rows": n,
        "rows_read": loaded.n_rows,
        "skipped": [str(b) for b in loaded.skipped],
        "warnings": warning_counts,
        "examples": len(ds),
        "template": renderer.choice.as_dict(),
        "eot_token": renderer.eot_token,
        "bos_token": renderer.bos,
    }
    if kind == "sft":
        report["no_supervised_tokens"] = left_out
    if "truncated" in ds.column_names:
        report["truncated"] = int(pc.sum(ds.data.column("truncated")).as_py() or 0)
        if report["truncated"]:
            log(f"[data] {source}: {report['truncated']} of {len(ds)} rows truncated to max_length={max_length}")
    columns = {"dpo": ["prompt_ids", "chosen_ids", "rejected_ids"], "kto": ["prompt_ids", "completion_ids"]}.get(
        kind, ["input_ids"])
    report["tokens"] = sum(_list_tokens(ds, c) for c in columns)
    report["files"] = sorted({Path(f["filename"]).name for f in ds.cache_files})
    del ds, raw
    for name in ("rows.arrow", *(["tokens*.arrow"] if kind == "pretrain" or left_out else [])):
        for f in tmp.glob(name):
            f.unlink()
    report["seconds"] = round(time.time() - started, 2)
    return report


def _load(entry: cache.Entry, report: dict) -> Dataset:
    parts = [Dataset.from_file(str(entry.path / name)) for name in report["files"]]
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return ds.remove_columns(["supervised"]) if "supervised" in ds.column_names else ds


def summary_line(report: dict, path: Path) -> str:
    """One line per source: rows, skipped, truncated, tokens, where, and how long it took."""
    return (f"[data] {report['source']}: {report['rows']} rows, {len(report['skipped'])} skipped, "
            f"{report.get('truncated', 0)} truncated, {report['tokens']} tokens -> {path} "
            f"({report.get('seconds', 0):.1f} s)")


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
    wait_log=None,
    show_progress: bool | None = None,
) -> Prepared:
    """Tokenize ``source`` into the cache (or read it from there). ``wait_log`` gets the lines of a process that
    waits while another builds the same entry (default ``log``); progress bars show when stderr is a terminal."""
    if kind in ("dpo", "kto"):
        max_prompt_length = prompt_budget(max_length, max_prompt_length)
    options = dict(kind=kind, fmt=fmt, on_bad_row=on_bad_row, split=split, max_rows=max_rows,
                   max_length=max_length, max_prompt_length=max_prompt_length)
    entry = cache.Entry(cache.cache_key(source, options, tokenizer, renderer.fingerprint), source)
    show = os.isatty(2) if show_progress is None else show_progress

    def build(tmp: Path) -> dict:
        return _build(tmp, kind, source, tokenizer, renderer, max_length=max_length,
                      max_prompt_length=max_prompt_length, fmt=fmt, on_bad_row=on_bad_row, split=split,
                      max_rows=max_rows, num_proc=num_proc, log=log, show_progress=show)

    report, from_cache = entry.get(build, log=wait_log or log)
    if from_cache:
        log(f"[data] {source}: tokenized cache hit ({report['rows']} rows) at {entry.path}")
        _log_problems(source, report["skipped"], report.get("warnings", {}), log)
    log(summary_line(report, entry.path))
    return Prepared(_load(entry, report), report, from_cache=from_cache, path=entry.path)
