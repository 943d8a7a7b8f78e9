"""The HTTP server of `dpo-dist serve`: OpenAI's chat-completions API (FastAPI, run by uvicorn) over one loaded model.
Routes: GET /health, GET /v1/models[/ID], POST /v1/chat/completions (server-sent events when `stream` is true).

One worker thread generates, one request at a time in arrival order, through `scoring.generate`, so a greedy reply
equals `dpo-dist generate`'s; the HTTP loop only awaits it, and streamed text flows from the worker as it is made.
A client that leaves mid-reply stops its generation at the next token."""
from __future__ import annotations

import asyncio
import copy
import json
import secrets
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from transformers import StoppingCriteria, StoppingCriteriaList

from dpo_dist.inference import openai_api as api
from dpo_dist.inference.loader import seed_everything
from dpo_dist.inference.scoring import generate, reply_text, stop_token_ids

OPEN_PATHS = ("/health",)  # load balancers probe it without the API key
NO_WINDOW_MAX_TOKENS = 512  # the reply budget of a request without max_tokens, for a model that states no window


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether there was one."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def held_back(text: str, stops: list[str]) -> str:
    """What of a growing `text` can be sent already: not a tail that may become a stop string, nor half a
    character (a multi-byte character split across tokens decodes as U+FFFD until its last byte comes)."""
    text = text.rstrip("\ufffd")
    for k in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return text[:-k]
    return text


class Reply(StoppingCriteria):
    """One reply while it is generated (transformers calls it once per new token): counts its tokens, cuts its text at
    the first stop string, passes each new piece of text to `on_text`, and ends generation at a stop string or once
    cancel() was called."""

    def __init__(self, tokenizer, stop_ids: list[int], stops: list[str], on_text=None):
        self.tokenizer, self.stop_ids, self.stops, self.on_text = tokenizer, stop_ids, stops, on_text
        self.tokens = 0
        self.ended = False  # the last token ends the turn (end of turn or eos)
        self.sent = ""
        self._prompt_len = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __call__(self, input_ids, scores, **kwargs):
        if self._prompt_len is None:  # the first call comes with the first new token
            self._prompt_len = input_ids.shape[1] - 1
        self.tokens = input_ids.shape[1] - self._prompt_len
        self.ended = int(input_ids[0, -1]) in self.stop_ids
        hit = False
        if self.stops or self.on_text is not None:  # else nobody needs the text before generate returns it
            ids = input_ids[0, self._prompt_len:].tolist()
            text, hit = cut_at_stop(reply_text(self.tokenizer, ids, self.stop_ids), self.stops)
            self._send(text if hit else held_back(text, self.stops))
        done = hit or self.cancelled
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def finish(self, text: str) -> None:
        """The final text: what was held back is sent now."""
        self._send(text)

    def _send(self, text: str) -> None:
        if self.on_text is not None and len(text) > len(self.sent) and text.startswith(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text


@dataclass
class Job:
    messages: list[dict]
    prompt_tokens: int
    max_tokens: int
    sampling: dict
    seed: int | None
    stops: list[str]


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens reached)
    usage: dict


class Worker:
    """The one thread that generates: requests wait in its queue and are answered one at a time, in arrival order."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.stop_ids = stop_token_ids(loaded.tokenizer, loaded.renderer)
        # The HTTP loop counts prompt tokens with its own copy: a fast tokenizer that two threads use at once fails
        # ("Already borrowed"), and the worker's is busy in generate.
        self.counter = copy.deepcopy(loaded.tokenizer)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpo-dist-generate")
        self.current: Reply | None = None

    def prompt_tokens(self, messages: list[dict]) -> int:
        text = self.loaded.renderer.generation_prompt(messages)  # what scoring.generate feeds the model
        return len(self.counter(text, add_special_tokens=False)["input_ids"])

    def start(self, job: Job, on_text=None) -> tuple[Reply, asyncio.Future]:
        """Queue `job`; the future gives its Result (None when cancelled before its turn)."""
        reply = Reply(self.loaded.tokenizer, self.stop_ids, job.stops, on_text)
        return reply, asyncio.get_running_loop().run_in_executor(self.pool, self._generate, job, reply)

    def _generate(self, job: Job, reply: Reply) -> Result | None:
        if reply.cancelled:  # its client left while it waited
            return None
        self.current = reply
        seed_everything(job.seed)
        m = self.loaded
        text = generate(m.model, m.tokenizer, m.renderer, [job.messages], max_new_tokens=job.max_tokens,
                        batch_size=1, stopping_criteria=StoppingCriteriaList([reply]), **job.sampling)[0]
        if reply.cancelled:
            print(f"dpo-dist serve: a client left; its reply stopped after {reply.tokens} of {job.max_tokens} tokens",
                  file=sys.stderr, flush=True)
        text, hit = cut_at_stop(text, job.stops)
        reply.finish(text)
        return Result(text, "stop" if hit or reply.ended else "length", api.usage(job.prompt_tokens, reply.tokens))

    def close(self) -> None:
        """At shutdown: the reply being generated stops at its next token, the queued ones never start."""
        if self.current is not None:
            self.current.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)


def unknown_model(asked: str, name: str) -> api.APIError:
    return api.APIError(404, f"The model `{asked}` does not exist; this server serves `{name}`", param="model",
                        code="model_not_found")


def make_job(request: api.ChatRequest, name: str, worker: Worker) -> Job:
    """The request checked against this server and model (APIError otherwise), as a generation job."""
    if request.model != name:
        raise unknown_model(request.model, name)
    api.check_unsupported(request)
    messages = api.conversation(request.messages)
    stops = api.stop_strings(request)
    asked = api.reply_budget(request)
    used = worker.prompt_tokens(messages)
    window = worker.loaded.window
    if asked is not None:
        budget = asked
    else:  # OpenAI's default: up to the end of the window
        budget = NO_WINDOW_MAX_TOKENS if window is None else max(window - used, 1)
    if window is not None and used + budget > window:
        raise api.APIError(400, f"This model's maximum context length is {window} tokens. However, you requested "
                           f"{used + budget} tokens ({used} in the messages, {budget} in the completion). Please "
                           "reduce the length of the messages or completion.", param="messages",
                           code="context_length_exceeded")
    return Job(messages, used, budget, request.sampling, request.seed, stops)


async def complete(worker: Worker, job: Job, name: str) -> dict:
    reply, future = worker.start(job)
    try:
        result = await future
    finally:
        reply.cancel()  # a no-op once done; frees the worker when the request was cancelled
    return api.completion(_new_id(), int(time.time()), name, result.text, result.finish_reason, result.usage)


async def stream(worker: Worker, job: Job, name: str, include_usage: bool):
    """The reply as server-sent events: a role chunk, one chunk per new piece of text, a finish chunk, optionally a
    usage chunk, then [DONE]."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    reply, future = worker.start(job, on_text=lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text))
    future.add_done_callback(lambda _: pieces.put_nowait(None))  # runs after every piece the worker queued
    id, created = _new_id(), int(time.time())

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        yield event(api.chunk(id, created, name, {"role": "assistant", "content": ""}))
        while (text := await pieces.get()) is not None:
            yield event(api.chunk(id, created, name, {"content": text}))
        try:
            result = future.result()
        except Exception as err:  # the status line is sent already: the error goes in the stream, as OpenAI's does
            yield event(api.APIError(500, f"generation failed: {err}", type="server_error").body())
            return
        yield event(api.chunk(id, created, name, {}, result.finish_reason))
        if include_usage:
            yield event(api.chunk(id, created, name, None, used=result.usage))
        yield "data: [DONE]\n\n"
    finally:
        reply.cancel()  # the client left (the response was cancelled), or a no-op once done


def _new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


class RequireKey:
    """ASGI middleware: every route but OPEN_PATHS needs `Authorization: Bearer KEY`, else 401 invalid_api_key. It
    runs before the body is read, so an unauthenticated request learns nothing about its body."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.key):
                message = ("Incorrect API key provided" if token.strip() else
                           "Missing API key: send the header `Authorization: Bearer KEY`")
                err = api.APIError(401, message, code="invalid_api_key")
                await _error(err, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error(err: api.APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal and failure in OpenAI's error shape, FastAPI's own 422 and 404 included."""

    @app.exception_handler(api.APIError)
    async def refused(request, err: api.APIError):
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        return _error(api.validation_error(err.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        message = f"Invalid URL ({request.method} {request.url.path})" if err.status_code == 404 else str(err.detail)
        return _error(api.APIError(err.status_code, message), getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def failed(request, err: Exception):
        return _error(api.APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error"))


def build_app(loaded, name: str, api_key: str | None) -> FastAPI:
    """The API over `loaded` (inference.loader.load), serving it as model `name`; with `api_key`, every route but
    /health needs it."""
    worker = Worker(loaded)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="dpo-dist serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if api_key:
        app.add_middleware(RequireKey, key=api_key)
    add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [api.model_card(name, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise unknown_model(model_id, name)
        return api.model_card(name, created)

    @app.post("/v1/chat/completions")
    async def chat(request: api.ChatRequest):
        job = make_job(request, name, worker)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(stream(worker, job, name, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(worker, job, name)

    return app


def run(app: FastAPI, sock) -> None:
    """Serve `app` on the listening socket `sock` until Ctrl-C or SIGTERM."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, ws="none", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
