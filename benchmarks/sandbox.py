"""Sandbox benchmarks: what a guest call, a host import and the default guest's sampling cost.

    python -m benchmarks.sandbox [--quick] [--json] [--threads N] [--only SUBSTRING]

Limits and peers, measured in the same run (at the start, and again interleaved with the case
that is compared with them):
    json       ``json.dumps`` + ``json.loads`` of a call's params: the least a JSON call costs.
    ctypes     a Python -> C -> Python round trip through a ctypes callback that does nothing.
    wasmtime   a wasm -> Python -> wasm round trip of a no-op host function defined straight on
               a wasmtime ``Linker`` (no Realm guard), in the same engine (fuel and epochs on):
               wasmtime-py's own cost of a host import, the "trampoline". It grows with the
               import's arguments (~0.4 µs each), so it is measured with none (``clock_ms``'s
               signature) and with six i32 (``forward``'s), and interpolated in between.

Cases:
    empty call       an inline WAT guest whose function only calls ``result`` with ``{}``,
                     called through ``GuestInstance.call`` end to end (a fresh ``CallContext``,
                     params to JSON, schema validation, ``realm_alloc``, the call, the
                     ``result`` import, ``realm_free``), with params ``{}`` and with a small
                     generate-like object; over the json peer. Rows break the call down:
                     ``CallContext()`` alone, schema validation alone, a bare export call.
    import round trip
                     an inline WAT guest function that calls ``clock_ms`` 10000 times in a
                     loop: seconds per import (the call's fixed cost, the empty call's,
                     subtracted) over the bare wasmtime round trip; also Realm's guard alone
                     (the Python closure called directly) and the ctypes round trip.
    sampling <model> <params>
                     the default guest's ``generate`` on a 32000-token vocabulary, timed from
                     the inside: every host import is timed (a ``GuestInstance`` subclass wraps
                     them), the forward steps are timed (``TenantState(forward=...)`` around
                     ``direct_forward``), and the guest export call is timed. Then
                         guest = export call - time inside imports - trampolines
                         host  = time inside imports - forward steps + trampolines
                     (trampolines: each import call's bare round trip for its arity)
                     and guest / completion tokens is the guest's work per token (sampling,
                     penalties, stop-string and text handling, and its share of the call's
                     fixed work: parsing params, the result JSON). Models: "tinyllama", the
                     TinyLlama-1.1B-shaped Q8_0 model ``benchmarks.models`` caches under
                     ``~/.cache/realm/bench/`` (used only if that file exists: run
                     ``python -m benchmarks.models --quick`` once to write it), and "small", a
                     1-layer, 64-wide llama with the same vocabulary written to a temporary
                     directory (its forward step is short, so the guest's share is larger and
                     its figure is the steadier one). Params: "default" (the guest's defaults:
                     top_k 40, top_p 0.95, min_p 0.05, temperature 0.8, no repeat penalty) and
                     "wide" (top_k 0, so top-p and min-p sort through the whole vocabulary: the
                     expensive path).
                     Random weights give flat logits, which is the worst case for top-p.

Target: the guest's work per token <= 5% of a TinyLlama-shaped Q8_0 forward step (the median
one-token step inside the same generate calls). Without the cached TinyLlama file (or when
``--only`` leaves it out) guest/tok is over the small model's step instead, and the target is
not checked (the run says so).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import numpy as np
import wasmtime

from realm import kernels
from realm.model import Model, Session, load_model
from realm.sandbox import (
    HOST_IMPORTS,
    CallContext,
    GuestInstance,
    SandboxEngine,
    TenantState,
    default_guest_path,
)
from realm.sandbox._context import direct_forward
from realm.testing import write_test_model

from ._common import (
    Budget,
    Limit,
    Reporter,
    Result,
    Target,
    Timing,
    argument_parser,
    describe_machine,
    format_seconds,
    time_call,
    time_calls,
)

SUITE: Final = "sandbox"
VOCAB: Final = 32000
IMPORT_LOOP: Final = 10_000  # clock_ms calls per loop-guest call
RECIPES_IMPORT_SECONDS: Final = 27e-6  # RECIPES.md: a host-import round trip, measured earlier
GUEST_MAX_FRACTION: Final = 0.05  # target: guest work per token / TinyLlama forward step
PROMPT: Final = "Once upon a time, in a small village by the sea,"
GEN_SEED: Final = 1234
IDLE_SECONDS: Final = 0.02  # pause between generate samples (the pool's spinning threads)

# the params of the non-empty "empty call": what a small generate call carries
CALL_PARAMS: Final = {"prompt": "Hello, world", "max_tokens": 16, "temperature": 0.8}
CALL_SCHEMA: Final = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "maxLength": 100000},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0},
    },
    "additionalProperties": False,
}
SAMPLING: Final = {
    "default": {},
    "wide": {"top_k": 0, "top_p": 0.95, "min_p": 0.05},
}
SMALL_SHAPE: Final = {"n_layers": 1, "n_embd": 64, "n_heads": 4, "n_kv_heads": 2, "n_ff": 128}


@attrs.frozen
class Profile:
    """Sizes and repetitions of a full or a ``--quick`` run."""

    calls: Budget  # fast calls (microseconds)
    loops: Budget  # the 10000-import loop (tens of milliseconds a call)
    gen: Budget  # generate calls (one sample = one call)
    small_tokens: int  # max_tokens of a generate call on the small model
    tiny_tokens: int  # ... on the TinyLlama-shaped model


FULL: Final = Profile(
    calls=Budget(warmup=5, min_reps=7, max_reps=50, seconds=1.0),
    loops=Budget(warmup=1, min_reps=5, max_reps=15, seconds=2.0),
    gen=Budget(warmup=1, min_reps=5, max_reps=10, seconds=5.0),
    small_tokens=128,
    tiny_tokens=48,
)
QUICK: Final = Profile(
    calls=Budget(warmup=3, min_reps=5, max_reps=15, seconds=0.3),
    loops=Budget(warmup=1, min_reps=3, max_reps=3, seconds=0.0),
    gen=Budget(warmup=1, min_reps=3, max_reps=3, seconds=0.0),
    small_tokens=64,
    tiny_tokens=16,
)


# --- the inline WAT guest ----------------------------------------------------------------

_META_AT: Final = 0x200
_EMPTY_AT: Final = 0x100  # the constant "{}" handed to `result`
_PARAMS_AT: Final = 0x1000  # what realm_alloc hands out (one allocation at a time)
_PARAMS_CAP: Final = 0xF000


def _wat_string(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def bench_wat(loop: int = IMPORT_LOOP) -> str:
    """A guest (ABI v1) with ``empty`` (calls ``result`` with ``{}``, with a schema'd sibling
    ``empty_params``) and ``clock_loop`` (calls ``clock_ms`` ``loop`` times, then ``result``).

    ``bare_forward_loop``, not a Realm function, calls the ``forward`` import (six i32
    arguments) ``loop`` times: only :class:`BareGuest` runs it, against a no-op."""
    meta = {
        "name": "bench-guest",
        "version": "0.0.0",
        "functions": [
            {"name": "empty", "description": "result {}", "params": {"type": "object"}},
            {"name": "empty_params", "description": "result {}", "params": CALL_SCHEMA},
            {"name": "clock_loop", "description": f"clock_ms x {loop}", "params": {}},
        ],
    }
    raw = json.dumps(meta).encode()
    assert _META_AT + len(raw) <= _PARAMS_AT
    result = f"(drop (call $result (i32.const {_EMPTY_AT}) (i32.const 2)))"
    return f"""(module
  (import "realm" "result" (func $result (param i32 i32) (result i32)))
  (import "realm" "clock_ms" (func $clock_ms (result i64)))
  (import "realm" "forward" (func $forward (param i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const {_EMPTY_AT}) "{{}}")
  (data (i32.const {_META_AT}) "{_wat_string(raw)}")
  (func (export "realm_abi_version") (result i32) (i32.const 1))
  (func (export "realm_alloc") (param $size i32) (result i32)
    (if (result i32) (i32.le_u (local.get $size) (i32.const {_PARAMS_CAP}))
      (then (i32.const {_PARAMS_AT})) (else (i32.const 0))))
  (func (export "realm_free") (param $p i32) (param $n i32))
  (func (export "realm_metadata_ptr") (result i32) (i32.const {_META_AT}))
  (func (export "realm_metadata_len") (result i32) (i32.const {len(raw)}))
  (func (export "realm_fn_empty") (param $p i32) (param $n i32) (result i32)
    {result} (i32.const 0))
  (func (export "realm_fn_empty_params") (param $p i32) (param $n i32) (result i32)
    {result} (i32.const 0))
  (func (export "realm_fn_clock_loop") (param $p i32) (param $n i32) (result i32)
    (local $i i32)
    (local.set $i (i32.const {loop}))
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $i)))
        (drop (call $clock_ms))
        (local.set $i (i32.sub (local.get $i) (i32.const 1)))
        (br $next)))
    {result} (i32.const 0))
  (func (export "bare_forward_loop") (local $i i32)
    (local.set $i (i32.const {loop}))
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $i)))
        (drop (call $forward (i32.const 1) (i32.const 2) (i32.const 3) (i32.const 4)
                             (i32.const 5) (i32.const 6)))
        (local.set $i (i32.sub (local.get $i) (i32.const 1)))
        (br $next))))
)"""


class BareGuest:
    """The bench guest instantiated straight on wasmtime, its imports no-op Python functions:
    what wasmtime-py itself costs, without Realm's guard, checks or call machinery."""

    def __init__(self, engine: SandboxEngine, module: wasmtime.Module) -> None:
        self.store = wasmtime.Store(engine.engine)
        self.store.set_fuel(1 << 60)
        self.store.set_epoch_deadline(1 << 40)  # never, at one tick per 10 ms
        linker = wasmtime.Linker(engine.engine)
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        linker.define_func("realm", "result", wasmtime.FuncType([i32, i32], [i32]), _noop2)
        linker.define_func("realm", "clock_ms", wasmtime.FuncType([], [i64]), _noop0)
        linker.define_func("realm", "forward", wasmtime.FuncType([i32] * 6, [i32]), _noop6)
        ex = linker.instantiate(self.store, module).exports(self.store)
        self.loop: Any = ex["realm_fn_clock_loop"]
        self.loop6: Any = ex["bare_forward_loop"]
        self.version: Any = ex["realm_abi_version"]

    def run_loop(self, _: int) -> object:
        return self.loop(self.store, 0, 0)

    def run_loop6(self, _: int) -> object:
        return self.loop6(self.store)

    def export_call(self, _: int) -> object:
        return self.version(self.store)


def _noop0() -> int:
    return 0


def _noop2(_a: int, _b: int) -> int:
    return 0


def _noop6(_a: int, _b: int, _c: int, _d: int, _e: int, _f: int) -> int:
    return 0


_ARITY: Final = {imp.name: len(imp.params) for imp in HOST_IMPORTS}


@attrs.frozen
class Trampoline:
    """Seconds of wasmtime-py's round trip for a host import, by its number of arguments:
    measured with none and with six, linear in between (and beyond)."""

    args0: float
    args6: float

    def __call__(self, name: str) -> float:
        return self.args0 + (self.args6 - self.args0) * _ARITY[name] / 6

    def total(self, calls: dict[str, int]) -> float:
        return sum(n * self(name) for name, n in calls.items())


_Callback = ctypes.CFUNCTYPE(ctypes.c_int64)


def ctypes_round_trip() -> Callable[[int], object]:
    """A ctypes callback around a no-op: calling it goes Python -> libffi -> C thunk -> Python."""
    cb = _Callback(_noop0)
    return lambda _: cb()


# --- timing generate from the inside ------------------------------------------------------


class TimedInstance(GuestInstance):
    """A GuestInstance whose host imports and function exports are timed."""

    def __init__(self, engine: SandboxEngine, module: Any, tenant: TenantState) -> None:
        self.import_seconds: Counter[str] = Counter()
        self.import_calls: Counter[str] = Counter()
        self.export_seconds = 0.0
        super().__init__(engine, module, tenant)
        for name, fn in list(self._exports.items()):
            self._exports[name] = self._timed_export(fn)  # type: ignore[assignment]

    def _guarded(self, name: str) -> Callable[..., int]:
        inner = super()._guarded(name)
        seconds, calls = self.import_seconds, self.import_calls
        clock = time.perf_counter

        def timed(*args: int) -> int:
            t0 = clock()
            try:
                return inner(*args)
            finally:
                seconds[name] += clock() - t0
                calls[name] += 1

        return timed

    def _timed_export(self, fn: Any) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.export_seconds += time.perf_counter() - t0

        return timed

    def reset(self) -> None:
        self.import_seconds.clear()
        self.import_calls.clear()
        self.export_seconds = 0.0


@attrs.define(eq=False)
class ForwardLog:
    """``TenantState.forward`` that times ``direct_forward``: (seconds, tokens) per step."""

    steps: list[tuple[float, int]] = attrs.field(factory=list)

    def __call__(self, model: Model, work: Sequence[tuple[Session, np.ndarray, str]]) -> list[Any]:
        t0 = time.perf_counter()
        out = direct_forward(model, work)
        self.steps.append((time.perf_counter() - t0, sum(len(t) for _, t, _ in work)))
        return out


@attrs.frozen
class GenSample:
    """One generate call taken apart (seconds are for the whole call)."""

    total: float  # GuestInstance.call end to end
    export: float  # inside the guest's realm_fn_generate (imports included)
    imports: float  # inside the Python host imports (forward steps included)
    n_imports: int
    forward: float  # every forward step (the prompt's included)
    decode_steps: tuple[float, ...]  # the one-token forward steps
    tokens: int  # completion tokens (each one sampled by the guest)
    calls: dict[str, int]

    def guest(self, trampoline: Trampoline) -> float:
        return self.export - self.imports - trampoline.total(self.calls)

    def host(self, trampoline: Trampoline) -> float:
        return self.imports - self.forward + trampoline.total(self.calls)


def _timing(values: Sequence[float], inner: int) -> Timing:
    return Timing(statistics.median(values), min(values), len(values), inner)


# --- the run ------------------------------------------------------------------------------


@attrs.define(eq=False)
class Bench:
    profile: Profile
    threads: int
    engine: SandboxEngine
    reporter: Reporter
    trampoline: Trampoline | None = None  # bare wasmtime import round trips
    results: list[Result] = attrs.field(factory=list)
    guest_fraction: dict[str, float] = attrs.field(factory=dict)  # sampling name -> fraction
    reference: Limit | None = None  # the forward step the guest's work is compared with
    reference_model: str = ""

    def emit(self, r: Result) -> None:
        self.results.append(r)
        self.reporter.result(r)

    def row(self, case: str, kernel: str, shape: str, timing: Timing, **kw: Any) -> Result:
        kw.setdefault("wtype", "-")
        return Result(
            case=case, kernel=kernel, shape=shape, batch=1, threads=self.threads, timing=timing,
            **kw,
        )  # fmt: skip


def _us(s: float) -> str:
    return f"{s * 1e6:.1f} µs"


def measure_limits(b: Bench, module: wasmtime.Module) -> None:
    """The json peer and the bare wasmtime round trip, at the start of the run."""
    budget = b.profile.calls
    params = CALL_PARAMS
    t_json = time_call(lambda _: json.loads(json.dumps(params)), budget)
    b.emit(b.row("limit json", "json", "dumps+loads", t_json, record="limit",
                 note=f"params {json.dumps(params)}"))  # fmt: skip
    t_ct = time_call(ctypes_round_trip(), budget)
    b.emit(b.row("limit ctypes", "ctypes", "no-op callback", t_ct, record="limit",
                 note="Python -> C -> Python through a CFUNCTYPE"))  # fmt: skip
    bare = BareGuest(b.engine, module)
    t0, t6 = (_per_import(t) for t in time_calls([bare.run_loop, bare.run_loop6], b.profile.loops))
    b.trampoline = Trampoline(t0.median, t6.median)
    for t, args in ((t0, "no args"), (t6, "6 i32 args")):
        b.emit(b.row(f"limit wasmtime import {args}", "wasmtime", f"no-op, {args}", t,
                     record="limit",
                     note=f"{IMPORT_LOOP} calls in a wasm loop, no Realm guard"))  # fmt: skip


def _per_import(t: Timing) -> Timing:
    n = IMPORT_LOOP
    return Timing(t.median / n, t.min / n, t.reps, n)


def empty_call(b: Bench, inst: GuestInstance, bare: BareGuest) -> Iterator[Result]:
    budget = b.profile.calls
    params = CALL_PARAMS
    validator = inst._validators["empty_params"]

    fns: list[Callable[[int], object]] = [
        lambda _: inst.call("empty", {}),
        lambda _: inst.call("empty_params", params),
        lambda _: json.loads(json.dumps({})),
        lambda _: json.loads(json.dumps(params)),
        lambda _: CallContext(),
        lambda _: list(validator.iter_errors(params)),
        bare.export_call,
    ]
    t_empty, t_params, t_json0, t_json, t_ctx, t_valid, t_export = time_calls(fns, budget)
    for r in (inst.call("empty", {}), inst.call("empty_params", params)):
        assert r == {}, r
    lim0 = Limit("json.dumps + json.loads of {}", "json", t_json0.median, "s")
    lim = Limit("json.dumps + json.loads of the params", "json", t_json.median, "s")
    yield b.row("empty call {}", "call", "params {}", t_empty, limit=lim0,
                ratio=t_empty.median / lim0.value,
                note=f"{1 / t_empty.median:,.0f} calls/s; new CallContext, alloc, call, "
                     "result import, free")  # fmt: skip
    yield b.row(
        "empty call params",
        "call",
        f"{len(json.dumps(params))}-byte params",
        t_params,
        limit=lim,
        ratio=t_params.median / lim.value,
        note=f"{1 / t_params.median:,.0f} calls/s; + schema validation of {len(params)} keys",
        extra={"params": params},
    )
    parts = [
        ("CallContext()", t_ctx, "its numpy Generator seeded from os.urandom"),
        ("validation", t_valid, "jsonschema iter_errors of the params"),
        ("export call", t_export, "a bare wasmtime export call (realm_abi_version)"),
    ]
    for kernel, t, note in parts:
        yield b.row(f"empty call part {kernel}", kernel, "part of a call", t,
                    note=f"{note}; {t.median / t_params.median:.0%} of the call")  # fmt: skip


def import_round_trip(b: Bench, inst: GuestInstance, bare: BareGuest) -> Iterator[Result]:
    # Realm's guard alone: the closure the linker holds, called from Python with a call's ctx.
    guard = inst._guarded("clock_ms")
    t_loop, t_bare, t_bare6, t_empty = time_calls(
        [
            lambda _: inst.call("clock_loop", {}),
            bare.run_loop,
            bare.run_loop6,
            lambda _: inst.call("empty", {}),
        ],
        b.profile.loops,
    )
    inst._ctx = CallContext()
    try:
        t_guard = time_call(lambda _: guard(), b.profile.calls)
    finally:
        inst._ctx = None
    n = IMPORT_LOOP
    per = Timing((t_loop.median - t_empty.median) / n, (t_loop.min - t_empty.min) / n,
                 t_loop.reps, n)  # fmt: skip
    bare_per, bare6 = _per_import(t_bare), _per_import(t_bare6)
    lim = Limit("bare wasmtime import round trip (interleaved)", "wasmtime", bare_per.median, "s")
    b.trampoline = Trampoline(bare_per.median, bare6.median)  # used from now on
    yield b.row(
        "import round trip clock_ms",
        "clock_ms",
        f"{n}x in a wasm loop",
        per,
        limit=lim,
        ratio=per.median / lim.value,
        rate=1 / per.median / 1e6,
        unit="M/s",
        note=f"realm import {_us(per.median)} per round trip (RECIPES.md measured "
        f"~{RECIPES_IMPORT_SECONDS * 1e6:.0f} µs earlier); guard alone {_us(t_guard.median)}",
        extra={"recipes_seconds": RECIPES_IMPORT_SECONDS, "guard_seconds": t_guard.median},
    )
    yield b.row("import round trip bare", "wasmtime", "no-op, no args", bare_per, record="limit",
                note="the same loop on wasmtime, a no-op Python import")  # fmt: skip
    yield b.row("import round trip bare6", "wasmtime", "no-op, 6 i32 args", bare6, record="limit",
                note="a no-op Python import with forward's signature")  # fmt: skip
    yield b.row("import round trip guard", "guard", "Python only", t_guard,
                note="Realm's guarded clock_ms closure called from Python (no wasm)")  # fmt: skip


# --- sampling ------------------------------------------------------------------------------


def _gen_samples(
    inst: TimedInstance, log: ForwardLog, params: dict[str, Any], budget: Budget, warmup: int
) -> list[GenSample]:
    out: list[GenSample] = []

    def one() -> GenSample:
        inst.reset()
        log.steps.clear()
        t0 = time.perf_counter()
        r = inst.call("generate", params, CallContext(seed=GEN_SEED))
        total = time.perf_counter() - t0
        time.sleep(IDLE_SECONDS)
        return GenSample(
            total=total,
            export=inst.export_seconds,
            imports=sum(inst.import_seconds.values()),
            n_imports=sum(inst.import_calls.values()),
            forward=sum(s for s, _ in log.steps),
            decode_steps=tuple(s for s, n in log.steps if n == 1),
            tokens=int(r["usage"]["completion_tokens"]),
            calls=dict(inst.import_calls),
        )

    for _ in range(warmup):
        one()
    start = time.perf_counter()
    while len(out) < budget.max_reps and (
        len(out) < budget.min_reps or time.perf_counter() - start < budget.seconds
    ):
        out.append(one())
    return out


def sampling(
    b: Bench, model_name: str, model: Model, max_tokens: int, wtype: str, selected: set[str]
) -> Iterator[Result]:
    """Every selected sampling case of one model (one instance, one tenant).

    All of the model's cases run before any row is made, so that the model's forward step
    (the median of every one-token step of every call) is one figure for all its rows.
    """
    log = ForwardLog()
    tenant = TenantState(f"bench-{model_name}", {model_name: model}, forward=log)
    inst = TimedInstance(b.engine, b.engine.compile(default_guest_path()), tenant)
    assert b.trampoline is not None
    tramp = b.trampoline
    runs: dict[str, tuple[dict[str, Any], list[GenSample]]] = {}
    try:
        for kind, extra_params in SAMPLING.items():
            if f"sampling {model_name} {kind}" not in selected:
                continue
            params = {"prompt": PROMPT, "max_tokens": max_tokens, "seed": GEN_SEED, **extra_params}
            # one warm-up per instance (the first call pays for the guest's arena growing and,
            # for a large model, for its pages coming in)
            warmup = 0 if runs else max(1, b.profile.gen.warmup)
            runs[kind] = params, _gen_samples(inst, log, params, b.profile.gen, warmup)
    finally:
        tenant.close()
        inst.close()
    steps = [s for _, samples in runs.values() for x in samples for s in x.decode_steps]
    step = statistics.median(steps) if steps else float("nan")
    own = Limit(f"{model_name} forward step (median decode step)", "fwd", step, "s")
    if model_name == "tinyllama" or b.reference is None:
        b.reference, b.reference_model = own, model_name
    ref = b.reference
    for kind, (params, samples) in runs.items():
        case = f"sampling {model_name} {kind}"
        tokens = samples[0].tokens
        per_tok = _timing([x.total / x.tokens for x in samples], tokens)
        guest = _timing([x.guest(tramp) / x.tokens for x in samples], tokens)
        host = statistics.median(x.host(tramp) / x.tokens for x in samples)
        fixed = statistics.median((x.total - x.export) / x.tokens for x in samples)
        fwd_tok = statistics.median(x.forward / x.tokens for x in samples)
        imports_tok = statistics.median(x.n_imports / x.tokens for x in samples)
        calls = {k: v / tokens for k, v in sorted(samples[0].calls.items())}
        shape = f"V{VOCAB}, {tokens} tok"
        figures = {
            "model": model_name,
            "sampling": kind,
            "params": params,
            "completion_tokens": tokens,
            "forward_step_seconds": step,
            "per_token_seconds": per_tok.median,
            "forward_per_token_seconds": fwd_tok,
            "host_per_token_seconds": host,
            "call_fixed_per_token_seconds": fixed,
            "guest_per_token_seconds": guest.median,
            "imports_per_token": imports_tok,
            "import_calls_per_token": calls,
            "trampoline_seconds": {"args0": tramp.args0, "args6": tramp.args6},
        }
        short = f"; ended early ({tokens} of {max_tokens} tokens)" if tokens < max_tokens else ""
        yield b.row(
            case,
            "generate/tok",
            shape,
            per_tok,
            wtype=wtype,
            rate=1 / per_tok.median,
            unit="tok/s",
            limit=own,
            ratio=per_tok.median / step,
            note=f"= fwd {format_seconds(fwd_tok)} + host {_us(host)} ({imports_tok:.1f} "
            f"imports) + guest {_us(guest.median)} + call {_us(fixed)}{short}",
            extra={**figures, "row": "per token"},
        )
        frac = guest.median / ref.value
        b.guest_fraction[f"{model_name} {kind}"] = frac
        yield b.row(
            f"{case} guest",
            "guest/tok",
            shape,
            guest,
            wtype=wtype,
            limit=ref,
            ratio=frac,
            note=f"{frac:.2%} of a {b.reference_model} forward step",
            extra={**figures, "row": "guest", "reference_model": b.reference_model,
                   "reference_step_seconds": ref.value, "fraction": frac},
        )  # fmt: skip


# --- main ----------------------------------------------------------------------------------


def tinyllama_path() -> Path | None:
    """The TinyLlama-shaped Q8_0 file benchmarks.models caches, if it is there."""
    with contextlib.suppress(Exception):
        from .models import SEED, TINYLLAMA, model_path

        path = model_path(TINYLLAMA, "Q8_0", SEED)
        if path.is_file():
            return path
    return None


def case_names() -> list[str]:
    out = ["empty call", "import round trip"]
    out += [f"sampling {m} {k}" for m in ("tinyllama", "small") for k in SAMPLING]
    return out


def targets(b: Bench, selected: set[str]) -> list[Target]:
    """The target, for each sampling kind that ran, when a TinyLlama step is the reference
    (a fraction of the small model's ~0.2 ms step says nothing about it)."""
    if b.reference_model != "tinyllama":
        return []
    out = []
    for kind in SAMPLING:
        key = next(
            (k for k in (f"tinyllama {kind}", f"small {kind}") if k in b.guest_fraction), None
        )
        if key is None and not any(c.endswith(f" {kind}") for c in selected):
            continue
        caveat = ""
        if key is not None and not key.startswith("tinyllama"):
            caveat = "guest work measured on the small model"
        out.append(
            Target(
                f"guest work per token ({kind} sampling), % of a TinyLlama Q8_0 forward step",
                None if key is None else 100 * b.guest_fraction[key],
                "<=",
                100 * GUEST_MAX_FRACTION,
                caveat,
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(SUITE, __doc__.splitlines()[0] if __doc__ else SUITE)
    args = parser.parse_args(argv)
    names = case_names()
    tiny = tinyllama_path()
    selected = {n for n in names if args.only is None or args.only in n}
    if not selected:
        parser.error(f"no case name contains {args.only!r}; names: {', '.join(names)}")
    skipped_tiny = tiny is None and any(n.startswith("sampling tinyllama") for n in selected)
    if tiny is None:
        selected = {n for n in selected if not n.startswith("sampling tinyllama")}

    threads = kernels.set_threads(args.threads)
    profile = QUICK if args.quick else FULL
    reporter = Reporter(json_lines=args.json)
    settings = {
        "quick": args.quick,
        "only": args.only,
        "vocab": VOCAB,
        "tinyllama": str(tiny) if tiny else "not cached",
        "small": "llama " + ", ".join(f"{k}={v}" for k, v in SMALL_SHAPE.items()) + ", Q8_0",
    }
    reporter.machine(describe_machine(SUITE, threads, settings, numpy_limit=False))

    with SandboxEngine() as engine, tempfile.TemporaryDirectory(prefix="realm-bench-") as tmp:
        b = Bench(profile, threads, engine, reporter)
        module = engine.compile(bench_wat().encode(), name="bench-guest")
        reporter.section("limits at the start")
        measure_limits(b, module.module)
        inst = GuestInstance(engine, module, TenantState("bench", {}))
        bare = BareGuest(engine, module.module)
        for title, name, run in (
            ("empty guest call (GuestInstance.call end to end)", "empty call", empty_call),
            (f"host import round trip ({IMPORT_LOOP} clock_ms calls)", "import round trip",
             import_round_trip),
        ):  # fmt: skip
            if name not in selected:
                continue
            reporter.section(title)
            try:
                for r in run(b, inst, bare):
                    b.emit(r)
            except Exception as e:
                reporter.error(name, f"{type(e).__name__}: {e}")

        models: list[tuple[str, Callable[[], Path], int, str]] = []
        if tiny is not None:
            models.append(("tinyllama", lambda: tiny, profile.tiny_tokens, "Q8_0"))

        def write_small() -> Path:
            return write_test_model(
                Path(tmp) / "small.gguf", vocab_size=VOCAB, context_length=512, wtype="Q8_0",
                **SMALL_SHAPE,
            )  # fmt: skip

        models.append(("small", write_small, profile.small_tokens, "Q8_0"))
        if skipped_tiny:
            reporter.text("")
            reporter.text(
                "sampling tinyllama skipped: no cached TinyLlama-shaped Q8_0 model "
                "(`python -m benchmarks.models --quick` writes it once)"
            )
        for model_name, path_fn, max_tokens, wtype in models:
            if not any(n.startswith(f"sampling {model_name}") for n in selected):
                continue
            model = load_model(path_fn())
            try:
                reporter.section(
                    f"default guest generate on {model_name} ({model.info.n_layers} layers, "
                    f"hidden {model.info.n_embd}, vocab {model.info.vocab_size}), "
                    f"max_tokens {max_tokens}"
                )
                for r in sampling(b, model_name, model, max_tokens, wtype, selected):
                    b.emit(r)
            except Exception as e:
                reporter.error(f"sampling {model_name}", f"{type(e).__name__}: {e}")
            finally:
                model.close()

    reporter.text("")
    reporter.text(
        "ratio = time / limit. Sampling rows: generate/tok is the whole call per completion "
        "token over its own model's forward step; guest/tok is the guest's own work per token "
        "(export call - time inside imports - each import's bare wasmtime round trip) over "
        "the reference forward step."
    )
    if b.guest_fraction and b.reference_model != "tinyllama":
        reporter.text(
            f"target (guest work per token <= {GUEST_MAX_FRACTION:.0%} of a TinyLlama-shaped "
            "Q8_0 forward step) not checked: no TinyLlama step in this run, so guest/tok is "
            "over the small model's step"
            + ("" if tiny else " (`python -m benchmarks.models --quick` caches that model once)")
        )
    reporter.targets(targets(b, selected))
    reporter.end()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
