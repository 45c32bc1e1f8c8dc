"""The OpenAI-compatible HTTP API on the WebSocket port (docs/http.md).

``POST /v1/chat/completions`` runs the tenant's guest function ``chat``, ``POST /v1/completions``
its ``generate`` and ``POST /v1/embeddings`` its ``embed``, through ``Server.dispatch``: the
same API keys, tenants, rate buckets, max_tokens cap, queue and batching as a WebSocket call.
``stream: true`` answers with Server-Sent Events (``data: {chunk}`` lines, then
``data: [DONE]``). ``n`` choices are ``n`` calls of the tenant run at once (each under its
limits); ``logprobs`` are the guest's opt-in ``logprobs`` params, named by the model's
vocabulary. A tenant whose guest cannot run now gets 503 with ``Retry-After``. Errors have
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the HTTP status a
client library expects. A client that closes its connection
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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import trio

from .._errors import ProtocolError, RealmError
from .._protocol import Call, ErrorCode
from ._access import credentials
from ._config import OPEN_TENANT
from ._connection import finite
from ._http import BadRequest, HttpRequest, HttpResponse, HttpStream, read_body
from ._openai_fields import MAX_CHOICES as MAX_CHOICES
from ._openai_fields import STATUS as STATUS
from ._openai_fields import OpenAIError as OpenAIError
from ._openai_fields import (
    _bad,
    _boolean,
    chat_params,
    choice_params,
    choices_count,
    completion_params,
    embedding_inputs,
    from_realm,
    json_response,
    unavailable,
)

if TYPE_CHECKING:
    from ._server import Server
    from ._transport import UncutStream

log = logging.getLogger("realm.server")

ROUTES: Final = {
    "/v1/chat/completions": ("POST", "chat"),
    "/v1/completions": ("POST", "generate"),
    "/v1/embeddings": ("POST", "embed"),
    "/v1/models": ("GET", None),
}


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
        if not names:
            raise unavailable("no model is loaded yet")
        model = body.get("model")
        if model is None:
            return names[0]
        if not isinstance(model, str):
            raise _bad("model", "must be a string")
        # a tenant's LoRA adapters are models to its clients (the host resolves the name)
        if model not in names and model not in self.server.runtime.adapters(self.tenant):
            raise OpenAIError(
                404, f"The model {model[:100]!r} does not exist (this server has: "
                f"{', '.join(names)}; GET /v1/models)", param="model", code="model_not_found",
            )  # fmt: skip
        return model

    async def has_function(self, function: str) -> bool:
        """Whether the tenant's guest exports ``function``. Raises ``OpenAIError`` 503 (with
        ``Retry-After``) when the guest cannot run now (it failed to load, or is failed past
        its restart intensity): that is not the client's mistake, and may pass."""
        if await self.server.function_label(self.tenant, function) == function:
            return True
        try:  # not among its functions, or its functions cannot be read: which?
            await self.server.runtime.functions(self.tenant)
        except RealmError as e:
            raise unavailable(
                f"tenant {self.tenant!r} cannot run now: {self.server.public_message(str(e))}"
            ) from None
        return False

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
                    for n in [*self.server.runtime.registry.names(),
                              *self.server.runtime.adapters(self.tenant)]  # LoRA adapters too
                ],
            })  # fmt: skip
        body = await self.body()
        model = self.model(body)
        if not await self.has_function(function):
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
        each = choice_params(params, choices_count(body))
        if stream:
            await self.stream(function, each, model, usage)
            return None
        results = await self.calls(function, each, lambda i, d: None)
        return json_response(200, self.complete(function, model, results))

    # --- calls ---------------------------------------------------------------------------

    async def call(self, function: str, params: dict[str, Any], on_token: Any) -> dict[str, Any]:
        """Run one guest call as the tenant (``calls`` with one)."""
        return (await self.calls(function, [params], lambda _, data: on_token(data)))[0]

    async def calls(
        self,
        function: str,
        params: Sequence[dict[str, Any]],
        on_token: Callable[[int, Any], None],
    ) -> list[dict[str, Any]]:
        """Run ``len(params)`` guest calls of the tenant at once (each one call of the tenant,
        under its limits), all cancelled if the client hangs up or one of them fails.
        ``on_token(i, data)`` gets call ``i``'s token events. Raises ``OpenAIError``."""
        results: list[dict[str, Any] | None] = [None] * len(params)
        errors: list[OpenAIError] = []
        # (raised past the nurseries, not in them: trio would wrap it in an ExceptionGroup)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_client, nursery.cancel_scope)
            async with trio.open_nursery() as group:
                for i, p in enumerate(params):
                    group.start_soon(self._one, i, function, p, on_token, results, errors, group)
            nursery.cancel_scope.cancel()
        if errors:
            raise errors[0]
        done = [r for r in results if r is not None]
        if len(done) < len(results):  # the watcher cancelled them: nobody is left to answer
            raise OpenAIError(499, "the client closed its connection", code="cancelled")
        return done

    async def _one(
        self,
        i: int,
        function: str,
        params: dict[str, Any],
        on_token: Callable[[int, Any], None],
        results: list[dict[str, Any] | None],
        errors: list[OpenAIError],
        group: trio.Nursery,
    ) -> None:
        """Call ``i`` of ``calls``: its result in ``results[i]``, or its error appended to
        ``errors`` and its siblings cancelled."""
        server, tenant = self.server, self.tenant
        metrics = server.metrics
        tokens, bucket = metrics.tokens.labels(tenant), server.tenant_limits(tenant).tokens
        outcome = "cancelled"
        t0 = time.perf_counter()

        def on_event(ev: Any) -> None:
            tokens.inc()
            if bucket is not None:
                bucket.spend(1)
            on_token(i, ev.data)

        scope = trio.CancelScope()
        server.http_calls.scopes[scope] = ""
        server.calls_in_flight.add()
        error: OpenAIError | None = None
        try:
            try:
                with scope, trio.move_on_after(server.limits.call_timeout_seconds) as timer:
                    call = Call(f"http-{uuid.uuid4().hex[:12]}", function, params)
                    results[i] = finite(await server.dispatch(tenant, call, on_event))
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
            if error is not None:
                errors.append(error)
                group.cancel_scope.cancel()
        finally:
            server.http_calls.scopes.pop(scope, None)
            server.calls_in_flight.remove()
            label = function if outcome != "unknown_function" else "<unknown>"
            metrics.calls.labels(tenant, label, outcome).inc()
            metrics.call_seconds.labels(tenant, label).observe(time.perf_counter() - t0)

    async def _watch_client(self, scope: trio.CancelScope, what: str = "its call is") -> None:
        """Cancel ``scope`` when the client closes its connection (reads and drops anything it
        sends after its request)."""
        try:
            while await self.wire.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        log.info("HTTP client %s went away: %s cancelled", self.request.peer, what)
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

    def complete(self, function: str, model: str, results: list[dict[str, Any]]) -> dict[str, Any]:
        cid, obj = self._ids(function)
        choices: list[dict[str, Any]] = []
        for i, result in enumerate(results):
            text = result.get("text") or ""
            logprobs = self._logprobs(function, model, result)
            if function == "chat":
                choices.append({
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs,
                    "finish_reason": self._finish(result),
                })  # fmt: skip
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs,
                                "finish_reason": self._finish(result)})  # fmt: skip
        return {
            "id": cid, "object": obj, "created": self.created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": self._usages(results),
        }  # fmt: skip

    def _piece(self, model: str) -> Callable[[int], bytes]:
        """A token id's bytes under ``model`` (a LoRA adapter's: its base model's)."""
        runtime = self.server.runtime
        name: Any = model
        if model not in runtime.registry:
            name = (runtime.adapters(self.tenant).get(model) or {}).get("model")
        if name not in runtime.registry:
            return lambda _: b""
        tokenizer = runtime.registry.get(name).tokenizer

        def piece(token: int) -> bytes:
            try:
                return tokenizer.token_to_piece(token)
            except (RealmError, ValueError, TypeError):
                return b""

        return piece

    def _logprobs(self, function: str, model: str, result: dict[str, Any]) -> Any:
        """The guest's ``logprobs`` (``[{id, logprob, top: [[id, logprob]...]}...]``, asked
        for with its ``logprobs`` param) in OpenAI's shape for ``function``; None if absent."""
        raw = result.get("logprobs")
        if not isinstance(raw, list):
            return None
        piece = self._piece(model)
        entries = []
        for e in raw:
            if not isinstance(e, dict) or not isinstance(e.get("id"), int):
                continue
            top = [t for t in e.get("top") or [] if isinstance(t, list) and len(t) == 2]
            entries.append((e["id"], e.get("logprob"), top))
        if function == "chat":
            content = []
            for token, lp, top in entries:
                b = piece(token)
                content.append({
                    "token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b),
                    "top_logprobs": [
                        {"token": (tb := piece(t)).decode("utf-8", "replace"), "logprob": tl,
                         "bytes": list(tb)}
                        for t, tl in top
                    ],
                })  # fmt: skip
            return {"content": content, "refusal": None}
        tokens, offsets, offset = [], [], 0
        for token, _, _ in entries:
            text = piece(token).decode("utf-8", "replace")
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [
                {piece(t).decode("utf-8", "replace"): tl for t, tl in top} for _, _, top in entries
            ],
            "text_offset": offsets,
        }

    @classmethod
    def _usages(cls, results: Sequence[dict[str, Any]]) -> dict[str, int]:
        """The usage of a request's choices: the prompt counted once (as OpenAI does), the
        completion tokens of every choice."""
        each = [cls._usage(r) for r in results]
        p = max((u["prompt_tokens"] for u in each), default=0)
        c = sum(u["completion_tokens"] for u in each)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def stream(
        self, function: str, params: list[dict[str, Any]], model: str, include_usage: bool
    ) -> None:
        """Answer with SSE. The head is sent with the first token: an error before it is an
        ordinary error response; one after it is an ``error`` event, then ``[DONE]``."""
        cid, obj = self._ids(function)
        obj += ".chunk" if function == "chat" else ""
        send, recv = trio.open_memory_channel[tuple[str, int, Any]](math.inf)

        async def run() -> None:
            async with send:
                try:
                    results = await self.calls(
                        function, params, lambda i, d: send.send_nowait(("token", i, d))
                    )
                except OpenAIError as e:
                    send.send_nowait(("error", 0, e))
                else:
                    send.send_nowait(("done", 0, results))

        def chunk(i: int, delta: Any, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
            if function == "chat":
                choice = {"index": i, "delta": delta, "logprobs": logprobs,
                          "finish_reason": finish}  # fmt: skip
            else:
                choice = {"index": i, "text": delta, "logprobs": logprobs,
                          "finish_reason": finish}  # fmt: skip
            out = {"id": cid, "object": obj, "created": self.created, "model": model,
                   "system_fingerprint": None, "choices": [choice]}  # fmt: skip
            if include_usage:
                out["usage"] = None
            return out

        def usage_chunk(results: list[dict[str, Any]]) -> dict[str, Any]:
            return {"id": cid, "object": obj, "created": self.created, "model": model,
                    "system_fingerprint": None, "choices": [],
                    "usage": self._usages(results)}  # fmt: skip

        out = HttpStream(self.wire, self.request, timeout=self.server.limits.send_timeout_seconds)
        # counted with the open connections: a shutdown waits for the stream's last event
        self.server.open_connections.add()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                # a write that fails: the client went away (its calls are cancelled with it)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._write_events(
                        recv, out, function, model, len(params), chunk,
                        usage_chunk if include_usage else None,
                    )  # fmt: skip
                nursery.cancel_scope.cancel()
        finally:
            self.server.open_connections.remove()

    async def _write_events(
        self, recv: Any, out: HttpStream, function: str, model: str, n: int, chunk: Any,
        usage_chunk: Any,
    ) -> None:  # fmt: skip
        started = False

        async def event(data: Any) -> None:
            await out.send(f"data: {json.dumps(data)}\n\n".encode())

        async for kind, i, data in recv:
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
                    for j in range(n):
                        await event(chunk(j, {"role": "assistant", "content": ""}, None))
            if kind == "token":
                text = data.get("token", "") if isinstance(data, dict) else ""
                await event(chunk(i, {"content": text} if function == "chat" else text, None))
            elif kind == "error":
                await event(data.body())
            else:  # done: each choice's finish (and its logprobs), then the usage of all
                for j, result in enumerate(data):
                    logprobs = self._logprobs(function, model, result)
                    delta = {} if function == "chat" else ""
                    await event(chunk(j, delta, self._finish(result), logprobs))
                if usage_chunk is not None:
                    await event(usage_chunk(data))
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
            if not await self.has_function(function):
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
        """A job's tokens as SSE, from after ``Last-Event-ID``; then its end and [DONE]. A
        client that leaves is noticed at once (its connection is read meanwhile), not at the
        job's next event; the job itself runs on."""
        last = (self.request.header("last-event-id") or "").strip()
        start = int(last) + 1 if last.isdigit() else 0
        out = HttpStream(self.wire, self.request, timeout=self.server.limits.send_timeout_seconds)
        self.server.open_connections.add()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_client, nursery.cancel_scope, "its job stream is")
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._write_job_events(job, start, out)
                nursery.cancel_scope.cancel()
        finally:
            self.server.open_connections.remove()

    @staticmethod
    async def _write_job_events(job: Any, start: int, out: HttpStream) -> None:
        await out.start(200, "text/event-stream; charset=utf-8")
        i = start
        while True:
            while i < len(job.events):
                data = json.dumps(job.events[i])
                await out.send(f"id: {i}\ndata: {data}\n\n".encode())
                i += 1
            if job.finished is not None:
                break
            await job.changed.wait()
        kind = "result" if job.status == "succeeded" else "error"
        await out.send(f"event: {kind}\ndata: {json.dumps(job.as_dict())}\n\n".encode())
        await out.send(b"data: [DONE]\n\n")
        await out.end()

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
