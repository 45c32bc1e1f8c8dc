"""The embedded runtime: ``async with realm.open_runtime(...) as rt``.

The runtime owns, in one nursery: the sandbox engine, the batch scheduler task, and the tenant
actors. ``rt.call`` returns a call's result data; ``rt.stream`` is an async context manager
whose iterator yields token events and then the result. Cancelling the caller (a Trio cancel
scope, a deadline) cancels the call: the guest stops within one forward step and the sessions
it opened are closed; ``timeout=`` gives a call a deadline of its own (TIMEOUT past it).
Leaving the ``async with`` stops accepting calls, gives calls in flight ``shutdown_seconds`` to
finish, then cancels them.

The event loop never runs guest code: modules are compiled and instances built in worker
threads, ahead of the first call for configured, added and reloaded tenants (a few at a time
across the runtime); such a prepared actor becomes the tenant's actor at its first call.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import attrs
import trio

from .._errors import (
    CallCancelled,
    GuestABIError,
    InvalidParams,
    ModelError,
    RealmError,
    TenantUnavailable,
)
from .._util import single_error
from ..model import Adapter, Model, ModelRegistry, PagerStatistics, load_adapter
from ..sandbox import (
    COMPUTE,
    ComputeStatistics,
    GuestLimits,
    GuestModule,
    SandboxEngine,
    default_guest_path,
)
from ._actor import EmitWindow, Event, TenantActor, TenantStatistics
from ._batcher import Batcher, BatcherStatistics
from ._spec import MAX_CONCURRENT_CALLS, MAX_QUEUED_CALLS, AdapterSpec, TenantSpec

SHUTDOWN_SECONDS: Final = 5.0
STREAM_BUFFER: Final = 256  # token events buffered per streamed call (also its emit window)
MAX_CONCURRENT_BUILDS: Final = 2  # modules compiled and instances built ahead, at once
MAX_TENANT_NAME_CHARS: Final = 128
_COUNTERS: Final = ("calls", "errors", "completion_tokens", "busy_seconds")


@attrs.frozen
class RuntimeLimits:
    """Runtime-wide settings, and the defaults of tenant specs given as mappings (and of
    every tenant of an open runtime)."""

    max_concurrent_calls: int = MAX_CONCURRENT_CALLS  # per tenant
    max_queued_calls: int = MAX_QUEUED_CALLS  # per tenant
    guest: GuestLimits = attrs.field(factory=GuestLimits)
    threads: int | None = None  # worker threads for guests and steps (default: 2 x tenants, >= 8)
    gather_seconds: float = 0.002
    shutdown_seconds: float = SHUTDOWN_SECONDS
    idle_seconds: float | None = 300.0  # an actor idle this long stops (None: never)

    def tenant_defaults(self) -> TenantSpec:
        """The spec of a tenant that sets nothing itself."""
        return TenantSpec(
            max_concurrent_calls=self.max_concurrent_calls,
            max_queued_calls=self.max_queued_calls,
            limits=self.guest,
        )


@attrs.frozen
class RuntimeStatistics:
    batcher: BatcherStatistics
    tenants: dict[str, TenantStatistics]
    #: each paged model's layer pager figures, by model name (unpaged models are left out)
    models: dict[str, PagerStatistics] = attrs.field(factory=dict)
    #: the native pool's gate: forward steps, their wait for guests' kernel chunks
    compute: ComputeStatistics | None = None


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
        tenants: Mapping[str, TenantSpec | Mapping[str, Any]] | None,
        limits: RuntimeLimits,
        default_module: GuestModule,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.batcher = batcher
        self.limits = limits
        self._nursery = nursery
        self._open = tenants is None  # no tenants configured: any name gets the default guest
        self._defaults = limits.tenant_defaults()
        # every spec checked now: a bad one fails the open, not the tenant's first call
        self._specs: dict[str, TenantSpec] = {
            name: self._spec(name, spec) for name, spec in (tenants or {}).items()
        }
        # each tenant's LoRA adapters by name, loaded now (a bad one fails the open); the
        # tenant's actors share its dict, so rt.add_adapter reaches calls that start later
        self._adapters: dict[str, dict[str, Adapter]] = {
            name: self._load_adapters(name, spec) for name, spec in self._specs.items()
        }
        self._actors: dict[str, TenantActor] = {}
        self._prepared: dict[str, TenantActor] = {}  # built ahead, not called yet
        # counters of each tenant's stopped actors: its figures outlive an idle stop
        self._past: dict[str, dict[str, float]] = {}
        self._limiter = trio.CapacityLimiter(limits.threads or max(8, 2 * (len(self._specs) + 2)))
        self._builds = trio.CapacityLimiter(MAX_CONCURRENT_BUILDS)
        self._closing = False
        self._calls: dict[str, trio.CancelScope] = {}  # running calls by id, for cancel()
        self._ids = itertools.count(1)
        self._default_module = default_module
        for name in self._specs:
            self._prepare(name)

    # --- tenants -------------------------------------------------------------------------------

    def _spec(self, name: str, spec: TenantSpec | Mapping[str, Any]) -> TenantSpec:
        try:
            return TenantSpec.from_mapping(spec, self._defaults)
        except (ValueError, TypeError) as e:
            raise TenantUnavailable(f"tenant {name!r}: {e}") from None

    def _new_actor(self, name: str) -> TenantActor:
        spec = self._specs.get(name)
        if spec is None and not self._open:
            raise TenantUnavailable(f"unknown tenant {name[:MAX_TENANT_NAME_CHARS]!r}")
        spec = spec or self._defaults
        models = {n: self.registry.get(n) for n in self.registry.names()}
        actor = TenantActor(
            name,
            spec,
            models=models,
            default_model=spec.model or (self.registry.names() or [None])[0],
            engine=self.engine,
            batcher=self.batcher,
            limiter=self._limiter,
            builds=self._builds,
            module=None if spec.guest else self._default_module,
        )
        actor.state.adapters = self._adapters.setdefault(name, {})
        self._nursery.start_soon(actor.warm)
        return actor

    def _prepare(self, name: str) -> None:
        """Compile a tenant's module and build its instances now, before its first call."""
        if not self._closing:
            self._prepared[name] = self._new_actor(name)

    def _actor(self, name: str) -> TenantActor:
        if not isinstance(name, str) or not name or len(name) > MAX_TENANT_NAME_CHARS:
            raise TenantUnavailable(f"bad tenant name {str(name)[:MAX_TENANT_NAME_CHARS]!r}")
        actor = self._actors.get(name)
        if actor is None:
            actor = self._prepared.pop(name, None) or self._new_actor(name)
            self._actors[name] = actor
        return actor

    def add_tenant(self, name: str, spec: TenantSpec | None = None, **keys: Any) -> None:
        """Add (or replace) a tenant: a ``TenantSpec``, or its keys (``guest``: a wasm path or
        bytes, ``model``, ``weight``, ``max_concurrent_calls``, ``limits``...). Its module is
        compiled and its instances built in the background; calls in flight finish on the old
        ones. Raises TenantUnavailable for a bad spec."""
        new = self._spec(name, spec if spec is not None else keys)
        adapters = self._load_adapters(name, new)
        self._specs[name], self._adapters[name] = new, adapters
        self.reload_tenant(name)

    def remove_tenant(self, name: str) -> None:
        """Forget a tenant: new calls are refused; calls in flight finish first."""
        self._specs.pop(name, None)
        self._adapters.pop(name, None)
        self._retire_later(name)

    # --- LoRA adapters (docs/lora.md) ------------------------------------------------------

    def _load_adapters(self, tenant: str, spec: TenantSpec) -> dict[str, Adapter]:
        out: dict[str, Adapter] = {}
        for name, a in spec.adapters.items():
            out[name] = self._load_adapter(tenant, spec, name, a, out)
        return out

    def _load_adapter(
        self, tenant: str, spec: TenantSpec | None, name: str, a: AdapterSpec,
        held: Mapping[str, Adapter],
    ) -> Adapter:  # fmt: skip
        where = f"tenant {tenant!r}: adapter {name!r}"
        names = self.registry.names()
        if name in names:
            raise TenantUnavailable(f"{where}: the name is a model's (adapters and models share "
                                    "the names a call may give)")  # fmt: skip
        model_name = a.model or (spec.model if spec is not None else None) or (names or [""])[0]
        try:
            model = self.registry.get(model_name)
            adapter = load_adapter(a.path, model, scale=a.scale)
        except RealmError as e:
            raise TenantUnavailable(f"{where}: {e}") from None
        cap = spec.max_adapter_bytes if spec is not None else None
        used = sum(x.nbytes for n, x in held.items() if n != name)
        if cap is not None and used + adapter.nbytes > cap:
            raise TenantUnavailable(
                f"{where}: {adapter.nbytes} bytes of adapter weights; {used} of the tenant's "
                f"max_adapter_bytes {cap} are held"
            )
        return adapter

    async def add_adapter(
        self, tenant: str, name: str, path: str | os.PathLike[str], *, scale: float = 1.0,
        model: str | None = None,
    ) -> None:  # fmt: skip
        """Load a LoRA adapter file (llama.cpp's GGUF adapter format) for ``tenant`` under
        ``name`` (replacing one of that name): calls that start from now on may name it (the
        default guest's ``adapter`` parameter, or as a model name). ``model`` is the model it
        adapts (default: the tenant's). The file is read in a worker thread. Raises
        TenantUnavailable naming what is wrong."""
        if tenant not in self._specs and not self._open:
            raise TenantUnavailable(f"unknown tenant {tenant[:MAX_TENANT_NAME_CHARS]!r}")
        try:
            a = AdapterSpec(path=path, scale=scale, model=model)
            (name,) = _adapter_names({name: a})
        except (ValueError, TypeError) as e:
            raise TenantUnavailable(f"tenant {tenant!r}: adapter {name!r:.80}: {e}") from None
        spec = self._specs.get(tenant)
        held = self._adapters.setdefault(tenant, {})
        adapter = await trio.to_thread.run_sync(self._load_adapter, tenant, spec, name, a, held)
        held = self._adapters.setdefault(tenant, {})  # the tenant may have been replaced since
        held[name] = adapter
        spec = self._specs.get(tenant)
        if spec is not None:
            self._specs[tenant] = attrs.evolve(spec, adapters={**spec.adapters, name: a})

    def remove_adapter(self, tenant: str, name: str) -> None:
        """Forget a tenant's adapter: calls that start later cannot name it (sessions using it
        now finish with it). Raises InvalidParams when the tenant has no such adapter."""
        held = self._adapters.get(tenant, {})
        if name not in held:
            raise InvalidParams(f"tenant {tenant!r} has no adapter {str(name)[:128]!r}")
        del held[name]
        spec = self._specs.get(tenant)
        if spec is not None:
            rest = {n: a for n, a in spec.adapters.items() if n != name}
            self._specs[tenant] = attrs.evolve(spec, adapters=rest)

    def adapters(self, tenant: str) -> dict[str, dict[str, Any]]:
        """A tenant's adapters: name -> {model, path, scale, alpha, rank, bytes}."""
        out = {}
        for name, a in self._adapters.get(tenant, {}).items():
            model = next((n for n in self.registry.names() if self.registry.get(n) is a.model),
                         None)  # fmt: skip
            out[name] = {"model": model, "path": str(a.path), "scale": a.scale, "alpha": a.alpha,
                         "rank": a.rank, "bytes": a.nbytes}  # fmt: skip
        return out

    def reload_tenant(self, name: str) -> None:
        """A new guest module takes effect for new calls; calls in flight finish on the old."""
        self._retire_later(name)
        if name in self._specs:
            self._prepare(name)

    def reset_tenant(self, name: str) -> bool:
        """Operator action: clear a tenant's failed state (past its restart intensity) and its
        restart backoff now. False if the tenant has no actor (nothing to clear)."""
        actor = self._actors.get(name) or self._prepared.get(name)
        if actor is None:
            return False
        actor.reset()
        return True

    def _retire_later(self, name: str) -> None:
        self._past.pop(name, None)  # a new spec (or none): its figures start anew
        for table in (self._actors, self._prepared):
            actor = table.pop(name, None)
            if actor is not None:
                self._nursery.start_soon(self._close_when_idle, actor)

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
            for table in (self._actors, self._prepared):
                for name, actor in list(table.items()):
                    if actor.in_flight == 0 and time.monotonic() - actor.last_used >= idle:
                        del table[name]
                        self._retire(actor)
                        actor.close()

    async def _close_when_idle(self, actor: TenantActor) -> None:
        await actor.wait_idle()
        actor.close()

    def _retire(self, actor: TenantActor) -> None:
        """Keep an idle actor's counters as it stops, added to its tenant's past figures: its
        next actor goes on from them. (A reload or removal starts the figures anew.)"""
        if not actor.calls:
            return
        past = self._past.setdefault(actor.name, dict.fromkeys(_COUNTERS, 0))
        past["calls"] += actor.calls
        past["errors"] += actor.errors
        past["completion_tokens"] += actor.tokens
        past["busy_seconds"] += actor.busy_seconds

    # --- calls -----------------------------------------------------------------------------------

    def _claim(self, call_id: str | None) -> tuple[str, trio.CancelScope]:
        """An id for a new call (the caller's, checked, or a fresh one) and its cancel scope."""
        if call_id is None:
            call_id = f"call-{next(self._ids)}"
        elif not isinstance(call_id, str) or not call_id:
            raise InvalidParams(f"call_id must be a non-empty string, not {call_id!r:.80}")
        if call_id in self._calls:
            raise InvalidParams(f"call_id {call_id!r:.80}: a call with this id is already running")
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
        *,
        window: EmitWindow | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        try:
            if self._closing:
                raise TenantUnavailable("the runtime is shutting down")
            deadline = _deadline(timeout)
            actor = self._actor(tenant)
            with scope:
                return await actor.call(
                    function, params, on_event, window=window, deadline=deadline
                )
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
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Run ``function`` of ``tenant``'s guest and return its result data.

        ``on_event``, if given, is called in Trio (never in a worker thread) with each token
        event as the guest emits it; it must not block (the server hands events to its bounded
        outbound queue from here). ``call_id`` names the call for ``cancel`` (unique among
        the calls running; default: a fresh one). ``timeout``: seconds after which the guest
        is stopped and the call raises ``DeadlineExceeded`` (TIMEOUT).
        """
        params = {} if params is None else params
        call_id, scope = self._claim(call_id)
        return await self._run(tenant, function, params, on_event, call_id, scope, timeout=timeout)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        tenant: str,
        function: str,
        params: Any | None = None,
        *,
        call_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[CallEvents]:
        """Stream a call: ``async for ev in events`` gives token events, then the result.

        The guest waits while the reader is ``STREAM_BUFFER`` events or ``EMIT_WINDOW_BYTES``
        behind (backpressure), so a slow reader costs the runtime no memory. Leaving the block
        early cancels the call; so does ``rt.cancel(events.id)`` (the iteration then raises
        ``CallCancelled``).
        """
        call_id, call_scope = self._claim(call_id)  # now: a second call with this id is refused
        send, recv = trio.open_memory_channel[Event](STREAM_BUFFER)
        window = EmitWindow(max_events=STREAM_BUFFER)
        failure: list[BaseException] = []
        scope = trio.CancelScope()

        def on_event(ev: Event) -> None:
            try:  # never full: the window holds the guest back first
                send.send_nowait(ev)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                scope.cancel()

        async def runner() -> None:
            async with send:
                with scope:
                    try:
                        result = await self._run(
                            tenant, function, params or {}, on_event, call_id, call_scope,
                            window=window, timeout=timeout,
                        )  # fmt: skip
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
                    if ev.kind == "token":
                        window.release(len(ev.data["token"].encode("utf-8")))
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

    # --- statistics and introspection -------------------------------------------------------------

    def statistics(self) -> RuntimeStatistics:
        names = [*self._actors, *(n for n in self._past if n not in self._actors)]
        return RuntimeStatistics(
            batcher=self.batcher.statistics(),
            tenants={n: self.tenant_statistics(n) for n in names},
            models=self.registry.pager_statistics(),
            compute=COMPUTE.statistics(),
        )

    def tenant_statistics(self, name: str) -> TenantStatistics:
        """One tenant's figures (the ``statistics().tenants`` entry), without any other's.

        ``calls``, ``errors``, ``completion_tokens`` and ``tokens_per_second`` count every
        call since the tenant was configured (added, reloaded), also those of its actors
        stopped since for being idle;
        ``sessions``, ``in_flight``, ``queued`` and ``failed`` are its running actor's (0
        when stopped). A tenant that never ran has all zeros.
        """
        actor = self._actors.get(name)
        now = actor.statistics() if actor is not None else TenantStatistics()
        past = self._past.get(name, dict.fromkeys(_COUNTERS, 0))
        busy = past["busy_seconds"] + (actor.busy_seconds if actor is not None else 0.0)
        tokens = int(past["completion_tokens"]) + now.completion_tokens
        held = self._adapters.get(name, {})
        return attrs.evolve(
            now,
            adapters=len(held),
            adapter_bytes=sum(a.nbytes for a in held.values()),
            calls=int(past["calls"]) + now.calls,
            errors=int(past["errors"]) + now.errors,
            completion_tokens=tokens,
            tokens_per_second=tokens / busy if busy else math.nan,
        )

    def tenants(self) -> list[str]:
        return sorted(set(self._specs) | set(self._actors))

    async def functions(self, tenant: str) -> list[dict[str, Any]]:
        """The functions a tenant's guest exports (name, description, params schema), read
        off the event loop (the module is compiled and an instance built in a thread)."""
        actor = self._actor(tenant)
        actor.check_available()
        found = actor.metadata_now()
        if found is not None:
            return found
        await actor.ready.wait()
        if actor.module_error is not None:
            raise GuestABIError(str(actor.module_error))
        inst = await trio.to_thread.run_sync(actor._instance, limiter=self._limiter)
        actor._idle.append(inst)
        return inst.functions()

    def metadata(self, tenant: str) -> list[dict[str, Any]]:
        """``functions`` for synchronous callers: at once when the tenant is warm; otherwise
        the module is compiled and an instance built in the calling thread (on an event
        loop, prefer ``await rt.functions(tenant)``)."""
        actor = self._actor(tenant)
        found = actor.metadata_now()
        if found is not None:
            return found
        if actor.module is None:
            guest = actor.spec.guest
            assert guest is not None
            actor.module = self.engine.compile(guest)
        inst = actor._instance()
        actor._idle.append(inst)
        return inst.functions()


def _adapter_names(table: Mapping[str, AdapterSpec]) -> list[str]:
    """The names of an adapter table, checked as a tenant spec checks them."""
    return list(TenantSpec(adapters=dict(table)).adapters)


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise InvalidParams(f"timeout must be a number of seconds > 0, not {timeout!r:.40}")
    return time.monotonic() + float(timeout)


@contextlib.asynccontextmanager
async def open_runtime(
    models: Mapping[str, str | os.PathLike[str] | Model] | None = None,
    tenants: Mapping[str, TenantSpec | Mapping[str, Any]] | None = None,
    limits: RuntimeLimits | None = None,
    *,
    max_resident_bytes: int | None = None,
    pack: bool | None = None,
) -> AsyncIterator[Runtime]:
    """Open an embedded Realm runtime.

    Args:
        models: name -> GGUF path (or a loaded ``Model``); one copy of each model's weights is
            shared by every tenant.
        tenants: name -> ``TenantSpec``, or a mapping of its keys (``guest``: a wasm path or
            bytes, default the default guest; ``model``: default model name; ``limits``:
            ``GuestLimits``; ``weight``, ``max_concurrent_calls``, ``max_queued_calls``...;
            missing keys come from ``limits``). None: an open, local runtime where any tenant
            name gets the default guest and ``limits``' defaults.
        limits: runtime-wide limits and defaults.
        max_resident_bytes: one layer-paging budget shared by every model the runtime loads
            from a path (``PagingBudget``, docs/models.md): their weights together keep at most
            this many bytes resident (0: none between steps), the rest paged in per step.
            None: no paging.
        pack: ``load_model``'s ``pack`` for the models loaded from a path (None: packed where
            the CPU's ISA level has a kernel; False: the file's layout and pages).

    Raises:
        ModelError: no model, or one that cannot be loaded.
        TenantUnavailable: a tenant spec with a bad value (named).
    """
    limits = limits or RuntimeLimits()
    registry = ModelRegistry(max_resident_bytes=max_resident_bytes)  # checks it (ModelError)
    for name, m in (models or {}).items():
        if isinstance(m, Model):
            registry._by_name[name] = m  # an already loaded model, shared as it is
        else:
            registry.load(name, m, **({} if pack is None else {"pack": pack}))
    if not registry.names():
        raise ModelError("open_runtime needs at least one model")
    batcher = Batcher(gather_seconds=limits.gather_seconds)
    with SandboxEngine() as engine:
        default_module = await trio.to_thread.run_sync(engine.compile, default_guest_path())
        with single_error():
            async with trio.open_nursery() as nursery:
                await nursery.start(batcher.run)
                rt = Runtime(registry, engine, batcher, nursery, tenants, limits, default_module)
                await nursery.start(rt.reap_idle)
                try:
                    yield rt
                finally:
                    rt._closing = True
                    with trio.move_on_after(limits.shutdown_seconds) as scope:
                        scope.shield = True
                        for actor in list(rt._actors.values()):
                            await actor.wait_idle()
                    with trio.move_on_after(1.0) as scope:  # past the grace period: stop them
                        scope.shield = True
                        for actor in rt._actors.values():
                            actor.cancel_all()
                        for actor in list(rt._actors.values()):
                            await actor.wait_idle()
                    nursery.cancel_scope.cancel()
        for actor in [*rt._actors.values(), *rt._prepared.values()]:
            actor.close()
