"""Registry of chat templates: one HF-compatible Jinja file per model family.

The Jinja files render exactly the messages they are given, as a concatenation of
per-message pieces, so a prompt rendered with ``add_generation_prompt=True`` is a
string prefix of the same conversation rendered with its answer. The data layer
relies on that to find where assistant tokens start. Per-template metadata that
Jinja cannot express (default system prompt, end-of-turn marker) lives here.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, NoReturn

from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "ChatTemplate",
    "apply_default_system",
    "detect_family",
    "get_template",
    "template_names",
]


@dataclass(frozen=True)
class _Meta:
    default_system: str | None = None
    # None means the tokenizer's eos_token closes an assistant turn.
    end_of_turn: str | None = None
    file: str | None = None  # the .jinja file, when another name's (same turns, other metadata); default: the name


_META: dict[str, _Meta] = {
    "default": _Meta(),
    "qwen": _Meta("You are a helpful assistant.", "<|im_end|>"),
    "llama2": _Meta("You are a helpful, respectful and honest assistant."),
    "llama3": _Meta(None, "<|eot_id|>"),
    "mistral": _Meta(),
    "mixtral": _Meta(),
    "gemma": _Meta(None, "<end_of_turn>"),
    "phi3": _Meta(None, "<|end|>"),
    "yi": _Meta(None, "<|im_end|>"),
    "deepseek": _Meta(),
    "minicpm": _Meta(),
    "zephyr": _Meta(),
    "vicuna": _Meta(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    "baichuan2": _Meta(),
    "internlm2": _Meta("You are an AI assistant whose name is InternLM (书生·浦语).", "<|im_end|>"),
    "qwen2.5": _Meta("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "<|im_end|>", "qwen"),
    "qwen3": _Meta(None, "<|im_end|>"),
    "llama3.1": _Meta(None, "<|eot_id|>"),
    "gemma2": _Meta(None, "<end_of_turn>", "gemma"),
    "gemma3": _Meta(None, "<end_of_turn>", "gemma"),
    "phi4": _Meta(None, "<|im_end|>"),
    "mistral-v3": _Meta(None, "</s>"),
    "mistral-v7": _Meta(None, "</s>"),
    "deepseek-v3": _Meta(None, "<｜end▁of▁sentence｜>"),
    "deepseek-r1": _Meta(None, "<｜end▁of▁sentence｜>"),
    # GLM's own fine-tuning ends an answer at the next <|user|>, which would then open the next user turn twice;
    # <|endoftext|> is the tokenizer's EOS and one of the model's stop tokens.
    "glm4": _Meta(None, "<|endoftext|>"),
}

# Alternative names that resolve to a registered template (no separate file).
_ALIASES: dict[str, str] = {"chatml": "qwen"}


def _raise_exception(message: str) -> NoReturn:
    # HF exposes the same helper to chat templates; Jinja itself has no way to raise.
    raise TemplateError(message)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # Same settings as transformers' apply_chat_template, so files behave identically there.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env


@lru_cache(maxsize=None)
def _compile(source: str) -> Template:
    return _environment().from_string(source)


@lru_cache(maxsize=None)
def _load_source(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str
    default_system: str | None
    end_of_turn: str | None

    def eot_token(self, tokenizer: Any) -> str:
        """Literal text that closes an assistant turn for this tokenizer."""
        if self.end_of_turn is not None:
            return self.end_of_turn
        if tokenizer.eos_token is None:
            raise ValueError(f"template {self.name!r} ends turns with eos_token, but the tokenizer has none")
        return tokenizer.eos_token

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
    ) -> str:
        return _compile(self.source).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )


    def standalone_source(self) -> str:
        """This template as one Hugging Face chat template (a tokenizer's `chat_template`). The Jinja file leaves the
        default system prompt to apply_default_system and expects bos/eos tokens to be passed; here both are settled
        inside the template, so a saved tokenizer renders conversations as training did in any tool."""
        # transformers passes only the special tokens a tokenizer defines; training renders a missing one as "".
        head = "{%- set bos_token = bos_token | default('') %}\n{%- set eos_token = eos_token | default('') %}\n"
        if self.default_system is not None:
            system = json.dumps(self.default_system, ensure_ascii=False)
            head += ("{%- if messages | selectattr('role', 'equalto', 'system') | list | length == 0 %}\n"
                     f"    {{%- set messages = [{{'role': 'system', 'content': {system}}}] + messages %}}\n"
                     "{%- endif %}\n")
        return head + self.source


def template_names() -> list[str]:
    """All accepted template names, aliases included, sorted."""
    return sorted([*_META, *_ALIASES])


@lru_cache(maxsize=None)
def _build(name: str) -> ChatTemplate:
    meta = _META[name]
    return ChatTemplate(name, _load_source(meta.file or name), meta.default_system, meta.end_of_turn)


def get_template(name: str) -> ChatTemplate:
    """Look up a template by name; an alias returns its target (whose ``name`` is the target's)."""
    canonical = _ALIASES.get(name, name)
    if canonical not in _META:
        names = template_names()
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.0)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown chat template {name!r}.{hint} Valid names: {', '.join(names)}")
    return _build(canonical)


def apply_default_system(template: ChatTemplate, messages: Sequence[Mapping[str, str]]) -> list[dict]:
    """Return a new list with the template's default system prompt prepended when the
    conversation has no system message of its own (a row's own system always wins)."""
    out = [dict(m) for m in messages]
    if template.default_system is not None and not any(m.get("role") == "system" for m in out):
        out.insert(0, {"role": "system", "content": template.default_system})
    return out


# Model families recognised in a tokenizer, first match wins: (template, what its own chat template contains, what its
# vocabulary holds). The template rules come first: a chat template names its format more precisely than tokens do
# (Llama 3 and 3.1 share a vocabulary; DeepSeek V3 and R1 share one).
_FAMILIES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("deepseek-r1", ("<｜Assistant｜>", "<think>"), ()),
    ("deepseek-v3", ("<｜Assistant｜>",), ("<｜Assistant｜>", "<｜User｜>")),
    ("glm4", ("[gMASK]<sop>",), ("[gMASK]", "<sop>", "<|assistant|>")),
    ("qwen3", ("<|im_start|>", "<think>"), ("<|im_start|>", "<think>")),
    ("qwen2.5", ("<|im_start|>", "You are Qwen, created by Alibaba Cloud"), ("<|im_start|>", "<|fim_prefix|>")),
    ("phi4", ("<|im_sep|>",), ("<|im_start|>", "<|im_sep|>")),
    ("llama3.1", ("<|start_header_id|>", "Cutting Knowledge Date"), ()),
    ("llama3", ("<|start_header_id|>",), ("<|start_header_id|>", "<|eot_id|>")),
    ("gemma3", ("<start_of_turn>", "first_user_prefix"), ("<start_of_turn>", "<start_of_image>")),
    ("gemma2", ("<start_of_turn>",), ("<start_of_turn>", "<end_of_turn>")),
    ("mistral-v7", ("[SYSTEM_PROMPT]",), ("[SYSTEM_PROMPT]", "[INST]")),
    ("mistral-v3", ("[INST]", "[AVAILABLE_TOOLS]"), ("[INST]", "[AVAILABLE_TOOLS]")),
    ("qwen", ("<|im_start|>",), ("<|im_start|>", "<|im_end|>")),
)


def detect_family(tokenizer: Any) -> tuple[str, str] | None:
    """(registry template name, the evidence) for the model family ``tokenizer`` belongs to, or None.

    Its own chat template's text is read first, then its vocabulary."""
    own = getattr(tokenizer, "chat_template", None)
    own = own if isinstance(own, str) else ""
    for name, in_template, _ in _FAMILIES:
        if own and in_template and all(text in own for text in in_template):
            return name, f"its chat template contains {', '.join(repr(t) for t in in_template)}"
    vocab = tokenizer.get_vocab()
    for name, _, tokens in _FAMILIES:
        if tokens and all(t in vocab for t in tokens):
            return name, f"its vocabulary has {', '.join(repr(t) for t in tokens)}"
    return None
