"""Bounds-checked views of a guest's linear memory, and the two ways an import refuses.

Guest pointers arrive as signed i32 values, unchecked, into a memory that may move when it
grows. Every access here masks the pointer to unsigned, checks ``ptr + len`` against the
memory's current size without overflowing, and takes the memory's base address as it is
now (read once per host import, ``pause`` / ``resume``: the guest cannot grow its memory while
it waits for an import; afresh on every access otherwise), so a view is only ever taken of
bytes the guest owns right now. A pointer outside the memory raises
``Stop`` (the guest is stopped: the import returns EBOUNDS and the call traps); a bad count,
alignment or encoding raises ``Fail`` with the status the import returns.
"""

from __future__ import annotations

import ctypes
from typing import Any, Final

import numpy as np
import wasmtime

from ._abi import Status

U32: Final = 0xFFFFFFFF


class Stop(Exception):
    """A rule the guest may not break (a pointer outside its memory): stop the guest."""


class Fail(Exception):
    """An ordinary error status for the import to return (the guest may go on)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether the byte ranges ``[a0, a0 + a1)`` and ``[b0, b0 + b1)`` share a byte."""
    return a[1] > 0 and b[1] > 0 and a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


class GuestMemory:
    """The memory of one instance, seen from host imports (every access checked)."""

    def __init__(self, memory: wasmtime.Memory, store: wasmtime.Store) -> None:
        self.memory = memory
        self.store = store
        self._bounds: tuple[int, int] | None = None  # (base address, size) while paused
        self._paused = False

    def pause(self) -> None:
        """A host import starts: the guest is paused until ``resume``, so its memory cannot
        grow (and move) meanwhile, and its base and size are read once for the whole import
        (each read is a foreign call that gives up the GIL, which the imports of many guests
        then queue for). Outside a pause every access reads them afresh."""
        self._paused, self._bounds = True, None

    def resume(self) -> None:
        """The import returns to the guest (which may grow its memory)."""
        self._paused, self._bounds = False, None

    def _base_size(self) -> tuple[int, int]:
        b = self._bounds
        if b is None:
            size = self.memory.data_len(self.store)
            base = ctypes.addressof(self.memory.data_ptr(self.store).contents)
            b = (base, size)
            if self._paused:
                self._bounds = b
        return b

    def size(self) -> int:
        return self._base_size()[1]

    def span(self, ptr: int, n: int) -> int:
        """The host address of ``[ptr, ptr + n)`` after checking it lies in the memory."""
        p = ptr & U32
        if n < 0:
            raise Fail(Status.EINVAL, f"negative length {n}")
        base, size = self._base_size()
        if p > size or n > size - p:  # overflow-safe
            raise Stop(f"[{p}, {p}+{n}) is outside the guest's {size}-byte memory")
        return base + p

    def read(self, ptr: int, n: int) -> bytes:
        return ctypes.string_at(self.span(ptr, n), n) if n else b""

    def write(self, ptr: int, data: bytes) -> None:
        if data:
            ctypes.memmove(self.span(ptr, len(data)), data, len(data))

    def check_array(self, ptr: int, n: int, dtype: Any) -> tuple[int, int]:
        """Check an array of ``n`` items at ``ptr`` (count, alignment, bounds) without taking
        a view; returns its byte range ``(offset, length)``."""
        dt = np.dtype(dtype)
        if n < 0:
            raise Fail(Status.EINVAL, f"negative count {n}")
        if (ptr & U32) % dt.itemsize:
            raise Fail(Status.EINVAL, f"pointer {ptr & U32} not aligned to {dt.itemsize}")
        self.span(ptr, n * dt.itemsize)
        return ptr & U32, n * dt.itemsize

    def array(self, ptr: int, n: int, dtype: Any, *, writable: bool = False) -> np.ndarray:
        """A numpy view of ``n`` items at ``ptr`` (read-only unless ``writable``). Valid until
        the guest runs again (its memory may grow and move)."""
        dt = np.dtype(dtype)
        self.check_array(ptr, n, dt)
        addr = self._base_size()[0] + (ptr & U32)  # checked just now
        buf = (ctypes.c_char * (n * dt.itemsize)).from_address(addr)
        a = np.frombuffer(buf, dtype=dt, count=n)
        if not writable:
            a = a.view()
            a.flags.writeable = False
        return a

    def text(self, ptr: int, n: int, *, limit: int) -> str:
        """UTF-8 text of ``n`` bytes, refused (ELIMIT) before it is read when over ``limit``."""
        if n > limit:
            raise Fail(Status.ELIMIT, f"text of {n} bytes exceeds {limit}")
        try:
            return self.read(ptr, n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Fail(Status.EINVAL, f"text is not UTF-8: {e}") from None

    def out(self, data: bytes, ptr: int, cap: int) -> int:
        """snprintf-style output: write at most ``cap`` bytes, return the full length."""
        if cap < 0:
            raise Fail(Status.EINVAL, f"negative capacity {cap}")
        self.write(ptr, data[:cap])  # what is written is checked (cap 0 asks for the size)
        return len(data)
