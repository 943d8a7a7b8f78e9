"""The streamed data pipeline: registry templates assembled from skeletons (same ids and labels as rendering turn by
turn, on every template), batched tokenization, streamed packing, dataset directories as sources, the cache entry's
lock (an interrupted build, a dead builder, two real processes asking at once), and `dpo-dist prepare`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer

import dpo_dist.data.tokenize as tk
from dpo_dist.data import cache
from dpo_dist.data.formats import DataError, RowStream
from dpo_dist.data.render import Renderer
from dpo_dist.data.templates import ChatTemplate, get_template, template_names
from tests.helpers import write_jsonl

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    """The tiny tokenizer with every registry template's end-of-turn token, so every template can be used."""
    tok = AutoTokenizer.from_pretrained(tiny_base)
    eots = sorted({get_template(n).end_of_turn for n in template_names()} - {None} - set(tok.get_vocab()))
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in eots], special_tokens=True)
    return tok


def conv(*roles: str, salt: str = "") -> list[dict]:
    text = {"system": "Be brief {{ not jinja }}.", "user": "Tell me about the fox\nand its den", "assistant":
            "It is kind. It sleeps in the sun. ü"}
    return [{"role": r, "content": f"{text[r]} {salt}{k}"} for k, r in enumerate(roles)]


SHAPES = [("user", "assistant"), ("system", "user", "assistant"),
          ("user", "assistant", "user", "assistant", "user", "assistant"),
          ("system", "user", "assistant", "user", "assistant")]


def reference_sft(tokenizer, renderer: Renderer, messages: list[dict], max_length: int) -> dict:
    """Labels from rendering every prefix, each segment tokenized with a plain tokenizer call."""
    ids, labels = [], []
    for text, supervised in renderer.incremental_segments(renderer.prepare(messages)):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if supervised else [tk.IGNORE] * len(piece)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": len(ids) > max_length}


@pytest.mark.parametrize("name", template_names())
def test_skeleton_segments_equal_incremental_rendering_on_every_registry_template(tokenizer, name):
    r = Renderer(tokenizer, name)
    for shape in SHAPES:
        first, later = conv(*shape, salt="a"), conv(*shape, salt="later text ")
        r.segments(r.prepare(first))  # builds and checks the skeleton for this role sequence
        key = ("sft", *(m["role"] for m in r.prepare(first)))
        assert r._skeletons[key] is not None, (name, shape)  # the fast path is really taken below
        prepared = r.prepare(later)
        assert r.segments(prepared) == r.incremental_segments(prepared), (name, shape)
        assert tk.tokenize_sft({"messages": later}, tokenizer, r, 512) == reference_sft(tokenizer, r, later, 512)
        assert tk.tokenize_sft({"messages": later}, tokenizer, r, 20) == reference_sft(tokenizer, r, later, 20)

        prompt = r.prepare(later[:-1])
        completions = ["It is calm {{x}}.", "It is rude.\n"]
        r.prompt_and_completions(r.prepare(first[:-1]), completions)
        assert r.prompt_and_completions(prompt, completions) == \
            r.incremental_prompt_and_completions(prompt, completions), (name, shape)
        row = {"prompt": later[:-1], "chosen": completions[0], "rejected": completions[1]}
        head, pieces = r.incremental_prompt_and_completions(prompt, completions)
        got = tk.tokenize_dpo(row, tokenizer, r, max_length=512, max_prompt_length=256)
        assert got["prompt_ids"] == tokenizer(head, add_special_tokens=False)["input_ids"][-256:]
        assert [got["chosen_ids"], got["rejected_ids"]] == [tokenizer(p, add_special_tokens=False)["input_ids"]
                                                            for p in pieces]


def test_a_template_that_alters_content_falls_back_to_incremental_rendering(tokenizer):
    r = Renderer(tokenizer, "qwen")
    r.template = ChatTemplate("trimmed", get_template("qwen").source.replace(
        "message['content']", "message['content'] | trim"), None, "<|im_end|>")
    padded = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": " ok "}]
    first = r.segments(padded)
    assert r._skeletons[("sft", "user", "assistant")] is None  # the check against a real render caught it
    assert first == r.incremental_segments(padded)
    assert "<|im_start|>user\nhi<|im_end|>" in first[0][0]
    later = [{"role": "user", "content": " other "}, {"role": "assistant", "content": "x "}]
    assert r.segments(later) == r.incremental_segments(later)


def test_content_holding_the_placeholder_characters_is_rendered_normally(tokenizer):
    r = Renderer(tokenizer, "qwen")
    tricky = [{"role": "user", "content": "\ue0000\ue001"}, {"role": "assistant", "content": "fine"}]
    r.segments(conv("user", "assistant"))
    assert r.segments(tricky) == r.incremental_segments(tricky)


def test_batched_backend_encoding_equals_the_tokenizer_call(tokenizer):
    texts = ["<|im_start|>user\nhi<|im_end|>\n", " spaces  and\ttabs", "ünïcödé 漢字", "", "<|endoftext|>x"]
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert tk._encode(tokenizer, texts) == expected
    # A padded, truncated call (as generation makes) leaves its settings on the fast tokenizer's backend.
    tokenizer(texts, padding=True, truncation=True, max_length=4, add_special_tokens=False)
    try:
        assert tk._encode(tokenizer, texts) == expected
    finally:
        tokenizer(texts[:1], add_special_tokens=False)  # resets the backend for the other tests


def test_rows_stream_through_the_reader(tmp_path):
    src = write_jsonl(tmp_path / "sft.jsonl", [{"conversation": [{"human": f"q{i}", "assistant": f"a{i}"}]}
                                               for i in range(5)] + ["{broken"])
    stream = iter(RowStream(str(src), "sft"))
    assert next(stream)["loc"] == f"{src}:1"  # the first row arrives before the bad line 6 is read
    with pytest.raises(DataError, match=rf"{src}:6: row: invalid JSON"):
        list(stream)
    skipping = RowStream(str(src), "sft", on_bad_row="skip")
    assert sum(1 for _ in skipping) == 5
    result = skipping.result()
    assert result.rows == [] and result.n_rows == 5 and [b.loc for b in result.skipped] == [f"{src}:6"]


def test_pretraining_blocks_are_packed_across_batches_as_they_fill(tokenizer, tmp_path, monkeypatch):
    texts = [f"The fox {i} is kind." * (1 + i % 4) for i in range(23)]
    texts += ["A short tail."] * (sum(len(tokenizer(t)["input_ids"]) + 1 for t in texts) % 16 == 0)
    src = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    monkeypatch.setattr(tk, "ROWS_BATCH", 4)  # the carried tail crosses several batches
    out = tk.prepare_dataset("pretrain", str(src), tokenizer, Renderer(tokenizer, "qwen"), max_length=16, **QUIET)
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    expected = tk.pack_blocks(docs, 16)
    assert out.dataset["input_ids"] == expected and out.dataset["labels"] == expected
    assert len(expected[-1]) < 16 and sum(map(len, expected)) == sum(map(len, docs))  # the short tail is kept
    assert out.report["tokens"] == sum(map(len, docs)) and out.report["examples"] == len(expected)


def test_sft_rows_without_an_assistant_token_in_max_length_are_counted_not_hidden(tokenizer, tmp_path):
    rows = [{"conversation": [{"human": "q " * n, "assistant": "a"}]} for n in (1, 60, 2)]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    logs: list[str] = []
    r = Renderer(tokenizer, "qwen")
    # TRL would drop such a row without naming it; here it is refused by default, and named when left out.
    with pytest.raises(DataError, match=rf"^{src}:2: no assistant token falls within max_length=48; raise "
                                        "max_length, or set data.on_bad_row: skip"):
        tk.prepare_dataset("sft", str(src), tokenizer, r, max_length=48, **QUIET)
    out = tk.prepare_dataset("sft", str(src), tokenizer, r, max_length=48, on_bad_row="skip", log=logs.append)
    assert len(out.dataset) == 2 and out.report["no_supervised_tokens"] == [f"{src}:2"]
    assert out.dataset["loc"] == [f"{src}:1", f"{src}:3"] and "supervised" not in out.dataset.column_names
    assert f"[data] left out {src}:2: no assistant token falls within max_length=48" in logs
    assert any("1 of 3 rows left out: no assistant token falls within max_length=48" in line for line in logs)
    again = tk.prepare_dataset("sft", str(src), tokenizer, r, max_length=48, on_bad_row="skip", **QUIET)
    assert again.from_cache and again.dataset["loc"] == out.dataset["loc"]
    with pytest.raises(DataError, match=rf"{src}: no row has an assistant token within max_length=16; raise "):
        tk.prepare_dataset("sft", str(src), tokenizer, r, max_length=16, on_bad_row="skip", **QUIET)


# ---- dataset directories: the real `datasets` loaders on the layouts they read -----------------------------------

FIREFLY = [{"conversation": [{"human": f"q{i}", "assistant": f"answer {i}"}]} for i in range(7)]


def test_a_hub_style_dataset_directory_is_read_by_split(tokenizer, tmp_path):
    repo = tmp_path / "org__firefly"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(FIREFLY[:5]), repo / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(FIREFLY[5:]), repo / "data" / "test-00000-of-00001.parquet")
    (repo / "README.md").write_text(textwrap.dedent("""\
        ---
        configs:
        - config_name: default
          data_files:
          - split: train
            path: data/train-*.parquet
          - split: test
            path: data/test-*.parquet
        ---
        # A dataset card
        """))
    r = Renderer(tokenizer, "qwen")
    test = tk.prepare_dataset("sft", str(repo), tokenizer, r, max_length=64, split="test", **QUIET)
    assert test.dataset["loc"] == [f"{repo}[test]#row 0", f"{repo}[test]#row 1"]
    assert tokenizer.decode([t for t, lab in zip(test.dataset[1]["input_ids"], test.dataset[1]["labels"])
                             if lab != tk.IGNORE]) == "answer 6<|im_end|>\n"
    assert len(tk.prepare_dataset("sft", str(repo), tokenizer, r, max_length=64, **QUIET).dataset) == 5


def test_a_save_to_disk_directory_is_read_and_a_missing_split_is_named(tokenizer, tmp_path):
    from datasets import Dataset, DatasetDict

    pairs = [{"prompt": f"Describe {i}.", "chosen": "It is calm.", "rejected": "It is rude."} for i in range(6)]
    DatasetDict({"train": Dataset.from_list(pairs[:4]), "validation": Dataset.from_list(pairs[4:])}).save_to_disk(
        str(tmp_path / "saved"))
    r = Renderer(tokenizer, "qwen")
    out = tk.prepare_dataset("dpo", str(tmp_path / "saved"), tokenizer, r, max_length=64, split="validation", **QUIET)
    assert len(out.dataset) == 2 and out.dataset["loc"][0] == f"{tmp_path / 'saved'}[validation]#row 0"
    with pytest.raises(DataError, match=r"has no split 'test' \(it has train, validation\); set data.split"):
        tk.prepare_dataset("dpo", str(tmp_path / "saved"), tokenizer, r, max_length=64, split="test", **QUIET)
    Dataset.from_list(pairs).save_to_disk(str(tmp_path / "one"))  # a single Dataset: its rows are the split
    assert len(tk.prepare_dataset("dpo", str(tmp_path / "one"), tokenizer, r, max_length=64, **QUIET).dataset) == 6


# ---- the cache entry's lock ---------------------------------------------------------------------------------------


def _sft_file(path: Path, rows: int, bad_last: bool = False) -> Path:
    lines = [{"conversation": [{"human": f"Tell me about animal {i}. " * 2, "assistant": f"It is kind {i}. " * 20}]}
             for i in range(rows)]
    return write_jsonl(path, lines + (["{not json"] if bad_last else []))


def test_an_interrupted_build_leaves_no_entry_and_the_next_run_builds_it(tokenizer, tmp_path):
    src = _sft_file(tmp_path / "sft.jsonl", 30)
    r = Renderer(tokenizer, "qwen")

    def interrupt(line: str) -> None:
        if "rows (format" in line:  # after the rows were read, before tokenizing
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tk.prepare_dataset("sft", str(src), tokenizer, r, max_length=64, log=interrupt)
    root = cache.cache_root()
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []  # no entry, no temporary dir
    (lock,) = root.glob("*.lock")
    assert json.loads(lock.read_text())["state"] == "failed"
    logs: list[str] = []
    again = tk.prepare_dataset("sft", str(src), tokenizer, r, max_length=64, log=logs.append)
    assert not again.from_cache and len(again.dataset) == 30 and not lock.exists()
    assert not any("waiting while" in line for line in logs)  # its own failed lock is nobody to wait for
    assert any("an earlier build by rank 0" in line and "failed (interrupted); building it here" in line
               for line in logs)
    assert tk.prepare_dataset("sft", str(src), tokenizer, r, max_length=64, **QUIET).from_cache


def test_a_dead_builders_lock_is_taken_over(tokenizer, tmp_path):
    src = _sft_file(tmp_path / "sft.jsonl", 10)
    r = Renderer(tokenizer, "qwen")
    first = tk.prepare_dataset("sft", str(src), tokenizer, r, max_length=64, **QUIET)
    import shutil

    shutil.rmtree(first.path)
    lock = first.path.with_name(first.path.name + ".lock")
    lock.write_text(json.dumps({"host": "gone", "pid": 1, "rank": "0", "state": "building"}))
    old = time.time() - cache.STALE_S - 10
    os.utime(lock, (old, old))
    logs: list[str] = []
    again = tk.prepare_dataset("sft", str(src), tokenizer, r, max_length=64, log=logs.append)
    assert not again.from_cache and again.dataset["input_ids"] == first.dataset["input_ids"]
    assert any("rank 0 (pid 1 on gone) stopped updating its lock" in line and "building it here" in line
               for line in logs)


CHILD = """
import json, os, sys, time
from pathlib import Path
from transformers import AutoTokenizer
from dpo_dist.data.cache import BuildFailed
from dpo_dist.data.formats import DataError
from dpo_dist.data.render import Renderer
from dpo_dist.data.tokenize import prepare_dataset

tok_dir, src, go, out = sys.argv[1:5]
tokenizer = AutoTokenizer.from_pretrained(tok_dir)
renderer = Renderer(tokenizer, "qwen")
Path(out + ".ready").touch()
while not Path(go).exists():
    time.sleep(0.01)
logs = []
try:
    p = prepare_dataset("sft", src, tokenizer, renderer, max_length=128, log=logs.append)
    result = {"from_cache": p.from_cache, "rows": len(p.dataset), "ids": p.dataset[-1]["input_ids"]}
except (DataError, BuildFailed) as err:
    result = {"error": type(err).__name__, "message": str(err)}
Path(out).write_text(json.dumps({**result, "logs": logs}))
"""


def race(tmp_path: Path, tiny_base: Path, src: Path) -> list[dict]:
    """Two processes ask for the same entry at the same moment."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    go = tmp_path / "go"
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(tiny_base), str(src), str(go), str(o)], cwd=ROOT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}) for o in outs]
    deadline = time.time() + 120
    while not all(Path(str(o) + ".ready").exists() for o in outs) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    for p in procs:
        assert p.wait(timeout=300) == 0
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.slow
def test_two_processes_asking_at_once_tokenize_once_and_the_other_waits_on_the_entry(tiny_base, tmp_path):
    src = _sft_file(tmp_path / "sft.jsonl", 3000)
    results = race(tmp_path, tiny_base, src)
    assert sorted(r["from_cache"] for r in results) == [False, True], results
    builder, waiter = sorted(results, key=lambda r: r["from_cache"])
    assert builder["rows"] == waiter["rows"] == 3000 and builder["ids"] == waiter["ids"]
    assert any(line.startswith(f"[data] {src}: waiting while rank 0 (pid ") for line in waiter["logs"]), waiter["logs"]


@pytest.mark.slow
def test_when_the_builder_fails_the_waiter_stops_with_its_message(tiny_base, tmp_path):
    src = _sft_file(tmp_path / "sft.jsonl", 3000, bad_last=True)
    results = race(tmp_path, tiny_base, src)
    errors = sorted(results, key=lambda r: r["error"])
    assert [r["error"] for r in errors] == ["BuildFailed", "DataError"], results
    failed, data_error = errors
    assert data_error["message"].startswith(f"{src}:3001: row: invalid JSON")
    assert failed["message"].startswith(f"{src}: tokenizing failed on rank 0 (pid ")
    assert failed["message"].endswith(data_error["message"])


# ---- dpo-dist prepare ---------------------------------------------------------------------------------------------


def test_prepare_tokenizes_every_stage_and_source_with_one_line_each(tiny_base, tmp_path, capsys):
    from dpo_dist.cli import main

    sft = _sft_file(tmp_path / "sft.jsonl", 12)
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"}
                                               for i in range(6)])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "p", "model": {"name_or_path": str(tiny_base), "template": "qwen"}, "output_dir": str(tmp_path / "o"),
        "stages": [{"stage": "sft", "data": {"train": str(sft), "eval": str(sft)}, "max_length": 64},
                   {"stage": "dpo", "data": {"train": str(dpo)}, "max_length": 64}]}))
    assert main(["prepare", str(recipe), "--profile", "cpu-ddp-2", "seed=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    summaries = [ln for ln in lines if " tokens -> " in ln]
    assert len(summaries) == 3
    assert summaries[0].startswith(f"[data] {sft}: 12 rows, 0 skipped, ") and "truncated" in summaries[0]
    assert summaries[2].startswith(f"[data] {dpo}: 6 rows, 0 skipped, 0 truncated, ")
    assert lines[-1].startswith("[prepare] 3 sources ready in ")
    assert main(["prepare", str(recipe)]) == 0
    assert sum("tokenized cache hit" in ln for ln in capsys.readouterr().out.splitlines()) == 3
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{"])
    assert main(["prepare", str(recipe), f"stages.1.data.train={bad}"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {bad}:1: row: invalid JSON: Expecting property name " \
                                              "enclosed in double quotes at column 2"


def test_a_json_array_streams_item_by_item_across_chunks(tmp_path, monkeypatch):
    import dpo_dist.data.formats as formats

    rows = [{"conversation": [{"human": f"q {i} ünï", "assistant": "a " * (i % 7 + 1)}]} for i in range(40)]
    src = tmp_path / "sft.json"
    src.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n", encoding="utf-8")
    monkeypatch.setattr(formats, "_CHUNK", 7)  # items and multi-byte characters are cut between reads
    stream = iter(RowStream(str(src), "sft"))
    first = next(stream)  # before the rest of the file is read
    assert first["loc"] == f"{src}#row 0" and first["messages"][0]["content"] == "q 0 ünï"
    assert [r["loc"] for r in stream] == [f"{src}#row {i}" for i in range(1, 40)]
    # A truncated array past the line limit: the line where the parse stopped, without reading the file whole.
    src.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows[:3]) + ",\n{\"conversation\": [", encoding="utf-8")
    monkeypatch.setenv("DPO_DIST_MAX_LINE_BYTES", "64")
    with pytest.raises(DataError, match=rf"^{src}:5: row: invalid JSON: an item does not parse$"):
        list(RowStream(str(src), "sft"))
    monkeypatch.delenv("DPO_DIST_MAX_LINE_BYTES")  # under the limit: json's own message for the whole text
    with pytest.raises(DataError, match=rf"^{src}:5: row: invalid JSON: Expecting value at column 19$"):
        list(RowStream(str(src), "sft"))


def test_validate_says_which_rows_training_leaves_out(tokenizer, tmp_path):
    from dpo_dist.commands.validate import LengthLimits, check_data

    rows = [{"conversation": [{"human": "q " * n, "assistant": "a " * 30}]} for n in (1, 60)]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    limits = LengthLimits(tokenizer, Renderer(tokenizer, "qwen"), 48)
    check = check_data(str(src), "sft", limits=limits)
    assert [(w.loc, w.kind, w.reason.split(", ")[-1]) for w in check.warnings] == [
        (f"{src}:1", "sft_too_long", "over max_length=48 (it will be truncated)"),
        (f"{src}:2", "no_supervised_tokens", "so training leaves the row out")]
    out = tk.prepare_dataset("sft", str(src), tokenizer, Renderer(tokenizer, "qwen"), max_length=48,
                             on_bad_row="skip", **QUIET)
    assert out.dataset["loc"] == [f"{src}:1"] and out.report["no_supervised_tokens"] == [f"{src}:2"]  # same verdict
    # Under on_bad_row: error (a recipe's default) both refuse the row.
    refused = check_data(str(src), "sft", limits=limits, on_bad_row="error")
    assert [b.loc for b in refused.bad] == [f"{src}:2"] and refused.failed()
    assert "training refuses it (on_bad_row: error)" in str(refused.bad[0])
    with pytest.raises(DataError, match=f"{src}:2: "):
        tk.prepare_dataset("sft", str(src), tokenizer, Renderer(tokenizer, "qwen"), max_length=48, **QUIET)
