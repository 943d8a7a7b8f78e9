"""Per-format converters: one input record (a dict) -> one canonical row (without ``loc``).

This module is internal to :mod:`dpo_dist.data.formats`. Every converter raises
:class:`RowError` for a bad record. ``RowError.field`` is a path into the input record
(``conversation[1].assistant``, ``messages[3].role``) so the message points at the exact
value to fix. Reasons start with a short headline, optionally followed by ``": detail"``;
``LoadResult.summary()`` shows only the headline.

Canonical rows:

* sft: ``{"messages": [{"role", "content"}, ...]}`` -- optional first system message, then
  user/assistant strictly alternating, starting with user and ending with assistant.
* dpo: ``{"prompt": [messages ending with user], "chosen": str, "rejected": str}``.
* kto: ``{"prompt": [messages ending with user], "completion": str, "label": bool}`` (true = desirable).
* pretrain: ``{"text": str}``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple


class RowError(Exception):
    """A bad record: ``field`` is where in the record, ``reason`` what is wrong."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class _Msg(NamedTuple):
    role: str
    content: str
    role_field: str      # where the role comes from (for order / unknown-role errors)
    content_field: str   # where the content comes from (for empty-turn errors)


_MISSING = object()
_CHAT_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "system": "system"}


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


_TYPE_NAMES = {str: "string", list: "list", dict: "object"}


def _is(value: Any, typ: type) -> bool:
    return isinstance(value, (list, tuple)) if typ is list else isinstance(value, typ)


def _get(obj: dict, key: str, typ: type, path: str = "", required: bool = True) -> Any:
    """``obj[key]`` checked against ``typ``; None for an absent/null optional field."""
    field = f"{path}.{key}" if path else key
    value = obj.get(key, _MISSING)
    if value is _MISSING or value is None:
        if not required:
            return None
        raise RowError(field, "missing required field" + (" (null)" if value is None else ""))
    if not _is(value, typ):
        raise RowError(field, f"wrong type: expected {_TYPE_NAMES[typ]}, got {json_type(value)}")
    return value


def _obj(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise RowError(field, f"wrong type: expected object, got {json_type(value)}")
    return value


def _a(role: str) -> str:
    return ("an " if role == "assistant" else "a ") + role


def _check_turns(msgs: list[_Msg], field: str, what: str, end: str, empty: str) -> list[dict]:
    """Validate role order/emptiness; return canonical messages.

    ``end`` is the role the list must end with ("assistant" for SFT, "user" for a DPO
    prompt); ``empty`` the reason used when there is no user/assistant turn at all.
    Empty system messages are dropped (no system prompt), not errors.
    """
    out: list[dict] = []
    expect = "user"
    last: _Msg | None = None
    for i, msg in enumerate(msgs):
        if msg.role == "system":
            if i > 0:
                raise RowError(msg.role_field,
                               "wrong role order: a system message is only allowed first")
            if msg.content.strip():
                out.append({"role": "system", "content": msg.content})
            continue
        if msg.role != expect:
            if last is None:
                reason = f"wrong role order: {what} must start with a user turn, got {msg.role}"
            else:
                reason = f"wrong role order: two {msg.role} turns in a row"
            raise RowError(msg.role_field, reason)
        if not msg.content.strip():
            raise RowError(msg.content_field, f"empty {msg.role} turn")
        out.append({"role": msg.role, "content": msg.content})
        expect = "assistant" if msg.role == "user" else "user"
        last = msg
    if last is None:
        raise RowError(field, empty)
    if last.role != end:
        raise RowError(last.role_field, f"wrong role order: {what} ends with "
                                        f"{_a(last.role)} turn (expected {end})")
    return out


def _system(row: dict) -> list[_Msg]:
    system = _get(row, "system", str, required=False)
    return [_Msg("system", system, "system", "system")] if system is not None else []


def _human_assistant_turns(turns: list, path: str) -> list[_Msg]:
    """``[{"human": str, "assistant": str}, ...]`` -> user/assistant messages."""
    msgs = []
    for i, turn in enumerate(turns):
        p = f"{path}[{i}]"
        turn = _obj(turn, p)
        human = _get(turn, "human", str, p)
        assistant = _get(turn, "assistant", str, p)
        msgs.append(_Msg("user", human, f"{p}.human", f"{p}.human"))
        msgs.append(_Msg("assistant", assistant, f"{p}.assistant", f"{p}.assistant"))
    return msgs


def _role_content_messages(items: list, path: str) -> list[_Msg]:
    """``[{"role": ..., "content": str}, ...]`` -> messages (roles checked, order not)."""
    msgs = []
    for i, item in enumerate(items):
        p = f"{path}[{i}]"
        item = _obj(item, p)
        role = _get(item, "role", str, p)
        content = _get(item, "content", str, p)
        if role not in _CHAT_ROLES:
            raise RowError(f"{p}.role",
                           f"unknown role {role!r}: expected one of {', '.join(_CHAT_ROLES)}")
        msgs.append(_Msg(role, content, f"{p}.role", f"{p}.content"))
    return msgs


def _check_responses(chosen: str, rejected: str, chosen_field: str, rejected_field: str) -> None:
    if not chosen.strip():
        raise RowError(chosen_field, "empty chosen response")
    if not rejected.strip():
        raise RowError(rejected_field, "empty rejected response")
    if chosen.strip() == rejected.strip():
        raise RowError(rejected_field, "chosen identical to rejected")


# --------------------------------------------------------------------------- SFT formats
def _firefly(row: dict) -> dict:
    conv = _get(row, "conversation", list)
    msgs = _system(row) + _human_assistant_turns(conv, "conversation")
    return {"messages": _check_turns(msgs, "conversation", "conversation", "assistant",
                                     "empty conversation")}


def _openai(row: dict) -> dict:
    msgs = _role_content_messages(_get(row, "messages", list), "messages")
    return {"messages": _check_turns(msgs, "messages", "conversation", "assistant",
                                     "empty conversation")}


def _sharegpt(row: dict) -> dict:
    msgs = _system(row)
    for i, turn in enumerate(_get(row, "conversations", list)):
        p = f"conversations[{i}]"
        turn = _obj(turn, p)
        who = _get(turn, "from", str, p)
        value = _get(turn, "value", str, p)
        if who not in _SHAREGPT_ROLES:
            raise RowError(f"{p}.from", f"unknown role {who!r}: expected one of "
                                        f"{', '.join(_SHAREGPT_ROLES)}")
        msgs.append(_Msg(_SHAREGPT_ROLES[who], value, f"{p}.from", f"{p}.value"))
    return {"messages": _check_turns(msgs, "conversations", "conversation", "assistant",
                                     "empty conversation")}


def _alpaca(row: dict) -> dict:
    instruction = _get(row, "instruction", str)
    extra = _get(row, "input", str, required=False)
    output = _get(row, "output", str)
    if not instruction.strip():
        raise RowError("instruction", "empty user turn")
    user = instruction + ("\n\n" + extra if extra else "")
    msgs = _system(row) + [_Msg("user", user, "instruction", "instruction"),
                           _Msg("assistant", output, "output", "output")]
    return {"messages": _check_turns(msgs, "instruction", "conversation", "assistant",
                                     "empty conversation")}


# --------------------------------------------------------------------------- DPO formats
def _pair(row: dict) -> dict:
    prompt = _get(row, "prompt", str)
    chosen = _get(row, "chosen", str)
    rejected = _get(row, "rejected", str)
    history = _get(row, "history", list, required=False) or []
    msgs = (_system(row) + _human_assistant_turns(history, "history")
            + [_Msg("user", prompt, "prompt", "prompt")])
    messages = _check_turns(msgs, "prompt", "prompt", "user", "empty prompt")
    _check_responses(chosen, rejected, "chosen", "rejected")
    return {"prompt": messages, "chosen": chosen, "rejected": rejected}


def _ultrafeedback(row: dict) -> dict:
    sides = {}
    for side in ("chosen", "rejected"):
        msgs = _role_content_messages(_get(row, side, list), side)
        if not msgs:
            raise RowError(side, "empty message list")
        if msgs[-1].role != "assistant":
            raise RowError(msgs[-1].role_field, f"wrong role order: {side} must end with an "
                                                f"assistant message, got {msgs[-1].role}")
        sides[side] = msgs
    chosen, rejected = sides["chosen"], sides["rejected"]
    hist_c = [(m.role, m.content) for m in chosen[:-1]]
    hist_r = [(m.role, m.content) for m in rejected[:-1]]
    if hist_c != hist_r:
        i = next((i for i, (a, b) in enumerate(zip(hist_c, hist_r)) if a != b),
                 min(len(hist_c), len(hist_r)))
        raise RowError(f"rejected[{i}]", "chosen and rejected have different histories: "
                                         f"first difference at message {i}")
    prompt = _check_turns(chosen[:-1], "chosen", "prompt", "user",
                          "wrong role order: no user message before the final assistant message")
    expected = _get(row, "prompt", str, required=False)
    if expected is not None and expected.strip() != prompt[-1]["content"].strip():
        raise RowError("prompt", "prompt does not match the last user message of chosen")
    _check_responses(chosen[-1].content, rejected[-1].content,
                     chosen[-1].content_field, rejected[-1].content_field)
    return {"prompt": prompt, "chosen": chosen[-1].content, "rejected": rejected[-1].content}


# --------------------------------------------------------------------------- KTO formats
def _unpaired(row: dict) -> dict:
    """One completion with a thumbs-up (label true) or down (false). The prompt is a string (with optional history
    and system, as in the pair format) or a message list ending with a user turn; the completion is a string or a
    list of one assistant message."""
    raw_prompt = row.get("prompt")
    if _is(raw_prompt, list):
        msgs = _role_content_messages(raw_prompt, "prompt")
        if _get(row, "history", list, required=False) or _get(row, "system", str, required=False) is not None:
            raise RowError("prompt", "a message-list prompt holds its own history and system message; drop the "
                                     "history/system keys")
    else:
        prompt = _get(row, "prompt", str)
        history = _get(row, "history", list, required=False) or []
        msgs = (_system(row) + _human_assistant_turns(history, "history")
                + [_Msg("user", prompt, "prompt", "prompt")])
    messages = _check_turns(msgs, "prompt", "prompt", "user", "empty prompt")
    raw = row.get("completion")
    if _is(raw, list):
        turns = _role_content_messages(raw, "completion")
        if len(turns) != 1 or turns[0].role != "assistant":
            raise RowError("completion", "a message-list completion must be one assistant message, got "
                                         f"{[t.role for t in turns]}")
        completion, field = turns[0].content, turns[0].content_field
    else:
        completion, field = _get(row, "completion", str), "completion"
    if not completion.strip():
        raise RowError(field, "empty completion")
    label = row.get("label", _MISSING)
    if not isinstance(label, bool):
        got = "missing" if label is _MISSING else json_type(label)
        raise RowError("label", f"wrong type: expected true (desirable) or false (undesirable), got {got}")
    return {"prompt": messages, "completion": completion, "label": label}


# ---------------------------------------------------------------------- pretrain formats
def _text(row: dict) -> dict:
    text = _get(row, "text", str)
    if not text.strip():
        raise RowError("text", "empty text")
    return {"text": text}


class _Spec(NamedTuple):
    kind: str
    keys: tuple[str, ...]                 # keys whose presence identifies the format
    accept: Callable[[dict], bool]        # extra check to tell formats with shared keys apart
    convert: Callable[[dict], dict]
    optional: tuple[str, ...] = ()        # other keys the converter reads


def _always(row: dict) -> bool:
    return True


# Order matters for detection: the first spec whose keys are present (and accepts) wins.
SPECS: dict[str, _Spec] = {
    "firefly": _Spec("sft", ("conversation",), _always, _firefly, ("system",)),
    "openai": _Spec("sft", ("messages",), _always, _openai),
    "sharegpt": _Spec("sft", ("conversations",), _always, _sharegpt, ("system",)),
    "alpaca": _Spec("sft", ("instruction", "output"), _always, _alpaca, ("input", "system")),
    "ultrafeedback": _Spec("dpo", ("chosen", "rejected"),
                           lambda row: _is(row.get("chosen"), list), _ultrafeedback, ("prompt",)),
    "pair": _Spec("dpo", ("prompt", "chosen", "rejected"), _always, _pair, ("history", "system")),
    "unpaired": _Spec("kto", ("prompt", "completion", "label"), _always, _unpaired, ("history", "system")),
    "text": _Spec("pretrain", ("text",), _always, _text),
}


def matches(row: dict, fmt: str) -> bool:
    spec = SPECS[fmt]
    return all(k in row for k in spec.keys) and spec.accept(row)


def detect(row: dict, kind: str | None = None) -> str | None:
    """The first format (of ``kind``, or of any kind) whose keys ``row`` has."""
    for name, spec in SPECS.items():
        if (kind is None or spec.kind == kind) and matches(row, name):
            return name
    return None


def describe_formats(kind: str) -> str:
    """``"firefly (conversation), openai (messages), ..."`` for error messages."""
    return ", ".join(f"{name} ({', '.join(spec.keys)})"
                     for name, spec in SPECS.items() if spec.kind == kind)


def unknown_keys(row: dict, fmt: str) -> list[str]:
    """Top-level keys of ``row`` that format ``fmt`` ignores. Null values are not counted:
    parquet and Hugging Face datasets fill absent columns with null."""
    spec = SPECS[fmt]
    known = set(spec.keys) | set(spec.optional)
    return [str(k) for k, v in row.items() if k not in known and v is not None]


def convert(row: dict, fmt: str) -> dict:
    return SPECS[fmt].convert(row)
