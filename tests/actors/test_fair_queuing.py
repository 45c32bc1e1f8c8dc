"""Weighted fair queuing in the batch scheduler, on a stand-in model that records its steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from realm.actors._batcher import Batcher


class RecordingModel:
    """Stands in for ``Model.step``: records which tenant's sessions each step ran."""

    def __init__(self) -> None:
        self.steps: list[list[str]] = []

    def step(self, work: list[tuple[object, np.ndarray, str]]) -> list[np.ndarray]:
        self.steps.append([s.tenant for s, _, _ in work])  # type: ignore[attr-defined]
        return [np.zeros((1, 4), np.float32) for _ in work]


class FakeSession:
    def __init__(self, tenant: str) -> None:
        self.tenant = tenant


async def _serve(batcher: Batcher, model: RecordingModel, requests: list[tuple[str, int, float]]):
    """Queue every request first, then let the batcher run them all."""
    async with trio.open_nursery() as nursery:

        async def one(tenant: str, n: int, weight: float) -> None:
            work = [(FakeSession(tenant), np.zeros(n, np.int32), "last")]
            await batcher.forward(model, work, tenant=tenant, weight=weight)  # type: ignore[arg-type]

        for tenant, n, weight in requests:
            nursery.start_soon(one, tenant, n, weight)
            await trio.testing.wait_all_tasks_blocked()  # arrival order = list order
        await nursery.start(batcher.run)
        while sum(len(s) for s in model.steps) < len(requests):
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_a_flooding_tenant_does_not_push_another_behind_its_backlog() -> None:
    with trio.fail_after(10):
        model = RecordingModel()
        batcher = Batcher(gather_seconds=0.0, max_batch_tokens=256, prefill_chunk=256)
        # eight 200-token prefills of tenant "flood" arrive before one decode step of "calm"
        await _serve(batcher, model, [("flood", 200, 1.0)] * 8 + [("calm", 1, 1.0)])
        assert len(model.steps) == 8  # one prefill per step (the token budget)
        first = next(i for i, s in enumerate(model.steps) if "calm" in s)
        assert first == 0, model.steps  # FIFO would run it last, in step 8


async def test_weights_share_the_steps_under_contention() -> None:
    with trio.fail_after(10):
        model = RecordingModel()
        batcher = Batcher(gather_seconds=0.0, max_batch_tokens=100, prefill_chunk=100)
        reqs = [("heavy", 100, 2.0)] * 12 + [("light", 100, 1.0)] * 12
        await _serve(batcher, model, reqs)
        assert all(len(s) == 1 for s in model.steps)
        order = [s[0] for s in model.steps]
        first9 = order[:9]
        assert first9.count("heavy") == 6 and first9.count("light") == 3, order


async def test_equal_weights_alternate() -> None:
    with trio.fail_after(10):
        model = RecordingModel()
        batcher = Batcher(gather_seconds=0.0, max_batch_tokens=50, prefill_chunk=50)
        await _serve(batcher, model, [("a", 50, 1.0)] * 4 + [("b", 50, 1.0)] * 4)
        order = [s[0] for s in model.steps]
        assert order == ["a", "b"] * 4, order


async def test_weight_must_be_positive() -> None:
    batcher = Batcher()
    with pytest.raises(ValueError, match="weight"):
        await batcher.forward(RecordingModel(), [], tenant="t", weight=0)  # type: ignore[arg-type]


async def test_a_bad_tenant_weight_fails_when_the_runtime_opens(tmp_path: Path) -> None:
    import realm
    from realm.testing import write_test_model

    path = write_test_model(tmp_path / "tiny.gguf")
    with pytest.raises(realm.TenantUnavailable, match="weight"):
        async with realm.open_runtime(models={"m": path}, tenants={"t": {"weight": 0}}):
            pass
    async with realm.open_runtime(models={"m": path}, tenants={"t": {}}) as rt:
        with pytest.raises(realm.TenantUnavailable, match="weight"):
            rt.add_tenant("u", weight="heavy")
