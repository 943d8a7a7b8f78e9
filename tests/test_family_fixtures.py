"""Sanity checks of the offline family fixtures (tests/family_tokenizers.py, tests/data/chat_templates/)."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from family_tokenizers import FAMILIES, FAMILY_FACTS, TEMPLATES_DIR, build_family_model, chat_template  # noqa: E402

# sha256 of the verbatim template files, as recorded in tests/data/chat_templates/SOURCES.md
TEMPLATE_SHA256 = {
    "qwen2.5.jinja": "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
    "qwen3.jinja": "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",
    "llama3.1.jinja": "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
    "gemma2.jinja": "ecd6ae513fe103f0eb62e8ab5bfa8d0fe45c1074fa398b089c93a7e70c15cfd6",
}

# What a two-turn render must contain: the family's own turn markers.
TURN_MARKERS = {
    "qwen2.5": ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "<|im_start|>assistant\nIt is 4.<|im_end|>\n"],
    "qwen3": ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "<|im_start|>assistant\n", "It is 4.<|im_end|>\n"],
    "llama3.1": ["<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>",
                 "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 4.<|eot_id|>"],
    "gemma2": ["<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n", "<start_of_turn>model\nIt is 4.<end_of_turn>\n"],
}
CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_family_model(family, root / family) for family in FAMILIES}


def _load(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _ids(tokenizer, tokens):
    if tokens is None:
        return None
    if isinstance(tokens, str):
        return tokenizer.convert_tokens_to_ids(tokens)
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def test_families_and_facts_agree() -> None:
    assert FAMILIES == ("qwen2.5", "qwen3", "llama3.1", "gemma2")
    assert set(FAMILY_FACTS) == set(FAMILIES)
    for facts in FAMILY_FACTS.values():
        assert {"bos", "eos", "end_of_turn", "default_system"} <= set(facts)


@pytest.mark.parametrize("name", sorted(TEMPLATE_SHA256))
def test_template_files_are_the_recorded_verbatim_text(name: str) -> None:
    data = (TEMPLATES_DIR / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == TEMPLATE_SHA256[name], f"{name} changed: it must stay verbatim"
    assert name in (TEMPLATES_DIR / "SOURCES.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_a_loadable_directory_with_the_real_template(built, family: str) -> None:
    tokenizer = _load(built[family])
    assert tokenizer.chat_template == chat_template(family)
    expected_class = FAMILY_FACTS[family]["tokenizer_class"]
    if expected_class == "Qwen2Tokenizer":
        assert type(tokenizer).__name__ == "Qwen2Tokenizer"


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_the_family_turns(built, family: str) -> None:
    facts = FAMILY_FACTS[family]
    tokenizer = _load(built[family])
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    for marker in TURN_MARKERS[family]:
        assert marker in text, (marker, text)
    assert text.count(facts["end_of_turn"]) >= 2
    if facts["bos"] is not None:
        assert text.startswith(facts["bos"]) and text.count(facts["bos"]) == 1
    if facts["default_system"] is not None:
        assert facts["default_system"] in text
    prompt = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(facts["generation_prompt"])
    # tokenized through the template: exactly one BOS where the family has one (the template writes it, and the
    # chat path must not add a second)
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    if facts["bos"] is not None:
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_tokens_to_ids(facts["end_of_turn"]) in ids


def test_family_specific_template_behaviour(built) -> None:
    from jinja2.exceptions import TemplateError

    qwen3 = _load(built["qwen3"])
    off = qwen3.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    gemma = _load(built["gemma2"])
    with pytest.raises(TemplateError, match="System role not supported"):
        gemma.apply_chat_template([{"role": "system", "content": "Be terse."}] + CHAT, tokenize=False)
    qwen25 = _load(built["qwen2.5"])
    with_system = qwen25.apply_chat_template([{"role": "system", "content": "Be terse."}] + CHAT, tokenize=False)
    assert FAMILY_FACTS["qwen2.5"]["default_system"] not in with_system


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_are_single_ids_with_the_real_roles(built, family: str) -> None:
    facts = FAMILY_FACTS[family]
    tokenizer = _load(built[family])
    decoder = tokenizer.added_tokens_decoder
    for token in facts["special_tokens"] + facts["added_non_special"]:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id], token
        assert decoder[token_id].special is (token in facts["special_tokens"]), token
    assert tokenizer.bos_token == facts["bos"]
    assert tokenizer.eos_token == facts["eos"]
    assert tokenizer.pad_token == facts["pad"]
    for token in facts["added_non_special"]:  # plain added tokens survive skip_special_tokens, as in the real one
        ids = tokenizer(f"{token}x{facts['eos']}", add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == f"{token}x"


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_is_added_only_where_the_real_tokenizer_adds_it(built, family: str) -> None:
    tokenizer = _load(built[family])
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    if FAMILY_FACTS[family]["adds_bos"]:
        assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
        assert tokenizer("x")["input_ids"] == [tokenizer.bos_token_id] + plain
        assert tokenizer.bos_token_id not in plain
    else:
        assert tokenizer.bos_token is None and tokenizer.bos_token_id is None
        assert tokenizer("x")["input_ids"] == plain


@pytest.mark.parametrize("family", FAMILIES)
def test_model_loads_with_the_real_ids_and_runs(built, family: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    facts = FAMILY_FACTS[family]
    tokenizer = _load(built[family])
    model = AutoModelForCausalLM.from_pretrained(built[family])
    assert type(model).__name__ == facts["architecture"]
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert model.config.bos_token_id == _ids(tokenizer, facts["config_bos"])
    assert model.config.eos_token_id == _ids(tokenizer, facts["config_eos"])
    assert model.config.pad_token_id == _ids(tokenizer, facts["config_pad"])
    assert model.generation_config.eos_token_id == _ids(tokenizer, facts["generation_eos"])
    assert model.generation_config.pad_token_id == _ids(tokenizer, facts["generation_pad"])
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_builds_are_deterministic(built, tmp_path) -> None:
    from safetensors.torch import load_file

    for family in FAMILIES:
        again = build_family_model(family, tmp_path / family)
        first = built[family]
        assert (again / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes(), family
        a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), family
