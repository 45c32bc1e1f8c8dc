"""Layer paging: a model's transformer blocks resident under a byte budget, straight from the
file's memory map.

A paged model never copies its weights. The forward pass reads every block through views of
the memory-mapped GGUF file, as an unpaged model does; the ``LayerPager`` decides which blocks'
pages are *mapped into the process* (its resident set) and hands the rest back to the kernel:

- a block is made resident with ``madvise(MADV_POPULATE_READ)`` over its tensors (Linux 5.14+;
  elsewhere ``MADV_WILLNEED`` and a read of one byte a page), in a background thread for the
  block after the one in use (prefetch), or in the stepping thread on a miss;
- a block is evicted with ``madvise(MADV_DONTNEED)``: its pages leave the process's resident
  set (``RssFile``) at once. They are clean file pages, so nothing is written or lost: they
  stay in the page cache while the kernel has room for them, and a later use maps them again
  (or reads them from the file).

Accounting is in *granules*: the most the kernel maps on one fault (a page-cache folio, up to
the PMD size, 2 MiB on x86-64; read from ``/sys/kernel/mm/transparent_hugepage/hpage_pmd_size``).
A block's resident bytes are the granules its tensors touch; granules shared by two blocks are
counted once and dropped only when neither is resident; granules of the tensors outside the
blocks (the header, the output projection and norms) are the model's *fixed* bytes, resident
as in an unpaged model and outside the budget. The token embedding (when not tied to the
output) is dropped at the start of every pass: only the rows of the step in flight are mapped.

Budgets (``PagingBudget``) may be shared by several models (``ModelRegistry`` does). When room
is needed, the victim is the unpinned resident block used furthest in the future as far as
sequential passes tell: first blocks of models idle for a whole pass of the requester, then the
requester's blocks already used in this pass (the one just released first: Belady's choice for
a cyclic scan, where LRU would evict exactly the block needed next), then other active models'
blocks furthest from their position, then the requester's blocks ahead, furthest first. A block
in use (pinned by ``acquire`` until ``release``) or being loaded is never evicted: the budget is
soft only for blocks in use that do not fit beside the rest, and is restored when they are
released.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import mmap
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import numpy as np

from .._errors import ModelError
from ..kernels import LayerWeights
from ._gguf import layer_tensor_names

if TYPE_CHECKING:
    from ._model import Model

PAGE: Final = mmap.PAGESIZE
_MADV_WILLNEED: Final = getattr(mmap, "MADV_WILLNEED", 3)
_MADV_DONTNEED: Final = getattr(mmap, "MADV_DONTNEED", 4)
_MADV_POPULATE_READ: Final = 22  # Linux 5.14+: fault a range in, as a read of every page would
_MAX_GRANULE: Final = 32 << 20

_ABSENT, _LOADING, _RESIDENT = 0, 1, 2


def _granule_bytes() -> int:
    """The most the kernel maps into a file mapping on one fault: a page-cache folio can be
    as large as a PMD (2 MiB on x86-64), and a fault maps the whole folio."""
    try:
        n = int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text())
    except (OSError, ValueError):
        n = 2 << 20
    n = min(max(n, PAGE), _MAX_GRANULE)
    return n if n % PAGE == 0 and n & (n - 1) == 0 else 2 << 20


GRANULE: Final = _granule_bytes()


def _libc_madvise() -> Any:
    """libc's madvise through ctypes (which releases the GIL during the call: a populate that
    reads from disk must not stop every other thread), or None."""
    if sys.platform == "win32":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


def release_pages(data: np.ndarray, arrays: list[np.ndarray]) -> int:
    """Drop from the process the file pages of ``arrays`` that lie in the memory map ``data``
    (``madvise(MADV_DONTNEED)``; a later read maps them again from the page cache or the
    file): what a packed model copied and no longer reads. Returns the bytes advised."""
    m = _Mapping(data)
    done = 0
    for a in arrays:
        lo = int(a.__array_interface__["data"][0])
        if m.base <= lo < m.end and m.advise(lo, lo + int(a.nbytes), _MADV_DONTNEED):
            done += int(a.nbytes)
    return done


class _Mapping:
    """The model file's memory map (the GGUF reader's ``np.memmap`` of the whole file)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.base = int(data.__array_interface__["data"][0])
        self.size = int(data.nbytes)
        self.end = self.base + -(-self.size // PAGE) * PAGE
        self.can_advise = _madvise is not None and self.base % PAGE == 0
        self._populate = sys.platform.startswith("linux")

    def advise(self, lo: int, hi: int, advice: int) -> bool:
        """madvise [lo, hi) (addresses, clamped to the map, widened to whole pages)."""
        lo = max(lo, self.base) // PAGE * PAGE
        hi = min(-(-hi // PAGE) * PAGE, self.end)
        if hi <= lo or not self.can_advise:
            return False
        return int(_madvise(lo, hi - lo, advice)) == 0

    def populate(self, lo: int, hi: int) -> None:
        """Map [lo, hi) into the process, reading what the page cache lacks."""
        if self._populate:
            if self.advise(lo, hi, _MADV_POPULATE_READ):
                return
            if ctypes.get_errno() == errno.EINVAL:
                self._populate = False  # an older kernel: read a byte of every page instead
        self.advise(lo, hi, _MADV_WILLNEED)
        a, b = max(lo - self.base, 0), min(hi - self.base, self.size)
        if b > a:
            np.bitwise_or.reduce(self.data[a:b:PAGE])

    def drop(self, lo: int, hi: int) -> None:
        """Unmap [lo, hi)'s pages from the process (clean file pages: nothing is lost)."""
        self.advise(lo, hi, _MADV_DONTNEED)


def _granules(lo: int, hi: int) -> range:
    return range(lo // GRANULE, (hi - 1) // GRANULE + 1) if hi > lo else range(0)


def _runs(granules: list[int]) -> list[tuple[int, int]]:
    """Sorted granule indices as [lo, hi) address ranges of consecutive granules."""
    out: list[tuple[int, int]] = []
    for g in sorted(granules):
        if out and out[-1][1] == g * GRANULE:
            out[-1] = (out[-1][0], (g + 1) * GRANULE)
        else:
            out.append((g * GRANULE, (g + 1) * GRANULE))
    return out


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Address ranges with the gaps under a page between them (alignment padding) closed."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out and lo - out[-1][1] < PAGE:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _check_budget(max_resident_bytes: object) -> int:
    if (
        isinstance(max_resident_bytes, bool)
        or not isinstance(max_resident_bytes, int)
        or max_resident_bytes < 0
    ):
        raise ModelError(f"max_resident_bytes must be an int >= 0, got {max_resident_bytes!r}")
    return max_resident_bytes


class PagingBudget:
    """A byte budget for the resident blocks of every model paged under it.

    ``load_model(path, max_resident_bytes=budget)`` (or a ``ModelRegistry`` made with
    ``max_resident_bytes``) pages several models under one budget: a model that needs room
    evicts blocks of the others (never a block in use). An int budget is a private one.
    """

    def __init__(self, max_resident_bytes: int) -> None:
        self.max_resident_bytes = _check_budget(max_resident_bytes)
        self._lock = threading.Lock()  # guards this budget's and every attached pager's state
        self._pagers: weakref.WeakSet[LayerPager] = weakref.WeakSet()
        self._ticks = itertools.count(1)
        self._executor: ThreadPoolExecutor | None = None

    @property
    def resident_bytes(self) -> int:
        """Resident bytes of every model under this budget (their fixed bytes excluded)."""
        with self._lock:
            return self._total_locked()

    def _total_locked(self) -> int:
        return sum(p._resident_granules() for p in list(self._pagers)) * GRANULE

    def _submit(self, fn: Any, *args: Any) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="realm-pager")
        self._executor.submit(fn, *args)

    def _make_room_locked(self, requester: LayerPager, layer: int | None) -> bool:
        """Evict until ``layer`` (or nothing) fits; False if blocks in use leave no room."""
        total = self._total_locked()
        while True:
            extra = 0 if layer is None else requester._extra_granules_locked(layer) * GRANULE
            if total + extra <= self.max_resident_bytes:
                return True
            victim = self._victim_locked(requester)
            if victim is None:
                return False
            pager, v = victim
            total -= pager._evict_locked(v) * GRANULE

    def _victim_locked(self, requester: LayerPager) -> tuple[LayerPager, int] | None:
        best: tuple[LayerPager, int] | None = None
        best_key: tuple[int, int, int] | None = None
        for p in list(self._pagers):
            n = p.n_layers
            idle = p is not requester and p._last_tick < requester._prev_pass_tick
            for layer in p._resident:
                if p._pins[layer] or p._loaders[layer] or p._state[layer] != _RESIDENT:
                    continue
                dist = (layer - p._cursor - 1) % n  # 0: the next block that pager will use
                cat = _category(p is requester, idle, layer <= p._cursor)
                key = (cat, p._last_tick if cat == 0 else 0, -dist)
                if best_key is None or key < best_key:
                    best, best_key = (p, layer), key
        return best


def _category(mine: bool, idle: bool, behind: bool) -> int:
    """Eviction order, first to last: 0 a block of a model idle for a whole pass of the
    asker, 1 the asker's block already used in this pass, 2 another active model's block,
    3 the asker's block still ahead in this pass."""
    if not mine:
        return 0 if idle else 2
    return 1 if behind else 3


@attrs.frozen
class PagerStatistics:
    """A paged model's figures (counters since it was loaded)."""

    hits: int  # acquires that found the block resident (kept, or prefetched in time)
    misses: int  # acquires that did not (paged in then, or its prefetch still in flight)
    prefetches: int  # prefetches started
    prefetch_hits: int  # acquires served by a prefetch that had finished
    prefetch_late: int  # acquires that found their prefetch still in flight (also misses)
    evictions: int
    bytes_paged: int  # tensor bytes made resident (misses and prefetches)
    resident_bytes: int  # this model's resident blocks, in granules
    resident_layers: tuple[int, ...]
    pinned_layers: tuple[int, ...]  # blocks in use now
    max_resident_bytes: int  # the budget (shared by every model under it)
    budget_resident_bytes: int  # resident bytes of every model under the budget
    fixed_bytes: int  # header, output projection and norms: resident, outside the budget
    pageable_bytes: int  # every block resident at once, in granules
    granule_bytes: int


class LayerPager:
    """Residency of a model's transformer blocks under a byte budget (see the module docs).

    ``acquire(layer)`` returns the block's weights (views into the mapping), made resident and
    pinned until ``release(layer)``; it prefetches the next block. The forward pass calls both
    around every block; guests reach them through the ``pager_hint`` import.
    """

    def __init__(self, model: Model, *, max_resident_bytes: int | PagingBudget) -> None:
        budget = (
            max_resident_bytes
            if isinstance(max_resident_bytes, PagingBudget)
            else PagingBudget(_check_budget(max_resident_bytes))
        )
        self.model = model
        self.budget = budget
        self.n_layers = n = model.info.n_layers
        mf = model._file
        self._map = _Mapping(mf.reader.data)
        self._views: list[LayerWeights | None] = [None] * n
        # every tensor's address range, and which block owns it
        owner: dict[str, int] = {}
        for i in range(n):
            for name in layer_tensor_names(i, model.info.arch).values():
                owner[name] = i
        spans: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        fixed: set[int] = set(_granules(self._map.base, self._map.base + mf.reader.data_offset))
        self._embd: tuple[int, int] | None = None
        tied = "output.weight" not in mf.tensors
        for name, t in mf.tensors.items():
            lo = int(t.data.__array_interface__["data"][0])
            hi = lo + int(t.data.nbytes)
            if not (self._map.base <= lo and hi <= self._map.base + self._map.size):
                continue  # not a view of the map (never the case for a GGUF reader)
            if name in owner:
                spans[owner[name]].append((lo, hi))
            elif name == "token_embd.weight" and not tied:
                # only the rows of a step are read: dropped at each pass, whole pages inside
                self._embd = (-(-lo // PAGE) * PAGE, hi // PAGE * PAGE)
            else:
                fixed.update(_granules(lo, hi))
        self._fixed = frozenset(fixed)
        self._ranges = [_merge(s) for s in spans]  # one madvise for adjacent tensors
        self._tensor_bytes = [sum(hi - lo for lo, hi in s) for s in spans]
        self._layer_granules = [
            frozenset(g for lo, hi in s for g in _granules(lo, hi) if g not in self._fixed)
            for s in spans
        ]
        self._pageable = len(frozenset().union(*self._layer_granules)) if n else 0
        # state (guarded by the budget's lock)
        self._state = [_ABSENT] * n
        self._pins = [0] * n
        self._loaders = [0] * n  # threads mapping the block's pages in now
        self._prefetched = [False] * n
        self._resident: set[int] = set()  # blocks loading or resident
        self._refs: dict[int, int] = {}  # granule -> blocks loading or resident that touch it
        self._cursor = n - 1  # the block last acquired (a fresh pager is between passes)
        self._last_tick = self._pass_tick = self._prev_pass_tick = 0
        self._closed = False
        self._hits = self._misses = self._prefetches = self._evictions = self._paged = 0
        self._prefetch_hits = self._prefetch_late = 0
        with budget._lock:
            budget._pagers.add(self)

    @property
    def max_resident_bytes(self) -> int:
        return self.budget.max_resident_bytes

    def layer_bytes(self, layer: int) -> int:
        """What block ``layer`` adds to the resident bytes when nothing else is resident."""
        self._check_layer(layer)
        return len(self._layer_granules[layer]) * GRANULE

    # --- the forward step's hooks ---------------------------------------------------------

    def acquire(self, layer: int) -> LayerWeights:
        """Block ``layer``'s weights, resident and pinned until ``release``; prefetches the
        next block."""
        self._check_layer(layer)
        lw = self._views[layer]
        if lw is None:
            lw = self._views[layer] = self.model.layer_weights(layer)
        b = self.budget
        load = False
        with b._lock:
            if self._closed:
                raise ModelError("the layer pager is closed")
            tick = next(b._ticks)
            self._last_tick = tick
            if layer == 0:
                self._prev_pass_tick, self._pass_tick = self._pass_tick, tick
            self._cursor = layer
            self._pins[layer] += 1
            state = self._state[layer]
            if state == _RESIDENT:
                self._hits += 1
                if self._prefetched[layer]:
                    self._prefetch_hits += 1
            else:
                self._misses += 1
                if state == _LOADING:
                    if self._prefetched[layer]:
                        self._prefetch_late += 1
                else:
                    b._make_room_locked(self, layer)  # none left: the block is in use anyway
                    self._add_locked(layer)
                # page it in here, beside a prefetch in flight or queued: the block is
                # resident when acquire returns, whatever the worker is doing
                self._loaders[layer] += 1
                load = True
            self._prefetched[layer] = False
        if layer == 0 and self._embd is not None:
            self._map.drop(*self._embd)  # the embedding rows this step read (and no more)
        if layer + 1 < self.n_layers:
            self.prefetch(layer + 1)  # first: its read overlaps this block's
        if load:
            self._populate(layer)
        return lw

    def release(self, layer: int) -> None:
        """Unpin block ``layer`` (it stays resident until room is needed)."""
        self._check_layer(layer)
        b = self.budget
        with b._lock:
            if self._pins[layer] > 0:
                self._pins[layer] -= 1
            if not self._closed and b._total_locked() > b.max_resident_bytes:
                b._make_room_locked(self, None)  # a block that did not fit is done with

    def prefetch(self, layer: int) -> None:
        """Start making ``layer`` resident in the background, if there is room for it beside
        the blocks in use."""
        self._check_layer(layer)
        b = self.budget
        with b._lock:
            if self._closed or self._state[layer] != _ABSENT:
                return
            if not b._make_room_locked(self, layer):
                return  # the step will page it in itself
            self._add_locked(layer)
            self._prefetches += 1
            self._prefetched[layer] = True
        b._submit(self._prefetch_job, layer)

    def trim(self) -> int:
        """Evict every block not in use now; returns the bytes given back."""
        with self.budget._lock:
            freed = 0
            for layer in list(self._resident):
                if self._state[layer] == _RESIDENT and not (
                    self._pins[layer] or self._loaders[layer]
                ):
                    freed += self._evict_locked(layer)
            return freed * GRANULE

    # --- internals --------------------------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
            raise ModelError(f"layer must be an int, got {layer!r}")
        if not 0 <= layer < self.n_layers:
            raise ModelError(f"layer {layer} out of range [0, {self.n_layers})")

    def _resident_granules(self) -> int:
        return len(self._refs)

    def _extra_granules_locked(self, layer: int) -> int:
        if self._state[layer] != _ABSENT:
            return 0
        return sum(1 for g in self._layer_granules[layer] if g not in self._refs)

    def _add_locked(self, layer: int) -> None:
        self._state[layer] = _LOADING
        self._resident.add(layer)
        refs = self._refs
        for g in self._layer_granules[layer]:
            refs[g] = refs.get(g, 0) + 1

    def _evict_locked(self, layer: int) -> int:
        """Drop a resident, unpinned block; returns the granules given back."""
        self._state[layer] = _ABSENT
        self._resident.discard(layer)
        self._prefetched[layer] = False
        self._evictions += 1
        gone: list[int] = []
        refs = self._refs
        for g in self._layer_granules[layer]:
            left = refs[g] - 1
            if left:
                refs[g] = left
            else:
                del refs[g]
                gone.append(g)
        for lo, hi in _runs(gone):
            self._map.drop(lo, hi)
        return len(gone)

    def _prefetch_job(self, layer: int) -> None:
        with self.budget._lock:
            if self._closed or self._state[layer] != _LOADING:
                return  # paged in by its step already (and maybe evicted since)
            self._loaders[layer] += 1
        self._populate(layer)

    def _populate(self, layer: int) -> None:
        """Map the block's tensors in (the stepping thread, or the budget's worker for a
        prefetch); the caller counted itself in ``_loaders``: the block cannot be evicted
        while its pages are being mapped."""
        try:
            for lo, hi in self._ranges[layer]:
                self._map.populate(lo, hi)
        except Exception:  # advisory: a use faults the pages in anyway
            pass
        finally:
            with self.budget._lock:
                self._loaders[layer] -= 1
                if self._closed:  # closed meanwhile: give the pages back
                    if not self._loaders[layer]:
                        self._state[layer] = _ABSENT
                        for lo, hi in self._ranges[layer]:
                            self._map.drop(lo, hi)
                elif self._state[layer] == _LOADING:
                    self._state[layer] = _RESIDENT
                    self._paged += self._tensor_bytes[layer]

    def statistics(self) -> PagerStatistics:
        b = self.budget
        with b._lock:
            return PagerStatistics(
                hits=self._hits, misses=self._misses, prefetches=self._prefetches,
                prefetch_hits=self._prefetch_hits, prefetch_late=self._prefetch_late,
                evictions=self._evictions, bytes_paged=self._paged,
                resident_bytes=len(self._refs) * GRANULE,
                resident_layers=tuple(sorted(self._resident)),
                pinned_layers=tuple(i for i, c in enumerate(self._pins) if c),
                max_resident_bytes=b.max_resident_bytes,
                budget_resident_bytes=b._total_locked(),
                fixed_bytes=len(self._fixed) * GRANULE,
                pageable_bytes=self._pageable * GRANULE, granule_bytes=GRANULE,
            )  # fmt: skip

    def close(self) -> None:
        """Give every block back and leave the budget (idempotent; acquire then fails)."""
        b = self.budget
        with b._lock:
            if self._closed:
                return
            self._closed = True
            for layer in list(self._resident):
                if self._state[layer] == _RESIDENT and not self._loaders[layer]:
                    self._evict_locked(layer)  # a loader drops its block when it finishes
            with contextlib.suppress(KeyError):
                b._pagers.remove(self)
