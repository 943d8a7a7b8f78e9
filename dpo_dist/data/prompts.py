"""Prompt files: one prompt a line, as {"prompt": "text"} (optionally with "system"), {"messages": [{"role",
"content"}, ...]} or a Firefly {"conversation": [{"human", "assistant"}, ...]}. `dpo-dist generate` answers them, and
training answers them during a run (train.sample_prompts). A prompt is held to the training data's row checks."""
from __future__ import annotations

import json
from pathlib import Path

from dpo_dist.data.converters import (RowError, _check_turns, _get, _human_assistant_turns, _Msg,
                                      _role_content_messages, _system, json_type)
from dpo_dist.data.formats import DataError

MAX_SHOWN = 10  # bad lines shown of a file


def prompt_messages(row) -> list[dict]:
    """The conversation to answer, ending with a user turn. Raises RowError(field, reason)."""
    if not isinstance(row, dict):
        raise RowError("row", f"not a JSON object: got {json_type(row)}")
    if "messages" in row:
        field, msgs = "messages", _role_content_messages(_get(row, "messages", list), "messages")
    elif "conversation" in row:
        field, turns = "conversation", _get(row, "conversation", list)
        last = turns[-1] if turns else None
        open_turn = isinstance(last, dict) and not last.get("assistant")  # the turn to answer
        msgs = _system(row) + _human_assistant_turns(turns[:-1] if open_turn else turns, field)
        if open_turn:
            where = f"{field}[{len(turns) - 1}].human"
            msgs.append(_Msg("user", _get(last, "human", str, f"{field}[{len(turns) - 1}]"), where, where))
    elif "prompt" in row:
        field, msgs = "prompt", _system(row) + [_Msg("user", _get(row, "prompt", str), "prompt", "prompt")]
    else:
        keys = ", ".join(map(str, list(row)[:20])) or "none"
        raise RowError("row", f"no prompt: keys [{keys}]; expected \"prompt\" (a string), \"messages\" (a list of "
                              "role/content) or \"conversation\" (Firefly human/assistant turns)")
    if msgs and msgs[-1].role == "assistant":
        msgs = msgs[:-1]
    return _check_turns(msgs, field, "prompt", "user", "empty prompt")


def read_prompt_file(path: str) -> list[tuple[int, dict, list[dict]]]:
    """(line number, row, conversation) for each non-blank line of an existing file. Raises DataError naming every
    bad line as FILE:LINE (up to MAX_SHOWN of them)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start + 1}: {err.reason})") from None
    prompts, problems = [], []
    # split on "\n" only: str.splitlines would also split inside a JSON string holding U+2028
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts.append((lineno, row, prompt_messages(row)))
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{lineno}: invalid JSON: {err.msg} at column {err.colno}")
        except RowError as err:
            problems.append(f"{path}:{lineno}: {err.field}: {err.reason}")
    if problems:
        raise DataError(listed(problems))
    if not prompts:
        raise DataError(f"{path}: holds no prompts")
    return prompts


def listed(problems: list[str]) -> str:
    """A file's bad lines, one a line: the first MAX_SHOWN, then how many more."""
    more = f"\n... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
    return "\n".join(problems[:MAX_SHOWN]) + more
