"""Builders of inline WAT guests for the sandbox tests, and a probe that drives host imports.

``guest_wat(metadata, bodies)`` returns the text of a module that follows guest ABI v1: it
imports the Realm host imports (each as ``$<name>``), exports its memory, the required
``realm_*`` functions and one ``realm_fn_<name>`` per body. Every keyword argument bends one
rule, so hostile or malformed guests are one call away.

Memory layout of every guest built here (offsets in bytes):

- ``ARGS`` (0x100): up to 16 i32 arguments for the probe functions, written by the test;
- ``RET`` (0x180): where probe functions store what the import returned; ``SCRATCH`` (0x1a0..):
  a few i32 slots for the guest's own bookkeeping (counters, statuses);
- ``META`` (0x200): the metadata JSON;
- ``PARAMS`` (0x2000): what ``realm_alloc`` hands out (one allocation at a time, 8 KiB);
- ``DATA`` (0x4000): data segments and the tests' buffers, up to the end of memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from realm.model import Model, load_model
from realm.sandbox import HOST_IMPORTS, CallContext, GuestInstance, SandboxEngine, TenantState
from realm.testing.models import write_test_model

ARGS = 0x100
RET = 0x180
SCRATCH = 0x1A0
META = 0x200
PARAMS = 0x2000
PARAMS_CAP = 0x2000
DATA = 0x4000
PAGE = 0x10000

REQUIRED_EXPORTS = (
    "memory",
    "realm_abi_version",
    "realm_alloc",
    "realm_free",
    "realm_metadata_ptr",
    "realm_metadata_len",
)
_IMPORTS = {imp.name: imp for imp in HOST_IMPORTS}


def wat_bytes(data: bytes | str) -> str:
    """``data`` as the inside of a WAT string literal: every byte escaped as ``\\hh``."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    return "".join(f"\\{b:02x}" for b in raw)


def import_decl(name: str, *, module: str = "realm", params: str | None = None,
                result: str | None = None) -> str:  # fmt: skip
    """The import of host import ``name`` as ``$name`` (its ABI signature unless overridden)."""
    imp = _IMPORTS.get(name)
    ps = params if params is not None else " ".join(t for _, t in imp.params) if imp else ""
    rs = result if result is not None else imp.result if imp else "i32"
    param = f" (param {ps})" if ps else ""
    res = f" (result {rs})" if rs else ""
    return f'(import "{module}" "{name}" (func ${name}{param}{res}))'


def metadata_for(bodies: Iterable[str], schemas: Mapping[str, Any] | None = None) -> dict:
    """Metadata naming each function, with ``{"type": "object"}`` params unless given."""
    schemas = schemas or {}
    return {
        "name": "wat-guest",
        "version": "0.0.0",
        "functions": [
            {"name": n, "description": n, "params": schemas.get(n, {"type": "object"})}
            for n in bodies
        ],
    }


def guest_wat(
    metadata: Mapping[str, Any] | str | bytes | None,
    bodies: Mapping[str, str],
    *,
    imports: Iterable[str] | None = None,
    raw_imports: Sequence[str] = (),
    data: Mapping[int, bytes | str] | None = None,
    abi_version: int = 1,
    memory: str = "2",
    omit: Iterable[str] = (),
    extra: str = "",
    alloc_body: str | None = None,
    free_body: str = "",
    metadata_len: int | None = None,
    metadata_ptr: int | None = None,
    start: str | None = None,
) -> str:
    """The text of a guest module.

    Args:
        metadata: a dict (JSON-encoded), raw text/bytes (written as is, for malformed
            metadata), or None for ``metadata_for(bodies)``.
        bodies: function name -> body of ``realm_fn_<name> (param $ptr i32) (param $len i32)
            (result i32)``; a body may start with ``(local ...)`` declarations.
        imports: host imports to declare (default: all of them); ``raw_imports``: extra
            import lines as written (wrong module, wrong signature...).
        data: extra data segments, address -> bytes (escaped).
        abi_version: what ``realm_abi_version`` returns.
        memory: the memory's limits in pages ("2", "1 4").
        omit: required exports to leave out ("memory", "realm_alloc", ...).
        extra: module fields added as is (helper functions, globals).
        alloc_body, free_body: bodies of ``realm_alloc`` (param $size) and ``realm_free``.
        metadata_len, metadata_ptr: what ``realm_metadata_len/ptr`` return (default: the truth;
            the metadata sits at META, or at DATA when it is too long for META).
        start: the body of a start function, when given.
    """
    if metadata is None:
        metadata = metadata_for(bodies)
    meta = (
        metadata.encode("utf-8")
        if isinstance(metadata, str)
        else bytes(metadata)
        if isinstance(metadata, bytes | bytearray)
        else json.dumps(metadata).encode("utf-8")
    )
    meta_at = META if META + len(meta) <= PARAMS else DATA  # long metadata goes to DATA
    omit = set(omit)
    names = list(_IMPORTS) if imports is None else list(imports)
    lines = ["(module"]
    lines += ["  " + import_decl(n) for n in names]
    lines += ["  " + r for r in raw_imports]
    mem_export = "" if "memory" in omit else ' (export "memory")'
    lines.append(f"  (memory{mem_export} {memory})")
    lines.append(f'  (data (i32.const {meta_at}) "{wat_bytes(meta)}")')
    for addr, blob in sorted((data or {}).items()):
        lines.append(f'  (data (i32.const {addr}) "{wat_bytes(blob)}")')
    if alloc_body is None:
        alloc_body = (
            f"(if (result i32) (i32.le_u (local.get $size) (i32.const {PARAMS_CAP}))"
            f" (then (i32.const {PARAMS})) (else (i32.const 0)))"
        )
    required = {
        "realm_abi_version": f"(result i32) (i32.const {abi_version})",
        "realm_alloc": f"(param $size i32) (result i32) {alloc_body}",
        "realm_free": f"(param $p i32) (param $n i32) {free_body}",
        "realm_metadata_ptr": (
            f"(result i32) (i32.const {meta_at if metadata_ptr is None else metadata_ptr})"
        ),
        "realm_metadata_len": (
            f"(result i32) (i32.const {len(meta) if metadata_len is None else metadata_len})"
        ),
    }
    for name, body in required.items():
        if name not in omit:
            lines.append(f'  (func (export "{name}") {body})')
    for name, body in bodies.items():
        lines.append(
            f'  (func $fn_{name} (export "realm_fn_{name}") (param $ptr i32) (param $len i32)'
            f" (result i32)\n    {body})"
        )
    lines.append("  (func $checkpoint)")  # calling it is a fuel check (see probe_bodies)
    if start is not None:
        lines.append(f"  (func $start {start})")
        lines.append("  (start $start)")
    if extra:
        lines.append(extra)
    lines.append(")")
    return "\n".join(lines)


# --- the probe: one function per host import, arguments from ARGS, result to RET ----------------


def probe_bodies() -> dict[str, str]:
    """``realm_fn_<import>`` for every host import: call it with the i32 arguments at ARGS and
    store what it returns at RET (i64 for clock_ms); the function itself returns 0.

    After the import the probe calls an empty function, as compiled code soon would: a
    function entry is where wasmtime checks fuel, so a guest the host stopped (fuel set to
    zero) traps there. (Straight-line code that returns without such a check is a separate
    case, tested in test_hostile_guests.)"""
    out = {}
    for imp in HOST_IMPORTS:
        args = " ".join(f"(i32.load (i32.const {ARGS + 4 * i}))" for i in range(len(imp.params)))
        store = "i64.store" if imp.result == "i64" else "i32.store"
        call = f"({store} (i32.const {RET}) (call ${imp.name} {args}))"
        out[imp.name] = f"{call} (call $checkpoint) (i32.const 0)"
    return out


PROBE_WAT = guest_wat(None, probe_bodies(), memory="4")


class Probe:
    """A probe guest instance: ``probe(name, *args)`` calls host import ``name`` with exactly
    these i32 arguments and returns its result. Buffers live in guest memory from DATA on."""

    def __init__(self, engine: SandboxEngine, tenant: TenantState, wat: str = PROBE_WAT) -> None:
        self.engine = engine
        self.tenant = tenant
        self.module = engine.compile(wat.encode(), name="probe")
        self.inst = GuestInstance(engine, self.module, tenant)
        self._next = DATA
        self.result: dict[str, Any] = {}

    def __call__(self, name: str, *args: int, ctx: CallContext | None = None) -> int:
        imp = _IMPORTS[name]
        assert len(args) == len(imp.params), (name, args)
        self.write(ARGS, b"".join(struct.pack("<I", a & 0xFFFFFFFF) for a in args))
        self.write(RET, b"\xa5" * 8)  # a stale result never passes for a fresh one
        self.result = self.inst.call(name, {}, ctx)  # what the call returned (result import)
        fmt = "<q" if imp.result == "i64" else "<i"
        return struct.unpack(fmt, self.read(RET, struct.calcsize(fmt)))[0]

    # memory access from the test's side
    def write(self, addr: int, data: bytes) -> None:
        self.inst.memory.write(self.inst.store, data, addr)

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.inst.memory.read(self.inst.store, addr, addr + n))

    def size(self) -> int:
        return self.inst.memory.data_len(self.inst.store)

    def put(self, data: bytes | str | np.ndarray, *, align: int = 16) -> tuple[int, int]:
        """Copy ``data`` to fresh guest memory; returns (address, length in bytes)."""
        raw = (
            data.tobytes()
            if isinstance(data, np.ndarray)
            else data.encode()
            if isinstance(data, str)
            else data
        )
        addr = (self._next + align - 1) // align * align
        self._next = addr + max(len(raw), 1)
        assert self._next <= self.size(), "probe memory exhausted"
        self.write(addr, raw)
        return addr, len(raw)

    def reset(self) -> None:
        """Forget every buffer ``put`` handed out (the memory is reused from DATA on)."""
        self._next = DATA

    def buffer(self, n_bytes: int, *, fill: int = 0xA5, align: int = 16) -> int:
        """A fresh buffer of ``n_bytes`` filled with ``fill`` (to see what was written)."""
        return self.put(bytes([fill]) * n_bytes, align=align)[0]

    def i32s(self, addr: int, n: int) -> list[int]:
        return list(struct.unpack(f"<{n}i", self.read(addr, 4 * n))) if n else []

    def f32s(self, addr: int, n: int) -> np.ndarray:
        return np.frombuffer(self.read(addr, 4 * n), dtype="<f4").copy()

    def scratch(self, i: int) -> int:
        """The i-th i32 of the SCRATCH slots (a guest's counters and statuses)."""
        return struct.unpack("<i", self.read(SCRATCH + 4 * i, 4))[0]


def scratch_i32(inst: GuestInstance, i: int) -> int:
    """The i-th i32 SCRATCH slot of any guest built here."""
    raw = bytes(inst.memory.read(inst.store, SCRATCH + 4 * i, SCRATCH + 4 * i + 4))
    return struct.unpack("<i", raw)[0]


def write_tiny_model(directory: Path) -> Model:
    """The tiny GGUF test model (llama, 587-token SentencePiece vocabulary, no chat template)."""
    return load_model(write_test_model(directory / "tiny.gguf"))
