"""A load test of an OpenAI-compatible chat server (`dpo-dist serve`, vLLM, ...) with the real `openai` client: N
clients in parallel, each sending one request after another (every other client streams) for a bounded time. Prints
one JSON line: clients, requests, answered, errors, p50/p99 latency in ms, requests per second.

    python -m dpo_dist.inference.loadtest --url http://127.0.0.1:8000/v1 --clients 6 --seconds 8 [--api-key KEY]

Nothing is retried, so every request is either answered (a reply with a finish reason) or counted as an error."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

PROMPTS = ("Describe the owl.", "Tell me about the fox.", "What is the cat like?", "Describe the river.")


def _client(url: str, api_key: str | None):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=api_key or "none", max_retries=0, timeout=120)


def _ask(client, model: str, n: int, stream: bool, max_tokens: int) -> None:
    """One request; raises unless it was answered in full."""
    messages = [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}]
    kwargs = dict(model=model, messages=messages, max_tokens=max_tokens, temperature=0.7, seed=n)
    if stream:
        finish = [c.choices[0].finish_reason for c in client.chat.completions.create(stream=True, **kwargs)
                  if c.choices and c.choices[0].finish_reason]
    else:
        finish = [client.chat.completions.create(**kwargs).choices[0].finish_reason]
    if finish not in (["stop"], ["length"]):
        raise RuntimeError(f"no single finish reason in the reply: {finish}")


def _run_client(url: str, api_key: str | None, model: str, index: int, deadline: float, max_tokens: int) -> dict:
    client = _client(url, api_key)
    latencies, errors, n = [], [], 0
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            _ask(client, model, index * 100_000 + n, stream=index % 2 == 1, max_tokens=max_tokens)
            latencies.append(time.monotonic() - start)
        except Exception as err:  # counted and shown, never retried
            errors.append(f"{type(err).__name__}: {err}")
        n += 1
    return {"latencies": latencies, "errors": errors}


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def run(url: str, clients: int, seconds: float, api_key: str | None = None, max_tokens: int = 16) -> dict:
    """Load the server at `url` (its /v1 base) with `clients` parallel clients for `seconds`; the figures."""
    model = _client(url, api_key).models.list().data[0].id
    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: _run_client(url, api_key, model, i, start + seconds, max_tokens),
                                range(clients)))
    wall = time.monotonic() - start
    latencies = [t for r in results for t in r["latencies"]]
    errors = [e for r in results for e in r["errors"]]
    ms = {f"p{p}_ms": round(1000 * percentile(latencies, p), 1) if latencies else None for p in (50, 99)}
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(latencies) + len(errors),
            "answered": len(latencies), "errors": len(errors), **ms,
            "requests_per_s": round(len(latencies) / wall, 2), "max_tokens": max_tokens, "first_errors": errors[:3]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpo_dist.inference.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server's API base, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--clients", type=int, default=6, help="parallel clients (default 6)")
    p.add_argument("--seconds", type=float, default=10, help="how long clients start new requests (default 10)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request (default 16)")
    p.add_argument("--api-key", help="the server's API key (default: $DPO_DIST_API_KEY)")
    args = p.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.max_tokens < 1:
        p.error("--clients and --max-tokens must be at least 1, --seconds above 0")
    try:
        import openai
    except ImportError:
        p.error("the load test needs the openai client: pip install openai")
    try:
        report = run(args.url, args.clients, args.seconds, args.api_key or os.environ.get("DPO_DIST_API_KEY"),
                     args.max_tokens)
    except openai.OpenAIError as err:  # no server there, or a wrong key: before any load
        print(f"error: {args.url}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
