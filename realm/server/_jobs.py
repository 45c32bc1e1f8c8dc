"""Jobs: a guest call submitted over HTTP and polled or streamed later (docs/http.md, "Jobs").

``POST /v1/jobs`` starts a call of the tenant's guest (``{"function", "params"}``) in the
server's nursery and answers its id at once; ``GET /v1/jobs/{id}`` its status and, once done,
its result or error; ``GET /v1/jobs/{id}/events`` its tokens as SSE (each with ``id: N``, so a
client resumes with ``Last-Event-ID``), then a final ``result`` or ``error`` event and
``data: [DONE]``; ``DELETE /v1/jobs/{id}`` cancels it. Bounded per tenant: at most
``MAX_JOBS`` kept (the oldest finished one is dropped for a new one; all running: 429), each
finished job kept ``KEEP_SECONDS``. A tenant never sees another's jobs (404).
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from .._errors import ProtocolError, RealmError
from .._protocol import Call, ErrorCode

if TYPE_CHECKING:
    from ._server import Server

MAX_JOBS: Final = 64  # per tenant, running and finished
KEEP_SECONDS: Final = 600.0  # a finished job's result is kept this long
RUNNING: Final = ("queued", "running")


@attrs.define(eq=False)
class Job:
    id: str
    tenant: str
    function: str
    params: dict[str, Any]
    created: float = attrs.field(factory=time.time)
    status: str = "queued"  # queued, running, succeeded, failed, cancelled
    events: list[Any] = attrs.field(factory=list)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    finished: float | None = None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    changed: trio.Event = attrs.field(factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "object": "job", "function": self.function, "status": self.status,
            "created": int(self.created), "events": len(self.events),
        }  # fmt: skip
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out


class Jobs:
    """The server's jobs (see the module docs); ``nursery`` is set by ``Server.run``."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.nursery: trio.Nursery | None = None
        self._jobs: dict[str, dict[str, Job]] = {}  # tenant -> id -> job, oldest first

    def _prune(self, tenant: str) -> dict[str, Job]:
        jobs = self._jobs.setdefault(tenant, {})
        now = time.time()
        for jid, job in list(jobs.items()):
            if job.finished is not None and now - job.finished > KEEP_SECONDS:
                del jobs[jid]
        return jobs

    def get(self, tenant: str, job_id: str) -> Job | None:
        return self._prune(tenant).get(job_id)

    def submit(self, tenant: str, function: str, params: dict[str, Any]) -> Job:
        """Start a job; raises ProtocolError OVERLOADED/RATE_LIMITED (the caller maps it)."""
        jobs = self._prune(tenant)
        if len(jobs) >= MAX_JOBS:
            done = [j for j in jobs.values() if j.finished is not None]
            if not done:
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED, f"{MAX_JOBS} jobs of this tenant are running",
                    retry_after=1.0,
                )  # fmt: skip
            del jobs[done[0].id]
        assert self.nursery is not None
        job = Job(f"job-{uuid.uuid4().hex}", tenant, function, params)
        jobs[job.id] = job
        self.nursery.start_soon(self._run, job)
        return job

    def cancel(self, job: Job) -> None:
        job.scope.cancel()

    async def _run(self, job: Job) -> None:
        from ._openai import from_realm

        server = self.server
        bucket = server.tenant_limits(job.tenant).tokens

        def on_event(ev: Any) -> None:
            if bucket is not None:
                bucket.spend(1)
            job.events.append(ev.data)
            job.notify()

        server.http_calls.scopes[job.scope] = "cancelled by the client"
        server.calls_in_flight.add()
        job.status = "running"
        job.notify()
        error = None
        try:
            with job.scope, trio.move_on_after(server.limits.call_timeout_seconds) as timer:
                call = Call(job.id, job.function, job.params)
                job.result = await server.dispatch(job.tenant, call, on_event)
            if timer.cancelled_caught:
                error = from_realm(ErrorCode.TIMEOUT, "the call timed out")
            elif job.scope.cancelled_caught:
                error = from_realm(ErrorCode.CANCELLED, server.http_calls.scopes[job.scope])
        except ProtocolError as e:
            error = from_realm(e.code, server.public_message(e.message), e.retry_after)
        except RealmError as e:
            error = from_realm(e.code, server.public_message(str(e)))
        finally:
            server.http_calls.scopes.pop(job.scope, None)
            server.calls_in_flight.remove()
            if error is not None:
                job.result = None
                job.error = error.body()["error"]
                job.status = "cancelled" if error.code == "cancelled" else "failed"
            elif job.result is not None:
                job.status = "succeeded"
            else:
                job.status = "cancelled"
            job.finished = time.time()
            job.notify()
