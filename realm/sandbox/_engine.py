"""The process's wasmtime engine, its module cache and its epoch ticker.

One ``SandboxEngine`` per process: fuel metering and epoch interruption are on for every
store, memory64 is enabled for guests that want large buffers. Modules are compiled once per
content hash and checked against the ABI table (imports and exports) when compiled; each
tenant then instantiates them cheaply in its own store.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Final

import wasmtime

from .._errors import GuestABIError
from ._abi import FUNCTION_PREFIX, HOST_IMPORTS, IMPORT_MODULE

EPOCH_TICK_SECONDS: Final = 0.01  # one epoch per 10 ms: the granularity of call deadlines
# native stack a guest may use (deep recursion traps past it); guests run on threads with the
# default 8 MiB stack, so this must stay well below that
MAX_WASM_STACK_BYTES: Final = 512 << 10
MAX_MODULE_BYTES: Final = 64 << 20  # 64 MiB of wasm

_VALTYPES = {"i32": wasmtime.ValType.i32(), "i64": wasmtime.ValType.i64()}
REQUIRED_FUNCS: Final = {
    "realm_abi_version": ((), ("i32",)),
    "realm_alloc": (("i32",), ("i32",)),
    "realm_free": (("i32", "i32"), ()),
    "realm_metadata_ptr": ((), ("i32",)),
    "realm_metadata_len": ((), ("i32",)),
}


def valtype_name(t: wasmtime.ValType) -> str:
    return str(t)


def host_func_type(name: str) -> wasmtime.FuncType:
    imp = next(i for i in HOST_IMPORTS if i.name == name)
    return wasmtime.FuncType([_VALTYPES[t] for _, t in imp.params], [_VALTYPES[imp.result]])


class GuestModule:
    """A compiled guest module whose imports and exports fit ABI v1."""

    def __init__(self, module: wasmtime.Module, digest: str, name: str) -> None:
        self.module = module
        self.digest = digest
        self.name = name
        self._check()

    def _check(self) -> None:
        known = {i.name: i for i in HOST_IMPORTS}
        for imp in self.module.imports:
            where = f"{self.name}: import {imp.module}.{imp.name}"
            if imp.module != IMPORT_MODULE or imp.name not in known:
                raise GuestABIError(f"{where} is not a Realm host import")
            ty = imp.type
            want = host_func_type(imp.name)
            if not isinstance(ty, wasmtime.FuncType) or (
                [str(p) for p in ty.params],
                [str(r) for r in ty.results],
            ) != ([str(p) for p in want.params], [str(r) for r in want.results]):
                raise GuestABIError(f"{where} has type {ty}, expected {want}")
        exports = {e.name: e.type for e in self.module.exports}
        if not isinstance(exports.get("memory"), wasmtime.MemoryType):
            raise GuestABIError(f"{self.name}: the module does not export its memory as 'memory'")
        for fname, (params, results) in REQUIRED_FUNCS.items():
            ty = exports.get(fname)
            if not isinstance(ty, wasmtime.FuncType):
                raise GuestABIError(f"{self.name}: missing export {fname!r}")
            if ([str(p) for p in ty.params], [str(r) for r in ty.results]) != (
                list(params),
                list(results),
            ):
                raise GuestABIError(f"{self.name}: export {fname!r} has type {ty}")
        self.function_exports = sorted(
            n[len(FUNCTION_PREFIX) :] for n in exports if n.startswith(FUNCTION_PREFIX)
        )


class SandboxEngine:
    """The wasmtime engine shared by every tenant, with a module cache and an epoch ticker.

    Use as a context manager (or ``start``/``close``): the ticker thread that drives epoch
    deadlines lives exactly as long as the engine is open.
    """

    def __init__(
        self,
        *,
        epoch_tick_seconds: float = EPOCH_TICK_SECONDS,
        max_wasm_stack: int = MAX_WASM_STACK_BYTES,
    ) -> None:
        cfg = wasmtime.Config()
        cfg.max_wasm_stack = max_wasm_stack
        cfg.consume_fuel = True
        cfg.epoch_interruption = True
        cfg.wasm_memory64 = True
        cfg.cranelift_opt_level = "speed"
        self.engine = wasmtime.Engine(cfg)
        self.epoch_tick_seconds = epoch_tick_seconds
        self._modules: dict[str, GuestModule] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # --- lifetime ----------------------------------------------------------------------------

    def start(self) -> SandboxEngine:
        if self._ticker is None:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, name="realm-epoch", daemon=True)
            self._ticker.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(self.epoch_tick_seconds):
            self.engine.increment_epoch()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None

    def __enter__(self) -> SandboxEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ticks(self, seconds: float) -> int:
        """Epoch ticks for a deadline ``seconds`` away (at least 1)."""
        return max(1, int(seconds / self.epoch_tick_seconds + 0.999))

    # --- modules -------------------------------------------------------------------------------

    def compile(
        self, wasm: bytes | str | os.PathLike[str], *, name: str | None = None
    ) -> GuestModule:
        """A checked module for these bytes (or this file), compiled once per content hash."""
        if isinstance(wasm, bytes | bytearray):
            data, label = bytes(wasm), name or "<bytes>"
        else:
            p = Path(wasm)
            try:
                data = p.read_bytes()
            except OSError as e:
                raise GuestABIError(f"{p}: cannot read the guest module: {e}") from e
            label = name or p.name
        if not data:
            raise GuestABIError(f"{label}: empty module")
        if len(data) > MAX_MODULE_BYTES:
            raise GuestABIError(f"{label}: module of {len(data)} bytes exceeds {MAX_MODULE_BYTES}")
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            cached = self._modules.get(digest)
        if cached is not None:
            return cached
        try:
            if data[:4] == b"\0asm":
                module = wasmtime.Module(self.engine, data)
            else:  # text format, for tests and hand-written guests
                module = wasmtime.Module(self.engine, data.decode("utf-8"))
        except (wasmtime.WasmtimeError, UnicodeDecodeError) as e:
            raise GuestABIError(f"{label}: not a valid WebAssembly module: {e}") from e
        gm = GuestModule(module, digest, label)
        with self._lock:
            return self._modules.setdefault(digest, gm)

    def cached_modules(self) -> int:
        with self._lock:
            return len(self._modules)
