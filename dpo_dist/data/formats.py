"""Read SFT / DPO / pretraining data in many formats into canonical rows.

``read_source(source, kind, fmt="auto")`` reads a local ``.jsonl`` / ``.json`` /
``.parquet`` file, a directory (pretrain only) or a Hugging Face dataset and returns a
:class:`LoadResult` of canonical rows (see :mod:`dpo_dist.data.converters`). Every row
carries ``loc``: ``FILE:LINE`` (1-based physical line) for JSON lines, ``FILE#row N`` for
JSON arrays and parquet, ``NAME[split]#row N`` for Hugging Face datasets (N 0-based).

Bad rows are reported as ``"{loc}: {field}: {what}"``. With ``on_bad_row="error"`` the
first one raises :class:`DataError`; with ``"skip"`` they are collected in
``LoadResult.skipped`` and reading goes on. Problems with the source as a whole (missing
file, unparsable JSON array, unreadable parquet, zero usable rows) always raise.
"""
from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Iterator

from dpo_dist.data import converters as _conv
from dpo_dist.data.converters import RowError as _RowError

__all__ = ["read_source", "DataError", "BadRow", "LoadResult",
           "SFT_FORMATS", "DPO_FORMATS", "PRETRAIN_FORMATS"]

SFT_FORMATS = ("auto", "firefly", "openai", "sharegpt", "alpaca")
DPO_FORMATS = ("auto", "pair", "ultrafeedback")
PRETRAIN_FORMATS = ("auto", "text")

_KINDS = {"sft": SFT_FORMATS, "dpo": DPO_FORMATS, "pretrain": PRETRAIN_FORMATS}
_ON_BAD_ROW = ("error", "skip")
_FILE_EXTS = (".jsonl", ".json", ".parquet")
_DIR_EXTS = _FILE_EXTS + (".txt",)
_HF_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_LOC = re.compile(r"(.*)(?::(\d+)|#row (\d+))")
_SUMMARY_MAX = 10

Records = Iterator[tuple[str, Any]]  # (loc, decoded record or a _RowError)


class DataError(ValueError):
    """Unusable data; the message says where (``file:line``), which field, and why."""

    def __init__(self, message: str, bad_row: "BadRow | None" = None):
        super().__init__(message)
        self.bad_row = bad_row


@dataclass
class BadRow:
    loc: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.field}: {self.reason}"


@dataclass
class LoadResult:
    rows: list[dict]
    skipped: list[BadRow] = dc_field(default_factory=list)
    source: str = ""
    fmt: str = "auto"

    def summary(self) -> str:
        """One line: row count, resolved format and where/why rows were skipped."""
        text = f"{self.source}: {len(self.rows)} rows (format {self.fmt})"
        if self.skipped:
            items = [f"{self._short_loc(b.loc)} ({b.reason.split(': ', 1)[0]})"
                     for b in self.skipped[:_SUMMARY_MAX]]
            if len(self.skipped) > _SUMMARY_MAX:
                items.append(f"... and {len(self.skipped) - _SUMMARY_MAX} more")
            text += f", {len(self.skipped)} skipped: " + ", ".join(items)
        return text

    def _short_loc(self, loc: str) -> str:
        m = _LOC.fullmatch(loc)
        if not m:
            return loc
        file, line, row = m.groups()
        where = f"line {line}" if line else f"row {row}"
        name = self.source[3:] if self.source.startswith("hf:") else self.source
        if file in (self.source, name) or file.startswith(name + "["):
            return where
        prefix = os.path.join(self.source, "")
        if file.startswith(prefix):
            file = file[len(prefix):]
        return f"{file} {where}"


# ------------------------------------------------------------------------------ readers
def _utf8_error(raw: bytes, err: UnicodeDecodeError) -> _RowError:
    return _RowError("row", f"not valid UTF-8: byte 0x{raw[err.start]:02x} "
                            f"at byte {err.start + 1} of the line")


def _iter_jsonl(path: Path, name: str) -> Records:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            loc = f"{name}:{lineno}"
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield loc, _utf8_error(raw, e)
                continue
            if not line.strip():
                continue
            try:
                yield loc, json.loads(line)
            except json.JSONDecodeError as e:
                yield loc, _RowError("row", f"invalid JSON: {e.msg} at column {e.colno}")


def _iter_json(path: Path, name: str) -> Records:
    """A JSON array of objects, or (anything else) JSON lines."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    head = data.lstrip()[:1]
    if head not in (b"[", b"{"):
        return _iter_jsonl(path, name)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if head == b"{":
            return _iter_jsonl(path, name)
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{name}:{line}: row: not valid UTF-8: byte 0x{data[e.start]:02x}") from None
    if head == b"{":
        if "\n" in text.strip():
            try:
                if isinstance(json.loads(text), dict):
                    raise DataError(f"{name}: holds a single multi-line JSON object; expected "
                                    "a JSON array of objects or JSON lines (one object a line)")
            except json.JSONDecodeError:
                pass
        return _iter_jsonl(path, name)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{e.lineno}: row: invalid JSON: {e.msg} "
                        f"at column {e.colno}") from None
    return ((f"{name}#row {i}", item) for i, item in enumerate(items))


def _iter_parquet(path: Path, name: str) -> Records:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{name}: cannot read parquet file: {e}") from e
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{name}#row {i}", record
            i += 1


def _iter_txt(path: Path, name: str) -> Records:
    """A whole ``.txt`` file is one pretraining row."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield f"{name}:{line}", _RowError("row", f"not valid UTF-8: byte 0x{data[e.start]:02x}")
        return
    yield f"{name}:1", {"text": text.replace("\r\n", "\n")}


def _iter_hf(name: str, split: str) -> Records:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset, bad split, ...
        raise DataError(f"{name}: cannot load Hugging Face dataset (split {split!r}): "
                        f"{type(e).__name__}: {e}") from e
    for i, record in enumerate(ds):
        yield f"{name}[{split}]#row {i}", record


_READERS: dict[str, Callable[[Path, str], Records]] = {
    ".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet, ".txt": _iter_txt}


def _open_source(source: str, kind: str, split: str) -> list[Callable[[], Records]]:
    """One records factory per file of ``source`` (a file, a directory or an HF dataset)."""
    path = Path(source)
    if path.is_dir():
        if kind != "pretrain":
            raise DataError(f"{source}: is a directory; directories are only supported for "
                            "pretrain data (give a .jsonl, .json or .parquet file)")
        found = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in _DIR_EXTS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise DataError(f"{source}: directory holds no {', '.join(_DIR_EXTS)} files")
        return [_reader(p, os.path.join(source, rel)) for rel, p in found]
    if path.is_file():
        allowed = _DIR_EXTS if kind == "pretrain" else _FILE_EXTS
        if path.suffix.lower() not in allowed:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}; "
                            f"expected one of {', '.join(allowed)}")
        return [_reader(path, source)]
    name = source[3:] if source.startswith("hf:") else source
    if source.startswith("hf:") or (_HF_NAME.fullmatch(source)
                                    and not source.lower().endswith(_DIR_EXTS)):
        return [lambda: _iter_hf(name, split)]
    raise DataError(f"{source}: no such file or directory (and not a Hugging Face dataset "
                    "name like org/name or hf:org/name)")


def _reader(path: Path, name: str) -> Callable[[], Records]:
    return lambda: _READERS[path.suffix.lower()](path, name)


# ----------------------------------------------------------------------------- pipeline
def _check_record(record: Any, kind: str, resolved: str | None, explicit: bool) -> str:
    """Return the format to convert ``record`` with, or raise _RowError."""
    if isinstance(record, _RowError):
        raise record
    if not isinstance(record, dict):
        raise _RowError("row", f"not a JSON object: got {_conv.json_type(record)}")
    if resolved is None:
        found = _conv.detect(record, kind)
        if found is None:
            keys = ", ".join(map(str, list(record)[:20])) or "none"
            hint = _conv.detect(record)
            hint = f"; it looks like {_conv.SPECS[hint].kind} data ({hint})" if hint else ""
            raise _RowError("row", f"unknown format: keys [{keys}] match no {kind} format; "
                                   f"expected one of {_conv.describe_formats(kind)}{hint}")
        return found
    if not _conv.matches(record, resolved):
        other = _conv.detect(record, kind)
        if other is not None:
            how = "format was set to" if explicit else "the file was detected as"
            raise _RowError("row", f"format mismatch: row is in {other} format, "
                                   f"but {how} {resolved}")
    return resolved


def _read_records(records: Records, kind: str, fmt: str, on_bad_row: str,
                  rows: list[dict], skipped: list[BadRow]) -> str | None:
    """Convert one file's records into ``rows``/``skipped``; return its resolved format."""
    resolved = None if fmt == "auto" else fmt
    for loc, record in records:
        try:
            resolved = _check_record(record, kind, resolved, fmt != "auto")
            row = _conv.convert(record, resolved)
        except _RowError as e:
            bad = BadRow(loc, e.field, e.reason)
            if on_bad_row == "error":
                raise DataError(str(bad), bad) from None
            skipped.append(bad)
            continue
        row["loc"] = loc
        rows.append(row)
    return resolved


def read_source(source: str, kind: str, fmt: str = "auto", on_bad_row: str = "error",
                split: str = "train") -> LoadResult:
    """Read ``source`` as ``kind`` ("sft", "dpo" or "pretrain") data in format ``fmt``.

    ``source``: a local .jsonl / .json / .parquet file, a directory (pretrain only: every
    .jsonl/.json/.parquet/.txt below it, recursively, in sorted order, hidden paths
    excluded; a .txt file is one row), or a Hugging Face dataset ``org/name`` /
    ``hf:org/name`` loaded with ``datasets.load_dataset(name, split=split)``.
    ``fmt="auto"`` detects the format per file from the first usable row's keys.
    """
    source = os.fspath(source)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    if fmt not in _KINDS[kind]:
        raise ValueError(f"format {fmt!r} is not a {kind} format; "
                         f"choose one of {', '.join(_KINDS[kind])}")
    if on_bad_row not in _ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {', '.join(_ON_BAD_ROW)}, got {on_bad_row!r}")
    rows: list[dict] = []
    skipped: list[BadRow] = []
    resolved: list[str] = []
    for records in _open_source(source, kind, split):
        found = _read_records(records(), kind, fmt, on_bad_row, rows, skipped)
        if found is not None and found not in resolved:
            resolved.append(found)
    if not rows:
        why = (f"{len(skipped)} bad rows skipped, first: {skipped[0]}" if skipped
               else "the source holds no rows")
        raise DataError(f"{source}: no usable rows ({why})")
    return LoadResult(rows=rows, skipped=skipped, source=source, fmt="+".join(resolved))
