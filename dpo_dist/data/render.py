"""Chat rendering: messages → text segments, each marked as supervised (assistant) or not.

The renderer uses a named template from `dpo_dist.templates` when the recipe sets `template:`, else the
tokenizer's own chat template, else the `default` template. Segments are found by rendering the conversation
incrementally and taking differences, so any prefix-stable template works, including a tokenizer's own.

That costs O(turns²) renders per conversation. For a registry template, whose files only ever insert a message's
content verbatim, the segments are instead worked out once per sequence of roles, on placeholder contents (a
*skeleton*), and each conversation with those roles is then assembled by substituting its contents: no Jinja at
all per row. The first conversation of each role sequence is also rendered incrementally and compared, so a
template that does treat content specially falls back to incremental rendering instead of being mis-split.
"""
from __future__ import annotations

import hashlib
import re

from dpo_dist.templates import ChatTemplate, apply_default_system, get_template


class TemplateError(ValueError):
    pass


# Placeholder contents for skeletons: private-use code points, which no registry template touches.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
_Skeleton = list  # [(parts, supervised)]: parts are literal strings and int indexes of message contents


def _placeholders(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": f"{_OPEN}{k}{_CLOSE}"} for k, m in enumerate(messages)]


def _to_parts(text: str) -> list:
    parts: list = []
    last = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > last:
            parts.append(text[last:m.start()])
        parts.append(int(m.group(1)))
        last = m.end()
    if last < len(text):
        parts.append(text[last:])
    return parts


def _fill(parts: list, contents: list[str]) -> str:
    return "".join(contents[p] if isinstance(p, int) else p for p in parts)


class Renderer:
    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        own = getattr(tokenizer, "chat_template", None)
        self.template: ChatTemplate | None = None
        if template is not None or not own:
            self.template = get_template(template or "default")
            self.name = self.template.name
            self.source = self.template.source + repr((self.template.default_system, self.template.end_of_turn))
        else:
            self.name = "tokenizer"
            self.source = own if isinstance(own, str) else repr(own)
        self.eot_token = self._find_eot()
        # Per role sequence: the skeleton, or None where assembling from it did not match a real render.
        self._skeletons: dict[tuple, _Skeleton | None] = {}

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def prepare(self, messages: list[dict]) -> list[dict]:
        """Add the template's default system prompt when the conversation has none."""
        return apply_default_system(self.template, messages) if self.template is not None else list(messages)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.template is not None:
            return self.template.render(
                messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.tokenizer.bos_token or "",
                eos_token=self.tokenizer.eos_token or "",
            )
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _find_eot(self) -> str:
        if self.template is not None:
            eot = self.template.eot_token(self.tokenizer)
            if not eot or eot not in self.tokenizer.get_vocab():
                raise TemplateError(
                    f"template {self.template.name!r} ends assistant turns with {eot!r}, which is not a token of this "
                    "tokenizer; choose the template of the model's family with `model.template`"
                )
            return eot
        # A tokenizer's own template: the last special token of a rendered assistant turn ends it.
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        head = self.render(probe[:1], add_generation_prompt=True)
        full = self.render(probe)
        piece = full[len(head):] if full.startswith(head) else full
        special = set(self.tokenizer.all_special_tokens) | {
            t.content for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values() if t.special
        }
        ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        for tok in reversed(self.tokenizer.convert_ids_to_tokens(ids)):
            if tok in special:
                return tok
        return self.tokenizer.eos_token

    def _piece(self, before: str, after: str, what: str) -> str:
        if not after.startswith(before):
            raise TemplateError(
                f"chat template {self.name!r} is not prefix-stable ({what} changes the earlier text), so label masks "
                "cannot be derived; set `model.template` to a registry template for this model family"
            )
        return after[len(before):]

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """Split a full conversation into (text, is_assistant) pieces. Assistant pieces end with the EOT token."""
        return self._assembled(("sft", *(m["role"] for m in messages)), messages, self.incremental_segments)

    def _assembled(self, key: tuple, messages: list[dict], slow) -> list[tuple[str, bool]]:
        """``slow(messages)``, assembled from the skeleton of ``key`` (the roles) where the template allows."""
        if self.template is None:
            return slow(messages)
        contents = [m["content"] for m in messages]
        if any(_OPEN in c or _CLOSE in c for c in contents):
            return slow(messages)  # the placeholders would be ambiguous
        if key not in self._skeletons:
            skeleton = [(_to_parts(text), sup) for text, sup in slow(_placeholders(messages))]
            expected = slow(messages)
            fast = [(_fill(parts, contents), sup) for parts, sup in skeleton]
            self._skeletons[key] = skeleton if fast == expected else None
            return expected
        skeleton = self._skeletons[key]
        if skeleton is None:
            return slow(messages)
        return [(_fill(parts, contents), sup) for parts, sup in skeleton]

    def incremental_segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """:meth:`segments` by rendering every prefix of the conversation (works for any prefix-stable template)."""
        out: list[tuple[str, bool]] = []
        done = ""
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self.render(messages[:k], add_generation_prompt=True)
            full = self.render(messages[: k + 1])
            out.append((self._piece(done, head, f"message {k}"), False))
            out.append((self.assistant_piece(head, full, k), True))
            done = full
        tail = self._piece(done, self.render(messages), "the last message")
        if tail:
            out.append((tail, False))
        return [(text, sup) for text, sup in out if text]

    def assistant_piece(self, head: str, full: str, k: int = -1) -> str:
        piece = self._piece(head, full, f"assistant message {k}")
        if self.eot_token not in piece:  # only a tokenizer template can omit it; the EOT must be learned
            piece = piece + self.eot_token
        return piece

    def prompt_and_completions(self, prompt: list[dict], completions: list[str]) -> tuple[str, list[str]]:
        """DPO: the prompt text (with generation header) and each completion's text after it."""
        messages = list(prompt) + [{"role": "assistant", "content": text} for text in completions]
        n = len(prompt)

        def slow(msgs: list[dict]) -> list[tuple[str, bool]]:
            head, pieces = self.incremental_prompt_and_completions(msgs[:n], [m["content"] for m in msgs[n:]])
            return [(head, False)] + [(p, True) for p in pieces]

        pieces = self._assembled(("dpo", len(completions), *(m["role"] for m in prompt)), messages, slow)
        return pieces[0][0], [text for text, _ in pieces[1:]]

    def incremental_prompt_and_completions(self, prompt: list[dict], completions: list[str]) -> tuple[str, list[str]]:
        """:meth:`prompt_and_completions` by rendering the prompt and each prompt + completion."""
        head = self.render(prompt, add_generation_prompt=True)
        pieces = []
        for text in completions:
            full = self.render(prompt + [{"role": "assistant", "content": text}])
            pieces.append(self.assistant_piece(head, full, len(prompt)))
        return head, pieces
