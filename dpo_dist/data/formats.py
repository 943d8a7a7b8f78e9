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

Suspicious but usable rows (duplicates, a byte order mark, CRLF line ends, ignored keys,
one DPO response a prefix of the other) are kept and listed in ``LoadResult.warnings``.
A JSON line longer than ``$DPO_DIST_MAX_LINE_BYTES`` (default 64 MiB) is a bad row; it is
skipped without ever being held in memory whole.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Iterator

from dpo_dist.data import converters as _conv
from dpo_dist.data.converters import RowError as _RowError

__all__ = ["read_source", "scan_source", "RowStream", "no_rows_error", "check_source", "DataError", "BadRow", "RowWarning",
           "LoadResult", "FORMATS", "SFT_FORMATS", "DPO_FORMATS", "KTO_FORMATS", "PRETRAIN_FORMATS", "WARNING_KINDS",
           "count_warnings", "describe_warning_counts", "max_line_bytes"]

SFT_FORMATS = ("auto", "firefly", "openai", "sharegpt", "alpaca")
DPO_FORMATS = ("auto", "pair", "ultrafeedback")
KTO_FORMATS = ("auto", "unpaired")
PRETRAIN_FORMATS = ("auto", "text")

# data kind -> its formats (orpo and cpo stages read dpo data: StageConfig.data_kind)
FORMATS = {"sft": SFT_FORMATS, "dpo": DPO_FORMATS, "kto": KTO_FORMATS, "pretrain": PRETRAIN_FORMATS}
_ON_BAD_ROW = ("error", "skip")
_FILE_EXTS = (".jsonl", ".json", ".parquet")
_DIR_EXTS = _FILE_EXTS + (".txt",)
_HF_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_LOC = re.compile(r"(.*)(?::(\d+)|#row (\d+))")
_TRAILING_NUMBER = re.compile(r"\d{1,15}$")  # a loc's line or row number
_NUMBER_BITS = 50
_SUMMARY_MAX = 10
MAX_LINE_ENV = "DPO_DIST_MAX_LINE_BYTES"
_DEFAULT_MAX_LINE = 64 << 20
_CHUNK = 1 << 20

# Warning kind -> (singular, plural) label used in counted summaries.
WARNING_KINDS = {
    "duplicate": ("duplicate row", "duplicate rows"),
    "bom": ("file starting with a byte order mark", "files starting with a byte order mark"),
    "crlf": ("file with CRLF line ends", "files with CRLF line ends"),
    "unknown_key": ("unknown key ignored", "unknown keys ignored"),
    "dpo_prefix": ("response that is a prefix of the other", "responses that are a prefix of the other"),
    "prompt_too_long": ("prompt longer than max_prompt_length", "prompts longer than max_prompt_length"),
    "response_truncated": ("prompt+response over max_length", "prompt+responses over max_length"),
    "completion_truncated": ("prompt+completion over max_length", "prompt+completions over max_length"),
    "sft_too_long": ("row over max_length", "rows over max_length"),
    "no_supervised_tokens": ("row with no assistant token within max_length (left out)",
                             "rows with no assistant token within max_length (left out)"),
}

Records = Iterator[tuple[str, Any]]  # (loc, decoded record, a _RowError or a RowWarning)


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
class RowWarning:
    """A usable but suspicious row (or file); ``kind`` is a key of :data:`WARNING_KINDS`."""
    loc: str
    field: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.field}: warning: {self.reason}"


def count_warnings(warnings: list[RowWarning]) -> dict[str, int]:
    """Warnings per kind, in order of first appearance."""
    counts: dict[str, int] = {}
    for w in warnings:
        counts[w.kind] = counts.get(w.kind, 0) + 1
    return counts


def describe_warning_counts(counts: dict[str, int]) -> str:
    """``"3 duplicate rows, 1 file with CRLF line ends"``."""
    parts = []
    for kind, n in counts.items():
        one, many = WARNING_KINDS.get(kind, (kind, kind))
        parts.append(f"{n} {one if n == 1 else many}")
    return ", ".join(parts)


@dataclass
class LoadResult:
    rows: list[dict]
    skipped: list[BadRow] = dc_field(default_factory=list)
    source: str = ""
    fmt: str = "auto"
    warnings: list[RowWarning] = dc_field(default_factory=list)
    count: int | None = None  # usable rows, when they were streamed instead of kept in ``rows``

    @property
    def n_rows(self) -> int:
        return len(self.rows) if self.count is None else self.count

    def warning_summary(self) -> str:
        """``"7 warnings (3 duplicate rows, 4 ...)"``, or "" when there are none."""
        if not self.warnings:
            return ""
        n = len(self.warnings)
        return (f"{n} warning{'' if n == 1 else 's'} "
                f"({describe_warning_counts(count_warnings(self.warnings))})")

    def summary(self) -> str:
        """One line: row count, resolved format and where/why rows were skipped."""
        text = f"{self.source}: {self.n_rows} rows (format {self.fmt})"
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


def _loc_relative_to(loc: str, here: str) -> str:
    """``loc`` as "line K" / "row K" when it is in the same file as ``here``, else in full."""
    m, h = _LOC.fullmatch(loc), _LOC.fullmatch(here)
    if not m or not h or m.group(1) != h.group(1):
        return loc
    return f"line {m.group(2)}" if m.group(2) else f"row {m.group(3)}"


# ------------------------------------------------------------------------------ readers
def _utf8_error(raw: bytes, err: UnicodeDecodeError) -> _RowError:
    return _RowError("row", f"not valid UTF-8: byte 0x{raw[err.start]:02x} "
                            f"at byte {err.start + 1} of the line")


def max_line_bytes() -> int:
    """The longest JSON line accepted, from ``$DPO_DIST_MAX_LINE_BYTES`` (read on every call)."""
    raw = os.environ.get(MAX_LINE_ENV, "").strip()
    if not raw:
        return _DEFAULT_MAX_LINE
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise DataError(f"{MAX_LINE_ENV}={raw!r}: expected a positive number of bytes")
    return limit


def _discard_rest_of_line(f, head: bytes) -> int:
    """Read past the rest of a line whose first bytes were ``head``, in bounded chunks.

    Returns the whole line's size in bytes, without its line end."""
    size, tail = len(head), head[-1:]
    while chunk := f.readline(_CHUNK):
        size += len(chunk)
        if chunk.endswith(b"\n"):
            return size - (2 if (tail + chunk).endswith(b"\r\n") else 1)
        tail = chunk[-1:]
    return size


def _bom_warning(loc: str) -> RowWarning:
    return RowWarning(loc, "row", "bom", "file starts with a UTF-8 byte order mark (accepted; "
                                         "some tools read it as part of the first key)")


def _json_error(e: json.JSONDecodeError, line: str, cut: bool) -> _RowError:
    if line[e.pos:e.pos + 1] == "\ufeff":
        return _RowError("row", f"byte order mark inside the file at column {e.colno} "
                                "(bytes EF BB BF): concatenated files?")
    # json's "Unterminated string starting at" already ends with "at"
    reason = f"invalid JSON: {e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno}"
    if cut and (e.msg.startswith("Unterminated") or e.pos >= len(line.rstrip()) - 1):
        reason += "; the file ends in the middle of this line (truncated file?)"
    return _RowError("row", reason)


def _iter_jsonl(path: Path, name: str) -> Records:
    limit = max_line_bytes()
    crlf, first_crlf, lineno = 0, "", 0
    with open(path, "rb") as f:
        # readline(limit + 1) never holds more than the limit: a longer line is detected by
        # its missing newline and the rest of it is read past in chunks.
        while raw := f.readline(limit + 1):
            lineno += 1
            loc = f"{name}:{lineno}"
            if len(raw) > limit and not raw.endswith(b"\n"):
                size = _discard_rest_of_line(f, raw)
                if size > limit:
                    yield loc, _RowError("row", f"line is {size} bytes, over the {limit}-byte "
                                                f"limit ({MAX_LINE_ENV})")
                    continue
                raw += b"\n"  # exactly at the limit, ending in CRLF: only the "\n" was left
            if raw.endswith(b"\r\n"):
                crlf += 1
                first_crlf = first_crlf or loc
            if raw.startswith(codecs.BOM_UTF8):
                if lineno > 1:
                    yield loc, _RowError("row", "byte order mark inside the file: the line starts "
                                                "with bytes EF BB BF; concatenated files?")
                    continue
                yield loc, _bom_warning(loc)
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield loc, _utf8_error(raw, e)
                continue
            if not line.strip():
                continue
            line = line.rstrip("\r\n")  # so an error at the end of the line gets this line's column
            try:
                yield loc, json.loads(line)
            except json.JSONDecodeError as e:
                yield loc, _json_error(e, line, cut=not raw.endswith(b"\n"))
    if crlf:
        yield first_crlf, RowWarning(first_crlf, "row", "crlf",
                                     f"{crlf} of {lineno} lines end with CRLF (Windows line ends); "
                                     "accepted, first here")


def _first_byte(path: Path) -> tuple[bytes, bool]:
    """The first byte after a BOM and whitespace (b"" if none), and whether there is a BOM."""
    with open(path, "rb") as f:
        start = f.read(len(codecs.BOM_UTF8))
        bom = start == codecs.BOM_UTF8
        chunk = b"" if bom else start
        while True:
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1], bom
            chunk = f.read(_CHUNK)
            if not chunk:
                return b"", bom


def _iter_json(path: Path, name: str) -> Records:
    """A JSON array of objects, or (anything else) JSON lines."""
    head, bom = _first_byte(path)
    if head == b"[":
        return _iter_json_array(path, name, bom)
    # JSON lines are streamed; only a file small enough to be one line is checked for
    # being a single multi-line object, so a huge file is never read whole for that.
    if head != b"{" or path.stat().st_size > max_line_bytes():
        return _iter_jsonl(path, name)
    data = path.read_bytes()
    if bom:
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return _iter_jsonl(path, name)
    if "\n" in text.strip():
        try:
            if isinstance(json.loads(text), dict):
                raise DataError(f"{name}: holds a single multi-line JSON object; expected "
                                "a JSON array of objects or JSON lines (one object a line)")
        except json.JSONDecodeError:
            pass
    return _iter_jsonl(path, name)


def _array_error(path: Path, name: str, bom: bool, line: int, what: str) -> DataError:
    """The error for a JSON array that does not parse. For a file up to the line limit, json's own message for the
    whole text (line and column exact); past it, the line where the streaming parse stopped."""
    if path.stat().st_size <= max_line_bytes():
        data = path.read_bytes()[len(codecs.BOM_UTF8) if bom else 0:]
        try:
            json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            return DataError(f"{name}:{line}: row: not valid UTF-8: byte 0x{data[e.start]:02x}")
        except json.JSONDecodeError as e:
            return DataError(f"{name}:{e.lineno}: row: invalid JSON: {e.msg} at column {e.colno}")
    return DataError(f"{name}:{line}: row: invalid JSON: {what}")


_WS = re.compile(r"[ \t\n\r]*")


def _iter_json_array(path: Path, name: str, bom: bool) -> Records:
    """The items of a top-level JSON array, decoded one at a time from a window of the file, never the whole text:
    an array of millions of rows streams like JSON lines."""
    if bom:
        yield f"{name}#row 0", _bom_warning(f"{name}#row 0")
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        if bom:
            f.read(len(codecs.BOM_UTF8))
        buf, pos, line, eof = "", 0, 1, False  # line: the line number of buf[0]

        def fill() -> None:
            nonlocal buf, pos, line, eof
            chunk = f.read(_CHUNK)
            eof = not chunk
            try:
                text = utf8.decode(chunk, final=eof)
            except UnicodeDecodeError:
                raise _array_error(path, name, bom, line + buf.count("\n"), "not valid UTF-8") from None
            line += buf.count("\n", 0, pos)
            buf, pos = buf[pos:] + text, 0

        def skip_ws() -> None:
            nonlocal pos
            while True:
                pos = _WS.match(buf, pos).end()
                if pos < len(buf) or eof:
                    return
                fill()

        def fail(what: str) -> DataError:
            return _array_error(path, name, bom, line + buf.count("\n", 0, pos), what)

        fill()
        skip_ws()
        pos += 1  # the "[" that _first_byte found
        i = 0
        while True:
            skip_ws()
            if pos >= len(buf):
                raise fail("the array is not closed (truncated file?)")
            if buf[pos] == "]":
                pos += 1
                skip_ws()
                if pos < len(buf):
                    raise fail("extra data after the array")
                return
            if i:
                if buf[pos] != ",":
                    raise fail("expecting ',' between items")
                pos += 1
                skip_ws()
            while True:  # one item, which may continue in the next chunk
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError:
                    if eof:
                        raise fail("an item does not parse") from None
                fill()
            yield f"{name}#row {i}", item
            i += 1
            pos = end


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
        yield f"{name}:1", _bom_warning(f"{name}:1")
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield f"{name}:{line}", _RowError("row", f"not valid UTF-8: byte 0x{data[e.start]:02x}")
        return
    crlf = text.count("\r\n")
    if crlf:
        first_line = text.count("\n", 0, text.index("\r\n")) + 1
        first = f"{name}:{first_line}"
        lines = text.count("\n")
        yield first, RowWarning(first, "row", "crlf", f"{crlf} of {lines} lines end with CRLF "
                                                      "(Windows line ends); accepted, first here")
    yield f"{name}:1", {"text": text.replace("\r\n", "\n")}


_HF_BATCH = 1024


def _hf_records(ds, name: str, split: str) -> Records:
    """Rows of a ``datasets.Dataset``, decoded a bounded batch at a time (the dataset itself is memory-mapped)."""
    i = 0
    for batch in ds.with_format("arrow").iter(batch_size=_HF_BATCH):
        for record in batch.to_pylist():
            yield f"{name}[{split}]#row {i}", record
            i += 1


def _iter_hf(name: str, split: str) -> Records:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset, bad split, ...
        raise DataError(f"{name}: cannot load Hugging Face dataset (split {split!r}): "
                        f"{type(e).__name__}: {e}") from e
    return _hf_records(ds, name, split)


def _iter_saved(path: Path, name: str, split: str) -> Records:
    """A directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{name}: cannot load dataset saved with save_to_disk: {type(e).__name__}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: has no split {split!r} (it has {', '.join(ds)}); set data.split")
        ds = ds[split]
    return _hf_records(ds, name, split)


def _hf_layout(path: Path) -> str | None:
    """How a directory holds a dataset: "saved" (save_to_disk), "hub" (a hub dataset snapshot: a README.md whose
    YAML header declares configs or dataset_info, or a data/ folder), or None (a plain folder of files)."""
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "saved"
    readme = path / "README.md"
    if readme.is_file():
        with open(readme, encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 16)
        if head.startswith("---") and re.search(r"^(configs|dataset_info):", head.split("\n---", 1)[0], re.M):
            return "hub"
    if (path / "data").is_dir():
        return "hub"
    return None


_READERS: dict[str, Callable[[Path, str], Records]] = {
    ".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet, ".txt": _iter_txt}


def _open_source(source: str, kind: str, split: str) -> list[Callable[[], Records]]:
    """One records factory per file of ``source`` (a file, a directory or an HF dataset)."""
    path = Path(source)
    if path.is_dir():
        layout = _hf_layout(path)
        if layout == "saved":
            return [lambda: _iter_saved(path, source, split)]
        if layout == "hub":
            return [lambda: _iter_hf(source, split)]
        if kind != "pretrain":
            raise DataError(f"{source}: is a directory; directories are only supported for pretrain data "
                            "(give a .jsonl, .json or .parquet file, a dataset directory written by save_to_disk, "
                            "or a hub-style dataset directory with data/ or a README.md that declares configs)")
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


class _Reader:
    """Reads the files of one source into rows, bad rows and warnings.

    ``rows(records)`` is a generator: rows flow through one at a time, and only the bad rows, the warnings and one
    small digest per row (for duplicate detection) are kept."""

    def __init__(self, kind: str, fmt: str, on_bad_row: str):
        self.kind, self.fmt, self.on_bad_row = kind, fmt, on_bad_row
        self.count = 0
        self.skipped: list[BadRow] = []
        self.warnings: list[RowWarning] = []
        self.formats: list[str] = []
        # Duplicate detection keeps one entry per row: an 8-byte content digest -> where the row was first seen,
        # packed into one int (the loc's prefix, interned, and its trailing line or row number).
        self._seen: dict[int, int] = {}
        self._prefixes: dict[str, int] = {}
        self._prefix_list: list[str] = []
        self._unknown: dict[str, list] = {}        # ignored key -> [first loc, rows]

    def rows(self, records: Records) -> Iterator[dict]:
        resolved = None if self.fmt == "auto" else self.fmt
        for loc, record in records:
            if isinstance(record, RowWarning):
                self.warnings.append(record)
                continue
            try:
                resolved = _check_record(record, self.kind, resolved, self.fmt != "auto")
                row = _conv.convert(record, resolved)
            except _RowError as e:
                bad = BadRow(loc, e.field, e.reason)
                if self.on_bad_row == "error":
                    raise DataError(str(bad), bad) from None
                self.skipped.append(bad)
                continue
            self._inspect(loc, record, row, resolved)
            row["loc"] = loc
            self.count += 1
            yield row
        if resolved is not None and resolved not in self.formats:
            self.formats.append(resolved)

    def _inspect(self, loc: str, record: dict, row: dict, fmt: str) -> None:
        """Warnings for a usable row: duplicate content, ignored keys, DPO prefixes."""
        canonical = json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8")
        digest = int.from_bytes(hashlib.blake2b(canonical, digest_size=8).digest(), "little")
        here = self._pack(loc)
        first = self._seen.setdefault(digest, here)
        if first != here:
            self.warnings.append(RowWarning(loc, "row", "duplicate",
                                            f"duplicate of {_loc_relative_to(self._unpack(first), loc)}"))
        for key in _conv.unknown_keys(record, fmt):
            self._unknown.setdefault(key, [loc, 0])[1] += 1
        if self.kind == "dpo":
            chosen, rejected = row["chosen"].strip(), row["rejected"].strip()
            if rejected.startswith(chosen):
                self.warnings.append(RowWarning(loc, "chosen", "dpo_prefix", "the chosen response "
                                                "is a prefix of the rejected one"))
            elif chosen.startswith(rejected):
                self.warnings.append(RowWarning(loc, "rejected", "dpo_prefix", "the rejected "
                                                "response is a prefix of the chosen one"))

    def _pack(self, loc: str) -> int:
        """``loc`` as one int: its prefix's index, then its trailing number + 1 (0: it has none)."""
        m = _TRAILING_NUMBER.search(loc)
        prefix, number = (loc[:m.start()], int(m.group()) + 1) if m else (loc, 0)
        index = self._prefixes.setdefault(prefix, len(self._prefixes))
        if index == len(self._prefix_list):
            self._prefix_list.append(prefix)
        return index << _NUMBER_BITS | number

    def _unpack(self, packed: int) -> str:
        prefix, number = self._prefix_list[packed >> _NUMBER_BITS], packed & ((1 << _NUMBER_BITS) - 1)
        return prefix + str(number - 1) if number else prefix

    def result(self, source: str, rows: list[dict] | None = None) -> LoadResult:
        warnings = list(self.warnings)
        for key, (loc, n) in self._unknown.items():
            warnings.append(RowWarning(loc, key, "unknown_key", f"unknown key ignored, in {n} "
                                       f"row{'' if n == 1 else 's'} (first here)"))
        return LoadResult(rows=rows if rows is not None else [], skipped=self.skipped, source=source,
                          fmt="+".join(self.formats), warnings=warnings,
                          count=None if rows is not None else self.count)


class RowStream:
    """The usable rows of one source, read lazily and in order; iterate it once.

    Bad rows raise (``on_bad_row="error"``) or are collected (``"skip"``) as they are met, so an error names its
    exact line before anything after it is read. Once iterated, :meth:`result` holds the row count, the skipped rows
    and the warnings (its ``rows`` is empty)."""

    def __init__(self, source: str, kind: str, fmt: str = "auto", on_bad_row: str = "error",
                 split: str = "train"):
        _check_args(kind, fmt, on_bad_row)
        self.source = os.fspath(source)
        self._factories = _open_source(self.source, kind, split)
        self._reader = _Reader(kind, fmt, on_bad_row)

    def __iter__(self) -> Iterator[dict]:
        for records in self._factories:
            yield from self._reader.rows(records())

    def result(self) -> LoadResult:
        return self._reader.result(self.source)


def _check_args(kind: str, fmt: str = "auto", on_bad_row: str = "error") -> None:
    if kind not in FORMATS:
        raise ValueError(f"kind must be one of {', '.join(FORMATS)}, got {kind!r}")
    if fmt not in FORMATS[kind]:
        raise ValueError(f"format {fmt!r} is not a {kind} format; "
                         f"choose one of {', '.join(FORMATS[kind])}")
    if on_bad_row not in _ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {', '.join(_ON_BAD_ROW)}, got {on_bad_row!r}")


def _load(source: str, kind: str, fmt: str, on_bad_row: str, split: str) -> LoadResult:
    stream = RowStream(source, kind, fmt, on_bad_row, split)
    rows = list(stream)
    return stream._reader.result(stream.source, rows)


def no_rows_error(result: LoadResult) -> DataError:
    """The error for a source that yielded no usable row."""
    skipped = result.skipped
    why = (f"{len(skipped)} bad rows skipped, first: {skipped[0]}" if skipped
           else "the source holds no rows")
    return DataError(f"{result.source}: no usable rows ({why})")


def read_source(source: str, kind: str, fmt: str = "auto", on_bad_row: str = "error",
                split: str = "train") -> LoadResult:
    """Read ``source`` as ``kind`` ("sft", "dpo" or "pretrain") data in format ``fmt``, keeping every row in
    memory (for small sources: the training pipeline streams them with :class:`RowStream`).

    ``source``: a local .jsonl / .json / .parquet file, a directory (pretrain only: every
    .jsonl/.json/.parquet/.txt below it, recursively, in sorted order, hidden paths
    excluded; a .txt file is one row), a dataset directory (written by ``save_to_disk``, or laid
    out like a hub dataset snapshot), or a Hugging Face dataset ``org/name`` / ``hf:org/name``
    loaded with ``datasets.load_dataset(name, split=split)``.
    ``fmt="auto"`` detects the format per file from the first usable row's keys.
    """
    result = _load(os.fspath(source), kind, fmt, on_bad_row, split)
    if not result.rows:
        raise no_rows_error(result)
    return result


def scan_source(source: str, kind: str, fmt: str = "auto", split: str = "train") -> LoadResult:
    """Read every row like ``read_source(..., on_bad_row="skip")``, but return a result with
    no rows instead of raising, so a checker can list the bad rows of an unusable file.
    Problems with the source as a whole still raise :class:`DataError`."""
    return _load(os.fspath(source), kind, fmt, "skip", split)


def check_source(source: str, kind: str, split: str = "train") -> None:
    """Raise :class:`DataError` if ``source`` cannot be opened as ``kind`` data (missing file,
    unsupported file type, a directory for non-pretrain data), without reading any rows.
    A Hugging Face dataset name passes: it is only loaded when read."""
    _check_args(kind)
    _open_source(os.fspath(source), kind, split)
