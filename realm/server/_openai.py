"""The OpenAI-compatible HTTP API on the WebSocket port (docs/http.md).

``POST /v1/chat/completions`` runs the tenant's guest function ``chat``, ``POST /v1/completions``
its ``generate`` and ``POST /v1/embeddings`` its ``embed``, through ``Server.dispatch``: the
same API keys, tenants, rate buckets, max_tokens cap, queue and batching as a WebSocket call.
``stream: true`` answers with Server-Sent Events (``data: {chunk}`` lines, then
``data: [DONE]``). Errors have OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with the HTTP status a client library expects. A client that closes its connection
cancels its call (the guest stops within one forward step); a server shutdown lets calls finish
within its grace period, then ends each stream with an error event and ``[DONE]``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import struct
import time
import uuid
from typing import TYPE_CHECKING, Any, Final

import trio

from .._errors import ProtocolError, RealmError
from .._protocol import Call, ErrorCode
from ._access import credentials
from ._config import OPEN_TENANT
from ._connection import finite
from ._http import BadRequest, HttpRequest, HttpResponse, HttpStream, read_body

if TYPE_CHECKING:
    from ._server import Server
    from ._transport import UncutStream

log = logging.getLogger("realm.server")

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
ROUTES: Final = {
    "/v1/chat/completions": ("POST", "chat"),
    "/v1/completions": ("POST", "generate"),
    "/v1/embeddings": ("POST", "embed"),
    "/v1/models": ("GET", None),
}
MAX_EMBEDDING_INPUTS: Final = 64


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
    headers: tuple[tuple[str, str], ...] = ()
    if retry_after is not None:
        headers = (("Retry-After", str(max(1, math.ceil(retry_after)))),)
    return OpenAIError(STATUS[code], message, code=code.lower(), headers=headers)


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
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _bad("n", "only n=1 is supported (one choice per request)")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise OpenAIError(
            400, "logprobs: not supported by this server's guests",
            param="logprobs", code="unsupported_value",
        )  # fmt: skip
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "must be a string")
    return params


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
    return {"prompt": prompt, **sampling_params(body)}


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


# --- one request -------------------------------------------------------------------------------


class HttpCalls:
    """The server's HTTP calls in flight, so a shutdown can cancel them."""

    def __init__(self) -> None:
        self.scopes: dict[trio.CancelScope, str] = {}

    def cancel(self, reason: str) -> None:
        for scope in list(self.scopes):
            self.scopes[scope] = reason
            scope.cancel()


class Exchange:
    """One OpenAI API request on its connection (``handle`` answers it)."""

    def __init__(self, server: Server, request: HttpRequest, wire: UncutStream) -> None:
        self.server = server
        self.request = request
        self.wire = wire
        self.tenant = OPEN_TENANT
        self.created = int(time.time())

    def authenticate(self) -> None:
        server, peer = self.server, self.request.peer
        if server.config.open:
            return
        wait = server.throttle.blocked_for(peer)
        if wait > 0:
            seconds = math.ceil(wait)
            server.metrics.refused.labels("throttled").inc()
            raise OpenAIError(
                429, f"too many failed logins from this address; retry in {seconds} s",
                code="too_many_failed_logins", headers=(("Retry-After", str(seconds)),),
            )  # fmt: skip
        creds = credentials(self.request)
        tenant = server.config.tenant_for_key(creds.key)
        if tenant is None:
            server._login_failed(peer, creds.via)
            raise OpenAIError(
                401,
                "missing API key: send 'Authorization: Bearer KEY'"
                if creds.key is None
                else "unknown API key",
                code="invalid_api_key",
            )
        server.throttle.succeeded(peer)
        self.tenant = tenant

    async def body(self) -> dict[str, Any]:
        ctype = (self.request.header("content-type") or "application/json").lower()
        if "json" not in ctype:
            raise OpenAIError(
                415, f"Content-Type {ctype[:60]!r}: send application/json",
                code="unsupported_media_type",
            )  # fmt: skip
        limits = self.server.limits
        try:
            raw = await read_body(
                self.wire, self.request, max_bytes=limits.max_message_bytes,
                timeout=limits.handshake_timeout_seconds,
            )  # fmt: skip
        except BadRequest as e:
            raise OpenAIError(e.status, f"the request body: {e.reason}", code="bad_body") from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise OpenAIError(400, f"the body is not JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def model(self, body: dict[str, Any]) -> str:
        names = self.server.runtime.registry.names()
        model = body.get("model")
        if model is None:
            return names[0]
        if not isinstance(model, str):
            raise _bad("model", "must be a string")
        if model not in names:
            raise OpenAIError(
                404, f"The model {model[:100]!r} does not exist (this server has: "
                f"{', '.join(names)}; GET /v1/models)", param="model", code="model_not_found",
            )  # fmt: skip
        return model

    async def handle(self) -> HttpResponse | None:
        try:
            return await self._handle()
        except OpenAIError as e:
            return e.response()

    async def _handle(self) -> HttpResponse | None:
        path = self.request.path.rstrip("/")
        if path == "/v1/jobs" or path.startswith("/v1/jobs/"):
            self.authenticate()
            return await self.jobs(path)
        route = ROUTES.get(path)
        if route is None:
            raise OpenAIError(404, f"no such endpoint: {path[:100]}", code="unknown_url")
        method, function = route
        if self.request.method != method:
            raise OpenAIError(
                405, f"{path}: {method} only", code="method_not_allowed",
                headers=(("Allow", method),),
            )  # fmt: skip
        self.authenticate()
        if function is None:  # /v1/models
            return json_response(200, {
                "object": "list",
                "data": [
                    {"id": n, "object": "model", "created": int(self.server.started_wall),
                     "owned_by": "realm"}
                    for n in self.server.runtime.registry.names()
                ],
            })  # fmt: skip
        body = await self.body()
        model = self.model(body)
        if await self.server.function_label(self.tenant, function) != function:
            raise OpenAIError(
                404, f"{path}: this tenant's guest has no {function!r} function",
                code="unsupported_endpoint",
            )  # fmt: skip
        if function == "embed":
            return await self.embeddings(body, model)
        params = chat_params(body) if function == "chat" else completion_params(body)
        params["model"] = model
        stream = _boolean(body, "stream")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise _bad("stream_options", "must be an object")
        usage = _boolean(opts or {}, "include_usage")
        if stream:
            await self.stream(function, params, model, usage)
            return None
        result = await self.call(function, params, lambda _: None)
        return json_response(200, self.complete(function, model, result))

    # --- calls ---------------------------------------------------------------------------

    async def call(self, function: str, params: dict[str, Any], on_token: Any) -> dict[str, Any]:
        """Run one guest call as the tenant; cancelled if the client hangs up. Raises
        ``OpenAIError``."""
        server, tenant = self.server, self.tenant
        metrics = server.metrics
        tokens, bucket = metrics.tokens.labels(tenant), server.tenant_limits(tenant).tokens
        outcome = "cancelled"
        t0 = time.perf_counter()

        def on_event(ev: Any) -> None:
            tokens.inc()
            if bucket is not None:
                bucket.spend(1)
            on_token(ev.data)

        scope = trio.CancelScope()
        server.http_calls.scopes[scope] = ""
        server.calls_in_flight.add()
        error: OpenAIError | None = None
        result: dict[str, Any] | None = None
        try:
            # (raised past the nursery, not in it: trio would wrap it in an ExceptionGroup)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_client, nursery.cancel_scope)
                try:
                    with scope, trio.move_on_after(server.limits.call_timeout_seconds) as timer:
                        call = Call(f"http-{uuid.uuid4().hex[:12]}", function, params)
                        result = finite(await server.dispatch(tenant, call, on_event))
                        outcome = "ok"
                    if timer.cancelled_caught:
                        outcome = "timeout"
                        error = OpenAIError(
                            504, f"the call took over {server.limits.call_timeout_seconds:g} s",
                            code="timeout",
                        )  # fmt: skip
                    elif scope.cancelled_caught:
                        error = from_realm(ErrorCode.CANCELLED, server.http_calls.scopes[scope])
                except ProtocolError as e:
                    outcome = e.code.lower()
                    error = from_realm(e.code, server.public_message(e.message), e.retry_after)
                except RealmError as e:
                    outcome = str(e.code).lower()
                    error = from_realm(e.code, server.public_message(str(e)))
                except Exception:
                    log.exception("HTTP call %s of tenant %r failed", function, tenant)
                    outcome = "internal"
                    error = OpenAIError(500, "internal error (logged on the server)",
                                        code="internal")  # fmt: skip
                finally:
                    nursery.cancel_scope.cancel()
            if error is not None:
                raise error
            if result is None:  # the watcher cancelled the nursery: nobody is left to answer
                raise OpenAIError(499, "the client closed its connection", code="cancelled")
            return result
        finally:
            server.http_calls.scopes.pop(scope, None)
            server.calls_in_flight.remove()
            label = function if outcome != "unknown_function" else "<unknown>"
            metrics.calls.labels(tenant, label, outcome).inc()
            metrics.call_seconds.labels(tenant, label).observe(time.perf_counter() - t0)

    async def _watch_client(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the client closes its connection (reads and drops anything it
        sends after its request)."""
        try:
            while await self.wire.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        log.info("HTTP client %s went away: its call is cancelled", self.request.peer)
        scope.cancel()

    # --- answers ---------------------------------------------------------------------------

    def _ids(self, function: str) -> tuple[str, str]:
        if function == "chat":
            return f"chatcmpl-{uuid.uuid4().hex}", "chat.completion"
        return f"cmpl-{uuid.uuid4().hex}", "text_completion"

    @staticmethod
    def _usage(result: dict[str, Any]) -> dict[str, int]:
        u = result.get("usage") or {}
        p, c = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @staticmethod
    def _finish(result: dict[str, Any]) -> str:
        fr = result.get("finish_reason")
        return fr if fr in ("stop", "length") else "stop"

    def complete(self, function: str, model: str, result: dict[str, Any]) -> dict[str, Any]:
        cid, obj = self._ids(function)
        text = result.get("text") or ""
        if function == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": self._finish(result),
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": self._finish(result)}  # fmt: skip
        return {
            "id": cid, "object": obj, "created": self.created, "model": model,
            "system_fingerprint": None, "choices": [choice], "usage": self._usage(result),
        }  # fmt: skip

    async def stream(
        self, function: str, params: dict[str, Any], model: str, include_usage: bool
    ) -> None:
        """Answer with SSE. The head is sent with the first token: an error before it is an
        ordinary error response; one after it is an ``error`` event, then ``[DONE]``."""
        cid, obj = self._ids(function)
        obj += ".chunk" if function == "chat" else ""
        send, recv = trio.open_memory_channel[tuple[str, Any]](math.inf)

        async def run() -> None:
            async with send:
                try:
                    result = await self.call(
                        function, params, lambda d: send.send_nowait(("token", d))
                    )
                except OpenAIError as e:
                    send.send_nowait(("error", e))
                else:
                    send.send_nowait(("done", result))

        def chunk(delta: Any, finish: str | None) -> dict[str, Any]:
            if function == "chat":
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
            out = {"id": cid, "object": obj, "created": self.created, "model": model,
                   "system_fingerprint": None, "choices": [choice]}  # fmt: skip
            if include_usage:
                out["usage"] = None
            return out

        out = HttpStream(self.wire, self.request, timeout=self.server.limits.send_timeout_seconds)
        # counted with the open connections: a shutdown waits for the stream's last event
        self.server.open_connections.add()
        try:
            await self._stream(run, recv, out, function, chunk, include_usage, cid, obj, model)
        finally:
            self.server.open_connections.remove()

    async def _stream(
        self, run: Any, recv: Any, out: HttpStream, function: str, chunk: Any,
        include_usage: bool, cid: str, obj: str, model: str,
    ) -> None:  # fmt: skip
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            # a write that fails: the client went away (its call is cancelled with it)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._write_events(recv, out, function, chunk, include_usage, cid, obj, model)
            nursery.cancel_scope.cancel()

    async def _write_events(
        self, recv: Any, out: HttpStream, function: str, chunk: Any, include_usage: bool,
        cid: str, obj: str, model: str,
    ) -> None:  # fmt: skip
        started = False

        async def event(data: Any) -> None:
            await out.send(f"data: {json.dumps(data)}\n\n".encode())

        async for kind, data in recv:
            if kind == "error" and not started:
                resp = data.response()
                await out.start(resp.status, resp.content_type, resp.headers)
                await out.send(resp.body)
                await out.end()
                return
            if not started:
                started = True
                await out.start(200, "text/event-stream; charset=utf-8")
                if function == "chat":
                    await event(chunk({"role": "assistant", "content": ""}, None))
            if kind == "token":
                text = data.get("token", "") if isinstance(data, dict) else ""
                await event(chunk({"content": text} if function == "chat" else text, None))
            elif kind == "error":
                await event(data.body())
            else:
                await event(chunk({} if function == "chat" else "", self._finish(data)))
                if include_usage:
                    await event({"id": cid, "object": obj, "created": self.created,
                                 "model": model, "system_fingerprint": None,
                                 "choices": [], "usage": self._usage(data)})  # fmt: skip
        await out.send(b"data: [DONE]\n\n")
        await out.end()

    async def jobs(self, path: str) -> HttpResponse | None:
        """The jobs API (``_jobs``)."""
        jobs, method = self.server.jobs, self.request.method
        if path == "/v1/jobs":
            if method != "POST":
                raise OpenAIError(405, "/v1/jobs: POST only", code="method_not_allowed",
                                  headers=(("Allow", "POST"),))  # fmt: skip
            body = await self.body()
            function, params = body.get("function"), body.get("params", {})
            if not isinstance(function, str) or not function:
                raise _bad("function", "must be the name of one of the guest's functions")
            if function.startswith("system_"):
                raise _bad("function", "system functions are not run as jobs")
            if not isinstance(params, dict):
                raise _bad("params", "must be an object")
            if await self.server.function_label(self.tenant, function) != function:
                raise OpenAIError(404, f"no function {function[:100]!r}", param="function",
                                  code="unknown_function")  # fmt: skip
            try:
                job = jobs.submit(self.tenant, function, params)
            except ProtocolError as e:
                raise from_realm(e.code, e.message, e.retry_after) from None
            return json_response(202, job.as_dict())
        rest = path[len("/v1/jobs/") :]
        job_id, _, tail = rest.partition("/")
        job = jobs.get(self.tenant, job_id)
        if job is None or tail not in ("", "events"):
            raise OpenAIError(404, f"no job {job_id[:100]!r}", code="job_not_found")
        if tail == "events":
            if method != "GET":
                raise OpenAIError(405, "GET only", code="method_not_allowed",
                                  headers=(("Allow", "GET"),))  # fmt: skip
            await self.job_events(job)
            return None
        if method == "GET":
            return json_response(200, job.as_dict())
        if method == "DELETE":
            jobs.cancel(job)
            return json_response(200, job.as_dict())
        raise OpenAIError(405, "GET or DELETE only", code="method_not_allowed",
                          headers=(("Allow", "GET, DELETE"),))  # fmt: skip

    async def job_events(self, job: Any) -> None:
        """A job's tokens as SSE, from after ``Last-Event-ID``; then its end and [DONE]."""
        last = (self.request.header("last-event-id") or "").strip()
        start = int(last) + 1 if last.isdigit() else 0
        out = HttpStream(self.wire, self.request, timeout=self.server.limits.send_timeout_seconds)
        self.server.open_connections.add()
        try:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await out.start(200, "text/event-stream; charset=utf-8")
                i = start
                while True:
                    while i < len(job.events):
                        data = json.dumps(job.events[i])
                        await out.send(f"id: {i}\ndata: {data}\n\n".encode())
                        i += 1
                    if job.finished is not None and i >= len(job.events):
                        break
                    changed = job.changed
                    if i >= len(job.events) and job.finished is None:
                        await changed.wait()
                kind = "result" if job.status == "succeeded" else "error"
                final = job.as_dict()
                await out.send(f"event: {kind}\ndata: {json.dumps(final)}\n\n".encode())
                await out.send(b"data: [DONE]\n\n")
                await out.end()
        finally:
            self.server.open_connections.remove()

    async def embeddings(self, body: dict[str, Any], model: str) -> HttpResponse:
        inputs = embedding_inputs(body)
        base64_out = body.get("encoding_format") == "base64"
        data = []
        prompt_tokens = 0
        for i, text in enumerate(inputs):
            result = await self.call("embed", {"text": text, "model": model}, lambda _: None)
            vector = result.get("embedding") or []
            u = result.get("usage") or {}
            prompt_tokens += int(u.get("prompt_tokens") or 0)
            emb: Any = vector
            if base64_out:
                emb = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return json_response(200, {
            "object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        })  # fmt: skip


async def handle(server: Server, request: HttpRequest, wire: UncutStream) -> HttpResponse | None:
    """Answer one request under ``/v1/`` (None: it was streamed)."""
    return await Exchange(server, request, wire).handle()
