"""The batch scheduler: every tenant's forward steps on a model, run as one batched step.

Guests run in worker threads; their ``forward`` host import calls
``Batcher.forward_from_thread``, which queues the step (one ``trio.from_thread.run_sync``) and
waits on a threading event that the step's worker thread sets as soon as the logits exist
(async callers use ``Batcher.forward``). One Trio task per runtime gathers
what is queued and runs it as ONE ``Model.step`` per model in a worker thread (the native call
releases the GIL), through the native pool's gate (``realm.sandbox.COMPUTE``): a step waits at
most for the guest kernel chunk running now, never behind a guest's whole product. Guests
submit independently, so a batcher that ran whatever happened to be queued would run
half-empty batches; this one knows which sessions stepped last time (they are
mid-generation) and waits for them, up to ``gather_seconds``, before it runs a step.

When a round holds more work than one step's token budget (long prefills, many tenants), the
order of the steps is weighted fair queuing across tenants (start-time fair queuing): each
request gets a virtual start tag ``max(clock, tenant's last finish)`` and a finish tag
``start + tokens / weight``; steps take requests in start-tag order. A tenant flooding the
runtime with prefills therefore cannot push another tenant's decode step behind its own
backlog, and a tenant of weight 2 gets twice the tokens of a tenant of weight 1 under
contention.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import numpy as np
import trio

from .._errors import CallCancelled
from ..model import Model, Session
from ..sandbox import COMPUTE

GATHER_SECONDS: Final = 0.002  # how long a step waits for sessions that are mid-generation
PREFILL_CHUNK: Final = 256  # a longer step is split so other tenants' decode steps interleave
MAX_BATCH_TOKENS: Final = 2048  # a step's token budget; long prefills are chunked to fit
# a guest thread waiting for its step is woken by its call's cancel (``wake``); it also looks
# at the call's cancel flag and deadline this often
WAIT_POLL_SECONDS: Final = 0.05
# While some sessions decode, a step carries at most as many prefill tokens as cost this many
# decode-only steps more: a tenant flooding the runtime with prefills (the most tokens the ABI
# lets one forward call take, in a loop) adds at most that to every other tenant's token gap.
LATENCY_FACTOR: Final = 1.0
DECODE_TOKENS: Final = 4  # a request of at most this many tokens is a decode step
MIN_PREFILL_TOKENS: Final = 8  # a step carries at least this much of a waiting prefill
DECODING_SECONDS: Final = 0.5  # decode steps this recent mean sessions are decoding
EMA: Final = 0.2  # weight of the newest step in the step-cost estimates


@attrs.define(eq=False)
class _Request:
    model: Model
    session: Session
    tokens: np.ndarray
    mode: str
    tenant: str = ""
    weight: float = 1.0
    caller: int = 0  # the guest call's thread: its sessions step one at a time (0: unknown)
    vstart: float | None = None  # fair-queuing start tag (set once, when first queued)
    done: trio.Event = attrs.field(factory=trio.Event)
    waiter: threading.Event | None = None  # a guest thread's: set when finished (or cancelled)
    finished: bool = False  # result or error is set (for the guest thread)
    result: Any = None
    error: BaseException | None = None

    def finish(self) -> None:
        """Wake whoever waits (in Trio, and a guest thread): result or error is set."""
        self.finished = True
        self.done.set()
        if self.waiter is not None:
            self.waiter.set()


@attrs.frozen
class BatcherStatistics:
    steps: int
    sequences: int  # sequence-steps run
    tokens: int
    mean_batch_size: float
    max_batch_size: int
    step_seconds_mean: float
    queued: int


class Batcher:
    """Runs queued forward steps of many sessions as batched native steps (see module docs)."""

    def __init__(
        self,
        *,
        gather_seconds: float = GATHER_SECONDS,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        prefill_chunk: int = PREFILL_CHUNK,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.gather_seconds = gather_seconds
        self.prefill_chunk = prefill_chunk
        self.max_batch_tokens = max_batch_tokens
        # unbounded: each guest call has at most one step queued, and the calls are bounded
        self._send, self._recv = trio.open_memory_channel[_Request](math.inf)
        self._limiter = limiter or trio.CapacityLimiter(1)
        self._recent: set[int] = set()  # id(session) of sessions in the last step
        self._recent_caller: dict[int, int] = {}  # id(session) -> its caller in that step
        self._in_flight: list[_Request] = []
        self._last_step = 0.0
        self.closed = False
        self._steps = self._seqs = self._tokens = self._max = 0
        self._step_time = 0.0
        self._vclock = 0.0  # virtual time: the start tag of the last request served
        self._vfinish: dict[str, float] = {}  # tenant -> finish tag of its last request
        self._carry: list[_Request] = []  # prefills left out of the last round (budget)
        self._costs: dict[int, _StepCost] = {}  # id(model) -> what its steps cost

    # --- queuing steps: from Trio (forward) and from guest worker threads ---------------------

    async def forward(
        self,
        model: Model,
        work: Sequence[tuple[Session, np.ndarray, str]],
        *,
        tenant: str = "",
        weight: float = 1.0,
        caller: int = 0,
    ) -> list[Any]:
        """Queue steps and wait for their logits (the ``TenantState.forward`` contract).

        ``tenant`` and ``weight`` (its share under contention, > 0) drive the fair queuing.
        ``caller`` names the guest call (its thread): a call steps one session at a time, so
        the gather never waits for a session whose call has a step queued already (a
        speculative call alternating its draft and target sessions).
        """
        if not weight > 0:
            raise ValueError(f"weight must be > 0, not {weight!r}")
        if self.closed:
            raise CallCancelled("the runtime is shut down")
        out = []
        for session, tokens, mode in work:
            # a long prefill goes in chunks, each its own step shared with everyone's decode
            # steps, so a 2000-token prompt never stalls other tenants' streams for long
            ids = np.asarray(tokens, np.int32)
            pieces = []
            i = 0
            while i < len(ids):
                r = self._submit(model, session, ids, i, mode, tenant, weight, caller)
                await r.done.wait()
                if r.error is not None:
                    raise r.error
                pieces.append(r.result)
                i += len(r.tokens)
            out.append(_joined(pieces, mode))
        return out

    def forward_from_thread(
        self,
        model: Model,
        work: Sequence[tuple[Session, np.ndarray, str]],
        *,
        tenant: str = "",
        weight: float = 1.0,
        caller: int = 0,
        cancelled: Callable[[], bool] = lambda: False,
        wake: Callable[[threading.Event | None], None] = lambda event: None,
    ) -> list[Any]:
        """``forward`` for a guest's worker thread (one started by ``trio.to_thread``): each
        step (prefill chunk) is queued with one ``trio.from_thread.run_sync`` and its logits
        taken as soon as the step's worker thread has them, without a round trip through the
        Trio loop (eight tenants' results used to wait for the loop to finish each one's
        task: about a quarter of the time between steps). ``wake(event)`` is given the event
        the thread waits on (None when it stops waiting): setting it (the call's cancel) makes
        the thread look at ``cancelled()``, which it also does every ``WAIT_POLL_SECONDS``;
        once that is true the wait ends with CallCancelled (the step may still run; its
        result is dropped)."""
        if not weight > 0:
            raise ValueError(f"weight must be > 0, not {weight!r}")
        out = []
        for session, tokens, mode in work:
            ids = np.asarray(tokens, np.int32)
            pieces = []
            i = 0
            while i < len(ids):
                try:
                    r = trio.from_thread.run_sync(
                        self._submit, model, session, ids, i, mode, tenant, weight, caller, True
                    )
                except trio.RunFinishedError:
                    raise CallCancelled("the runtime is shut down") from None
                assert r.waiter is not None
                wake(r.waiter)
                try:
                    while not r.finished:
                        r.waiter.wait(WAIT_POLL_SECONDS)
                        if not r.finished and cancelled():
                            raise CallCancelled("cancelled while waiting for its forward step")
                        r.waiter.clear()  # a wake that was not the end (finished is checked)
                finally:
                    wake(None)
                if r.error is not None:
                    raise r.error
                pieces.append(r.result)
                i += len(r.tokens)
            out.append(_joined(pieces, mode))
        return out

    def _submit(
        self, model: Model, session: Session, ids: np.ndarray, i: int, mode: str, tenant: str,
        weight: float, caller: int, thread: bool = False,
    ) -> _Request:  # fmt: skip
        """In Trio: queue the chunk of ``ids`` from ``i`` (for a guest thread: with its
        waiter). While others decode, a chunk is no bigger than what a step may carry
        (``prefill_budget``)."""
        if self.closed:
            raise CallCancelled("the runtime is shut down")
        size = min(self.prefill_chunk, self.prefill_budget(model) or self.prefill_chunk)
        chunk = ids[i : i + size]
        last = i + len(chunk) >= len(ids)
        r = _Request(
            model, session, chunk, mode if last or mode in ("all", "verify") else "none",
            tenant=tenant, weight=weight, caller=caller,
            waiter=threading.Event() if thread else None,
        )  # fmt: skip
        try:
            self._send.send_nowait(r)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise CallCancelled("the runtime is shut down") from None
        return r

    # --- the scheduler task ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            async with self._recv:
                while True:
                    batch, self._carry = self._carry, []
                    self._in_flight = batch  # failed at shutdown, gathered or not
                    if not batch:
                        batch.append(await self._recv.receive())
                    await self._gather(batch)
                    await self._run_batch(batch)
        finally:  # stopping: nothing may wait for a step that will never run
            self.closed = True
            for r in self._pending:
                if not r.done.is_set():
                    r.error = CallCancelled("the runtime is shut down")
                    r.finish()

    @property
    def _pending(self) -> list[_Request]:
        pending = list(self._in_flight) + self._carry
        while True:
            try:
                pending.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.ClosedResourceError, trio.EndOfChannel):
                return pending

    async def _gather(self, batch: list[_Request]) -> None:
        """Add what is queued; wait a little for sessions that stepped last time."""
        # a session that misses a step costs a whole extra pass over the weights, so the wait
        # for laggards grows with the step time (15% of the last step, at least gather_seconds)
        deadline = trio.current_time() + max(self.gather_seconds, 0.15 * self._last_step)
        while True:
            while True:
                try:
                    batch.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            callers = {r.caller for r in batch if r.caller}
            waiting = {
                s
                for s in self._recent - {id(r.session) for r in batch}
                if self._recent_caller.get(s, 0) not in callers
            }
            if not waiting or trio.current_time() >= deadline:
                return
            with trio.move_on_at(deadline):
                batch.append(await self._recv.receive())

    async def _run_batch(self, batch: list[_Request]) -> None:
        self._in_flight = batch
        by_model: dict[int, list[_Request]] = {}
        for r in batch:
            by_model.setdefault(id(r.model), []).append(r)
        self._tag([r for r in batch if r.vstart is None])  # carried requests keep theirs
        run: list[_Request] = []
        for reqs in by_model.values():
            ordered = sorted(reqs, key=_start_tag)
            kept, carried = self._within_budget(ordered)
            self._carry += carried
            run += kept
            for chunk in self._chunks(kept):
                await self._step(chunk)
                self._vclock = max(self._vclock, max(_start_tag(r) for r in chunk))
        self._recent = {id(r.session) for r in run}
        self._recent_caller = {id(r.session): r.caller for r in run if r.caller}
        self._in_flight = []

    # --- the latency budget: prefill tokens a step may carry while others decode ---------------

    def prefill_budget(self, model: Model) -> int | None:
        """Prefill tokens one step may carry now (None: no limit): while sessions decode,
        what costs ``LATENCY_FACTOR`` decode-only steps more, measured on this model's steps."""
        cost = self._costs.get(id(model))
        if cost is None or not cost.decoding(trio.current_time()):
            return None
        return cost.budget()

    def _within_budget(self, reqs: list[_Request]) -> tuple[list[_Request], list[_Request]]:
        """The requests of one model this round runs, in order, and those it leaves to the
        next: while any of them decodes, the prefill tokens of the round stay within budget
        (at least the first prefill runs, so every prefill progresses)."""
        if not any(int(r.tokens.shape[0]) <= DECODE_TOKENS for r in reqs):
            return reqs, []
        budget = self.prefill_budget(reqs[0].model)
        if budget is None:
            return reqs, []
        kept, carried, used = [], [], 0
        for r in reqs:
            n = int(r.tokens.shape[0])
            if n <= DECODE_TOKENS or used == 0 or used + n <= budget:
                kept.append(r)
                used += 0 if n <= DECODE_TOKENS else n
            else:
                carried.append(r)
        return kept, carried

    def _tag(self, batch: list[_Request]) -> None:
        """Start-time fair queuing tags, in arrival order (see the module docs)."""
        for r in batch:
            start = max(self._vclock, self._vfinish.get(r.tenant, 0.0))
            r.vstart = start
            self._vfinish[r.tenant] = start + int(r.tokens.shape[0]) / r.weight
        if len(self._vfinish) > 256:  # forget tenants whose backlog is served
            self._vfinish = {t: f for t, f in self._vfinish.items() if f > self._vclock}

    def _chunks(self, reqs: list[_Request]) -> list[list[_Request]]:
        """Split into steps within the token budget; a session appears once per step."""
        out: list[list[_Request]] = []
        cur: list[_Request] = []
        seen: set[int] = set()
        budget = 0
        for r in reqs:
            n = int(r.tokens.shape[0])
            if cur and (budget + n > self.max_batch_tokens or id(r.session) in seen):
                out.append(cur)
                cur, seen, budget = [], set(), 0
            cur.append(r)
            seen.add(id(r.session))
            budget += n
        if cur:
            out.append(cur)
        return out

    async def _step(self, reqs: list[_Request]) -> None:
        model = reqs[0].model
        t0 = time.perf_counter()
        try:
            results = await trio.to_thread.run_sync(_gated_step, model, reqs, limiter=self._limiter)
        except BaseException as e:  # a bad request must not take the others down: retry alone
            if len(reqs) > 1 and isinstance(e, Exception):
                for r in reqs:
                    await self._step([r])
                return
            for r in reqs:
                r.error = e
                r.finish()
            if not isinstance(e, Exception):
                raise
            return
        self._last_step = time.perf_counter() - t0
        self._step_time += self._last_step
        self._costs.setdefault(id(model), _StepCost()).record(
            [int(r.tokens.shape[0]) for r in reqs], self._last_step, trio.current_time()
        )
        self._steps += 1
        self._seqs += len(reqs)
        self._tokens += sum(int(r.tokens.shape[0]) for r in reqs)
        self._max = max(self._max, len(reqs))
        for r, res in zip(reqs, results, strict=True):
            r.result = res
            r.finish()

    def statistics(self) -> BatcherStatistics:
        steps = self._steps
        return BatcherStatistics(
            steps=steps,
            sequences=self._seqs,
            tokens=self._tokens,
            mean_batch_size=self._seqs / steps if steps else math.nan,
            max_batch_size=self._max,
            step_seconds_mean=self._step_time / steps if steps else math.nan,
            queued=self._send.statistics().current_buffer_used,
        )


def _joined(pieces: list[Any], mode: str) -> Any:
    """One request's result from its chunks' (every position's logits, or the last's)."""
    if mode in ("all", "verify") and len(pieces) > 1:
        return np.concatenate(pieces, axis=0)
    return pieces[-1]


def _start_tag(r: _Request) -> float:
    assert r.vstart is not None
    return r.vstart


@attrs.define
class _StepCost:
    """What one model's steps cost: a decode-only step, and each prefill token above it."""

    fixed: float | None = None  # seconds of a decode-only step (moving average)
    per_token: float | None = None  # seconds per prefill token above that
    decoded_at: float = -1e9  # trio time of the last step with a decode request

    def record(self, tokens: list[int], seconds: float, now: float) -> None:
        prefill = sum(n for n in tokens if n > DECODE_TOKENS)
        if any(n <= DECODE_TOKENS for n in tokens):
            self.decoded_at = now
        if not prefill:
            self.fixed = seconds if self.fixed is None else (1 - EMA) * self.fixed + EMA * seconds
        elif self.fixed is not None and prefill >= 2 * MIN_PREFILL_TOKENS:
            each = max(0.0, seconds - self.fixed) / prefill
            self.per_token = (
                each if self.per_token is None else ((1 - EMA) * self.per_token + EMA * each)
            )

    def decoding(self, now: float) -> bool:
        return now - self.decoded_at < DECODING_SECONDS

    def budget(self) -> int | None:
        if self.fixed is None or not self.per_token or self.per_token <= 1e-7:
            return None
        return max(MIN_PREFILL_TOKENS, int(LATENCY_FACTOR * self.fixed / self.per_token))


def _gated_step(model: Model, reqs: list[_Request]) -> list[Any]:
    """One batched step, ahead of guests' kernel work on the native pool (``COMPUTE``). The
    guest threads waiting for these steps get their logits here, in the step's thread, at once
    (the Trio side sets the same results again, for async callers and the statistics)."""
    with COMPUTE.forward_step():
        results = model.step([(r.session, r.tokens, r.mode) for r in reqs])  # type: ignore[misc]
    for r, res in zip(reqs, results, strict=True):
        if r.waiter is not None:
            r.result = res
            r.finished = True
            r.waiter.set()
    return results
