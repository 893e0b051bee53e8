"""The OpenAI chat-completions wire format: request validation, error bodies, response shapes.

Why by hand and not through a schema library: every field a client sends must be checked
for type *and* range before it reaches the engine (llama.cpp servers have had memory bugs
from a negative number in JSON), and every refusal must be a 400 in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` naming the offending field, which is
what the ``openai`` SDK turns into ``BadRequestError``.  Nothing here touches a model.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
SEED_MAX = 2**32 - 2  # llama.cpp's sampler seed is a uint32; 0xFFFFFFFF means "random"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A refusal with an HTTP status, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,  # noqa: A002
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (set from the server's flags)."""

    max_tokens: int = 4096  # the largest max_tokens accepted
    default_max_tokens: int = 512
    max_message_chars: int = 64 * 1024
    max_total_chars: int = 256 * 1024


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completion request; ``None`` means "the server's default"."""

    messages: list[dict[str, str]]
    model: str
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    user: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict[str, Any], name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _bad(name, f"must be a number, got {type(v).__name__}", "invalid_type")
    if not math.isfinite(v):
        raise _bad(name, "must be a finite number")
    if v < low or v > high or (low_open and v == low):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise _bad(name, f"must be in {interval}, got {v}")
    return float(v)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise _bad(name, f"must be an integer, got {type(v).__name__}", "invalid_type")
    if not low <= v <= high:
        raise _bad(name, f"must be in [{low}, {high}], got {v}")
    return v


def _content(value: Any, where: str) -> str:
    """Message content: a string, or a list of text parts (what newer clients send)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        pieces = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}[{i}]", "only text content parts are supported", "unsupported_content")
            pieces.append(part["text"])
        return "".join(pieces)
    raise _bad(where, "must be a string or a list of text parts", "invalid_type")


def _check_unicode(text: str, where: str) -> None:
    """JSON can carry lone surrogates (``"\\ud800"``); they cannot be tokenized or saved."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(where, "is not valid Unicode (lone surrogate)", "invalid_unicode") from None


def _messages(value: Any, limits: Limits) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty array", "invalid_type")
    if len(value) > MAX_MESSAGES:
        raise _bad("messages", f"at most {MAX_MESSAGES} messages")
    out: list[dict[str, str]] = []
    total = 0
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "must be an object", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role", f"must be one of {', '.join(ROLES)} (got {str(role)[:40]!r})",
                       "unsupported_role")
        text = _content(m.get("content"), f"{where}.content")
        _check_unicode(text, f"{where}.content")
        if len(text) > limits.max_message_chars:
            raise _bad(f"{where}.content", f"at most {limits.max_message_chars} characters", "message_too_long")
        total += len(text)
        out.append({"role": ROLES[role], "content": text})
    if total > limits.max_total_chars:
        raise _bad("messages", f"at most {limits.max_total_chars} characters in all", "message_too_long")
    if out[-1]["role"] != "user":
        raise _bad(f"messages[{len(out) - 1}].role", "the last message must be the user's")
    return out


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > MAX_STOP_SEQUENCES:
        raise _bad("stop", f"must be a string or an array of at most {MAX_STOP_SEQUENCES} strings")
    for s in items:
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
            raise _bad("stop", f"each stop sequence must be a string of 1 to {MAX_STOP_CHARS} characters")
        _check_unicode(s, "stop")
    return tuple(items)


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """Validate a decoded JSON body; raise ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= 256:
        raise _bad("model", "must be a non-empty string", "invalid_type")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise _bad("n", "only one completion choice is allowed (n must be 1)", "unsupported_value")
    for unsupported in ("tools", "functions"):
        if body.get(unsupported):
            raise _bad(unsupported, "tool calling is not supported by this server", "unsupported_parameter")
    if body.get("logprobs"):
        raise _bad("logprobs", "log probabilities are not supported by this server", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _bad("response_format", "only {\"type\": \"text\"} is supported", "unsupported_parameter")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean", "invalid_type")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("stream_options", "must be an object", "invalid_type")
        if not stream:
            raise _bad("stream_options", "is only allowed with stream: true")
        iu = opts.get("include_usage", False)
        if not isinstance(iu, bool):
            raise _bad("stream_options.include_usage", "must be a boolean", "invalid_type")
        include_usage = iu
    max_tokens = _integer(body, "max_completion_tokens", 1, limits.max_tokens)
    legacy = _integer(body, "max_tokens", 1, limits.max_tokens)
    if max_tokens is None:
        max_tokens = legacy if legacy is not None else limits.default_max_tokens
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    for penalty in ("presence_penalty", "frequency_penalty"):
        _number(body, penalty, -2.0, 2.0)  # accepted for compatibility, not applied (docs/server.md)
    seed = _integer(body, "seed", 0, SEED_MAX)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "must be a string", "invalid_type")
    return ChatRequest(
        messages=_messages(body.get("messages"), limits), model=model, max_tokens=max_tokens, stream=stream,
        include_usage=include_usage, temperature=temperature, top_p=top_p, seed=seed, stop=_stop(body.get("stop")),
        user=user,
    )


# -- responses -------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, memory: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }
    if memory is not None:
        body["memory"] = memory  # our extension; SDKs keep unknown fields (response.model_extra)
    return body


def chunk_body(cid: str, model: str, created: int, delta: dict[str, str], finish_reason: str | None = None,
               *, usage_: dict[str, int] | None = None, empty_choices: bool = False) -> dict[str, Any]:
    choices = [] if empty_choices else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None}]
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": choices}
    if usage_ is not None or empty_choices:
        body["usage"] = usage_
    return body
