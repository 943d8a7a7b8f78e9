"""Chat rendering: messages → text segments, each marked as supervised (assistant) or not.

The renderer uses a named template from `dpo_dist.templates` when the recipe sets `template:`, else the
tokenizer's own chat template, else the `default` template. Segments are found by rendering the conversation
incrementally and taking differences, so any prefix-stable template works, including a tokenizer's own.
"""
from __future__ import annotations

import hashlib

from dpo_dist.templates import ChatTemplate, apply_default_system, get_template


class TemplateError(ValueError):
    pass


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
        head = self.render(prompt, add_generation_prompt=True)
        pieces = []
        for text in completions:
            full = self.render(prompt + [{"role": "assistant", "content": text}])
            pieces.append(self.assistant_piece(head, full, len(prompt)))
        return head, pieces
