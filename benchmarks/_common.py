"""Shared helpers of the benchmark suites: timing, machine limits and reporting.

A suite parses its options with :func:`argument_parser`, describes the machine
(:func:`describe_machine`) and measures the limits its cases need (each a :class:`Probe`:
:class:`ReadBandwidth`, :class:`NumpyGemm`, :class:`CallFloor`) before any case. It times
each case with :func:`time_calls`, compares it with its limit measured again just around it
(:func:`bracket`), and hands :class:`Result` rows and :class:`Target` checks to a
:class:`Reporter`. The reporter prints a table for a terminal, or with ``--json`` one JSON
object per line whose ``"record"`` is ``"machine"``, ``"limit"``, ``"result"``, ``"error"``,
``"target"`` or ``"end"``.

Rates are decimal: GB/s is 1e9 bytes per second, GFLOP/s 1e9 floating-point operations per
second (a multiply-add counts two).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TextIO, TypeVar

import attrs
import numpy as np

from realm import kernels

T = TypeVar("T")

GB: Final = 1e9  # bytes per GB, and flop per GFLOP
MIB: Final = 1 << 20
L3_FALLBACK_BYTES: Final = 32 * MIB  # used when sysfs does not report the L3 size
ROTATE_L3_FACTOR: Final = 4  # rotated copies of an input together exceed this many L3s
FLOOR_ELEMS: Final = 16  # CallFloor's add: next to nothing to compute
BUSY_LOAD_PER_CORE: Final = 0.5  # a 1-minute load average above this per core means "busy"
BLAS_IDLE_SECONDS: Final = 0.3  # OpenBLAS workers spin this long-ish after a call: let them sleep
# Set on some machines to pin OpenBLAS's kernel set and blocking; both slow numpy's BLAS (on
# the dev box, AVX-512: OPENBLAS_CORETYPE=Haswell picks AVX2 kernels, and a 512x2048x2048
# sgemm runs at ~245 instead of ~420 GFLOP/s), which would flatter every ratio to numpy.
SLOW_BLAS_ENV: Final = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# --- options ---------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


class _IsaAction(argparse.Action):
    """``--isa LEVEL``: run the suite's Realm side at that level (set when parsed, so every
    suite honours it; the machine line records the level in use)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 value: Any, option_string: str | None = None) -> None:  # fmt: skip
        name = str(value).upper()
        if name not in kernels.Isa.__members__:
            levels = ", ".join(kernels.Isa.__members__)
            parser.error(f"--isa must be one of {levels}; got {value!r}")
        level = kernels.Isa[name]
        if level > kernels.detected_isa():
            parser.error(f"--isa {name}: this CPU's best level is {kernels.detected_isa().name}")
        kernels.set_isa(level)
        setattr(namespace, self.dest, level)


def argument_parser(suite: str, description: str) -> argparse.ArgumentParser:
    """The options every suite takes: ``--json``, ``--threads``, ``--quick``, ``--only``,
    ``--isa``."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{suite}", description=description)
    p.add_argument(
        "--isa",
        action=_IsaAction,
        default=None,
        metavar="LEVEL",
        help="Realm's kernel level: SCALAR, AVX2 or AVX512 (default: the best this CPU has)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line, no table")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="native pool threads, also the limit for numpy's BLAS (default: all cores)",
    )
    p.add_argument("--quick", action="store_true", help="a short run with fewer repetitions")
    p.add_argument(
        "--only", default=None, metavar="SUBSTRING", help="run only cases whose name contains it"
    )
    return p


# --- timing ----------------------------------------------------------------------------


@attrs.frozen
class Budget:
    """How long to time one case."""

    warmup: int = 3
    min_reps: int = 5
    max_reps: int = 50
    seconds: float = 1.0  # stop adding repetitions after this long, once min_reps have run
    min_sample_seconds: float = 2e-4  # fast calls run in loops so a sample is at least this long


@attrs.frozen
class Timing:
    """Seconds per call: median and minimum of ``reps`` samples of ``inner`` calls each."""

    median: float
    min: float
    reps: int
    inner: int


def time_calls(fns: Sequence[Callable[[int], object]], budget: Budget) -> list[Timing]:
    """Time several calls interleaved, one sample of each per repetition, after a warm-up.

    Interleaving makes their ratios immune to the machine drifting during the measurement
    (on a shared host, memory bandwidth alone moves by ~1.5x within seconds). ``fn(i)`` gets
    a counter shared by every call (warm-up included), so all can rotate through one set of
    inputs with ``copies[i % len(copies)]``. Fast calls run in loops of ``inner`` per sample.
    """
    i = 0
    first = [math.inf] * len(fns)
    for _ in range(max(1, budget.warmup)):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn(i)
            first[j] = min(first[j], time.perf_counter() - t0)
            i += 1
    inner = [max(1, math.ceil(budget.min_sample_seconds / max(t, 1e-9))) for t in first]
    samples: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    reps = 0
    while reps < budget.max_reps and (
        reps < budget.min_reps or time.perf_counter() - start < budget.seconds
    ):
        for fn, k, out in zip(fns, inner, samples, strict=True):
            t0 = time.perf_counter()
            for _ in range(k):
                fn(i)
                i += 1
            out.append((time.perf_counter() - t0) / k)
        reps += 1
    return [
        Timing(statistics.median(xs), min(xs), len(xs), k)
        for xs, k in zip(samples, inner, strict=True)
    ]


def time_call(fn: Callable[[int], object], budget: Budget) -> Timing:
    """Time ``fn(i)`` with :func:`time.perf_counter`: :func:`time_calls` of one call."""
    return time_calls([fn], budget)[0]


def rotated_copies(a: np.ndarray, l3_bytes: int) -> tuple[np.ndarray, ...]:
    """``a`` and independent copies of it, together more than ``ROTATE_L3_FACTOR`` L3 caches.

    A memory-bound case that cycles through them reads its input from DRAM every repetition,
    as a model does (other layers' weights evict it), instead of from the last-level cache.
    At least two copies, so consecutive repetitions never share an input.
    """
    n = max(2, ROTATE_L3_FACTOR * l3_bytes // a.nbytes + 1)
    return (a, *(a.copy() for _ in range(n - 1)))


# --- the machine -----------------------------------------------------------------------


def l3_cache_bytes() -> int:
    """Size of CPU 0's level-3 cache from sysfs, or ``L3_FALLBACK_BYTES``."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if size[-1:].upper() in units:
            return int(size[:-1]) * units[size[-1].upper()]
        if size.isdigit():
            return int(size)
    return L3_FALLBACK_BYTES


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15-minute load averages, as ``uptime`` prints them."""
    try:
        return os.getloadavg()
    except OSError:
        return (math.nan, math.nan, math.nan)


def blas_info() -> list[dict[str, Any]] | None:
    """numpy's BLAS libraries as threadpoolctl sees them; None if it is not installed."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    keep = ("internal_api", "version", "architecture", "threading_layer", "num_threads")
    return [
        {k: info.get(k) for k in keep}
        for info in threadpoolctl.threadpool_info()
        if info.get("user_api") == "blas"
    ]


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[bool]:
    """Limit numpy's BLAS to ``n`` threads; yields False if threadpoolctl is missing."""
    try:
        import threadpoolctl
    except ImportError:
        yield False
        return
    with threadpoolctl.threadpool_limits(limits=n, user_api="blas"):
        yield True


def slow_blas_env() -> dict[str, str]:
    """The environment variables set now that are known to slow numpy's BLAS."""
    return {k: os.environ[k] for k in SLOW_BLAS_ENV if k in os.environ}


@attrs.frozen
class Machine:
    """What a run ran on, printed before its results."""

    suite: str
    date: str
    cpu: str
    cores: int
    l3_bytes: int
    threads: int
    isa: str
    detected_isa: str
    load_avg: tuple[float, float, float]
    numpy: str
    blas: list[dict[str, Any]] | None
    settings: Mapping[str, Any]
    warnings: tuple[str, ...]


def describe_machine(
    suite: str, threads: int, settings: Mapping[str, Any], *, numpy_limit: bool = True
) -> Machine:
    """Describe the machine now; ``threads`` is the native pool size in use.

    ``numpy_limit``: the suite compares with numpy's BLAS, so an environment that slows it
    is worth a warning (a suite that never calls BLAS passes False).
    """
    load = load_average()
    cores = os.cpu_count() or 1
    warnings: list[str] = []
    env = slow_blas_env() if numpy_limit else {}
    if env:
        unset = " ".join(f"-u {k}" for k in env)
        warnings.append(
            f"{' '.join(f'{k}={v}' for k, v in env.items())} set: these slow numpy's BLAS, so "
            f"the numpy limit is understated; rerun with `env {unset} python -m ...`"
        )
    if load[0] > BUSY_LOAD_PER_CORE * cores:
        warnings.append(
            f"the machine is busy (1-minute load {load[0]:.2f} on {cores} cores): "
            "figures may be low and noisy"
        )
    if threads > cores:
        warnings.append(f"{threads} threads on {cores} cores: oversubscribed")
    return Machine(
        suite=suite,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        cpu=cpu_model(),
        cores=cores,
        l3_bytes=l3_cache_bytes(),
        threads=threads,
        isa=kernels.active_isa().name,
        detected_isa=kernels.detected_isa().name,
        load_avg=load,
        numpy=np.__version__,
        blas=blas_info(),
        settings=dict(settings),
        warnings=tuple(warnings),
    )


# --- results ---------------------------------------------------------------------------


@attrs.frozen
class Limit:
    """A machine limit or peer measured in the same run, to compare results against."""

    name: str  # e.g. "read bandwidth"
    label: str  # short, for the table: "read", "numpy", "floor"
    value: float  # the best of samples
    unit: str  # "GB/s", "GFLOP/s" or "s"
    samples: tuple[float, ...] = ()  # e.g. measured just before and just after a case


@attrs.frozen
class Result:
    """One row: a case's time and rate, and how it compares with its limit.

    ``ratio`` is ``rate / limit`` for rates (higher is better) and ``seconds / limit`` for
    a limit in seconds (a multiple of a floor).
    """

    case: str  # the name --only matches
    kernel: str
    shape: str
    wtype: str
    batch: int
    threads: int
    timing: Timing
    rate: float | None = None
    unit: str = ""
    limit: Limit | None = None
    ratio: float | None = None
    record: Literal["limit", "result"] = "result"
    ok: bool = True  # False: the kernel's output was wrong, the figures mean nothing
    note: str = ""
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def seconds(self) -> float:
        return self.timing.median


def rate_result(
    *,
    case: str,
    kernel: str,
    shape: str,
    wtype: str,
    batch: int,
    threads: int,
    timing: Timing,
    amount: float,
    unit: str,
    limit: Limit | None,
    **kw: Any,
) -> Result:
    """A result whose rate is ``amount`` (bytes or flop) per median second, over ``limit``."""
    rate = amount / timing.median / GB
    ratio = rate / limit.value if limit is not None and limit.unit == unit else None
    return Result(
        case=case,
        kernel=kernel,
        shape=shape,
        wtype=wtype,
        batch=batch,
        threads=threads,
        timing=timing,
        rate=rate,
        unit=unit,
        limit=limit,
        ratio=ratio,
        **kw,
    )


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max |want|`` in float64: a scale-free sanity check."""
    want64 = want.astype(np.float64)
    scale = float(np.max(np.abs(want64))) or 1.0
    return float(np.max(np.abs(got.astype(np.float64) - want64))) / scale


# --- machine limits --------------------------------------------------------------------


class Probe(Protocol):
    """A machine limit that can be measured again at any point of a run."""

    name: str
    label: str
    unit: str  # "GB/s", "GFLOP/s" (higher is better) or "s" (lower is better)

    def measure(self) -> float: ...

    def row(self, value: float, threads: int) -> Result: ...


def _best(unit: str, values: Sequence[float]) -> float:
    return min(values) if unit == "s" else max(values)


def bracket(probe: Probe, fn: Callable[[], T]) -> tuple[T, Limit]:
    """Run ``fn`` between two measurements of a limit; the limit is the better of the two.

    A limit measured once at the start of a run can be far off by the time a case runs on a
    shared host; measuring it just around the case compares like with like.
    """
    before = probe.measure()
    value = fn()
    after = probe.measure()
    best = _best(probe.unit, (before, after))
    return value, Limit(probe.name, probe.label, best, probe.unit, (before, after))


@attrs.define(eq=False)
class ReadBandwidth:
    """Read bandwidth of every pool thread streaming a buffer much larger than the L3 cache.

    The buffer is kept for the whole run so the limit can be measured again beside each
    memory-bound case; :meth:`close` frees it.
    """

    n_bytes: int
    iters: int  # best of: the limit is what the machine can do
    name: str = "read bandwidth"
    label: str = "read"
    unit: str = "GB/s"
    _buf: np.ndarray | None = attrs.field(init=False, default=None)

    def measure(self) -> float:
        if self._buf is None:
            self._buf = np.empty(self.n_bytes, dtype=np.uint8)
            # Write every page: untouched pages all map the one zero page, which caches.
            self._buf.fill(1)
            kernels.read_bandwidth(self._buf, 1)  # warm-up: wake the pool, fault in the TLB
        return self.n_bytes / kernels.read_bandwidth(self._buf, self.iters) / GB

    def row(self, value: float, threads: int) -> Result:
        seconds = self.n_bytes / value / GB
        return Result(
            case="limit read bandwidth",
            kernel="read_bandwidth",
            shape=f"{self.n_bytes // MIB} MiB",
            wtype="u8",
            batch=1,
            threads=threads,
            timing=Timing(seconds, seconds, self.iters, 1),
            rate=value,
            unit="GB/s",
            record="limit",
            note=f"best of {self.iters} passes, all pool threads",
            extra={"bytes": self.n_bytes},
        )

    def close(self) -> None:
        self._buf = None


@attrs.define(eq=False)
class NumpyGemm:
    """numpy's float32 ``x @ w.T`` in GFLOP/s: x ``(m, k)``, w ``(n, k)``, BLAS on ``threads``."""

    m: int
    k: int
    n: int
    threads: int
    budget: Budget
    rng: np.random.Generator
    name: str = "numpy float32 GEMM"
    label: str = "numpy"
    unit: str = "GFLOP/s"
    last: Timing | None = attrs.field(init=False, default=None)
    limited: bool = attrs.field(init=False, default=False)  # threadpoolctl applied threads
    _arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = attrs.field(
        init=False, default=None
    )

    def measure(self) -> float:
        if self._arrays is None:
            self._arrays = (
                self.rng.standard_normal((self.m, self.k), dtype=np.float32),
                self.rng.standard_normal((self.n, self.k), dtype=np.float32),
                np.empty((self.m, self.n), dtype=np.float32),
            )
        x, w, out = self._arrays
        with blas_threads(self.threads) as limited:
            self.last = time_call(lambda _: np.matmul(x, w.T, out=out), self.budget)
        self.limited = limited
        time.sleep(BLAS_IDLE_SECONDS)  # its workers spin a while: keep them off the next case
        return 2.0 * self.m * self.n * self.k / self.last.median / GB

    def row(self, value: float, threads: int) -> Result:
        assert self.last is not None, "measure() first"
        blas = self.threads if self.limited else "not limited (no threadpoolctl)"
        return Result(
            case="limit numpy gemm",
            kernel="numpy.matmul",
            shape=f"{self.m}x{self.k}x{self.n}",
            wtype="F32",
            batch=self.m,
            threads=threads,
            timing=self.last,
            rate=value,
            unit="GFLOP/s",
            record="limit",
            note=f"x @ w.T, BLAS threads {blas}",
            extra={"m": self.m, "k": self.k, "n": self.n, "blas_threads_limited": self.limited},
        )


@attrs.define(eq=False)
class CallFloor:
    """Seconds of a checked call that does almost nothing: ``realm.kernels.add`` of 16 floats.

    Python argument checks, cffi and the pool's dispatch: the least any kernel call costs.
    :meth:`call` can also be timed interleaved with a case (:func:`time_calls`).
    """

    budget: Budget
    name: str = f"call floor (add of {FLOOR_ELEMS} floats)"
    label: str = "floor"
    unit: str = "s"
    last: Timing | None = attrs.field(init=False, default=None)
    _x: np.ndarray = attrs.field(init=False, factory=lambda: np.ones(FLOOR_ELEMS, np.float32))
    _out: np.ndarray = attrs.field(init=False, factory=lambda: np.empty(FLOOR_ELEMS, np.float32))

    def call(self, _: int) -> object:
        return kernels.add(self._x, self._x, out=self._out)

    def measure(self) -> float:
        self.last = time_call(self.call, self.budget)
        return self.last.median

    def row(self, value: float, threads: int) -> Result:
        assert self.last is not None, "measure() first"
        return Result(
            case="limit call floor",
            kernel="add",
            shape=str(FLOOR_ELEMS),
            wtype="F32",
            batch=1,
            threads=threads,
            timing=self.last,
            record="limit",
            note="Python checks + cffi + pool dispatch",
        )


@attrs.frozen
class Target:
    """A goal from an issue, checked at the end of a run."""

    name: str
    value: float | None  # None: the case did not run or produced a wrong result
    op: Literal[">=", "<="]
    threshold: float
    caveat: str = ""  # why the comparison may not be meaningful in this run

    @property
    def passed(self) -> bool:
        if self.value is None or math.isnan(self.value):
            return False
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold


# --- reporting -------------------------------------------------------------------------


def format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def format_number(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _format_limit(limit: Limit) -> str:
    value = (
        format_seconds(limit.value)
        if limit.unit == "s"
        else f"{format_number(limit.value)} {limit.unit}"
    )
    return f"{limit.label} {value}"


# (header, width, align)
_COLUMNS: Final = (
    ("kernel", 14, "<"),
    ("shape", 18, "<"),
    ("type", 5, "<"),
    ("B", 3, ">"),
    ("thr", 3, ">"),
    ("median", 9, ">"),
    ("min", 9, ">"),
    ("rate", 13, ">"),
    ("limit", 17, ">"),
    ("ratio", 5, ">"),
    ("note", 0, "<"),
)


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


class Reporter:
    """Prints a suite's records as a terminal table or as JSON lines, as they arrive."""

    def __init__(self, *, json_lines: bool, out: TextIO = sys.stdout) -> None:
        self.json_lines = json_lines
        self.out = out
        self._started = time.perf_counter()
        self._suite = ""

    def _emit(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _json(self, record: str, fields: Mapping[str, Any]) -> None:
        obj = {"record": record, "suite": self._suite, **fields}
        self._emit(json.dumps(obj, default=_json_default, ensure_ascii=False))

    def machine(self, m: Machine) -> None:
        self._suite = m.suite
        if self.json_lines:
            fields = attrs.asdict(m, recurse=False)
            del fields["suite"]
            self._json("machine", fields)
            return
        self._emit(f"Realm benchmarks: {m.suite}  ({m.date})")
        self._emit(f"  cpu      {m.cpu}, {m.cores} cores, L3 {m.l3_bytes // MIB} MiB")
        self._emit(f"  threads  {m.threads}")
        self._emit(f"  isa      {m.isa} (detected {m.detected_isa})")
        self._emit("  load     {:.2f} {:.2f} {:.2f} (1/5/15 min)".format(*m.load_avg))
        if m.blas is None:
            blas = "BLAS unknown (pip install threadpoolctl, or the [bench] extra)"
        else:
            blas = "; ".join(
                f"{b['internal_api']} {b['version']} ({b['architecture']}, "
                f"{b['threading_layer']}, {b['num_threads']} threads)"
                for b in m.blas
            )
        self._emit(f"  numpy    {m.numpy}, {blas}")
        if m.settings:
            self._emit("  settings " + ", ".join(f"{k}={v}" for k, v in m.settings.items()))
        for w in m.warnings:
            self._emit(f"  WARNING  {w}")

    def section(self, title: str) -> None:
        """A heading in the table (JSON output has none)."""
        if self.json_lines:
            return
        self._emit("")
        self._emit(f"-- {title}")
        self._emit(self._row([c[0] for c in _COLUMNS]))

    def _row(self, cells: Sequence[str]) -> str:
        parts = []
        for (_, width, align), cell in zip(_COLUMNS, cells, strict=True):
            parts.append(f"{cell:{align}{width}}" if width else cell)
        return "  ".join(parts).rstrip()

    def result(self, r: Result) -> None:
        if self.json_lines:
            self._json(
                r.record,
                {
                    "case": r.case,
                    "kernel": r.kernel,
                    "shape": r.shape,
                    "wtype": r.wtype,
                    "batch": r.batch,
                    "threads": r.threads,
                    "seconds": r.timing.median,
                    "min_seconds": r.timing.min,
                    "reps": r.timing.reps,
                    "calls_per_rep": r.timing.inner,
                    "rate": r.rate,
                    "unit": r.unit or None,
                    "limit_name": r.limit.name if r.limit else None,
                    "limit": r.limit.value if r.limit else None,
                    "limit_unit": r.limit.unit if r.limit else None,
                    "limit_samples": list(r.limit.samples) if r.limit else None,
                    "ratio": r.ratio,
                    "ok": r.ok,
                    "note": r.note or None,
                    **r.extra,
                },
            )
            return
        note = r.note if r.ok else f"WRONG RESULT: {r.note}"
        self._emit(
            self._row(
                [
                    r.kernel,
                    r.shape,
                    r.wtype,
                    str(r.batch),
                    str(r.threads),
                    format_seconds(r.timing.median),
                    format_seconds(r.timing.min),
                    f"{format_number(r.rate)} {r.unit}" if r.rate is not None else "-",
                    _format_limit(r.limit) if r.limit else "-",
                    format_number(r.ratio) if r.ratio is not None else "-",
                    note,
                ]
            )
        )

    def error(self, case: str, message: str) -> None:
        """A case that raised instead of producing results."""
        if self.json_lines:
            self._json("error", {"case": case, "message": message})
        else:
            self._emit(f"ERROR  {case}: {message}")

    def text(self, line: str) -> None:
        """A free line of explanation in the table (JSON output has none)."""
        if not self.json_lines:
            self._emit(line)

    def targets(self, targets: Sequence[Target]) -> None:
        if not targets:
            return
        if not self.json_lines:
            self._emit("")
            self._emit("-- targets")
        for t in targets:
            if self.json_lines:
                self._json("target", {**attrs.asdict(t), "passed": t.passed})
                continue
            value = "not measured" if t.value is None else f"{t.value:.2f}"
            status = "PASS" if t.passed else "FAIL"
            caveat = f"  (caveat: {t.caveat})" if t.caveat else ""
            self._emit(f"{status}  {t.name}: {value} (target {t.op} {t.threshold:g}){caveat}")

    def end(self) -> None:
        load = load_average()
        seconds = time.perf_counter() - self._started
        if self.json_lines:
            self._json("end", {"load_avg": load, "wall_seconds": seconds})
            return
        self._emit("")
        self._emit(
            "done in {:.1f} s; load {:.2f} {:.2f} {:.2f} (1/5/15 min)".format(seconds, *load)
        )
