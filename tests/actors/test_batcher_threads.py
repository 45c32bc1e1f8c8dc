"""``Batcher.forward_from_thread``: guest worker threads queue steps and take their logits from
the step's worker thread; a cancelled call stops waiting; shutdown releases every waiter."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import trio

from realm import CallCancelled
from realm.actors._batcher import Batcher


class SlowModel:
    """Stands in for ``Model.step``: each step takes ``seconds`` and returns the tokens + 1."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.steps: list[int] = []
        self.release = threading.Event()

    def step(self, work: list[tuple[object, np.ndarray, str]]) -> list[np.ndarray]:
        self.steps.append(len(work))
        if self.seconds:
            time.sleep(self.seconds)
        return [np.asarray(t, np.float32)[None, -1:] + 1 for _, t, _ in work]


class FakeSession:
    pass


async def _in_threads(batcher: Batcher, fn, n: int) -> list[object]:  # type: ignore[no-untyped-def]
    out: list[object] = [None] * n

    async def one(i: int) -> None:
        try:
            out[i] = await trio.to_thread.run_sync(fn, i)
        except Exception as e:
            out[i] = e

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        async with trio.open_nursery() as calls:
            for i in range(n):
                calls.start_soon(one, i)
        nursery.cancel_scope.cancel()
    return out


async def test_threads_get_their_own_logits_in_shared_steps() -> None:
    model, batcher = SlowModel(0.01), Batcher(gather_seconds=0.05)

    def call(i: int) -> float:
        work = [(FakeSession(), np.array([10 * i], np.int32), "last")]
        (logits,) = batcher.forward_from_thread(model, work, tenant=f"t{i}")  # type: ignore[arg-type]
        return float(np.asarray(logits).reshape(-1)[0])

    with trio.fail_after(10):
        out = await _in_threads(batcher, call, 6)
    assert out == [10.0 * i + 1 for i in range(6)]
    assert sum(model.steps) == 6 and len(model.steps) < 6  # shared steps


async def test_a_long_prefill_is_chunked_and_put_back_together() -> None:
    model, batcher = SlowModel(), Batcher(gather_seconds=0.0, prefill_chunk=4)

    def call(_: int) -> np.ndarray:
        work = [(FakeSession(), np.arange(10, dtype=np.int32), "all")]
        return batcher.forward_from_thread(model, work)[0]  # type: ignore[arg-type]

    with trio.fail_after(10):
        (out,) = await _in_threads(batcher, call, 1)
    assert model.steps == [1, 1, 1]  # 4 + 4 + 2 tokens
    assert np.asarray(out).reshape(-1).tolist() == [4.0, 8.0, 10.0]  # each chunk's last + 1


async def test_a_cancelled_call_stops_waiting() -> None:
    model, batcher = SlowModel(1.0), Batcher(gather_seconds=0.0)
    flag = threading.Event()

    def call(_: int) -> object:
        threading.Timer(0.05, flag.set).start()
        work = [(FakeSession(), np.array([1], np.int32), "last")]
        t0 = time.monotonic()
        with pytest.raises(CallCancelled, match="cancelled while waiting"):
            batcher.forward_from_thread(model, work, cancelled=flag.is_set)  # type: ignore[arg-type]
        return time.monotonic() - t0

    with trio.fail_after(10):
        (waited,) = await _in_threads(batcher, call, 1)
    assert isinstance(waited, float) and waited < 0.9  # not the whole 1 s step


async def test_a_cancel_wakes_the_waiting_thread_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``wake`` hands out the event the thread waits on: a cancel sets it (the actor's
    watch_cancel does), so the thread does not wait for its poll."""
    from realm.actors import _batcher

    monkeypatch.setattr(_batcher, "WAIT_POLL_SECONDS", 30.0)
    model, batcher = SlowModel(2.0), Batcher(gather_seconds=0.0)
    flag = threading.Event()
    waiting: list[threading.Event | None] = []

    def cancel_soon() -> None:
        time.sleep(0.1)
        flag.set()
        event = waiting[-1]
        assert event is not None
        event.set()

    def call(_: int) -> object:
        threading.Thread(target=cancel_soon).start()
        work = [(FakeSession(), np.array([1], np.int32), "last")]
        t0 = time.monotonic()
        with pytest.raises(CallCancelled):
            batcher.forward_from_thread(model, work, cancelled=flag.is_set, wake=waiting.append)  # type: ignore[arg-type]
        return time.monotonic() - t0

    with trio.fail_after(20):
        (waited,) = await _in_threads(batcher, call, 1)
    assert isinstance(waited, float) and waited < 1.5  # not the 2 s step, nor the 30 s poll
    assert waiting[-1] is None  # the thread said it stopped waiting


async def test_a_failing_step_reaches_only_its_caller() -> None:
    class Picky(SlowModel):
        def step(self, work):  # type: ignore[no-untyped-def]
            if any(int(t[-1]) == 13 for _, t, _ in work):
                raise ValueError("token 13")
            return super().step(work)

    model, batcher = Picky(), Batcher(gather_seconds=0.05)

    def call(i: int) -> object:
        work = [(FakeSession(), np.array([13 if i == 0 else i], np.int32), "last")]
        return batcher.forward_from_thread(model, work)[0]  # type: ignore[arg-type]

    with trio.fail_after(10):
        out = await _in_threads(batcher, call, 3)
    assert isinstance(out[0], ValueError) and "token 13" in str(out[0])
    assert [float(np.asarray(o).reshape(-1)[0]) for o in out[1:]] == [2.0, 3.0]


async def test_shutdown_releases_a_thread_whose_step_is_still_being_gathered() -> None:
    model, batcher = SlowModel(), Batcher(gather_seconds=30.0)
    batcher._recent = {1}  # waits for a session that "stepped last time" and never comes
    result: list[object] = []

    def call() -> None:
        work = [(FakeSession(), np.array([1], np.int32), "last")]
        try:
            batcher.forward_from_thread(model, work)  # type: ignore[arg-type]
        except CallCancelled as e:
            result.append(e)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            nursery.start_soon(trio.to_thread.run_sync, call)
            await trio.sleep(0.2)  # queued, and held by the gather
            assert model.steps == [] and not result
            batcher_scope = nursery.cancel_scope
            batcher_scope.cancel()
    assert len(result) == 1 and "shut down" in str(result[0])
    with pytest.raises(CallCancelled, match="shut down"):  # and later calls are refused
        await trio.to_thread.run_sync(
            lambda: batcher.forward_from_thread(model, [(FakeSession(), np.array([1]), "last")])
        )


def test_weight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="weight must be > 0"):
        Batcher().forward_from_thread(SlowModel(), [], weight=0)  # type: ignore[arg-type]
