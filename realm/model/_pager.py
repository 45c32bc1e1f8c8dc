"""Layer paging over the host-side weight store ("memory64").

"memory64" here means the weights live in the host's 64-bit address space (the memory-mapped
GGUF file, which may be far larger than any guest's 32-bit linear memory or than the RAM one
wants to spend on it), never inside a sandbox. The ``LayerPager`` decides which transformer
blocks are *resident*: copied out of the mapping into memory the pager owns, under a byte
budget (``max_resident_bytes``). A block in use is pinned; when the budget is exceeded the
least recently used unpinned blocks are evicted (their copies dropped and the mapping's pages
for them released with ``madvise(MADV_DONTNEED)``, so they leave the process's resident set).
While block i runs, block i + 1 is copied in the background (prefetch). A model larger than
its budget therefore still runs, with the same results, paying for copies. The budget is soft
for the working set: the block in use (and one being prefetched) is resident even if it alone
exceeds the budget.

The same interface (acquire a block's weights, release them) is where a GPU backend would
move blocks into device memory.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import attrs
import numpy as np

from .._errors import ModelError
from ..kernels import LayerWeights, Matrix

if TYPE_CHECKING:
    from ._model import Model


@attrs.frozen
class PagerStatistics:
    hits: int
    misses: int
    prefetches: int
    evictions: int
    bytes_paged: int
    resident_bytes: int
    resident_layers: tuple[int, ...]
    max_resident_bytes: int


def _copy_matrix(m: Matrix) -> Matrix:
    return Matrix(np.array(m.data, copy=True, order="C"), m.wtype)


def _copy_layer(lw: LayerWeights) -> LayerWeights:
    """A resident copy of every weight and vector of the layer (fields the arch lacks stay None)."""

    def copy(a: object) -> object:
        if isinstance(a, Matrix):
            return _copy_matrix(a)
        if isinstance(a, np.ndarray):
            return np.array(a, dtype=np.float32, copy=True)
        return a

    fields = attrs.fields(LayerWeights)
    return attrs.evolve(lw, **{f.name: copy(getattr(lw, f.name)) for f in fields})


def _layer_matrices(lw: LayerWeights) -> list[np.ndarray]:
    return [m.data for m in (lw.wq, lw.wk, lw.wv, lw.wo, lw.w_gate, lw.w_up, lw.w_down)]


def _layer_bytes(lw: LayerWeights) -> int:
    return sum(int(a.nbytes) for a in _layer_matrices(lw))


class LayerPager:
    """Per-layer residency of a model's weights under a byte budget (see module docs)."""

    def __init__(self, model: Model, *, max_resident_bytes: int) -> None:
        if (
            isinstance(max_resident_bytes, bool)
            or not isinstance(max_resident_bytes, int)
            or (max_resident_bytes < 0)
        ):
            raise ModelError(f"max_resident_bytes must be an int >= 0, got {max_resident_bytes!r}")
        self.model = model
        self.max_resident_bytes = max_resident_bytes
        self._lock = threading.Lock()
        self._resident: OrderedDict[int, LayerWeights] = OrderedDict()  # LRU order
        self._pins: dict[int, int] = {}
        self._loading: dict[int, Future[LayerWeights]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="realm-pager")
        self._hits = self._misses = self._prefetches = self._evictions = self._paged = 0

    # --- the forward step's hooks ---------------------------------------------------------

    def acquire(self, layer: int) -> LayerWeights:
        """Block ``layer``'s resident weights, pinned until ``release``; prefetches the next."""
        n = self.model.info.n_layers
        if not 0 <= layer < n:
            raise ModelError(f"layer {layer} out of range [0, {n})")
        with self._lock:
            self._pins[layer] = self._pins.get(layer, 0) + 1
            lw = self._resident.get(layer)
            if lw is not None:
                self._hits += 1
                self._resident.move_to_end(layer)
                fut = None
            else:
                fut = self._loading.get(layer)
                if fut is None:
                    self._misses += 1
                else:
                    self._hits += 1  # prefetched: in flight or done
        if lw is None:
            lw = fut.result() if fut is not None else self._load(layer)
            with self._lock:
                self._loading.pop(layer, None)
                self._resident[layer] = lw
                self._resident.move_to_end(layer)
                self._evict_locked()
        if layer + 1 < n:
            self.prefetch(layer + 1)
        return lw

    def release(self, layer: int) -> None:
        with self._lock:
            left = self._pins.get(layer, 0) - 1
            if left <= 0:
                self._pins.pop(layer, None)
            else:
                self._pins[layer] = left
            self._evict_locked()

    def prefetch(self, layer: int) -> None:
        """Start copying ``layer`` in the background unless it is resident or loading."""
        with self._lock:
            if layer in self._resident or layer in self._loading:
                return
            full = self._resident_bytes_locked() >= self.max_resident_bytes
            if full and all(k in self._pins for k in self._resident):
                return  # no room without evicting a pinned block: the step will load it
            self._prefetches += 1
            self._loading[layer] = self._executor.submit(self._load, layer)

    # --- internals --------------------------------------------------------------------------

    def _load(self, layer: int) -> LayerWeights:
        mapped = self.model.layer_weights(layer)
        lw = _copy_layer(mapped)
        nbytes = _layer_bytes(lw)
        for a in _layer_matrices(mapped):
            _release_mapping(a)
        with self._lock:
            self._paged += nbytes
        return lw

    def _resident_bytes_locked(self) -> int:
        return sum(_layer_bytes(lw) for lw in self._resident.values())

    def _evict_locked(self) -> None:
        total = self._resident_bytes_locked()
        for layer in list(self._resident):
            if total <= self.max_resident_bytes:
                break
            if layer in self._pins:
                continue
            total -= _layer_bytes(self._resident.pop(layer))
            self._evictions += 1

    def statistics(self) -> PagerStatistics:
        with self._lock:
            return PagerStatistics(
                hits=self._hits, misses=self._misses, prefetches=self._prefetches,
                evictions=self._evictions, bytes_paged=self._paged,
                resident_bytes=self._resident_bytes_locked(),
                resident_layers=tuple(sorted(self._resident)),
                max_resident_bytes=self.max_resident_bytes,
            )  # fmt: skip

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._resident.clear()


def _release_mapping(a: np.ndarray) -> None:
    """Drop the mapping's pages under ``a`` from the resident set (they stay in the file)."""
    base = a
    while (
        isinstance(base, np.ndarray)
        and base.base is not None
        and not isinstance(base.base, mmap.mmap)
    ):
        base = base.base  # type: ignore[assignment]
    mm = getattr(base, "base", None)
    if not isinstance(mm, mmap.mmap) or not hasattr(mm, "madvise"):
        return
    start = a.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    page = mmap.PAGESIZE
    lo = (start + page - 1) // page * page  # whole pages inside the tensor only
    hi = (start + a.nbytes) // page * page
    if hi > lo:
        with contextlib.suppress(OSError, ValueError):  # advisory only
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
