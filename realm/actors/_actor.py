"""A tenant actor: one Trio task that owns a tenant's guest instances and serves its calls.

Calls arrive in the actor's bounded mailbox; each runs in a worker thread
(``trio.to_thread.run_sync`` with the runtime's ``CapacityLimiter``) on one of the tenant's
instances (a small pool: up to ``max_concurrent_calls`` calls of one tenant run at once). The
event loop never blocks on a guest. A call's Trio cancellation sets the guest's cancel flag, so
the guest stops within one forward step. A trapped instance is discarded and rebuilt
(one-for-one restart) under a restart intensity: past ``max_restarts`` in
``restart_period_seconds`` the tenant is marked failed and its calls get TENANT_UNAVAILABLE
until the cool-down ends.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final

import attrs
import numpy as np
import trio

from .._errors import CallCancelled, GuestTrap, Overloaded, RealmError, TenantUnavailable
from ..model import Model, Session
from ..sandbox import (
    CallContext,
    GuestInstance,
    GuestLimits,
    GuestModule,
    SandboxEngine,
    TenantState,
)
from ._batcher import Batcher

log = logging.getLogger("realm.actors")

MAILBOX_SIZE: Final = 64


@attrs.frozen
class TenantConfig:
    """What a tenant is: its guest module, models, and limits."""

    name: str
    module: GuestModule
    models: dict[str, Model]
    default_model: str | None = None
    guest_limits: GuestLimits = attrs.field(factory=GuestLimits)
    weight: float = 1.0  # share of the batched steps under contention (fair queuing)
    max_concurrent_calls: int = 2
    max_queued_calls: int = 64  # calls waiting for a slot; past it, Overloaded
    max_restarts: int = 3
    restart_period_seconds: float = 60.0
    cooldown_seconds: float = 30.0
    restart_backoff_seconds: float = 0.05  # doubles with each restart in the period (max 2 s)


@attrs.frozen
class Event:
    """What a streamed call yields: token events, then exactly one result (or error)."""

    kind: str  # "token" | "result"
    data: dict[str, Any]


class TenantActor:
    """Serves one tenant's calls (see module docs). Created and run by the runtime."""

    def __init__(
        self,
        config: TenantConfig,
        engine: SandboxEngine,
        batcher: Batcher,
        limiter: trio.CapacityLimiter,
    ) -> None:
        self.config = config
        self.engine = engine
        self.batcher = batcher
        self.limiter = limiter
        self.state = TenantState(
            config.name,
            config.models,
            default_model=config.default_model,
            limits=config.guest_limits,
            forward=self._forward,
        )
        self._idle: list[GuestInstance] = []
        self._slots = trio.Semaphore(config.max_concurrent_calls)
        self._restarts: list[float] = []
        self.failed_until = 0.0
        self.failed_reason = ""
        self.restart_at = 0.0  # after a crash, no new instance before this (backoff)
        self.calls = self.errors = self.tokens = 0
        self.busy_seconds = 0.0
        self.in_flight = 0
        self.last_used = time.monotonic()
        self._active: set[CallContext] = set()  # contexts of the calls running now

    # --- the guest's forward import, bridged to the Trio batcher ------------------------------

    def _forward(self, model: Model, work: Any) -> list[np.ndarray | None]:
        try:
            return trio.from_thread.run(
                partial(
                    self.batcher.forward,
                    model,
                    work,
                    tenant=self.config.name,
                    weight=self.config.weight,
                )
            )
        except trio.Cancelled:
            raise CallCancelled("cancelled while waiting for its forward step") from None

    # --- instances and supervision ------------------------------------------------------------

    def _instance(self) -> GuestInstance:
        while self._idle:
            inst = self._idle.pop()
            if not inst.broken:
                return inst
        return GuestInstance(self.engine, self.config.module, self.state)

    def _record_restart(self, why: str) -> None:
        now = time.monotonic()
        period = self.config.restart_period_seconds
        self._restarts = [t for t in self._restarts if now - t < period] + [now]
        # backoff: the next instance starts later the more often this tenant crashed lately
        backoff = self.config.restart_backoff_seconds * 2 ** (len(self._restarts) - 1)
        self.restart_at = now + min(backoff, 2.0)
        if len(self._restarts) > self.config.max_restarts:
            self.failed_until = now + self.config.cooldown_seconds
            self.failed_reason = (
                f"tenant {self.config.name!r} restarted {len(self._restarts)} times in "
                f"{period:.0f} s (last: {why})"
            )

    def check_available(self) -> None:
        if time.monotonic() < self.failed_until:
            raise TenantUnavailable(self.failed_reason)
        if self.failed_until:
            self.failed_until, self._restarts = 0.0, []

    def reset(self) -> None:
        """Operator action: clear a failed state now."""
        self.failed_until, self._restarts, self.failed_reason = 0.0, [], ""
        self.restart_at = 0.0

    # --- calls ---------------------------------------------------------------------------------

    async def call(
        self, function: str, params: Any, on_event: Callable[[Event], None] | None = None
    ) -> dict[str, Any]:
        """Run one call to completion; ``on_event`` receives its token events (in Trio)."""
        self.check_available()
        self.in_flight += 1
        try:
            return await self._call(function, params, on_event)
        finally:
            self.in_flight -= 1
            self.last_used = time.monotonic()

    async def _call(
        self, function: str, params: Any, on_event: Callable[[Event], None] | None
    ) -> dict[str, Any]:
        waiting = self._slots.statistics().tasks_waiting
        if self._slots.value == 0 and waiting >= self.config.max_queued_calls:
            raise Overloaded(f"tenant {self.config.name!r} has {waiting} calls waiting for a slot")
        await self._slots.acquire()
        try:
            return await self._call_in_slot(function, params, on_event)
        finally:
            self._slots.release()

    async def _call_in_slot(
        self, function: str, params: Any, on_event: Callable[[Event], None] | None
    ) -> dict[str, Any]:
        t_start = time.perf_counter()
        if not self._idle and (delay := self.restart_at - time.monotonic()) > 0:
            await trio.sleep(delay)  # restart backoff: a new instance after a recent crash
        inst = await trio.to_thread.run_sync(self._instance, limiter=self.limiter)
        index = 0
        t_first = 0.0
        token = trio.lowlevel.current_trio_token()

        def emit(text: str) -> bool:  # in the guest's thread
            nonlocal index, t_first
            if index == 0:
                t_first = time.perf_counter()
            if on_event is not None:
                # fire and forget: the guest goes on sampling while Trio delivers the event.
                # Trio runs these callbacks in order, and the call's own completion is queued
                # behind them, so the events of a call always arrive before its result.
                ev = Event("token", {"token": text, "index": index})
                token.run_sync_soon(_deliver, on_event, ev)
            index += 1
            return True

        seed = params.get("seed") if isinstance(params, dict) else None
        ctx = CallContext(seed=seed if isinstance(seed, int) and seed >= 0 else None,
                          on_emit=emit)  # fmt: skip
        t0 = time.perf_counter()
        self.calls += 1
        self._active.add(ctx)
        try:
            result = await self._in_thread(inst, function, params, ctx)
        finally:
            self._active.discard(ctx)
            self.busy_seconds += time.perf_counter() - t0
            if not inst.broken:
                self._idle.append(inst)
        usage = result.get("usage") if isinstance(result, dict) else None
        if isinstance(usage, dict):
            self.tokens += int(usage.get("completion_tokens") or 0)
        if isinstance(result, dict) and index:
            _add_timings(result, t_start, t_first, time.perf_counter(), index)
        return result

    def _guest_call(
        self, inst: GuestInstance, function: str, params: Any, ctx: CallContext
    ) -> dict[str, Any]:
        """In the worker thread: the call, its errors counted here (whatever Trio does with
        the outcome of a cancelled call), a trap recorded against the restart intensity."""
        try:
            return inst.call(function, params, ctx)
        except GuestTrap as e:
            self.errors += 1
            trio.from_thread.run_sync(self._record_restart, str(e))
            raise
        except RealmError:
            self.errors += 1
            raise

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
            first = _first(failed) if failed is not None else None
            if cancelled is not None:  # the caller was cancelled: that is what propagates
                raise _first(cancelled) from None
            if first is not None and len(failed.exceptions) == 1:  # type: ignore[union-attr]
                raise first from None
            raise
        return result

    def cancel_all(self) -> None:
        """Ask every running call's guest to stop (shutdown past its grace period)."""
        for ctx in list(self._active):
            ctx.cancel.set()

    def close(self) -> None:
        self.state.close()
        for inst in self._idle:
            inst.close()
        self._idle.clear()

    def statistics(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "completion_tokens": self.tokens,
            "tokens_per_second": (
                self.tokens / self.busy_seconds if self.busy_seconds else math.nan
            ),
            "sessions": len(self.state.sessions),
            "in_flight": self.in_flight,
            "failed": time.monotonic() < self.failed_until,
        }


def _deliver(on_event: Callable[[Event], None], ev: Event) -> None:
    """Run a token event's callback in Trio; an exception from it must not reach Trio's
    scheduler (it would end the run), so it is logged."""
    try:
        on_event(ev)
    except Exception:
        log.exception("a token event callback failed")


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


__all__ = ["Event", "Session", "TenantActor", "TenantConfig"]
