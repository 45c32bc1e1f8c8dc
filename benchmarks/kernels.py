"""Kernel microbenchmarks: each native kernel against a machine limit measured in the same run.

    python -m benchmarks.kernels [--quick] [--json] [--threads N] [--only SUBSTRING]

Machine limits, measured first and again just before and after each case that is compared
with them (the better of the two counts): the read bandwidth of every pool thread streaming a
buffer far larger than the L3 cache, numpy's float32 GEMM on the GEMM case's shapes (its BLAS
limited to the same thread count), and the call floor (a checked call of a trivial kernel).

Cases:
    matvec     weights (11008 rows, 4096 columns) times one vector, for each weight type
               (the types read from files as random blocks with sane scales). Memory-bound:
               GB/s of weight bytes over the read bandwidth.
               Q8_0 and Q4_0 also "packed" (``kernels.pack``: interleaved 16-row panels, the
               layout models load them in where the ISA level has a kernel for it).
    batched    the same weights times B = 1, 2, 4, 8 vectors, timed interleaved. The weights
               are read once for all B, so time(B)/time(1) stays near 1 while memory-bound.
               Q8_0 and Q4_0 packed too.
    gemm       F32 x (512, 2048) times w (2048, 2048): GFLOP/s over numpy's ``x @ w.T``.
    attention  32 query heads over 8 KV heads, f16 cache. One query at the end of the cache
               (decode, memory-bound: GB/s of cache over the read bandwidth) and 64 queries
               (prefill, compute-bound: GFLOP/s over numpy's GEMM).
    rmsnorm, rope, softmax, swiglu
               hidden 4096, 1 and 64 tokens: time per call over the call floor, interleaved.

Times are the median (and min) of repeated calls through ``realm.kernels`` after a warm-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import attrs
import numpy as np

from realm import KernelError, kernels
from realm.kernels import WeightType
from realm.testing.quant_blocks import HALF_FIELDS

from ._common import (
    GB,
    MIB,
    Budget,
    CallFloor,
    Limit,
    NumpyGemm,
    Probe,
    ReadBandwidth,
    Reporter,
    Result,
    Target,
    argument_parser,
    blas_threads,
    bracket,
    describe_machine,
    rate_result,
    relative_error,
    rotated_copies,
    slow_blas_env,
    time_call,
    time_calls,
)

SUITE: Final = "kernels"
SEED: Final = 20240601

# Shapes: a 7B llama's FFN up-projection, hidden size and attention heads.
N_COLS: Final = 4096
N_ROWS: Final = 11008
MATVEC_SHAPE: Final = f"{N_COLS}x{N_ROWS}"  # n_cols x n_rows, as the issue names it
MATVEC_TYPES: Final = (
    WeightType.Q8_0,
    WeightType.Q4_0,
    WeightType.F16,
    WeightType.BF16,
    WeightType.F32,
    # the types published files use and Realm reads but never writes
    *(wt for wt in WeightType if not wt.writable),
)
BATCHED_TYPES: Final = (WeightType.Q8_0, WeightType.Q4_0, WeightType.F16)
PACKED_TYPES: Final = (WeightType.Q8_0, WeightType.Q4_0)  # kernels.pack: also as models load them
BATCHES: Final = (1, 2, 4, 8)
GEMM_M, GEMM_K, GEMM_N = 512, 2048, 2048  # x (M, K) times w (N, K)^T
GEMM_SHAPE: Final = f"{GEMM_M}x{GEMM_K}x{GEMM_N}"
N_HEADS: Final = 32
N_KV_HEADS: Final = 8
HEAD_DIMS: Final = (64, 128)
CACHE_LENGTHS: Final = (512, 2048)
PREFILL_QUERIES: Final = 64
HIDDEN: Final = 4096
SMALL_TOKENS: Final = (1, 64)
RMS_EPS: Final = 1e-5

# Sanity check of matmul outputs against numpy on dequantized weights: it catches a broken
# kernel (garbage, zeros, wrong rows), not rounding (quantized kernels quantize x to 8 bits).
CHECK_ROWS: Final = 64
CHECK_MAX_ERROR: Final = 0.02  # max |got - want| / max |want|

# Targets from the issue.
MATVEC_MIN_BANDWIDTH_RATIO: Final = 0.70  # Q8_0 and Q4_0 matvec >= 70% of read bandwidth
FILE_TYPES_MIN_BANDWIDTH_RATIO: Final = 0.85  # every read-only quantized type's matvec

# Benchmark weights of the read-only types are random bytes with their half-precision scale
# fields (realm.testing.quant_blocks.HALF_FIELDS) set to sane scales: every code occurs, and
# the timing does not depend on the values.
GEMM_MIN_NUMPY_RATIO: Final = 1.0  # F32 GEMM >= numpy
BATCH_MAX_TIME_RATIO: Final = 2.0  # Q8_0 time(B=8) <= 2 x time(B=1)

READ, NUMPY, FLOOR = "read", "numpy", "floor"  # the limits a case can need


@attrs.frozen
class Profile:
    """Sizes and repetitions of a full or a ``--quick`` run."""

    bandwidth_bytes: int  # read-bandwidth buffer: much larger than the L3 cache
    bandwidth_iters: int
    budget: Budget  # calls of microseconds to milliseconds
    long_budget: Budget  # calls of tens of milliseconds (GEMM, prefill attention)
    limit_budget: Budget  # numpy's GEMM and the call floor, measured around cases


FULL: Final = Profile(
    bandwidth_bytes=1024 * MIB,
    bandwidth_iters=10,
    budget=Budget(warmup=5, min_reps=20, max_reps=300, seconds=1.5),
    long_budget=Budget(warmup=3, min_reps=10, max_reps=50, seconds=2.0),
    limit_budget=Budget(warmup=3, min_reps=10, max_reps=30, seconds=0.5),
)
QUICK: Final = Profile(
    bandwidth_bytes=256 * MIB,
    bandwidth_iters=5,
    budget=Budget(warmup=2, min_reps=5, max_reps=40, seconds=0.2),
    long_budget=Budget(warmup=2, min_reps=5, max_reps=10, seconds=0.3),
    limit_budget=Budget(warmup=2, min_reps=5, max_reps=10, seconds=0.1),
)


@attrs.define(eq=False)
class Bench:
    """State shared by the cases of one run: probes of the limits, inputs, results."""

    profile: Profile
    threads: int
    l3_bytes: int
    rng: np.random.Generator
    probes: dict[str, Probe] = attrs.field(factory=dict)
    results: list[Result] = attrs.field(factory=list)
    _base: np.ndarray | None = None
    _weights: dict[WeightType, tuple[np.ndarray, ...]] = attrs.field(factory=dict)

    def weights(self, wt: WeightType) -> tuple[np.ndarray, ...]:
        """Rotated copies of the (N_ROWS, N_COLS) weights as ``wt``; cached across cases."""
        if wt not in self._weights:
            if self._base is None:
                self._base = self.rng.standard_normal((N_ROWS, N_COLS), dtype=np.float32)
            self._weights[wt] = rotated_copies(_encode(self._base, wt), self.l3_bytes)
        return self._weights[wt]

    def drop(self, wt: WeightType) -> None:
        """Forget ``wt``'s weights (GBs of copies) once no later case needs them."""
        self._weights.pop(wt, None)

    def release(self) -> None:
        self._base = None
        self._weights.clear()

    def result(self, case: str, *, batch: int | None = None) -> Result | None:
        for r in self.results:
            if r.case == case and (batch is None or r.batch == batch):
                return r
        return None


def _encode(w: np.ndarray, wt: WeightType) -> np.ndarray:
    if not wt.writable:  # random blocks with sane scales, the shape of w
        rng = np.random.default_rng(SEED + int(wt))
        n_rows, nb = w.shape[0], w.shape[1] // wt.block_elems
        raw = rng.integers(0, 256, (n_rows, nb, wt.block_bytes), dtype=np.uint8)
        for off in HALF_FIELDS[wt]:
            half = (rng.standard_normal((n_rows, nb), dtype=np.float32) * 0.02).astype(np.float16)
            raw[:, :, off : off + 2] = half.view(np.uint8).reshape(n_rows, nb, 2)
        return raw.reshape(n_rows, nb * wt.block_bytes)
    if wt == WeightType.F32:
        return w  # never written: it can be one of the rotated copies
    if wt == WeightType.F16:
        return w.astype(np.float16)
    if wt == WeightType.BF16:  # truncation; the timing does not depend on the rounding
        return (w.view(np.uint32) >> 16).astype(np.uint16)
    return kernels.quantize(w, wt)


def _check_matmul(w: np.ndarray, wt: WeightType, x: np.ndarray, y: np.ndarray) -> str:
    """Why the first CHECK_ROWS outputs of ``y = w x`` disagree with numpy, or ""."""
    with blas_threads(1):  # woken OpenBLAS workers would spin into the next timing
        want = x @ kernels.dequantize(w[:CHECK_ROWS], wt).T
    error = relative_error(y[..., :CHECK_ROWS], want)
    return "" if error <= CHECK_MAX_ERROR else f"max rel. error {error:.2g} vs numpy"


@attrs.frozen
class Case:
    name: str  # what --only matches
    section: str  # heading of its group in the table
    needs: frozenset[str]
    run: Callable[[Bench], Iterator[Result]]


# --- matrix times vector(s) ------------------------------------------------------------

MATVEC_SECTION: Final = (
    f"matvec: w ({N_ROWS}, {N_COLS}) times one vector; memory-bound, so the weights rotate "
    "through copies totalling > 4x L3 and every call reads DRAM. rate = weight bytes / s"
)
BATCHED_SECTION: Final = (
    "batched matmul: the same weights (rotated) times B vectors, all B timed interleaved. "
    "rate = weight bytes / s; note: t(B)/t(1)"
)


def _operands(b: Bench, wt: WeightType, packed: bool) -> tuple[Any, ...]:
    """The rotated copies as matmul takes them: raw blocks, or packed (``kernels.pack``, the
    layout models load Q8_0 / Q4_0 weights in where the level has a kernel for it)."""
    copies = b.weights(wt)
    return tuple(kernels.pack(c, wt) for c in copies) if packed else copies


def _matvec(wt: WeightType, packed: bool = False) -> Case:
    layout = " packed" if packed else ""
    name = f"matvec {wt.name}{layout} {MATVEC_SHAPE}"

    def run(b: Bench) -> Iterator[Result]:
        # Independent copies whose total exceeds 4x the L3 cache, cycled call after call: the
        # weights of one call are long evicted when they come round again, as in a model.
        copies = _operands(b, wt, packed)
        x = b.rng.standard_normal(N_COLS, dtype=np.float32)
        y = np.empty(N_ROWS, dtype=np.float32)
        n = len(copies)

        def call(i: int) -> object:
            return kernels.matmul(copies[i % n], x, wtype=None if packed else wt, out=y)

        timing, limit = bracket(b.probes[READ], lambda: time_call(call, b.profile.budget))
        raw = b.weights(wt)[0]
        bad = _check_matmul(raw, wt, x, y)
        nbytes = raw.nbytes
        if wt not in BATCHED_TYPES:  # every type's copies together would not fit in memory
            b.drop(wt)
        yield rate_result(
            case=name,
            kernel="matmul" + layout.replace(" ", "-"),
            shape=MATVEC_SHAPE,
            wtype=wt.name,
            batch=1,
            threads=b.threads,
            timing=timing,
            amount=nbytes,
            unit="GB/s",
            limit=limit,
            ok=not bad,
            note=bad or f"{n} copies, {n * nbytes / MIB:.0f} MiB rotated",
            extra={"n_rows": N_ROWS, "n_cols": N_COLS, "weight_bytes": nbytes, "copies": n},
        )

    return Case(name, MATVEC_SECTION, frozenset({READ}), run)


def _batched(wt: WeightType, packed: bool = False) -> Case:
    layout = " packed" if packed else ""
    name = f"batched {wt.name}{layout} {MATVEC_SHAPE}"

    def run(b: Bench) -> Iterator[Result]:
        copies = _operands(b, wt, packed)  # rotated, as in _matvec
        n = len(copies)
        xs = [b.rng.standard_normal((batch, N_COLS), dtype=np.float32) for batch in BATCHES]
        ys = [np.empty((batch, N_ROWS), dtype=np.float32) for batch in BATCHES]
        wtype = None if packed else wt

        def caller(x: np.ndarray, y: np.ndarray) -> Callable[[int], object]:
            return lambda i: kernels.matmul(copies[i % n], x, wtype=wtype, out=y)

        # Interleaved, so the ratios to B=1 hold even if the machine drifts meanwhile.
        calls = [caller(x, y) for x, y in zip(xs, ys, strict=True)]
        timings, limit = bracket(b.probes[READ], lambda: time_calls(calls, b.profile.budget))
        raw = b.weights(wt)[0]
        nbytes = raw.nbytes
        t1 = timings[0].median
        for batch, x, y, timing in zip(BATCHES, xs, ys, timings, strict=True):
            bad = _check_matmul(raw, wt, x, y)
            vs_b1 = timing.median / t1
            yield rate_result(
                case=name,
                kernel="matmul" + layout.replace(" ", "-"),
                shape=MATVEC_SHAPE,
                wtype=wt.name,
                batch=batch,
                threads=b.threads,
                timing=timing,
                amount=nbytes,
                unit="GB/s",
                limit=limit,
                ok=not bad,
                note=bad or f"t/t(B=1) {vs_b1:.2f}",
                extra={
                    "n_rows": N_ROWS,
                    "n_cols": N_COLS,
                    "weight_bytes": nbytes,
                    "copies": n,
                    "time_vs_b1": vs_b1,
                },
            )

    return Case(name, BATCHED_SECTION, frozenset({READ}), run)


def _gemm() -> Case:
    name = f"gemm F32 {GEMM_SHAPE}"

    def run(b: Bench) -> Iterator[Result]:
        # Compute-bound (16 MiB of weights, each used 512 times): no rotation needed.
        x = b.rng.standard_normal((GEMM_M, GEMM_K), dtype=np.float32)
        w = b.rng.standard_normal((GEMM_N, GEMM_K), dtype=np.float32)
        y = np.empty((GEMM_M, GEMM_N), dtype=np.float32)

        def call(_: int) -> object:
            return kernels.matmul(w, x, out=y)

        timing, limit = bracket(b.probes[NUMPY], lambda: time_call(call, b.profile.long_budget))
        with blas_threads(1):
            error = relative_error(y, x @ w.T)
        bad = "" if error <= CHECK_MAX_ERROR else f"max rel. error {error:.2g} vs numpy"
        yield rate_result(
            case=name,
            kernel="matmul",
            shape=GEMM_SHAPE,
            wtype="F32",
            batch=GEMM_M,
            threads=b.threads,
            timing=timing,
            amount=2.0 * GEMM_M * GEMM_K * GEMM_N,
            unit="GFLOP/s",
            limit=limit,
            ok=not bad,
            note=bad or "peer: numpy x @ w.T",
            extra={"m": GEMM_M, "k": GEMM_K, "n": GEMM_N},
        )

    return Case(
        name,
        "gemm: F32 x (M, K) times w (N, K)^T, shape MxKxN; rate = 2MNK flop / s",
        frozenset({NUMPY}),
        run,
    )


# --- attention -------------------------------------------------------------------------


def _attention(head_dim: int, n_kv: int, n_q: int) -> Case:
    decode = n_q == 1
    kind = "decode" if decode else f"prefill{n_q}"
    name = f"attention {kind} d{head_dim} kv{n_kv}"
    shape = f"h{N_HEADS}/{N_KV_HEADS} d{head_dim} kv{n_kv}"

    def run(b: Bench) -> Iterator[Result]:
        q = b.rng.standard_normal((n_q, N_HEADS, head_dim), dtype=np.float32)
        kv = b.rng.standard_normal((2, n_kv, N_KV_HEADS, head_dim), dtype=np.float32)
        # One layer's cache (1-8 MiB) fits the L3: rotate copies as the matvec does, since a
        # model reads every other layer's weights and cache in between.
        caches = [(c[0], c[1]) for c in rotated_copies(kv.astype(np.float16), b.l3_bytes)]
        n = len(caches)
        positions = np.arange(n_kv - n_q, n_kv, dtype=np.int32)  # the last n_q of the cache
        out = np.empty_like(q)

        def call(i: int) -> object:
            k, v = caches[i % n]
            return kernels.attention(q, k, v, positions, out=out)

        budget = b.profile.budget if decode else b.profile.long_budget
        timing, limit = bracket(
            b.probes[READ if decode else NUMPY], lambda: time_call(call, budget)
        )
        ok = bool(np.isfinite(out).all())  # softmax-weighted means of finite values
        cache_bytes = 2 * caches[0][0].nbytes
        # q.k and p.v: 2 flop per element each, for every (head, attended key) pair
        flop = 4.0 * N_HEADS * head_dim * float(np.sum(positions.astype(np.int64) + 1))
        if decode:
            amount, unit = cache_bytes, "GB/s"
            note = f"K+V {cache_bytes / MIB:.0f} MiB, {n} copies rotated"
        else:
            amount, unit = flop, "GFLOP/s"
            note = "causal; flop = 4·heads·d per attended key"
        yield rate_result(
            case=name,
            kernel="attention",
            shape=shape,
            wtype="F16",
            batch=n_q,
            threads=b.threads,
            timing=timing,
            amount=amount,
            unit=unit,
            limit=limit,
            ok=ok,
            note=note if ok else "non-finite output",
            extra={
                "n_heads": N_HEADS,
                "n_kv_heads": N_KV_HEADS,
                "head_dim": head_dim,
                "n_kv": n_kv,
                "n_q": n_q,
                "cache_bytes": cache_bytes,
                "flop": flop,
                "copies": n,
            },
        )

    section = (
        "attention decode: 1 query at the end of an f16 cache; memory-bound, caches rotated "
        "through > 4x L3. rate = K+V bytes / s"
        if decode
        else f"attention prefill: {n_q} queries at the end of an f16 cache; compute-bound. "
        "rate = flop / s"
    )
    return Case(name, section, frozenset({READ if decode else NUMPY}), run)


# --- small row operations --------------------------------------------------------------

SMALL_SECTION: Final = (
    f"row ops at hidden {HIDDEN}, B tokens; inputs stay in cache. rate = bytes read + "
    "written / s; ratio = time / call floor, timed interleaved"
)

Setup = tuple[Callable[[int], object], str, int]  # (call, shape, bytes read + written)


def _rmsnorm(rng: np.random.Generator, tokens: int) -> Setup:
    x = rng.standard_normal((tokens, HIDDEN), dtype=np.float32)
    weight = rng.standard_normal(HIDDEN, dtype=np.float32)
    out = np.empty_like(x)

    def call(_: int) -> object:
        return kernels.rmsnorm(x, weight, RMS_EPS, out=out)

    return call, f"{HIDDEN}", 4 * (2 * x.size + weight.size)


def _rope(rng: np.random.Generator, tokens: int) -> Setup:
    head_dim = HIDDEN // N_HEADS
    x = rng.standard_normal((tokens, N_HEADS, head_dim), dtype=np.float32)
    positions = np.arange(tokens, dtype=np.int32)

    def call(_: int) -> object:
        return kernels.rope(x, positions)  # in place; rotations keep the values bounded

    return call, f"{N_HEADS}x{head_dim}", 4 * 2 * x.size


def _softmax(rng: np.random.Generator, tokens: int) -> Setup:
    x = rng.standard_normal((tokens, HIDDEN), dtype=np.float32)

    def call(_: int) -> object:
        return kernels.softmax(x)  # in place

    return call, f"{HIDDEN}", 4 * 2 * x.size


def _swiglu(rng: np.random.Generator, tokens: int) -> Setup:
    gate = rng.standard_normal((tokens, HIDDEN), dtype=np.float32)
    up = rng.standard_normal((tokens, HIDDEN), dtype=np.float32)
    out = np.empty_like(gate)

    def call(_: int) -> object:
        return kernels.swiglu(gate, up, out=out)

    return call, f"{HIDDEN}", 4 * 3 * gate.size


SMALL_OPS: Final[dict[str, Callable[[np.random.Generator, int], Setup]]] = {
    "rmsnorm": _rmsnorm,
    "rope": _rope,
    "softmax": _softmax,
    "swiglu": _swiglu,
}


def _small(op: str, tokens: int) -> Case:
    name = f"{op} {HIDDEN} B={tokens}"

    def run(b: Bench) -> Iterator[Result]:
        call, shape, nbytes = SMALL_OPS[op](b.rng, tokens)
        floor = b.probes[FLOOR]
        assert isinstance(floor, CallFloor)
        # The floor is timed interleaved with the op: a peer under the same conditions.
        timing, floor_timing = time_calls([call, floor.call], b.profile.budget)
        limit = Limit(floor.name, floor.label, floor_timing.median, "s", (floor_timing.median,))
        yield Result(
            case=name,
            kernel=op,
            shape=shape,
            wtype="F32",
            batch=tokens,
            threads=b.threads,
            timing=timing,
            rate=nbytes / timing.median / GB,
            unit="GB/s",
            limit=limit,
            ratio=timing.median / limit.value,
            extra={"bytes": nbytes},
        )

    return Case(name, SMALL_SECTION, frozenset({FLOOR}), run)


def all_cases() -> list[Case]:
    return [
        *(_matvec(wt) for wt in MATVEC_TYPES),
        *(_matvec(wt, packed=True) for wt in PACKED_TYPES),
        *(_batched(wt) for wt in BATCHED_TYPES),
        *(_batched(wt, packed=True) for wt in PACKED_TYPES),
        _gemm(),
        *(_attention(d, n_kv, 1) for d in HEAD_DIMS for n_kv in CACHE_LENGTHS),
        *(_attention(d, n_kv, PREFILL_QUERIES) for d in HEAD_DIMS for n_kv in CACHE_LENGTHS),
        *(_small(op, t) for op in SMALL_OPS for t in SMALL_TOKENS),
    ]


# --- targets ---------------------------------------------------------------------------


def targets(b: Bench, ran: set[str]) -> list[Target]:
    """The issue's targets whose cases were selected (a case that failed counts as FAIL)."""

    def value(case: str, *, batch: int | None = None, key: str | None = None) -> float | None:
        r = b.result(case, batch=batch)
        if r is None or not r.ok:
            return None
        return r.ratio if key is None else r.extra[key]

    out: list[Target] = []
    for wt, layout in [(t, lay) for t in PACKED_TYPES for lay in ("", " packed")]:
        case = f"matvec {wt.name}{layout} {MATVEC_SHAPE}"
        if case in ran:
            out.append(
                Target(
                    f"{wt.name}{layout} matvec {MATVEC_SHAPE} GB/s / read bandwidth",
                    value(case),
                    ">=",
                    MATVEC_MIN_BANDWIDTH_RATIO,
                )
            )
    for wt in MATVEC_TYPES:
        case = f"matvec {wt.name} {MATVEC_SHAPE}"
        if not wt.writable and case in ran:
            out.append(
                Target(
                    f"{wt.name} matvec {MATVEC_SHAPE} GB/s / read bandwidth",
                    value(case),
                    ">=",
                    FILE_TYPES_MIN_BANDWIDTH_RATIO,
                )
            )
    case = f"gemm F32 {GEMM_SHAPE}"
    if case in ran:
        env = slow_blas_env()
        out.append(
            Target(
                f"F32 GEMM {GEMM_SHAPE} GFLOP/s / numpy",
                value(case),
                ">=",
                GEMM_MIN_NUMPY_RATIO,
                caveat=f"numpy slowed by {', '.join(env)}: not a fair peer" if env else "",
            )
        )
    for layout in ("", " packed"):
        case = f"batched Q8_0{layout} {MATVEC_SHAPE}"
        if case in ran:
            out.append(
                Target(
                    f"Q8_0{layout} batched {MATVEC_SHAPE} time(B={BATCHES[-1]}) / time(B=1)",
                    value(case, batch=BATCHES[-1], key="time_vs_b1"),
                    "<=",
                    BATCH_MAX_TIME_RATIO,
                )
            )
    return out


# --- main ------------------------------------------------------------------------------


def _probe(kind: str, b: Bench) -> Probe:
    p = b.profile
    if kind == READ:
        return ReadBandwidth(p.bandwidth_bytes, p.bandwidth_iters)
    if kind == NUMPY:
        return NumpyGemm(GEMM_M, GEMM_K, GEMM_N, b.threads, p.limit_budget, b.rng)
    return CallFloor(p.limit_budget)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(SUITE, __doc__.splitlines()[0] if __doc__ else SUITE)
    args = parser.parse_args(argv)
    cases = [c for c in all_cases() if args.only is None or args.only in c.name]
    if not cases:
        names = ", ".join(c.name for c in all_cases())
        parser.error(f"no case name contains {args.only!r}; names: {names}")

    threads = kernels.set_threads(args.threads)
    reporter = Reporter(json_lines=args.json)
    machine = describe_machine(SUITE, threads, {"quick": args.quick, "only": args.only})
    reporter.machine(machine)
    profile = QUICK if args.quick else FULL
    b = Bench(profile, threads, machine.l3_bytes, np.random.default_rng(SEED))

    reporter.section("machine limits at the start (each case measures its own again around it)")
    for kind in (READ, NUMPY, FLOOR):
        if any(kind in c.needs for c in cases):
            b.probes[kind] = probe = _probe(kind, b)
            reporter.result(probe.row(probe.measure(), threads))

    section = None
    for case in cases:
        if case.section != section:
            section = case.section
            reporter.section(section)
        try:
            for r in case.run(b):
                b.results.append(r)
                reporter.result(r)
        except KernelError as e:  # the C code may be mid-change: report it and go on
            reporter.error(case.name, str(e))
    b.release()

    if READ in b.probes:  # the host is shared: show how far the limit moved during the run
        reporter.section("read bandwidth again, at the end (drift check)")
        probe = b.probes[READ]
        reporter.result(attrs.evolve(probe.row(probe.measure(), threads), case="limit read end"))
        if isinstance(probe, ReadBandwidth):
            probe.close()

    reporter.text("")
    reporter.text(
        "ratio = rate / limit, the limit being the better of two measurements just before and "
        "after the case (read: read bandwidth of all pool threads; numpy: numpy float32 GEMM); "
        "row ops: time / call floor."
    )
    reporter.text("GB/s = 1e9 bytes/s, GFLOP/s = 1e9 flop/s; times are median and min per call.")
    reporter.targets(targets(b, {c.name for c in cases}))
    reporter.end()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
