"""`dpo-dist chat` and `dpo-dist generate` end to end on a tiny Qwen2: history, /reset, streaming to a terminal, the
end-of-turn stop, batch files in order, bad lines, seeds, and that an adapter is really applied."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import untied_base, write_jsonl
from dpo_dist.cli import main

PROMPT_SHOWN = re.compile(r"--- prompt \((\d+) tokens\) ---\n(.*?)\n--- end of prompt ---", re.S)
FIRST_REPLY = re.compile(r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>", re.S)
GREEDY = ["--template", "qwen", "--temperature", "0", "--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def chat_base(tiny_base, tmp_path_factory) -> Path:
    return untied_base(tiny_base, tmp_path_factory.mktemp("chat") / "base")


@pytest.fixture(scope="module")
def adapter(chat_base, tmp_path_factory) -> Path:
    """A random (not zero-initialised) LoRA adapter; its tokenizer carries the qwen template, as training exports it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.data.templates import get_template

    out = tmp_path_factory.mktemp("chat") / "adapter"
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(chat_base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    tokenizer.chat_template = get_template("qwen").standalone_source()
    tokenizer.save_pretrained(out)
    return out


def cli_generate(model, tmp_path, rows, *flags) -> list[dict]:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(model), "--prompts", str(prompts), "--out", str(out), *flags]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_chat_keeps_the_conversation_and_reset_clears_it(chat_base, tmp_path):
    lines = ["hello there", "what is it", "/reset", "again", "/exit"]
    proc = subprocess.run([sys.executable, "-m", "dpo_dist.cli", "chat", str(chat_base), *GREEDY, "--show-prompt"],
                          input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"dpo-dist chat: {chat_base}" in proc.stdout and "template: qwen" in proc.stdout
    assert "/reset" in proc.stdout and "/exit" in proc.stdout
    prompts = [text for _, text in PROMPT_SHOWN.findall(proc.stderr)]
    assert len(prompts) == 3  # one per message; commands generate nothing
    first_reply = FIRST_REPLY.search(prompts[1]).group(1)
    assert first_reply and first_reply in proc.stdout  # streamed to the user, then carried in the history
    assert "hello there" in prompts[1] and prompts[1].index("hello there") < prompts[1].index("what is it")
    assert "[history cleared]" in proc.stdout
    assert "hello there" not in prompts[2] and "what is it" not in prompts[2] and "again" in prompts[2]
    assert "You are a helpful assistant." in prompts[2]  # the system prompt survives /reset
    assert "<|im_end|>" not in proc.stdout.split("commands:")[1]  # the banner names it; replies must not

    # batch mode gives the same greedy answer to the same conversation: one generation code path
    rows = cli_generate(chat_base, tmp_path, [{"prompt": "hello there"}], *GREEDY)
    assert rows[0]["response"] == first_reply


@pytest.mark.slow
def test_chat_streams_to_a_terminal_and_ctrl_c_stops_only_the_reply(chat_base):
    # Each forward pass sleeps 50 ms, so a reply printed only at its end (unflushed, or not streamed) arrives in one
    # read from the terminal, while a streamed one arrives in many, spread over the generation.
    slow = ("import sys, time\n"
            "from transformers.models.qwen2 import modeling_qwen2 as m\n"
            "forward = m.Qwen2ForCausalLM.forward\n"
            "def slow(self, *a, **k):\n"
            "    time.sleep(0.05)\n"
            "    return forward(self, *a, **k)\n"
            "m.Qwen2ForCausalLM.forward = slow\n"
            "from dpo_dist.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as users run it
    leader, follower = os.openpty()
    proc = subprocess.Popen([sys.executable, "-c", slow, "chat", str(chat_base), *GREEDY, "--max-new-tokens", "60"],
                            stdin=subprocess.PIPE, stdout=follower, stderr=subprocess.DEVNULL, env=env)
    os.close(follower)
    proc.stdin.write(b"hello there\n")
    proc.stdin.flush()
    text, reply_reads, deadline = b"", [], time.time() + 120
    while time.time() < deadline:
        if not select.select([leader], [], [], 1)[0]:
            continue
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the program exited and closed the terminal
            break
        if not chunk:
            break
        text += chunk
        after_prompt = text.split(b">>> ")[1:]
        if len(after_prompt) == 1 and after_prompt[0].strip():  # a read that carried more of the first reply
            reply_reads.append(time.monotonic())
            if len(reply_reads) == 4:
                proc.send_signal(signal.SIGINT)  # Ctrl-C, mid-reply (60 tokens take 3 s)
        if len(after_prompt) == 2 and not proc.stdin.closed:  # back at the prompt
            proc.stdin.write(b"/exit\n")
            proc.stdin.close()
    os.close(leader)
    assert proc.wait(timeout=30) == 0, text.decode(errors="replace")
    assert len(reply_reads) >= 4, f"the reply arrived in {len(reply_reads)} read(s): not streamed"
    assert reply_reads[3] - reply_reads[0] > 0.1
    assert b"[stopped]" in text.split(b">>> ")[1]


def test_generation_stops_at_the_end_of_turn_token(chat_base):
    """The model is rigged to say one word three times, then <|im_end|>, then the word again: without the
    end-of-turn stop the reply would go on past it (the tiny tokenizer's eos is a different token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.data.render import Renderer
    from dpo_dist.inference.scoring import generate

    model = AutoModelForCausalLM.from_pretrained(chat_base)
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eot != tokenizer.eos_token_id
    word = tokenizer(" lake", add_special_tokens=False)["input_ids"]
    assert len(word) == 1
    calls = []

    def script(module, inputs, logits):
        calls.append(1)
        forced = torch.full_like(logits, -1e4)
        forced[..., eot if len(calls) == 4 else word[0]] = 1e4
        return forced

    model.lm_head.register_forward_hook(script)
    for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "top_p": 0.9}):
        calls.clear()
        reply = generate(model, tokenizer, Renderer(tokenizer, "qwen"), [[{"role": "user", "content": "hi"}]],
                         max_new_tokens=10, **sampling)
        assert reply == ["lake lake lake"]
        assert len(calls) == 4  # one forward pass per token, none after the end of turn


def test_generate_answers_every_line_in_order(chat_base, tmp_path, capsys):
    rows = [{"id": 1, "prompt": "hello there"},
            {"id": 2, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what?"}]},
            {"id": 3, "conversation": [{"human": "hi", "assistant": "hello"}, {"human": "tell me more"}]}]
    batched = cli_generate(chat_base, tmp_path, rows, *GREEDY, "--batch-size", "2")
    assert [r["id"] for r in batched] == [1, 2, 3]
    assert all(r["response"] for r in batched)
    assert batched[2]["conversation"] == rows[2]["conversation"]  # the input fields are kept
    err = capsys.readouterr().err
    assert "generated 2/3" in err and "generated 3/3" in err
    # left padding: a prompt padded in a batch gets the answer it gets alone
    alone = cli_generate(chat_base, tmp_path, rows, *GREEDY, "--batch-size", "1")
    assert [r["response"] for r in alone] == [r["response"] for r in batched]


def test_generate_refuses_bad_lines_with_file_and_line(chat_base, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "fine"}, '{"prompt": "cut', {"text": "no prompt here"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(chat_base), "--prompts", str(prompts), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:2: invalid JSON" in err
    assert f"{prompts}:3: row: no prompt" in err
    assert f"{prompts}:4: messages[1].role: wrong role order" in err
    assert f"{prompts}:1" not in err and not out.exists()

    assert main(["chat", str(chat_base), "--adapter", str(tmp_path)]) == 2
    assert "--adapter" in capsys.readouterr().err


def test_generate_with_a_seed_is_reproducible(chat_base, tmp_path):
    rows = [{"prompt": "hello there"}, {"prompt": "what is it"}]
    flags = ["--template", "qwen", "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "12"]
    first = cli_generate(chat_base, tmp_path, rows, *flags, "--seed", "7")
    again = cli_generate(chat_base, tmp_path, rows, *flags, "--seed", "7")
    other = cli_generate(chat_base, tmp_path, rows, *flags, "--seed", "8")
    assert first == again
    assert first != other  # it does sample


def test_adapter_changes_the_output_and_its_tokenizer_template_is_used(chat_base, adapter, tmp_path):
    rows = [{"prompt": "hello there"}, {"prompt": "what is it"}]
    base = cli_generate(chat_base, tmp_path, rows, *GREEDY)
    tuned = cli_generate(chat_base, tmp_path, rows, *GREEDY, "--adapter", str(adapter))
    assert base != tuned
    # MODEL may be the adapter directory itself; with no --template its tokenizer's training template is used
    no_template = [f for f in GREEDY if f not in ("--template", "qwen")]
    assert cli_generate(adapter, tmp_path, rows, *no_template) == tuned


def test_a_long_conversation_drops_its_oldest_turns_but_keeps_the_system_prompt(chat_base):
    from transformers import AutoTokenizer

    from dpo_dist.data.render import Renderer
    from dpo_dist.commands.chat import fit_window
    from dpo_dist.inference.loader import Loaded

    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "answer " * 5}]
    history.append({"role": "user", "content": "last question"})
    loaded = Loaded(None, tokenizer, Renderer(tokenizer, "qwen"), "tiny", window=None)
    full = loaded.prompt_tokens(history)
    loaded.window = full  # room for the whole prompt, not for a 16-token reply
    kept, dropped, used = fit_window(loaded, history, max_new_tokens=16)
    assert dropped >= 1 and used + 16 <= full
    assert kept[0] == history[0] and kept[-1] == history[-1]
    assert kept[1:-1] == history[1 + 2 * dropped:-1]  # the oldest pairs went, in order
