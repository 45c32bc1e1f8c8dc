"""The process's wasmtime engine, its module cache and its epoch ticker.

One ``SandboxEngine`` per process: fuel metering and epoch interruption are on for every
store, memory64 is enabled for guests that want large buffers. Modules are compiled once per
content hash and checked against the ABI table (imports and exports) when compiled; each
tenant then instantiates them cheaply in its own store.

A module is guest input, and compiling it is guest-controlled work: 800 functions of 50k
locals took 5-11 s. So before compiling, the module's binary is read for its shape (size,
function count, locals per function and in all, the size of each body) and refused past the
limits below; the compile itself runs in its own thread under ``compile_seconds``, at most
``MAX_CONCURRENT_COMPILES`` at once; and a module refused for any reason is remembered by its
hash and refused at once the next time. ``compile`` blocks: callers on an event loop run it
in a worker thread.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Final

import attrs
import wasmtime

from .._errors import GuestABIError
from ._abi import FUNCTION_PREFIX, HOST_IMPORTS, IMPORT_MODULE
from ._deadline import check_bindings

EPOCH_TICK_SECONDS: Final = 0.01  # one epoch per 10 ms: the granularity of call deadlines
# native stack a guest may use (deep recursion traps past it); guests run on threads with the
# default 8 MiB stack, so this must stay well below that
MAX_WASM_STACK_BYTES: Final = 512 << 10
MAX_MODULE_BYTES: Final = 16 << 20  # 16 MiB of wasm (the default guest is 55 KiB)
MAX_FUNCTIONS: Final = 20_000  # defined and imported
MAX_LOCALS_PER_FUNCTION: Final = 10_000
MAX_TOTAL_LOCALS: Final = 1 << 20  # compile time grows with them: 2^20 is ~0.2 s
MAX_FUNCTION_BODY_BYTES: Final = 1 << 20
COMPILE_SECONDS: Final = 10.0  # a compile still running after this is given up (refused)
MAX_CONCURRENT_COMPILES: Final = 2
MAX_REFUSED: Final = 4096  # refusals remembered (oldest forgotten first)

_VALTYPES = {"i32": wasmtime.ValType.i32(), "i64": wasmtime.ValType.i64()}
REQUIRED_FUNCS: Final = {
    "realm_abi_version": ((), ("i32",)),
    "realm_alloc": (("i32",), ("i32",)),
    "realm_free": (("i32", "i32"), ()),
    "realm_metadata_ptr": ((), ("i32",)),
    "realm_metadata_len": ((), ("i32",)),
}
FUNCTION_SIGNATURE: Final = (("i32", "i32"), ("i32",))  # realm_fn_<name>(ptr, len) -> status


def host_func_type(name: str) -> wasmtime.FuncType:
    imp = next(i for i in HOST_IMPORTS if i.name == name)
    return wasmtime.FuncType([_VALTYPES[t] for _, t in imp.params], [_VALTYPES[imp.result]])


def _signature(ty: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results)


def describe_type(ty: object) -> str:
    """A wasm extern type as people write it: ``func(i32, i64) -> i32``, ``memory``, ..."""
    if isinstance(ty, wasmtime.FuncType):
        params, results = _signature(ty)
        out = ", ".join(results)
        return f"func({', '.join(params)}) -> {out or '()'}"
    return type(ty).__name__.removesuffix("Type").lower() if ty is not None else "nothing"


# --- the shape of a module, read from its binary -------------------------------------------------


@attrs.frozen
class ModuleShape:
    functions: int  # imported and defined
    max_locals: int  # in one function
    total_locals: int
    max_body_bytes: int


class _Reader:
    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ValueError("unexpected end")
        self.pos += 1
        return self.data[self.pos - 1]

    def uleb(self, max_bytes: int = 5) -> int:
        result = shift = 0
        for _ in range(max_bytes):
            b = self.byte()
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7
        raise ValueError("LEB128 integer too long")

    def skip(self, n: int) -> None:
        if n > self.end - self.pos:
            raise ValueError("unexpected end")
        self.pos += n

    def limits(self) -> None:
        flags = self.byte()
        self.uleb(10)
        if flags & 1:
            self.uleb(10)


def module_shape(data: bytes) -> ModuleShape:
    """Count a binary module's functions and locals (ValueError if it cannot be read)."""
    if data[:4] != b"\0asm" or len(data) < 8:
        raise ValueError("not a WebAssembly binary")
    r = _Reader(data, 8)
    functions = max_locals = total_locals = max_body = 0
    while r.pos < r.end:
        section = r.byte()
        size = r.uleb()
        end = r.pos + size
        if end > r.end:
            raise ValueError("a section runs past the end")
        s = _Reader(data, r.pos, end)
        if section == 2:  # imports: count the functions
            for _ in range(s.uleb()):
                s.skip(s.uleb())  # module name
                s.skip(s.uleb())  # field name
                kind = s.byte()
                if kind == 0:  # function: its type index
                    functions += 1
                    s.uleb()
                elif kind == 1:  # table: element type, limits
                    s.byte()
                    s.limits()
                elif kind == 2:  # memory
                    s.limits()
                elif kind == 3:  # global: value type, mutability
                    s.byte()
                    s.byte()
                elif kind == 4:  # tag
                    s.byte()
                    s.uleb()
                else:
                    raise ValueError(f"import kind {kind}")
        elif section == 3:
            functions += s.uleb()
        elif section == 10:  # code: the locals of each body
            for _ in range(s.uleb()):
                body = s.uleb()
                max_body = max(max_body, body)
                b = _Reader(data, s.pos, s.pos + body)
                count = 0
                for _ in range(b.uleb()):
                    count += b.uleb()
                    if b.byte() in (0x63, 0x64):  # (ref null? heaptype): the heap type follows
                        b.uleb()
                max_locals = max(max_locals, count)
                total_locals += count
                s.skip(body)
        r.pos = end
    return ModuleShape(functions, max_locals, total_locals, max_body)


def check_shape(shape: ModuleShape) -> str | None:
    """Why a module of this shape is refused (None: it is within the limits)."""
    if shape.functions > MAX_FUNCTIONS:
        return f"{shape.functions} functions (the limit is {MAX_FUNCTIONS})"
    if shape.max_locals > MAX_LOCALS_PER_FUNCTION:
        return f"a function with {shape.max_locals} locals (limit {MAX_LOCALS_PER_FUNCTION})"
    if shape.total_locals > MAX_TOTAL_LOCALS:
        return f"{shape.total_locals} locals in all (the limit is {MAX_TOTAL_LOCALS})"
    if shape.max_body_bytes > MAX_FUNCTION_BODY_BYTES:
        return f"a function body of {shape.max_body_bytes} bytes (limit {MAX_FUNCTION_BODY_BYTES})"
    return None


# --- modules -------------------------------------------------------------------------------------


class GuestModule:
    """A compiled guest module whose imports and exports fit ABI v1."""

    def __init__(self, module: wasmtime.Module, digest: str, name: str) -> None:
        self.module = module
        self.digest = digest
        self.name = name
        self.metadata: dict[str, Any] | None = None  # read by the first instance
        self.validators: dict[str, Any] = {}  # params validators, built with the metadata
        self._check()

    def _check(self) -> None:
        known = {i.name: i for i in HOST_IMPORTS}
        for imp in self.module.imports:
            where = f"{self.name}: import {imp.module}.{imp.name}"
            if imp.module != IMPORT_MODULE or imp.name not in known:
                raise GuestABIError(f"{where} is not a Realm host import")
            ty = imp.type
            want = host_func_type(imp.name)
            if not isinstance(ty, wasmtime.FuncType) or _signature(ty) != _signature(want):
                raise GuestABIError(
                    f"{where} has type {describe_type(ty)}, expected {describe_type(want)}"
                )
        exports = {e.name: e.type for e in self.module.exports}
        if not isinstance(exports.get("memory"), wasmtime.MemoryType):
            raise GuestABIError(f"{self.name}: the module does not export its memory as 'memory'")
        for fname, sig in REQUIRED_FUNCS.items():
            ty = exports.get(fname)
            if not isinstance(ty, wasmtime.FuncType):
                raise GuestABIError(f"{self.name}: missing export {fname!r}")
            if _signature(ty) != sig:
                raise GuestABIError(
                    f"{self.name}: export {fname!r} has type {describe_type(ty)}, expected "
                    f"func({', '.join(sig[0])}) -> {', '.join(sig[1]) or '()'}"
                )
        functions = []
        for n, ty in exports.items():
            if not n.startswith(FUNCTION_PREFIX):
                continue
            if not isinstance(ty, wasmtime.FuncType) or _signature(ty) != FUNCTION_SIGNATURE:
                raise GuestABIError(
                    f"{self.name}: export {n[:160]!r} has type {describe_type(ty)}; a callable "
                    "function is func(i32, i32) -> i32"
                )
            functions.append(n[len(FUNCTION_PREFIX) :])
        self.function_exports = sorted(functions)


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
        compile_seconds: float = COMPILE_SECONDS,
    ) -> None:
        check_bindings()
        cfg = wasmtime.Config()
        cfg.max_wasm_stack = max_wasm_stack
        cfg.consume_fuel = True
        cfg.epoch_interruption = True
        cfg.wasm_memory64 = True
        cfg.cranelift_opt_level = "speed"
        self.engine = wasmtime.Engine(cfg)
        self.epoch_tick_seconds = epoch_tick_seconds
        self.compile_seconds = compile_seconds
        self._modules: dict[str, GuestModule] = {}
        self._refused: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._compiles = threading.BoundedSemaphore(MAX_CONCURRENT_COMPILES)
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
        """A checked module for these bytes (or this file), compiled once per content hash.

        Blocks for up to ``compile_seconds``; raises GuestABIError for a module that is not
        valid, breaks the ABI or a limit, or was refused before (at once, by its hash).
        """
        if isinstance(wasm, bytes | bytearray):
            data, label = bytes(wasm), name or "<bytes>"
        else:
            p = Path(wasm)
            try:
                size = p.stat().st_size
                if size > MAX_MODULE_BYTES:
                    raise GuestABIError(
                        f"{p.name}: module of {size} bytes exceeds {MAX_MODULE_BYTES}"
                    )
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
            refused = self._refused.get(digest)
        if cached is not None:
            return cached
        if refused is not None:
            raise GuestABIError(f"{label}: refused before (same module): {refused}")
        try:
            gm = GuestModule(self._compile_checked(data, label), digest, label)
        except GuestABIError as e:
            self._refuse(digest, str(e))
            raise
        with self._lock:
            return self._modules.setdefault(digest, gm)

    def _refuse(self, digest: str, why: str) -> None:
        with self._lock:
            self._refused[digest] = why
            while len(self._refused) > MAX_REFUSED:
                self._refused.popitem(last=False)

    def _compile_checked(self, data: bytes, label: str) -> wasmtime.Module:
        try:
            binary = data if data[:4] == b"\0asm" else wasmtime.wat2wasm(data.decode("utf-8"))
        except (wasmtime.WasmtimeError, UnicodeDecodeError) as e:
            raise GuestABIError(f"{label}: not a valid WebAssembly module: {e}") from e
        try:
            shape = module_shape(bytes(binary))
        except (ValueError, IndexError) as e:
            raise GuestABIError(f"{label}: not a valid WebAssembly module: {e}") from e
        why = check_shape(shape)
        if why is not None:
            raise GuestABIError(f"{label}: the module has {why}")
        return self._compile_bounded(bytes(binary), label)

    def _compile_bounded(self, binary: bytes, label: str) -> wasmtime.Module:
        """Compile in a thread of its own, given up after ``compile_seconds`` (that thread
        then finishes in the background, holding one of the compile slots)."""
        if not self._compiles.acquire(timeout=self.compile_seconds):
            raise GuestABIError(f"{label}: every compile slot stayed busy; try again")
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["module"] = wasmtime.Module(self.engine, binary)
            except BaseException as e:
                box["error"] = e
            finally:
                self._compiles.release()

        t = threading.Thread(target=run, name="realm-compile", daemon=True)
        t.start()
        t.join(self.compile_seconds)
        if t.is_alive():
            raise GuestABIError(f"{label}: compiling took over {self.compile_seconds:g} s")
        err = box.get("error")
        if isinstance(err, wasmtime.WasmtimeError):
            raise GuestABIError(f"{label}: not a valid WebAssembly module: {err}") from err
        if err is not None:
            raise err
        return box["module"]

    def is_refused(self, wasm: bytes) -> bool:
        with self._lock:
            return hashlib.sha256(wasm).hexdigest() in self._refused

    def cached_modules(self) -> int:
        with self._lock:
            return len(self._modules)
