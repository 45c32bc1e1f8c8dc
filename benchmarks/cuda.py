"""CUDA benchmarks: kernels and whole-model steps on the GPU against the device's own limits.

    python -m benchmarks.cuda [--quick] [--json] [--model PATH] [--wtype Q4_0] [--tenants 64]

Device limits, measured in the same run: the memory bandwidth of a plain device copy kernel
(bytes read + written per second) and the float32 FMA throughput of a register-only kernel
(a multiply-add counts two). Each is measured at the start and again at the end.

Cases:
    matvec   weights (11008, 4096) times one vector, F16 / Q8_0 / Q4_0 / Q4_K: GB/s of weight
             bytes over the copy bandwidth (CUDA events, best of the passes).
    gemm     the same weights times 512 activation rows: GFLOP/s over the FMA peak.
    decode   one session of the model, one token a step: tokens/s, and the bandwidth bound
             tokens/s <= copy GB/s / (weight bytes + KV bytes read per token).
    batched  the decode step of N tenants (default 64) as one call: tokens/s of all of them,
             over N times the bound of a step that reads the weights once for all N.
    prefill  a 512-token prompt in one step: GFLOP/s (2 x matmul parameters x tokens) over
             the FMA peak.

The model is ``--model`` (a GGUF file) or, by default, a synthetic llama written for the run
(n_embd 2048, 16 heads / 4 KV heads, n_ff 5632, 8 layers, 32000 tokens, ``--wtype``).
Without a usable GPU it prints the machine and the reason, and exits with status 2.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs
import numpy as np

import realm
from realm import kernels
from realm.kernels import WeightType, _cuda

from ._common import GB, Limit, Reporter, Result, Timing, argument_parser, describe_machine

SUITE: Final = "cuda"
MATVEC_SHAPE: Final = (11008, 4096)
GEMM_ROWS: Final = 512
PROMPT: Final = 16
PREFILL: Final = 512


def _timing(samples: Sequence[float]) -> Timing:
    return Timing(statistics.median(samples), min(samples), len(samples), 1)


def _layer_bytes(model: realm.Model) -> int:
    total = 0
    for n in range(model.info.n_layers):
        lw = model.layer_weights(n)
        for f in attrs.fields(type(lw)):
            v = getattr(lw, f.name)
            total += v.data.nbytes if hasattr(v, "wtype") else getattr(v, "nbytes", 0)
    return total


def _output_bytes(model: realm.Model) -> int:
    f = model._file
    return int(
        f.matrix("output.weight" if f.has("output.weight") else "token_embd.weight").data.nbytes
    )


def _limits(reporter: Reporter, copy_bytes: int, label: str) -> tuple[Limit, Limit]:
    bw = _cuda.copy_bandwidth(copy_bytes, iters=10) / GB
    peak = _cuda.fma_peak(iters=5) / GB
    copy = Limit("device copy bandwidth (read + write)", "copy", bw, "GB/s")
    fma = Limit("float32 FMA peak", "fma", peak, "GFLOP/s")
    for lim, note in ((copy, f"{copy_bytes >> 20} MiB copy kernel"), (fma, "register FMA kernel")):
        reporter.result(
            Result(
                case=f"limit {lim.label} {label}",
                kernel=lim.name,
                shape="-",
                wtype="-",
                batch=1,
                threads=1,
                timing=Timing(0, 0, 1, 1),
                rate=lim.value,
                unit=lim.unit,
                record="limit",
                note=note,
            )
        )
    return copy, fma


def _row(
    case: str,
    kernel: str,
    shape: str,
    wtype: str,
    batch: int,
    samples: Sequence[float],
    amount: float,
    limit: Limit,
    note: str = "",
    **extra: float,
) -> Result:
    t = _timing(samples)
    rate = amount / t.min / GB  # best pass: the device is not shared
    return Result(
        case=case,
        kernel=kernel,
        shape=shape,
        wtype=wtype,
        batch=batch,
        threads=1,
        timing=t,
        rate=rate,
        unit=limit.unit,
        limit=limit,
        ratio=rate / limit.value,
        note=note,
        extra=extra,
    )


def bench_kernels(reporter: Reporter, copy: Limit, fma: Limit, quick: bool) -> None:
    dev = kernels.cuda_device("cuda")
    n_rows, n_cols = MATVEC_SHAPE
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    iters = 5 if quick else 20
    reporter.section("kernels (device-resident weights and activations)")
    for wt in (WeightType.F16, WeightType.Q8_0, WeightType.Q4_0, WeightType.Q4_K):
        if wt == WeightType.F16:
            w = w32.astype(np.float16)
        elif wt.writable:
            w = kernels.quantize(w32, wt)
        else:  # Q4_K, read-only: random blocks with real half-precision scales
            nb = n_cols // wt.block_elems
            raw = rng.integers(0, 256, (n_rows, nb, wt.block_bytes), dtype=np.uint8)
            scales = (rng.standard_normal((n_rows, nb, 2)) * 0.01).astype(np.float16)
            raw[:, :, 0:4] = scales.view(np.uint8)  # Q4_K's d and dmin: finite halves
            w = raw.reshape(n_rows, -1)
        dw = kernels.to_device(w, dev)
        for batch in (1, GEMM_ROWS):
            dx = kernels.to_device(rng.standard_normal((batch, n_cols)).astype(np.float32), dev)
            dy = kernels.DeviceArray(dev, (batch, n_rows), np.float32)
            seconds = _cuda.time_matmul(dw, wt, dx, dy, iters=iters)
            if batch == 1:
                r = _row(
                    "matvec " + wt.name,
                    "matmul",
                    f"{n_rows}x{n_cols}",
                    wt.name,
                    1,
                    [seconds],
                    w.nbytes,
                    copy,
                    "weight bytes / s",
                )
            else:
                r = _row(
                    "gemm " + wt.name,
                    "matmul",
                    f"{batch}x{n_cols}x{n_rows}",
                    wt.name,
                    batch,
                    [seconds],
                    2.0 * batch * n_rows * n_cols,
                    fma,
                )
            reporter.result(r)
            dx.close()
            dy.close()
        dw.close()


def _synthetic_model(folder: Path, wtype: str, quick: bool) -> Path:
    from realm.testing import write_test_model

    return write_test_model(
        folder / f"bench-{wtype}.gguf",
        n_layers=4 if quick else 8,
        n_embd=2048,
        n_heads=16,
        n_kv_heads=4,
        n_ff=5632,
        vocab_size=32000,
        context_length=4096,
        wtype=wtype,
        tokenizer="none",
    )


def bench_model(
    reporter: Reporter, path: Path, copy: Limit, fma: Limit, tenants: int, quick: bool
) -> None:
    model = realm.load_model(path, device="cuda")
    info = model.info
    weights = _layer_bytes(model) + _output_bytes(model)
    kv_per_pos = model.kv_bytes_per_position()
    vocab = info.vocab_size
    rng = np.random.default_rng(1)
    shape = f"{info.arch} {info.n_layers}L {info.n_embd}"
    reporter.section(f"model steps: {path.name} ({weights / 1e6:.0f} MB of weights read a step)")

    def prompt(n: int) -> list[int]:
        return [int(t) for t in rng.integers(0, vocab, n)]

    # decode: one session
    steps = 16 if quick else 64
    with model.open_session() as s:
        s.extend(prompt(PROMPT), logits="none")
        samples = []
        for _ in range(steps):
            t0 = time.perf_counter()
            s.extend(prompt(1))
            samples.append(time.perf_counter() - t0)
    kv_read = kv_per_pos * (PROMPT + steps / 2)  # mean position's cache
    per_token = weights + kv_read
    t = min(samples)
    reporter.result(
        _row(
            "decode",
            "forward",
            shape,
            info.file_type,
            1,
            samples,
            per_token,
            copy,
            f"{1 / statistics.median(samples):.1f} tok/s median, bound "
            f"{copy.value * GB / per_token:.0f} tok/s",
            tokens_per_s=1 / t,
            bound_tokens_per_s=copy.value * GB / per_token,
        )
    )

    # batched decode: every tenant's step in one call
    sessions = [model.open_session() for _ in range(tenants)]
    model.step([(s, prompt(PROMPT), "none") for s in sessions])
    samples = []
    for _ in range(8 if quick else 32):
        work = [(s, prompt(1), "last") for s in sessions]
        t0 = time.perf_counter()
        model.step(work)  # type: ignore[arg-type]
        samples.append(time.perf_counter() - t0)
    step_bytes = weights + tenants * kv_per_pos * (PROMPT + 16)
    bound = tenants * copy.value * GB / step_bytes
    t = min(samples)
    reporter.result(
        _row(
            f"batched {tenants}",
            "forward",
            shape,
            info.file_type,
            tenants,
            samples,
            step_bytes,
            copy,
            f"{tenants / statistics.median(samples):.0f} tok/s median (all tenants), "
            f"bound {bound:.0f} tok/s",
            tokens_per_s=tenants / t,
            bound_tokens_per_s=bound,
        )
    )
    for s in sessions:
        s.close()

    # prefill: one long prompt in one step
    matmul_params = 0  # q, k, v, o, gate, up, down: multiply-adds per token
    for n in range(info.n_layers):
        lw = model.layer_weights(n)
        for m in (lw.wq, lw.wk, lw.wv, lw.wo, lw.w_gate, lw.w_up, lw.w_down):
            matmul_params += m.n_out * m.n_in
    n_prefill = min(PREFILL, info.context_length)
    samples = []
    for _ in range(2 if quick else 5):
        with model.open_session(capacity=n_prefill) as s:
            ids = prompt(n_prefill)
            t0 = time.perf_counter()
            s.extend(ids, logits="last")
            samples.append(time.perf_counter() - t0)
    flops = 2.0 * n_prefill * (matmul_params + info.n_embd * vocab / n_prefill)
    reporter.result(
        _row(
            f"prefill {n_prefill}",
            "forward",
            shape,
            info.file_type,
            n_prefill,
            samples,
            flops,
            fma,
            f"{n_prefill / statistics.median(samples):.0f} tok/s median",
            tokens_per_s=n_prefill / min(samples),
        )
    )
    model.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(SUITE, __doc__.splitlines()[0] if __doc__ else SUITE)
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: synthetic)")
    parser.add_argument("--wtype", default="Q4_0", help="synthetic model's weight type")
    parser.add_argument("--tenants", type=int, default=64, help="sessions in the batched case")
    args = parser.parse_args(argv)
    reporter = Reporter(json_lines=args.json)
    machine = describe_machine(
        SUITE,
        kernels.threads(),
        {"quick": args.quick, "model": str(args.model or "synthetic " + args.wtype)},
        numpy_limit=False,
    )
    reporter.machine(machine)
    status = kernels.cuda_status()
    if not status.startswith("ok"):
        reporter.error("cuda", f"no CUDA benchmarks: {status}")
        return 2
    dev = kernels.cuda_device("cuda")
    reporter.section(
        f"device: {dev.name}, {dev.n_sm} SMs, {dev.total_bytes / 2**30:.0f} GiB, "
        f"compute capability {dev.compute_capability[0]}.{dev.compute_capability[1]}"
    )
    copy_bytes = (256 if args.quick else 1024) << 20
    copy, fma = _limits(reporter, copy_bytes, "start")
    if args.only is None or "kernel" in args.only or "mat" in args.only:
        bench_kernels(reporter, copy, fma, args.quick)
    if args.only is None or "model" in args.only:
        with tempfile.TemporaryDirectory(prefix="realm-cuda-bench-") as tmp:
            path = args.model or _synthetic_model(Path(tmp), args.wtype, args.quick)
            bench_model(reporter, path, copy, fma, args.tenants, args.quick)
    reporter.section("device limits again, at the end (drift check)")
    _limits(reporter, copy_bytes, "end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
