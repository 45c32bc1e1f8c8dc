"""OpenAI's side of the HTTP API (docs/http.md, "Requests" and "Errors"): its error shape
(``OpenAIError``, and the status of each protocol error code) and the reading of a request's
fields into the guest's params, each field checked (a wrong type or range is a 400 naming it).
Pure functions of the request body: ``_openai`` runs the calls.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any, Final

from .._protocol import ErrorCode
from ._http import HttpResponse

#: the HTTP status of each protocol error code
STATUS: Final = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_PARAMS: 400,
    ErrorCode.UNKNOWN_FUNCTION: 404,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.TENANT_UNAVAILABLE: 503,
    ErrorCode.CANCELLED: 503,  # only a shutdown's cancel reaches a client
    ErrorCode.TIMEOUT: 504,
    ErrorCode.GUEST_TRAP: 500,
    ErrorCode.INTERNAL: 500,
}
MAX_EMBEDDING_INPUTS: Final = 64
MAX_CHOICES: Final = 8  # ``n``: choices per chat or completions request
MAX_TOP_LOGPROBS: Final = 20  # ``top_logprobs`` (chat) and ``logprobs`` (completions)
#: Retry-After (seconds) of a 503 that knows no better time: a tenant whose guest cannot run
#: yet (restart backoff, a module that failed to load), no model loaded, an overloaded queue
UNAVAILABLE_RETRY_SECONDS: Final = 5


class OpenAIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 403:
            return "permission_error"
        if self.status == 429:
            return "rate_limit_error"
        if self.status >= 500:
            return "server_error"
        return "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> HttpResponse:
        return json_response(self.status, self.body(), self.headers)


def json_response(
    status: int, body: Any, headers: tuple[tuple[str, str], ...] = ()
) -> HttpResponse:
    return HttpResponse(status, (json.dumps(body) + "\n").encode(), "application/json", headers)


def from_realm(code: str, message: str, retry_after: float | None = None) -> OpenAIError:
    code = ErrorCode(code) if code in set(ErrorCode) else ErrorCode.INTERNAL
    status = STATUS[code]
    if retry_after is None and status == 503:
        retry_after = UNAVAILABLE_RETRY_SECONDS
    headers: tuple[tuple[str, str], ...] = ()
    if retry_after is not None:
        headers = (("Retry-After", str(max(1, math.ceil(retry_after)))),)
    return OpenAIError(status, message, code=code.lower(), headers=headers)


def unavailable(message: str) -> OpenAIError:
    """503 ``tenant_unavailable`` with ``Retry-After``: the tenant cannot run (yet)."""
    return from_realm(ErrorCode.TENANT_UNAVAILABLE, message)


def _bad(param: str, why: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {why}", param=param, code="invalid_value")


# --- request fields --------------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _bad(name, f"must be a number, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise _bad(name, f"must be between {lo:g} and {hi:g}, got {v:g}")
    return float(v)


def _integer(body: dict[str, Any], name: str, lo: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"must be an integer, got {json.dumps(v)[:40]}")
    if v < lo:
        raise _bad(name, f"must be at least {lo}, got {v}")
    return v


def _boolean(body: dict[str, Any], name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(name, f"must be a boolean, got {json.dumps(v)[:40]}")
    return v


# Fields OpenAI's API does not have that go to the guest unchanged when a request carries them
# (llama.cpp's server takes the first three too): the default guest's sampling parameters and
# its speculative decoding (docs/speculative.md). A guest without one refuses it by name.
EXTENSION_FIELDS = ("top_k", "min_p", "repeat_penalty", "speculative")


def sampling_params(body: dict[str, Any]) -> dict[str, Any]:
    """The guest's params for what OpenAI's chat and completions requests share."""
    params: dict[str, Any] = {}
    mt = _integer(body, "max_completion_tokens", 1)
    if mt is None:
        mt = _integer(body, "max_tokens", 1)
    if mt is not None:
        params["max_tokens"] = mt
    for name, lo, hi in (
        ("temperature", 0.0, 2.0),
        ("top_p", 0.0, 1.0),
        ("presence_penalty", -2.0, 2.0),
        ("frequency_penalty", -2.0, 2.0),
    ):
        v = _number(body, name, lo, hi)
        if v is not None:
            params[name] = v
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _bad("seed", "must be an integer")
        params["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop", "must be a string or a list of non-empty strings")
        if len(stops) > 4:
            raise _bad("stop", f"at most 4 sequences, got {len(stops)}")
        if stops:
            params["stop"] = stops
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "must be a string")
    for name in EXTENSION_FIELDS:  # Realm's own (the openai client's extra_body): as given
        if body.get(name) is not None:
            params[name] = body[name]  # the guest's params schema checks them: a 400 if wrong
    return params


def chat_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """The guest's logprobs params of a chat request: ``logprobs`` (boolean) and
    ``top_logprobs`` (0..20, only with ``logprobs``)."""
    on = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0)
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise _bad("top_logprobs", f"at most {MAX_TOP_LOGPROBS}, got {top}")
    if top and not on:
        raise _bad("top_logprobs", "needs logprobs: true")
    return {"logprobs": True, "top_logprobs": top or 0} if on else {}


def completion_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """The guest's logprobs params of a completions request: ``logprobs`` is the number of
    most likely tokens to list at each step (0..20; 0: the chosen token's only)."""
    top = _integer(body, "logprobs", 0)
    if top is None:
        return {}
    if top > MAX_TOP_LOGPROBS:
        raise _bad("logprobs", f"at most {MAX_TOP_LOGPROBS}, got {top}")
    return {"logprobs": True, "top_logprobs": top}


def choices_count(body: dict[str, Any]) -> int:
    """``n``: how many choices (independent samples) to generate, 1..``MAX_CHOICES``."""
    n = _integer(body, "n", 1)
    if n is None:
        return 1
    if n > MAX_CHOICES:
        raise _bad("n", f"at most {MAX_CHOICES} choices per request, got {n}")
    return n


def choice_params(params: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The guest params of each of ``n`` choices: independent samples (a ``seed`` becomes
    ``seed + i`` for choice ``i``, so seeded choices differ and repeat; a chat gets a
    conversation of its own per choice)."""
    out = []
    for i in range(n):
        p = dict(params)
        if i and "seed" in p:
            p["seed"] = p["seed"] + i
        if i and "conversation" in p:
            p["conversation"] = f"http-{uuid.uuid4().hex}"
        out.append(p)
    return out


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _bad(where, "only text content parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(where, "a text part needs a string 'text'")
            parts.append(text)
        return "".join(parts)
    raise _bad(where, "must be a string or a list of text parts")


def chat_params(body: dict[str, Any]) -> dict[str, Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty array of {role, content}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "must be an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(f"{where}.role", "must be a non-empty string")
        out.append({"role": role, "content": _text_content(m.get("content"), f"{where}.content")})
    # a conversation of its own: the request carries the whole history (OpenAI is stateless);
    # the guest keeps a bounded number of conversations and drops the least recently used
    return {
        "messages": out,
        "conversation": f"http-{uuid.uuid4().hex}",
        **sampling_params(body),
        **chat_logprobs(body),
    }


def completion_params(body: dict[str, Any]) -> dict[str, Any]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", "must be a string (or a list of one string; token ids are not "
                   "supported)")  # fmt: skip
    for name in ("echo",):
        if body.get(name) not in (None, False):
            raise OpenAIError(400, f"{name}: not supported", param=name, code="unsupported_value")
    if body.get("suffix") not in (None, ""):
        raise OpenAIError(400, "suffix: not supported", param="suffix", code="unsupported_value")
    if body.get("best_of") not in (None, 1):
        raise OpenAIError(400, "best_of: only 1 is supported", param="best_of",
                          code="unsupported_value")  # fmt: skip
    return {"prompt": prompt, **sampling_params(body), **completion_logprobs(body)}


def embedding_inputs(body: dict[str, Any]) -> list[str]:
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(s, str) for s in inputs):
        raise _bad("input", "must be a string or a non-empty list of strings (token ids are "
                   "not supported)")  # fmt: skip
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise _bad("input", f"at most {MAX_EMBEDDING_INPUTS} inputs, got {len(inputs)}")
    fmt = body.get("encoding_format")
    if fmt not in (None, "float", "base64"):
        raise _bad("encoding_format", "must be 'float' or 'base64'")
    if body.get("dimensions") is not None:
        raise OpenAIError(400, "dimensions: not supported", param="dimensions",
                          code="unsupported_value")  # fmt: skip
    return inputs
