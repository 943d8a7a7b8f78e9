"""Chat rendering: messages → text segments, each marked as supervised (assistant) or not.

Which template renders (`Renderer.choice`, logged and written to data_report.json and summary.json):
1. `model.template`, when the recipe sets it: a registry template (dpo_dist.data.templates);
2. else the tokenizer's own chat template: with `{% generation %}` markers, what they enclose is supervised;
   without, it is used when it is prefix-stable, checked on a two-turn conversation before any row;
3. a template that is not prefix-stable (Qwen3's drops earlier turns' reasoning) is replaced by the registry
   template of the tokenizer's family (dpo_dist.data.templates.detect_family), with a warning; of no known family, it is
   refused with one error naming `model.template`;
4. a tokenizer with no chat template gets its family's registry template, else `default`.
`dpo-dist validate` and training construct the same Renderer, so they reach the same verdict.

Segments are found by rendering the conversation incrementally and taking differences.
That costs O(turns²) renders per conversation. For a registry template, whose files only ever insert a message's
content verbatim, the segments are instead worked out once per sequence of roles, on placeholder contents (a
*skeleton*), and each conversation with those roles is then assembled by substituting its contents: no Jinja at
all per row. The first conversation of each role sequence is also rendered incrementally and compared, so a
template that does treat content specially falls back to incremental rendering instead of being mis-split.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from jinja2.exceptions import TemplateError as JinjaError

from dpo_dist.data.templates import ChatTemplate, apply_default_system, detect_family, get_template, template_names


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


@dataclass(frozen=True)
class TemplateChoice:
    """Which template renders conversations, and why (logged, and written to data_report.json and summary.json)."""
    name: str  # a registry name, "tokenizer", or "tokenizer:generation" (masks from its {% generation %} markers)
    why: str
    warning: str | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "why": self.why, "warning": self.warning}


class RenderError(TemplateError):
    """The template refused a conversation (its raise_exception, or a Jinja error)."""


class NotPrefixStable(TemplateError):
    def __init__(self, name: str, what: str):
        self.what = what
        super().__init__(
            f"chat template {name!r} is not prefix-stable ({what} changes the earlier text), so label masks cannot "
            "be derived; set `model.template` to a registry template for this model family")


_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Conversations a tokenizer's own template is tried on before it is used: two assistant turns, as SFT rows have.
_PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
          {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Then more."}]


def expected_bos(tokenizer) -> str | None:
    """The BOS token the tokenizer's model expects at the start of every sequence, or None: its ``add_bos_token``, or
    what its own post-processing puts first (a Llama 3 tokenizer's adds ``<|begin_of_text|>``). Every piece of a row
    is tokenized without special tokens, so the data layer adds it (once) itself."""
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if not bos or bos_id is None:
        return None
    if getattr(tokenizer, "add_bos_token", False):
        return bos
    return bos if tokenizer("a")["input_ids"][:1] == [bos_id] else None


class Renderer:
    """Renders conversations into segments with the template `_choose` settles on (see TemplateChoice)."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.template: ChatTemplate | None = None
        self.markers = False  # segments come from the tokenizer template's {% generation %} markers
        # Per role sequence: the skeleton, or None where assembling from it did not match a real render.
        self._skeletons: dict[tuple, _Skeleton | None] = {}
        self.choice = self._choose(template)
        # A template that writes the BOS itself (Gemma's, Llama 3's) shows the model expects one too.
        bos = tokenizer.bos_token
        self.bos = expected_bos(tokenizer) or (bos if bos and self.render(_PROBE[:1]).startswith(bos) else None)
        self.name = self.choice.name if self.template is None else self.template.name
        self.source = (self.template.source + repr((self.template.default_system, self.template.end_of_turn))
                       if self.template is not None else self._own + ("|generation" if self.markers else ""))

    def _use_registry(self, name: str) -> None:
        self.template = get_template(name)
        self.eot_token = self._find_eot()

    def _choose(self, requested: str | None) -> TemplateChoice:
        own = getattr(self.tokenizer, "chat_template", None)
        self._own = own if isinstance(own, str) else repr(own) if own else ""
        if requested is not None:
            self._use_registry(requested)
            return TemplateChoice(self.template.name, "set by model.template")
        if not own:
            family = detect_family(self.tokenizer)
            if family is None:
                self._use_registry("default")
                return TemplateChoice("default", "the tokenizer has no chat template and none of the special tokens "
                                      "of a model family dpo-dist knows")
            self._use_registry(family[0])
            return TemplateChoice(family[0], f"the tokenizer has no chat template; its family is {family[0]} "
                                  f"({family[1]})")
        if _GENERATION.search(self._own):
            self.markers = True
            self.eot_token = self._find_eot()
            return TemplateChoice("tokenizer:generation", "the tokenizer's own chat template; label masks from its "
                                  "{% generation %} markers")
        try:
            self.eot_token = self._find_eot()
            problem = self._stability_problem()
        except RenderError as err:
            raise TemplateError(f"the tokenizer's own chat template fails on a plain two-turn conversation ({err}); "
                                "set `model.template` to a registry template for this model family") from err
        if problem is None:
            return TemplateChoice("tokenizer", "the tokenizer's own chat template (checked prefix-stable)")
        family = detect_family(self.tokenizer)  # only where it is needed: it reads the whole vocabulary
        if family is None:
            raise TemplateError(
                f"the tokenizer's own chat template is not prefix-stable ({problem}), so label masks cannot be derived "
                "from it, and it is not of a model family dpo-dist knows; set `model.template` to one of: "
                + ", ".join(template_names()))
        self._use_registry(family[0])
        return TemplateChoice(family[0], f"the tokenizer's own chat template is not prefix-stable; its family is "
                              f"{family[0]} ({family[1]})",
                              warning=f"the tokenizer's own chat template is not prefix-stable ({problem}), so label "
                              f"masks cannot be derived from it; training uses the registry template {family[0]!r} "
                              f"of its family instead (set `model.template` to choose another)")

    def _stability_problem(self) -> str | None:
        """Why the tokenizer's own template cannot be split into segments, or None when it can."""
        try:
            self.incremental_segments(_PROBE)
            self.incremental_prompt_and_completions(_PROBE[:3], ["Yes.", "No."])
        except NotPrefixStable as err:
            return f"{err.what} changes the earlier text of a two-turn conversation"
        return None

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def prepare(self, messages: list[dict]) -> list[dict]:
        """Add the template's default system prompt when the conversation has none."""
        return apply_default_system(self.template, messages) if self.template is not None else list(messages)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
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
        except JinjaError as err:
            raise RenderError(f"chat template {getattr(self, 'name', 'tokenizer')!r} refuses this conversation: "
                              f"{err}") from err

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
            raise NotPrefixStable(getattr(self, "name", "tokenizer"), what)
        return after[len(before):]

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """Split a full conversation into (text, is_assistant) pieces. An assistant piece is the turn's text after
        its header: the answer, its end-of-turn token, and what the template writes after that token in the same
        turn (ChatML's newline), as a DPO completion has it. With {% generation %} markers: what they enclose (and
        the end-of-turn token, if they leave it out)."""
        if self.markers:
            return self._with_bos(self.marker_segments(messages))
        return self._with_bos(self._assembled(("sft", *(m["role"] for m in messages)), messages,
                                              self.incremental_segments))

    def generation_prompt(self, messages: list[dict]) -> str:
        """The text a model generates after, as training's prompts start: default system prompt, generation header,
        and the BOS where the model expects one."""
        return self._with_bos([(self.render(self.prepare(messages), add_generation_prompt=True), False)])[0][0]

    def _with_bos(self, segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
        """``segments`` starting with exactly one BOS where the model expects one."""
        if not self.bos or (segments and segments[0][0].startswith(self.bos)):
            return segments
        if segments and not segments[0][1]:
            return [(self.bos + segments[0][0], False)] + segments[1:]
        return [(self.bos, False)] + segments

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
        out.append((self._piece(done, self.render(messages), "the last message"), False))
        return _merged(out)

    def assistant_piece(self, head: str, full: str, k: int = -1) -> str:
        piece = self._piece(head, full, f"assistant message {k}")
        if self.eot_token not in piece:  # only a tokenizer template can omit it; the EOT must be learned
            piece = piece + self.eot_token
        return piece

    def prompt_and_completions(self, prompt: list[dict], completions: list[str]) -> tuple[str, list[str]]:
        """DPO: the prompt text (with generation header) and each completion's text after it: the SFT assistant piece
        (through the end-of-turn token and what the template writes after it in that turn), as TRL's own
        tokenization of a conversation has it, so the two feed a model the same tokens."""
        if self.markers:
            head, pieces = self.marker_prompt_and_completions(prompt, completions)
            return self._with_bos([(head, False)])[0][0], pieces
        messages = list(prompt) + [{"role": "assistant", "content": text} for text in completions]
        n = len(prompt)

        def slow(msgs: list[dict]) -> list[tuple[str, bool]]:
            head, pieces = self.incremental_prompt_and_completions(msgs[:n], [m["content"] for m in msgs[n:]])
            return [(head, False)] + [(p, True) for p in pieces]

        pieces = self._assembled(("dpo", len(completions), *(m["role"] for m in prompt)), messages, slow)
        return self._with_bos(pieces[:1])[0][0], [text for text, _ in pieces[1:]]

    def incremental_prompt_and_completions(self, prompt: list[dict], completions: list[str]) -> tuple[str, list[str]]:
        """:meth:`prompt_and_completions` by rendering the prompt and each prompt + completion."""
        head = self.render(prompt, add_generation_prompt=True)
        pieces = []
        for text in completions:
            full = self.render(prompt + [{"role": "assistant", "content": text}])
            pieces.append(self.assistant_piece(head, full, len(prompt)))
        return head, pieces

    # --- a tokenizer template with {% generation %} markers: what they enclose is supervised ------------------------

    def _render_marked(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        from transformers.utils.chat_template_utils import render_jinja_template

        (text,), (spans,) = render_jinja_template([messages], chat_template=self._own,
                                                  return_assistant_tokens_mask=True,
                                                  **self.tokenizer.special_tokens_map)
        return text, spans

    def _marked_piece(self, text: str, start: int, end: int) -> str:
        """The marked text, extended over an end-of-turn token right after it (the EOT must be learned)."""
        piece = text[start:end]
        if self.eot_token not in piece:
            piece += self.eot_token
        return piece

    def marker_segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        text, spans = self._render_marked(messages)
        out: list[tuple[str, bool]] = []
        at = 0
        for start, end in spans:
            out.append((text[at:start], False))
            out.append((self._marked_piece(text, start, end), True))
            at = end + (len(self.eot_token) if text[end:].startswith(self.eot_token) and
                        not text[start:end].endswith(self.eot_token) else 0)
        out.append((text[at:], False))
        return _merged(out)

    def marker_prompt_and_completions(self, prompt: list[dict], completions: list[str]) -> tuple[str, list[str]]:
        heads, pieces = set(), []
        for completion in completions:
            text, spans = self._render_marked(list(prompt) + [{"role": "assistant", "content": completion}])
            if not spans:
                raise TemplateError("the tokenizer's chat template marks no {% generation %} span in a DPO answer; "
                                    "set `model.template` to a registry template for this model family")
            start, end = spans[-1]
            heads.add(text[:start])
            piece = self._marked_piece(text, start, end)  # then the rest of the turn, as without markers
            skip = len(self.eot_token) if text[end:].startswith(self.eot_token) and piece != text[start:end] else 0
            pieces.append(piece + text[end + skip:])
        if len(heads) > 1:
            raise TemplateError("the tokenizer's chat template renders a DPO prompt differently before the chosen and "
                                "the rejected answer; set `model.template` to a registry template for this model family")
        return heads.pop(), pieces


def _merged(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Drop empty segments and join neighbours of the same kind."""
    out: list[tuple[str, bool]] = []
    for text, sup in segments:
        if not text:
            continue
        if out and out[-1][1] == sup:
            out[-1] = (out[-1][0] + text, sup)
        else:
            out.append((text, sup))
    return out
