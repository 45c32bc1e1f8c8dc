"""Row and element-wise kernels and attention against the numpy references, at every ISA level."""

from __future__ import annotations

import math

import kernel_reference as reference
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_reference import F32_UNIT_ROUNDOFF

from realm import KernelError, kernels
from realm.kernels import Isa, RopeMode, WeightType

#: the types quantize writes (the read-only file types are tested in test_quant_types.py)
WRITABLE_TYPES = [wt for wt in WeightType if wt.writable]

ROW_LENGTHS = (1, 2, 3, 5, 7, 31, 33, 1023)

#: rmsnorm: the scale is computed in double; then two float32 multiplies
RMSNORM_RTOL = 4 * F32_UNIT_ROUNDOFF
#: RoPE, relative to the largest |x| in the head: cos/sin rounded to float32 and two float32
#: products and a sum (~4 u), plus the angle's double-precision error at positions up to 2^31
ROPE_RTOL = 2e-6
#: softmax, in units of u: expf (<= 1 ulp), a double sum, a reciprocal and a multiply; on top
#: of that, rounding ``x - max`` in float32 moves each exponent by u * |x - max| (see check_softmax)
SOFTMAX_ULPS = 8
SOFTMAX_ATOL = 1e-38  # results in float32's subnormal range lose relative precision
#: swiglu: expf, an add, a divide, a multiply
SWIGLU_RTOL = 8 * F32_UNIT_ROUNDOFF
#: for gate < -88.7, expf(-gate) overflows and the kernel returns -0 where the exact value
#: is a few 1e-37 (float32's normal range ends at 1.2e-38)
SWIGLU_ATOL = 1e-35
#: attention: the reference returns its own error bound (see reference.attention); this
#: absolute floor only covers outputs whose bound is 0 (zero values)
ATTN_ATOL = 1e-30

HEAD_DIMS = (1, 2, 3, 7, 16, 17, 33, 64, 80, 96, 127, 128, 255, 256)
GQA_GROUPS = (1, 2, 4, 12)  # 12: more query heads than one pass of the SIMD value kernel
KV_DTYPES = (np.float32, np.float16)


def seeded(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(k) for k in key])


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# --- rmsnorm -------------------------------------------------------------------------------


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("n", ROW_LENGTHS)
def test_rmsnorm(n: int, with_weight: bool, isa: Isa) -> None:
    rng = seeded(n, with_weight)
    x = normal(rng, 4, n) * np.float32([[1e-3], [1.0], [30.0], [1e4]])
    weight = normal(rng, n) if with_weight else None
    got = kernels.rmsnorm(x, weight, 1e-6)
    assert got.shape == x.shape
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference.rmsnorm(x, weight, 1e-6), rtol=RMSNORM_RTOL, atol=0)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-5, 0.5])
def test_rmsnorm_eps_and_extreme_magnitudes(eps: float, isa: Isa) -> None:
    rng = seeded(int(eps * 1e6))
    x = normal(rng, 3, 64) * np.float32([[1e-30], [1.0], [1e30]])
    weight = normal(rng, 64)
    got = kernels.rmsnorm(x, weight, eps)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference.rmsnorm(x, weight, eps), rtol=RMSNORM_RTOL, atol=0)


def test_rmsnorm_zero_row_with_eps_is_zero(isa: Isa) -> None:
    np.testing.assert_array_equal(kernels.rmsnorm(np.zeros((2, 9), np.float32), None, 1e-5), 0.0)


def test_rmsnorm_leading_dims_and_out(isa: Isa) -> None:
    rng = seeded(41)
    x = normal(rng, 2, 3, 20)
    weight = normal(rng, 20)
    out = np.full_like(x, np.nan)
    assert kernels.rmsnorm(x, weight, 1e-5, out=out) is out
    np.testing.assert_allclose(out, reference.rmsnorm(x, weight, 1e-5), rtol=RMSNORM_RTOL)
    np.testing.assert_array_equal(
        out.reshape(6, 20), kernels.rmsnorm(x.reshape(6, 20), weight, 1e-5)
    )


#: the ``isa`` fixture is meant to hold for every example of a test
isa_for_all_examples = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@isa_for_all_examples
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 300)),
    eps=st.sampled_from([0.0, 1e-6, 1e-5]),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_rmsnorm(shape: tuple[int, int], eps: float, seed: int, isa: Isa) -> None:
    rng = seeded(seed)
    x = normal(rng, *shape)
    weight = normal(rng, shape[1])
    np.testing.assert_allclose(
        kernels.rmsnorm(x, weight, eps), reference.rmsnorm(x, weight, eps), rtol=RMSNORM_RTOL
    )


# --- RoPE ----------------------------------------------------------------------------------

ROPE_POSITIONS = np.array([0, 1, 2, 7, 511, 4095, 100_000, 2**24 + 1, 2**31 - 1], np.int32)
ROPE_FREQS = [(10000.0, 1.0), (1_000_000.0, 0.25), (500_000.0, 0.125)]


def check_rope(x: np.ndarray, positions: np.ndarray, **kw) -> None:
    expected = reference.rope(x, positions, **kw)
    got = x.copy()
    assert kernels.rope(got, positions, **kw) is got  # in place
    head_max = np.abs(x).max(axis=-1, keepdims=True).astype(np.float64)
    reference.assert_within(got, expected, ROPE_RTOL * head_max)
    n_rot = kw.get("n_rot") or x.shape[-1]
    np.testing.assert_array_equal(got[..., n_rot:], x[..., n_rot:])  # untouched


@pytest.mark.parametrize(("freq_base", "freq_scale"), ROPE_FREQS)
@pytest.mark.parametrize(
    ("head_dim", "n_rot"),
    [
        (2, 2),
        (8, 8),
        (8, 4),
        (64, 64),
        (64, 32),
        (80, 80),
        (80, 2),
        (128, 128),
        (128, 64),
        (256, 256),
    ],
)
@pytest.mark.parametrize("mode", list(RopeMode), ids=lambda m: m.name)
def test_rope(
    mode: RopeMode, head_dim: int, n_rot: int, freq_base: float, freq_scale: float, isa: Isa
) -> None:
    rng = seeded(int(mode), head_dim, n_rot, int(freq_scale * 8))
    x = normal(rng, len(ROPE_POSITIONS), 3, head_dim)
    check_rope(
        x, ROPE_POSITIONS, n_rot=n_rot, mode=mode, freq_base=freq_base, freq_scale=freq_scale
    )


@pytest.mark.parametrize("mode", list(RopeMode), ids=lambda m: m.name)
def test_rope_default_n_rot_and_wide_heads(mode: RopeMode, isa: Isa) -> None:
    rng = seeded(int(mode), 43)
    positions = np.array([3, 70000], np.int32)
    check_rope(normal(rng, 2, 2, 32), positions, mode=mode)
    check_rope(normal(rng, 2, 1, 1024), positions, mode=mode)  # n_rot/2 > 256 pairs
    check_rope(normal(rng, 2, 1, 1024), positions, mode=mode, n_rot=600)


@pytest.mark.parametrize("mode", list(RopeMode), ids=lambda m: m.name)
def test_rope_position_zero_is_identity_and_negative_inverts(mode: RopeMode, isa: Isa) -> None:
    rng = seeded(int(mode), 47)
    x = normal(rng, 3, 2, 64)
    same = x.copy()
    kernels.rope(same, np.zeros(3, np.int32), mode=mode)
    np.testing.assert_array_equal(same, x)
    positions = np.array([5, 1000, 123456], np.int32)
    there_and_back = kernels.rope(
        kernels.rope(x.copy(), positions, mode=mode), -positions, mode=mode
    )
    np.testing.assert_allclose(there_and_back, x, rtol=0, atol=2 * ROPE_RTOL * np.abs(x).max())


@isa_for_all_examples
@given(
    n_tokens=st.integers(1, 4),
    n_heads=st.integers(1, 4),
    half_dim=st.integers(1, 80),
    rot_fraction=st.floats(0.0, 1.0),
    mode=st.sampled_from(list(RopeMode)),
    max_position=st.sampled_from([1, 100, 2**20, 2**31 - 1]),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_rope(
    n_tokens: int,
    n_heads: int,
    half_dim: int,
    rot_fraction: float,
    mode: RopeMode,
    max_position: int,
    seed: int,
    isa: Isa,
) -> None:
    rng = seeded(seed)
    head_dim = 2 * half_dim
    n_rot = 2 * max(1, round(rot_fraction * half_dim))
    x = normal(rng, n_tokens, n_heads, head_dim)
    positions = rng.integers(0, max_position, size=n_tokens, endpoint=True).astype(np.int32)
    check_rope(x, positions, n_rot=n_rot, mode=mode)


# --- softmax -------------------------------------------------------------------------------


def check_softmax(x: np.ndarray) -> None:
    expected = reference.softmax(x)
    got = x.copy()
    assert kernels.softmax(got) is got  # in place
    assert np.isfinite(got).all()
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):  # -inf - max is -inf, its weight 0
        shift = np.nan_to_num(np.abs(x64 - x64.max(axis=-1, keepdims=True)), posinf=0.0)
    # the error of exponent i, plus the weighted error the normalising sum picks up
    ulps = SOFTMAX_ULPS + shift + (expected * shift).sum(axis=-1, keepdims=True)
    reference.assert_within(got, expected, ulps * F32_UNIT_ROUNDOFF * expected + SOFTMAX_ATOL)
    np.testing.assert_allclose(got.sum(axis=-1, dtype=np.float64), 1.0, rtol=got.shape[-1] * 1e-6)


@pytest.mark.parametrize("n", ROW_LENGTHS)
def test_softmax(n: int, isa: Isa) -> None:
    rng = seeded(n, 53)
    check_softmax(normal(rng, 3, n, scale=4.0))


@pytest.mark.parametrize(
    "row",
    [
        [1e30, 1e30 - 1e24, -1e30],
        [88.0, 89.0, 90.0, 1000.0],
        [-1000.0, -1001.0, -1e4],
        [3.4e38, -3.4e38, 0.0],
        [0.0, -np.inf, 1.0, -np.inf],
        [5.0] * 17,
        [-80.0, 0.0, -100.0, -104.0],  # results down in the subnormal range
    ],
    ids=[
        "huge",
        "exp-overflow-range",
        "very-negative",
        "float-max",
        "masked",
        "all-equal",
        "tiny-results",
    ],
)
def test_softmax_is_stable(row: list[float], isa: Isa) -> None:
    check_softmax(np.array([row], np.float32))


def test_softmax_leading_dims(isa: Isa) -> None:
    rng = seeded(59)
    x = normal(rng, 2, 3, 10)
    check_softmax(x)
    np.testing.assert_array_equal(kernels.softmax(np.ones((4, 1), np.float32)), 1.0)


# --- swiglu and add ------------------------------------------------------------------------


@pytest.mark.parametrize("n", ROW_LENGTHS)
def test_swiglu(n: int, isa: Isa) -> None:
    rng = seeded(n, 61)
    gate = normal(rng, 2, n, scale=5.0)
    up = normal(rng, 2, n)
    got = kernels.swiglu(gate, up)
    assert got.shape == gate.shape
    np.testing.assert_allclose(got, reference.swiglu(gate, up), rtol=SWIGLU_RTOL, atol=SWIGLU_ATOL)


def test_swiglu_extreme_gates_and_out(isa: Isa) -> None:
    gate = np.array(
        [-1e4, -200.0, -89.0, -88.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.0, 1e4, 1e38], np.float32
    )
    up = np.linspace(-2.0, 3.0, gate.size, dtype=np.float32)
    out = np.full_like(gate, np.nan)
    assert kernels.swiglu(gate, up, out=out) is out
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, reference.swiglu(gate, up), rtol=SWIGLU_RTOL, atol=SWIGLU_ATOL)


@pytest.mark.parametrize("n", ROW_LENGTHS)
def test_geglu(n: int, isa: Isa) -> None:
    rng = seeded(n, 62)
    gate = normal(rng, 2, n, scale=5.0)
    up = normal(rng, 2, n)
    got = kernels.geglu(gate, up)
    assert got.shape == gate.shape
    check_geglu(got, gate, up)


def check_geglu(got: np.ndarray, gate: np.ndarray, up: np.ndarray) -> None:
    """exp(-2u) magnifies the float32 rounding of its argument u by |2u|, so the tolerance
    grows with it (a few units of roundoff per unit of 2|u|, where the result is not ~0)."""
    g = gate.astype(np.float64)
    u = np.abs(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g**3))
    rtol = SWIGLU_RTOL + 4 * F32_UNIT_ROUNDOFF * np.minimum(2 * u, 1e3)
    want = reference.geglu(gate, up)
    assert (np.abs(got - want) <= rtol * np.abs(want) + SWIGLU_ATOL).all()


def test_geglu_extreme_gates(isa: Isa) -> None:
    gate = np.array([-1e38, -1e4, -20.0, -1e-30, 0.0, 1e-30, 3.0, 20.0, 1e4, 1e38], np.float32)
    up = np.linspace(-2.0, 3.0, gate.size, dtype=np.float32)
    got = kernels.geglu(gate, up)
    assert np.isfinite(got).all()
    check_geglu(got, gate, up)


@pytest.mark.parametrize("cap", [0.5, 30.0])
def test_softcap(cap: float) -> None:
    x = np.array([-1e30, -100.0, -1.0, 0.0, 0.25, 29.0, 1e4], np.float32)
    want = cap * np.tanh(x.astype(np.float64) / cap)
    got = kernels.softcap(x.copy(), cap)
    np.testing.assert_allclose(got, want, rtol=4 * F32_UNIT_ROUNDOFF, atol=1e-7)
    assert (np.abs(got) <= cap).all()
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(KernelError, match="cap"):
            kernels.softcap(x.copy(), bad)


@pytest.mark.parametrize("n", ROW_LENGTHS)
def test_add(n: int, isa: Isa) -> None:
    rng = seeded(n, 67)
    a, b = normal(rng, 3, n), normal(rng, 3, n, scale=100.0)
    np.testing.assert_array_equal(kernels.add(a, b), a + b)  # one correctly rounded add


def test_add_in_place_and_out(isa: Isa) -> None:
    rng = seeded(71)
    a, b = normal(rng, 4, 33), normal(rng, 4, 33)
    expected = a + b
    out = np.empty_like(a)
    assert kernels.add(a, b, out=out) is out
    np.testing.assert_array_equal(out, expected)
    a_copy, b_copy = a.copy(), b.copy()
    assert kernels.add(a_copy, b, out=a_copy) is a_copy  # residual stream: h += f(h)
    np.testing.assert_array_equal(a_copy, expected)
    assert kernels.add(a, b_copy, out=b_copy) is b_copy
    np.testing.assert_array_equal(b_copy, expected)
    doubled = a.copy()
    kernels.add(doubled, doubled, out=doubled)
    np.testing.assert_array_equal(doubled, a + a)


# --- get_rows ------------------------------------------------------------------------------


def make_table(wt: WeightType, n_rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    values = normal(rng, n_rows, n)
    raw = reference.quantize(values, wt)
    return {
        WeightType.F32: lambda: raw.view(np.float32),
        WeightType.F16: lambda: raw.view(np.float16),
        WeightType.BF16: lambda: raw.view(np.uint16),
    }.get(wt, lambda: raw)()


@pytest.mark.parametrize("raw_bytes", [False, True], ids=["typed", "raw"])
@pytest.mark.parametrize("wt", WRITABLE_TYPES, ids=lambda wt: wt.name)
def test_get_rows(wt: WeightType, raw_bytes: bool, isa: Isa) -> None:
    rng = seeded(int(wt), 73)
    for n in (32, 96, 1024) if wt.quantized else (1, 7, 33, 1023):
        table = make_table(wt, 11, n, rng)
        if raw_bytes:
            table = reference.as_bytes(table)
        ids = np.array([3, 0, 10, 3, 7, 7, 1], np.int32)
        got = kernels.get_rows(table, ids, wtype=wt)
        assert got.shape == (len(ids), n)
        np.testing.assert_array_equal(got, reference.dequantize(table, wt)[ids])
        np.testing.assert_array_equal(got, kernels.dequantize(table, wt)[ids])


def test_get_rows_without_wtype_for_typed_tables() -> None:
    rng = seeded(79)
    for dtype in (np.float32, np.float16):
        table = normal(rng, 5, 12).astype(dtype)
        ids = np.array([4, 0], np.int32)
        np.testing.assert_array_equal(kernels.get_rows(table, ids), table[ids].astype(np.float32))


# --- attention ---------------------------------------------------------------------------


def make_attention(
    rng: np.random.Generator,
    n_q: int,
    n_kv: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    kv_dtype: type,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = normal(rng, n_q, n_heads, head_dim)
    k = normal(rng, n_kv, n_kv_heads, head_dim).astype(kv_dtype)
    v = normal(rng, n_kv, n_kv_heads, head_dim).astype(kv_dtype)
    return q, k, v


def check_attention(q, k, v, positions, scale=None) -> np.ndarray:
    got = kernels.attention(q, k, v, positions, scale=scale)
    assert got.shape == q.shape
    assert got.dtype == np.float32
    expected, bound = reference.attention(q, k, v, positions, scale)
    reference.assert_within(got, expected, bound + ATTN_ATOL)
    return got


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GQA_GROUPS)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=lambda d: np.dtype(d).name)
def test_attention(kv_dtype: type, group: int, head_dim: int, isa: Isa) -> None:
    rng = seeded(group, head_dim, np.dtype(kv_dtype).itemsize)
    n_kv_heads, n_kv = 2, 37
    q, k, v = make_attention(rng, 6, n_kv, n_kv_heads * group, n_kv_heads, head_dim, kv_dtype)
    # first row only, mid-cache, last row, and three beyond the cache (clamped to it)
    positions = np.array([0, 12, n_kv - 1, n_kv, n_kv + 50, 2**31 - 1], np.int32)
    got = check_attention(q, k, v, positions)
    # position 0 sees one row: softmax weight exactly 1, so the output is that value row
    np.testing.assert_array_equal(got[0], v[0].astype(np.float32).repeat(group, axis=0))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=lambda d: np.dtype(d).name)
def test_attention_positions_beyond_cache_clamp(kv_dtype: type, isa: Isa) -> None:
    rng = seeded(83, np.dtype(kv_dtype).itemsize)
    n_kv = 9
    q1, k, v = make_attention(rng, 1, n_kv, 4, 2, 64, kv_dtype)
    q = np.repeat(q1, 4, axis=0)
    positions = np.array([n_kv - 1, n_kv, n_kv + 1, 2**31 - 1], np.int32)
    got = kernels.attention(q, k, v, positions)
    for i in range(1, 4):
        np.testing.assert_array_equal(got[i], got[0])


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=lambda d: np.dtype(d).name)
def test_attention_prefill_matches_decode(kv_dtype: type, isa: Isa) -> None:
    """Several queries at once (prefill) equal the same queries one at a time (decode)."""
    rng = seeded(89, np.dtype(kv_dtype).itemsize)
    start, n_new = 14, 6
    q, k, v = make_attention(rng, n_new, start + n_new, 8, 2, 128, kv_dtype)
    positions = np.arange(start, start + n_new, dtype=np.int32)
    together = check_attention(q, k, v, positions)
    for i in range(n_new):
        one, _ = reference.attention(q[i : i + 1], k, v, positions[i : i + 1])
        alone = kernels.attention(q[i : i + 1], k, v, positions[i : i + 1])
        _, bound = reference.attention(q[i : i + 1], k, v, positions[i : i + 1])
        reference.assert_within(together[i : i + 1], alone, 2 * bound + ATTN_ATOL)
        reference.assert_within(alone, one, bound + ATTN_ATOL)


@pytest.mark.parametrize("scale", [0.01, 0.5, 3.0])
def test_attention_scale_and_out(scale: float, isa: Isa) -> None:
    rng = seeded(97, int(scale * 100))
    q, k, v = make_attention(rng, 3, 16, 4, 1, 80, np.float32)
    positions = np.array([15, 3, 8], np.int32)
    check_attention(q, k, v, positions, scale=scale)
    out = np.full_like(q, np.nan)
    assert kernels.attention(q, k, v, positions, scale=scale, out=out) is out
    np.testing.assert_array_equal(out, kernels.attention(q, k, v, positions, scale=scale))


@pytest.mark.parametrize("window", [1, 3, 8, 64])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=lambda d: np.dtype(d).name)
def test_attention_sliding_window(kv_dtype: type, window: int, isa: Isa) -> None:
    """A query at p sees rows p - window + 1 .. p only (both the fused and the plain path)."""
    rng = seeded(103, window, np.dtype(kv_dtype).itemsize)
    n_kv = 30
    q, k, v = make_attention(rng, 6, n_kv, 8, 2, 64, kv_dtype)
    positions = np.array([0, 2, 7, 15, 29, 40], np.int32)
    got = kernels.attention(q, k, v, positions, window=window)
    expected, bound = reference.attention(q, k, v, positions, window=window)
    reference.assert_within(got, expected, bound + ATTN_ATOL)
    # rows outside the window do not matter: change them and nothing moves
    k2, v2 = k.copy(), v.copy()
    k2[: max(0, 15 - window + 1)] = 7
    v2[: max(0, 15 - window + 1)] = -7
    again = kernels.attention(q[3:4], k2, v2, positions[3:4], window=window)
    np.testing.assert_array_equal(again, got[3:4])
    if window == 1:  # one row: the value row itself
        np.testing.assert_array_equal(got[2], v[7].astype(np.float32).repeat(4, axis=0))
    if window >= n_kv:  # a window wider than the cache is plain causal attention
        np.testing.assert_array_equal(got, kernels.attention(q, k, v, positions))


def test_attention_window_beyond_the_cache_is_empty(isa: Isa) -> None:
    rng = seeded(107)
    q, k, v = make_attention(rng, 1, 4, 2, 1, 16, np.float32)
    got = kernels.attention(q, k, v, np.array([20], np.int32), window=3)
    np.testing.assert_array_equal(got, np.zeros_like(q))


@pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=lambda d: np.dtype(d).name)
def test_attention_softcap(kv_dtype: type, softcap: float, isa: Isa) -> None:
    rng = seeded(109, int(softcap * 10), np.dtype(kv_dtype).itemsize)
    q, k, v = make_attention(rng, 4, 20, 4, 2, 32, kv_dtype)
    q *= 4  # large scores, so the cap bites
    positions = np.array([0, 5, 12, 19], np.int32)
    got = kernels.attention(q, k, v, positions, softcap=softcap, window=6)
    expected, bound = reference.attention(q, k, v, positions, softcap=softcap, window=6)
    reference.assert_within(got, expected, bound + ATTN_ATOL)
    if softcap < 1:  # a tight cap flattens the weights: far from the uncapped result
        plain = kernels.attention(q, k, v, positions, window=6)
        assert np.abs(plain - got).max() > 0.05


@pytest.mark.parametrize("bad", [{"window": -1}, {"window": 1.5}, {"softcap": -1.0},
                                 {"softcap": math.inf}, {"window": True}])  # fmt: skip
def test_attention_window_and_softcap_bad_values(bad: dict) -> None:
    rng = seeded(113)
    q, k, v = make_attention(rng, 1, 4, 2, 1, 16, np.float32)
    with pytest.raises(KernelError, match=next(iter(bad))):
        kernels.attention(q, k, v, np.array([3], np.int32), **bad)


def test_attention_thread_count_gives_identical_results(isa: Isa, restore_threads: None) -> None:
    rng = seeded(101)
    q, k, v = make_attention(rng, 5, 40, 8, 2, 128, np.float16)
    positions = np.array([39, 0, 20, 38, 100], np.int32)
    results = []
    for n in (1, 2, 3):
        kernels.set_threads(n)
        results.append(kernels.attention(q, k, v, positions))
    for got in results[1:]:
        np.testing.assert_array_equal(got, results[0])


@isa_for_all_examples
@given(
    n_q=st.integers(1, 4),
    n_kv=st.integers(1, 40),
    n_kv_heads=st.integers(1, 3),
    group=st.sampled_from(GQA_GROUPS),
    head_dim=st.integers(1, kernels.MAX_HEAD_DIM),
    kv_dtype=st.sampled_from(KV_DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_attention(
    n_q: int,
    n_kv: int,
    n_kv_heads: int,
    group: int,
    head_dim: int,
    kv_dtype: type,
    seed: int,
    isa: Isa,
) -> None:
    rng = seeded(seed)
    q, k, v = make_attention(rng, n_q, n_kv, n_kv_heads * group, n_kv_heads, head_dim, kv_dtype)
    positions = rng.integers(0, n_kv + 3, size=n_q).astype(np.int32)
    check_attention(q, k, v, positions)
