"""The weight types that published files use and Realm reads but never writes: Q4_1, Q5_0, Q5_1
and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (``native/quants.c``).

Weights are random block bytes with sane half-precision scales (the block layouts put them at
known offsets), so every bit pattern of the quantized fields occurs; the gguf package's
dequantizer is the reference. Dequantization must be bit for bit the reference's (arbitrary
bytes, NaN scales included, are also checked in test_formats.py). matmul quantizes the
activations to 8 bits per 32-block (per 256 for the K-quants' super-blocks, as ggml's
Q8_K) on the row-streaming path, so it must equal the float64 product of the exact weights
with those quantized activations up to float32 rounding; from a batch that depends on the
type and level (6 to 32) the SIMD levels take an integer GEMM with activations quantized per
32 (the same check with those), and the types a level's GEMM does not take (and every type on
the scalar level) dequantize weight panels into the F32 GEMM or dots from a batch of 16, so
they must equal the float64 product with the activations themselves.
``kernels.matmul_path`` says which.
"""

from __future__ import annotations

import kernel_reference as reference
import numpy as np
import pytest

from realm import kernels
from realm._errors import KernelError
from realm.kernels import Isa, WeightType
from realm.testing.quant_blocks import HALF_FIELDS

READ_ONLY_TYPES = [wt for wt in WeightType if not wt.writable]


#: weights whose matmuls quantize activations per 256 (ggml's Q8_K; native/quants.c)
K_QUANTS = {WeightType.Q2_K, WeightType.Q3_K, WeightType.Q4_K, WeightType.Q5_K, WeightType.Q6_K}


def activation_block(wt: WeightType, batch: int) -> int | None:
    """Elements per quantized activation block that ``wt``'s matmul of ``batch`` rows uses on
    the active level (None: the activations themselves)."""
    path = kernels.matmul_path(wt, batch)
    if path in ("gemm-f32", "gemm-dequant"):
        return None
    if path == "rows-q8k":
        assert wt in K_QUANTS
        return reference.QK_K
    return reference.QK


def used_activations(x: np.ndarray, wt: WeightType) -> np.ndarray:
    """What ``wt``'s matmul multiplies the weights with, in float64."""
    block = activation_block(wt, x.shape[0])
    if block is None:
        return x.astype(np.float64)
    codes, d = reference.quantize_activations(x, block)
    return (codes * d[..., None].astype(np.float64)).reshape(x.shape)


def assert_exact_product(y: np.ndarray, x: np.ndarray, values: np.ndarray, wt: WeightType) -> None:
    """y is x's (quantized, as wt's matmul uses it) product with the dequantized weights, to
    1e-5 of the magnitudes summed."""
    x_used = used_activations(x, wt)
    values = values.astype(np.float64)
    want = x_used @ values.T
    bound = np.abs(x_used) @ np.abs(values).T
    reference.assert_within(y, want, 1e-5 * bound + 1e-30)


def random_weights(wt: WeightType, n_rows: int, n_cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    nb = n_cols // wt.block_elems
    raw = rng.integers(0, 256, (n_rows, nb, wt.block_bytes), dtype=np.uint8)
    for off in HALF_FIELDS[wt]:
        half = (rng.standard_normal((n_rows, nb)) * 0.02).astype(np.float16)
        raw[:, :, off : off + 2] = half.view(np.uint8).reshape(n_rows, nb, 2)
    return raw.reshape(n_rows, nb * wt.block_bytes)


@pytest.mark.parametrize("wt", READ_ONLY_TYPES, ids=lambda wt: wt.name)
def test_dequantize_is_bit_exact(wt: WeightType, isa: Isa) -> None:
    w = random_weights(wt, 7, 2 * wt.block_elems, seed=int(wt))
    got = kernels.dequantize(w, wt)
    np.testing.assert_array_equal(got.view(np.uint32), reference.dequantize(w, wt).view(np.uint32))


@pytest.mark.parametrize("wt", READ_ONLY_TYPES, ids=lambda wt: wt.name)
def test_quantize_refuses_with_a_clear_error(wt: WeightType) -> None:
    with pytest.raises(KernelError, match=f"wtype {wt.name} is read from files only"):
        kernels.quantize(np.zeros(256, np.float32), wt)


@pytest.mark.parametrize("batch", [1, 3, 8, 17, 40], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("wt", READ_ONLY_TYPES, ids=lambda wt: wt.name)
def test_matmul_matches_the_exact_product(wt: WeightType, batch: int, isa: Isa) -> None:
    n_rows, n_cols = 37, 2 * max(wt.block_elems, 256)
    w = random_weights(wt, n_rows, n_cols, seed=int(wt) * 100 + batch)
    values = reference.dequantize(w, wt)
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, n_cols)).astype(np.float32)
    x[0, :32] *= 50.0  # an outlier block
    assert_exact_product(kernels.matmul(w, x, wtype=wt), x, values, wt)


@pytest.mark.parametrize("wt", READ_ONLY_TYPES, ids=lambda wt: wt.name)
def test_large_batch_over_many_packed_blocks(wt: WeightType, isa: Isa) -> None:
    """More blocks per row than one packed weight panel holds (the integer GEMMs pack 32 or 64
    blocks at a time and take the outputs up again), rows that leave a short last panel and a
    batch that leaves a short last register tile."""
    n_rows, n_cols, batch = 21, 9 * 256, 41  # above every level's integer GEMM threshold
    w = random_weights(wt, n_rows, n_cols, seed=int(wt) + 5)
    values = reference.dequantize(w, wt)
    x = np.random.default_rng(11).standard_normal((batch, n_cols)).astype(np.float32)
    x[3, 1000:1032] *= 40.0
    assert_exact_product(kernels.matmul(w, x, wtype=wt), x, values, wt)


@pytest.mark.parametrize("wt", READ_ONLY_TYPES, ids=lambda wt: wt.name)
def test_simd_levels_take_the_integer_gemm_at_a_large_batch(wt: WeightType, simd_isa: Isa) -> None:
    """Prefill on the types of published files is integer work at the SIMD levels (IQ4 at the
    AVX2 level excepted: its levels overflow vpmaddubsw's int16 pairs)."""
    with kernels.use_isa(simd_isa):
        want = "gemm-dequant" if simd_isa == Isa.AVX2 and wt.name.startswith("IQ4") else "gemm-int"
        assert kernels.matmul_path(wt, 64) == want
        assert kernels.matmul_path(wt, 1) in ("rows", "rows-q8k")


@pytest.mark.parametrize("batch", [2, 5, 6, 15], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("wt", READ_ONLY_TYPES, ids=lambda wt: wt.name)
def test_matmul_odd_block_counts_and_row_groups(wt: WeightType, batch: int, isa: Isa) -> None:
    """An odd number of blocks (7 of 32, or 3 super-blocks) and every remainder of the dots'
    groups of activation rows: still the exact product with the quantized activations."""
    n_rows, n_cols = 5, 7 * wt.block_elems if wt.block_elems == 32 else 3 * wt.block_elems
    w = random_weights(wt, n_rows, n_cols, seed=int(wt) * 7 + batch)
    values = reference.dequantize(w, wt)
    x = np.random.default_rng(batch).standard_normal((batch, n_cols)).astype(np.float32)
    x[-1, -40:] *= 30.0  # an outlier block at the end
    assert_exact_product(kernels.matmul(w, x, wtype=wt), x, values, wt)


@pytest.mark.parametrize("wt", READ_ONLY_TYPES, ids=lambda wt: wt.name)
def test_simd_agrees_with_scalar_below_the_gemm_batch(wt: WeightType, simd_isa: Isa) -> None:
    w = random_weights(wt, 20, 512, seed=7)
    x = np.random.default_rng(3).standard_normal((5, 512)).astype(np.float32)
    with kernels.use_isa(Isa.SCALAR):
        want = kernels.matmul(w, x, wtype=wt)
    with kernels.use_isa(simd_isa):
        got = kernels.matmul(w, x, wtype=wt)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("wt", READ_ONLY_TYPES, ids=lambda wt: wt.name)
def test_get_rows_dequantizes_embedding_rows(wt: WeightType, isa: Isa) -> None:
    table = random_weights(wt, 9, 256, seed=11)
    ids = np.array([8, 0, 3, 3], np.int32)
    got = kernels.get_rows(table, ids, wtype=wt)
    np.testing.assert_array_equal(got, reference.dequantize(table, wt)[ids])


@pytest.mark.parametrize("wt", READ_ONLY_TYPES, ids=lambda wt: wt.name)
def test_partial_blocks_are_refused(wt: WeightType) -> None:
    w = np.ascontiguousarray(random_weights(wt, 2, wt.block_elems, seed=1)[:, :-1])
    with pytest.raises(KernelError, match=wt.name):
        kernels.matmul(w, np.zeros((1, wt.block_elems), np.float32), wtype=wt)
