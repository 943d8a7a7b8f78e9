"""`dpo-dist validate` and the reader checks behind it: a corpus of malformed SFT, DPO and pretraining
files, each expected to produce one `FILE:LINE: field: reason` line; warnings; recipes; the command line."""
from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpo_dist.data.formats import DataError, RowWarning, check_source, read_source, scan_source
from dpo_dist.config.schema import ConfigError
from dpo_dist.commands.validate import check_data, report_lines, validate_file, validate_recipe

REPO = Path(__file__).resolve().parents[1]
BOM = codecs.BOM_UTF8
LIMIT = 4096  # DPO_DIST_MAX_LINE_BYTES for the corpus: every line but the enormous one is shorter


def msg(role, content):
    return {"role": role, "content": content}


FIREFLY = {"conversation": [{"human": "Hi", "assistant": "Hello!"}]}
FIREFLY_2 = {"conversation": [{"human": "2+2?", "assistant": "4"}]}
OPENAI = {"messages": [msg("user", "Hi"), msg("assistant", "Hello!")]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
ALPACA = {"instruction": "Translate", "input": "bonjour", "output": "hello"}
PAIR = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
PAIR_2 = {"prompt": "Bye", "chosen": "Goodbye!", "rejected": "Whatever."}
TEXT = {"text": "Some pretraining text."}


def uf(chosen, rejected, **extra):
    return dict(extra, chosen=[msg(r, c) for r, c in chosen], rejected=[msg(r, c) for r, c in rejected])


UF = uf([("user", "q"), ("assistant", "good")], [("user", "q"), ("assistant", "bad")])


def openai(*turns):
    return {"messages": [msg(r, c) for r, c in turns]}


def jsonl(*items, end=b"\n", last_end=True) -> bytes:
    """Lines from dicts/lists (JSON), str or raw bytes."""
    out = []
    for item in items:
        if isinstance(item, bytes):
            out.append(item)
        elif isinstance(item, str):
            out.append(item.encode("utf-8"))
        else:
            out.append(json.dumps(item, ensure_ascii=False).encode("utf-8"))
    return end.join(out) + (end if last_end else b"")


MISSING = object()    # the path is not created
DIRECTORY = object()  # the path is a directory holding a valid file

# (case id, kind, file name, file bytes, expected line (None: the file as a whole), expected field, reason part)
CASES = [
    # --------------------------------------------------------------------------------------------- SFT
    ("broken_json", "sft", "a.jsonl", jsonl(FIREFLY, '{"conversation": [', FIREFLY), 2, "row",
     "invalid JSON: Expecting value"),
    ("truncated_last_line", "sft", "a.jsonl", jsonl(FIREFLY, '{"conversation": [{"human": "a", "assist',
                                                     last_end=False), 2, "row", "truncated file?"),
    ("bom_inside_file", "sft", "a.jsonl", jsonl(FIREFLY, BOM + json.dumps(FIREFLY_2).encode()), 2, "row",
     "byte order mark inside the file"),
    ("bom_mid_line", "sft", "a.jsonl", jsonl(FIREFLY, json.dumps(FIREFLY) + "\ufeff" + json.dumps(FIREFLY_2)),
     2, "row", "byte order mark inside the file at column"),
    ("non_utf8", "sft", "a.jsonl", jsonl(FIREFLY, b'{"conversation": [{"human": "caf\xe9", "assistant": "x"}]}'),
     2, "row", "not valid UTF-8: byte 0xe9"),
    ("enormous_line", "sft", "a.jsonl",
     jsonl(FIREFLY, {"conversation": [{"human": "x" * 10_000, "assistant": "y"}]}, FIREFLY_2), 2, "row",
     f"bytes, over the {LIMIT}-byte limit (DPO_DIST_MAX_LINE_BYTES)"),
    ("not_an_object", "sft", "a.jsonl", jsonl(FIREFLY, [1, 2], FIREFLY_2), 2, "row",
     "not a JSON object: got list"),
    ("unknown_format_keys", "sft", "a.jsonl", jsonl({"question": "q", "answer": "a"}, FIREFLY), 1, "row",
     "unknown format: keys [question, answer] match no sft format"),
    ("wrong_type_conversation", "sft", "a.jsonl", jsonl(FIREFLY, {"conversation": "hello"}), 2, "conversation",
     "wrong type: expected list, got string"),
    ("wrong_type_content", "sft", "a.jsonl", jsonl(OPENAI, openai(("user", 5), ("assistant", "a"))), 2,
     "messages[0].content", "wrong type: expected string, got number"),
    ("missing_field", "sft", "a.jsonl", jsonl(FIREFLY, {"conversation": [{"human": "hi"}]}), 2,
     "conversation[0].assistant", "missing required field"),
    ("null_field", "sft", "a.jsonl", jsonl(ALPACA, {"instruction": "x", "output": None}), 2, "output",
     "missing required field (null)"),
    ("unknown_role_openai", "sft", "a.jsonl", jsonl(OPENAI, openai(("user", "u"), ("tool", "t"))), 2,
     "messages[1].role", "unknown role 'tool'"),
    ("unknown_role_sharegpt", "sft", "a.jsonl",
     jsonl(SHAREGPT, {"conversations": [{"from": "bot", "value": "x"}]}), 2, "conversations[0].from",
     "unknown role 'bot'"),
    ("two_user_turns", "sft", "a.jsonl", jsonl(OPENAI, openai(("user", "a"), ("user", "b"), ("assistant", "c"))),
     2, "messages[1].role", "wrong role order: two user turns in a row"),
    ("system_not_first", "sft", "a.jsonl",
     jsonl(OPENAI, openai(("user", "a"), ("system", "s"), ("assistant", "b"))), 2, "messages[1].role",
     "system message is only allowed first"),
    ("ends_with_user", "sft", "a.jsonl",
     jsonl(OPENAI, openai(("user", "a"), ("assistant", "b"), ("user", "c"))), 2, "messages[2].role",
     "conversation ends with a user turn (expected assistant)"),
    ("empty_content", "sft", "a.jsonl", jsonl(OPENAI, openai(("user", " "), ("assistant", "b"))), 2,
     "messages[0].content", "empty user turn"),
    ("empty_conversation", "sft", "a.jsonl", jsonl(FIREFLY, {"conversation": []}), 2, "conversation",
     "empty conversation"),
    ("format_mismatch", "sft", "a.jsonl", jsonl(FIREFLY, OPENAI), 2, "row",
     "format mismatch: row is in openai format, but the file was detected as firefly"),
    ("sft_file_with_dpo_rows", "sft", "a.jsonl", jsonl(PAIR, PAIR_2), 1, "row",
     "match no sft format; expected one of firefly (conversation)"),
    # --------------------------------------------------------------------------------------------- DPO
    ("dpo_chosen_equals_rejected", "dpo", "p.jsonl", jsonl(PAIR, {"prompt": "p", "chosen": "s", "rejected": "s"}),
     2, "rejected", "chosen identical to rejected"),
    ("dpo_empty_chosen", "dpo", "p.jsonl", jsonl(PAIR, {"prompt": "p", "chosen": "", "rejected": "r"}), 2,
     "chosen", "empty chosen response"),
    ("dpo_null_rejected", "dpo", "p.jsonl", jsonl(PAIR, {"prompt": "p", "chosen": "c", "rejected": None}), 2,
     "rejected", "missing required field (null)"),
    ("pair_history_wrong_type", "dpo", "p.jsonl",
     jsonl(PAIR, {"prompt": "p", "chosen": "c", "rejected": "r", "history": "h"}), 2, "history",
     "wrong type: expected list, got string"),
    ("uf_histories_differ", "dpo", "p.jsonl",
     jsonl(UF, uf([("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "c")],
                  [("user", "q"), ("assistant", "OTHER"), ("user", "q2"), ("assistant", "r")])), 2,
     "rejected[1]", "chosen and rejected have different histories"),
    ("uf_prompt_mismatch", "dpo", "p.jsonl",
     jsonl(UF, uf([("user", "q"), ("assistant", "c")], [("user", "q"), ("assistant", "r")], prompt="other")), 2,
     "prompt", "prompt does not match the last user message of chosen"),
    ("uf_chosen_not_ending_assistant", "dpo", "p.jsonl",
     jsonl(UF, uf([("user", "q"), ("assistant", "c"), ("user", "x")], [("user", "q"), ("assistant", "r")])), 2,
     "chosen[2].role", "chosen must end with an assistant message"),
    ("uf_unknown_role", "dpo", "p.jsonl",
     jsonl(UF, uf([("human", "q"), ("assistant", "c")], [("user", "q"), ("assistant", "r")])), 2,
     "chosen[0].role", "unknown role 'human'"),
    ("dpo_file_with_sft_rows", "dpo", "p.jsonl", jsonl(FIREFLY), 1, "row", "it looks like sft data (firefly)"),
    # -------------------------------------------------------------------------------------- pretraining
    ("pretrain_empty_text", "pretrain", "t.jsonl", jsonl(TEXT, {"text": "  "}), 2, "text", "empty text"),
    ("pretrain_text_wrong_type", "pretrain", "t.jsonl", jsonl(TEXT, {"text": 3}), 2, "text",
     "wrong type: expected string, got number"),
    ("pretrain_txt_bad_utf8", "pretrain", "doc.txt", b"ok line\ncaf\xe9\n", 2, "row", "not valid UTF-8: byte 0xe9"),
    ("broken_json_array", "pretrain", "t.json", b'[\n  {"text": "a"},\n  {"text": "b",}\n]\n', 3, "row",
     "invalid JSON"),
    ("single_multiline_object", "pretrain", "t.json", json.dumps(TEXT, indent=2).encode(), None, None,
     "holds a single multi-line JSON object"),
    # ------------------------------------------------------------------------------ the file as a whole
    ("empty_file", "sft", "a.jsonl", b"", None, None, "no usable rows (the file is empty)"),
    ("blank_lines_only", "sft", "a.jsonl", b"\n   \n\t\n", None, None,
     "no usable rows (the file holds only blank lines)"),
    ("all_rows_bad", "sft", "a.jsonl", jsonl("{", "[]"), None, None, "no usable rows (all 2 rows are bad)"),
    ("unsupported_extension", "sft", "a.csv", b"a,b\n", None, None, "unsupported file type '.csv'"),
    ("missing_file", "sft", "missing.jsonl", MISSING, None, None, "no such file or directory"),
    ("directory_for_sft", "sft", "data", DIRECTORY, None, None,
     "is a directory; directories are only supported for pretrain data"),
]
CASE_IDS = [case[0] for case in CASES]
BY_ID = {case[0]: case for case in CASES}


def test_corpus_is_large_and_distinct():
    assert len(CASES) >= 25
    assert len(set(CASE_IDS)) == len(CASE_IDS)
    assert {kind for _, kind, *_ in CASES} == {"sft", "dpo", "pretrain"}


def make(tmp_path: Path, case_id: str) -> tuple[str, tuple]:
    _, kind, name, content, line, field, reason = BY_ID[case_id]
    path = tmp_path / name
    if content is DIRECTORY:
        path.mkdir()
        (path / "a.jsonl").write_bytes(jsonl(FIREFLY))
    elif content is not MISSING:
        path.write_bytes(content)
    return str(path), (kind, line, field, reason)


def expected_line(lines: list[str], path: str, line: int | None, field: str | None, reason: str) -> str:
    """The one output line for this problem: `FILE:LINE: field: ...reason...` (or `FILE: ...reason...`)."""
    prefix = f"{path}:{line}: {field}: " if line is not None else f"{path}: "
    hits = [text for text in lines if text.startswith(prefix) and reason in text]
    assert hits, f"no line starting {prefix!r} containing {reason!r} in:\n" + "\n".join(lines)
    return hits[0]


@pytest.fixture
def small_line_limit(monkeypatch):
    monkeypatch.setenv("DPO_DIST_MAX_LINE_BYTES", str(LIMIT))


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_malformed_file_is_reported_on_one_line(tmp_path, small_line_limit, case_id):
    path, (kind, line, field, reason) = make(tmp_path, case_id)
    check = check_data(path, kind)
    lines = report_lines(check)
    assert all("\n" not in text for text in lines)
    expected_line(lines, path, line, field, reason)
    assert check.failed()
    assert lines[-1].startswith(f"{path}: ") and "usable row" in lines[-1]
    out: list[str] = []
    assert validate_file(path, kind, out=out.append) == 1
    assert out == lines


def test_all_bad_rows_are_listed_with_the_file_problem(tmp_path, small_line_limit):
    path, _ = make(tmp_path, "all_rows_bad")
    lines = report_lines(check_data(path, "sft"))
    assert lines == [f"{path}:1: row: invalid JSON: Expecting property name enclosed in double quotes at column 2",
                     f"{path}:2: row: not a JSON object: got list",
                     f"{path}: no usable rows (all 2 rows are bad)",
                     f"{path}: 0 usable rows, 2 bad rows, 0 warnings; not usable for training"]


def test_good_rows_around_a_bad_row_are_counted(tmp_path, small_line_limit):
    path, _ = make(tmp_path, "enormous_line")
    check = check_data(path, "sft")
    assert (check.rows, len(check.bad)) == (2, 1)
    size = len(json.dumps({"conversation": [{"human": "x" * 10_000, "assistant": "y"}]}))
    assert check.bad[0].reason == f"line is {size} bytes, over the {LIMIT}-byte limit (DPO_DIST_MAX_LINE_BYTES)"
    assert report_lines(check)[-1] == f"{path}: 2 usable rows, 1 bad row, 0 warnings"


@pytest.mark.parametrize("case_id", ["broken_json", "enormous_line", "missing_file", "pretrain_txt_bad_utf8",
                                     "sft_file_with_dpo_rows", "directory_for_sft"])
def test_malformed_file_through_the_command_line(tmp_path, case_id):
    path, (kind, line, field, reason) = make(tmp_path, case_id)
    proc = run_cli("validate", "--data", path, "--format", kind, env={"DPO_DIST_MAX_LINE_BYTES": str(LIMIT)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    expected_line(proc.stdout.splitlines(), path, line, field, reason)
    assert proc.stdout.splitlines()[-1].startswith(f"{path}: ")


def run_cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "dpo_dist.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=full_env, timeout=300)


# ------------------------------------------------------------------------------------------------ warnings
# (case id, kind, file bytes, expected line, field, warning text, counted summary)
WARNING_CASES = [
    ("duplicate_row", "sft", jsonl(FIREFLY, FIREFLY_2, FIREFLY), 3, "row", "duplicate of line 1",
     "1 duplicate row"),
    ("first_line_bom", "sft", BOM + jsonl(FIREFLY, FIREFLY_2), 1, "row",
     "file starts with a UTF-8 byte order mark", "1 file starting with a byte order mark"),
    ("crlf_line_ends", "sft", jsonl(FIREFLY, FIREFLY_2, end=b"\r\n"), 1, "row",
     "2 of 2 lines end with CRLF", "1 file with CRLF line ends"),
    ("unknown_key", "dpo", jsonl(dict(PAIR, id=1), dict(PAIR_2, id=2)), 1, "id",
     "unknown key ignored, in 2 rows", "1 unknown key ignored"),
    ("chosen_prefix_of_rejected", "dpo", jsonl({"prompt": "p", "chosen": "Yes", "rejected": "Yes, but no."}), 1,
     "chosen", "the chosen response is a prefix of the rejected one", "1 response that is a prefix of the other"),
]


@pytest.mark.parametrize("case", WARNING_CASES, ids=[c[0] for c in WARNING_CASES])
def test_warnings_are_counted_and_fail_only_when_strict(tmp_path, case):
    case_id, kind, content, line, field, text, counted = case
    path = tmp_path / "w.jsonl"
    path.write_bytes(content)
    out: list[str] = []
    assert validate_file(str(path), kind, out=out.append) == 0
    assert any(o.startswith(f"{path}:{line}: {field}: warning: ") and text in o for o in out), out
    assert out[-1].endswith(f", 1 warning ({counted})"), out[-1]
    assert validate_file(str(path), kind, strict=True, out=[].append) == 1


@pytest.mark.slow
def test_warnings_through_the_command_line_with_strict(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_bytes(jsonl(PAIR, PAIR_2, PAIR, PAIR))
    proc = run_cli("validate", "--data", str(path), "--format", "dpo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{path}:3: row: warning: duplicate of line 1" in proc.stdout.splitlines()
    assert proc.stdout.splitlines()[-1] == f"{path}: 4 usable rows, 0 bad rows, 2 warnings (2 duplicate rows)"
    assert run_cli("validate", "--data", str(path), "--format", "dpo", "--strict").returncode == 1


def test_max_lines_caps_each_category(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_bytes(jsonl(FIREFLY, *["{"] * 5, *[FIREFLY] * 4))
    out: list[str] = []
    assert validate_file(str(path), "sft", max_lines=2, out=out.append) == 1
    assert out == [f"{path}:2: row: invalid JSON: Expecting property name enclosed in double quotes at column 2",
                   f"{path}:3: row: invalid JSON: Expecting property name enclosed in double quotes at column 2",
                   "... and 3 more bad rows",
                   f"{path}:7: row: warning: duplicate of line 1",
                   f"{path}:8: row: warning: duplicate of line 1",
                   "... and 2 more duplicate rows",
                   f"{path}: 5 usable rows, 5 bad rows, 4 warnings (4 duplicate rows)"]


# ------------------------------------------------------------------------------ token-length warnings
@pytest.fixture(scope="module")
def tiny_tokenizer_path(tiny_base) -> str:
    return str(tiny_base)


def test_dpo_prompt_longer_than_max_prompt_length(tmp_path, tiny_tokenizer_path):
    path = tmp_path / "long.jsonl"
    long_prompt = " ".join(["Tell me about the fox."] * 20)
    path.write_bytes(jsonl(PAIR, {"prompt": long_prompt, "chosen": "It is kind.", "rejected": "It is rude."},
                           {"prompt": "Hi", "chosen": "It is kind. " * 30, "rejected": "No."}))
    out: list[str] = []
    rc = validate_file(str(path), "dpo", tokenizer=tiny_tokenizer_path, template="qwen", max_length=96,
                       max_prompt_length=32, out=out.append)
    assert rc == 0, out
    prompt = expected_line(out, str(path), 2, "prompt", "longer than max_prompt_length=32 (it will be truncated")
    assert "warning: prompt is " in prompt
    expected_line(out, str(path), 3, "chosen", "over max_length=96 (the response will be cut to")
    assert out[-1] == (f"{path}: 3 usable rows, 0 bad rows, 2 warnings (1 prompt longer than max_prompt_length, "
                       "1 prompt+response over max_length)")
    assert validate_file(str(path), "dpo", tokenizer=tiny_tokenizer_path, template="qwen", max_length=96,
                         max_prompt_length=32, strict=True, out=[].append) == 1
    # Without a tokenizer there are no token-length checks.
    assert validate_file(str(path), "dpo", strict=True, out=[].append) == 0


def test_sft_row_over_max_length(tmp_path, tiny_tokenizer_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(jsonl(FIREFLY, {"conversation": [{"human": "Tell me about the fox. " * 20,
                                                       "assistant": "It is kind."}]}))
    out: list[str] = []
    assert validate_file(str(path), "sft", tokenizer=tiny_tokenizer_path, max_length=48, out=out.append) == 0
    # the long prompt pushes the whole answer past max_length: training leaves this row out, and validate says so
    expected_line(out, str(path), 2, "row", "tokens, over max_length=48, and no assistant token falls within it, "
                                            "so training leaves the row out")
    assert out[-1].endswith("1 warning (1 row with no assistant token within max_length (left out))")


def test_unloadable_tokenizer_skips_token_checks_with_one_warning(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(jsonl(FIREFLY))
    out: list[str] = []
    assert validate_file(str(path), "sft", tokenizer=str(tmp_path / "no-such-model"), out=out.append) == 0
    assert out[0].startswith("warning: token-length checks skipped: cannot load the tokenizer ")
    assert out[-1] == f"{path}: 1 usable row, 0 bad rows, 0 warnings"


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="rlhf"), "--format"),
    (dict(kind="sft", fmt="pair"), "--data-format: 'pair' is not a sft format"),
    (dict(kind="sft", max_length=64), "need --tokenizer"),
    (dict(kind="sft", tokenizer="x", max_prompt_length=8), "only applies to dpo"),
    (dict(kind="dpo", tokenizer="x", max_length=64, max_prompt_length=64), "between 1 and max_length-1"),
])
def test_bad_arguments_are_config_errors(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        validate_file(str(tmp_path / "x.jsonl"), out=[].append, **kwargs)


# ------------------------------------------------------------------------------------------------ recipes
def write_recipe(path: Path, model: str, sft: Path, dpo: Path | None = None, extra: str = "") -> Path:
    stages = [{"stage": "sft", "data": {"train": str(sft), "format": "firefly"}, "max_length": 64}]
    if dpo is not None:
        stages.append({"stage": "dpo", "data": {"train": str(dpo), "eval": str(dpo)}, "max_length": 64,
                       "max_prompt_length": 32})
    path.write_text(yaml.safe_dump({"name": "t", "model": {"name_or_path": model, "template": "qwen"},
                                    "stages": stages}) + extra)
    return path


@pytest.mark.slow
def test_recipe_with_a_bad_row_fails_naming_file_and_line(tmp_path, tiny_base):
    sft = tmp_path / "sft.jsonl"
    sft.write_bytes(jsonl(FIREFLY, {"conversation": [{"human": "hi"}]}, FIREFLY_2))
    dpo = tmp_path / "dpo.jsonl"
    dpo.write_bytes(jsonl(PAIR, PAIR_2))
    recipe = write_recipe(tmp_path / "recipe.yaml", str(tiny_base), sft, dpo)
    proc = run_cli("validate", str(recipe))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    expected_line(lines, str(sft), 2, "conversation[0].assistant", "missing required field")
    assert f"{sft}: 2 usable rows, 1 bad row, 0 warnings" in lines
    assert lines.count(f"{dpo}: 2 usable rows, 0 bad rows, 0 warnings") == 2  # data.train and data.eval
    assert "token-length checks skipped" not in proc.stdout


@pytest.mark.slow
def test_good_recipe_passes(tmp_path, tiny_base):
    sft = tmp_path / "sft.jsonl"
    sft.write_bytes(jsonl(FIREFLY, FIREFLY_2))
    proc = run_cli("validate", str(write_recipe(tmp_path / "recipe.yaml", str(tiny_base), sft)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == f"{sft}: 2 usable rows, 0 bad rows, 0 warnings"


def test_recipe_with_an_unknown_key_exits_2_naming_it(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_bytes(jsonl(FIREFLY))
    recipe = write_recipe(tmp_path / "recipe.yaml", "x", sft, extra="sede: 3\n")
    proc = run_cli("validate", str(recipe))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and "sede: unknown key" in proc.stderr
    with pytest.raises(ConfigError, match="sede: unknown key; did you mean 'seed'"):
        validate_recipe(str(recipe), out=[].append)


def test_recipe_overrides_and_unloadable_tokenizer(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_bytes(jsonl(FIREFLY))
    bad.write_bytes(jsonl("{"))
    recipe = write_recipe(tmp_path / "recipe.yaml", str(tmp_path / "no-such-model"), good)
    out: list[str] = []
    # a missing model directory is refused as every command refuses it (dpo_dist.config.preflight), before any data
    with pytest.raises(ConfigError, match=r"^model.name_or_path: .*no-such-model does not exist; give an existing"):
        validate_recipe(str(recipe), out=out.append)
    assert out == []
    broken = tmp_path / "broken-model"  # a model directory whose tokenizer does not load
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    recipe = write_recipe(tmp_path / "recipe.yaml", str(broken), good)
    assert validate_recipe(str(recipe), out=out.append) == 0
    assert out[0].startswith("warning: token-length checks skipped: cannot load the tokenizer")
    assert out[1] == f"== stage sft (sft) data.train: {good}"
    out.clear()
    assert validate_recipe(str(recipe), [f"stages.sft.data.train={bad}"], out=out.append) == 1
    expected_line(out, str(bad), 1, "row", "invalid JSON")


@pytest.mark.slow
def test_odd_characters_in_paths_are_never_run_by_a_shell(tmp_path):
    weird = tmp_path / "we ird 'single' \"double\" $(touch pwned)"
    weird.mkdir()
    data = weird / "my data $(touch pwned).jsonl"
    data.write_bytes(jsonl(FIREFLY, "{"))
    model = weird / "model $(touch pwned)"  # a model directory whose tokenizer does not load: the data is checked
    model.mkdir()
    (model / "config.json").write_text("{}")
    recipe = write_recipe(weird / "recipe $(touch pwned).yaml", str(model), data)
    proc = run_cli("validate", "--data", str(data), "--format", "sft", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    expected_line(proc.stdout.splitlines(), str(data), 2, "row", "invalid JSON")
    proc = run_cli("validate", str(recipe), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    expected_line(proc.stdout.splitlines(), str(data), 2, "row", "invalid JSON")
    assert not [p for p in tmp_path.rglob("pwned")]
    assert not (Path.cwd() / "pwned").exists() and not (REPO / "pwned").exists()


def test_command_line_needs_a_recipe_or_data():
    proc = run_cli("validate")
    assert proc.returncode == 2 and "give a RECIPE, or --data FILE" in proc.stderr


# ------------------------------------------------------------------------------------ reader behaviour
def test_check_source_opens_without_reading_rows(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not load"))
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_bytes(b"{{{ not json\n")
    check_source(str(bad_rows), "sft")  # rows are not read
    check_source(str(tmp_path), "pretrain")
    check_source("org/name", "dpo")
    for source, kind, message in [(str(tmp_path / "nope.jsonl"), "sft", "no such file or directory"),
                                  (str(tmp_path), "sft", "is a directory"),
                                  (str(bad_rows.with_suffix(".csv")), "sft", "no such file")]:
        with pytest.raises(DataError, match=message):
            check_source(source, kind)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        check_source(str(tmp_path / "x.csv"), "sft")
    with pytest.raises(ValueError, match="kind"):
        check_source(str(bad_rows), "rlhf")


def test_read_source_keeps_warnings_and_rows(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_bytes(BOM + jsonl(FIREFLY, FIREFLY_2, FIREFLY, end=b"\r\n"))
    res = read_source(str(path), "sft")
    assert len(res.rows) == 3 and res.skipped == []
    assert sorted((w.loc, w.field, w.kind) for w in res.warnings) == [
        (f"{path}:1", "row", "bom"), (f"{path}:1", "row", "crlf"), (f"{path}:3", "row", "duplicate")]
    assert all(isinstance(w, RowWarning) for w in res.warnings)
    assert res.warning_summary() == ("3 warnings (1 file starting with a byte order mark, 1 duplicate row, "
                                     "1 file with CRLF line ends)")


def test_enormous_lines_are_skipped_and_reading_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DIST_MAX_LINE_BYTES", "100")
    short = json.dumps({"text": "t"})
    exact = json.dumps({"text": "x" * (100 - len(short) + 1)})
    assert len(exact) == 100
    path = tmp_path / "t.jsonl"
    path.write_bytes(jsonl(TEXT, {"text": "y" * 1_000_000}, exact, {"text": "z" * 101}, end=b"\r\n")
                     + exact.encode() + b"\n" + json.dumps({"text": "w" * 200}).encode())
    res = scan_source(str(path), "pretrain")
    assert [r["loc"] for r in res.rows] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert [(b.loc, b.reason) for b in res.skipped] == [
        (f"{path}:2", "line is 1000012 bytes, over the 100-byte limit (DPO_DIST_MAX_LINE_BYTES)"),
        (f"{path}:4", "line is 113 bytes, over the 100-byte limit (DPO_DIST_MAX_LINE_BYTES)"),
        (f"{path}:6", "line is 212 bytes, over the 100-byte limit (DPO_DIST_MAX_LINE_BYTES)")]
    with pytest.raises(DataError, match=r":2: row: line is 1000012 bytes"):
        read_source(str(path), "pretrain")
    monkeypatch.setenv("DPO_DIST_MAX_LINE_BYTES", "lots")
    with pytest.raises(DataError, match="DPO_DIST_MAX_LINE_BYTES='lots'"):
        read_source(str(path), "pretrain")


def test_json_file_of_lines_obeys_the_line_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DIST_MAX_LINE_BYTES", "100")
    path = tmp_path / "t.json"
    path.write_bytes(jsonl(TEXT, {"text": "y" * 500}, TEXT))
    res = scan_source(str(path), "pretrain")
    assert [b.loc for b in res.skipped] == [f"{path}:2"]
    assert [w.kind for w in res.warnings] == ["duplicate"]


def test_validate_with_a_profile_makes_the_checks_training_makes(tmp_path, tiny_base):
    sft = tmp_path / "sft.jsonl"
    sft.write_bytes(jsonl(FIREFLY))
    recipe = write_recipe(tmp_path / "recipe.yaml", str(tiny_base), sft,
                          extra="train:\n  global_batch_size: 3\n  fp16: true\n")
    out: list[str] = []
    # 3 rows per step cannot be split over the profile's 2 processes: training would refuse it before any weights.
    assert validate_recipe(str(recipe), out=out.append, profile="cpu-ddp-2") == 1
    (error,) = [line for line in out if line.startswith("error: profile cpu-ddp-2: ")]
    assert "global_batch_size" in error
    out.clear()
    assert validate_recipe(str(recipe), ["train.global_batch_size=4"], out=out.append, profile="cpu-bf16") == 0
    # The profile's precision wins over the recipe's; said once per stage, the line training logs too.
    assert "[train] stages.sft: profile cpu-bf16 trains in bf16, not the recipe's fp16 (fp16: true)" in out
    assert "profile cpu-bf16: the recipe fits it (global batch, methods, precision)" in out


def test_an_unreachable_hub_is_detected_and_the_token_checks_are_skipped_at_once(tmp_path, monkeypatch):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(jsonl(FIREFLY))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: as a machine with no network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    out: list[str] = []
    assert validate_file(str(path), "sft", tokenizer="some-org/some-model", out=out.append) == 0
    assert out[0].startswith("warning: token-length checks skipped: 'some-org/some-model' is not a local directory "
                             "nor in the Hugging Face cache, and http://127.0.0.1:9 is unreachable")
    assert out[-1] == f"{path}: 1 usable row, 0 bad rows, 0 warnings"
