"""Block formats: ``quantize`` / ``dequantize`` bit for bit against the gguf package.

GGML's reference quantizers are the specification (``gguf.quants`` is their Python port), so
every comparison here is exact; the only values excluded are those whose result GGML leaves
undefined (a block scale that overflows ``1 / d``) or where gguf-py and GGML's C disagree
(see ``test_q4_0_all_zero_block_scale_sign_follows_ggml_c``).
"""

from __future__ import annotations

import kernel_reference as reference
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from realm import kernels
from realm.kernels import WeightType

#: the types quantize writes (the read-only file types are tested in test_quant_types.py)
WRITABLE_TYPES = [wt for wt in WeightType if wt.writable]

FLOAT_TYPES = [WeightType.F32, WeightType.F16, WeightType.BF16]
BLOCK_TYPES = [WeightType.Q8_0, WeightType.Q4_0]
FLOAT_ROW_LENGTHS = (1, 2, 3, 5, 7, 31, 32, 33, 1023)
BLOCK_ROW_LENGTHS = (32, 64, 96, 160, 1024)
N_ROWS = 3

ROW_CASES = [(wt, n) for wt in FLOAT_TYPES for n in FLOAT_ROW_LENGTHS] + [
    (wt, n) for wt in BLOCK_TYPES for n in BLOCK_ROW_LENGTHS
]
ROW_IDS = [f"{wt.name}-{n}" for wt, n in ROW_CASES]

BF16_MAX_REL_ERR = 2.0**-8  # half an ulp with 8 significant bits (7 stored)
#: Q8_0 round trip: half a step of the float32 scale, plus the scale's own rounding to half
#: (2^-11 relative) times the largest code 127
Q8_0_MAX_ERR_STEPS = 0.5 + 127 * 2.0**-11
#: Q4_0 round trip: a full step (the code for -max saturates at 15, one step short of 16),
#: plus the scale's rounding to half times the largest code 8
Q4_0_MAX_ERR_STEPS = 1.0 + 8 * 2.0**-11


def assert_same_floats(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal bit for bit (signed zeros included), except that any NaN matches any NaN."""
    assert actual.dtype == np.float32
    expected = np.asarray(expected, dtype=np.float32)
    assert actual.shape == expected.shape
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    np.testing.assert_array_equal(nan_a, nan_e)
    bits_a = np.where(nan_a, np.float32(0), actual).view(np.uint32)
    bits_e = np.where(nan_e, np.float32(0), expected).view(np.uint32)
    np.testing.assert_array_equal(bits_a, bits_e)


def sample_rows(wt: WeightType, n: int, rows: int = N_ROWS) -> np.ndarray:
    """Seeded float32 rows mixing magnitudes (so blocks get different scales)."""
    rng = np.random.default_rng([int(wt), n, rows])
    x = rng.standard_normal((rows, n))
    x *= 10.0 ** rng.integers(-3, 4, size=(rows, 1))
    return x.astype(np.float32)


def random_raw_rows(wt: WeightType, n: int, rows: int = N_ROWS) -> np.ndarray:
    """Arbitrary bytes as ``rows`` rows of ``n`` elements of ``wt`` (any bit pattern is valid)."""
    rng = np.random.default_rng([int(wt), n, rows, 1])
    return rng.integers(0, 256, size=(rows, wt.row_bytes(n)), dtype=np.uint8)


# --- the sweep over types and ragged row lengths ----------------------------------------


@pytest.mark.parametrize(("wt", "n"), ROW_CASES, ids=ROW_IDS)
def test_quantize_matches_gguf(wt: WeightType, n: int) -> None:
    x = sample_rows(wt, n)
    got = kernels.quantize(x, wt)
    assert got.dtype == np.uint8
    assert got.shape == (N_ROWS, wt.row_bytes(n))
    np.testing.assert_array_equal(got, reference.quantize(x, wt))


@pytest.mark.parametrize(("wt", "n"), ROW_CASES, ids=ROW_IDS)
def test_dequantize_matches_gguf(wt: WeightType, n: int) -> None:
    raw = random_raw_rows(wt, n)
    got = kernels.dequantize(raw, wt)
    assert got.shape == (N_ROWS, n)
    assert_same_floats(got, reference.dequantize(raw, wt))


@pytest.mark.parametrize(("wt", "n"), ROW_CASES, ids=ROW_IDS)
def test_quantize_dequantize_round_trip(wt: WeightType, n: int) -> None:
    x = sample_rows(wt, n)
    back = kernels.dequantize(kernels.quantize(x, wt), wt)
    assert_same_floats(back, reference.dequantize(reference.quantize(x, wt), wt))
    if wt == WeightType.F32:
        assert_same_floats(back, x)
    elif wt == WeightType.F16:
        assert_same_floats(back, x.astype(np.float16).astype(np.float32))
    elif wt == WeightType.BF16:
        reference.assert_within(back, x, BF16_MAX_REL_ERR * np.abs(x))
    else:
        steps = Q8_0_MAX_ERR_STEPS if wt == WeightType.Q8_0 else Q4_0_MAX_ERR_STEPS
        amax = np.abs(x.reshape(N_ROWS, -1, reference.QK)).max(axis=-1)
        step = amax / (127.0 if wt == WeightType.Q8_0 else 8.0)
        bound = np.repeat(steps * step, reference.QK, axis=-1)
        reference.assert_within(back, x, bound)


@pytest.mark.parametrize("wt", WRITABLE_TYPES, ids=lambda wt: wt.name)
def test_any_leading_shape(wt: WeightType) -> None:
    x = sample_rows(wt, 64, rows=6).reshape(2, 3, 64)
    q = kernels.quantize(x, wt)
    assert q.shape == (2, 3, wt.row_bytes(64))
    np.testing.assert_array_equal(q.reshape(6, -1), kernels.quantize(x.reshape(6, 64), wt))
    back = kernels.dequantize(q, wt)
    assert back.shape == (2, 3, 64)
    assert_same_floats(back.reshape(6, 64), kernels.dequantize(q.reshape(6, -1), wt))
    one_row = kernels.quantize(x[0, 0], wt)
    assert one_row.shape == (wt.row_bytes(64),)
    assert kernels.dequantize(one_row, wt).shape == (64,)


@pytest.mark.parametrize(
    ("wt", "typed"),
    [
        (WeightType.F32, lambda raw: raw.view(np.float32)),
        (WeightType.F16, lambda raw: raw.view(np.float16)),
        (WeightType.BF16, lambda raw: raw.view(np.uint16)),
    ],
    ids=["F32-float32", "F16-float16", "BF16-uint16"],
)
def test_dequantize_typed_equals_raw_bytes(wt: WeightType, typed) -> None:
    raw = random_raw_rows(wt, 33)
    assert_same_floats(kernels.dequantize(typed(raw), wt), kernels.dequantize(raw, wt))


# --- special values -----------------------------------------------------------------------

BLOCK = reference.QK


def _block_pair(*values: float) -> np.ndarray:
    """64 float32 values: the given ones, then a ramp of small values."""
    x = np.linspace(-0.01, 0.01, 2 * BLOCK, dtype=np.float32)
    x[: len(values)] = values
    return x


F16_SUBNORMAL = 2.0**-24
SPECIAL_VALUES = {
    "zeros": np.zeros(2 * BLOCK, np.float32),
    "all_equal": np.full(2 * BLOCK, 3.25, np.float32),
    "all_equal_negative": np.full(2 * BLOCK, -0.7, np.float32),
    "negative_max": np.linspace(-9.0, 4.0, 2 * BLOCK, dtype=np.float32),
    "positive_max": np.linspace(-4.0, 9.0, 2 * BLOCK, dtype=np.float32),
    "equal_magnitude_signs": _block_pair(5.0, -5.0, 1.0, -5.0),  # first of the largest wins
    "rounding_ties": _block_pair(127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5),
    "q4_ties": _block_pair(-8.0, 0.5, 1.5, -0.5, -1.5, 7.5, -7.5, 3.5),
    "large_magnitude": _block_pair(3.0e38, -1.0e30, 65504.0, 1.0e10, -2.5e37),
    "tiny_normal": _block_pair(1.0e-30, -3.0e-31, 2.0e-30),
    "half_subnormals": _block_pair(
        F16_SUBNORMAL,
        2 * F16_SUBNORMAL,
        0.5 * F16_SUBNORMAL,
        1.5 * F16_SUBNORMAL,
        2.5 * F16_SUBNORMAL,
        0.49 * F16_SUBNORMAL,
        1023 * F16_SUBNORMAL,
        1023.5 * F16_SUBNORMAL,
        2.0**-14,
        -3 * F16_SUBNORMAL,
        6.0e-8,
        -6.1e-5,
    ),
    "half_overflow": _block_pair(65504.0, 65519.99, 65520.0, -65520.0, 70000.0, -1.0e10),
    "bf16_ties": _block_pair(
        *np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7F8000, 0x00008000], np.uint32)
        .view(np.float32)
        .tolist()
    ),
}
#: only float types take infinities (a block scale of inf/127 makes GGML's 0 * inf undefined)
FLOAT_ONLY_SPECIAL_VALUES = {
    "infinities": _block_pair(np.inf, -np.inf, 1.0, -np.inf),
}


SPECIAL_CASES = [(wt, name, x) for wt in WRITABLE_TYPES for name, x in SPECIAL_VALUES.items()] + [
    (wt, name, x) for wt in FLOAT_TYPES for name, x in FLOAT_ONLY_SPECIAL_VALUES.items()
]


@pytest.mark.parametrize(
    ("wt", "name", "x"), SPECIAL_CASES, ids=[f"{wt.name}-{name}" for wt, name, _ in SPECIAL_CASES]
)
def test_special_values_match_gguf(wt: WeightType, name: str, x: np.ndarray) -> None:
    q = kernels.quantize(x, wt)
    np.testing.assert_array_equal(q, reference.quantize(x, wt))
    assert_same_floats(kernels.dequantize(q, wt), reference.dequantize(q, wt))


def test_f16_rounding_edges() -> None:
    x = np.array(
        [65504.0, 65519.99, 65520.0, 1e10, 2.0**-25, 2.0**-25 * 1.0001, 2.0**-24 * 1.5, -0.0],
        np.float32,
    )
    got = kernels.dequantize(kernels.quantize(x, WeightType.F16), WeightType.F16)
    expected = np.array(
        [65504.0, 65504.0, np.inf, np.inf, 0.0, 2.0**-24, 2.0**-23, -0.0], np.float32
    )
    assert_same_floats(got, expected)


@pytest.mark.parametrize("wt", FLOAT_TYPES, ids=lambda wt: wt.name)
def test_nan_stays_nan(wt: WeightType) -> None:
    x = np.array([np.nan, -np.nan, 1.0], np.float32)
    back = kernels.dequantize(kernels.quantize(x, wt), wt)
    np.testing.assert_array_equal(np.isnan(back), [True, True, False])


def test_bf16_nan_is_quieted_like_ggml() -> None:
    signalling = np.array([0x7F800001, 0xFF810000, 0x7FC00000], np.uint32).view(np.float32)
    q = kernels.quantize(signalling, WeightType.BF16)
    np.testing.assert_array_equal(q, reference.quantize(signalling, WeightType.BF16))


def test_q4_0_all_zero_block_scale_sign_follows_ggml_c() -> None:
    """A zero block's scale is ``0.0 / -8 = -0.0``, whatever the sign of its zeros.

    GGML's C reference starts from ``max = 0.0f``; gguf-py takes the first element instead,
    so it writes +0.0 when that element is -0.0. Realm follows the C reference.
    """
    for first in (0.0, -0.0):
        x = np.zeros(BLOCK, np.float32)
        x[0] = first
        q = kernels.quantize(x, WeightType.Q4_0)
        assert q[:2].view(np.float16)[0] == 0.0
        assert np.signbit(q[:2].view(np.float16)[0])
        np.testing.assert_array_equal(q[2:], 0x88)
        np.testing.assert_array_equal(kernels.dequantize(q, WeightType.Q4_0), 0.0)


# --- Hypothesis ---------------------------------------------------------------------------


def _no_signed_zero(v: float) -> float:
    return 0.0 if v == 0.0 else v


def _defined_for_blocks(v: float) -> float:
    """Map values to the range where GGML's block quantizers are defined.

    A block whose largest magnitude is below ~1e-36 has a subnormal float32 scale, whose
    reciprocal overflows to inf, and ``x * inf`` cast to an integer is undefined in GGML's C.
    """
    return _no_signed_zero(v if abs(v) >= 1e-20 else 0.0)


def _rows(wt: WeightType) -> st.SearchStrategy[np.ndarray]:
    if wt.quantized:
        lengths = st.integers(1, 5).map(lambda nb: nb * BLOCK)
        elements = st.floats(-1e10, 1e10, width=32).map(_defined_for_blocks)
    else:
        lengths = st.integers(1, 80)
        elements = st.floats(width=32, allow_nan=wt != WeightType.F16)
    shapes = st.tuples(st.integers(1, 3), lengths)
    return shapes.flatmap(lambda shape: hnp.arrays(np.float32, shape, elements=elements))


@pytest.mark.parametrize("wt", WRITABLE_TYPES, ids=lambda wt: wt.name)
@given(data=st.data())
def test_hypothesis_quantize_dequantize_match_gguf(wt: WeightType, data: st.DataObject) -> None:
    x = data.draw(_rows(wt), label="x")
    q = kernels.quantize(x, wt)
    np.testing.assert_array_equal(q, reference.quantize(x, wt))
    assert_same_floats(kernels.dequantize(q, wt), reference.dequantize(q, wt))


@pytest.mark.parametrize("wt", list(WeightType), ids=lambda wt: wt.name)
@given(data=st.data())
def test_hypothesis_dequantize_arbitrary_bytes(wt: WeightType, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 4)) * (wt.block_elems if wt.quantized else 17)
    raw = data.draw(hnp.arrays(np.uint8, (2, wt.row_bytes(n))), label="raw")
    assert_same_floats(kernels.dequantize(raw, wt), reference.dequantize(raw, wt))
