"""Tests for dpo_dist.data.formats: every input format -> canonical rows, precise bad-row errors."""
from __future__ import annotations

import json

import pytest

from dpo_dist.data.formats import (DPO_FORMATS, PRETRAIN_FORMATS, SFT_FORMATS, BadRow,
                                   DataError, LoadResult, read_source)


def _line(obj) -> str:
    return obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)


def write_jsonl(path, items, newline="\n") -> str:
    """Write items (dicts, or raw str/bytes lines) one per line; return the path as str."""
    data = b""
    for item in items:
        data += (item if isinstance(item, bytes) else _line(item).encode("utf-8"))
        data += newline.encode()
    path.write_bytes(data)
    return str(path)


def msg(role, content):
    return {"role": role, "content": content}


# ---------------------------------------------------------------- good rows, per format
GOOD = {
    "firefly": {"system": "Be brief.",
                "conversation": [{"human": "Hi", "assistant": "Hello!"},
                                 {"human": "2+2?", "assistant": "4"}]},
    "openai": {"messages": [msg("system", "S"), msg("user", "U1"), msg("assistant", "A1"),
                            msg("user", "U2"), msg("assistant", "A2")]},
    "sharegpt": {"system": "Sys",
                 "conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                   {"from": "user", "value": "q2"},
                                   {"from": "assistant", "value": "a2"}]},
    "alpaca": {"instruction": "Translate", "input": "bonjour", "output": "hello"},
    "pair": {"system": "S", "history": [{"human": "h1", "assistant": "a1"}],
             "prompt": "p", "chosen": "good", "rejected": "bad"},
    "ultrafeedback": {"prompt": "q2",
                      "chosen": [msg("system", "S"), msg("user", "q1"), msg("assistant", "a1"),
                                 msg("user", "q2"), msg("assistant", "good")],
                      "rejected": [msg("system", "S"), msg("user", "q1"), msg("assistant", "a1"),
                                   msg("user", "q2"), msg("assistant", "bad")]},
    "text": {"text": "Some pretraining text.\nSecond line."},
}

CANONICAL = {
    "firefly": {"messages": [msg("system", "Be brief."), msg("user", "Hi"),
                             msg("assistant", "Hello!"), msg("user", "2+2?"), msg("assistant", "4")]},
    "openai": {"messages": [msg("system", "S"), msg("user", "U1"), msg("assistant", "A1"),
                            msg("user", "U2"), msg("assistant", "A2")]},
    "sharegpt": {"messages": [msg("system", "Sys"), msg("user", "q1"), msg("assistant", "a1"),
                              msg("user", "q2"), msg("assistant", "a2")]},
    "alpaca": {"messages": [msg("user", "Translate\n\nbonjour"), msg("assistant", "hello")]},
    "pair": {"prompt": [msg("system", "S"), msg("user", "h1"), msg("assistant", "a1"),
                        msg("user", "p")], "chosen": "good", "rejected": "bad"},
    "ultrafeedback": {"prompt": [msg("system", "S"), msg("user", "q1"), msg("assistant", "a1"),
                                 msg("user", "q2")], "chosen": "good", "rejected": "bad"},
    "text": {"text": "Some pretraining text.\nSecond line."},
}

KIND = {"firefly": "sft", "openai": "sft", "sharegpt": "sft", "alpaca": "sft",
        "pair": "dpo", "ultrafeedback": "dpo", "text": "pretrain"}


def test_format_constants():
    assert SFT_FORMATS == ("auto", "firefly", "openai", "sharegpt", "alpaca")
    assert DPO_FORMATS == ("auto", "pair", "ultrafeedback")
    assert PRETRAIN_FORMATS == ("auto", "text")


@pytest.mark.parametrize("fmt", list(GOOD))
@pytest.mark.parametrize("requested", ["auto", "explicit"])
def test_each_format_parses_to_canonical_rows(tmp_path, fmt, requested):
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", [GOOD[fmt], GOOD[fmt]])
    res = read_source(path, KIND[fmt], fmt if requested == "explicit" else "auto")
    assert isinstance(res, LoadResult)
    assert res.fmt == fmt and res.source == path and res.skipped == []
    assert res.rows == [dict(CANONICAL[fmt], loc=f"{path}:1"), dict(CANONICAL[fmt], loc=f"{path}:2")]
    assert res.summary() == f"{path}: 2 rows (format {fmt})"


@pytest.mark.parametrize("row,expected", [
    # alpaca: no input / empty input, optional system
    ({"instruction": "Say hi", "input": "", "output": "hi", "system": "Sys"},
     {"messages": [msg("system", "Sys"), msg("user", "Say hi"), msg("assistant", "hi")]}),
    ({"instruction": "Say hi", "output": "hi"},
     {"messages": [msg("user", "Say hi"), msg("assistant", "hi")]}),
    # firefly without system; an empty system prompt is no system message
    ({"conversation": [{"human": "a", "assistant": "b"}], "system": ""},
     {"messages": [msg("user", "a"), msg("assistant", "b")]}),
    # openai without system
    ({"messages": [msg("user", "u"), msg("assistant", "a")]},
     {"messages": [msg("user", "u"), msg("assistant", "a")]}),
])
def test_sft_variants(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "x.jsonl", [row])
    assert read_source(path, "sft").rows == [dict(expected, loc=f"{path}:1")]


def test_dpo_variants(tmp_path):
    pair = write_jsonl(tmp_path / "pair.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    assert read_source(pair, "dpo").rows == [
        {"prompt": [msg("user", "p")], "chosen": "c", "rejected": "r", "loc": f"{pair}:1"}]
    uf = write_jsonl(tmp_path / "uf.jsonl", [{  # no prompt field, no system
        "chosen": [msg("user", "q"), msg("assistant", "c")],
        "rejected": [msg("user", "q"), msg("assistant", "r")]}])
    res = read_source(uf, "dpo")
    assert res.fmt == "ultrafeedback"
    assert res.rows == [{"prompt": [msg("user", "q")], "chosen": "c", "rejected": "r",
                         "loc": f"{uf}:1"}]


# ------------------------------------------------------------------------- bad rows
def _openai(*msgs):
    return {"messages": [msg(r, c) for r, c in msgs]}


def _uf(chosen, rejected, **extra):
    return dict(extra, chosen=[msg(r, c) for r, c in chosen],
                rejected=[msg(r, c) for r, c in rejected])


# (base format of the good rows, bad line at line 2, expected field, expected reason part)
BAD_ROWS = {
    "invalid_json": ("firefly", '{"conversation": [', "row", "invalid JSON: Expecting"),
    "not_object": ("firefly", "[1, 2]", "row", "not a JSON object: got list"),
    "not_object_str": ("pair", '"just a string"', "row", "not a JSON object: got string"),
    "missing_field": ("firefly", {"conversation": [{"human": "hi"}]},
                      "conversation[0].assistant", "missing required field"),
    "missing_output": ("alpaca", {"instruction": "x", "output": None},
                       "output", "missing required field (null)"),
    "missing_rejected_pair": ("pair", {"prompt": "p", "chosen": "c", "rejected": None},
                              "rejected", "missing required field"),
    "content_not_str": ("openai", {"messages": [msg("user", 5), msg("assistant", "a")]},
                        "messages[0].content", "wrong type: expected string, got number"),
    "conversation_not_list": ("firefly", {"conversation": "hello"},
                              "conversation", "wrong type: expected list, got string"),
    "turn_not_object": ("firefly", {"conversation": ["hi"]},
                        "conversation[0]", "wrong type: expected object, got string"),
    "system_not_str": ("sharegpt", {"system": ["x"], "conversations": []},
                       "system", "wrong type: expected string, got list"),
    "unknown_role_openai": ("openai", _openai(("user", "u"), ("tool", "t")),
                            "messages[1].role", "unknown role 'tool'"),
    "unknown_role_sharegpt": ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]},
                              "conversations[0].from", "unknown role 'bot'"),
    "two_user_turns": ("openai", _openai(("user", "a"), ("user", "b"), ("assistant", "c")),
                       "messages[1].role", "wrong role order: two user turns in a row"),
    "assistant_first": ("openai", _openai(("assistant", "a"), ("user", "b")),
                        "messages[0].role", "must start with a user turn, got assistant"),
    "sharegpt_assistant_first": ("sharegpt", {"conversations": [{"from": "gpt", "value": "x"}]},
                                 "conversations[0].from", "must start with a user turn"),
    "ends_on_user": ("openai", _openai(("user", "a"), ("assistant", "b"), ("user", "c")),
                     "messages[2].role", "conversation ends with a user turn (expected assistant)"),
    "system_not_first": ("openai", _openai(("user", "a"), ("system", "s"), ("assistant", "b")),
                         "messages[1].role", "system message is only allowed first"),
    "empty_conversation": ("firefly", {"conversation": []}, "conversation", "empty conversation"),
    "empty_assistant": ("firefly", {"conversation": [{"human": "a", "assistant": "b"},
                                                     {"human": "c", "assistant": "  \n"}]},
                        "conversation[1].assistant", "empty assistant turn"),
    "empty_user": ("openai", _openai(("user", ""), ("assistant", "b")),
                   "messages[0].content", "empty user turn"),
    "empty_instruction": ("alpaca", {"instruction": " ", "output": "o"},
                          "instruction", "empty user turn"),
    "empty_output": ("alpaca", {"instruction": "i", "output": ""},
                     "output", "empty assistant turn"),
    "empty_prompt": ("pair", {"prompt": "\t", "chosen": "c", "rejected": "r"},
                     "prompt", "empty user turn"),
    "empty_chosen": ("pair", {"prompt": "p", "chosen": " ", "rejected": "r"},
                     "chosen", "empty chosen response"),
    "empty_rejected": ("pair", {"prompt": "p", "chosen": "c", "rejected": ""},
                       "rejected", "empty rejected response"),
    "chosen_equals_rejected": ("pair", {"prompt": "p", "chosen": "same", "rejected": "same"},
                               "rejected", "chosen identical to rejected"),
    "history_not_list": ("pair", {"prompt": "p", "chosen": "c", "rejected": "r", "history": "h"},
                         "history", "wrong type: expected list, got string"),
    "uf_empty_chosen": ("ultrafeedback", _uf([("user", "q"), ("assistant", "")],
                                             [("user", "q"), ("assistant", "r")]),
                        "chosen[1].content", "empty chosen response"),
    "uf_identical": ("ultrafeedback", _uf([("user", "q"), ("assistant", "x")],
                                          [("user", "q"), ("assistant", "x")]),
                     "rejected[1].content", "chosen identical to rejected"),
    "uf_different_histories": ("ultrafeedback",
                               _uf([("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "c")],
                                   [("user", "q"), ("assistant", "DIFFERENT"), ("user", "q2"),
                                    ("assistant", "r")]),
                               "rejected[1]", "chosen and rejected have different histories"),
    "uf_not_ending_assistant": ("ultrafeedback", _uf([("user", "q"), ("assistant", "c"), ("user", "x")],
                                                     [("user", "q"), ("assistant", "r")]),
                                "chosen[2].role", "chosen must end with an assistant message"),
    "uf_prompt_not_ending_user": ("ultrafeedback",
                                  _uf([("user", "q"), ("assistant", "a"), ("assistant", "c")],
                                      [("user", "q"), ("assistant", "a"), ("assistant", "r")]),
                                  "chosen[1].role", "prompt ends with an assistant turn (expected user)"),
    "uf_prompt_mismatch": ("ultrafeedback", _uf([("user", "q"), ("assistant", "c")],
                                                [("user", "q"), ("assistant", "r")], prompt="other"),
                           "prompt", "prompt does not match the last user message"),
    "uf_unknown_role": ("ultrafeedback", _uf([("human", "q"), ("assistant", "c")],
                                             [("user", "q"), ("assistant", "r")]),
                        "chosen[0].role", "unknown role 'human'"),
    "empty_text": ("text", {"text": "   "}, "text", "empty text"),
    "text_not_str": ("text", {"text": 3}, "text", "wrong type: expected string, got number"),
    "non_utf8": ("firefly", b'{"conversation": [{"human": "caf\xe9", "assistant": "x"}]}',
                 "row", "not valid UTF-8: byte 0xe9"),
    "other_format_row": ("firefly", GOOD["openai"], "row",
                         "format mismatch: row is in openai format, but the file was detected as firefly"),
    "other_dpo_format_row": ("ultrafeedback", GOOD["pair"], "row",
                             "format mismatch: row is in pair format"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_raises_with_location_and_field(tmp_path, case):
    base, bad, field, reason = BAD_ROWS[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", [GOOD[base], bad, GOOD[base]])
    with pytest.raises(DataError) as exc:
        read_source(path, KIND[base])
    message = str(exc.value)
    assert message.startswith(f"{path}:2: {field}: "), message
    assert reason in message
    assert "\n" not in message
    assert exc.value.bad_row.loc == f"{path}:2" and exc.value.bad_row.field == field


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_skipped(tmp_path, case):
    base, bad, field, reason = BAD_ROWS[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", [GOOD[base], bad, GOOD[base]])
    res = read_source(path, KIND[base], on_bad_row="skip")
    assert res.rows == [dict(CANONICAL[base], loc=f"{path}:1"),
                        dict(CANONICAL[base], loc=f"{path}:3")]
    assert len(res.skipped) == 1
    skipped = res.skipped[0]
    assert (skipped.loc, skipped.field) == (f"{path}:2", field)
    assert reason in skipped.reason
    assert str(skipped) == f"{path}:2: {field}: {skipped.reason}"
    headline = skipped.reason.split(": ")[0]
    assert res.summary() == f"{path}: 2 rows (format {base}), 1 skipped: line 2 ({headline})"


def test_summary_lists_every_skipped_line(tmp_path):
    bad_turn = {"conversation": [{"human": "a", "assistant": " "}]}
    path = write_jsonl(tmp_path / "train.jsonl",
                       [GOOD["firefly"], bad_turn, GOOD["firefly"], "{oops", GOOD["firefly"]])
    res = read_source(path, "sft", on_bad_row="skip")
    assert [r["loc"] for r in res.rows] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert [b.loc for b in res.skipped] == [f"{path}:2", f"{path}:4"]
    assert res.summary() == (f"{path}: 3 rows (format firefly), 2 skipped: "
                             "line 2 (empty assistant turn), line 4 (invalid JSON)")


def test_summary_caps_long_skip_lists(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD["text"]] + ["{"] * 13)
    summary = read_source(path, "pretrain", on_bad_row="skip").summary()
    assert "13 skipped: line 2 (invalid JSON)" in summary
    assert "line 11 (invalid JSON)" in summary and "line 12" not in summary
    assert summary.endswith("... and 3 more")


def test_auto_detect_failure_names_keys_and_formats(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}, GOOD["firefly"]])
    with pytest.raises(DataError) as exc:
        read_source(path, "sft")
    message = str(exc.value)
    assert message.startswith(f"{path}:1: row: unknown format: keys [question, answer]")
    for name in ("firefly", "openai", "sharegpt", "alpaca"):
        assert name in message
    res = read_source(path, "sft", on_bad_row="skip")
    assert res.fmt == "firefly"
    assert [r["loc"] for r in res.rows] == [f"{path}:2"]
    assert [(b.loc, b.field) for b in res.skipped] == [(f"{path}:1", "row")]
    assert "line 1 (unknown format)" in res.summary()


def test_auto_detect_hints_at_other_kind(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD["pair"]])
    with pytest.raises(DataError, match=r"match no sft format.*looks like dpo data \(pair\)"):
        read_source(path, "sft")


def test_auto_detect_skips_leading_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", ["not json", GOOD["sharegpt"]])
    res = read_source(path, "sft", on_bad_row="skip")
    assert res.fmt == "sharegpt" and res.rows == [dict(CANONICAL["sharegpt"], loc=f"{path}:2")]


def test_explicit_format_mismatch(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD["firefly"]])
    with pytest.raises(DataError, match=r"x\.jsonl:1: row: format mismatch: row is in firefly "
                                        r"format, but format was set to openai"):
        read_source(path, "sft", fmt="openai")


# -------------------------------------------------------------- file-level handling
def test_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "win.jsonl"
    lines = [b"\xef\xbb\xbf" + _line(GOOD["firefly"]).encode(), b"", b"   ",
             _line({"conversation": [{"human": "x\u2028y", "assistant": "z"}]}).encode(), b"\t"]
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    res = read_source(str(path), "sft")
    assert res.fmt == "firefly" and res.skipped == []
    assert res.rows == [dict(CANONICAL["firefly"], loc=f"{path}:1"),
                        {"messages": [msg("user", "x\u2028y"), msg("assistant", "z")],
                         "loc": f"{path}:4"}]


def test_bom_only_file_and_empty_file_have_no_rows(tmp_path):
    for name, data in [("empty.jsonl", b""), ("bom.jsonl", b"\xef\xbb\xbf\r\n\n")]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError, match=r"no usable rows \(the source holds no rows\)"):
            read_source(str(path), "sft", on_bad_row="skip")


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{", "[]"])
    with pytest.raises(DataError) as exc:
        read_source(path, "sft", on_bad_row="skip")
    assert str(exc.value).startswith(f"{path}: no usable rows (2 bad rows skipped, first: {path}:1:")


def test_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD["alpaca"], {"instruction": "i", "output": " "},
                                GOOD["alpaca"]], indent=2))
    with pytest.raises(DataError, match=r"data\.json#row 1: output: empty assistant turn"):
        read_source(str(path), "sft")
    res = read_source(str(path), "sft", on_bad_row="skip")
    assert res.rows == [dict(CANONICAL["alpaca"], loc=f"{path}#row 0"),
                        dict(CANONICAL["alpaca"], loc=f"{path}#row 2")]
    assert res.skipped == [BadRow(f"{path}#row 1", "output", "empty assistant turn")]
    assert res.summary() == f"{path}: 2 rows (format alpaca), 1 skipped: row 1 (empty assistant turn)"


def test_json_file_with_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [GOOD["pair"], GOOD["pair"]])
    res = read_source(path, "dpo")
    assert [r["loc"] for r in res.rows] == [f"{path}:1", f"{path}:2"]
    assert res.rows[0] == dict(CANONICAL["pair"], loc=f"{path}:1")


def test_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(DataError, match=r"broken\.json:3: row: invalid JSON"):
        read_source(str(path), "pretrain", on_bad_row="skip")


def test_multiline_single_object_json(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(GOOD["text"], indent=2))
    with pytest.raises(DataError, match="single multi-line JSON object"):
        read_source(str(path), "pretrain")


def test_parquet(tmp_path):
    from datasets import Dataset

    path = tmp_path / "train.parquet"
    rows = [GOOD["sharegpt"],
            {"system": None, "conversations": [{"from": "human", "value": "q"},
                                               {"from": "gpt", "value": ""}]},
            {"system": None, "conversations": [{"from": "human", "value": "q"},
                                               {"from": "gpt", "value": "a"}]}]
    Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError, match=r"train\.parquet#row 1: conversations\[1\]\.value: "
                                        r"empty assistant turn"):
        read_source(str(path), "sft")
    res = read_source(str(path), "sft", on_bad_row="skip")
    assert res.fmt == "sharegpt"
    assert res.rows == [dict(CANONICAL["sharegpt"], loc=f"{path}#row 0"),
                        {"messages": [msg("user", "q"), msg("assistant", "a")],
                         "loc": f"{path}#row 2"}]
    assert [b.loc for b in res.skipped] == [f"{path}#row 1"]


def test_parquet_ultrafeedback_via_pyarrow(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD["ultrafeedback"]]), path)
    assert read_source(str(path), "dpo").rows == [dict(CANONICAL["ultrafeedback"],
                                                       loc=f"{path}#row 0")]


def test_broken_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read parquet file"):
        read_source(str(path), "sft")


def test_pretrain_directory_nested_sorted(tmp_path):
    from datasets import Dataset

    root = tmp_path / "corpus"
    (root / "b" / "d").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_bytes(b"\xef\xbb\xbfdoc a\r\nline 2\r\n")
    write_jsonl(root / "b" / "c.jsonl", [{"text": "c1"}, {"text": "c2"}])
    Dataset.from_list([{"text": "e0"}]).to_parquet(str(root / "b" / "d" / "e.parquet"))
    (root / "z.json").write_text(json.dumps([{"text": "z0"}, {"text": "z1"}]))
    (root / "notes.md").write_text("ignored: not a data file")
    (root / ".hidden" / "x.txt").write_text("ignored: hidden")
    res = read_source(str(root), "pretrain")
    assert res.fmt == "text" and res.skipped == []
    assert res.rows == [
        {"text": "doc a\nline 2\n", "loc": f"{root}/a.txt:1"},
        {"text": "c1", "loc": f"{root}/b/c.jsonl:1"},
        {"text": "c2", "loc": f"{root}/b/c.jsonl:2"},
        {"text": "e0", "loc": f"{root}/b/d/e.parquet#row 0"},
        {"text": "z0", "loc": f"{root}/z.json#row 0"},
        {"text": "z1", "loc": f"{root}/z.json#row 1"},
    ]


def test_pretrain_directory_bad_rows(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "empty.txt").write_text("  \n")
    (root / "latin1.txt").write_bytes(b"ok line\ncaf\xe9\n")
    write_jsonl(root / "sub" / "x.jsonl", [{"text": "good"}, {"text": ""}])
    with pytest.raises(DataError, match=r"empty\.txt:1: text: empty text"):
        read_source(str(root), "pretrain")
    res = read_source(str(root), "pretrain", on_bad_row="skip")
    assert res.rows == [{"text": "good", "loc": f"{root}/sub/x.jsonl:1"}]
    assert [(b.loc, b.field) for b in res.skipped] == [
        (f"{root}/empty.txt:1", "text"), (f"{root}/latin1.txt:2", "row"),
        (f"{root}/sub/x.jsonl:2", "text")]
    assert res.summary().endswith("3 skipped: empty.txt line 1 (empty text), latin1.txt line 2 "
                                  "(not valid UTF-8), sub/x.jsonl line 2 (empty text)")


def test_directory_only_for_pretrain(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [GOOD["firefly"]])
    with pytest.raises(DataError, match="only supported for pretrain"):
        read_source(str(tmp_path), "sft")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="directory holds no"):
        read_source(str(empty), "pretrain")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported file type '\.csv'"):
        read_source(str(path), "sft")


@pytest.mark.parametrize("source", ["missing.jsonl", "data/missing.jsonl", "./org/name",
                                    "a/b/c", "/nonexistent/dir"])
def test_missing_local_path(tmp_path, monkeypatch, source):
    import datasets

    def fail(*args, **kwargs):
        raise AssertionError("must not be treated as a Hugging Face dataset")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError) as exc:
        read_source(source, "sft")
    assert str(exc.value).startswith(f"{source}: no such file or directory")


@pytest.mark.parametrize("source", ["org/name", "hf:org/name"])
def test_hf_dataset_dispatch(tmp_path, monkeypatch, source):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None):
        calls.append((name, split))
        return datasets.Dataset.from_list([GOOD["pair"], {"prompt": "p", "chosen": "c",
                                                          "rejected": "c", "system": None,
                                                          "history": None}])

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    res = read_source(source, "dpo", on_bad_row="skip", split="test")
    assert calls == [("org/name", "test")]
    assert res.rows == [dict(CANONICAL["pair"], loc="org/name[test]#row 0")]
    assert res.skipped == [BadRow("org/name[test]#row 1", "rejected", "chosen identical to rejected")]
    assert res.summary() == (f"{source}: 1 rows (format pair), 1 skipped: "
                             "row 1 (chosen identical to rejected)")


def test_hf_dataset_load_failure(tmp_path, monkeypatch):
    import datasets

    def broken(name, split=None):
        raise ConnectionError("offline")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(DataError, match=r"org/name: cannot load Hugging Face dataset "
                                        r"\(split 'train'\): ConnectionError: offline"):
        read_source("org/name", "sft")


def test_argument_validation(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD["firefly"]])
    with pytest.raises(ValueError, match="on_bad_row"):
        read_source(path, "sft", on_bad_row="ignore")
    with pytest.raises(ValueError, match="not a sft format"):
        read_source(path, "sft", fmt="pair")
    with pytest.raises(ValueError, match="kind"):
        read_source(path, "rlhf")
    assert issubclass(DataError, ValueError)
