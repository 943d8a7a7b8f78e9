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

from dpo_dist.config.schema import ConfigError
from dpo_dist.data.formats import DataError
from dpo_dist.data.prompts import listed, read_prompt_file
from dpo_dist.inference.loader import add_model_args, add_sampling_args, check_sampling_args, load, seed_everything

def read_prompts(path: str) -> list[tuple[int, dict, list[dict]]]:
    """(line number, row, conversation) for each non-blank line; every bad line is reported at once."""
    if not Path(path).is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    try:
        return read_prompt_file(path)
    except DataError as err:
        raise ConfigError(str(err)) from None


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ConfigError(listed(problems))


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
