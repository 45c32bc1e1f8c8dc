"""Shared compute: who may use the kernel pool (and the GIL) when, and guests' work in slices.

The native pool runs one job at a time, and a forward step is hundreds of jobs. A guest that
called ``matmul_f32`` on a 2048^3 problem held the pool for the whole product, and a guest
looping on it made every forward step wait for one of its products per job: 7-13 s per step.
Python work is shared the same way through the GIL: a guest tokenizing a megabyte in a loop
slowed every other tenant's host imports, its batched steps and the event loop. So all heavy
work a guest asks of the host goes through one gate (``COMPUTE``, one per process, as the
pool and the GIL are), in slices of about ``SLICE_SECONDS``:

- forward steps (the batcher's, or a tenant's own) enter with ``forward_step()``: they wait
  only for the guest slice running now, never for a queue of them;
- a guest slice starts only when no step runs and none waits (a step that waits lets one
  slice through after ``STARVATION_SECONDS``, so guests are slowed, not starved), one guest
  slice at a time, in the order they asked;
- while other tenants are stepping (a step ran in the last ``CONTENTION_SECONDS``), guests
  together get at most ``GUEST_SHARE`` of the time: after a slice of d seconds the next one
  waits d * (1 - share) / share. Alone, a guest runs at full speed;
- a guest running wasm for long stretches (a loop that never calls the host) is paused by the
  epoch callback so that, while others are stepping, it keeps to ``WASM_SHARE`` of the time
  (``wasm_pause``; ``_deadline``);
- a native kernel runs in chunks sized to take one slice (``chunked_matmul``,
  ``chunked_attention``; the size adapts to the time the last chunk took); Python work runs in
  ``guest_python(ctx)``, where a profile hook ends the slice after ``SLICE_SECONDS`` and waits
  its turn before going on;
- the call's cancel flag and deadline are checked between slices (``Interrupted`` ends Python
  work early; a kernel returns what it finished).

Work is counted in units of about one multiply-add of native compute; the per-import rates
below charge Python-side work (tokenizing, decoding) by its measured time in the same units.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import attrs
import numpy as np

from .. import kernels
from .._errors import CallCancelled

if TYPE_CHECKING:
    from ._context import CallContext

SLICE_SECONDS: Final = 0.002  # a guest's native chunk or Python slice aims at this long
GUEST_SHARE: Final = 0.25  # of the time, for all guests' heavy work while others step
CONTENTION_SECONDS: Final = 0.05  # a step this recent means other tenants are active
WASM_SHARE: Final = 0.25  # of the time, for one guest's long stretch of wasm while others step
WASM_SLICE_SECONDS: Final = 0.005  # wasm run without a host call before it counts as a stretch
MAX_WASM_PAUSE_SECONDS: Final = 0.1
STARVATION_SECONDS: Final = 0.05  # a guest slice waits at most this long for waiting steps
POLL_SECONDS: Final = 0.01  # a waiting guest looks at its call's cancel flag this often
FIRST_CHUNK_WORK: Final = 1 << 26  # multiply-adds of a guest's first matmul chunk
HOOK_EVERY: Final = 64  # profile events between two looks at the clock in guest_python
# what one unit of Python-side work costs, in work units (measured: 4 us per byte tokenized)
TOKENIZE_WORK_PER_BYTE: Final = 1 << 18
DECODE_WORK_PER_ID: Final = 1 << 15
TEMPLATE_WORK_PER_BYTE: Final = 1 << 16
DETOKENIZE_WORK: Final = 1 << 14  # one detokenize call
# attention's cost is per score (a query row against a cached position, per head) more than
# per multiply-add: ~20 ns each whatever head_dim, measured
ATTENTION_WORK_PER_SCORE: Final = 1 << 10
MAX_ATTENTION_QUERY_SCORES: Final = 1 << 18  # n_heads * n_kv of one query: ~5 ms
MAX_ATTENTION_SCORES: Final = 1 << 22  # n_kv * (n_heads / n_kv_heads): the kernel's buffer


class Interrupted(BaseException):
    """Raised inside ``guest_python`` when its call is cancelled or past its deadline.

    A BaseException, so that no ``except Exception`` of the code it interrupts swallows it.
    """


@attrs.frozen
class ComputeStatistics:
    steps: int  # forward steps that went through the gate
    step_wait_seconds: float  # their total wait for a guest slice to end
    step_wait_max_seconds: float
    guest_slices: int
    guest_seconds: float  # time guests' slices ran
    paced_seconds: float  # time guests waited for their share


class ComputeGate:
    """Orders forward steps and guests' heavy work (see module docs)."""

    def __init__(
        self,
        *,
        share: float = GUEST_SHARE,
        slice_seconds: float = SLICE_SECONDS,
        starvation_seconds: float = STARVATION_SECONDS,
    ) -> None:
        self.share = share
        self.slice_seconds = slice_seconds
        self.starvation_seconds = starvation_seconds
        self._cond = threading.Condition()
        self._steps_running = 0
        self._steps_waiting = 0
        self._last_step_end = -1e9
        self._guest_running = False
        self._next_guest = 0.0  # time.monotonic() before which no guest slice starts (share)
        self._queue: collections.deque[object] = collections.deque()  # guests, in order
        self._steps = self._slices = 0
        self._wait = self._wait_max = self._guest_time = self._paced = 0.0

    @contextlib.contextmanager
    def forward_step(self) -> Iterator[None]:
        """Run a forward step: after the guest slice running now, ahead of every other."""
        t0 = time.perf_counter()
        with self._cond:
            self._steps_waiting += 1
            try:
                while self._guest_running:
                    self._cond.wait()
            finally:
                self._steps_waiting -= 1
            self._steps_running += 1
            waited = time.perf_counter() - t0
            self._steps += 1
            self._wait += waited
            self._wait_max = max(self._wait_max, waited)
        try:
            yield
        finally:
            with self._cond:
                self._steps_running -= 1
                self._last_step_end = time.monotonic()
                self._cond.notify_all()

    def _contended(self, now: float) -> bool:
        return bool(self._steps_running or self._steps_waiting) or (
            now - self._last_step_end < CONTENTION_SECONDS
        )

    def acquire_guest(self, ctx: CallContext) -> float:
        """Wait for a guest slice (see module docs); returns its start time. Raises
        CallCancelled when the call is cancelled (or past its deadline) while waiting."""
        me = object()
        with self._cond:
            self._queue.append(me)
            since = time.monotonic()
            try:
                while True:
                    now = time.monotonic()
                    blocked = (
                        self._queue[0] is not me
                        or self._guest_running
                        or self._steps_running
                        or (self._steps_waiting and now - since < self.starvation_seconds)
                    )
                    paced = not blocked and now < self._next_guest
                    if not blocked and not paced:
                        break
                    if ctx.cancelled():
                        raise CallCancelled("cancelled while waiting for its share of compute")
                    wait = POLL_SECONDS
                    if paced:
                        wait = min(wait, self._next_guest - now)
                        self._paced += wait
                    self._cond.wait(wait)
            finally:
                self._queue.remove(me)
                self._cond.notify_all()
            self._guest_running = True
            self._slices += 1
            return time.monotonic()

    def release_guest(self, start: float) -> None:
        with self._cond:
            now = time.monotonic()
            took = now - start
            self._guest_time += took
            self._guest_running = False
            if self._contended(now):  # others are stepping: keep guests to their share
                self._next_guest = now + took * (1.0 - self.share) / self.share
            self._cond.notify_all()

    @contextlib.contextmanager
    def guest_chunk(self, ctx: CallContext) -> Iterator[None]:
        """One slice of a guest's native work (a kernel chunk)."""
        start = self.acquire_guest(ctx)
        try:
            yield
        finally:
            self.release_guest(start)

    @contextlib.contextmanager
    def guest_python(self, ctx: CallContext) -> Iterator[None]:
        """Python work of a guest's import, sliced: a profile hook in this thread ends a slice
        after ``slice_seconds`` and waits for the next, and raises ``Interrupted`` when the
        call is cancelled or past its deadline. Not reentrant."""
        try:
            start = self.acquire_guest(ctx)
        except CallCancelled:
            raise Interrupted from None
        state = [start, 0]
        limit = self.slice_seconds

        def hook(frame: Any, _event: str, _arg: Any) -> None:
            state[1] += 1
            if state[1] % HOOK_EVERY:
                return
            if _in_finalizer(frame):  # never raise or block inside a __del__ run by the GC
                state[1] -= 1  # check again at the next call
                return
            if ctx.cancelled():
                raise Interrupted
            if time.monotonic() - state[0] >= limit:  # end this slice, wait for the next
                self.release_guest(state[0])
                state[0] = -1.0
                try:
                    state[0] = self.acquire_guest(ctx)
                except CallCancelled:
                    raise Interrupted from None

        previous = sys.getprofile()
        sys.setprofile(hook)
        try:
            yield
        finally:
            sys.setprofile(previous)
            if state[0] >= 0:
                self.release_guest(state[0])

    def wasm_pause(self, ran: float) -> float:
        """How long a guest that ran ``ran`` seconds of wasm without calling the host pauses
        now: while others are stepping, long stretches keep to ``WASM_SHARE`` of the time."""
        if ran < WASM_SLICE_SECONDS or not self._contended(time.monotonic()):
            return 0.0
        with self._cond:
            self._paced += ran
        return min(MAX_WASM_PAUSE_SECONDS, ran * (1.0 - WASM_SHARE) / WASM_SHARE)

    def statistics(self) -> ComputeStatistics:
        with self._cond:
            return ComputeStatistics(
                self._steps, self._wait, self._wait_max, self._slices, self._guest_time,
                self._paced,
            )  # fmt: skip


COMPUTE: Final = ComputeGate()


# --- guests' kernels, in chunks of one slice each -----------------------------------------------


def _next_size(size: int, took: float, target: float, most: int) -> int:
    """The next chunk's size, scaled to take ``target`` seconds (at most 4x up or down)."""
    scale = min(4.0, max(0.25, target / max(took, 1e-6)))
    return max(1, min(most, int(size * scale)))


def matmul_work(rows: int, cols: int, batch: int) -> int:
    return rows * cols * batch


def chunked_matmul(
    ctx: CallContext, w: np.ndarray, x: np.ndarray, y: np.ndarray, gate: ComputeGate = COMPUTE
) -> bool:
    """``y[b, r] = sum_c w[r, c] x[b, c]`` in blocks of w's rows, each one guest slice.

    ``y`` (batch, rows) must not overlap ``w`` or ``x``. Returns False when the call was
    cancelled between chunks (``y`` then holds the blocks done so far).
    """
    rows, cols = w.shape
    batch = x.shape[0]
    per = max(1, FIRST_CHUNK_WORK // max(1, cols * batch))
    r0 = 0
    while r0 < rows:
        if ctx.cancelled():
            return False
        r1 = min(rows, r0 + per)
        try:
            with gate.guest_chunk(ctx):
                t0 = time.perf_counter()
                part = kernels.matmul(w[r0:r1], x)
                took = time.perf_counter() - t0
        except CallCancelled:
            return False
        y[:, r0:r1] = part
        per = _next_size(r1 - r0, took, gate.slice_seconds, rows)
        r0 = r1
    return True


def attention_scores(positions: np.ndarray, n_kv: int, n_heads: int) -> np.ndarray:
    """Scores each query computes: one per head per cached position it attends to."""
    return np.minimum(positions.astype(np.int64) + 1, n_kv) * n_heads


def attention_work(positions: np.ndarray, n_kv: int, n_heads: int, head_dim: int) -> int:
    scores = int(attention_scores(positions, n_kv, n_heads).sum())
    return scores * (2 * head_dim + ATTENTION_WORK_PER_SCORE)


def chunked_attention(
    ctx: CallContext,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    positions: np.ndarray,
    out: np.ndarray,
    gate: ComputeGate = COMPUTE,
) -> bool:
    """Causal attention in chunks of queries, each one guest slice (one query at least).

    ``out`` must not overlap the inputs; ``positions`` is the host's own copy. Returns False
    when the call was cancelled between chunks.
    """
    n_q, n_heads, _ = q.shape
    ends = np.cumsum(attention_scores(positions, k.shape[0], n_heads))
    budget = float(1 << 16)  # scores in the first chunk; then what took one slice
    i0 = 0
    while i0 < n_q:
        if ctx.cancelled():
            return False
        base = int(ends[i0 - 1]) if i0 else 0
        i1 = int(np.searchsorted(ends, base + budget, side="right"))
        i1 = min(n_q, max(i1, i0 + 1))
        try:
            with gate.guest_chunk(ctx):
                t0 = time.perf_counter()
                part = kernels.attention(q[i0:i1], k, v, positions[i0:i1])
                took = time.perf_counter() - t0
        except CallCancelled:
            return False
        out[i0:i1] = part
        done = int(ends[i1 - 1]) - base
        budget = float(_next_size(done, took, gate.slice_seconds, int(ends[-1])))
        i0 = i1
    return True


def _in_finalizer(frame: Any, depth: int = 12) -> bool:
    """Whether ``frame`` runs inside an object's ``__del__`` (the garbage collector can run one
    in any thread at any call): an exception raised there is lost and the object leaks."""
    while frame is not None and depth > 0:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
        depth -= 1
    return False
