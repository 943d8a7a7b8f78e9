"""`dpo-dist serve` end to end on the demo's DPO model (base sft/merged + dpo/adapter): one real server process, with an
API key, talked to with the openai client (raw HTTP for bodies the client would not send). Chat and stream, greedy
replies equal to `dpo-dist generate`'s, seeds, stop strings, max_tokens, every refusal in OpenAI's error shape, the
key, a client leaving mid-stream, the load test, and bad command lines."""
from __future__ import annotations

import http.client
import json
import re
import select
import socket
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import write_jsonl

pytestmark = pytest.mark.e2e

KEY = "test-key-1234"
OWL = [{"role": "user", "content": "Describe the owl."}]
MAX_TOKENS = 24
CLI = [sys.executable, "-m", "dpo_dist.cli"]


@dataclass
class Served:
    url: str          # the API base, http://127.0.0.1:PORT/v1
    log: Path         # the server's stderr
    generated: subprocess.Popen  # `dpo-dist generate` on OWL, run while the server started
    generated_out: Path


@pytest.fixture(scope="module")
def served(demo_run, tmp_path_factory):
    out, _ = demo_run
    model = [str(out / "sft" / "merged"), "--adapter", str(out / "dpo" / "adapter")]
    work = tmp_path_factory.mktemp("serve")
    log = work / "server.log"
    with open(log, "w") as err:  # a file, not a pipe: a pipe nobody reads would fill and stall the server
        proc = subprocess.Popen([*CLI, "serve", *model, "--port", "0", "--api-key", KEY], stdout=subprocess.PIPE,
                                stderr=err, text=True)
    prompts = write_jsonl(work / "prompts.jsonl", [{"messages": OWL}])
    generated = subprocess.Popen([*CLI, "generate", *model, "--prompts", str(prompts), "--out", str(work / "gen.jsonl"),
                                  "--temperature", "0", "--max-new-tokens", str(MAX_TOKENS)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)
        line = proc.stdout.readline() if ready else ""
        found = re.search(r"http://127\.0\.0\.1:\d+/v1", line)
        assert found, f"no URL line from the server: {line!r}\n{log.read_text()[-3000:]}"
        assert "model 'dpo'" in line and "API key required" in line, line
        yield Served(found.group(0), log, generated, work / "gen.jsonl")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        generated.kill()


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served.url, api_key=KEY, max_retries=0, timeout=60)


def raw(served, method: str, path: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    """(status, JSON body) of one plain HTTP request to the server."""
    url = urllib.parse.urlsplit(served.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read())
    conn.close()
    return status, data


def assert_error(status: int, data: dict, want_status: int, param=None, code=None) -> str:
    assert status == want_status, (status, data)
    assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}, data
    assert data["error"]["param"] == param and data["error"]["code"] == code, data
    assert data["error"]["message"] and data["error"]["type"] == "invalid_request_error", data
    return data["error"]["message"]


def chat(client, **kwargs):
    return client.chat.completions.create(model="dpo", messages=kwargs.pop("messages", OWL), **kwargs)


def streamed(client, **kwargs) -> tuple[list[str], list]:
    chunks = list(chat(client, stream=True, **kwargs))
    return [c.choices[0].delta.content or "" for c in chunks if c.choices], chunks


def test_the_model_list_health_and_one_chat(served, client):
    assert [m.id for m in client.models.list().data] == ["dpo"]  # the run directory's name, dpo/adapter
    assert raw(served, "GET", "/health", key=None) == (200, {"status": "ok", "model": "dpo"})
    reply = chat(client, temperature=0, max_tokens=MAX_TOKENS)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == "dpo"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.startswith("It is")  # the demo's form
    assert choice.finish_reason == "stop"  # the end-of-turn token, before max_tokens
    used = reply.usage
    assert 0 < used.completion_tokens < MAX_TOKENS and used.prompt_tokens > 10
    assert used.total_tokens == used.prompt_tokens + used.completion_tokens


def test_a_stream_joins_to_the_same_reply(client):
    whole = chat(client, temperature=0, max_tokens=MAX_TOKENS)
    pieces, chunks = streamed(client, temperature=0, max_tokens=MAX_TOKENS, stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(pieces) == whole.choices[0].message.content
    assert sum(1 for p in pieces if p) > 3  # token by token, not one piece at the end
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_a_greedy_reply_equals_dpo_dist_generate(served, client):
    _, err = served.generated.communicate(timeout=180)
    assert served.generated.returncode == 0, err[-2000:]
    expected = json.loads(served.generated_out.read_text().splitlines()[0])["response"]
    assert expected and chat(client, temperature=0, max_tokens=MAX_TOKENS).choices[0].message.content == expected
    # max_completion_tokens is OpenAI's newer name for max_tokens
    assert chat(client, temperature=0, max_completion_tokens=MAX_TOKENS).choices[0].message.content == expected


def test_a_seed_repeats_a_sampled_reply(client):
    texts = [chat(client, temperature=1.0, seed=seed, max_tokens=MAX_TOKENS).choices[0].message.content
             for seed in (7, 7, 8, 9, 10)]
    assert texts[0] == texts[1]
    assert len(set(texts)) > 1, texts  # the seeds do change the sample


def test_a_stop_string_ends_the_reply_and_is_cut(client):
    full = chat(client, temperature=0, max_tokens=MAX_TOKENS)
    text = full.choices[0].message.content
    start = text.index(" ", len(text) // 3)
    stop = text[start:start + 4]  # from a word in the middle, with its space
    expected = text[:text.index(stop)]
    for stops in (stop, ["never said", stop]):
        reply = chat(client, temperature=0, max_tokens=MAX_TOKENS, stop=stops)
        assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens < full.usage.completion_tokens  # generation halted there
        pieces, _ = streamed(client, temperature=0, max_tokens=MAX_TOKENS, stop=stops)
        assert "".join(pieces) == expected


def test_max_tokens_ends_the_reply_with_length(client):
    text = chat(client, temperature=0, max_tokens=MAX_TOKENS).choices[0].message.content
    short = chat(client, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].message.content and text.startswith(short.choices[0].message.content)


def _body(**fields) -> bytes:
    return json.dumps({"model": "dpo", "messages": OWL, **fields}).encode()


USER, ROBOT = {"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}
REFUSALS = [  # (name, body, status, param, code)
    ("invalid JSON", b'{"model": "dpo", "messages": [', 400, None, None),
    ("not an object", b"[1, 2]", 400, None, None),
    ("no messages", json.dumps({"model": "dpo"}).encode(), 400, "messages", None),
    ("messages not a list", _body(messages="hi"), 400, "messages", None),
    ("unknown role", _body(messages=[USER, ROBOT]), 400, "messages[1].role", None),
    ("ends with the assistant", _body(messages=[USER, {"role": "assistant", "content": "ok"}]), 400,
     "messages[1].role", None),
    ("content not text", _body(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", None),
    ("temperature a string", _body(temperature="hot"), 400, "temperature", None),
    ("temperature too high", _body(temperature=3), 400, "temperature", None),
    ("max_tokens 0", _body(max_tokens=0), 400, "max_tokens", None),
    ("stop not strings", _body(stop=[1]), 400, "stop", None),
    ("unknown model", _body(model="gpt-4o"), 404, "model", "model_not_found"),
    ("n above 1", _body(n=2), 400, "n", "unsupported_parameter"),
    ("tools", _body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "unsupported_parameter"),
    ("logprobs", _body(logprobs=True), 400, "logprobs", "unsupported_parameter"),
    ("json mode", _body(response_format={"type": "json_object"}), 400, "response_format", "unsupported_parameter"),
    ("unknown parameter", _body(best_of=3), 400, "best_of", None),
]


@pytest.mark.parametrize("body,status,param,code", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_a_bad_request_is_refused_in_openais_error_shape(served, body, status, param, code):
    assert_error(*raw(served, "POST", "/v1/chat/completions", body), status, param, code)


def test_a_request_over_the_window_states_the_token_counts(served, client):
    prompt_tokens = chat(client, temperature=0, max_tokens=1).usage.prompt_tokens
    message = assert_error(*raw(served, "POST", "/v1/chat/completions", _body(max_tokens=1000)), 400, "messages",
                           "context_length_exceeded")
    assert f"({prompt_tokens} in the messages, 1000 in the completion)" in message and "256 tokens" in message


def test_the_openai_client_surfaces_the_refusals(client):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=OWL)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, extra_body={"frobnicate": True})
    assert err.value.param == "frobnicate"


def test_the_api_key_is_required_except_on_health(served):
    from openai import AuthenticationError, OpenAI

    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", _body()),
                               ("POST", "/v1/chat/completions", b"{not json")):  # the key comes before the body
        for key in (None, "wrong"):
            assert_error(*raw(served, method, path, body, key=key), 401, None, "invalid_api_key")
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=served.url, api_key="wrong", max_retries=0).models.list()
    assert raw(served, "GET", "/health", key=None)[0] == 200
    assert_error(*raw(served, "GET", "/v1/no-such-route"), 404)


def test_a_client_leaving_mid_stream_stops_its_reply(served, client):
    for seed in range(3):  # long sampled replies: the client leaves after the first piece of text
        stream = chat(client, stream=True, temperature=2.0, seed=seed, max_tokens=200)
        pieces = iter(stream)
        next(pieces), next(pieces)
        stream.close()
    after = chat(client, temperature=0, max_tokens=MAX_TOKENS)  # queued behind what the leavers left
    assert after.choices[0].finish_reason == "stop" and after.choices[0].message.content.startswith("It is")
    stopped = [int(n) for n in re.findall(r"its reply stopped after (\d+) of 200 tokens", served.log.read_text())]
    assert stopped and all(n < 200 for n in stopped), served.log.read_text()[-2000:]


def test_the_load_test_loses_no_request(served):
    proc = subprocess.run([sys.executable, "-m", "dpo_dist.inference.loadtest", "--url", served.url, "--clients", "6",
                           "--seconds", "8", "--api-key", KEY], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["errors"] == 0 and report["first_errors"] == [], report
    assert report["answered"] == report["requests"] >= 6, report
    assert 0 < report["p50_ms"] <= report["p99_ms"], report
    assert raw(served, "GET", "/health", key=None)[0] == 200


def test_bad_command_lines_are_one_error_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        runs = {  # name: (argv, what the line says)
            "no model": (["serve", str(tmp_path / "missing"), "--port", "0"], "does not exist"),
            "bad port": (["serve", str(tmp_path), "--port", "70000"], "--port 70000"),
            "port taken": (["serve", str(tmp_path), "--port", port], "cannot listen"),
        }
        procs = {name: subprocess.Popen([*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, (argv, _) in runs.items()}
        missing = subprocess.Popen([sys.executable, "-c", "import sys; sys.modules['fastapi'] = None; "
                                    "from dpo_dist.cli import main; sys.exit(main(['serve', 'x']))"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        results = {name: p.communicate(timeout=120) for name, p in {**procs, "no fastapi": missing}.items()}
    runs["no fastapi"] = ([], "pip install 'dpo-dist[serve]'")
    for name, (_, err) in results.items():
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and runs[name][1] in lines[0], (name, err)
    assert all(p.returncode == 2 for p in (*procs.values(), missing))
