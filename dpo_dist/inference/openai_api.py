"""The OpenAI chat-completions wire format that `dpo-dist serve` speaks: the request schema and its checks (each
refusal is an APIError, answered in OpenAI's error shape), and the completion, chunk and model objects of the answers.
Nothing here loads a model."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dpo_dist.data.converters import RowError, _check_turns, _role_content_messages, json_type


class APIError(Exception):
    """A refused request: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None  # one more chunk before [DONE], with the usage and no choices


class ChatRequest(BaseModel):
    """A chat-completions request. A null field means its default, as in OpenAI's API. Unknown fields are kept (extra)
    for `check_unsupported`, which refuses them by name."""
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    messages: list[Any]                # checked by `conversation`, with the rules `dpo-dist generate` applies
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Any = None                   # a string or a list of strings: checked by `stop_strings`
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None            # the caller's own id for its end user; it changes no output

    @property
    def sampling(self) -> dict:
        """Keyword arguments of scoring.generate; OpenAI's defaults are temperature 1 and top-p 1."""
        return {"temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p}


# Parameters of OpenAI's API this server does not implement, with the values that mean "not used" (null always
# does). Any other value is refused, naming the parameter, rather than ignored.
UNSUPPORTED = {
    "n": (1,), "logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none", "auto"),
    "parallel_tool_calls": (True, False), "functions": ([],), "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
    "modalities": (["text"],), "audio": (), "prediction": (), "store": (False,), "metadata": ({},),
    "reasoning_effort": (), "service_tier": ("auto", "default"), "web_search_options": (), "verbosity": (),
}


def check_unsupported(request: ChatRequest) -> None:
    for name, value in (request.model_extra or {}).items():
        if name not in UNSUPPORTED:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name)
        # a bool is no number here: JSON's true is not n=1
        if value is not None and not any(value == ok and isinstance(value, bool) == isinstance(ok, bool)
                                         for ok in UNSUPPORTED[name]):
            allowed = " or ".join(map(repr, UNSUPPORTED[name])) or "null"
            raise APIError(400, f"{name}: not supported by this server (only {allowed}); got {value!r}", param=name,
                           code="unsupported_parameter")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")


def reply_budget(request: ChatRequest) -> int | None:
    """max_completion_tokens (OpenAI's current name) or max_tokens; None: up to the rest of the model's window."""
    new, old = request.max_completion_tokens, request.max_tokens
    if new is not None and old is not None and new != old:
        raise APIError(400, f"max_tokens {old} and max_completion_tokens {new} differ: give one", param="max_tokens")
    return new if new is not None else old


def stop_strings(request: ChatRequest) -> list[str]:
    stop = request.stop
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, f"stop: expected a string or a list of strings, got {json_type(stop)}", param="stop")
    if len(stops) > 4:
        raise APIError(400, f"stop: at most 4 stop strings, got {len(stops)}", param="stop")
    if "" in stops:
        raise APIError(400, "stop: a stop string cannot be empty", param="stop")
    return stops


def conversation(messages: list) -> list[dict]:
    """The request's messages as canonical role/content turns: system first (optional), then user and assistant in
    turn, ending with the user's (the rules of `dpo-dist generate`). Text content parts are joined."""
    items = [_plain(item, f"messages[{i}]") for i, item in enumerate(messages)]
    try:
        return _check_turns(_role_content_messages(items, "messages"), "messages", "messages", "user",
                            "no user message")
    except RowError as err:
        raise APIError(400, f"{err.field}: {err.reason}", param=err.field) from None


def _plain(item, where: str):
    """A message with string content; a field the template cannot show (name, tool_calls, ...) is refused."""
    if not isinstance(item, dict):
        return item  # _role_content_messages names its type
    for key, value in item.items():
        if key not in ("role", "content") and value is not None:
            raise APIError(400, f"{where}.{key}: not supported by this server", param=f"{where}.{key}")
    if isinstance(item.get("content"), list):
        return {**item, "content": _text_parts(item["content"], f"{where}.content")}
    return item


def _text_parts(parts: list, where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise APIError(400, f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                "supported", param=f"{where}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's RequestValidationError (its first error) as a 400 naming the field, e.g. `messages[1]`."""
    err = errors[0]
    loc = list(err.get("loc", ()))
    loc = loc[1:] if loc[:1] == ["body"] else loc
    if err.get("type") == "json_invalid":  # loc is ("body", character offset)
        where = f" at character {loc[0]}" if loc and isinstance(loc[0], int) else ""
        return APIError(400, f"invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}{where}")
    if not loc:
        return APIError(400, f"the request body must be a JSON object: {err.get('msg')}")
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return APIError(400, f"{param}: {err.get('msg')}", param=param)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, created: int, model: str, text: str, finish_reason: str, used: dict) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish_reason}
    return {"id": id, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": used}


def chunk(id: str, created: int, model: str, delta: dict | None, finish_reason: str | None = None,
          used: dict | None = None) -> dict:
    """A streamed piece: a delta (or, with `used` and no delta, the closing usage chunk, which has no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    return out if used is None else {**out, "usage": used}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "dpo-dist"}
