"""A tenant actor: owns a tenant's guest instances and sessions, and serves its calls.

A call first takes one of the tenant's call slots (``max_concurrent_calls``; at most
``max_queued_calls`` wait, past that OVERLOADED), then runs in a worker thread
(``trio.to_thread.run_sync`` with the runtime's ``CapacityLimiter``) on one of the tenant's
instances, so the event loop never runs a guest. The actor compiles its module and builds its
instances in worker threads when it starts (``warm``, a few at a time across the runtime), so
a cold tenant's first calls find them ready and nobody else waits for them.

A call's Trio cancellation sets the guest's cancel flag, so the guest stops within one step;
what it emits flows to the caller through a window bounded in bytes and events (the guest
waits while the caller has not taken what it sent). A trapped instance is discarded and
rebuilt (one-for-one restart) under a restart intensity: past ``max_restarts`` in
``restart_period_seconds`` the tenant is marked failed and its calls get TENANT_UNAVAILABLE
until the cool-down ends or an operator resets it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import attrs
import numpy as np
import trio

from .._errors import (
    GuestABIError,
    GuestError,
    GuestTrap,
    Overloaded,
    RealmError,
    TenantUnavailable,
)
from ..model import Model
from ..sandbox import CallContext, GuestInstance, GuestModule, SandboxEngine, TenantState
from ._batcher import Batcher
from ._spec import TenantSpec

log = logging.getLogger("realm.actors")

EMIT_WINDOW_BYTES: Final = 1 << 20  # emitted, not yet taken by the caller: the guest waits
EMIT_WINDOW_EVENTS: Final = 256
WINDOW_POLL_SECONDS: Final = 0.01
MAX_BACKOFF_SECONDS: Final = 2.0
WARM_INSTANCES: Final = 2  # instances built ahead of a tenant's first calls (more on demand)


@attrs.frozen
class Event:
    """What a streamed call yields: token events, then exactly one result (or error)."""

    kind: str  # "token" | "result"
    data: dict[str, Any]


@attrs.frozen
class TenantStatistics(Mapping[str, Any]):
    """A tenant's figures; also readable as a mapping of the same names (JSON-ready)."""

    calls: int = 0  # since the runtime opened, stopped actors included
    errors: int = 0
    completion_tokens: int = 0
    tokens_per_second: float = math.nan  # completion tokens over the time calls ran
    sessions: int = 0  # open now (KV caches)
    in_flight: int = 0  # calls running or waiting for a slot
    queued: int = 0  # calls waiting for a slot
    failed: bool = False  # past its restart intensity, until the cool-down or a reset
    adapters: int = 0  # LoRA adapters it may name
    adapter_bytes: int = 0  # their weights' bytes

    def __getitem__(self, key: str) -> Any:
        if key not in _STAT_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_STAT_FIELDS)

    def __len__(self) -> int:
        return len(_STAT_FIELDS)


_STAT_FIELDS: Final = tuple(f.name for f in attrs.fields(TenantStatistics))


@attrs.frozen
class TenantConfig:
    """A running tenant: its name and spec (spec fields read through, ``config.weight``)."""

    name: str
    spec: TenantSpec

    def __getattr__(self, key: str) -> Any:
        return getattr(self.spec, key)


class EmitWindow:
    """What a call emitted that its caller has not taken yet, bounded in bytes and events: the
    guest's ``emit`` waits while the window is full (backpressure), interrupted by a cancel."""

    def __init__(self, max_bytes: int = EMIT_WINDOW_BYTES, max_events: int = EMIT_WINDOW_EVENTS):
        self.max_bytes = max_bytes
        self.max_events = max_events
        self._cond = threading.Condition()
        self._bytes = self._events = 0

    def reserve(self, n: int, ctx: CallContext) -> bool:
        """In the guest's thread: room for a chunk of ``n`` bytes (False: the call stopped)."""
        with self._cond:
            while self._events and (
                self._bytes + n > self.max_bytes or self._events >= self.max_events
            ):
                if ctx.cancelled():
                    return False
                self._cond.wait(WINDOW_POLL_SECONDS)
            self._bytes += n
            self._events += 1
        return True

    def release(self, n: int) -> None:
        """The caller took a chunk of ``n`` bytes."""
        with self._cond:
            self._bytes -= n
            self._events -= 1
            self._cond.notify_all()

    @property
    def held_bytes(self) -> int:
        return self._bytes


class TenantActor:
    """Serves one tenant's calls (see module docs). Created and run by the runtime."""

    def __init__(
        self,
        name: str,
        spec: TenantSpec,
        *,
        models: dict[str, Model],
        default_model: str | None,
        engine: SandboxEngine,
        batcher: Batcher,
        limiter: trio.CapacityLimiter,
        builds: trio.CapacityLimiter,
        module: GuestModule | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.config = TenantConfig(name, spec)
        self.engine = engine
        self.batcher = batcher
        self.limiter = limiter
        self.builds = builds
        self.module = module  # None until warm() compiled it
        self.module_error: GuestABIError | None = None
        self.ready = trio.Event()  # the module is compiled (or refused)
        self.state = TenantState(
            name, models, default_model=default_model, limits=spec.limits, forward=self._forward
        )
        self._idle: list[GuestInstance] = []
        self._running = threading.local()  # .ctx: the call a worker thread runs now
        self._slots = trio.Semaphore(spec.max_concurrent_calls)
        self._restarts: list[float] = []
        self.failed_until = 0.0
        self.failed_reason = ""
        self.restart_at = 0.0  # after a crash, no new instance before this (backoff)
        self.calls = self.errors = self.tokens = 0
        self.busy_seconds = 0.0
        self.in_flight = 0
        self.last_used = time.monotonic()
        self._drained = trio.Event()
        self._drained.set()
        self._active: set[CallContext] = set()  # contexts of the calls running now
        self._closed = False
        self._warm_scope = trio.CancelScope()

    # --- start-up: compile the module and build instances, off the event loop -------------------

    async def warm(self) -> None:
        """Compile the module (if needed) and build a few instances (``WARM_INSTANCES``, at
        most ``max_concurrent_calls``), each in a worker thread under the runtime's build
        limiter. Never raises: a module that
        fails is recorded and reported to every call."""
        with self._warm_scope:
            try:
                if self.module is None:
                    guest = self.spec.guest
                    assert guest is not None
                    self.module = await trio.to_thread.run_sync(
                        self.engine.compile, guest, limiter=self.builds, abandon_on_cancel=True
                    )
                ahead = min(self.spec.max_concurrent_calls, WARM_INSTANCES)
                while not self._closed and len(self._idle) < ahead:
                    inst = await trio.to_thread.run_sync(
                        self._build, limiter=self.builds, abandon_on_cancel=True
                    )
                    if self._closed:
                        inst.close()
                    else:
                        self._idle.append(inst)
            except GuestABIError as e:
                self.module_error = e
            except GuestError as e:  # the instance trapped while it started: calls will retry
                log.warning("tenant %r: an instance failed to start: %s", self.name, e)
            finally:
                self.ready.set()

    def _build(self) -> GuestInstance:
        assert self.module is not None
        return GuestInstance(self.engine, self.module, self.state)

    def _instance(self) -> GuestInstance:
        """An idle instance, or a new one (in a worker thread: it runs guest code)."""
        while self._idle:
            inst = self._idle.pop()
            if not inst.broken:
                return inst
        return self._build()

    def metadata_now(self) -> list[dict[str, Any]] | None:
        """The guest's functions if its module was read already (no guest code runs)."""
        if self.module is not None and self.module.metadata is not None:
            return list(self.module.metadata["functions"])
        return None

    # --- the guest's forward import, bridged to the Trio batcher ------------------------------

    def _forward(self, model: Model, work: Any) -> list[np.ndarray | None]:
        """In the guest's worker thread: the step through the batcher; the wait ends when the
        call is cancelled (its guest then sees ECANCELLED)."""
        ctx: CallContext | None = getattr(self._running, "ctx", None)

        def wake(event: threading.Event | None) -> None:  # what a cancel of the call sets
            if ctx is not None:
                ctx.waker = event

        return self.batcher.forward_from_thread(
            model,
            work,
            tenant=self.name,
            weight=self.spec.weight,
            caller=threading.get_ident(),
            cancelled=ctx.cancelled if ctx is not None else lambda: False,
            wake=wake,
        )

    # --- supervision -----------------------------------------------------------------------------

    def _record_restart(self, why: str) -> None:
        now = time.monotonic()
        period = self.spec.restart_period_seconds
        self._restarts = [t for t in self._restarts if now - t < period] + [now]
        # backoff: the next instance starts later the more often this tenant crashed lately
        backoff = self.spec.restart_backoff_seconds * 2 ** (len(self._restarts) - 1)
        self.restart_at = now + min(backoff, MAX_BACKOFF_SECONDS)
        if len(self._restarts) > self.spec.max_restarts:
            self.failed_until = now + self.spec.cooldown_seconds
            self.failed_reason = (
                f"tenant {self.name!r} restarted {len(self._restarts)} times in "
                f"{period:.0f} s (last: {why[:500]})"
            )

    def check_available(self) -> None:
        if time.monotonic() < self.failed_until:
            raise TenantUnavailable(self.failed_reason)
        if self.failed_until:
            self.failed_until, self._restarts = 0.0, []

    def reset(self) -> None:
        """Operator action: clear a failed state and the restart backoff now."""
        self.failed_until, self._restarts, self.failed_reason = 0.0, [], ""
        self.restart_at = 0.0

    # --- calls ---------------------------------------------------------------------------------

    async def call(
        self,
        function: str,
        params: Any,
        on_event: Callable[[Event], None] | None = None,
        *,
        window: EmitWindow | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Run one call to completion; ``on_event`` receives its token events (in Trio).

        ``window``: the caller releases each token's bytes itself when it has taken them
        (a stream); by default they are released once ``on_event`` returned. ``deadline``: a
        ``time.monotonic()`` time past which the call ends with TIMEOUT.
        """
        self.check_available()
        self._enter()
        try:
            return await self._call(function, params, on_event, window, deadline)
        finally:
            self._leave()

    def _enter(self) -> None:
        if self.in_flight == 0:
            self._drained = trio.Event()
        self.in_flight += 1

    def _leave(self) -> None:
        self.in_flight -= 1
        self.last_used = time.monotonic()
        if self.in_flight == 0:
            self._drained.set()

    async def wait_idle(self) -> None:
        """Until no call is in flight."""
        while self.in_flight:
            await self._drained.wait()

    async def _call(
        self,
        function: str,
        params: Any,
        on_event: Callable[[Event], None] | None,
        window: EmitWindow | None,
        deadline: float | None,
    ) -> dict[str, Any]:
        waiting = self._slots.statistics().tasks_waiting
        if self._slots.value == 0 and waiting >= self.spec.max_queued_calls:
            raise Overloaded(f"tenant {self.name!r} has {waiting} calls waiting for a slot")
        async with self._slots:
            if not self.ready.is_set():
                await self.ready.wait()
            if self.module_error is not None:
                raise GuestABIError(str(self.module_error))
            return await self._call_in_slot(function, params, on_event, window, deadline)

    async def _call_in_slot(
        self,
        function: str,
        params: Any,
        on_event: Callable[[Event], None] | None,
        window: EmitWindow | None,
        deadline: float | None,
    ) -> dict[str, Any]:
        t_start = time.perf_counter()
        if (delay := self.restart_at - time.monotonic()) > 0:
            await trio.sleep(delay)  # restart backoff: the next call waits after a recent crash
        inst = await trio.to_thread.run_sync(self._instance, limiter=self.limiter)
        index = 0
        t_first = 0.0
        token = trio.lowlevel.current_trio_token()
        own_window = window is None
        win = EmitWindow() if window is None else window
        seed = params.get("seed") if isinstance(params, dict) else None
        ctx = CallContext(seed=seed if isinstance(seed, int) and seed >= 0 else None,
                          deadline=deadline)  # fmt: skip

        def deliver(ev: Event, n: int) -> None:  # in Trio, in emit order
            try:
                if on_event is not None:
                    on_event(ev)
            except Exception:  # it must not reach Trio's scheduler (that would end the run)
                log.exception("a token event callback failed")
            finally:
                if own_window:
                    win.release(n)

        def emit(text: str) -> bool:  # in the guest's thread
            nonlocal index, t_first
            n = len(text.encode("utf-8"))
            if not win.reserve(n, ctx):  # the caller has not taken the last chunks yet
                return False
            if index == 0:
                t_first = time.perf_counter()
            # Trio runs these callbacks in order, and the call's own completion is queued
            # behind them, so the events of a call always arrive before its result
            try:
                token.run_sync_soon(deliver, Event("token", {"token": text, "index": index}), n)
            except trio.RunFinishedError:
                return False
            index += 1
            return True

        ctx.on_emit = emit
        t0 = time.perf_counter()
        self.calls += 1
        self._active.add(ctx)
        try:
            result = await self._in_thread(inst, function, params, ctx)
        finally:
            self._active.discard(ctx)
            self.busy_seconds += time.perf_counter() - t0
            if not inst.broken and not self._closed:
                self._idle.append(inst)
        usage = result.get("usage")
        if isinstance(usage, dict):  # checked by the instance: non-negative integers
            self.tokens += int(usage.get("completion_tokens") or 0)
        if index:
            _add_timings(result, t_start, t_first, time.perf_counter(), index)
        return result

    def _guest_call(
        self, inst: GuestInstance, function: str, params: Any, ctx: CallContext
    ) -> dict[str, Any]:
        """In the worker thread: the call, its errors counted here (whatever Trio does with
        the outcome of a cancelled call), a trap recorded against the restart intensity."""
        self._running.ctx = ctx  # the call this thread runs (its forward steps' cancel flag)
        try:
            return inst.call(function, params, ctx)
        except GuestTrap as e:
            self.errors += 1
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._record_restart, str(e))
            raise
        except RealmError:
            self.errors += 1
            raise
        except Exception as e:  # never a raw exception from rt.call
            self.errors += 1
            raise GuestError(f"tenant {self.name!r}: the call failed in the host: {e!r}") from e
        finally:
            self._running.ctx = None

    async def _in_thread(
        self, inst: GuestInstance, function: str, params: Any, ctx: CallContext
    ) -> dict[str, Any]:
        """Run the guest call in a worker thread; a Trio cancel sets the guest's cancel flag."""
        result: dict[str, Any] = {}
        try:
            async with trio.open_nursery() as nursery:

                async def watch_cancel() -> None:
                    try:
                        await trio.sleep_forever()
                    finally:
                        ctx.cancel.set()  # the guest stops within one forward step
                        waker = ctx.waker
                        if waker is not None:  # it waits for a step now: it stops waiting
                            waker.set()

                nursery.start_soon(watch_cancel)
                try:
                    result = await trio.to_thread.run_sync(
                        self._guest_call, inst, function, params, ctx, limiter=self.limiter
                    )
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            failed = group.subgroup(lambda e: not isinstance(e, trio.Cancelled))
            cancelled = group.subgroup(lambda e: isinstance(e, trio.Cancelled))
            if cancelled is not None:  # the caller was cancelled: that is what propagates
                raise _first(cancelled) from None
            if failed is not None and len(failed.exceptions) == 1:
                raise _first(failed) from None
            raise
        return result

    def cancel_all(self) -> None:
        """Ask every running call's guest to stop (shutdown past its grace period)."""
        for ctx in list(self._active):
            ctx.cancel.set()
            waker = ctx.waker
            if waker is not None:
                waker.set()

    def close(self) -> None:
        """Stop: no more instances; every session (kept ones too) is closed."""
        self._closed = True
        self._warm_scope.cancel()
        self.state.close()
        for inst in self._idle:
            inst.close()
        self._idle.clear()

    def statistics(self) -> TenantStatistics:
        return TenantStatistics(
            calls=self.calls,
            errors=self.errors,
            completion_tokens=self.tokens,
            tokens_per_second=self.tokens / self.busy_seconds if self.busy_seconds else math.nan,
            sessions=len(self.state.sessions),
            in_flight=self.in_flight,
            queued=self._slots.statistics().tasks_waiting,
            failed=time.monotonic() < self.failed_until,
        )


def _add_timings(result: dict[str, Any], t0: float, t_first: float, t_end: float, n: int) -> None:
    """Host-measured timings of a call that streamed ``n`` tokens, merged into the guest's."""
    timings = result.get("timings")
    if not isinstance(timings, dict):
        timings = result["timings"] = {}
    timings["time_to_first_token_ms"] = round((t_first - t0) * 1e3, 3)
    timings["total_ms"] = round((t_end - t0) * 1e3, 3)
    # tokens after the first, over the time after the first: the streaming rate a reader sees
    timings["tokens_per_second"] = (
        round((n - 1) / (t_end - t_first), 3) if n > 1 and t_end > t_first else None
    )


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf exception of a (possibly nested) group."""
    e: BaseException = group
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e
