"""Interleaved weight panels (``kernels.pack``): Q8_0 / Q4_0 weights packed once, multiplied
at every batch size by one kernel.

The product is what the integer paths compute (activations quantized per 32, exact integer
block dots, scaled per block): checked against that reference at every ISA level, bit for bit
across levels (the portable product is the levels' specification), and row-invariant (a row's
result does not depend on the rest of the batch, as speculative verify steps need).
"""

from __future__ import annotations

import kernel_reference as reference
import numpy as np
import pytest
from kernel_reference import dot_rtol

from realm import KernelError, kernels
from realm.kernels import Isa, WeightType

PACKED_TYPES = (WeightType.Q8_0, WeightType.Q4_0)
#: rows: a partial panel (1, 15, 17), whole panels (16, 48), many panels; blocks: odd counts
#: (the layout pairs blocks), one block
SHAPES = ((1, 32), (15, 64), (16, 96), (17, 160), (48, 1024), (257, 288))
BATCHES = (1, 2, 7, 8, 9, 17)


def _weights(rng: np.random.Generator, wtype: WeightType, rows: int, cols: int) -> np.ndarray:
    return kernels.quantize(rng.standard_normal((rows, cols), dtype=np.float32), wtype)


@pytest.mark.parametrize("wtype", PACKED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_packed_matches_the_integer_reference(
    isa: Isa, wtype: WeightType, shape: tuple[int, int]
) -> None:
    rows, cols = shape
    rng = np.random.default_rng(rows * 1000 + cols)
    w = _weights(rng, wtype, rows, cols)
    p = kernels.pack(w, wtype)
    assert (p.wtype, p.n_rows, p.n_cols) == (wtype, rows, cols)
    # the same bytes as the rows, plus the zero rows that complete the last panel (and, for
    # an odd number of blocks, 32 bytes of padding per panel)
    panels, odd = -(-rows // 16), (cols // 32) % 2
    assert p.data.nbytes == panels * (16 * w.shape[1] + 32 * odd)
    for batch in BATCHES:
        x = rng.standard_normal((batch, cols), dtype=np.float32)
        y = kernels.matmul(p, x)
        expected, bound = reference.matmul_quantized(w, wtype, x)
        reference.assert_within(y, expected, dot_rtol(cols) * bound)
        assert np.array_equal(kernels.matmul(p, x[0]), y[0])  # 1-D x: the same row


@pytest.mark.parametrize("wtype", PACKED_TYPES, ids=lambda t: t.name)
def test_packed_is_the_same_bits_at_every_level_and_batch(simd_isa: Isa, wtype: WeightType) -> None:
    """The portable product is the specification: every level computes each element with the
    same operations in the same order, whatever the batch (row-invariant, exact)."""
    rng = np.random.default_rng(7)
    w = _weights(rng, wtype, 70, 352)
    p = kernels.pack(w, wtype)
    x = rng.standard_normal((19, 352), dtype=np.float32)
    with kernels.use_isa(Isa.SCALAR):
        portable = kernels.matmul(p, x)
    with kernels.use_isa(simd_isa):
        batched = kernels.matmul(p, x)
        alone = np.stack([kernels.matmul(p, row) for row in x])
        pairs = np.concatenate([kernels.matmul(p, x[i : i + 2]) for i in range(0, 19, 2)])
    assert np.array_equal(batched, portable)
    assert np.array_equal(alone, batched)
    assert np.array_equal(pairs, batched)


def test_packed_results_do_not_depend_on_threads(restore_threads: None) -> None:
    rng = np.random.default_rng(3)
    w = _weights(rng, WeightType.Q8_0, 300, 512)
    p = kernels.pack(w, WeightType.Q8_0)
    x = rng.standard_normal((9, 512), dtype=np.float32)
    kernels.set_threads(1)
    one = kernels.matmul(p, x)
    kernels.set_threads(3)
    assert np.array_equal(kernels.matmul(p, x), one)


def test_pack_takes_row_views() -> None:
    """A fused tensor's row ranges (phi3's wqkv) pack like the same rows copied."""
    rng = np.random.default_rng(5)
    w = _weights(rng, WeightType.Q4_0, 64, 128)
    view = w[16:40]
    assert np.array_equal(kernels.pack(view, WeightType.Q4_0).data,
                          kernels.pack(view.copy(), WeightType.Q4_0).data)  # fmt: skip


# --- bad input ---------------------------------------------------------------------------


def test_pack_rejects_types_without_a_packed_form() -> None:
    w = np.zeros((4, 64), np.float16)
    with pytest.raises(KernelError, match="F16 has no packed form"):
        kernels.pack(w.view(np.uint8), WeightType.F16)
    with pytest.raises(KernelError, match="Q6_K has no packed form"):
        kernels.pack(np.zeros((1, 210), np.uint8), WeightType.Q6_K)


def test_pack_rejects_bad_arrays() -> None:
    with pytest.raises(KernelError, match="pack"):
        kernels.pack(np.zeros((4, 33), np.uint8), WeightType.Q8_0)  # not whole blocks
    with pytest.raises(KernelError, match="pack"):
        kernels.pack(np.zeros(34, np.uint8), WeightType.Q8_0)  # 1-D
    with pytest.raises(KernelError, match="pack"):
        kernels.pack(np.zeros((4, 34), np.float32), WeightType.Q8_0)


def test_matmul_rejects_tampered_packed_weights() -> None:
    rng = np.random.default_rng(1)
    p = kernels.pack(_weights(rng, WeightType.Q8_0, 16, 64), WeightType.Q8_0)
    x = np.ones(64, np.float32)
    short = kernels.Packed(p.data[:-1], p.wtype, p.n_rows, p.n_cols)
    with pytest.raises(KernelError, match="need 1088 contiguous bytes, not 1087"):
        kernels.matmul(short, x)
    wrong_shape = kernels.Packed(p.data, p.wtype, p.n_rows, 96)
    with pytest.raises(KernelError, match="contiguous bytes"):
        kernels.matmul(wrong_shape, np.ones(96, np.float32))
    with pytest.raises(KernelError, match="columns"):
        kernels.matmul(p, np.ones(96, np.float32))
    with pytest.raises(KernelError, match="wtype"):
        kernels.matmul(p, x, wtype=WeightType.Q4_0)
    with pytest.raises(KernelError, match="Packed weights of type"):
        kernels.matmul(kernels.Packed(p.data, WeightType.F16, 16, 64), x)
    with pytest.raises(KernelError, match=r"Packed weights of shape \(0, 64\)"):
        kernels.matmul(kernels.Packed(p.data, p.wtype, 0, 64), x)
    with pytest.raises(KernelError, match="whole blocks of 32 columns, not 63"):
        kernels.matmul(kernels.Packed(p.data, p.wtype, 16, 63), np.ones(63, np.float32))
    with pytest.raises(KernelError, match="1-D uint8"):
        kernels.matmul(kernels.Packed(p.data.view(np.int8), p.wtype, 16, 64), x)
