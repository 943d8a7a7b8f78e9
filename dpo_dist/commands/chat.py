"""`dpo-dist chat MODEL`: a multi-turn console chat, formatted with the training chat template and streamed token by
token. `dpo-dist generate` (batch mode) lives in chat_generate.py; both share chat_model.py and generate with
`dpo_dist.inference.scoring.generate`, so a greedy chat reply equals a greedy batch one.

Commands: /reset clears the history (the system prompt stays), /exit or Ctrl-D quits. Ctrl-C stops the reply being
generated. When the conversation no longer fits the model's window, the oldest turns are dropped, with a notice.
"""
from __future__ import annotations

import sys

from dpo_dist.inference import generate as chat_generate
from dpo_dist.inference.loader import add_model_args, add_sampling_args, check_sampling_args, load, seed_everything

COMMANDS = "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply"


class PrintStreamer:
    """Receives token ids from model.generate and prints the reply as it grows, flushed at once."""

    def __init__(self, tokenizer, stop_ids: set[int], out=sys.stdout):
        self.tokenizer, self.stop_ids, self.out = tokenizer, stop_ids, out
        self.ids: list[int] = []
        self.shown = ""
        self._prompt_skipped = False
        self._stopped = False

    def put(self, value) -> None:
        if not self._prompt_skipped:  # generate passes the prompt first
            self._prompt_skipped = True
            return
        for token in value.reshape(-1).tolist():
            self._stopped = self._stopped or token in self.stop_ids
            if not self._stopped:
                self.ids.append(token)
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)

    def _show(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd") and not final:  # half of a multi-byte character: wait for the rest
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text


def fit_window(loaded, history: list[dict], max_new_tokens: int) -> tuple[list[dict], int, int]:
    """Drop the oldest user/assistant turns (never the system prompt) until prompt + reply fit the model's window.
    Returns (history, turns dropped, prompt tokens)."""
    dropped = 0
    while True:
        used = loaded.prompt_tokens(history)
        if loaded.window is None or used + max_new_tokens <= loaded.window:
            return history, dropped, used
        first = 1 if history[0]["role"] == "system" else 0
        if len(history) - first <= 1:  # only the new message is left
            return history, dropped, used
        history = history[:first] + history[first + 2:]
        dropped += 1


def reply_budget(loaded, max_new_tokens: int) -> int:
    """--max-new-tokens, capped so a reply leaves room for some conversation in the model's window."""
    if loaded.window is not None and max_new_tokens > loaded.window // 2:
        capped = loaded.window // 2
        print(f"note: --max-new-tokens {max_new_tokens} does not leave room for a conversation in this model's "
              f"{loaded.window}-token window; replies are capped at {capped} tokens", file=sys.stderr)
        return capped
    return max_new_tokens


def answer(loaded, history: list[dict], max_new_tokens: int, sampling: dict, show_prompt: bool) -> str | None:
    """Stream one reply to the conversation `history` (ending with the user's message). Returns the reply, or None
    when the message alone does not fit the window or was stopped before any text. `history` is trimmed in place
    when it is too long."""
    from dpo_dist.inference.scoring import generate

    trimmed, dropped, used = fit_window(loaded, history, max_new_tokens)
    if dropped:
        history[:] = trimmed
        print(f"[dropped the oldest {dropped} turn{'s' if dropped > 1 else ''} to fit the "
              f"{loaded.window}-token window]", flush=True)
    budget = max_new_tokens if loaded.window is None else min(max_new_tokens, loaded.window - used)
    if budget < 1:
        print(f"[your message is {used} tokens; it does not fit the model's {loaded.window}-token window]", flush=True)
        return None
    if show_prompt:
        print(f"--- prompt ({used} tokens) ---\n{loaded.prompt_text(history)}\n--- end of prompt ---",
              file=sys.stderr, flush=True)
    tok = loaded.tokenizer
    streamer = PrintStreamer(tok, {tok.convert_tokens_to_ids(loaded.renderer.eot_token), tok.eos_token_id})
    try:
        reply = generate(loaded.model, tok, loaded.renderer, [history], max_new_tokens=budget, batch_size=1,
                         streamer=streamer, **sampling)[0]
    except KeyboardInterrupt:
        reply = streamer.shown.strip() or None  # nothing shown: forget the message too
        print(" [stopped]", end="")
    print(flush=True)
    return reply


def run(args) -> int:
    sampling = check_sampling_args(args)
    loaded = load(args)
    seed_everything(args.seed)
    max_new_tokens = reply_budget(loaded, args.max_new_tokens)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top-p {args.top_p}"
    print(f"dpo-dist chat: {loaded.description}\ntemplate: {loaded.renderer.name} (end of turn "
          f"{loaded.renderer.eot_token}), {mode}, up to {max_new_tokens} new tokens\ncommands: {COMMANDS}", flush=True)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    history = list(system)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            return 0
        if message == "/reset":
            history = list(system)
            print("[history cleared]", flush=True)
            continue
        if message.startswith("/") and " " not in message:
            print(f"[unknown command {message}; {COMMANDS}]", flush=True)
            continue
        history.append({"role": "user", "content": message})
        reply = answer(loaded, history, max_new_tokens, sampling, args.show_prompt)
        if reply is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": reply})


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="talk to a model (or base + LoRA adapter) in the console, with its chat template")
    add_model_args(p)
    add_sampling_args(p, max_new_tokens=512)
    p.add_argument("--system", metavar="TEXT", help="system prompt (default: the template's own, if it has one)")
    p.add_argument("--show-prompt", action="store_true", help="print each rendered prompt to stderr (for debugging "
                   "templates)")
    p.set_defaults(func=run)
    chat_generate.add_parser(sub)
