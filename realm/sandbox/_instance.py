"""A tenant's guest instance: its store, limits, host imports, and calls into it.

Host imports never raise into wasmtime (an exception raised in a host function travels
through one process-wide variable, unsafe with several threads running guests): each one
catches everything, records what went wrong on the call's own context and returns a status.
A guest that breaks the rules (a bad pointer) or ignores errors is stopped by setting its
store's fuel to zero from inside the import, which traps at the guest's next instruction.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import jsonschema
import numpy as np
import wasmtime
from wasmtime import _bindings as wasmtime_ffi  # the epoch-deadline callback (not wrapped)

from .. import kernels
from .._errors import (
    CallCancelled,
    GuestABIError,
    GuestError,
    GuestLimitReached,
    GuestRefusedParams,
    GuestTrap,
    InvalidParams,
    RealmError,
    UnknownFunction,
)
from ._abi import ABI_VERSION, FUNCTION_PREFIX, HOST_IMPORTS, Status
from ._context import (
    MAX_IGNORED_ERRORS,
    MAX_LOG_LINES_PER_CALL,
    MAX_TEXT_BYTES,
    CallContext,
    TenantState,
    model_json,
)
from ._engine import REQUIRED_FUNCS, GuestModule, SandboxEngine, host_func_type

log = logging.getLogger("realm.guest")
# imports that still work after the call is cancelled, so a guest can clean up and report
_ALWAYS_ALLOWED = frozenset({"result", "log", "clock_ms", "session_close", "session_pos"})
SLICE_TICKS = 5  # the epoch callback checks the call's cancel flag and deadline this often

_DeadlineFn = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(wasmtime_ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(wasmtime_ffi.wasmtime_update_deadline_kind_t),
)
_NoFinalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
MAX_METADATA_BYTES = 1 << 20
_U32 = 0xFFFFFFFF


def _non_json_path(value: Any, path: str = "", depth: int = 0) -> str | None:
    """Where in params a value JSON cannot carry (NaN, infinity, a non-JSON type) sits."""
    if depth > 64:
        return path or None
    if (isinstance(value, float) and value != value) or value in (float("inf"), float("-inf")):
        return path or None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{path}.{k!r}".lstrip(".")
            found = _non_json_path(v, f"{path}.{k}".lstrip("."), depth + 1)
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _non_json_path(v, f"{path}.{i}".lstrip("."), depth + 1)
            if found:
                return found
    elif not isinstance(value, str | int | float | bool | type(None)):
        return path or None
    return None


def trap_reason(e: BaseException) -> str:
    """The line of a wasmtime error that says why (not the backtrace header)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "wasm trap:" in ln or "all fuel consumed" in ln or "call stopped" in ln:
            return ln
    tail = [ln for ln in lines if not ln.startswith(("error while executing", "0:", "1:", "2:"))]
    return tail[-1] if tail else (lines[0] if lines else repr(e))


class _Stop(Exception):
    """Raised inside an import to stop the guest (bad pointer): becomes EBOUNDS + fuel 0."""


class _Fail(Exception):
    """Raised inside an import for an ordinary error status."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


class GuestInstance:
    """One instance of a guest module in its own store, serving one tenant's calls.

    Not thread-safe: one call at a time (the tenant actor serialises them). After a trap the
    instance is ``broken`` and must be replaced (``TenantState`` — the sessions — survives).
    """

    def __init__(self, engine: SandboxEngine, module: GuestModule, tenant: TenantState) -> None:
        self.engine = engine
        self.module = module
        self.tenant = tenant
        self.broken = False
        self._ctx: CallContext | None = None  # the call whose imports are running
        # what the epoch callback checks: the current call, or instantiation's own deadline
        self._deadline_ctx: CallContext | None = CallContext(
            deadline=time.monotonic() + tenant.limits.call_timeout_seconds
        )
        lim = tenant.limits
        self.store = wasmtime.Store(engine.engine)
        self.store.set_limits(memory_size=lim.max_memory_bytes, table_elements=100_000,
                              instances=1, tables=4, memories=1)  # fmt: skip
        self.store.set_fuel(lim.fuel_per_call)
        self.store.set_epoch_deadline(engine.ticks(lim.call_timeout_seconds))
        self._install_deadline_callback()
        linker = wasmtime.Linker(engine.engine)
        for imp in HOST_IMPORTS:
            linker.define_func("realm", imp.name, host_func_type(imp.name), self._guarded(imp.name))
        try:
            self.instance = linker.instantiate(self.store, module.module)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            raise GuestABIError(f"{module.name}: instantiation failed: {e}") from e
        ex = self.instance.exports(self.store)
        self.memory: wasmtime.Memory = ex["memory"]  # type: ignore[assignment]
        self._required = {n: ex[n] for n in REQUIRED_FUNCS}  # looked up once, called per call
        version = self._call_export("realm_abi_version")
        if version != ABI_VERSION:
            raise GuestABIError(
                f"{module.name} was built for guest ABI version {version}; this host speaks "
                f"version {ABI_VERSION}"
            )
        self.metadata = self._read_metadata(ex)
        self._functions = {f["name"]: f for f in self.metadata["functions"]}
        self._validators = {
            n: jsonschema.Draft202012Validator(f.get("params", {"type": "object"}))
            for n, f in self._functions.items()
        }
        self._exports = {n: ex[FUNCTION_PREFIX + n] for n in self._functions}
        for n, v in self._validators.items():  # a schema that cannot even be applied
            try:
                list(v.iter_errors({}))
            except Exception as e:
                raise GuestABIError(f"{module.name}: schema of {n!r} is unusable: {e}") from e
        self._deadline_ctx = None

    # --- prompt stops for guests that never call the host -----------------------------------

    def _install_deadline_callback(self) -> None:
        """Every SLICE_TICKS epochs the running guest pauses in this callback, which traps it
        if its call was cancelled or is past its deadline, and lets it go on otherwise. (An
        epoch deadline set once per call cannot be moved from another thread, and fuel cannot
        be touched from one: this is how a spinning guest is stopped within ~50 ms.)"""
        me = weakref.ref(self)

        def on_deadline(_ctx: Any, _data: Any, delta: Any, kind: Any) -> int:
            try:
                inst = me()
                ctx = inst._deadline_ctx if inst is not None else None
                if ctx is not None and ctx.cancelled():
                    return ctypes.cast(wasmtime_ffi.wasmtime_error_new(b"realm: call stopped"),
                                       ctypes.c_void_p).value or 0  # fmt: skip
                delta[0] = SLICE_TICKS
                kind[0] = 0  # continue
                return 0
            except BaseException:  # never raise into wasmtime
                delta[0] = SLICE_TICKS
                kind[0] = 0
                return 0

        self._deadline_cb = _DeadlineFn(on_deadline)  # kept alive with the instance
        self._deadline_fin = _NoFinalizer(0)
        wasmtime_ffi.wasmtime_store_epoch_deadline_callback(
            self.store.ptr(), self._deadline_cb, None, self._deadline_fin
        )

    # --- exports ---------------------------------------------------------------------------

    def _call_export(self, name: str, *args: int) -> Any:
        try:
            return self._required[name](self.store, *args)  # type: ignore[operator]
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            self.broken = True
            raise GuestTrap(f"{self.module.name}: {name} trapped: {trap_reason(e)}") from e

    def _read_metadata(self, ex: Any) -> dict[str, Any]:
        ptr = self._call_export("realm_metadata_ptr") & _U32
        n = self._call_export("realm_metadata_len") & _U32
        if n > MAX_METADATA_BYTES:
            raise GuestABIError(f"{self.module.name}: metadata of {n} bytes is too large")
        try:
            meta = json.loads(self._read(ptr, n).decode("utf-8"))
        except (_Stop, _Fail, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise GuestABIError(f"{self.module.name}: unreadable metadata: {e!r}") from e
        fns = meta.get("functions") if isinstance(meta, dict) else None
        if not isinstance(fns, list) or not all(
            isinstance(f, dict) and isinstance(f.get("name"), str) for f in fns
        ):
            raise GuestABIError(f"{self.module.name}: metadata needs a 'functions' list")
        exports = set(self.module.function_exports)
        for f in fns:
            if f["name"] not in exports:
                raise GuestABIError(
                    f"{self.module.name}: metadata names {f['name']!r} but the module does not "
                    f"export {FUNCTION_PREFIX}{f['name']}"
                )
            try:
                jsonschema.Draft202012Validator.check_schema(f.get("params", {"type": "object"}))
            except jsonschema.SchemaError as e:
                raise GuestABIError(
                    f"{self.module.name}: bad schema for {f['name']!r}: {e.message}"
                ) from e
        return meta

    # --- memory access (every pointer checked, base re-read each time) ------------------------

    def _span(self, ptr: int, n: int) -> int:
        """The host address of [ptr, ptr + n) in guest memory, after checking the bounds."""
        p, length = ptr & _U32, n
        if length < 0:
            raise _Fail(Status.EINVAL, f"negative length {n}")
        size = self.memory.data_len(self.store)
        if p > size or length > size - p:  # overflow-safe
            raise _Stop(f"[{p}, {p}+{length}) is outside the guest's {size}-byte memory")
        base = ctypes.addressof(self.memory.data_ptr(self.store).contents)
        return base + p

    def _read(self, ptr: int, n: int) -> bytes:
        return ctypes.string_at(self._span(ptr, n), n) if n else b""

    def _write(self, ptr: int, data: bytes) -> None:
        if data:
            ctypes.memmove(self._span(ptr, len(data)), data, len(data))

    def _array(self, ptr: int, n: int, dtype: Any, *, writable: bool = False) -> np.ndarray:
        dt = np.dtype(dtype)
        if n < 0:
            raise _Fail(Status.EINVAL, f"negative count {n}")
        if (ptr & _U32) % dt.itemsize:
            raise _Fail(Status.EINVAL, f"pointer {ptr & _U32} not aligned to {dt.itemsize}")
        addr = self._span(ptr, n * dt.itemsize)
        buf = (ctypes.c_char * (n * dt.itemsize)).from_address(addr)
        a = np.frombuffer(buf, dtype=dt, count=n)
        if not writable:
            a = a.view()
            a.flags.writeable = False
        return a

    def _text(self, ptr: int, n: int) -> str:
        if n > MAX_TEXT_BYTES:
            raise _Fail(Status.ELIMIT, f"text of {n} bytes exceeds {MAX_TEXT_BYTES}")
        try:
            return self._read(ptr, n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Fail(Status.EINVAL, f"text is not UTF-8: {e}") from None

    def _out(self, data: bytes, ptr: int, cap: int) -> int:
        if cap < 0:
            raise _Fail(Status.EINVAL, f"negative capacity {cap}")
        self._write(ptr, data[:cap])  # what is written is checked (cap 0 asks for the size)
        return len(data)

    # --- the import guard ----------------------------------------------------------------------

    def _stop_guest(self, ctx: CallContext, why: str) -> None:
        ctx.fatal = ctx.fatal or why
        with contextlib.suppress(wasmtime.WasmtimeError):
            self.store.set_fuel(0)  # traps at the guest's next fuel check

    def _guarded(self, name: str) -> Callable[..., int]:
        impl = getattr(self, f"_imp_{name}")

        def host_import(*args: int) -> int:
            ctx = self._ctx
            if ctx is None:  # e.g. from a start function: no call to account it to
                return int(Status.EINTERNAL)
            if ctx.fatal is not None:  # stopped: nothing more until the trap lands
                return int(Status.EBOUNDS)
            try:
                if name not in _ALWAYS_ALLOWED and ctx.cancelled():
                    ctx.ignored += 1
                    if ctx.ignored > MAX_IGNORED_ERRORS:
                        self._stop_guest(ctx, "the guest kept calling after its call was cancelled")
                    return int(Status.ECANCELLED)
                return int(impl(ctx, *args))
            except _Stop as e:
                ctx.record(f"{name}: {e}")
                self._stop_guest(ctx, f"{name}: {e}")
                return int(Status.EBOUNDS)
            except _Fail as e:
                ctx.record(f"{name}: {e}")
                ctx.ignored += 1
                if ctx.ignored > MAX_IGNORED_ERRORS:
                    self._stop_guest(ctx, f"the guest ignored {ctx.ignored} error statuses")
                return int(e.status)
            except BaseException as e:  # never raise into wasmtime
                ctx.record(f"{name}: internal error: {e!r}")
                self._stop_guest(ctx, f"{name}: internal error: {e!r}")
                return int(Status.EINTERNAL)

        return host_import

    # --- host imports ---------------------------------------------------------------------------

    def _imp_log(self, ctx: CallContext, level: int, ptr: int, n: int) -> int:
        if n < 0:
            raise _Fail(Status.EINVAL, f"negative length {n}")
        text = self._text(ptr, min(n, 4096)) if n > 0 else ""
        ctx.log_lines += 1
        if ctx.log_lines <= MAX_LOG_LINES_PER_CALL:
            lvl = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING}.get(level, logging.ERROR)
            log.log(lvl, "[%s] %s", self.tenant.name, text)
        return 0

    def _imp_clock_ms(self, ctx: CallContext) -> int:
        return int((time.monotonic() - ctx.start) * 1000)

    def _imp_random(self, ctx: CallContext, ptr: int, n: int) -> int:
        if n < 0 or n > MAX_TEXT_BYTES:
            raise _Fail(Status.EINVAL, f"length {n}")
        self._write(ptr, ctx.rng.bytes(n))
        return 0

    def _model(self, ptr: int, n: int) -> tuple[str, Any]:
        name = self._text(ptr, n) if n else ""
        try:
            return self.tenant.model(name)
        except KeyError:
            raise _Fail(Status.ENOENT, f"no model {name!r}") from None

    def _imp_model_info(self, ctx: CallContext, mp: int, ml: int, out: int, cap: int) -> int:
        key, model = self._model(mp, ml)
        info = model_json(key, model)
        info["max_tokens_per_forward"] = self.tenant.limits.max_tokens_per_forward
        return self._out(json.dumps(info).encode(), out, cap)

    def _imp_tokenize(
        self, ctx: CallContext, mp: int, ml: int, tp: int, tl: int, flags: int, out: int, cap: int
    ) -> int:
        _, model = self._model(mp, ml)
        text = self._text(tp, tl)
        if flags & ~3:
            raise _Fail(Status.EINVAL, f"unknown flags {flags}")
        try:
            ids = model.tokenizer.encode(text, bool(flags & 1), parse_special=bool(flags & 2))
        except RealmError as e:
            raise _Fail(Status.EINVAL, str(e)) from None
        if cap < 0:
            raise _Fail(Status.EINVAL, f"negative capacity {cap}")
        self._write(out, np.asarray(ids[:cap], dtype="<i4").tobytes())
        return len(ids)

    def _imp_decode(
        self, ctx: CallContext, mp: int, ml: int, ids_ptr: int, n: int, out: int, cap: int
    ) -> int:
        _, model = self._model(mp, ml)
        ids = self._array(ids_ptr, n, "<i4")
        try:
            text = model.tokenizer.decode([int(i) for i in ids])
        except RealmError as e:
            raise _Fail(Status.EINVAL, str(e)) from None
        return self._out(text.encode(), out, cap)

    def _imp_chat_template(
        self, ctx: CallContext, mp: int, ml: int, msp: int, msl: int, add: int, out: int, cap: int
    ) -> int:
        _, model = self._model(mp, ml)
        try:
            messages = json.loads(self._text(msp, msl))
            text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=bool(add))
        except ValueError as e:
            raise _Fail(Status.EINVAL, f"messages: {e}") from None
        except RealmError as e:
            raise _Fail(Status.EINVAL, str(e)) from None
        return self._out(text.encode(), out, cap)

    def _imp_session_open(self, ctx: CallContext, mp: int, ml: int, capacity: int) -> int:
        name = self._text(mp, ml) if ml else ""
        if capacity < 0:
            raise _Fail(Status.EINVAL, f"negative capacity {capacity}")
        try:
            return self.tenant.open_session(name, capacity)
        except KeyError:
            raise _Fail(Status.ENOENT, f"no model {name!r}") from None
        except OverflowError as e:
            raise _Fail(Status.ELIMIT, str(e)) from None
        except RealmError as e:
            raise _Fail(Status.EINVAL, str(e)) from None

    def _slot(self, handle: int) -> Any:
        slot = self.tenant.sessions.get(handle)
        if slot is None:
            raise _Fail(Status.ENOENT, f"no session {handle} for this tenant")
        return slot

    def _imp_session_close(self, ctx: CallContext, handle: int) -> int:
        self._slot(handle)
        self.tenant.close_session(handle)
        return 0

    def _imp_session_rewind(self, ctx: CallContext, handle: int, pos: int) -> int:
        slot = self._slot(handle)
        if not 0 <= pos <= slot.session.pos:
            raise _Fail(Status.EINVAL, f"rewind to {pos} of a session at {slot.session.pos}")
        slot.session.rewind(pos)
        return slot.session.pos

    def _imp_session_pos(self, ctx: CallContext, handle: int) -> int:
        return int(self._slot(handle).session.pos)

    def _imp_forward(
        self, ctx: CallContext, handle: int, tp: int, n: int, lp: int, cap: int, mode: int
    ) -> int:
        slot = self._slot(handle)
        if not 0 < n <= self.tenant.limits.max_tokens_per_forward:
            raise _Fail(
                Status.ELIMIT if n > 0 else Status.EINVAL,
                f"n_tokens {n} not in [1, {self.tenant.limits.max_tokens_per_forward}]",
            )
        if mode not in (0, 1, 2):
            raise _Fail(Status.EINVAL, f"mode {mode} (0 none, 1 last, 2 all)")
        model = slot.session.model
        vocab = model.info.vocab_size
        need = {0: 0, 1: vocab, 2: n * vocab}[mode]
        if cap < need:
            raise _Fail(Status.EINVAL, f"logits buffer of {cap} floats, {need} needed")
        tokens = np.array(self._array(tp, n, "<i4"), dtype=np.int32)  # copy: guest memory may move
        if need:
            self._span(lp, need * 4)  # check the output before the work, not after
            if (lp & _U32) % 4:
                raise _Fail(Status.EINVAL, "logits pointer not aligned to 4")
        try:
            (logits,) = self.tenant.forward(
                model, [(slot.session, tokens, {0: "none", 1: "last", 2: "all"}[mode])]
            )
        except RealmError as e:
            if e.code == "CANCELLED":  # the batcher's wait was cancelled with the call
                ctx.cancel.set()
                return int(Status.ECANCELLED)
            raise _Fail(
                Status.ELIMIT if e.code == "OVERLOADED" else Status.EINVAL, str(e)
            ) from None
        if ctx.cancelled():
            return int(Status.ECANCELLED)
        if need:
            out = self._array(lp, need, "<f4", writable=True)  # memory re-read after the step
            out[:] = np.asarray(logits, dtype=np.float32).reshape(-1)
        return need

    def _imp_detokenize(self, ctx: CallContext, handle: int, token: int, out: int, cap: int) -> int:
        slot = self._slot(handle)
        if cap < 0:
            raise _Fail(Status.EINVAL, f"negative capacity {cap}")
        try:
            if token >= 0:
                slot.pending += slot.stream.push(token).encode()
            elif token == -2:
                slot.pending += slot.stream.flush().encode()
            elif token != -1:
                raise _Fail(Status.EINVAL, f"token {token}")
        except RealmError as e:
            raise _Fail(Status.EINVAL, str(e)) from None
        take, rest = slot.pending[:cap], slot.pending[cap:]
        # never split a UTF-8 character across calls
        while rest and take and (rest[0] & 0xC0) == 0x80:
            rest = take[-1:] + rest
            take = take[:-1]
        self._write(out, take)  # checked before the text leaves the queue
        slot.pending = rest
        return len(take)

    def _imp_emit(self, ctx: CallContext, ptr: int, n: int) -> int:
        text = self._text(ptr, n)
        ctx.emitted += 1
        if ctx.on_emit is not None and ctx.on_emit(text) is False:
            ctx.cancel.set()
            return int(Status.ECANCELLED)
        return 0

    def _imp_result(self, ctx: CallContext, ptr: int, n: int) -> int:
        try:
            value = json.loads(self._text(ptr, n))
        except (ValueError, RecursionError) as e:
            raise _Fail(Status.EINVAL, f"result is not JSON: {e!r}") from None
        if not isinstance(value, dict):
            raise _Fail(Status.EINVAL, "result must be a JSON object")
        ctx.result = value
        return 0

    def _imp_embed(
        self, ctx: CallContext, mp: int, ml: int, tp: int, n: int, out: int, cap: int
    ) -> int:
        _, model = self._model(mp, ml)
        dim = model.info.n_embd
        if cap < dim:  # snprintf-style size query: no work
            if cap < 0:
                raise _Fail(Status.EINVAL, f"negative capacity {cap}")
            return dim
        limit = min(self.tenant.limits.max_tokens_per_forward, model.info.context_length)
        if not 0 < n <= limit:
            raise _Fail(
                Status.ELIMIT if n > 0 else Status.EINVAL, f"n_tokens {n} not in [1, {limit}]"
            )
        if (out & _U32) % 4:
            raise _Fail(Status.EINVAL, "output pointer not aligned to 4")
        self._span(out, dim * 4)
        tokens = np.array(self._array(tp, n, "<i4"), dtype=np.int32)
        try:
            vec = model.embed(tokens)
        except RealmError as e:
            raise _Fail(
                Status.ELIMIT if e.code == "OVERLOADED" else Status.EINVAL, str(e)
            ) from None
        self._array(out, dim, "<f4", writable=True)[:] = vec
        return dim

    def _imp_matmul_f32(
        self, ctx: CallContext, yp: int, wp: int, xp: int, rows: int, cols: int, batch: int
    ) -> int:
        if min(rows, cols, batch) <= 0 or rows * cols > (1 << 26) or batch * cols > (1 << 26):
            raise _Fail(Status.EINVAL, f"shape rows={rows} cols={cols} batch={batch}")
        w = self._array(wp, rows * cols, "<f4").reshape(rows, cols)
        x = self._array(xp, batch * cols, "<f4").reshape(batch, cols)
        y = self._array(yp, batch * rows, "<f4", writable=True).reshape(batch, rows)
        try:
            y[:] = kernels.matmul(np.ascontiguousarray(w), np.ascontiguousarray(x))
        except RealmError as e:
            raise _Fail(Status.EINVAL, str(e)) from None
        return 0

    def _imp_attention_f32(
        self, ctx: CallContext, op: int, qp: int, kp: int, vp: int, pp: int,
        n_q: int, n_kv: int, n_heads: int, n_kv_heads: int, head_dim: int,
    ) -> int:  # fmt: skip
        dims = (n_q, n_kv, n_heads, n_kv_heads, head_dim)
        if (
            min(dims) <= 0
            or n_q * n_heads * head_dim > (1 << 24)
            or n_kv * n_kv_heads * head_dim > (1 << 24)
        ):
            raise _Fail(Status.EINVAL, f"shape {dims}")
        q = self._array(qp, n_q * n_heads * head_dim, "<f4").reshape(n_q, n_heads, head_dim)
        k = self._array(kp, n_kv * n_kv_heads * head_dim, "<f4").reshape(n_kv, n_kv_heads, head_dim)
        v = self._array(vp, n_kv * n_kv_heads * head_dim, "<f4").reshape(n_kv, n_kv_heads, head_dim)
        pos = self._array(pp, n_q, "<i4")
        out = self._array(op, n_q * n_heads * head_dim, "<f4", writable=True)
        try:
            res = kernels.attention(q.copy(), k.copy(), v.copy(), np.array(pos, dtype=np.int32))
        except RealmError as e:
            raise _Fail(Status.EINVAL, str(e)) from None
        out[:] = res.reshape(-1)
        return 0

    def _imp_pager_hint(self, ctx: CallContext, mp: int, ml: int, layer: int, hint: int) -> int:
        _, model = self._model(mp, ml)
        if model.pager is None:
            raise _Fail(Status.ENOTSUP, "the model is not paged")
        if not 0 <= layer < model.info.n_layers or hint not in (1, 2, 3):
            raise _Fail(Status.EINVAL, f"layer {layer} / hint {hint}")
        if hint == 1:
            model.pager.prefetch(layer)
        elif hint == 2:
            model.pager.acquire(layer)
        else:
            model.pager.release(layer)
        return 0

    # --- calls ------------------------------------------------------------------------------------

    def functions(self) -> list[dict[str, Any]]:
        return list(self.metadata["functions"])

    def call(self, function: str, params: Any, ctx: CallContext | None = None) -> dict[str, Any]:
        """Run ``function`` with ``params`` (a JSON object) and return its result object.

        Raises UnknownFunction, InvalidParams (before entering the guest), CallCancelled,
        GuestTrap (the instance is then ``broken``) or GuestError (the guest reported failure).
        """
        if self.broken:
            raise GuestError(f"{self.module.name}: instance is broken and must be rebuilt")
        if not isinstance(function, str) or function not in self._functions:
            raise UnknownFunction(f"unknown function {function!r}")
        if not isinstance(params, dict):
            raise InvalidParams("params must be a JSON object")
        try:
            data = json.dumps(params, allow_nan=False).encode()
        except (ValueError, TypeError, RecursionError) as e:
            where = _non_json_path(params) or "params"
            raise InvalidParams(f"{function}: {where}: not plain JSON ({e})") from None
        try:
            errs = sorted(self._validators[function].iter_errors(params), key=str)
        except RecursionError:
            raise InvalidParams(f"{function}: params are nested too deeply") from None
        except Exception as e:  # the guest's schema fails on these params
            raise GuestABIError(f"{self.module.name}: schema of {function!r} failed: {e}") from e
        if errs:
            err = errs[0]
            where = ".".join(str(p) for p in err.absolute_path) or "params"
            raise InvalidParams(f"{function}: {where}: {err.message}")
        if ctx is None:  # the `random` import is seeded from the call's own `seed` parameter
            seed = params.get("seed")
            ctx = CallContext(seed=seed if isinstance(seed, int) and seed >= 0 else None)
        lim = self.tenant.limits
        ctx.deadline = min(
            ctx.deadline if ctx.deadline is not None else float("inf"),
            time.monotonic() + lim.call_timeout_seconds,
        )
        self.store.set_fuel(lim.fuel_per_call)
        self.store.set_epoch_deadline(SLICE_TICKS)
        self._deadline_ctx = ctx  # alloc, the call and free all run under its deadline
        try:
            return self._call_locked(function, data, ctx)
        finally:
            self._deadline_ctx = None

    def _call_locked(self, function: str, data: bytes, ctx: CallContext) -> dict[str, Any]:
        ptr = self._call_export("realm_alloc", len(data)) & _U32
        if ptr == 0:
            raise GuestError(f"{self.module.name}: realm_alloc({len(data)}) failed")
        self._ctx = ctx
        try:
            try:
                self._write(ptr, data)
            except _Stop as e:
                raise GuestABIError(
                    f"{self.module.name}: realm_alloc returned a bad pointer: {e}"
                ) from e
            status = self._exports[function](self.store, ptr, len(data))  # type: ignore[operator]
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            self.broken = True
            if ctx.cancelled() and ctx.fatal is None:
                raise CallCancelled(f"{function}: cancelled") from e
            why = ctx.fatal or trap_reason(e)
            raise GuestTrap(f"{self.module.name}.{function} trapped: {why}") from e
        finally:
            self._ctx = None
        if ctx.fatal is not None:  # stopped by the host but returned before the trap landed
            self.broken = True
            raise GuestTrap(f"{self.module.name}.{function} was stopped: {ctx.fatal}")
        with contextlib.suppress(GuestTrap):  # the call's outcome stands; instance marked broken
            self._call_export("realm_free", ptr, len(data))
        if ctx.cancelled() and (status < 0 or ctx.result is None):
            raise CallCancelled(f"{function}: cancelled")
        if status < 0:
            message = (ctx.result or {}).get("error") if ctx.result else None
            parts = [str(message)] if message else []
            if ctx.errors:  # what the host saw go wrong, which the guest cannot read
                parts.append("host: " + "; ".join(ctx.errors))
            why = f"{function} failed: {' | '.join(parts) or f'status {status}'}"
            # the guest's own status says whose fault it is: the caller's params (EINVAL,
            # ENOENT: a model or session that does not exist, ENOTSUP: something the model
            # cannot do), a limit (ELIMIT), or the guest
            if status in (Status.EINVAL, Status.ENOENT, Status.ENOTSUP):
                raise GuestRefusedParams(why)
            if status == Status.ELIMIT:
                raise GuestLimitReached(why)
            raise GuestError(why)
        return ctx.result if ctx.result is not None else {}

    def close(self) -> None:
        self.broken = True
