"""Every entry point refuses bad arguments with a KernelError naming the argument.

No pointer reaches C before its numpy array is checked, so none of these may crash the
process; the last tests check that the process still computes correct results afterwards,
and that the C entry points themselves return REALM_EINVAL (never abort) for bad arguments.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import kernel_reference as reference
import numpy as np
import pytest

from realm import KernelError, RealmError, kernels
from realm.kernels import Isa, RopeMode, WeightType
from realm.kernels._ops import ffi, lib  # the compiled binding, as _ops uses it

#: the types quantize writes (the read-only file types are tested in test_quant_types.py)
WRITABLE_TYPES = [wt for wt in WeightType if wt.writable]

# --- fresh argument arrays (a case may run more than once, and some kernels write) ---------


def f32(*shape: int) -> np.ndarray:
    rng = np.random.default_rng(list(shape))
    return rng.standard_normal(shape).astype(np.float32)


def i32(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def misaligned(
    shape: tuple[int, ...], dtype: Any = np.float32, *, writable: bool = True
) -> np.ndarray:
    """A C-contiguous array whose data starts one byte past an element boundary."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    size = count * dtype.itemsize + 1
    a = np.frombuffer(bytearray(size) if writable else bytes(size), dtype, count, offset=1)
    assert a.ctypes.data % 2 == 1
    assert dtype.itemsize == 1 or not a.flags.aligned
    return a.reshape(shape)


def strided(*shape: int) -> np.ndarray:
    """A non-contiguous float32 view of the given shape (every other element of the last axis)."""
    return f32(*shape[:-1], 2 * shape[-1])[..., ::2]


def empty(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


def raw(n_rows: int, n_bytes: int) -> np.ndarray:
    return np.zeros((n_rows, n_bytes), np.uint8)


def q8(n_rows: int, n_cols: int) -> np.ndarray:
    return kernels.quantize(f32(n_rows, n_cols), WeightType.Q8_0)


# --- each entry point with good default arguments, so a case spells out only the bad one ---

Q8_0 = WeightType.Q8_0


def quantize(x: Any = None, wtype: Any = Q8_0) -> Any:
    return kernels.quantize(f32(2, 32) if x is None else x, wtype)


def dequantize(data: Any = None, wtype: Any = Q8_0) -> Any:
    return kernels.dequantize(raw(2, 34) if data is None else data, wtype)


def matmul(w: Any = None, x: Any = None, **kw: Any) -> Any:
    return kernels.matmul(f32(4, 8) if w is None else w, f32(2, 8) if x is None else x, **kw)


def rmsnorm(x: Any = None, weight: Any = None, eps: Any = 1e-5, **kw: Any) -> Any:
    return kernels.rmsnorm(f32(2, 4) if x is None else x, weight, eps, **kw)


def rope(x: Any = None, positions: Any = None, **kw: Any) -> Any:
    return kernels.rope(
        f32(1, 1, 8) if x is None else x, i32(3) if positions is None else positions, **kw
    )


def attention(q: Any = None, k: Any = None, v: Any = None, positions: Any = None, **kw: Any) -> Any:
    """q: n_q=2, n_heads=4, head_dim=8; k, v: n_kv=3, n_kv_heads=2."""
    return kernels.attention(
        f32(2, 4, 8) if q is None else q,
        f32(3, 2, 8) if k is None else k,
        f32(3, 2, 8) if v is None else v,
        i32(0, 1) if positions is None else positions,
        **kw,
    )


def get_rows(table: Any = None, ids: Any = None, **kw: Any) -> Any:
    return kernels.get_rows(
        f32(4, 8) if table is None else table, i32(0) if ids is None else ids, **kw
    )


def read_bandwidth(buf: Any = None, iters: Any = 1) -> Any:
    return kernels.read_bandwidth(np.zeros(64, np.uint8) if buf is None else buf, iters)


def overlapping_add() -> Any:
    buf = f32(9)
    return kernels.add(buf[:8], f32(8), out=buf[1:9])


def positions_inside_x() -> Any:
    x = f32(2, 1, 4)
    return kernels.rope(x, x.reshape(-1).view(np.int32)[:2])


def out_is(make: Callable[[], np.ndarray], call: Callable[[np.ndarray], Any]) -> Callable[[], Any]:
    """A call whose out is (part of) one of its own inputs."""
    return lambda: call(make())


# --- the cases ---------------------------------------------------------------------------


def case(name: str, argument: str, call: Callable[[], Any]) -> Any:
    """A refused call. ``name`` starts with the kernel the error must come from; the message
    must contain ``argument`` (a word, or a regular expression)."""
    pattern = rf"\b{argument}\b" if argument.isidentifier() else argument
    return pytest.param(call, name.split("-", 1)[0], pattern, id=name)


WTYPE = r"\bwtype\b|weight type"  # "unknown weight type 3" names wtype in words
IDS = r"\bids?\b"  # "id 4 out of range" names one element of ids
NAN, INF = math.nan, math.inf

CASES = [
    # quantize
    case("quantize-list", "x", lambda: quantize([1.0, 2.0], WeightType.F32)),
    case("quantize-float64", "x", lambda: quantize(np.ones(32))),
    case("quantize-strided", "x", lambda: quantize(strided(2, 32))),
    case("quantize-misaligned", "x", lambda: quantize(misaligned((32,)))),
    case("quantize-empty", "x", lambda: quantize(empty(0, 32))),
    case("quantize-ragged-q8", r"\bQ8_0 row", lambda: quantize(f32(2, 33))),
    case("quantize-ragged-q4", r"\bQ4_0 row", lambda: quantize(f32(40), WeightType.Q4_0)),
    case("quantize-wtype-3", WTYPE, lambda: quantize(wtype=3)),
    case("quantize-wtype-99", WTYPE, lambda: quantize(wtype=99)),
    case("quantize-wtype-negative", WTYPE, lambda: quantize(wtype=-1)),
    case("quantize-wtype-str", WTYPE, lambda: quantize(wtype="Q8_0")),
    case("quantize-wtype-float", WTYPE, lambda: quantize(wtype=8.5)),
    # dequantize
    case("dequantize-list", "data", lambda: dequantize([0, 0], WeightType.F16)),
    case("dequantize-float64", "data", lambda: dequantize(np.ones(4), WeightType.F32)),
    case("dequantize-int8", "data", lambda: dequantize(np.zeros(34, np.int8))),
    case("dequantize-0d", "data", lambda: dequantize(np.array(7, np.uint8))),
    case("dequantize-strided", "data", lambda: dequantize(raw(2, 68)[:, ::2])),
    case("dequantize-misaligned", "data", lambda: dequantize(misaligned((8,)), WeightType.F32)),
    case("dequantize-empty", "data", lambda: dequantize(raw(0, 34))),
    case("dequantize-ragged", "data", lambda: dequantize(raw(2, 35))),
    case("dequantize-odd-f16-bytes", "data", lambda: dequantize(raw(1, 3), WeightType.F16)),
    case("dequantize-float16-as-q8", "data", lambda: dequantize(np.zeros(32, np.float16))),
    case("dequantize-uint16-as-f16", "data", lambda: dequantize(np.zeros(4, np.uint16), 1)),
    case("dequantize-raw-no-wtype", "wtype", lambda: dequantize(raw(1, 34), None)),
    case("dequantize-wtype-9", WTYPE, lambda: dequantize(wtype=9)),
    # matmul
    case("matmul-w-list", "w", lambda: matmul(w=f32(4, 8).tolist())),
    case("matmul-x-list", "x", lambda: matmul(x=f32(2, 8).tolist())),
    case("matmul-w-float64", "w", lambda: matmul(w=np.ones((4, 8)))),
    case("matmul-w-int32", "w", lambda: matmul(w=np.ones((4, 8), np.int32))),
    case("matmul-x-float64", "x", lambda: matmul(x=np.ones((2, 8)))),
    case("matmul-x-float16", "x", lambda: matmul(x=np.ones((2, 8), np.float16))),
    case("matmul-w-1d", "w", lambda: matmul(w=f32(8))),
    case("matmul-w-3d", "w", lambda: matmul(w=f32(2, 4, 8))),
    case("matmul-x-3d", "x", lambda: matmul(x=f32(1, 2, 8))),
    case("matmul-x-0d", "x", lambda: matmul(x=np.ones((), np.float32))),
    case("matmul-w-strided", "w", lambda: matmul(w=strided(4, 8))),
    case("matmul-w-transposed", "w", lambda: matmul(w=f32(8, 4).T)),
    case("matmul-x-strided", "x", lambda: matmul(x=strided(2, 8))),
    case("matmul-w-misaligned", "w", lambda: matmul(w=misaligned((4, 8), writable=False))),
    case("matmul-x-misaligned", "x", lambda: matmul(x=misaligned((2, 8)))),
    case("matmul-w-empty", "w", lambda: matmul(w=empty(0, 8))),
    case("matmul-x-empty", "x", lambda: matmul(x=empty(0, 8))),
    case("matmul-x-columns", "x", lambda: matmul(x=f32(2, 9))),
    case("matmul-x-columns-q8", "x", lambda: matmul(q8(4, 64), f32(2, 32), wtype=Q8_0)),
    case("matmul-out-readonly", "out", lambda: matmul(out=readonly(empty(2, 4)))),
    case("matmul-out-misaligned", "out", lambda: matmul(out=misaligned((2, 4)))),
    case("matmul-out-strided", "out", lambda: matmul(out=strided(2, 4))),
    case("matmul-out-float64", "out", lambda: matmul(out=np.empty((2, 4)))),
    case("matmul-out-shape", "out", lambda: matmul(out=empty(4, 2))),
    case("matmul-out-vector-for-batch", "out", lambda: matmul(x=f32(1, 8), out=empty(4))),
    case(
        "matmul-out-is-x", "out", out_is(lambda: f32(2, 8), lambda x: matmul(f32(8, 8), x, out=x))
    ),
    case(
        "matmul-out-in-w", "out", out_is(lambda: f32(8, 8), lambda w: matmul(w, f32(8), out=w[3]))
    ),
    case("matmul-wtype-5", WTYPE, lambda: matmul(q8(4, 32), f32(32), wtype=5)),
    case("matmul-wtype-mismatch", r"\bw\b.*\bwtype\b", lambda: matmul(wtype=WeightType.F16)),
    case("matmul-raw-no-wtype", "wtype", lambda: matmul(q8(4, 32), f32(32))),
    case("matmul-raw-ragged", "w", lambda: matmul(raw(4, 35), f32(32), wtype=Q8_0)),
    case("matmul-int16-as-bf16", "w", lambda: matmul(np.zeros((4, 8), np.int16), wtype=30)),
    case("matmul-uint16-as-f16", "w", lambda: matmul(np.zeros((4, 8), np.uint16), wtype=1)),
    # rmsnorm
    case("rmsnorm-list", "x", lambda: rmsnorm([[1.0, 2.0]])),
    case("rmsnorm-float64", "x", lambda: rmsnorm(np.ones((2, 4)))),
    case("rmsnorm-0d", "x", lambda: rmsnorm(np.ones((), np.float32))),
    case("rmsnorm-strided", "x", lambda: rmsnorm(strided(2, 4))),
    case("rmsnorm-misaligned", "x", lambda: rmsnorm(misaligned((2, 4)))),
    case("rmsnorm-empty", "x", lambda: rmsnorm(empty(2, 0))),
    case("rmsnorm-weight-length", "weight", lambda: rmsnorm(weight=f32(5))),
    case("rmsnorm-weight-2d", "weight", lambda: rmsnorm(weight=f32(1, 4))),
    case("rmsnorm-weight-float16", "weight", lambda: rmsnorm(weight=np.ones(4, np.float16))),
    case("rmsnorm-eps-nan", "eps", lambda: rmsnorm(eps=NAN)),
    case("rmsnorm-eps-inf", "eps", lambda: rmsnorm(eps=INF)),
    case("rmsnorm-eps-negative", "eps", lambda: rmsnorm(eps=-1e-5)),
    # the kernels take eps, scale and freq_* as float32: a finite double may not be one
    case("rmsnorm-eps-float32-overflow", "eps", lambda: rmsnorm(eps=1e39)),
    case("rmsnorm-out-readonly", "out", lambda: rmsnorm(out=readonly(empty(2, 4)))),
    case("rmsnorm-out-is-x", "out", out_is(lambda: f32(2, 4), lambda x: rmsnorm(x, out=x))),
    case(
        "rmsnorm-out-is-weight", "out", out_is(lambda: f32(4), lambda w: rmsnorm(f32(4), w, out=w))
    ),
    case("rmsnorm-out-shape", "out", lambda: rmsnorm(out=empty(8))),
    # rope
    case("rope-list", "x", lambda: rope(f32(1, 1, 8).tolist())),
    case("rope-x-2d", "x", lambda: rope(f32(2, 4), i32(0, 1))),
    case("rope-x-float64", "x", lambda: rope(np.ones((1, 1, 8)))),
    case("rope-x-readonly", "x", lambda: rope(readonly(f32(1, 1, 8)))),
    case("rope-x-strided", "x", lambda: rope(strided(1, 1, 8))),
    case("rope-x-misaligned", "x", lambda: rope(misaligned((1, 1, 8)))),
    case("rope-x-empty", "x", lambda: rope(empty(0, 1, 8), np.zeros(0, np.int32))),
    case("rope-positions-int64", "positions", lambda: rope(positions=np.array([0]))),
    case("rope-positions-float32", "positions", lambda: rope(positions=np.zeros(1, np.float32))),
    case("rope-positions-2d", "positions", lambda: rope(positions=i32(0).reshape(1, 1))),
    case("rope-positions-length", "positions", lambda: rope(positions=i32(0, 1))),
    case("rope-positions-list", "positions", lambda: rope(positions=[0])),
    case("rope-positions-inside-x", "positions", positions_inside_x),
    case("rope-n_rot-odd", "n_rot", lambda: rope(n_rot=3)),
    case("rope-n_rot-too-big", "n_rot", lambda: rope(n_rot=10)),
    case("rope-n_rot-zero", "n_rot", lambda: rope(n_rot=0)),
    case("rope-n_rot-negative", "n_rot", lambda: rope(n_rot=-2)),
    case("rope-n_rot-bool", "n_rot", lambda: rope(f32(1, 1, 2), n_rot=True)),
    case("rope-n_rot-float", "n_rot", lambda: rope(n_rot=4.0)),
    case("rope-mode-1", "mode", lambda: rope(mode=1)),
    case("rope-mode-str", "mode", lambda: rope(mode="neox")),
    case("rope-freq_base-nan", "freq_base", lambda: rope(freq_base=NAN)),
    case("rope-freq_base-inf", "freq_base", lambda: rope(freq_base=INF)),
    case("rope-freq_base-zero", "freq_base", lambda: rope(freq_base=0.0)),
    case("rope-freq_base-negative", "freq_base", lambda: rope(freq_base=-1e4)),
    case("rope-freq_base-float32-overflow", "freq_base", lambda: rope(freq_base=1e39)),
    case("rope-freq_scale-nan", "freq_scale", lambda: rope(freq_scale=NAN)),
    case("rope-freq_scale-minus-inf", "freq_scale", lambda: rope(freq_scale=-INF)),
    case("rope-freq_scale-zero", "freq_scale", lambda: rope(freq_scale=0.0)),
    case("rope-freq_scale-float32-underflow", "freq_scale", lambda: rope(freq_scale=1e-50)),
    # softmax
    case("softmax-list", "x", lambda: kernels.softmax([1.0, 2.0])),
    case("softmax-float64", "x", lambda: kernels.softmax(np.ones(4))),
    case("softmax-readonly", "x", lambda: kernels.softmax(readonly(f32(4)))),
    case("softmax-strided", "x", lambda: kernels.softmax(strided(2, 4))),
    case("softmax-misaligned", "x", lambda: kernels.softmax(misaligned((4,)))),
    case("softmax-empty", "x", lambda: kernels.softmax(empty(3, 0))),
    case("softmax-0d", "x", lambda: kernels.softmax(np.ones((), np.float32))),
    # swiglu
    case("swiglu-gate-list", "gate", lambda: kernels.swiglu([1.0], f32(1))),
    case("swiglu-gate-float64", "gate", lambda: kernels.swiglu(np.ones(4), f32(4))),
    case("swiglu-up-int32", "up", lambda: kernels.swiglu(f32(4), np.ones(4, np.int32))),
    case("swiglu-up-strided", "up", lambda: kernels.swiglu(f32(4), strided(4))),
    case("swiglu-up-misaligned", "up", lambda: kernels.swiglu(f32(4), misaligned((4,)))),
    case("swiglu-shapes", r"\bgate\b.*\bup\b", lambda: kernels.swiglu(f32(4), f32(5))),
    case("swiglu-shapes-2d", r"\bgate\b.*\bup\b", lambda: kernels.swiglu(f32(2, 3), f32(3, 2))),
    case("swiglu-empty", "gate", lambda: kernels.swiglu(empty(0), empty(0))),
    case(
        "swiglu-out-is-gate",
        "out",
        out_is(lambda: f32(4), lambda g: kernels.swiglu(g, f32(4), out=g)),
    ),
    case(
        "swiglu-out-readonly", "out", lambda: kernels.swiglu(f32(4), f32(4), out=readonly(empty(4)))
    ),
    case("swiglu-out-shape", "out", lambda: kernels.swiglu(f32(4), f32(4), out=empty(2, 2))),
    # add
    case("add-b-list", "b", lambda: kernels.add(f32(2), [1.0, 2.0])),
    case("add-a-float64", "a", lambda: kernels.add(np.ones(2), f32(2))),
    case("add-b-strided", "b", lambda: kernels.add(f32(4), strided(4))),
    case("add-a-misaligned", "a", lambda: kernels.add(misaligned((4,)), f32(4))),
    case("add-shapes", r"\ba\b.*\bb\b", lambda: kernels.add(f32(4), f32(2, 2))),
    case("add-empty", "a", lambda: kernels.add(empty(0), empty(0))),
    case("add-out-readonly", "out", lambda: kernels.add(f32(4), f32(4), out=readonly(empty(4)))),
    case(
        "add-out-is-readonly-a",
        "out",
        out_is(lambda: readonly(f32(4)), lambda a: kernels.add(a, f32(4), out=a)),
    ),
    case("add-out-overlaps-a", "out", overlapping_add),
    case("add-out-shape", "out", lambda: kernels.add(f32(4), f32(4), out=empty(5))),
    case("add-out-float64", "out", lambda: kernels.add(f32(4), f32(4), out=np.empty(4))),
    # get_rows
    case("get_rows-table-list", "table", lambda: get_rows(f32(4, 8).tolist())),
    case("get_rows-table-float64", "table", lambda: get_rows(np.ones((4, 8)))),
    case("get_rows-table-1d", "table", lambda: get_rows(f32(8))),
    case("get_rows-table-strided", "table", lambda: get_rows(strided(4, 8))),
    case("get_rows-table-empty", "table", lambda: get_rows(empty(0, 8))),
    case("get_rows-table-raw-ragged", "table", lambda: get_rows(raw(2, 20), wtype=2)),
    case("get_rows-ids-int64", "ids", lambda: get_rows(ids=np.array([0, 1]))),
    case("get_rows-ids-list", "ids", lambda: get_rows(ids=[0, 1])),
    case("get_rows-ids-2d", "ids", lambda: get_rows(ids=i32(0, 1).reshape(1, 2))),
    case("get_rows-ids-empty", "ids", lambda: get_rows(ids=np.zeros(0, np.int32))),
    case("get_rows-ids-misaligned", "ids", lambda: get_rows(ids=misaligned((2,), np.int32))),
    case("get_rows-id-too-big", IDS, lambda: get_rows(ids=i32(0, 4))),
    case("get_rows-id-negative", IDS, lambda: get_rows(ids=i32(-1, 0))),
    case("get_rows-id-int32-max", IDS, lambda: get_rows(q8(2, 32), i32(2**31 - 1), wtype=Q8_0)),
    case("get_rows-wtype-4", WTYPE, lambda: get_rows(q8(2, 32), wtype=4)),
    case("get_rows-raw-no-wtype", "wtype", lambda: get_rows(q8(2, 32))),
    # attention
    case("attention-q-list", "q", lambda: attention(q=f32(2, 4, 8).tolist())),
    case("attention-q-float64", "q", lambda: attention(q=np.ones((2, 4, 8)))),
    case("attention-q-float16", "q", lambda: attention(q=np.ones((2, 4, 8), np.float16))),
    case("attention-q-2d", "q", lambda: attention(q=f32(2, 32))),
    case("attention-k-2d", "k", lambda: attention(k=f32(3, 16), v=f32(3, 16))),
    case("attention-k-float64", "k", lambda: attention(k=np.ones((3, 2, 8)))),
    case("attention-v-uint16", "v", lambda: attention(v=np.zeros((3, 2, 8), np.uint16))),
    case(
        "attention-kv-dtypes", r"\bk\b.*\bv\b", lambda: attention(v=np.ones((3, 2, 8), np.float16))
    ),
    case("attention-kv-shapes", r"\bk\b.*\bv\b", lambda: attention(v=f32(4, 2, 8))),
    case(
        "attention-head_dim-mismatch",
        "head_dim",
        lambda: attention(k=f32(3, 2, 16), v=f32(3, 2, 16)),
    ),
    case(
        "attention-head_dim-257",
        "head_dim",
        lambda: attention(f32(1, 1, 257), f32(2, 1, 257), f32(2, 1, 257), i32(1)),
    ),
    case(
        "attention-head_dim-512",
        "head_dim",
        lambda: attention(f32(1, 2, 512), f32(2, 1, 512), f32(2, 1, 512), i32(1)),
    ),
    case(
        "attention-kv-heads-3-of-4", "n_kv_heads", lambda: attention(k=f32(3, 3, 8), v=f32(3, 3, 8))
    ),
    case(
        "attention-kv-heads-8-of-4", "n_kv_heads", lambda: attention(k=f32(3, 8, 8), v=f32(3, 8, 8))
    ),
    case("attention-positions-negative", "positions", lambda: attention(positions=i32(0, -1))),
    case(
        "attention-positions-int32-min", "positions", lambda: attention(positions=i32(-(2**31), 0))
    ),
    case("attention-positions-length", "positions", lambda: attention(positions=i32(0))),
    case("attention-positions-int64", "positions", lambda: attention(positions=np.array([0, 1]))),
    case("attention-positions-list", "positions", lambda: attention(positions=[0, 1])),
    case("attention-scale-nan", "scale", lambda: attention(scale=NAN)),
    case("attention-scale-inf", "scale", lambda: attention(scale=INF)),
    case("attention-scale-zero", "scale", lambda: attention(scale=0.0)),
    case("attention-scale-negative", "scale", lambda: attention(scale=-0.1)),
    case("attention-scale-float32-overflow", "scale", lambda: attention(scale=1e39)),
    case("attention-scale-float32-underflow", "scale", lambda: attention(scale=1e-50)),
    case(
        "attention-q-empty",
        "q",
        lambda: attention(q=empty(0, 4, 8), positions=np.zeros(0, np.int32)),
    ),
    case("attention-kv-empty", "k", lambda: attention(k=empty(0, 2, 8), v=empty(0, 2, 8))),
    case("attention-k-strided", "k", lambda: attention(k=strided(3, 2, 8))),
    case("attention-v-misaligned", "v", lambda: attention(v=misaligned((3, 2, 8)))),
    case("attention-out-readonly", "out", lambda: attention(out=readonly(empty(2, 4, 8)))),
    case("attention-out-shape", "out", lambda: attention(out=empty(2, 2, 8))),
    case("attention-out-is-q", "out", out_is(lambda: f32(2, 4, 8), lambda q: attention(q, out=q))),
    case(
        "attention-out-in-v",
        "out",
        out_is(
            lambda: f32(4, 2, 8),
            lambda kv: attention(f32(1, 2, 8), kv[:2], kv[2:], i32(0), out=kv[2:3]),
        ),
    ),
    # read_bandwidth
    case("read_bandwidth-list", "buf", lambda: read_bandwidth([0] * 64)),
    case("read_bandwidth-float64", "buf", lambda: read_bandwidth(np.zeros(64))),
    case("read_bandwidth-too-small", "buf", lambda: read_bandwidth(np.zeros(8, np.uint8))),
    case("read_bandwidth-odd-address", "buf", lambda: read_bandwidth(misaligned((128,), np.uint8))),
    case("read_bandwidth-strided", "buf", lambda: read_bandwidth(np.zeros(256, np.uint8)[::2])),
    case("read_bandwidth-iters-zero", "iters", lambda: read_bandwidth(iters=0)),
    case("read_bandwidth-iters-bool", "iters", lambda: read_bandwidth(iters=True)),
    case("read_bandwidth-iters-float", "iters", lambda: read_bandwidth(iters=2.0)),
    case("read_bandwidth-iters-beyond-int32", "iters", lambda: read_bandwidth(iters=2**31)),
    # the path query
    case("matmul_path-unknown-type", "wtype", lambda: kernels.matmul_path(99, 4)),
    case("matmul_path-str-type", "wtype", lambda: kernels.matmul_path("Q8_0", 4)),
    case("matmul_path-zero-batch", "batch", lambda: kernels.matmul_path(WeightType.Q8_0, 0)),
    case("matmul_path-bool-batch", "batch", lambda: kernels.matmul_path(WeightType.Q8_0, True)),
    case("matmul_path-float-batch", "batch", lambda: kernels.matmul_path(WeightType.Q8_0, 4.0)),
    # configuration
    case("set_threads-true", "n", lambda: kernels.set_threads(True)),
    case("set_threads-false", "n", lambda: kernels.set_threads(False)),
    case("set_threads-float", "n", lambda: kernels.set_threads(2.0)),
    case("set_threads-str", "n", lambda: kernels.set_threads("2")),
    case("set_threads-negative", "n", lambda: kernels.set_threads(-1)),
    case("set_threads-too-many", "n", lambda: kernels.set_threads(257)),
    case("set_isa-unknown", "isa", lambda: kernels.set_isa(max(Isa) + 1)),
    case("set_isa-negative", "isa", lambda: kernels.set_isa(-1)),
    case("set_isa-str", "isa", lambda: kernels.set_isa("AVX2")),
    case("set_isa-none", "isa", lambda: kernels.set_isa(None)),
    case("set_isa-via-use_isa", "isa", lambda: kernels.use_isa(7).__enter__()),
    *(
        case(
            f"set_isa-{level.name}-above-detected", level.name, lambda lv=level: kernels.set_isa(lv)
        )
        for level in Isa
        if level > kernels.detected_isa()
    ),
]


@pytest.mark.parametrize(("call", "kernel", "argument"), CASES)
def test_rejected_with_kernel_error_naming_the_argument(
    call: Callable[[], Any], kernel: str, argument: str
) -> None:
    isa_before, threads_before = kernels.active_isa(), kernels.threads()
    with pytest.raises(KernelError) as info:
        call()
    error = info.value
    assert isinstance(error, ValueError)
    assert isinstance(error, RealmError)
    assert error.kernel == kernel
    message = str(error)
    assert message.startswith(f"{kernel}: ")
    detail = message.removeprefix(f"{kernel}: ")
    assert re.search(argument, detail, flags=re.IGNORECASE), f"{message!r} lacks {argument!r}"
    # a refused call changes no configuration
    assert kernels.active_isa() == isa_before
    assert kernels.threads() == threads_before


def test_inputs_are_left_untouched_when_refused() -> None:
    x = f32(1, 1, 8)
    before = x.copy()
    with pytest.raises(KernelError):
        kernels.rope(x, i32(0), n_rot=3)
    with pytest.raises(KernelError):
        kernels.rope(x, i32(0), freq_base=math.nan)
    np.testing.assert_array_equal(x, before)
    out = np.full((2, 4), 7.0, np.float32)
    with pytest.raises(KernelError):
        kernels.matmul(f32(4, 8), f32(2, 9), out=out)
    np.testing.assert_array_equal(out, 7.0)


# --- the C ABI refuses bad arguments too (status codes, never an abort) ----------------------


def _c_calls() -> list[tuple[str, Callable[[], int]]]:
    y = ffi.new("float[64]")
    x = ffi.new("float[64]")
    w = ffi.new("float[64]")
    pos = ffi.new("int32_t[4]", [0, 1, 2, 3])
    neg = ffi.new("int32_t[1]", [-1])
    null = ffi.NULL
    calls: list[tuple[str, Callable[[], int]]] = [
        ("matmul-null-out", lambda: lib.realm_matmul(null, w, 0, x, 2, 8, 1)),
        ("matmul-null-w", lambda: lib.realm_matmul(y, null, 0, x, 2, 8, 1)),
        ("matmul-zero-rows", lambda: lib.realm_matmul(y, w, 0, x, 0, 8, 1)),
        ("matmul-negative-batch", lambda: lib.realm_matmul(y, w, 0, x, 2, 8, -1)),
        ("matmul-bad-type", lambda: lib.realm_matmul(y, w, 3, x, 2, 8, 1)),
        ("matmul-ragged-q8", lambda: lib.realm_matmul(y, w, 8, x, 1, 33, 1)),
        ("quantize-bad-type", lambda: lib.realm_quantize(y, 99, x, 32)),
        ("quantize-ragged", lambda: lib.realm_quantize(y, 2, x, 31)),
        ("quantize-negative", lambda: lib.realm_quantize(y, 0, x, -4)),
        ("dequantize-null", lambda: lib.realm_dequantize(y, null, 0, 4)),
        ("rmsnorm-nan-eps", lambda: lib.realm_rmsnorm(y, x, null, 1, 8, math.nan)),
        ("rmsnorm-zero-n", lambda: lib.realm_rmsnorm(y, x, null, 1, 0, 1e-5)),
        ("rope-odd-n_rot", lambda: lib.realm_rope(x, pos, 1, 1, 8, 3, 0, 1e4, 1.0)),
        ("rope-bad-mode", lambda: lib.realm_rope(x, pos, 1, 1, 8, 8, 1, 1e4, 1.0)),
        ("rope-nan-base", lambda: lib.realm_rope(x, pos, 1, 1, 8, 8, 0, math.nan, 1.0)),
        ("softmax-null", lambda: lib.realm_softmax(null, 1, 4)),
        ("swiglu-zero", lambda: lib.realm_swiglu(y, x, w, 0)),
        ("add-null", lambda: lib.realm_add(y, null, w, 4)),
        (
            "get_rows-bad-id",
            lambda: lib.realm_get_rows(y, w, 0, 2, 8, ffi.new("int32_t[1]", [2]), 1),
        ),
        ("get_rows-negative-id", lambda: lib.realm_get_rows(y, w, 0, 2, 8, neg, 1)),
        (
            "attention-head_dim",
            lambda: lib.realm_attention(y, x, w, w, 0, pos, 1, 1, 1, 1, 257, 1.0, 0, 0.0),
        ),
        (
            "attention-groups",
            lambda: lib.realm_attention(y, x, w, w, 0, pos, 1, 1, 4, 3, 4, 1.0, 0, 0.0),
        ),
        (
            "attention-negative-pos",
            lambda: lib.realm_attention(y, x, w, w, 0, neg, 1, 1, 1, 1, 8, 1.0, 0, 0.0),
        ),
        (
            "attention-kv-type",
            lambda: lib.realm_attention(y, x, w, w, 8, pos, 1, 1, 1, 1, 8, 1.0, 0, 0.0),
        ),
        (
            "attention-nan-scale",
            lambda: lib.realm_attention(y, x, w, w, 0, pos, 1, 1, 1, 1, 8, math.nan, 0, 0.0),
        ),
        (
            "attention-negative-window",
            lambda: lib.realm_attention(y, x, w, w, 0, pos, 1, 1, 1, 1, 8, 1.0, -1, 0.0),
        ),
        (
            "attention-nan-softcap",
            lambda: lib.realm_attention(y, x, w, w, 0, pos, 1, 1, 1, 1, 8, 1.0, 0, math.nan),
        ),
        ("geglu-empty", lambda: lib.realm_geglu(y, x, x, 0)),
        ("softcap-zero", lambda: lib.realm_softcap(y, 1, 0.0)),
        ("softcap-inf", lambda: lib.realm_softcap(y, 1, math.inf)),
        ("read_bandwidth-small", lambda: lib.realm_read_bandwidth(ffi.new("double *"), w, 8, 1)),
        ("matmul_path-type", lambda: lib.realm_matmul_path(99, 4)),
        ("matmul_path-batch", lambda: lib.realm_matmul_path(8, 0)),
        ("isa-unknown", lambda: lib.realm_isa_set(3)),
        ("isa-negative", lambda: lib.realm_isa_set(-1)),
    ]
    return calls


C_CALLS = _c_calls()


@pytest.mark.parametrize("call", [c for _, c in C_CALLS], ids=[name for name, _ in C_CALLS])
def test_c_entry_points_return_einval(call: Callable[[], int]) -> None:
    assert call() == lib.REALM_EINVAL
    assert ffi.string(lib.realm_status_message(lib.REALM_EINVAL)) == b"invalid argument"


def test_c_row_bytes_and_block_sizes() -> None:
    for wt in WeightType:
        assert lib.realm_type_block_elems(int(wt)) == wt.block_elems
        assert lib.realm_type_block_bytes(int(wt)) == wt.block_bytes
        assert lib.realm_row_bytes(int(wt), 512) == wt.row_bytes(512)
        assert (lib.realm_row_bytes(int(wt), 64) < 0) == (wt.block_elems > 64)
    assert lib.realm_row_bytes(int(WeightType.Q8_0), 33) < 0
    assert lib.realm_row_bytes(99, 32) < 0
    assert lib.realm_row_bytes(int(WeightType.F32), 2**62) < 0  # overflows int64 bytes


# --- and the process still works ----------------------------------------------------------


def test_still_computes_correct_results_afterwards(isa: Isa) -> None:
    rng = np.random.default_rng(2024)
    for wt in WRITABLE_TYPES:
        n_cols = 64
        values = rng.standard_normal((5, n_cols)).astype(np.float32)
        w = reference.quantize(values, wt)
        x = rng.standard_normal((3, n_cols)).astype(np.float32)
        y = kernels.matmul(w, x, wtype=wt)
        if wt.quantized:
            expected, bound = reference.matmul_quantized(w, wt, x)
            reference.assert_within(y, expected, reference.dot_rtol(2) * bound)
        else:
            expected, bound = reference.matmul(reference.dequantize(w, wt), x)
            reference.assert_within(y, expected, reference.dot_rtol(n_cols) * bound)
    q = rng.standard_normal((2, 4, 64)).astype(np.float32)
    k = rng.standard_normal((5, 2, 64)).astype(np.float16)
    v = rng.standard_normal((5, 2, 64)).astype(np.float16)
    positions = np.array([4, 2], np.int32)
    expected, bound = reference.attention(q, k, v, positions)
    reference.assert_within(kernels.attention(q, k, v, positions), expected, bound)
    h = rng.standard_normal((2, 3, 16)).astype(np.float32)
    np.testing.assert_allclose(
        kernels.rope(h.copy(), positions, mode=RopeMode.NEOX),
        reference.rope(h, positions, mode=RopeMode.NEOX),
        rtol=0,
        atol=1e-6 * np.abs(h).max(),
    )
    s = rng.standard_normal((2, 10)).astype(np.float32)
    np.testing.assert_allclose(kernels.softmax(s.copy()), reference.softmax(s), rtol=1e-6)
    assert kernels.read_bandwidth(np.zeros(4096, np.uint8), 1) >= 0.0
