"""Layer paging benchmarks: decode and prefill of a paged model under budgets of 1/4, 1/2 and the
whole model, against the unpaged model and the machine's file-read bandwidth.

    python -m benchmarks.paging [--quick] [--json] [--threads N] [--only SUBSTRING]

The model is ``benchmarks.models``' TinyLlama-1.1B-shaped Q8_0 llama (the same cached file,
written once under ``~/.cache/realm/bench/``). Budgets are fractions of its pageable bytes (every
block resident at once, in page-cache granules: ``PagerStatistics.pageable_bytes``); each budget
has its own ``load_model(path, max_resident_bytes=...)``, and the unpaged model is
``load_model(path)``.

Limits, measured in the same run:
    file read warm   the model file read start to end with ``readinto`` into one reused 16 MiB
                     buffer while the page cache holds it (it was just read), best of 3;
                     measured before and after the warm cases.
    file read cold   the same after ``posix_fadvise(POSIX_FADV_DONTNEED)`` dropped the file's
                     pages from the page cache (every mapping of it released first); measured
                     around each cold case. When dropping has no effect (the cold read is as
                     fast as the warm one: a tmpfs, or a host that ignores the advice), the cold
                     cases are skipped and the run says so.
    read bandwidth   memory, every pool thread (as ``benchmarks.models``): the unpaged decode's
                     bound = bandwidth / weight bytes per token.

Cases (``--only`` matches their names: "decode warm", "prefill cold", ...):
    decode   one session, 16-token prompt, then N steps of one token each (logits of each);
             rewound to the prompt between samples. Rate = tokens / s.
    prefill  a prompt into a fresh session (logits of the last token). Rate = prompt tokens / s.
    warm     unpaged, whole, 1/2 and 1/4 timed interleaved (one sample of each in turn), the file
             in the page cache: the cost of paging is mapping and unmapping pages.
    cold     1/2 and 1/4, the file's page cache dropped before every step (the host has no
             memory to cache the model): every block paged in is read from the disk.

A paged row's limit is the paging bound: 1 / max(unpaged seconds per token, bytes paged per
token / file-read bandwidth) — reading and computing perfectly overlapped; ratio = rate / bound.
Its note gives the rate against the unpaged model's, the bytes paged per token and their
rate against the file-read bandwidth, the hit rate (blocks resident when the step needed them)
and the prefetch's hit rate (prefetches finished in time / prefetches the step used). The
resident bytes of each paged model's own mapping are read from ``/proc/self/smaps`` after each
sample; a target checks that they stayed within budget + the model's fixed bytes.
"""

from __future__ import annotations

import gc
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import numpy as np

from realm import kernels
from realm.model import Model, PagerStatistics, load_model
from realm.model._pager import GRANULE, _Mapping

from ._common import (
    GB,
    MIB,
    Budget,
    Limit,
    ReadBandwidth,
    Reporter,
    Result,
    Target,
    Timing,
    argument_parser,
    bracket,
    describe_machine,
)
from .models import SEED, TINYLLAMA, ensure_model, time_samples, weight_bytes_per_token

SUITE: Final = "paging"
WTYPE: Final = "Q8_0"
DECODE_PROMPT: Final = 16
READ_BUFFER: Final = 16 * MIB
COLD_MIN_SLOWDOWN: Final = 1.25  # a cold read slower than warm by less: dropping had no effect
SHARES: Final = (("whole", 1, 1), ("1/2", 1, 2), ("1/4", 1, 4))  # name, numerator, denominator


@attrs.frozen
class Profile:
    decode_steps: int
    cold_decode_steps: int
    prefill_tokens: int
    bandwidth_bytes: int
    bandwidth_iters: int
    budget: Budget  # samples of a warm case
    cold_budget: Budget  # samples of a cold case (each step reads most of the model)


FULL: Final = Profile(
    decode_steps=32,
    cold_decode_steps=8,
    prefill_tokens=128,
    bandwidth_bytes=1024 * MIB,
    bandwidth_iters=10,
    budget=Budget(warmup=1, min_reps=5, max_reps=20, seconds=6.0),
    cold_budget=Budget(warmup=1, min_reps=3, max_reps=5, seconds=4.0),
)
QUICK: Final = Profile(
    decode_steps=8,
    cold_decode_steps=3,
    prefill_tokens=32,
    bandwidth_bytes=256 * MIB,
    bandwidth_iters=5,
    budget=Budget(warmup=1, min_reps=2, max_reps=2, seconds=0.0),
    cold_budget=Budget(warmup=1, min_reps=2, max_reps=2, seconds=0.0),
)


# --- the file, its page cache, the mappings -----------------------------------------------------


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to drop the file's clean, unmapped pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_file_seconds(path: Path, buf: bytearray) -> float:
    """Seconds to read the whole file with readinto into ``buf`` (reused)."""
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        t0 = time.perf_counter()
        while f.readinto(view):
            pass
        return time.perf_counter() - t0


@attrs.define(eq=False)
class FileRead:
    """File-read bandwidth of the model file, page cache warm or cold (a ``Probe``)."""

    path: Path
    cold: bool
    release: Callable[[], None]  # unmaps every mapping of the file (cold only)
    iters: int = 3
    name: str = ""
    label: str = ""
    unit: str = "GB/s"
    _buf: bytearray = attrs.field(init=False, factory=lambda: bytearray(READ_BUFFER))

    def __attrs_post_init__(self) -> None:
        self.name = f"file read {'cold' if self.cold else 'warm'}"
        self.label = "cold" if self.cold else "warm"

    def measure(self) -> float:
        size = self.path.stat().st_size
        best = math.inf
        for _ in range(self.iters if not self.cold else 1):
            if self.cold:
                self.release()
                drop_page_cache(self.path)
            best = min(best, read_file_seconds(self.path, self._buf))
        return size / best / GB

    def row(self, value: float, threads: int) -> Result:
        size = self.path.stat().st_size
        seconds = size / value / GB
        return Result(
            case=f"limit {self.name}",
            kernel="readinto",
            shape=f"{size / MIB:.0f} MiB",
            wtype="u8",
            batch=1,
            threads=1,
            timing=Timing(seconds, seconds, 1 if self.cold else self.iters, 1),
            rate=value,
            unit="GB/s",
            record="limit",
            note="page cache dropped first (posix_fadvise)" if self.cold else "page cache warm",
        )


def release_mapping(model: Model) -> None:
    """Unmap a model's pages from this process (an unpaged model's too: nothing is lost)."""
    if model.pager is not None:
        model.pager.trim()
    m = _Mapping(model._file.reader.data)
    m.drop(m.base, m.end)


def mapped_bytes(model: Model) -> int:
    """Resident bytes of the model's own mapping of its file (smaps, by address range)."""
    m = _Mapping(model._file.reader.data)
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
                if head:
                    inside = m.base <= int(head[1], 16) and int(head[2], 16) <= m.end
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return -1
    return total


# --- engines ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class Engine:
    """One loaded model (paged under a budget, or unpaged) and what was seen of it."""

    name: str  # "unpaged", "whole", "1/2", "1/4"
    model: Model
    budget: int | None
    peak_mapped: int = 0
    before: PagerStatistics | None = None  # statistics at the start of the timed samples
    tokens: int = 0  # tokens of the timed samples

    def stats(self) -> PagerStatistics | None:
        return None if self.model.pager is None else self.model.pager.statistics()

    def observe(self) -> None:
        self.peak_mapped = max(self.peak_mapped, mapped_bytes(self.model))


@attrs.define(eq=False)
class Bench:
    profile: Profile
    threads: int
    path: Path
    rng: np.random.Generator
    per_token: int  # weight bytes read per decoded token
    n_bytes: int
    probe: ReadBandwidth
    warm: FileRead
    cold: FileRead
    engines: list[Engine]
    results: list[Result] = attrs.field(factory=list)

    def tokens(self, n: int) -> np.ndarray:
        return self.rng.integers(3, TINYLLAMA.vocab, n, dtype=np.int32)

    def release_all(self, keep: Engine | None = None) -> None:
        for e in self.engines:
            if e is not keep:
                release_mapping(e.model)
        if keep is not None and keep.model.pager is not None:
            keep.model.pager.trim()


Sampler = Callable[[], float]


def _decode_sampler(b: Bench, e: Engine, steps: int, cold: bool) -> tuple[Sampler, Any]:
    p = DECODE_PROMPT
    prompt = b.tokens(p)
    toks = [b.tokens(1) for _ in range(steps)]
    session = e.model.open_session(capacity=p + steps)
    session.extend(prompt, logits="none")

    def run() -> float:
        session.rewind(p)
        seconds = 0.0
        for t in toks:
            if cold:
                drop_page_cache(b.path)
            t0 = time.perf_counter()
            session.extend(t, logits="last")
            seconds += time.perf_counter() - t0
        e.tokens += steps
        e.observe()
        return seconds

    return run, session


def _prefill_sampler(b: Bench, e: Engine, n: int, cold: bool) -> tuple[Sampler, Any]:
    prompt = b.tokens(n)

    def run() -> float:
        with e.model.open_session(capacity=n) as s:
            if cold:
                drop_page_cache(b.path)
            t0 = time.perf_counter()
            s.extend(prompt, logits="last")
            seconds = time.perf_counter() - t0
        e.tokens += n
        e.observe()
        return seconds

    return run, None


def _timed(
    b: Bench, engines: Sequence[Engine], make: Callable[[Engine], tuple[Sampler, Any]],
    budget: Budget, units: int,
) -> list[Timing]:  # fmt: skip
    """Samples of every engine interleaved; pager statistics counted over the timed samples
    only (the warm-up's first pass pages the whole model in)."""
    made = [make(e) for e in engines]
    fns: list[Sampler] = []
    for e, (run, _) in zip(engines, made, strict=True):

        def first(e: Engine = e, run: Sampler = run) -> float:
            seconds = run()
            if e.before is None:  # the warm-up sample is over: start counting
                e.before, e.tokens = e.stats(), 0
            return seconds

        fns.append(first)
    for e in engines:
        e.before, e.tokens, e.peak_mapped = None, 0, 0
    try:
        return time_samples(fns, budget, [units] * len(fns))
    finally:
        for _, keep in made:
            if keep is not None:
                keep.close()


# --- rows ------------------------------------------------------------------------------------


def _paged_figures(e: Engine) -> dict[str, Any]:
    st, before = e.stats(), e.before
    assert st is not None and before is not None
    acquires = (st.hits - before.hits) + (st.misses - before.misses)
    pf_used = (st.prefetch_hits - before.prefetch_hits) + (st.prefetch_late - before.prefetch_late)
    paged = st.bytes_paged - before.bytes_paged
    return {
        "budget_bytes": e.budget,
        "bytes_paged_per_token": paged / max(e.tokens, 1),
        "hit_rate": (st.hits - before.hits) / acquires if acquires else math.nan,
        "prefetch_hit_rate": (st.prefetch_hits - before.prefetch_hits) / pf_used
        if pf_used
        else math.nan,
        "prefetches": st.prefetches - before.prefetches,
        "evictions": st.evictions - before.evictions,
        "fixed_bytes": st.fixed_bytes,
        "pageable_bytes": st.pageable_bytes,
        "peak_mapped_bytes": e.peak_mapped,
        "within_budget": e.peak_mapped <= (e.budget or 0) + st.fixed_bytes + 2 * GRANULE,
    }


def _row(
    b: Bench, case: str, e: Engine, shape: str, timing: Timing, tokens: int,
    limit: Limit | None, note: str, **extra: Any,
) -> Result:  # fmt: skip
    rate = tokens / timing.median
    ratio = rate / limit.value if limit is not None and limit.unit == "tok/s" else None
    return Result(
        case=case,
        kernel=e.name if e.budget is None else f"budget {e.name}",
        shape=f"{case} {shape}",
        wtype=WTYPE,
        batch=1,
        threads=b.threads,
        timing=timing,
        rate=rate,
        unit="tok/s",
        limit=limit,
        ratio=ratio,
        note=note,
        extra={"engine": e.name, "tokens_per_unit": tokens, **extra},
    )


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.0%}"


def _paged_rows(
    b: Bench, case: str, shape: str, engines: Sequence[Engine], timings: Sequence[Timing],
    tokens: int, file_bw: Limit, unpaged_seconds: float | None,
) -> Iterator[Result]:  # fmt: skip
    for e, t in zip(engines, timings, strict=True):
        if e.model.pager is None:
            continue
        f = _paged_figures(e)
        per_unit = f["bytes_paged_per_token"] * tokens  # bytes paged per timed unit
        read_s = per_unit / (file_bw.value * GB)
        compute_s = unpaged_seconds if unpaged_seconds is not None else 0.0
        bound_s = max(compute_s, read_s)
        limit = (
            None
            if bound_s <= 0
            else Limit(
                f"paging bound (unpaged time, bytes paged / {file_bw.name})",
                f"bound({file_bw.label})",
                tokens / bound_s,
                "tok/s",
            )
        )
        vs_unpaged = None if unpaged_seconds is None else unpaged_seconds / t.median
        paged_rate = per_unit / t.median / GB
        parts = [] if vs_unpaged is None else [f"{vs_unpaged:.2f}x unpaged"]
        parts += [
            f"paged {per_unit / tokens / MIB:.0f} MiB/tok at {paged_rate:.2f} GB/s "
            f"({paged_rate / file_bw.value:.2f} of {file_bw.label} read {file_bw.value:.2f})",
            f"hit {_pct(f['hit_rate'])}, prefetch {_pct(f['prefetch_hit_rate'])}",
            f"peak {f['peak_mapped_bytes'] / MIB:.0f} MiB mapped",
        ]
        yield _row(
            b, case, e, shape, t, tokens, limit, "; ".join(parts),
            vs_unpaged=vs_unpaged, file_read_bandwidth=file_bw.value,
            file_read_samples=list(file_bw.samples), paged_gb_per_s=paged_rate, **f,
        )  # fmt: skip


def _unpaged_row(
    b: Bench, case: str, shape: str, e: Engine, t: Timing, tokens: int, bw: Limit
) -> Result:
    """The unpaged model: its limit is memory read bandwidth / weight bytes per pass (tight
    for decode; for prefill a loose bound, the weights read once per prompt: it is compute
    bound, see benchmarks.models)."""
    per = tokens * GB / b.per_token
    limit = Limit("weights bound (read bandwidth / weight bytes per pass)", "bound",
                  bw.value * per, "tok/s", tuple(s * per for s in bw.samples))  # fmt: skip
    note = f"read {bw.value:.1f} GB/s, {b.per_token / MIB:.0f} MiB/pass; the paged rows' reference"
    return _row(b, case, e, shape, t, tokens, limit, note)


def warm(b: Bench, kind: str) -> Iterator[Result]:
    p = b.profile
    case = f"{kind} warm"
    if kind == "decode":
        units, shape = 1, f"{DECODE_PROMPT}+{p.decode_steps}"

        def make(e: Engine) -> tuple[Sampler, Any]:
            return _decode_sampler(b, e, p.decode_steps, cold=False)

        inner = p.decode_steps
    else:
        units, shape = p.prefill_tokens, f"{p.prefill_tokens}"

        def make(e: Engine) -> tuple[Sampler, Any]:
            return _prefill_sampler(b, e, p.prefill_tokens, cold=False)

        inner = 1

    def run() -> tuple[list[Timing], Limit]:
        return bracket(b.probe, lambda: _timed(b, b.engines, make, p.budget, inner))

    (timings, bw), file_bw = bracket(b.warm, run)
    unpaged = b.engines[0]
    yield _unpaged_row(b, case, shape, unpaged, timings[0], units, bw)
    yield from _paged_rows(b, case, shape, b.engines, timings, units, file_bw, timings[0].median)


def cold(b: Bench, kind: str, unpaged: dict[str, float]) -> Iterator[Result]:
    p = b.profile
    case = f"{kind} cold"
    for e in b.engines:
        if e.model.pager is None or e.name == "whole":
            continue
        b.release_all(keep=e)
        if kind == "decode":
            units, shape = 1, f"{DECODE_PROMPT}+{p.cold_decode_steps}"
            inner = p.cold_decode_steps

            def make(e: Engine) -> tuple[Sampler, Any]:
                return _decode_sampler(b, e, p.cold_decode_steps, cold=True)
        else:
            units, shape = p.prefill_tokens, f"{p.prefill_tokens}"
            inner = 1

            def make(e: Engine) -> tuple[Sampler, Any]:
                return _prefill_sampler(b, e, p.prefill_tokens, cold=True)

        def measure(e: Engine = e, make: Any = make, inner: int = inner) -> list[Timing]:
            return _timed(b, [e], make, p.cold_budget, inner)

        b.cold.release = lambda e=e: b.release_all(keep=e)
        timings, file_bw = bracket(b.cold, measure)
        yield from _paged_rows(b, case, shape, [e], timings, units, file_bw, unpaged.get(kind))


# --- main ------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(SUITE, __doc__.splitlines()[0] if __doc__ else SUITE)
    args = parser.parse_args(argv)
    names = ["decode warm", "prefill warm", "decode cold", "prefill cold"]
    selected = [n for n in names if args.only is None or args.only in n]
    if not selected:
        parser.error(f"no case name contains {args.only!r}; names: {', '.join(names)}")
    threads = kernels.set_threads(args.threads)
    profile = QUICK if args.quick else FULL
    path = ensure_model(TINYLLAMA, WTYPE, SEED, _log)
    per_token, n_bytes = weight_bytes_per_token(path)

    reporter = Reporter(json_lines=args.json)
    settings = {
        "quick": args.quick,
        "only": args.only,
        "model": f"llama {TINYLLAMA.key} {WTYPE} (TinyLlama-1.1B shape), random weights",
        "granule": f"{GRANULE // 1024} KiB",
    }
    reporter.machine(describe_machine(SUITE, threads, settings, numpy_limit=False))

    engines = [Engine("unpaged", load_model(path), None)]
    probe_model = load_model(path, max_resident_bytes=0)
    assert probe_model.pager is not None
    pageable = probe_model.pager.statistics().pageable_bytes
    probe_model.close()
    del probe_model
    for name, num, den in SHARES:
        budget = pageable * num // den
        engines.append(Engine(name, load_model(path, max_resident_bytes=budget), budget))

    b = Bench(
        profile, threads, path, np.random.default_rng(SEED), per_token, n_bytes,
        ReadBandwidth(profile.bandwidth_bytes, profile.bandwidth_iters),
        FileRead(path, cold=False, release=lambda: None),
        FileRead(path, cold=True, release=lambda: None), engines,
    )  # fmt: skip
    b.cold.release = b.release_all

    reporter.section("machine limits at the start (each case measures its own around it)")
    reporter.result(b.probe.row(b.probe.measure(), threads))
    reporter.result(b.warm.row(b.warm.measure(), threads))
    cold_bw = b.cold.measure()
    reporter.result(b.cold.row(cold_bw, threads))
    warm_bw = b.warm.measure()
    can_cold = cold_bw * COLD_MIN_SLOWDOWN < warm_bw
    if not can_cold:
        reporter.text(
            f"cold cases skipped: a cold read ({cold_bw:.2f} GB/s) is not slower than a warm "
            f"one ({warm_bw:.2f} GB/s): the page cache could not be dropped here"
        )
    budgets = ", ".join(f"{e.name} {e.budget / MIB:.0f} MiB" for e in engines if e.budget)
    reporter.text(
        f"model {n_bytes / MIB:.0f} MiB of weights ({per_token / MIB:.0f} MiB read per decoded "
        f"token), pageable {pageable / MIB:.0f} MiB; budgets {budgets}"
    )

    unpaged_seconds: dict[str, float] = {}
    for kind in ("decode", "prefill"):
        if f"{kind} warm" in selected:
            reporter.section(f"{kind}, page cache warm: unpaged and paged, timed interleaved")
            try:
                for r in warm(b, kind):
                    b.results.append(r)
                    reporter.result(r)
                    if r.extra.get("engine") == "unpaged":
                        unpaged_seconds[kind] = r.timing.median
            except Exception as e:
                reporter.error(f"{kind} warm", f"{type(e).__name__}: {e}")
    for kind in ("decode", "prefill"):
        if f"{kind} cold" in selected and can_cold:
            reporter.section(f"{kind}, page cache dropped before every step")
            try:
                for r in cold(b, kind, unpaged_seconds):
                    b.results.append(r)
                    reporter.result(r)
            except Exception as e:
                reporter.error(f"{kind} cold", f"{type(e).__name__}: {e}")

    reporter.section("limits again, at the end (drift check)")
    reporter.result(attrs.evolve(b.probe.row(b.probe.measure(), threads), case="limit read end"))
    reporter.result(attrs.evolve(b.warm.row(b.warm.measure(), threads), case="limit warm end"))
    b.probe.close()
    for e in engines:
        e.model.close()
    gc.collect()

    reporter.text("")
    reporter.text(
        "rate = tokens/s (decode per token, prefill per prompt token). Paged rows: limit = the "
        "paging bound = 1 / max(unpaged s/token, bytes paged per token / file-read bandwidth "
        "of the same page-cache state), ratio = rate / bound; hit = blocks resident when the "
        "step needed them; prefetch = prefetched blocks finished in time / prefetched blocks "
        "used; peak = the paged model's mapping's resident bytes after a sample (smaps). "
        "Unpaged decode: limit = memory read bandwidth / weight bytes per token."
    )
    targets = [
        Target(
            f"{r.case} {r.extra['engine']}: peak mapped / (budget + fixed bytes)",
            r.extra["peak_mapped_bytes"] / (r.extra["budget_bytes"] + r.extra["fixed_bytes"]),
            "<=",
            1.0 + 2 * GRANULE / max(r.extra["budget_bytes"], 1),
        )
        for r in b.results
        if r.extra.get("budget_bytes")
    ]
    reporter.targets(targets)
    reporter.end()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
