"""`dpo-dist generate MODEL --prompts FILE.jsonl --out FILE.jsonl`: answer a file of prompts in batches.

Each input line is {"prompt": "text"} (optionally with "system"), {"messages": [{"role", "content"}, ...]} or a Firefly
{"conversation": [{"human", "assistant"}, ...]}. A conversation that ends with an assistant turn is answered again from
its last user turn (the original answer stays in the row, next to the new one). Each output line is the input row plus
"response", in input order. Every bad line is reported as FILE:LINE before the model is loaded.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The row checks the data readers use, so a prompt is held to the same rules as training data.
from dpo_dist.data.converters import (RowError, _check_turns, _get, _human_assistant_turns, _Msg,
                                      _role_content_messages, _system, json_type)
from dpo_dist.config.schema import ConfigError
from dpo_dist.inference.loader import add_model_args, add_sampling_args, check_sampling_args, load, seed_everything

_MAX_SHOWN = 10


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


def read_prompts(path: str) -> list[tuple[int, dict, list[dict]]]:
    """(line number, row, conversation) for each non-blank line; every bad line is reported at once."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start + 1}: {err.reason})") from None
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
    _refuse(problems)
    if not prompts:
        raise ConfigError(f"{path}: holds no prompts")
    return prompts


def _refuse(problems: list[str]) -> None:
    if problems:
        more = f"\n... and {len(problems) - _MAX_SHOWN} more" if len(problems) > _MAX_SHOWN else ""
        raise ConfigError("\n".join(problems[:_MAX_SHOWN]) + more)


def check_window(loaded, prompts: list[tuple[int, dict, list[dict]]], path: str) -> None:
    """A prompt that fills the model's window leaves no room for a response."""
    if loaded.window is None:
        return
    problems = []
    for lineno, _, messages in prompts:
        used = loaded.prompt_tokens(messages)
        if used >= loaded.window:
            problems.append(f"{path}:{lineno}: prompt is {used} tokens; the model's window is {loaded.window}")
    _refuse(problems)


def run(args) -> int:
    from dpo_dist.inference.scoring import generate

    sampling = check_sampling_args(args)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    out = Path(args.out)
    if out.resolve() == Path(args.prompts).resolve():
        raise ConfigError(f"--out {args.out}: is the --prompts file; write the responses elsewhere")
    prompts = read_prompts(args.prompts)
    loaded = load(args)
    check_window(loaded, prompts, args.prompts)
    seed_everything(args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")  # a failed run leaves no half-written --out behind
    with open(partial, "w", encoding="utf-8") as f:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            responses = generate(loaded.model, loaded.tokenizer, loaded.renderer, [m for _, _, m in batch],
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, **sampling)
            for (_, row, _), response in zip(batch, responses):
                f.write(json.dumps({**row, "response": response}, ensure_ascii=False) + "\n")
            print(f"generated {start + len(batch)}/{len(prompts)}", file=sys.stderr, flush=True)
    os.replace(partial, out)
    print(f"wrote {len(prompts)} responses to {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer a JSONL file of prompts (batched); writes each row plus \"response\"")
    add_model_args(p)
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl",
                   help="one {\"prompt\": ...}, {\"messages\": [...]} or Firefly {\"conversation\": [...]} a line")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="the input rows plus \"response\", in order")
    add_sampling_args(p, max_new_tokens=512)
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts generated together (default 8)")
    p.set_defaults(func=run)
