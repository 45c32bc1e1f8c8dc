"""LoRA benchmark: tenants with their own adapters sharing batched steps, against no adapters.

    python -m benchmarks.lora [--quick] [--json] [--threads N] [--isa LEVEL]
                              [--adapter-type F16] [--rank 16]

One ``realm.open_runtime`` on the TinyLlama-shaped model of ``benchmarks.models`` (Q8_0,
random weights, cached under ``~/.cache/realm/bench/``) with 8 tenants; each has its own
rank-16 adapter (F16 unless ``--adapter-type`` says otherwise, random, on all seven projections
of every layer: the largest adapter a llama.cpp conversion of a PEFT "all linear" LoRA makes),
named ``a`` in its spec, so tenant i's ``adapter: "a"`` is its own file. Calls are greedy
``generate`` with ``max_tokens`` 32 (``--quick``: 16), as in ``benchmarks.batching``.

Cases:
    aggregate   8 tenants' calls started together, with adapters (each its own) and without,
                interleaved (base, lora, base, lora, ...) so that drift hits both alike.
                Aggregate decode tok/s = decoded tokens / the decode window (prefill left out;
                from the guest's own ``timings``). The lora row's limit is the base row
                measured in the same run: ratio = lora / base.
    step        the bare ``Model.step``: one batched decode step of 8 sessions, each with its
                own adapter versus none, timed interleaved (no runtime, no guests); "step lora
                cpu" is the same on one thread in CPU time (process time), the adapters' work
                whatever else a shared machine runs.

Target: aggregate with adapters >= 0.85x without.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import numpy as np
import trio

import realm
from realm import kernels
from realm.actors import Runtime
from realm.model import Model, load_model, save_adapter

from ._common import (
    GB,
    MIB,
    Limit,
    ReadBandwidth,
    Reporter,
    Result,
    Target,
    Timing,
    argument_parser,
    describe_machine,
)
from .batching import Round, gen_params
from .batching import run_round as batching_round
from .models import SEED, TINYLLAMA, _log, cache_dir, ensure_model, weight_bytes_per_token

SUITE: Final = "lora"
TENANTS: Final = 8
RANK: Final = 16
WTYPE: Final = "Q8_0"
TARGET_MIN: Final = 0.85  # aggregate with adapters / without
NOISY_SPREAD: Final = 1.25  # runs of one case varying more than this: the target's caveat
ADAPTER_VERSION: Final = 1  # part of the cached adapters' names
ROLES: Final = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@attrs.frozen
class Profile:
    max_tokens: int
    reps: int
    step_reps: int


FULL: Final = Profile(max_tokens=32, reps=3, step_reps=7)
QUICK: Final = Profile(max_tokens=16, reps=2, step_reps=3)


def ensure_adapter(model: Model, i: int, rank: int, wtype: str) -> Path:
    """Tenant i's adapter file (cached beside the model; written once)."""
    path = cache_dir() / f"lora-{TINYLLAMA.key}-r{rank}-{wtype}-{i}-v{ADAPTER_VERSION}.gguf"
    if path.is_file():
        return path
    s = model.spec
    qd = s.n_heads * s.head_dim
    dims = {"attn_q": (qd, s.n_embd), "attn_k": (s.kv_dim, s.n_embd),
            "attn_v": (s.kv_dim, s.n_embd), "attn_output": (s.n_embd, qd),
            "ffn_gate": (s.n_ff, s.n_embd), "ffn_up": (s.n_ff, s.n_embd),
            "ffn_down": (s.n_embd, s.n_ff)}  # fmt: skip
    rng = np.random.default_rng(1000 + i)
    pairs = {}
    for layer in range(s.n_layers):
        for role in ROLES:
            n_out, n_in = dims[role]
            pairs[f"blk.{layer}.{role}.weight"] = (
                rng.normal(0, 0.02, (rank, n_in)).astype(np.float32),
                rng.normal(0, 0.02, (n_out, rank)).astype(np.float32),
            )
    _log(f"lora: writing {path} (once; it is cached)")
    tmp = path.with_name(f"{path.name}.tmp")
    save_adapter(tmp, pairs, arch=model.info.arch, alpha=2 * rank, wtype=wtype)
    tmp.replace(path)
    return path


async def run_round(rt: Runtime, params: dict[str, Any]) -> Round:
    """The 8 tenants' ``generate`` calls, started together."""
    return await batching_round(rt, TENANTS, params)


async def aggregate(
    model: Model, adapters: Sequence[Path], profile: Profile
) -> tuple[list[float], list[float]]:
    tenants = {f"tenant{i}": {"adapters": {"a": str(p)}} for i, p in enumerate(adapters)}
    base_rates, lora_rates = [], []
    params = gen_params(profile.max_tokens)
    async with realm.open_runtime(models={"m": model}, tenants=tenants) as rt:
        await run_round(rt, params | {"max_tokens": 4})  # warm-up: instances, caches
        await run_round(rt, params | {"max_tokens": 4, "adapter": "a"})
        for _ in range(profile.reps):
            base_rates.append((await run_round(rt, params)).aggregate)
            lora_rates.append((await run_round(rt, params | {"adapter": "a"})).aggregate)
    return base_rates, lora_rates


def step_times(
    model: Model, adapters: Sequence[Any], profile: Profile, clock: Any = time.perf_counter
) -> tuple[list[float], ...]:
    """One batched decode step of 8 sessions (each at 16 positions), without and with."""
    prompt = np.arange(3, 19, dtype=np.int32)
    out: tuple[list[float], list[float]] = ([], [])
    for _ in range(profile.step_reps + 1):
        for k, use in enumerate((False, True)):
            sessions = [model.open_session(capacity=64, adapter=a if use else None)
                        for a in adapters]  # fmt: skip
            try:
                model.step([(s, prompt, "none") for s in sessions])
                t0 = clock()
                model.step([(s, [7], "last") for s in sessions])
                out[k].append(clock() - t0)
            finally:
                for s in sessions:
                    s.close()
    return out[0][1:], out[1][1:]  # the first of each: warm-up


def _timing(xs: Sequence[float]) -> Timing:
    return Timing(statistics.median(xs), min(xs), len(xs), 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(SUITE, __doc__.splitlines()[0] if __doc__ else SUITE)
    parser.add_argument("--adapter-type", default="F16", choices=("F32", "F16", "Q8_0"),
                        help="the adapters' tensor type (default F16)")  # fmt: skip
    parser.add_argument("--rank", type=int, default=RANK, help=f"adapter rank (default {RANK})")
    args = parser.parse_args(argv)
    if not 1 <= args.rank <= 1024:
        parser.error(f"--rank must be in [1, 1024], not {args.rank}")
    threads = kernels.set_threads(args.threads)
    profile = QUICK if args.quick else FULL
    path = ensure_model(TINYLLAMA, WTYPE, SEED, _log)
    per_token, n_bytes = weight_bytes_per_token(path)
    model = load_model(path)
    files = [ensure_adapter(model, i, args.rank, args.adapter_type) for i in range(TENANTS)]
    loaded = [model.load_adapter(f) for f in files]
    adapter_bytes = loaded[0].nbytes

    reporter = Reporter(json_lines=args.json)
    settings = {
        "quick": args.quick,
        "model": f"llama {TINYLLAMA.key} (TinyLlama-1.1B shape) {WTYPE}, random, seed {SEED}",
        "adapters": f"{TENANTS} x rank {args.rank} {args.adapter_type}, all 7 projections, "
        f"{adapter_bytes / MIB:.1f} MiB each",
        "max_tokens": profile.max_tokens,
        "reps": profile.reps,
    }
    reporter.machine(describe_machine(SUITE, threads, settings, numpy_limit=False))
    probe = ReadBandwidth(256 * MIB, 5)
    reporter.section("machine limit")
    reporter.result(probe.row(probe.measure(), threads))
    reporter.section(
        f"{WTYPE}: {n_bytes / GB:.2f} GB of weights ({per_token / GB:.3f} GB read per step); "
        f"adapters: {TENANTS * adapter_bytes / GB:.3f} GB read per step when all 8 differ"
    )
    shape = f"{TENANTS} tenants, rank {args.rank} {args.adapter_type}"
    ratio, caveat = None, ""
    try:
        base, lora = trio.run(aggregate, model, files, profile)
        b_med, l_med = statistics.median(base), statistics.median(lora)
        ratio = l_med / b_med
        spread = max(max(xs) / min(xs) for xs in (base, lora))
        if spread > NOISY_SPREAD:
            caveat = (f"runs varied {spread:.2f}x (other load on a shared machine): see the "
                      "CPU-time step row")  # fmt: skip
        base_limit = Limit("8 tenants without adapters", "base", b_med, "tok/s", tuple(base))
        reporter.result(
            Result(
                case="aggregate base",
                kernel="runtime",
                shape=f"{TENANTS} tenants",
                wtype=WTYPE,
                batch=TENANTS,
                threads=threads,
                timing=_timing([1 / r for r in base]),
                rate=b_med,
                unit="tok/s",
            )
        )
        reporter.result(
            Result(
                case="aggregate lora",
                kernel="runtime",
                shape=shape,
                wtype=WTYPE,
                batch=TENANTS,
                threads=threads,
                timing=_timing([1 / r for r in lora]),
                rate=l_med,
                unit="tok/s",
                limit=base_limit,
                ratio=ratio,
                note=f"runs base {', '.join(f'{r:.2f}' for r in base)}; "
                f"lora {', '.join(f'{r:.2f}' for r in lora)}",
            )
        )
    except Exception as e:
        reporter.error("aggregate", f"{type(e).__name__}: {e!r}")
    t_base, t_lora = step_times(model, loaded, profile)
    sb, sl = statistics.median(t_base), statistics.median(t_lora)
    reporter.result(
        Result(
            case="step lora",
            kernel="Model.step",
            shape=shape,
            wtype=WTYPE,
            batch=TENANTS,
            threads=threads,
            timing=_timing(t_lora),
            rate=TENANTS / sl,
            unit="tok/s",
            limit=Limit("the same step without adapters", "base", TENANTS / sb, "tok/s"),
            ratio=sb / sl,
            note=f"base step {sb * 1e3:.1f} ms, with adapters {sl * 1e3:.1f} ms",
        )
    )
    # the same on one thread in CPU time: what the adapters cost in work, whatever else the
    # machine runs (a shared machine's load moves wall times by 2x)
    kernels.set_threads(1)
    try:
        c_base, c_lora = step_times(model, loaded, profile, time.process_time)
    finally:
        kernels.set_threads(threads)
    cb, cl = statistics.median(c_base), statistics.median(c_lora)
    reporter.result(Result(case="step lora cpu", kernel="Model.step", shape=shape, wtype=WTYPE,
                           batch=TENANTS, threads=1, timing=_timing(c_lora), rate=TENANTS / cl,
                           unit="tok/s",
                           limit=Limit("the same step without adapters", "base", TENANTS / cb,
                                       "tok/s"),
                           ratio=cb / cl, note=f"CPU time, 1 thread: base {cb * 1e3:.1f} ms, "
                           f"with adapters {cl * 1e3:.1f} ms"))  # fmt: skip
    probe.close()
    reporter.text("")
    reporter.text(
        "aggregate: decoded tokens of all 8 tenants / decode window, median of runs; "
        "ratio = with adapters / without, measured interleaved in the same run."
    )
    reporter.targets([Target("aggregate with adapters / without (8 tenants)", ratio, ">=",
                             TARGET_MIN, caveat)])  # fmt: skip
    reporter.end()
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
