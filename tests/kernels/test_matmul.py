"""``matmul``: every weight type, every ISA level, ragged shapes, batches, threads.

Float weights are compared with a float64 product of the exact weight values; quantized
weights twice: tightly with a reference that quantizes the activations exactly as the
kernel does (integer block dots times scales), and loosely with the plain float product,
allowing for the activations' 8-bit rounding. Every bound scales with the magnitude the
kernel accumulates (``sum |w * x|``), so no tolerance depends on the data's scale.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import kernel_reference as reference
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_reference import dot_rtol

from realm import KernelError, kernels
from realm.kernels import Isa, WeightType

#: the types quantize writes (the read-only file types: test_quant_types.py)
WEIGHT_TYPES = [wt for wt in WeightType if wt.writable]
#: None is a 1-D x (decode); 8 is the row-streaming kernel's register group and Q4_0's GEMM
#: threshold, 11 Q8_0's GEMM threshold, 17 crosses the F32 GEMM threshold of 16
BATCHES = (None, 1, 2, 3, 8, 11, 17)
N_ROWS = (1, 2, 3, 5, 7, 63, 129)
FLOAT_N_COLS = (1, 3, 8, 17, 64, 100, 257, 1023)  # ragged against 8/16/32/64-wide loops
BLOCK_N_COLS = (32, 64, 96, 160, 288, 1024)  # 1, 2, 3, 5, 9, 32 blocks: odd tails for unrolling

#: SIMD and SCALAR results may each be off by dot_rtol from the exact value
SIMD_VS_SCALAR_RTOL_FACTOR = 2.0
#: batched and one-row-at-a-time results may use different paths (e.g. a GEMM), each exact
#: to dot_rtol
BATCHED_VS_ROWS_RTOL_FACTOR = 2.0
#: quantized activations: each value is off by at most half a step of its block's scale
#: (plus float32 rounding of ``x * (1 / d)``, far below this slack)
ACT_QUANT_HALF_STEPS = 0.5 + 1e-4
#: thread counts compared for bit-identical results (the work is split by output rows)
THREAD_COUNTS = (1, 2, 3)


def n_cols_for(wt: WeightType) -> tuple[int, ...]:
    return BLOCK_N_COLS if wt.quantized else FLOAT_N_COLS


def make_weights(
    wt: WeightType, n_rows: int, n_cols: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Weights as matmul takes them (typed, or raw blocks) and their float32 values."""
    x = (rng.standard_normal((n_rows, n_cols)) * 0.5).astype(np.float32)
    if wt == WeightType.F32:
        w = x
    elif wt == WeightType.F16:
        w = x.astype(np.float16)
    elif wt == WeightType.BF16:
        w = reference.quantize(x, wt).view(np.uint16)
    else:
        w = reference.quantize(x, wt)
    return w, reference.dequantize(w, wt)


def random_blocks(wt: WeightType, n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw Q8_0 / Q4_0 rows with arbitrary codes (Q8_0's -128 included) and finite scales."""
    raw = rng.integers(0, 256, size=(n_rows, wt.row_bytes(n_cols)), dtype=np.uint8)
    blocks = raw.reshape(n_rows, -1, wt.block_bytes)
    scales = (rng.standard_normal(blocks.shape[:2]) * 0.01).astype(np.float16)
    blocks[..., :2] = scales[..., None].view(np.uint8)
    return raw


def activations(batch: int | None, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    shape = (n_cols,) if batch is None else (batch, n_cols)
    return rng.standard_normal(shape).astype(np.float32)


def check_against_reference(
    y: np.ndarray, w: np.ndarray, wt: WeightType, values: np.ndarray, x: np.ndarray
) -> None:
    n_cols = x.shape[-1]
    expected, bound = reference.matmul(values, x)
    if not wt.quantized:
        reference.assert_within(y, expected, dot_rtol(n_cols) * bound)
        return
    nb = n_cols // reference.QK
    exact, qbound = reference.matmul_quantized(w, wt, x)
    reference.assert_within(y, exact, dot_rtol(nb) * qbound)  # tight
    act = reference.activation_error_bound(values, x, ACT_QUANT_HALF_STEPS)
    reference.assert_within(y, expected, act + dot_rtol(nb) * qbound)  # loose


def simd_tolerance(w: np.ndarray, wt: WeightType, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    if wt.quantized:
        _, qbound = reference.matmul_quantized(w, wt, x)
        return dot_rtol(x.shape[-1] // reference.QK) * qbound
    _, bound = reference.matmul(values, x)
    return dot_rtol(x.shape[-1]) * bound


# --- against the reference --------------------------------------------------------------


@pytest.mark.parametrize("n_rows", N_ROWS)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: "vec" if b is None else f"b{b}")
@pytest.mark.parametrize("wt", WEIGHT_TYPES, ids=lambda wt: wt.name)
def test_matches_reference(wt: WeightType, batch: int | None, n_rows: int, isa: Isa) -> None:
    rng = np.random.default_rng([int(wt), batch or 0, n_rows])
    for n_cols in n_cols_for(wt):
        w, values = make_weights(wt, n_rows, n_cols, rng)
        x = activations(batch, n_cols, rng)
        y = kernels.matmul(w, x, wtype=wt)
        assert y.dtype == np.float32
        assert y.shape == ((n_rows,) if batch is None else (batch, n_rows))
        check_against_reference(y, w, wt, values, x)


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: "vec" if b is None else f"b{b}")
@pytest.mark.parametrize("wt", [WeightType.Q8_0, WeightType.Q4_0], ids=lambda wt: wt.name)
def test_arbitrary_block_codes_match_reference(wt: WeightType, batch: int | None, isa: Isa) -> None:
    rng = np.random.default_rng([int(wt), batch or 0, 7])
    for n_rows, n_cols in ((1, 32), (5, 96), (63, 160), (129, 1024)):
        w = random_blocks(wt, n_rows, n_cols, rng)
        x = activations(batch, n_cols, rng)
        check_against_reference(
            kernels.matmul(w, x, wtype=wt), w, wt, reference.dequantize(w, wt), x
        )


@pytest.mark.parametrize("wt", [WeightType.Q8_0, WeightType.Q4_0], ids=lambda wt: wt.name)
def test_activation_blocks_of_zeros_and_outliers(wt: WeightType, isa: Isa) -> None:
    rng = np.random.default_rng([int(wt), 11])
    w, values = make_weights(wt, 9, 128, rng)
    x = activations(4, 128, rng)
    x[0, :32] = 0.0  # a zero block: scale 0
    x[1, 40] = 1e4  # one outlier flattens its block to a few codes
    x[2, 64:96] = 3.0  # all equal
    x[3] = 0.0  # everything zero
    y = kernels.matmul(w, x, wtype=wt)
    check_against_reference(y, w, wt, values, x)
    np.testing.assert_array_equal(y[3], 0.0)


# --- ISA levels, threads, batching ----------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: "vec" if b is None else f"b{b}")
@pytest.mark.parametrize("wt", WEIGHT_TYPES, ids=lambda wt: wt.name)
def test_simd_agrees_with_scalar(wt: WeightType, batch: int | None, simd_isa: Isa) -> None:
    rng = np.random.default_rng([int(wt), batch or 0, 3])
    for n_rows in (1, 7, 129):
        for n_cols in n_cols_for(wt):
            w, values = make_weights(wt, n_rows, n_cols, rng)
            x = activations(batch, n_cols, rng)
            with kernels.use_isa(Isa.SCALAR):
                y_scalar = kernels.matmul(w, x, wtype=wt)
            with kernels.use_isa(simd_isa):
                y_simd = kernels.matmul(w, x, wtype=wt)
            tol = SIMD_VS_SCALAR_RTOL_FACTOR * simd_tolerance(w, wt, values, x)
            reference.assert_within(y_simd, y_scalar, tol)


@pytest.mark.parametrize("batch", (None, 2, 17), ids=lambda b: "vec" if b is None else f"b{b}")
@pytest.mark.parametrize("wt", WEIGHT_TYPES, ids=lambda wt: wt.name)
def test_thread_count_gives_identical_results(
    wt: WeightType, batch: int | None, isa: Isa, restore_threads: None
) -> None:
    rng = np.random.default_rng([int(wt), batch or 0, 5])
    n_cols = 256
    w, _ = make_weights(wt, 129, n_cols, rng)
    x = activations(batch, n_cols, rng)
    results = []
    for n in THREAD_COUNTS:
        assert kernels.set_threads(n) == n
        assert kernels.threads() == n
        results.append(kernels.matmul(w, x, wtype=wt))
    for y in results[1:]:
        np.testing.assert_array_equal(y, results[0])


@pytest.mark.parametrize("batch", (2, 3, 8, 17))
@pytest.mark.parametrize("wt", WEIGHT_TYPES, ids=lambda wt: wt.name)
def test_batched_equals_row_by_row(wt: WeightType, batch: int, isa: Isa) -> None:
    rng = np.random.default_rng([int(wt), batch, 9])
    for n_rows in (3, 129):
        for n_cols in n_cols_for(wt)[:4]:
            w, values = make_weights(wt, n_rows, n_cols, rng)
            x = activations(batch, n_cols, rng)
            batched = kernels.matmul(w, x, wtype=wt)
            rows = np.stack([kernels.matmul(w, x[b], wtype=wt) for b in range(batch)])
            tol = BATCHED_VS_ROWS_RTOL_FACTOR * simd_tolerance(w, wt, values, x)
            reference.assert_within(batched, rows, tol)


# --- argument forms -------------------------------------------------------------------------


@pytest.mark.parametrize("batch", (None, 3, 17), ids=lambda b: "vec" if b is None else f"b{b}")
@pytest.mark.parametrize("wt", WEIGHT_TYPES, ids=lambda wt: wt.name)
def test_out_parameter(wt: WeightType, batch: int | None) -> None:
    rng = np.random.default_rng([int(wt), batch or 0, 13])
    n_cols = n_cols_for(wt)[2]
    w, _ = make_weights(wt, 7, n_cols, rng)
    x = activations(batch, n_cols, rng)
    expected = kernels.matmul(w, x, wtype=wt)
    out = np.full(expected.shape, np.nan, np.float32)
    assert kernels.matmul(w, x, wtype=wt, out=out) is out
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    ("wt", "typed"),
    [
        (WeightType.F32, lambda raw: raw.view(np.float32)),
        (WeightType.F16, lambda raw: raw.view(np.float16)),
        (WeightType.BF16, lambda raw: raw.view(np.uint16)),
    ],
    ids=["F32-float32", "F16-float16", "BF16-uint16"],
)
def test_typed_and_raw_byte_weights_agree(wt: WeightType, typed, isa: Isa) -> None:
    rng = np.random.default_rng([int(wt), 17])
    _, values = make_weights(wt, 7, 33, rng)
    raw = reference.quantize(values, wt)  # (7, 33 * element bytes) uint8
    x = activations(3, 33, rng)
    y_raw = kernels.matmul(raw, x, wtype=wt)
    np.testing.assert_array_equal(kernels.matmul(typed(raw), x, wtype=wt), y_raw)
    check_against_reference(y_raw, raw, wt, values, x)


def test_dtype_names_the_type_without_wtype() -> None:
    rng = np.random.default_rng(19)
    w32, _ = make_weights(WeightType.F32, 5, 40, rng)
    w16, _ = make_weights(WeightType.F16, 5, 40, rng)
    x = activations(2, 40, rng)
    np.testing.assert_array_equal(
        kernels.matmul(w32, x), kernels.matmul(w32, x, wtype=WeightType.F32)
    )
    np.testing.assert_array_equal(kernels.matmul(w16, x), kernels.matmul(w16, x, wtype=1))


@pytest.mark.parametrize("wt", WEIGHT_TYPES, ids=lambda wt: wt.name)
def test_readonly_weights_and_activations(wt: WeightType) -> None:
    """Weights come from read-only memory maps of model files."""
    rng = np.random.default_rng([int(wt), 23])
    n_cols = n_cols_for(wt)[1]
    w, values = make_weights(wt, 7, n_cols, rng)
    x = activations(2, n_cols, rng)
    w.flags.writeable = False
    x.flags.writeable = False
    check_against_reference(kernels.matmul(w, x, wtype=wt), w, wt, values, x)


@pytest.mark.parametrize("wt", WEIGHT_TYPES, ids=lambda wt: wt.name)
def test_raw_weights_at_an_odd_address(wt: WeightType, isa: Isa) -> None:
    """Raw uint8 rows may start anywhere (a tensor in a mapped GGUF file).

    Compute correctly or refuse with KernelError; never crash.
    """
    rng = np.random.default_rng([int(wt), 29])
    n_cols = n_cols_for(wt)[3]
    w, _ = make_weights(wt, 9, n_cols, rng)
    raw = reference.as_bytes(w)
    buf = bytearray(raw.nbytes + 1)
    odd = np.frombuffer(buf, np.uint8, count=raw.size, offset=1).reshape(raw.shape)
    odd[...] = raw
    x = activations(3, n_cols, rng)
    try:
        y = kernels.matmul(odd, x, wtype=wt)
    except KernelError as e:
        assert "w" in str(e).split(":", 1)[1]
        return
    np.testing.assert_array_equal(y, kernels.matmul(raw, x, wtype=wt))


# --- the F32 GEMM path (batch >= 16) at its blocking edges ---------------------------------

#: (batch, n_rows, n_cols) around the blocking of the GEMMs (native/gemm_*.c): AVX-512 register
#: tiles of 14 weight rows x 32 activation rows (a last sliver of 16 where the batch leaves 16
#: or fewer), panels of 112 weight rows x 128 columns; AVX2 tiles of 6 x 16 (slivers of 8),
#: panels of 96 x 128; both take the activations in chunks of 512 rows
GEMM_SHAPES = [
    (16, 17, 7),
    (73, 257, 263),
    (72, 256, 256),
    (16, 1, 1),
    (16, 33, 257),
    (17, 600, 300),
    (97, 45, 513),
    (130, 1100, 64),
    (25, 70, 1030),
    (48, 112, 128),
    (40, 113, 129),
    (24, 97, 127),
    (513, 15, 33),
    (1030, 7, 20),
]


@pytest.mark.parametrize(("batch", "n_rows", "n_cols"), GEMM_SHAPES, ids=str)
@pytest.mark.parametrize("wt", [WeightType.F32, WeightType.F16, WeightType.BF16], ids=str)
def test_float_batches_at_gemm_blocking_edges(
    batch: int, n_rows: int, n_cols: int, wt: WeightType, isa: Isa, restore_threads: None
) -> None:
    rng = np.random.default_rng([batch, n_rows, n_cols])
    w, values = make_weights(wt, n_rows, n_cols, rng)
    x = activations(batch, n_cols, rng)
    results = []
    for n in (1, 2):
        kernels.set_threads(n)
        results.append(kernels.matmul(w, x, wtype=wt))
    check_against_reference(results[0], w, wt, values, x)
    np.testing.assert_array_equal(results[1], results[0])


# --- the quantized GEMM path (Q8_0 / Q4_0, batch >= 16) at its blocking edges --------------

#: around the blocking of native/gemm_q8_avx512.c: panels of 16 weight rows, register tiles of
#: 8 activation rows, packed panels of 64 blocks (2080 columns: one block past a panel)
QGEMM_BATCHES = (16, 33, 64, 130)
QGEMM_N_ROWS = (1, 15, 16, 17, 33)
QGEMM_N_COLS = (32, 64, 96, 2080, 4096)


@pytest.mark.parametrize("batch", QGEMM_BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("wt", [WeightType.Q8_0, WeightType.Q4_0], ids=lambda wt: wt.name)
def test_quantized_batches_at_gemm_blocking_edges(
    wt: WeightType, batch: int, simd_isa: Isa
) -> None:
    rng = np.random.default_rng([int(wt), batch, 37])
    for n_rows in QGEMM_N_ROWS:
        for n_cols in QGEMM_N_COLS:
            if n_rows % 2:  # arbitrary codes (Q8_0's -128 included) on every other shape
                w = random_blocks(wt, n_rows, n_cols, rng)
                values = reference.dequantize(w, wt)
            else:
                w, values = make_weights(wt, n_rows, n_cols, rng)
            x = activations(batch, n_cols, rng)
            with kernels.use_isa(Isa.SCALAR):
                y_scalar = kernels.matmul(w, x, wtype=wt)
            with kernels.use_isa(simd_isa):
                y_simd = kernels.matmul(w, x, wtype=wt)
            tol = SIMD_VS_SCALAR_RTOL_FACTOR * simd_tolerance(w, wt, values, x)
            reference.assert_within(y_simd, y_scalar, tol)
            check_against_reference(y_simd, w, wt, values, x)


@pytest.mark.parametrize("wt", [WeightType.Q8_0, WeightType.Q4_0], ids=lambda wt: wt.name)
def test_quantized_gemm_thread_count_gives_identical_results(
    wt: WeightType, isa: Isa, restore_threads: None
) -> None:
    rng = np.random.default_rng([int(wt), 41])
    w, _ = make_weights(wt, 81, 2080, rng)
    x = activations(70, 2080, rng)
    results = []
    for n in THREAD_COUNTS:
        kernels.set_threads(n)
        results.append(kernels.matmul(w, x, wtype=wt))
    for y in results[1:]:
        np.testing.assert_array_equal(y, results[0])


# --- Hypothesis over shapes ------------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # isa: all examples
@given(
    wt=st.sampled_from(WEIGHT_TYPES),
    n_rows=st.integers(1, 70),
    n_units=st.integers(1, 40),
    batch=st.one_of(st.none(), st.integers(1, 40)),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_shapes(
    wt: WeightType, n_rows: int, n_units: int, batch: int | None, seed: int, isa: Isa
) -> None:
    rng = np.random.default_rng(seed)
    n_cols = n_units * (reference.QK if wt.quantized else 7)
    w, values = make_weights(wt, n_rows, n_cols, rng)
    x = activations(batch, n_cols, rng)
    check_against_reference(kernels.matmul(w, x, wtype=wt), w, wt, values, x)


# --- concurrent callers ---------------------------------------------------------------------

N_CALLERS = 4
CALLS_PER_CALLER = 10


def test_concurrent_python_threads_get_their_own_results() -> None:
    """cffi releases the GIL, so tenants' threads call kernels at once; each gets its answer."""
    rng = np.random.default_rng(31)
    jobs = []
    for i, wt in enumerate(WEIGHT_TYPES * 2):
        n_cols = n_cols_for(wt)[2]
        w, _ = make_weights(wt, 40 + i, n_cols, rng)
        x = activations(i % 4 + 1, n_cols, rng)
        jobs.append((w, x, wt, kernels.matmul(w, x, wtype=wt)))

    def caller(k: int) -> list[bool]:
        ok = []
        for c in range(CALLS_PER_CALLER):
            w, x, wt, expected = jobs[(k + c) % len(jobs)]
            ok.append(np.array_equal(kernels.matmul(w, x, wtype=wt), expected))
        return ok

    with ThreadPoolExecutor(N_CALLERS) as pool:
        results = list(pool.map(caller, range(N_CALLERS)))
    assert all(all(ok) for ok in results)


@pytest.mark.parametrize(
    "wt", [WeightType.F32, WeightType.F16, WeightType.BF16], ids=lambda w: w.name
)
def test_float_rows_below_the_gemm_batch_do_not_depend_on_their_neighbours(
    wt: WeightType, isa: Isa
) -> None:
    """Below the GEMM batch a row's result is the same bits alone or beside up to 15 others,
    and whatever the number of weight rows (the multi-row tiles sum each pair in one order):
    what speculative verify steps and batched decode rely on."""
    rng = np.random.default_rng(int(wt))
    n_rows, n_cols = 11, 1000  # a short last group of weight rows, a masked tail
    w32 = (rng.standard_normal((n_rows, n_cols)) * 0.05).astype(np.float32)
    w = {WeightType.F32: w32, WeightType.F16: w32.astype(np.float16)}.get(wt)
    if w is None:  # BF16 as uint16, the top half of the float32 bits
        w = (w32.view(np.uint32) >> 16).astype(np.uint16)
    x = rng.standard_normal((15, n_cols)).astype(np.float32)
    alone = np.stack([kernels.matmul(w, x[i], wtype=wt) for i in range(15)])
    for batch in (2, 3, 4, 5, 7, 8, 9, 15):
        assert kernels.matmul_path(wt, batch) == "rows"
        np.testing.assert_array_equal(kernels.matmul(w, x[:batch], wtype=wt), alone[:batch])
    # fewer weight rows: the first rows' results are unchanged
    np.testing.assert_array_equal(kernels.matmul(w[:5], x[:6], wtype=wt), alone[:6, :5])


@pytest.mark.parametrize("wt", [WeightType.Q8_0, WeightType.Q4_0], ids=str)
@pytest.mark.parametrize("n_cols", [32 * 13, 32 * 16, 32 * 7], ids=lambda n: f"k{n}")
def test_quantized_rows_below_the_gemm_batch_do_not_depend_on_their_neighbours(
    wt: WeightType, n_cols: int, isa: Isa
) -> None:
    """On the row-streaming path a Q8_0 / Q4_0 row's result is the same bits alone or beside
    others (the AVX2 dots share each weight block among 2 or 4 batch rows; blocks go 8 at a
    time with a tail): what speculative verify steps rely on."""
    rng = np.random.default_rng([int(wt), n_cols])
    w = kernels.quantize((rng.standard_normal((37, n_cols)) * 0.1).astype(np.float32), wt)
    x = rng.standard_normal((11, n_cols)).astype(np.float32)
    alone = np.stack([kernels.matmul(w, x[i], wtype=wt) for i in range(11)])
    checked = 0
    for batch in range(2, 12):
        if kernels.matmul_path(wt, batch) != "rows":
            continue
        np.testing.assert_array_equal(kernels.matmul(w, x[:batch], wtype=wt), alone[:batch])
        checked += 1
    assert checked or kernels.matmul_path(wt, 2) != "rows"
