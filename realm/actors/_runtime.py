"""The embedded runtime: ``async with realm.open_runtime(...) as rt``.

The runtime owns, in one nursery: the sandbox engine, the batch scheduler task, and the tenant
actors (started on first use). ``rt.call`` returns a call's result data; ``rt.stream`` is an
async context manager whose iterator yields token events and then the result. Cancelling the
caller (a Trio cancel scope, a deadline) cancels the call: the guest stops within one forward
step and its session is freed. Leaving the ``async with`` stops accepting calls, gives calls in
flight ``shutdown_seconds`` to finish, then cancels them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import attrs
import trio

from .._errors import (
    CallCancelled,
    InvalidParams,
    ModelError,
    Overloaded,
    RealmError,
    TenantUnavailable,
)
from .._util import single_error
from ..model import Model, ModelRegistry
from ..sandbox import GuestLimits, SandboxEngine, default_guest_path
from ._actor import Event, TenantActor, TenantConfig
from ._batcher import Batcher, BatcherStatistics

SHUTDOWN_SECONDS: Final = 5.0
MAX_QUEUED_CALLS: Final = 64  # per tenant, waiting for one of its call slots
STREAM_BUFFER: Final = 256  # token events buffered per streamed call


@attrs.frozen
class RuntimeLimits:
    max_concurrent_calls: int = 2  # per tenant
    max_queued_calls: int = MAX_QUEUED_CALLS  # per tenant
    guest: GuestLimits = attrs.field(factory=GuestLimits)
    threads: int | None = None  # worker threads for guests and steps (default: 2 x tenants, >= 8)
    gather_seconds: float = 0.002
    shutdown_seconds: float = SHUTDOWN_SECONDS
    idle_seconds: float | None = 300.0  # an actor idle this long stops (None: never)


@attrs.frozen
class RuntimeStatistics:
    batcher: BatcherStatistics
    tenants: dict[str, dict[str, Any]]


class CallEvents:
    """A streamed call's events (``async for``); ``id`` names the call for ``Runtime.cancel``."""

    def __init__(self, call_id: str, events: AsyncIterator[Event]) -> None:
        self.id = call_id
        self._events = events

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events


class Runtime:
    """Use ``open_runtime``."""

    def __init__(
        self,
        registry: ModelRegistry,
        engine: SandboxEngine,
        batcher: Batcher,
        nursery: trio.Nursery,
        tenants: Mapping[str, Mapping[str, Any]] | None,
        limits: RuntimeLimits,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.batcher = batcher
        self.limits = limits
        self._nursery = nursery
        self._open = tenants is None  # no tenants configured: any name gets the default guest
        self._specs: dict[str, Mapping[str, Any]] = dict(tenants or {})
        for name, spec in self._specs.items():  # fail at open, not at the tenant's first call
            _weight(name, spec.get("weight", 1.0))
        self._actors: dict[str, TenantActor] = {}
        self._limiter = trio.CapacityLimiter(limits.threads or max(8, 2 * (len(self._specs) + 2)))
        self._closing = False
        self._calls: dict[str, trio.CancelScope] = {}  # running calls by id, for cancel()
        self._ids = itertools.count(1)
        self._default_module = engine.compile(default_guest_path())

    # --- tenants -------------------------------------------------------------------------------

    def _config(self, name: str) -> TenantConfig:
        spec = self._specs.get(name)
        if spec is None and not self._open:
            raise TenantUnavailable(f"unknown tenant {name!r}")
        spec = spec or {}
        guest = spec.get("guest")
        module = self.engine.compile(guest) if guest else self._default_module
        models = {n: self.registry.get(n) for n in self.registry.names()}
        return TenantConfig(
            name=name,
            module=module,
            models=models,
            default_model=spec.get("model") or (self.registry.names() or [None])[0],
            guest_limits=spec.get("limits", self.limits.guest),
            max_concurrent_calls=int(
                spec.get("max_concurrent_calls", self.limits.max_concurrent_calls)
            ),
            max_queued_calls=int(spec.get("max_queued_calls", self.limits.max_queued_calls)),
            weight=_weight(name, spec.get("weight", 1.0)),
        )

    def _actor(self, name: str) -> TenantActor:
        if not isinstance(name, str) or not name or len(name) > 128:
            raise TenantUnavailable(f"bad tenant name {name!r}")
        actor = self._actors.get(name)
        if actor is None:
            actor = TenantActor(self._config(name), self.engine, self.batcher, self._limiter)
            self._actors[name] = actor
        return actor

    def add_tenant(self, name: str, **spec: Any) -> None:
        """Add (or replace) a tenant's spec: ``guest`` (wasm path or bytes), ``model``, limits."""
        _weight(name, spec.get("weight", 1.0))
        self._specs[name] = spec
        self.reload_tenant(name)

    def remove_tenant(self, name: str) -> None:
        """Forget a tenant: new calls are refused; calls in flight finish first."""
        self._specs.pop(name, None)
        actor = self._actors.pop(name, None)
        if actor is not None:
            self._nursery.start_soon(self._close_when_idle, actor)

    def reload_tenant(self, name: str) -> None:
        """A new guest module takes effect for new calls; calls in flight finish on the old."""
        old = self._actors.pop(name, None)
        if old is not None:
            self._nursery.start_soon(self._close_when_idle, old)

    async def reap_idle(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Stop actors idle for ``idle_seconds``, releasing their instances and sessions (a
        tenant's next call starts it again; chat conversations do not survive a stop)."""
        task_status.started()
        idle = self.limits.idle_seconds
        if idle is None:
            return
        while True:
            await trio.sleep(min(1.0, idle / 2))
            for name, actor in list(self._actors.items()):
                if actor.in_flight == 0 and time.monotonic() - actor.last_used >= idle:
                    del self._actors[name]
                    actor.close()

    async def _close_when_idle(self, actor: TenantActor) -> None:
        while actor.in_flight:
            await trio.sleep(0.05)
        actor.close()

    # --- calls -----------------------------------------------------------------------------------

    def _claim(self, call_id: str | None) -> tuple[str, trio.CancelScope]:
        """An id for a new call (the caller's, checked, or a fresh one) and its cancel scope."""
        if call_id is None:
            call_id = f"call-{next(self._ids)}"
        elif not isinstance(call_id, str) or not call_id:
            raise InvalidParams(f"call_id must be a non-empty string, not {call_id!r}")
        if call_id in self._calls:
            raise InvalidParams(f"call_id {call_id!r}: a call with this id is already running")
        scope = self._calls[call_id] = trio.CancelScope()
        return call_id, scope

    def _release(self, call_id: str, scope: trio.CancelScope) -> None:
        if self._calls.get(call_id) is scope:
            del self._calls[call_id]

    async def _run(
        self,
        tenant: str,
        function: str,
        params: Any,
        on_event: Any,
        call_id: str,
        scope: trio.CancelScope,
    ) -> dict[str, Any]:
        try:
            if self._closing:
                raise TenantUnavailable("the runtime is shutting down")
            actor = self._actor(tenant)
            with scope:
                return await actor.call(function, params, on_event)
            raise CallCancelled(f"call {call_id!r} of tenant {tenant!r} was cancelled")
        finally:
            self._release(call_id, scope)

    def cancel(self, call_id: str) -> bool:
        """Cancel a running call by the id it was given (``call_id=``, or ``events.id`` of a
        stream): its guest stops within one forward step, its session and batch slot are
        freed, and its caller gets ``CallCancelled``. False if no call has that id (it may
        have just ended)."""
        scope = self._calls.get(call_id)
        if scope is None:
            return False
        scope.cancel()
        return True

    async def call(
        self,
        tenant: str,
        function: str,
        params: Any | None = None,
        *,
        on_event: Callable[[Event], None] | None = None,
        call_id: str | None = None,
    ) -> dict[str, Any]:
        """Run ``function`` of ``tenant``'s guest and return its result data.

        ``on_event``, if given, is called in Trio (never in a worker thread) with each token
        event as the guest emits it; it must not block (the server hands events to its bounded
        outbound queue from here). ``call_id`` names the call for ``cancel`` (unique among
        the calls running; default: a fresh one).
        """
        params = {} if params is None else params
        call_id, scope = self._claim(call_id)
        return await self._run(tenant, function, params, on_event, call_id, scope)

    @contextlib.asynccontextmanager
    async def stream(
        self, tenant: str, function: str, params: Any | None = None, *, call_id: str | None = None
    ) -> AsyncIterator[CallEvents]:
        """Stream a call: ``async for ev in events`` gives token events, then the result.

        Leaving the block early cancels the call; so does ``rt.cancel(events.id)`` (the
        iteration then raises ``CallCancelled``).
        """
        call_id, call_scope = self._claim(call_id)  # now: a second call with this id is refused
        send, recv = trio.open_memory_channel[Event](STREAM_BUFFER)
        failure: list[BaseException] = []
        scope = trio.CancelScope()

        def on_event(ev: Event) -> None:
            # The guest never blocks on a reader: a reader that falls STREAM_BUFFER events
            # behind fails the call (Overloaded) rather than losing tokens silently.
            try:
                send.send_nowait(ev)
            except trio.WouldBlock:
                if not failure:
                    failure.append(
                        Overloaded(
                            f"stream reader fell {STREAM_BUFFER} events behind; call cancelled"
                        )
                    )
                scope.cancel()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                scope.cancel()

        async def runner() -> None:
            async with send:
                with scope:
                    try:
                        result = await self._run(
                            tenant, function, params or {}, on_event, call_id, call_scope
                        )
                    except RealmError as e:
                        failure.append(e)
                        return
                if scope.cancelled_caught:
                    return
                with contextlib.suppress(trio.BrokenResourceError):
                    await send.send(Event("result", result))

        async def events() -> AsyncIterator[Event]:
            async with recv:
                async for ev in recv:
                    yield ev
            if failure:
                raise failure[0]

        with single_error():  # one error (the call's, or the body's): as itself
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runner)
                gen = events()
                try:
                    yield CallEvents(call_id, gen)
                finally:
                    nursery.cancel_scope.cancel()
                    await gen.aclose()
                    self._release(call_id, call_scope)  # if the runner never started

    def statistics(self) -> RuntimeStatistics:
        return RuntimeStatistics(
            batcher=self.batcher.statistics(),
            tenants={n: a.statistics() for n, a in self._actors.items()},
        )

    def tenants(self) -> list[str]:
        return sorted(set(self._specs) | set(self._actors))

    async def functions(self, tenant: str) -> list[dict[str, Any]]:
        """``metadata`` without blocking the event loop (an instance is built in a thread)."""
        actor = self._actor(tenant)
        actor.check_available()
        inst = await trio.to_thread.run_sync(actor._instance, limiter=self._limiter)
        try:
            return inst.functions()
        finally:
            actor._idle.append(inst)

    def metadata(self, tenant: str) -> list[dict[str, Any]]:
        """The functions a tenant's guest exports (name, description, params schema)."""
        actor = self._actor(tenant)
        inst = actor._instance()
        try:
            return inst.functions()
        finally:
            actor._idle.append(inst)


def _weight(tenant: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e6:
        raise TenantUnavailable(f"tenant {tenant!r}: weight must be a number > 0, not {value!r}")
    return float(value)


@contextlib.asynccontextmanager
async def open_runtime(
    models: Mapping[str, str | os.PathLike[str] | Model] | None = None,
    tenants: Mapping[str, Mapping[str, Any]] | None = None,
    limits: RuntimeLimits | None = None,
) -> AsyncIterator[Runtime]:
    """Open an embedded Realm runtime.

    Args:
        models: name -> GGUF path (or a loaded ``Model``); one copy of each model's weights is
            shared by every tenant.
        tenants: name -> spec (``guest``: a wasm path or bytes, default the default guest;
            ``model``: default model name; ``limits``: ``GuestLimits``;
            ``max_concurrent_calls``; ``weight``: its share of batched steps under
            contention, default 1). None: an open, local runtime where any tenant name gets
            the default guest and default limits.
        limits: runtime-wide limits and defaults.
    """
    limits = limits or RuntimeLimits()
    registry = ModelRegistry()
    for name, m in (models or {}).items():
        if isinstance(m, Model):
            registry._by_name[name] = m  # an already loaded model, shared as it is
        else:
            registry.load(name, m)
    if not registry.names():
        raise ModelError("open_runtime needs at least one model")
    batcher = Batcher(gather_seconds=limits.gather_seconds)
    with SandboxEngine() as engine:
        with single_error():
            async with trio.open_nursery() as nursery:
                await nursery.start(batcher.run)
                rt = Runtime(registry, engine, batcher, nursery, tenants, limits)
                await nursery.start(rt.reap_idle)
                try:
                    yield rt
                finally:
                    rt._closing = True
                    with trio.move_on_after(limits.shutdown_seconds) as scope:
                        scope.shield = True
                        while any(a.in_flight for a in rt._actors.values()):
                            await trio.sleep(0.02)
                    with trio.move_on_after(1.0) as scope:  # past the grace period: stop them
                        scope.shield = True
                        for actor in rt._actors.values():
                            actor.cancel_all()
                        while any(a.in_flight for a in rt._actors.values()):
                            await trio.sleep(0.02)
                    nursery.cancel_scope.cancel()
        for actor in rt._actors.values():
            actor.close()
