"""Deadlines and cancels that reach running guest code: the epoch callback.

Every ``SLICE_TICKS`` epochs (the engine's ticker thread increments the epoch every 10 ms) a
running guest pauses in a callback that traps it if its call was cancelled or is past its
deadline, and lets it go on otherwise: after a pause, when it has run wasm long enough to owe
other tenants their share of the CPU (``ComputeGate.wasm_pause``). An epoch deadline set once
per call cannot be moved from another thread, and fuel cannot be touched from one: this is how
a guest spinning in wasm is stopped within a tick or two. (Host imports check the same flag
themselves, between the slices of their work: ``_compute``.) wasmtime-py does not wrap the
callback, so this module is the ONLY place that touches its private ``_bindings``; it is
written against the pinned version (``PINNED_WASMTIME``), and ``check_bindings`` (run by every
``SandboxEngine`` and by the tests) fails loudly when that changes.
"""

from __future__ import annotations

import ctypes
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import wasmtime
from wasmtime import _bindings as wasmtime_ffi  # the epoch-deadline callback (not wrapped)

if TYPE_CHECKING:
    from ._context import CallContext

PINNED_WASMTIME: Final = "50."  # the wasmtime-py major version this module is written against
SLICE_TICKS: Final = 1  # the epoch callback checks the call's cancel flag and deadline this often
PAUSE_POLL_SECONDS: Final = 0.005  # a paused guest looks at its call's cancel flag this often
# a cancelled guest still running this long after the callback first saw the cancel is trapped
# (one that notices ECANCELLED and returns its partial result in time is not)
STOP_GRACE_SECONDS: Final = 0.05

_DeadlineFn = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(wasmtime_ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(wasmtime_ffi.wasmtime_update_deadline_kind_t),
)
_NoFinalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def check_bindings() -> None:
    """Fail loudly if wasmtime-py is not the version this module's private calls expect."""
    version = getattr(wasmtime, "__version__", None) or _dist_version()
    if not str(version).startswith(PINNED_WASMTIME):
        raise RuntimeError(
            f"realm.sandbox._deadline is written against wasmtime-py {PINNED_WASMTIME}x "
            f"(its private epoch-deadline bindings); found {version}: check "
            "wasmtime_store_epoch_deadline_callback's signature, then update PINNED_WASMTIME"
        )
    for name in ("wasmtime_store_epoch_deadline_callback", "wasmtime_error_new",
                 "wasmtime_context_t", "wasmtime_update_deadline_kind_t"):  # fmt: skip
        if not hasattr(wasmtime_ffi, name):
            raise RuntimeError(f"wasmtime-py {version} has no _bindings.{name}")


def _dist_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")


class EpochDeadline:
    """The epoch callback of one store: traps its guest when ``current()`` (the running call's
    context, or None) is cancelled or past its deadline (after ``STOP_GRACE_SECONDS``, for a
    guest to return its partial result), and otherwise pauses it for as long
    as ``pace(ran)`` says after running ``ran`` seconds of wasm without calling the host (a
    spinning guest keeps to its share of the CPU while other tenants work). Keep the object
    alive with the store."""

    def __init__(
        self,
        store: wasmtime.Store,
        current: Callable[[], CallContext | None],
        pace: Callable[[float], float] = lambda ran: 0.0,
    ) -> None:
        get = weakref.WeakMethod(current) if hasattr(current, "__self__") else lambda: current

        def stopped() -> int:
            err = wasmtime_ffi.wasmtime_error_new(b"realm: call stopped")
            return ctypes.cast(err, ctypes.c_void_p).value or 0

        def on_deadline(_ctx: Any, _data: Any, delta: Any, kind: Any) -> int:
            delta[0] = SLICE_TICKS
            kind[0] = 0  # continue
            try:
                fn = get()
                ctx = fn() if fn is not None else None
                if ctx is None:
                    return 0
                now = time.monotonic()
                if ctx.cancelled():  # a guest that returns in the grace period reports itself
                    if ctx.stop_seen is None:
                        ctx.stop_seen = now
                    return stopped() if now - ctx.stop_seen >= STOP_GRACE_SECONDS else 0
                pause = pace(now - ctx.wasm_since)
                end = now + pause
                while pause > 0:  # paused, but a cancel ends the pause at once
                    time.sleep(min(pause, PAUSE_POLL_SECONDS))
                    if ctx.cancelled():
                        break
                    pause = end - time.monotonic()
                if end > now:
                    ctx.wasm_since = time.monotonic()
                return 0
            except BaseException:  # never raise into wasmtime
                return 0

        self._callback = _DeadlineFn(on_deadline)  # kept alive with the store
        self._finalizer = _NoFinalizer(0)
        wasmtime_ffi.wasmtime_store_epoch_deadline_callback(
            store.ptr(), self._callback, None, self._finalizer
        )
