"""The layer pager holds its budget over time: hundreds of passes, every access pattern.

The models here have ~4 MiB blocks (several page-cache granules each), so the budget decides
what is mapped. Memory is read from ``/proc/self/status`` (RssAnon + RssFile, the process)
and ``/proc/self/smaps`` (the Rss of one model's own mapping). A test fails on growth: an
evicted block that stayed mapped, or a copy that was not given back, adds a whole block
(more than ``GROWTH_SLACK``) to the process within a few passes. No timings are asserted.
"""

from __future__ import annotations

import gc
import random
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import trio

import realm
from realm.model import LayerPager, Model, ModelRegistry, PagerStatistics, PagingBudget
from realm.model._pager import GRANULE
from realm.testing import write_test_model

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="residency is read from /proc and madvise"
)

MIB = 1 << 20
SHAPE = {"n_layers": 8, "n_embd": 512, "n_heads": 8, "n_kv_heads": 4, "n_ff": 2048}
CAPACITY = 32  # session positions: filled (KV pages touched) in the warm-up passes
WARMUP = 40
GROWTH_SLACK = MIB  # less than a block (~4 MiB): a copy not given back shows
#: RssAnon besides the weights (never copied): KV caches, logits, step scratch, Python objects
ANON_SLACK = 8 * MIB
FILE_SLACK = 2 * GRANULE + MIB  # RssFile: edge granules, a library mapped on first use


def _rss() -> tuple[int, int]:
    """(RssAnon, RssFile) of this process, in bytes."""
    fields: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["RssAnon"], fields["RssFile"]


def _mapped(model: Model) -> int:
    """Resident bytes of ``model``'s own memory map of its file (smaps, by address)."""
    assert model.pager is not None
    m = model.pager._map
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if head:
                lo, hi = int(head[1], 16), int(head[2], 16)
                inside = m.base <= lo and hi <= m.end
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pager")
    return {
        "a": write_test_model(d / "a.gguf", wtype="Q8_0", seed=1, **SHAPE),
        "b": write_test_model(d / "b.gguf", wtype="Q8_0", seed=2, **SHAPE),
    }


def _stats(model: Model) -> PagerStatistics:
    assert model.pager is not None
    return model.pager.statistics()


def _settle(*models: Model) -> None:
    """Wait until no prefetch is in flight (mapped pages then match the accounting)."""
    for _ in range(2000):
        if all(not any(m.pager._loaders) and 1 not in m.pager._state for m in models):  # type: ignore[union-attr]
            return
        threading.Event().wait(0.001)
    raise AssertionError("prefetches did not finish")


class Watch:
    """RSS samples of the process after the warm-up, and checks of the models' mappings."""

    def __init__(self, *models: Model) -> None:
        self.models = models
        self.samples: list[tuple[int, int]] = []
        self.rest: list[int] = []  # the process but the models' mappings

    def sample(self) -> None:
        _settle(*self.models)
        anon, file = _rss()
        self.samples.append((anon, file))
        self.rest.append(anon + file - sum(_mapped(m) for m in self.models))
        for m in self.models:
            st = _stats(m)
            assert st.budget_resident_bytes <= st.max_resident_bytes, st
            assert not st.pinned_layers
            # the map holds the resident blocks and the fixed part (and a granule or two at
            # the edges of the embedding, whose rows are given back as each pass starts)
            assert _mapped(m) <= st.resident_bytes + st.fixed_bytes + 2 * GRANULE, st

    def check(self, baseline: tuple[int, int], budget: int) -> None:
        """No growth after the warm-up; no weights copied (RssAnon); file pages within the
        budget and the models' fixed bytes (RssFile)."""
        growth = max(self.rest) - self.rest[0]  # the mappings are checked at each sample
        assert growth <= GROWTH_SLACK, f"grew {growth / MIB:.1f} MiB over {len(self.rest)} samples"
        anon = max(a for a, _ in self.samples) - baseline[0]
        assert anon <= ANON_SLACK, f"RssAnon {anon / MIB:.1f} MiB above the baseline"
        file = max(f for _, f in self.samples) - baseline[1]
        limit = budget + _fixed(*self.models) + FILE_SLACK
        assert file <= limit, f"RssFile {file / MIB:.1f} MiB above the baseline > {limit / MIB}"


def _run(passes: int, step: Callable[[int], None], watch: Watch, every: int = 20) -> None:
    for i in range(WARMUP):
        step(i)
    watch.sample()
    for i in range(passes):
        step(WARMUP + i)
        if i % every == every - 1:
            watch.sample()


def _fixed(*models: Model) -> int:
    return sum(_stats(m).fixed_bytes for m in models)


@pytest.fixture
def baseline() -> Iterator[tuple[int, int]]:
    gc.collect()
    yield _rss()
    gc.collect()


def _decode(session: realm.Session, rng: np.random.Generator) -> None:
    if session.pos >= session.capacity:
        session.rewind(0)
    session.extend([int(rng.integers(3, 300))])


# --- the budget over time ----------------------------------------------------------------------


@pytest.mark.parametrize("share", [4, 2])
def test_decode_holds_the_budget_over_hundreds_of_passes(
    files: dict[str, Path], baseline: tuple[int, int], share: int
) -> None:
    probe = realm.load_model(files["a"], max_resident_bytes=0)
    budget = _stats(probe).pageable_bytes // share
    probe.close()
    model = realm.load_model(files["a"], max_resident_bytes=budget)
    rng = np.random.default_rng(0)
    watch = Watch(model)
    with model.open_session(capacity=CAPACITY) as s:
        _run(200, lambda _: _decode(s, rng), watch)
        st = _stats(model)
        assert st.evictions > 200 and st.bytes_paged > 200 * 4 * MIB  # it did page
        assert st.hits + st.misses == (WARMUP + 200) * 8
        watch.check(baseline, budget)
    model.close()


def test_prefill_and_batched_sessions_hold_the_budget(
    files: dict[str, Path], baseline: tuple[int, int]
) -> None:
    model = realm.load_model(files["a"], max_resident_bytes=12 * MIB)
    rng = np.random.default_rng(1)
    sessions = [model.open_session(capacity=CAPACITY) for _ in range(3)]

    def step(i: int) -> None:
        for s in sessions:
            if s.pos + 16 > s.capacity:
                s.rewind(0)
        if i % 4 == 0:  # a prefill of each session, batched
            work = [(s, rng.integers(3, 300, 16), "last") for s in sessions]
        else:  # a decode step of all three, or of one
            work = [(s, [int(rng.integers(3, 300))], "last") for s in sessions[: 1 + i % 3]]
        model.step(work)  # type: ignore[arg-type]

    watch = Watch(model)
    _run(100, step, watch)
    watch.check(baseline, 12 * MIB)
    for s in sessions:
        s.close()
    model.close()


def test_models_share_one_budget(files: dict[str, Path], baseline: tuple[int, int]) -> None:
    registry = ModelRegistry(max_resident_bytes=16 * MIB)
    a = registry.load("a", files["a"])
    b = registry.load("b", files["b"])
    assert a.pager is not None and b.pager is not None
    assert a.pager.budget is b.pager.budget is registry.budget
    rng = np.random.default_rng(2)
    sa, sb = a.open_session(capacity=CAPACITY), b.open_session(capacity=CAPACITY)

    def step(i: int) -> None:  # alternating, sometimes the same one twice
        _decode(sa if (i // 3) % 2 else sb, rng)
        if i % 5 == 0:
            a.embed(rng.integers(3, 300, 8))

    watch = Watch(a, b)
    _run(200, step, watch)
    watch.check(baseline, 16 * MIB)
    stats = registry.pager_statistics()
    assert set(stats) == {"a", "b"}
    for st in stats.values():
        assert st.max_resident_bytes == 16 * MIB and st.hits and st.misses and st.bytes_paged
    assert stats["a"].budget_resident_bytes == stats["b"].budget_resident_bytes <= 16 * MIB
    assert registry.budget is not None
    assert registry.budget.resident_bytes == stats["a"].resident_bytes + stats["b"].resident_bytes
    sa.close()
    sb.close()
    a.close()
    b.close()


def test_a_block_in_use_is_never_evicted(files: dict[str, Path]) -> None:
    budget = PagingBudget(10 * MIB)
    a = realm.load_model(files["a"], max_resident_bytes=budget)
    b = realm.load_model(files["b"], max_resident_bytes=budget)
    assert a.pager is not None and b.pager is not None
    a.pager.acquire(3)  # pinned, as during a step (or a guest's pin hint)
    rng = np.random.default_rng(3)
    with b.open_session(capacity=CAPACITY) as s:
        for _ in range(40):
            _decode(s, rng)
            st = _stats(a)
            assert 3 in st.resident_layers and st.pinned_layers == (3,)
    _settle(a, b)
    assert _mapped(a) >= a.pager.layer_bytes(3) - 2 * GRANULE  # still mapped
    a.pager.release(3)
    with b.open_session(capacity=CAPACITY) as s:
        for _ in range(10):
            _decode(s, rng)
    assert 3 not in _stats(a).resident_layers  # the idle model's block went first
    a.close()
    b.close()


def test_concurrent_steps_of_two_models_under_one_budget(files: dict[str, Path]) -> None:
    """Two models stepping at once in two threads (as a runtime's workers do) evict each
    other's blocks but never one in use: every pass gives the unpaged logits."""
    want = {k: realm.load_model(files[k], pack=False).logits([4, 5, 6]) for k in ("a", "b")}
    budget = PagingBudget(12 * MIB)
    models = {k: realm.load_model(files[k], max_resident_bytes=budget) for k in ("a", "b")}
    errors: list[BaseException] = []

    def run(k: str) -> None:
        try:
            for _ in range(40):
                np.testing.assert_array_equal(models[k].logits([4, 5, 6]), want[k])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    _settle(*models.values())
    assert budget.resident_bytes <= budget.max_resident_bytes
    for m in models.values():
        st = _stats(m)
        assert st.evictions and not st.pinned_layers
        assert _mapped(m) <= st.resident_bytes + st.fixed_bytes + 2 * GRANULE
        m.close()


def test_any_order_of_hooks_keeps_the_accounting(files: dict[str, Path]) -> None:
    """Acquire, release and prefetch in random orders from two threads (as guests' pin
    hints and concurrent steps of two models do): the budget is exceeded only by pinned
    blocks, and is held again once they are released."""
    budget = PagingBudget(14 * MIB)
    models = [
        realm.load_model(files["a"], max_resident_bytes=budget),
        realm.load_model(files["b"], max_resident_bytes=budget),
    ]
    pagers: list[LayerPager] = [m.pager for m in models]  # type: ignore[misc]
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        r = random.Random(seed)
        held: list[tuple[LayerPager, int]] = []
        try:
            for _ in range(600):
                p = r.choice(pagers)
                layer = r.randrange(p.n_layers)
                op = r.random()
                if op < 0.4 and len(held) < 2:
                    p.acquire(layer)
                    held.append((p, layer))
                elif op < 0.8 and held:
                    q, lay = held.pop(r.randrange(len(held)))
                    q.release(lay)
                else:
                    p.prefetch(layer)
                with budget._lock:
                    pinned = sum(
                        q.layer_bytes(i) for q in pagers for i, c in enumerate(q._pins) if c
                    )
                    assert budget._total_locked() <= budget.max_resident_bytes + pinned
            for q, lay in held:
                q.release(lay)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    _settle(*models)
    assert budget.resident_bytes <= budget.max_resident_bytes
    for m in models:
        st = _stats(m)
        assert not st.pinned_layers
        assert _mapped(m) <= st.resident_bytes + st.fixed_bytes + 4 * GRANULE
        m.close()


# --- policy, statistics, lifetime --------------------------------------------------------------


def test_repeated_passes_keep_part_of_the_model_resident(files: dict[str, Path]) -> None:
    """With room for 3/4 of the model, each pass pages in about half of it (the block in
    use and the one prefetched take the room of two or three): the blocks evicted are those
    used furthest ahead. Least-recently-used eviction would page in every block on every
    pass: the block it evicts is always the next one needed."""
    want = realm.load_model(files["a"], pack=False).logits([5, 6, 7])  # paged: the file layout
    probe = realm.load_model(files["a"], max_resident_bytes=0)
    room = _stats(probe).pageable_bytes * 3 // 4
    probe.close()
    model = realm.load_model(files["a"], max_resident_bytes=room)
    for _ in range(3):
        np.testing.assert_array_equal(model.logits([5, 6, 7]), want)
    before = _stats(model)
    for _ in range(10):
        model.logits([5, 6, 7])
    after = _stats(model)
    total = sum(model.pager._tensor_bytes)  # type: ignore[union-attr]
    per_pass = (after.bytes_paged - before.bytes_paged) / 10
    assert 0 < per_pass <= 0.75 * total
    assert after.hits - before.hits >= 10 * 2  # kept blocks and finished prefetches
    model.close()


def test_statistics_and_close(files: dict[str, Path]) -> None:
    model = realm.load_model(files["a"], max_resident_bytes=1 << 40)
    assert model.pager is not None
    st = _stats(model)
    assert (st.hits, st.misses, st.resident_bytes, st.resident_layers) == (0, 0, 0, ())
    assert st.granule_bytes == GRANULE and st.pageable_bytes >= 8 * 3 * MIB
    model.logits([1, 2, 3])
    model.logits([1, 2, 3])
    _settle(model)
    st = _stats(model)
    assert st.resident_layers == tuple(range(8)) and st.resident_bytes == st.pageable_bytes
    assert st.hits >= 8 and st.evictions == 0 and st.prefetches >= 1
    assert st.bytes_paged == sum(model.pager._tensor_bytes)  # each block once
    assert st.prefetch_hits + st.prefetch_late <= st.prefetches
    assert model.pager.trim() == st.resident_bytes
    assert _stats(model).resident_bytes == 0 and _mapped(model) <= st.fixed_bytes + 4 * GRANULE
    model.logits([1, 2, 3])
    model.close()
    assert _stats(model).resident_bytes == 0
    assert _mapped(model) <= st.fixed_bytes + 4 * GRANULE
    with pytest.raises(realm.ModelError, match="closed"):
        model.pager.acquire(0)
    model.close()  # idempotent


def test_budget_arguments(files: dict[str, Path]) -> None:
    for bad in (-1, True, 1.5, "1"):
        with pytest.raises(realm.ModelError, match="max_resident_bytes"):
            PagingBudget(bad)  # type: ignore[arg-type]
        with pytest.raises(realm.ModelError, match="max_resident_bytes"):
            ModelRegistry(max_resident_bytes=bad)  # type: ignore[arg-type]
    registry = ModelRegistry(max_resident_bytes=MIB)
    with pytest.raises(realm.ModelError, match="shared budget"):
        registry.load("a", files["a"], max_resident_bytes=MIB)
    a1, a2 = registry.load("a1", files["a"]), registry.load("a2", files["a"])
    assert a1 is a2  # the same content and options: one model, one pager
    model = realm.load_model(files["a"], max_resident_bytes=0)
    assert model.pager is not None
    for layer in (-1, 8, 1.0, True):
        with pytest.raises(realm.ModelError, match="layer"):
            model.pager.acquire(layer)  # type: ignore[arg-type]
    model.close()
    a1.close()


def test_runtime_statistics_report_each_paged_model(files: dict[str, Path]) -> None:
    paged = realm.load_model(files["a"], max_resident_bytes=8 * MIB)
    plain = realm.load_model(write_test_model(files["a"].with_name("small.gguf")))

    async def main() -> None:
        async with realm.open_runtime(models={"paged": paged, "plain": plain}) as rt:
            rt.registry.get("paged").logits([1, 2, 3])  # what a tenant's step does
            models = rt.statistics().models
            assert set(models) == {"paged"}
            assert models["paged"].hits + models["paged"].misses > 0
            assert models["paged"].max_resident_bytes == 8 * MIB

    trio.run(main)
    paged.close()
