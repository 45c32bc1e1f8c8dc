"""Plain numpy references for the native kernels, written for clarity, not speed.

Everything is computed in float64 from the exact values the kernel sees (float32 inputs,
half/bfloat16 weights widened exactly, GGML blocks decoded by the ``gguf`` package), so a
comparison's only slack is the kernel's own float32 rounding. Where a bound is useful, a
reference also returns the magnitude that rounding errors scale with (``sum |a * b|``).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants

from realm.kernels import RopeMode, WeightType

QK = 32  # elements per Q8_0 / Q4_0 block, and per quantized activation block
F32_UNIT_ROUNDOFF = 2.0**-24  # u: float32 round-to-nearest relative error


def dot_rtol(n_terms: int) -> float:
    """Worst-case relative error of a float32 sum of ``n_terms`` products (gamma_n, Higham).

    Relative to ``sum |w * x|``, any summation order (sequential, pairwise, SIMD lanes),
    with or without FMA; a few spare terms cover the final conversions.
    """
    return (n_terms + 4) * F32_UNIT_ROUNDOFF


def assert_within(actual: np.ndarray, expected: np.ndarray, bound: np.ndarray | float) -> None:
    """Assert ``|actual - expected| <= bound`` elementwise, reporting the worst offender."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = np.abs(actual - expected)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), err.shape)
    bad = ~(err <= bound)  # NaN counts as a failure
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), err.shape)
        raise AssertionError(
            f"{int(bad.sum())} of {err.size} elements out of bounds; worst at {i}: "
            f"actual {actual[i]!r}, expected {expected[i]!r}, error {err[i]:.3g} > {bound[i]:.3g}"
        )


# --- weights -------------------------------------------------------------------------------


def as_bytes(w: np.ndarray) -> np.ndarray:
    """A weight array (typed or raw) as its raw uint8 rows."""
    w = np.ascontiguousarray(w)
    return w.view(np.uint8).reshape(*w.shape[:-1], -1)


def dequantize(w: np.ndarray, wtype: WeightType) -> np.ndarray:
    """Weight rows (typed or raw blocks) as float32 values, decoded by the gguf package."""
    with np.errstate(all="ignore"):  # inf scales times 0 are NaN on purpose
        out = quants.dequantize(as_bytes(w), GGMLQuantizationType(int(wtype)))
    return np.asarray(out, dtype=np.float32)


def quantize(x: np.ndarray, wtype: WeightType) -> np.ndarray:
    """Float32 rows encoded as ``wtype`` raw uint8 rows by the gguf package."""
    with np.errstate(all="ignore"):
        out = quants.quantize(
            np.ascontiguousarray(x, dtype=np.float32), GGMLQuantizationType(int(wtype))
        )
    return as_bytes(out)


def weight_blocks(w: np.ndarray, wtype: WeightType) -> tuple[np.ndarray, np.ndarray]:
    """Decode raw Q8_0 / Q4_0 rows into integer values ``(rows, nb, 32)`` and scales ``(rows, nb)``.

    Values are centred (Q4_0 nibbles minus 8), so ``value = scale * q``.
    """
    raw = as_bytes(w)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, wtype.block_bytes)
    scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if wtype == WeightType.Q8_0:
        q = blocks[..., 2:].copy().view(np.int8).astype(np.int64)
    elif wtype == WeightType.Q4_0:
        packed = blocks[..., 2:].astype(np.int64)
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1) - 8
    else:
        raise ValueError(f"{wtype.name} has no integer blocks")
    return q, scale


# --- matmul --------------------------------------------------------------------------------


def matmul(w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``y = x @ w.T`` in float64 for float32 ``w`` values, with the bound ``|x| @ |w|.T``."""
    w64 = w.astype(np.float64)
    x64 = x.astype(np.float64)
    return x64 @ w64.T, np.abs(x64) @ np.abs(w64).T


QK_K = 256  # elements per K-quant super-block, and per Q8_K activation block


def quantize_activations(x: np.ndarray, block: int = QK) -> tuple[np.ndarray, np.ndarray]:
    """On-the-fly activation quantization: codes ``(..., nb, block)``, scales ``(..., nb)``.

    Per block (32, or QK_K for the weights of 256-element super-blocks): ``d = amax / 127``
    and ``q = rint(x / d)`` computed as ``x * (1 / d)``, all in float32, rounding to nearest
    even (``lrintf``); ``d = 0`` gives ``q = 0``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    blocks = x.reshape(*x.shape[:-1], -1, block)
    amax = np.abs(blocks).max(axis=-1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inv[..., None])
    assert np.abs(q).max(initial=0) <= 127
    return q.astype(np.int64), d


def matmul_quantized(
    w: np.ndarray, wtype: WeightType, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exactly what a Q8_0 / Q4_0 matmul computes, in float64: integer block dots times scales.

    Returns ``(y, bound)`` with ``y[b, r] = sum_blocks dw * dx * sum(qw * qx)`` and ``bound`` the
    sum of the magnitudes a float32 implementation accumulates (Q4_0 kernels may add the
    nibbles' +8 offset and subtract it again, so its magnitude is included).
    """
    qw, dw = weight_blocks(w, wtype)  # (rows, nb, 32), (rows, nb)
    qx, dx = quantize_activations(np.atleast_2d(x))  # (batch, nb, 32), (batch, nb)
    acc = np.einsum("rkj,bkj->brk", qw, qx).astype(np.float64)
    offset = 8 if wtype == WeightType.Q4_0 else 0
    mag = np.einsum("rkj,bkj->brk", np.abs(qw) + offset, np.abs(qx)).astype(np.float64)
    scales = dw.astype(np.float64)[None, :, :] * dx.astype(np.float64)[:, None, :]
    y = (scales * acc).sum(axis=-1)
    bound = (np.abs(scales) * mag).sum(axis=-1)
    if x.ndim == 1:
        return y[0], bound[0]
    return y, bound


def activation_error_bound(w_values: np.ndarray, x: np.ndarray, half_steps: float) -> np.ndarray:
    """Bound on how far quantizing the activations moves ``x @ w.T``.

    Each activation is off by at most ``half_steps`` times its block's scale.
    """
    _, dx = quantize_activations(np.atleast_2d(x))  # (batch, nb)
    step = np.repeat(dx.astype(np.float64), QK, axis=-1)  # (batch, n_cols)
    bound = (half_steps * step) @ np.abs(w_values.astype(np.float64)).T
    return bound[0] if x.ndim == 1 else bound


# --- element-wise and row operations ------------------------------------------------------


def rmsnorm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    y = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + float(np.float32(eps)))
    return y if weight is None else y * weight.astype(np.float64)


def rope(
    x: np.ndarray,
    positions: np.ndarray,
    *,
    n_rot: int | None = None,
    mode: RopeMode = RopeMode.NORMAL,
    freq_base: float = 10000.0,
    freq_scale: float = 1.0,
) -> np.ndarray:
    """Rotary embedding of ``x`` ``(n_tokens, n_heads, head_dim)``; returns a float64 copy.

    Pair i of the first ``n_rot`` dims turns by ``pos * freq_scale * freq_base ** (-2i / n_rot)``;
    NORMAL pairs dims (2i, 2i+1), NEOX pairs (i, i + n_rot/2); the rest pass through. The
    kernel takes freq_base and freq_scale as float32, so they are rounded the same way here.
    """
    out = x.astype(np.float64)
    head_dim = x.shape[-1]
    n_rot = head_dim if n_rot is None else n_rot
    half = n_rot // 2
    i = np.arange(half, dtype=np.float64)
    inv_freq = float(np.float32(freq_base)) ** (-2.0 * i / n_rot)
    theta = (positions.astype(np.float64) * float(np.float32(freq_scale)))[:, None] * inv_freq
    cos = np.cos(theta)[:, None, :]  # (n_tokens, 1, half): the same for every head
    sin = np.sin(theta)[:, None, :]
    if RopeMode(mode) == RopeMode.NORMAL:
        a, b = np.arange(0, n_rot, 2), np.arange(1, n_rot, 2)
    else:
        a, b = np.arange(half), np.arange(half, n_rot)
    x0, x1 = out[..., a].copy(), out[..., b].copy()
    out[..., a] = x0 * cos - x1 * sin
    out[..., b] = x0 * sin + x1 * cos
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def silu(g: np.ndarray) -> np.ndarray:
    """``g * sigmoid(g)`` without overflow for large ``|g|``."""
    g64 = g.astype(np.float64)
    e = np.exp(-np.abs(g64))
    return g64 * np.where(g64 >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return silu(gate) * up.astype(np.float64)


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``gelu(gate) * up`` with GELU's tanh form, as ggml_gelu computes it."""
    g = gate.astype(np.float64)
    with np.errstate(over="ignore"):
        u = np.sqrt(2.0 / np.pi) * (g + 0.044715 * g**3)
        return g / (1.0 + np.exp(-2.0 * u)) * up  # 0.5 (1 + tanh u) without cancellation


# --- attention -----------------------------------------------------------------------------


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    positions: np.ndarray,
    scale: float | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Causal grouped-query attention over a KV cache, in float64, with an error bound.

    Query i attends to cache rows ``0..min(positions[i], n_kv - 1)`` (with ``window > 0``, only
    those above ``positions[i] - window``); query head h reads KV head
    ``h // (n_heads // n_kv_heads)``; with ``softcap > 0`` scores are ``c * tanh(s / c)``.

    The bound covers a float32 kernel: each score is a dot product off by at most
    ``dot_rtol(head_dim) * scale * sum |q * k|`` (plus rounding of ``s - max``), which moves
    every softmax weight by a relative ``exp(2 * that) - 1``; the weighted sum of values adds
    ``dot_rtol(n)``. All of it scales with the largest ``|v|`` the query reads.
    """
    n_q, n_heads, head_dim = q.shape
    n_kv, n_kv_heads, _ = k.shape
    group = n_heads // n_kv_heads
    scale = float(
        np.float32(1.0 / np.sqrt(head_dim) if scale is None else scale)
    )  # C takes a float
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    out = np.zeros((n_q, n_heads, head_dim))
    bound = np.zeros((n_q, n_heads, head_dim))
    for i in range(n_q):
        n = min(int(positions[i]) + 1, n_kv)
        j0 = max(0, int(positions[i]) + 1 - window) if window > 0 else 0
        if j0 >= n:
            continue  # nothing in the window: zeros
        for h in range(n_heads):
            kvh = h // group
            kk, vv = k64[j0:n, kvh], v64[j0:n, kvh]
            scores = kk @ q64[i, h] * scale
            if softcap > 0:  # tanh's slope is <= 1: the score error does not grow
                scores = softcap * np.tanh(scores / softcap)
            p = np.exp(scores - scores.max())
            out[i, h] = (p / p.sum()) @ vv
            score_err = dot_rtol(head_dim) * scale * (np.abs(kk) @ np.abs(q64[i, h]))
            score_err = score_err.max() + 4 * F32_UNIT_ROUNDOFF * np.abs(scores).max()
            weight_rel_err = np.expm1(2 * score_err) + dot_rtol(n - j0)
            bound[i, h] = weight_rel_err * np.abs(vv).max(axis=0)
    return out, bound
