"""Label masks, DPO truncation, packing and the tokenization cache, on the tiny model's tokenizer."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

import dpo_dist.data.tokenize as tk
from dpo_dist.data.render import Renderer, TemplateError
from dpo_dist.data.tokenize import IGNORE, pack_blocks, prepare_dataset, tokenize_dpo, tokenize_sft
from tests.helpers import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tell me about the fox."},
    {"role": "assistant", "content": "It is kind. It sleeps in the sun."},
    {"role": "user", "content": "And the owl?"},
    {"role": "assistant", "content": "It is calm. It sings at dawn."},
]


def supervised_text(tokenizer, out) -> list[str]:
    """Decode each contiguous run of supervised tokens."""
    runs, cur = [], []
    for tok, lab in zip(out["input_ids"], out["labels"]):
        if lab == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == tok
            cur.append(tok)
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


def test_sft_supervises_every_assistant_turn_and_nothing_else(tokenizer):
    out = tokenize_sft({"messages": CONV}, tokenizer, Renderer(tokenizer, "qwen"), max_length=512)
    assert supervised_text(tokenizer, out) == [
        "It is kind. It sleeps in the sun.<|im_end|>\n",
        "It is calm. It sings at dawn.<|im_end|>\n",
    ]
    assert not out["truncated"]


@pytest.mark.parametrize("template", ["default", "vicuna", "llama2", "zephyr", "deepseek"])
def test_eos_terminated_templates_learn_the_end_token(tokenizer, template):
    out = tokenize_sft({"messages": CONV[1:]}, tokenizer, Renderer(tokenizer, template), max_length=512)
    runs = supervised_text(tokenizer, out)
    assert len(runs) == 2
    assert all("<|endoftext|>" in r for r in runs), runs
    assert "It is kind." in runs[0] and "It is calm." in runs[1]


def test_template_whose_end_token_is_missing_is_refused(tokenizer):
    with pytest.raises(TemplateError, match="llama3"):
        Renderer(tokenizer, "llama3")  # <|eot_id|> is not in the tiny vocabulary


def test_default_system_prompt_is_added_and_overridable(tokenizer):
    r = Renderer(tokenizer, "qwen")
    assert r.prepare(CONV[1:])[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert r.prepare(CONV)[0]["content"] == "Be brief."


def test_tokenizer_own_template_is_used_when_present(tokenizer):
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    r = Renderer(tok)
    assert r.name == "tokenizer" and r.eot_token == "<|im_end|>"
    out = tokenize_sft({"messages": CONV[1:3]}, tok, r, max_length=512)
    assert supervised_text(tok, out) == ["It is kind. It sleeps in the sun.<|im_end|>\n"]


def test_dpo_truncates_prompt_from_the_left_then_responses(tokenizer):
    r = Renderer(tokenizer, "qwen")
    long_prompt = " ".join(["Tell me about the fox."] * 40)
    row = {"prompt": [{"role": "user", "content": long_prompt}], "chosen": "It is kind. " * 20,
           "rejected": "It is rude."}
    out = tokenize_dpo(row, tokenizer, r, max_length=64, max_prompt_length=24)
    full_prompt = tokenizer(r.render(r.prepare(row["prompt"]), add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
    assert out["prompt_ids"] == full_prompt[-24:]  # the end of the prompt (generation header) is kept
    assert len(out["prompt_ids"]) + len(out["chosen_ids"]) == 64
    assert tokenizer.decode(out["rejected_ids"]) == "It is rude.<|im_end|>\n"
    assert out["truncated"] and out["prompt_truncated"]


def test_dpo_short_rows_are_untouched(tokenizer):
    r = Renderer(tokenizer, "qwen")
    row = {"prompt": CONV[:4], "chosen": "It is calm.", "rejected": "It is mean."}
    out = tokenize_dpo(row, tokenizer, r, max_length=512, max_prompt_length=256)
    text = tokenizer.decode(out["prompt_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.") and text.endswith("<|im_start|>assistant\n")
    assert "It is kind. It sleeps in the sun." in text  # the history is part of the prompt
    assert tokenizer.decode(out["chosen_ids"]) == "It is calm.<|im_end|>\n"
    assert not out["truncated"]


def test_pack_blocks_keeps_every_token():
    blocks = pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)
    assert blocks == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]


def test_second_run_reads_the_cache_and_does_no_tokenization(tokenizer, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "sft.jsonl", [{"conversation": [{"human": f"q{i}", "assistant": f"a{i}"}]}
                                               for i in range(20)])
    r = Renderer(tokenizer, "qwen")
    first = prepare_dataset("sft", str(src), tokenizer, r, max_length=64, log=lambda *_: None)
    assert not first.from_cache and len(first.dataset) == 20

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as patch:  # scoped: the fixture's DPO_DIST_CACHE must stay in place
        patch.setattr(tk, "encode_sft", boom)
        patch.setattr(tk, "RowStream", boom)
        second = prepare_dataset("sft", str(src), tokenizer, r, max_length=64, log=lambda *_: None)
    assert second.from_cache
    assert second.dataset["input_ids"] == first.dataset["input_ids"]
    # A different length, template or file content is a different cache entry.
    assert not prepare_dataset("sft", str(src), tokenizer, r, max_length=63, log=lambda *_: None).from_cache
    assert not prepare_dataset("sft", str(src), tokenizer, Renderer(tokenizer, "default"), max_length=64,
                               log=lambda *_: None).from_cache
    write_jsonl(src, [{"conversation": [{"human": "x", "assistant": "y"}]}] * 3)
    assert len(prepare_dataset("sft", str(src), tokenizer, r, max_length=64, log=lambda *_: None).dataset) == 3


def test_parallel_tokenization_matches_serial(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": f"Tell me about the fox {i}.", "chosen": "It is kind.",
                                                "rejected": "It is rude."} for i in range(600)])
    r = Renderer(tokenizer, "qwen")
    par = prepare_dataset("dpo", str(src), tokenizer, r, max_length=64, num_proc=2, log=lambda *_: None)
    rows = [tokenize_dpo({"prompt": [{"role": "user", "content": f"Tell me about the fox {i}."}],
                          "chosen": "It is kind.", "rejected": "It is rude."}, tokenizer, r, 64, 32)
            for i in (0, 599)]
    assert par.dataset[0]["prompt_ids"] == rows[0]["prompt_ids"]
    assert par.dataset[599]["prompt_ids"] == rows[1]["prompt_ids"]


def test_skipped_rows_are_reported(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": "a", "chosen": "x", "rejected": "y"},
        "{not json",
        {"prompt": "b", "chosen": "same", "rejected": "same"},
        {"prompt": "c", "chosen": "x", "rejected": "y"},
    ])
    logs = []
    out = prepare_dataset("dpo", str(src), tokenizer, Renderer(tokenizer, "qwen"), max_length=64,
                          on_bad_row="skip", log=logs.append)
    assert len(out.dataset) == 2
    assert len(out.report["skipped"]) == 2
    assert ":2:" in out.report["skipped"][0] and ":3:" in out.report["skipped"][1]
    assert any("2 skipped" in line for line in logs)


def test_skip_logs_exactly_the_skipped_rows(tokenizer, tmp_path):
    good = {"conversation": [{"human": "q", "assistant": "a"}]}
    src = write_jsonl(tmp_path / "sft.jsonl", [
        good,
        "{not json",
        {"conversation": [{"human": "q2", "assistant": " "}]},
        {"conversation": [{"human": "q3", "assistant": "a3"}]},
        {"messages": []},
        good,
    ])
    logs = []
    out = prepare_dataset("sft", str(src), tokenizer, Renderer(tokenizer, "qwen"), max_length=64,
                          on_bad_row="skip", log=logs.append)
    skipped = [line[len("[data] skipped "):] for line in logs if line.startswith("[data] skipped ")]
    assert skipped == out.report["skipped"]
    assert [line.split(": ")[:2] for line in skipped] == [
        [f"{src}:2", "row"], [f"{src}:3", "conversation[0].assistant"], [f"{src}:5", "row"]]
    assert f"[data] {src}: 1 warning (1 duplicate row); `dpo-dist validate` lists them" in logs
    assert out.report["warnings"] == {"duplicate": 1}
    # A second run reads the tokenized cache and still says which rows were skipped.
    logs.clear()
    again = prepare_dataset("sft", str(src), tokenizer, Renderer(tokenizer, "qwen"), max_length=64,
                            on_bad_row="skip", log=logs.append)
    assert again.from_cache
    assert [line[len("[data] skipped "):] for line in logs if line.startswith("[data] skipped ")] == skipped


def test_skip_log_is_capped_and_points_at_the_report(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "sft.jsonl",
                      [{"conversation": [{"human": "q", "assistant": "a"}]}] + ["{"] * (tk.SKIPPED_LOG_MAX + 10))
    logs = []
    out = prepare_dataset("sft", str(src), tokenizer, Renderer(tokenizer, "qwen"), max_length=64,
                          on_bad_row="skip", log=logs.append)
    skipped = [line for line in logs if line.startswith("[data] skipped ")]
    assert len(skipped) == tk.SKIPPED_LOG_MAX
    assert skipped[0].startswith(f"[data] skipped {src}:2: row: invalid JSON")
    assert skipped[-1].startswith(f"[data] skipped {src}:{tk.SKIPPED_LOG_MAX + 1}: row: ")
    n = tk.SKIPPED_LOG_MAX + 10
    assert f"[data] ... and 10 more: all {n} are listed in data_report.json" in logs
    assert len(out.report["skipped"]) == n
