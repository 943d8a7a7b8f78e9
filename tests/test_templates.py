"""Chat-template registry: per-template invariants the data layer depends on, plus goldens."""

from __future__ import annotations

from importlib import resources
from types import SimpleNamespace

import pytest
from jinja2.exceptions import TemplateError

from dpo_dist.data.templates import apply_default_system, get_template, template_names

BOS, EOS = "<s>", "</s>"
SYSTEM = "Be terse."
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]

# The text a generation prompt must end with: the assistant header, or for [INST]-style
# formats the closing of the user turn (they have no separate assistant header).
GENERATION_SUFFIX = {
    "default": "Assistant: ",
    "qwen": "<|im_start|>assistant\n",
    "chatml": "<|im_start|>assistant\n",
    "yi": "<|im_start|>assistant\n",
    "internlm2": "<|im_start|>assistant\n",
    "llama2": " [/INST]",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": " [/INST]",
    "mixtral": " [/INST]",
    "gemma": "<start_of_turn>model\n",
    "phi3": "<|assistant|>\n",
    "deepseek": "Assistant: ",
    "minicpm": "<AI>",
    "zephyr": "<|assistant|>\n",
    "vicuna": " ASSISTANT:",
    "baichuan2": "<reserved_107>",
    "qwen2.5": "<|im_start|>assistant\n",
    "qwen3": "<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "llama3.1": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma2": "<start_of_turn>model\n",
    "gemma3": "<start_of_turn>model\n",
    "phi4": "<|im_start|>assistant<|im_sep|>",
    "mistral-v3": "[/INST]",
    "mistral-v7": "[/INST]",
    "deepseek-v3": "<｜Assistant｜>",
    "deepseek-r1": "<｜Assistant｜><think>\n\n</think>\n\n",
    "glm4": "<|assistant|>",
}

# [INST] formats close the user turn with this text; everywhere else it must come only
# from add_generation_prompt or the assistant piece.
CLOSES_USER_TURN = {"llama2", "mistral", "mixtral", "mistral-v3", "mistral-v7"}

ALL = template_names()


def render(name: str, messages: list[dict], gen: bool = False) -> str:
    return get_template(name).render(messages, add_generation_prompt=gen, bos_token=BOS, eos_token=EOS)


def conversation(with_system: bool) -> list[dict]:
    return ([{"role": "system", "content": SYSTEM}] if with_system else []) + [dict(m) for m in TURNS]


def test_registry_matches_template_files() -> None:
    files = {p.name[: -len(".jinja")] for p in resources.files("dpo_dist.data.templates").iterdir() if p.name.endswith(".jinja")}
    # Names that share another's turns (and differ in metadata) share its file.
    assert files == set(ALL) - {"chatml", "qwen2.5", "gemma2", "gemma3"}
    assert set(GENERATION_SUFFIX) == set(ALL)
    assert ALL == sorted(ALL)
    for name in files:
        assert get_template(name).source.startswith("{#-"), f"{name}.jinja must open with a family comment"


@pytest.mark.parametrize("with_system", [False, True], ids=["no_system", "system"])
@pytest.mark.parametrize("name", ALL)
def test_prefix_invariant_and_turn_end(name: str, with_system: bool) -> None:
    msgs = conversation(with_system)
    eot = get_template(name).eot_token(SimpleNamespace(eos_token=EOS))
    full = render(name, msgs)
    assistant_idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    assert len(assistant_idx) == 2
    for k in assistant_idx:
        prompt = render(name, msgs[:k], gen=True)
        with_answer = render(name, msgs[: k + 1])
        assert with_answer.startswith(prompt), f"{name}: prompt is not a prefix of prompt+answer at turn {k}"
        assert full.startswith(with_answer), f"{name}: turn {k} render is not a prefix of the full render"
        piece = with_answer[len(prompt) :]
        # The whole assistant header is in the prompt: the piece is the answer, then the end marker.
        assert piece.lstrip().startswith(msgs[k]["content"]), f"{name}: piece {piece!r}"
        assert piece.rstrip().endswith(eot), f"{name}: piece {piece!r} does not end with {eot!r}"
        assert msgs[k - 1]["content"] in prompt
        # Exactly one header per assistant turn so far (guards against a doubled header).
        assert prompt.count(GENERATION_SUFFIX[name]) == assistant_idx.index(k) + 1
    for m in msgs:
        assert m["content"] in full
    assert full.count(SYSTEM) == (1 if with_system else 0)


@pytest.mark.parametrize("name", ALL)
def test_generation_prompt(name: str) -> None:
    first_user = TURNS[:1]
    prompt = render(name, first_user, gen=True)
    assert prompt.endswith(GENERATION_SUFFIX[name]), f"{name}: {prompt!r}"
    if name not in CLOSES_USER_TURN:
        assert not render(name, first_user).endswith(GENERATION_SUFFIX[name]), "header leaked into the user piece"
    assert render(name, TURNS[:2]).startswith(prompt)
    # No header is added after an assistant turn, which is already complete.
    assert render(name, TURNS[:2], gen=True) == render(name, TURNS[:2])


@pytest.mark.parametrize("name", ALL)
def test_template_does_not_inject_default_system(name: str) -> None:
    template = get_template(name)
    if template.default_system is not None:
        assert template.default_system not in render(name, TURNS)


@pytest.mark.parametrize("name", ALL)
def test_apply_default_system(name: str) -> None:
    template = get_template(name)
    injected = apply_default_system(template, TURNS)
    assert injected is not TURNS
    if template.default_system is None:
        assert injected == TURNS
    else:
        assert injected[0] == {"role": "system", "content": template.default_system}
        assert injected[1:] == TURNS
        assert template.default_system in render(name, injected)
    own = conversation(with_system=True)
    kept = apply_default_system(template, own)
    assert kept == own, "a row's own system prompt must override the default"
    assert len(TURNS) == 4, "input must not be mutated"


@pytest.mark.parametrize("name", ALL)
def test_unknown_role_raises(name: str) -> None:
    with pytest.raises(TemplateError, match="tool"):
        render(name, [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}])


def test_eot_token() -> None:
    tok = SimpleNamespace(eos_token="<eos>")
    assert get_template("qwen").eot_token(tok) == "<|im_end|>"
    assert get_template("llama2").eot_token(tok) == "<eos>"


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(ValueError, match="qwen") as err:
        get_template("qwenn")
    assert "'qwen'" in str(err.value)
    assert all(n in str(err.value) for n in ALL)


def test_chatml_alias() -> None:
    assert get_template("chatml") == get_template("qwen")


def test_golden_qwen() -> None:
    msgs = apply_default_system(get_template("qwen"), TURNS[:2])
    assert render("qwen", msgs) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    )


def test_golden_llama3() -> None:
    assert render("llama3", conversation(with_system=True)[:3] + [TURNS[2]], gen=True) == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 4.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_golden_llama2() -> None:
    assert render("llama2", conversation(with_system=True)) == (
        "<s>[INST] <<SYS>>\nBe terse.\n<</SYS>>\n\nWhat is 2+2? [/INST] It is 4. </s>"
        "<s>[INST] And 3+3? [/INST] It is 6. </s>"
    )


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("with_system", [False, True])
def test_standalone_source_renders_like_training_in_transformers(name: str, with_system: bool, tiny_base) -> None:
    # A trained model's saved tokenizer carries standalone_source(); transformers' own renderer must give the text
    # training saw, default system prompt included.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    tokenizer.chat_template = get_template(name).standalone_source()
    messages = conversation(with_system)
    for gen, msgs in ((False, messages), (True, messages[:1 + with_system])):
        ours = get_template(name).render(apply_default_system(get_template(name), msgs), add_generation_prompt=gen,
                                         bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")
        assert tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == ours
    if get_template(name).default_system and not with_system:
        assert get_template(name).default_system in ours
