"""A tenant's guest instance: its store and limits, and calls into it.

The pieces live apart: the checked views of guest memory in ``_memory``, the host imports in
``_imports`` (one function per ABI row), deadlines and cancels in ``_deadline``, metadata and
params schemas in ``_schema``. This module builds an instance from them and runs calls: it
validates params before entering the guest, runs the function under the call's fuel, epoch
deadline and work budget, checks what the guest returned as it would check a client's input,
closes the sessions a call opened when the call ends badly, and maps every ending to one
error of the tree.
"""

from __future__ import annotations

import contextlib
import json
import time
import weakref
from typing import Any, Final

import wasmtime

from .._errors import (
    CallCancelled,
    DeadlineExceeded,
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
from ._compute import COMPUTE, Interrupted
from ._context import MAX_TEXT_BYTES, CallContext, TenantState
from ._deadline import EpochDeadline
from ._engine import REQUIRED_FUNCS, GuestModule, SandboxEngine, host_func_type
from ._imports import guard
from ._memory import U32, Fail, GuestMemory, Stop
from ._schema import MAX_METADATA_BYTES, read_metadata, validators

SAFE_INT: Final = 2**53  # usage figures above this are refused (JSON readers lose precision)
MAX_ERROR_CHARS: Final = 2000  # of a guest's error message
MAX_RESULT_DEPTH: Final = 30  # objects and arrays in a result (a message nests 32 at most)


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


def _depth(value: Any) -> int:
    """How deeply a parsed JSON value nests (iteratively: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def check_result(result: dict[str, Any]) -> str | None:
    """What is wrong with a guest's result object, as a caller would see it (None: fine)."""
    if _depth(result) > MAX_RESULT_DEPTH:
        return f"result nests deeper than {MAX_RESULT_DEPTH} levels"
    usage = result.get("usage")
    if usage is not None:
        if not isinstance(usage, dict):
            return "result.usage must be an object"
        for k, v in usage.items():
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= SAFE_INT:
                return f"result.usage.{str(k)[:64]} must be an integer in [0, 2^53], not {v!r:.64}"
    timings = result.get("timings")
    if timings is not None and not isinstance(timings, dict):
        return "result.timings must be an object"
    return None


def stopped_error(what: str, ctx: CallContext) -> CallCancelled:
    """The error of a call the host stopped: TIMEOUT past its deadline, else CANCELLED."""
    if ctx.timed_out():
        return DeadlineExceeded(f"{what}: the call's deadline passed")
    return CallCancelled(f"{what}: cancelled")


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
        lim = tenant.limits
        self._deadline_ctx: CallContext | None = CallContext(
            deadline=time.monotonic() + lim.call_timeout_seconds
        )
        self.store = wasmtime.Store(engine.engine)
        self.store.set_limits(memory_size=lim.max_memory_bytes, table_elements=100_000,
                              instances=1, tables=4, memories=1)  # fmt: skip
        self.store.set_fuel(lim.fuel_per_call)
        self.store.set_epoch_deadline(engine.ticks(lim.call_timeout_seconds))
        self._epoch = EpochDeadline(self.store, self._deadline_call, COMPUTE.wasm_pause)
        me = weakref.proxy(self)  # the linker's functions must not keep the instance alive
        linker = wasmtime.Linker(engine.engine)
        for imp in HOST_IMPORTS:
            linker.define_func("realm", imp.name, host_func_type(imp.name), guard(me, imp.name))
        try:
            self.instance = linker.instantiate(self.store, module.module)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            raise GuestABIError(f"{module.name}: instantiation failed: {trap_reason(e)}") from e
        ex = self.instance.exports(self.store)
        self.memory: wasmtime.Memory = ex["memory"]  # type: ignore[assignment]
        self.mem = GuestMemory(self.memory, self.store)
        self._required = {n: ex[n] for n in REQUIRED_FUNCS}  # looked up once, called per call
        version = self._call_export("realm_abi_version")
        if version != ABI_VERSION:
            raise GuestABIError(
                f"{module.name} was built for guest ABI version {version}; this host speaks "
                f"version {ABI_VERSION}"
            )
        if module.metadata is None:  # the same bytes give the same metadata: read it once
            meta = self._read_metadata()
            module.validators = validators(meta, module.name)
            module.metadata = meta
        self.metadata = module.metadata
        self._validators = module.validators
        self._functions = {f["name"]: f for f in self.metadata["functions"]}
        self._exports = {n: ex[FUNCTION_PREFIX + n] for n in self._functions}
        self._deadline_ctx = None

    def current_call(self) -> CallContext | None:
        """The call whose imports are running (None between calls)."""
        return self._ctx

    def _deadline_call(self) -> CallContext | None:
        return self._deadline_ctx

    # --- exports ---------------------------------------------------------------------------

    def _call_export(self, name: str, *args: int) -> Any:
        try:
            return self._required[name](self.store, *args)  # type: ignore[operator]
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            self.broken = True
            raise GuestTrap(f"{self.module.name}: {name} trapped: {trap_reason(e)}") from e

    def _read_metadata(self) -> dict[str, Any]:
        ptr = self._call_export("realm_metadata_ptr") & U32
        n = self._call_export("realm_metadata_len") & U32
        if n > MAX_METADATA_BYTES:
            raise GuestABIError(f"{self.module.name}: metadata of {n} bytes is too large")
        try:
            raw = self.mem.read(ptr, n)
        except (Stop, Fail) as e:
            raise GuestABIError(f"{self.module.name}: unreadable metadata: {e!r}") from e
        return read_metadata(raw, self.module.function_exports, self.module.name)

    def stop_guest(self, ctx: CallContext, why: str) -> None:
        """Stop the running guest from inside an import: it traps at its next fuel check."""
        ctx.fatal = ctx.fatal or why
        with contextlib.suppress(wasmtime.WasmtimeError):
            self.store.set_fuel(0)

    # --- calls ------------------------------------------------------------------------------------

    def functions(self) -> list[dict[str, Any]]:
        return list(self.metadata["functions"])

    def call(self, function: str, params: Any, ctx: CallContext | None = None) -> dict[str, Any]:
        """Run ``function`` with ``params`` (a JSON object) and return its result object.

        Raises UnknownFunction, InvalidParams (before entering the guest), CallCancelled or
        DeadlineExceeded (TIMEOUT), GuestTrap (the instance is then ``broken``) or GuestError
        (the guest reported failure, or returned something the host refuses).
        """
        if self.broken:
            raise GuestError(f"{self.module.name}: instance is broken and must be rebuilt")
        if not isinstance(function, str) or function not in self._functions:
            raise UnknownFunction(f"unknown function {str(function)[:128]!r}")
        if not isinstance(params, dict):
            raise InvalidParams("params must be a JSON object")
        try:
            data = json.dumps(params, allow_nan=False).encode()
        except (ValueError, TypeError, RecursionError) as e:
            where = _non_json_path(params) or "params"
            raise InvalidParams(f"{function}: {where}: not plain JSON ({e})") from None
        if len(data) > MAX_TEXT_BYTES:
            raise InvalidParams(f"{function}: params of {len(data)} bytes exceed {MAX_TEXT_BYTES}")
        if ctx is None:  # the `random` import is seeded from the call's own `seed` parameter
            seed = params.get("seed")
            ctx = CallContext(seed=seed if isinstance(seed, int) and seed >= 0 else None)
        lim = self.tenant.limits
        ctx.deadline = min(
            ctx.deadline if ctx.deadline is not None else float("inf"),
            time.monotonic() + lim.call_timeout_seconds,
        )
        self._validate(function, params, ctx)
        self.store.set_fuel(lim.fuel_per_call)
        self.store.set_epoch_deadline(1)  # the callback runs at the next tick, then every slice
        self._deadline_ctx = ctx  # alloc, the call and free all run under its deadline
        ctx.wasm_since = time.monotonic()
        ended_badly = True
        try:
            status = self._run(function, data, ctx)
            ended_badly = ctx.cancelled()
        except RealmError:
            raise
        except Exception as e:  # whatever the host failed on, it was handling the guest
            self.broken = True
            raise GuestTrap(f"{self.module.name}.{function}: the host failed: {e!r}") from e
        finally:
            self._deadline_ctx = None
            self.tenant.end_call(ctx, abnormal=ended_badly or self.broken)
        return self._outcome(function, status, ctx)

    def _validate(self, function: str, params: dict[str, Any], ctx: CallContext) -> None:
        """Params against the guest's schema: guest-controlled Python work, sliced (and
        interrupted by a cancel or the deadline) like an import's."""
        try:
            with COMPUTE.guest_python(ctx):
                errs = sorted(self._validators[function].iter_errors(params), key=str)
        except Interrupted:
            raise stopped_error(f"{function}: checking the params", ctx) from None
        except RecursionError:
            raise InvalidParams(f"{function}: params are nested too deeply") from None
        except GuestError:
            raise
        except Exception as e:  # the guest's schema fails on these params
            raise GuestABIError(f"{self.module.name}: schema of {function!r} failed: {e}") from e
        if errs:
            err = errs[0]
            where = ".".join(str(p) for p in err.absolute_path) or "params"
            raise InvalidParams(f"{function}: {where}: {err.message}")

    def _run(self, function: str, data: bytes, ctx: CallContext) -> int:
        """Enter the guest; return its status (or raise the error of a trap or a stop)."""
        ptr = self._call_export("realm_alloc", len(data)) & U32
        if ptr == 0:
            raise GuestError(f"{self.module.name}: realm_alloc({len(data)}) failed")
        self._ctx = ctx
        try:
            try:
                self.mem.write(ptr, data)
            except Stop as e:
                raise GuestABIError(
                    f"{self.module.name}: realm_alloc returned a bad pointer: {e}"
                ) from e
            status = int(self._exports[function](self.store, ptr, len(data)))  # type: ignore[operator]
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            self.broken = True
            if ctx.cancelled() and ctx.fatal is None:
                raise stopped_error(function, ctx) from e
            why = ctx.fatal or trap_reason(e)
            raise GuestTrap(f"{self.module.name}.{function} trapped: {why}") from e
        finally:
            self._ctx = None
        if ctx.fatal is not None:  # stopped by the host but returned before the trap landed
            self.broken = True
            raise GuestTrap(f"{self.module.name}.{function} was stopped: {ctx.fatal}")
        with contextlib.suppress(GuestTrap):  # the call's outcome stands; instance marked broken
            self._call_export("realm_free", ptr, len(data))
        return status

    def _outcome(self, function: str, status: int, ctx: CallContext) -> dict[str, Any]:
        """The call's result, or the error its status and result say."""
        if ctx.cancelled() and (status < 0 or ctx.result is None):
            raise stopped_error(function, ctx)
        if status < 0:
            message = ctx.result.get("error") if ctx.result else None
            parts = [str(message)[:MAX_ERROR_CHARS]] if message else []
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
        result = ctx.result if ctx.result is not None else {}
        problem = check_result(result)
        if problem is not None:
            raise GuestError(f"{self.module.name}.{function} returned a bad result: {problem}")
        return result

    def close(self) -> None:
        self.broken = True
