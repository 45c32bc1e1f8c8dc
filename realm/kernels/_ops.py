"""Checked Python entry points to the native kernels.

This is the only module that touches the compiled ``ffi``/``lib``. Every function checks the
dtype, shape, contiguity, alignment and writability of its numpy arguments before a pointer
reaches C, and passes the arrays' own memory (``ffi.from_buffer``, no copies). cffi releases
the GIL for the duration of each native call, so kernels run in parallel with Python threads.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Iterator
from typing import Any

import attrs
import numpy as np

from .._errors import KernelError
from ._native import ffi, lib
from ._types import DTYPE_WEIGHT_TYPES, Isa, RopeMode, WeightType

MAX_HEAD_DIM = 256  # attention kernel limit (scores and outputs live in registers/L1)
_INT32_MAX = 2**31 - 1


# --- argument checks -------------------------------------------------------------------


def _fail(kernel: str, message: str) -> KernelError:
    return KernelError(message, kernel=kernel)


def _array(
    kernel: str,
    name: str,
    a: Any,
    dtype: np.dtype[Any] | type | tuple[type, ...],
    *,
    ndim: tuple[int, ...] | None = None,
    writable: bool = False,
) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise _fail(kernel, f"{name} must be a numpy array, got {type(a).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if a.dtype not in [np.dtype(d) for d in dtypes]:
        want = " or ".join(np.dtype(d).name for d in dtypes)
        raise _fail(kernel, f"{name} must have dtype {want}, got {a.dtype}")
    if ndim is not None and a.ndim not in ndim:
        want = " or ".join(str(n) for n in ndim)
        raise _fail(kernel, f"{name} must have {want} dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise _fail(kernel, f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if not a.flags.aligned:
        raise _fail(kernel, f"{name} is not aligned to its dtype")
    if writable and not a.flags.writeable:
        raise _fail(kernel, f"{name} must be writable")
    if a.size == 0:
        raise _fail(kernel, f"{name} must not be empty, got shape {a.shape}")
    return a


def _out(
    kernel: str, out: np.ndarray | None, shape: tuple[int, ...], inputs: tuple[np.ndarray, ...]
) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    _array(kernel, "out", out, np.float32, writable=True)
    if out.shape != shape:
        raise _fail(kernel, f"out must have shape {shape}, got {out.shape}")
    for a in inputs:
        if np.shares_memory(out, a):
            raise _fail(kernel, "out must not overlap an input")
    return out


def _int_arg(kernel: str, name: str, v: Any, lo: int, hi: int) -> int:
    """An integer argument (Python or numpy int, never bool) within [lo, hi]."""
    if isinstance(v, bool | np.bool_):
        raise _fail(kernel, f"{name} must be an int, got {v!r}")
    try:
        i = operator.index(v)
    except TypeError:
        raise _fail(kernel, f"{name} must be an int, got {type(v).__name__} {v!r}") from None
    if not lo <= i <= hi:
        raise _fail(kernel, f"{name} must be in [{lo}, {hi}], got {i}")
    return i


def _float_arg(kernel: str, name: str, v: Any, *, allow_zero: bool) -> float:
    """A real argument that stays finite (and > 0, or >= 0) as the float32 C receives."""
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | float | np.integer | np.floating):
        raise _fail(kernel, f"{name} must be a real number, got {type(v).__name__} {v!r}")
    with np.errstate(over="ignore", under="ignore"):
        f = float(np.float32(v))
    ok = math.isfinite(f) and (f >= 0.0 if allow_zero else f > 0.0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise _fail(kernel, f"{name} must be finite and {bound} as a float32, got {v!r}")
    return f


def _ptr(ctype: str, a: np.ndarray) -> Any:
    return ffi.cast(ctype, ffi.from_buffer(a, require_writable=False))


def _check(kernel: str, status: int) -> None:
    if status != lib.REALM_OK:
        message = ffi.string(lib.realm_status_message(status)).decode()
        raise KernelError(message, kernel=kernel, status=status)


def _weight_type(kernel: str, w: np.ndarray, wtype: WeightType | int | None) -> WeightType:
    if wtype is None:
        try:
            return DTYPE_WEIGHT_TYPES[w.dtype]
        except KeyError:
            raise _fail(
                kernel, f"wtype is required for weights of dtype {w.dtype} (raw blocks)"
            ) from None
    if isinstance(wtype, bool | np.bool_) or not isinstance(wtype, int | np.integer):
        raise _fail(kernel, f"wtype must be a WeightType, got {type(wtype).__name__} {wtype!r}")
    try:
        return WeightType(int(wtype))
    except ValueError:
        raise _fail(kernel, f"wtype {wtype!r} is not a known weight type") from None


def _row_elems(kernel: str, w: np.ndarray, wt: WeightType, name: str = "w") -> int:
    """Elements per row of a 2-D weight array holding ``wt`` (typed or raw bytes)."""
    if w.dtype in DTYPE_WEIGHT_TYPES:
        if DTYPE_WEIGHT_TYPES[w.dtype] != wt:
            raise _fail(kernel, f"{name} has dtype {w.dtype} but wtype is {wt.name}")
        return int(w.shape[-1])
    if w.dtype == np.uint16 and wt == WeightType.BF16:
        return int(w.shape[-1])
    if w.dtype != np.uint8:
        raise _fail(kernel, f"{name} of type {wt.name} must be uint8 blocks, got dtype {w.dtype}")
    try:
        return wt.row_elems(int(w.shape[-1]))
    except ValueError as e:
        raise _fail(kernel, f"{name}: {e}") from None


_WEIGHT_DTYPES = (np.float32, np.float16, np.uint16, np.uint8)


def _device_choice(fn: Any) -> Any:
    """Give a kernel a keyword-only ``device``: "cpu" (default) runs it here; "cuda" or
    "cuda:N" runs the CUDA twin (``_cuda``, imported only then) on host arrays."""

    @functools.wraps(fn)
    def run(*args: Any, device: str = "cpu", **kwargs: Any) -> Any:
        if device == "cpu":
            return fn(*args, **kwargs)
        from . import _cuda

        _cuda.parse_device(device)
        return _cuda.HOST_OPS[fn.__name__](*args, device=device, **kwargs)

    return run


# --- configuration ---------------------------------------------------------------------


def set_threads(n: int | None = None) -> int:
    """Resize the native thread pool (None or 0: all online cores); returns the new size."""
    n = 0 if n is None else _int_arg("set_threads", "n", n, 0, 256)
    _check("set_threads", lib.realm_threads_set(n))
    return int(lib.realm_threads_get())


def threads() -> int:
    """Number of threads in the native pool (the caller's thread included)."""
    return int(lib.realm_threads_get())


def detected_isa() -> Isa:
    """The best instruction-set level this CPU supports."""
    return Isa(lib.realm_isa_detected())


def active_isa() -> Isa:
    """The instruction-set level the kernels use now."""
    return Isa(lib.realm_isa_active())


def set_isa(isa: Isa | int) -> None:
    """Use a lower instruction-set level than detected (tests and benchmarks)."""
    level = Isa(_int_arg("set_isa", "isa", isa, min(Isa), max(Isa)))
    if level > detected_isa():
        raise _fail("set_isa", f"{level.name} is not supported by this CPU ({detected_isa().name})")
    _check("set_isa", lib.realm_isa_set(int(level)))


@contextlib.contextmanager
def use_isa(isa: Isa | int) -> Iterator[None]:
    """Run a block at one instruction-set level, then restore the previous one."""
    before = active_isa()
    set_isa(isa)
    try:
        yield
    finally:
        set_isa(before)


# --- block formats ---------------------------------------------------------------------


def quantize(x: np.ndarray, wtype: WeightType | int) -> np.ndarray:
    """Encode float32 rows ``(..., n)`` as ``wtype``: raw blocks ``(..., row_bytes)`` in uint8.

    Bit for bit GGML's reference quantization (as the ``gguf`` package's ``quants``).
    """
    k = "quantize"
    x = _array(k, "x", x, np.float32)
    wt = _weight_type(k, x, wtype)
    if not wt.writable:
        writable = ", ".join(w.name for w in WeightType if w.writable)
        raise _fail(k, f"wtype {wt.name} is read from files only (quantize writes {writable})")
    n = int(x.shape[-1]) if x.ndim else 1
    try:
        rb = wt.row_bytes(n)
    except ValueError as e:
        raise _fail(k, f"x: {e}") from None
    out = np.empty((*x.shape[:-1], rb), dtype=np.uint8)
    _check(k, lib.realm_quantize(_ptr("void *", out), int(wt), _ptr("float *", x), x.size))
    return out


def dequantize(data: np.ndarray, wtype: WeightType | int) -> np.ndarray:
    """Decode rows of ``wtype`` (typed, or raw uint8 blocks) into float32 ``(..., n)``."""
    k = "dequantize"
    data = _array(k, "data", data, _WEIGHT_DTYPES, ndim=None)
    wt = _weight_type(k, data, wtype)
    if data.ndim == 0:
        raise _fail(k, "data must have at least one dimension")
    n = _row_elems(k, data, wt, "data")
    rows = data.size // data.shape[-1]
    out = np.empty((*data.shape[:-1], n), dtype=np.float32)
    _check(k, lib.realm_dequantize(_ptr("float *", out), _ptr("void *", data), int(wt), rows * n))
    return out


# --- linear algebra --------------------------------------------------------------------


#: the weight types :func:`pack` takes
PACKABLE: frozenset[WeightType] = frozenset({WeightType.Q8_0, WeightType.Q4_0})


@attrs.frozen
class Packed:
    """Q8_0 or Q4_0 weights ``(n_rows, n_cols)`` in interleaved panels of 16 rows
    (:func:`pack`; the layout: native/packed.c). :func:`matmul` takes them as ``w``."""

    data: np.ndarray = attrs.field(repr=False)  # uint8, realm_packed_bytes of them
    wtype: WeightType
    n_rows: int
    n_cols: int


def pack(w: np.ndarray, wtype: WeightType | int) -> Packed:
    """Rewrite Q8_0 / Q4_0 rows (raw uint8 blocks ``(n_rows, row_bytes)``) as interleaved
    panels: the same bytes, laid out so that the integer products need no repacking. Their
    product gives each activation row the same result whatever the batch."""
    k = "pack"
    w = _array(k, "w", w, np.uint8, ndim=(2,))
    wt = _weight_type(k, w, wtype)
    if wt not in PACKABLE:
        names = ", ".join(sorted(t.name for t in PACKABLE))
        raise _fail(k, f"wtype {wt.name} has no packed form (packable: {names})")
    n_cols = _row_elems(k, w, wt)
    n_rows = int(w.shape[0])
    size = lib.realm_packed_bytes(int(wt), n_rows, n_cols)
    if size < 0:
        raise _fail(k, f"cannot pack ({n_rows}, {n_cols}) {wt.name} weights")
    out = np.empty(size, dtype=np.uint8)
    _check(k, lib.realm_pack(_ptr("void *", out), _ptr("void *", w), int(wt), n_rows, n_cols,
                             int(w.strides[0])))  # fmt: skip
    return Packed(out, wt, n_rows, n_cols)


def pack_preferred() -> bool:
    """Whether the active ISA level has its own kernel for packed weights (others multiply
    them with the portable one: correct, slower)."""
    return bool(lib.realm_pack_preferred())


def _packed(k: str, w: Packed) -> tuple[Packed, int, int, int]:
    if not isinstance(w.data, np.ndarray) or w.data.dtype != np.uint8 or w.data.ndim != 1:
        raise _fail(k, "w.data of Packed weights must be a 1-D uint8 array")
    if w.wtype not in PACKABLE:
        raise _fail(k, f"Packed weights of type {w.wtype!r}")
    if not all(isinstance(v, int | np.integer) and 0 < v < 2**40 for v in (w.n_rows, w.n_cols)):
        raise _fail(k, f"Packed weights of shape ({w.n_rows!r}, {w.n_cols!r})")
    size = lib.realm_packed_bytes(int(w.wtype), int(w.n_rows), int(w.n_cols))
    if size < 0:
        raise _fail(k, f"Packed {w.wtype.name} weights need whole blocks of 32 columns, not "
                       f"{w.n_cols}")  # fmt: skip
    if w.data.size != size or not w.data.flags.c_contiguous:
        raise _fail(k, f"Packed ({w.n_rows}, {w.n_cols}) {w.wtype.name} weights need "
                       f"{size} contiguous bytes, not {w.data.size}")  # fmt: skip
    return w, int(w.wtype) | int(lib.REALM_PACKED), int(w.n_rows), int(w.n_cols)


@_device_choice
def matmul(
    w: np.ndarray | Packed,
    x: np.ndarray,
    *,
    wtype: WeightType | int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``y[b, r] = sum_c w[r, c] * x[b, c]``: weights ``(n_rows, ·)`` times activations.

    Args:
        w: weights, 2-D: float32 or float16 ``(n_rows, n_cols)``; bfloat16 as uint16
            ``(n_rows, n_cols)``; raw blocks as uint8 ``(n_rows, row_bytes)``; or
            :class:`Packed` weights (``wtype`` is theirs).
        x: float32 ``(n_cols,)`` or ``(batch, n_cols)``.
        wtype: required unless ``w``'s dtype names the type (float32, float16).
        out: optional float32 result array, ``(n_rows,)`` or ``(batch, n_rows)`` like ``x``.
    """
    k = "matmul"
    x = _array(k, "x", x, np.float32, ndim=(1, 2))
    if isinstance(w, Packed):
        if wtype is not None and _weight_type(k, w.data, wtype) != w.wtype:
            raise _fail(k, f"wtype {wtype!r} given for Packed {w.wtype.name} weights")
        w, wt, n_rows, n_cols = _packed(k, w)
        wdata = w.data
    else:
        w = _array(k, "w", w, _WEIGHT_DTYPES, ndim=(2,))
        wt = int(_weight_type(k, w, wtype))
        n_cols = _row_elems(k, w, WeightType(wt))
        n_rows = int(w.shape[0])
        wdata = w
    if x.shape[-1] != n_cols:
        raise _fail(k, f"x has {x.shape[-1]} columns but w rows have {n_cols} elements")
    batch = 1 if x.ndim == 1 else int(x.shape[0])
    shape = (n_rows,) if x.ndim == 1 else (batch, n_rows)
    out = _out(k, out, shape, (wdata, x))
    _check(
        k,
        lib.realm_matmul(
            _ptr("float *", out),
            _ptr("void *", wdata),
            wt,
            _ptr("float *", x),
            n_rows,
            n_cols,
            batch,
        ),
    )
    return out


#: realm_matmul_path's answers (native/kernels.h)
_MATMUL_PATHS = {
    0: "rows",  # row-streaming; quantized weights meet activations quantized per 32
    1: "rows-q8k",  # row-streaming, activations quantized per 256 (ggml's Q8_K)
    2: "gemm-f32",  # float GEMM on the activations themselves
    3: "gemm-dequant",  # dequantized weight panels, float GEMM: the activations themselves
    4: "gemm-int",  # integer GEMM, activations quantized per 32
    5: "packed",  # interleaved weight panels (pack), activations quantized per 32
}


def matmul_path(wtype: WeightType | int, batch: int) -> str:
    """The kernel path :func:`matmul` takes for ``wtype`` weights and ``batch`` activation rows
    on the active ISA level: ``rows``, ``rows-q8k``, ``gemm-f32``, ``gemm-dequant`` or
    ``gemm-int`` (what each multiplies the weights with: native/kernels.h)."""
    k = "matmul_path"
    try:
        wt = WeightType(wtype)
    except ValueError:
        raise _fail(k, f"wtype {wtype!r} is not a weight type") from None
    b = _int_arg(k, "batch", batch, 1, 2**31 - 1)
    return _MATMUL_PATHS[lib.realm_matmul_path(int(wt), b)]


# --- element-wise and row operations -----------------------------------------------------


@_device_choice
def rmsnorm(
    x: np.ndarray, weight: np.ndarray | None, eps: float, *, out: np.ndarray | None = None
) -> np.ndarray:
    """RMS-normalise each row of float32 ``x`` ``(..., n)``, then scale by ``weight`` ``(n,)``."""
    k = "rmsnorm"
    x = _array(k, "x", x, np.float32)
    if x.ndim == 0:
        raise _fail(k, "x must have at least one dimension")
    n = int(x.shape[-1])
    if weight is not None:
        weight = _array(k, "weight", weight, np.float32, ndim=(1,))
        if weight.shape[0] != n:
            raise _fail(k, f"weight has {weight.shape[0]} elements but rows of x have {n}")
    eps = _float_arg(k, "eps", eps, allow_zero=True)
    out = _out(k, out, x.shape, (x,) if weight is None else (x, weight))
    wptr = ffi.NULL if weight is None else _ptr("float *", weight)
    _check(
        k, lib.realm_rmsnorm(_ptr("float *", out), _ptr("float *", x), wptr, x.size // n, n, eps)
    )
    return out


@_device_choice
def rope(
    x: np.ndarray,
    positions: np.ndarray,
    *,
    n_rot: int | None = None,
    mode: RopeMode | int = RopeMode.NORMAL,
    freq_base: float = 10000.0,
    freq_scale: float = 1.0,
) -> np.ndarray:
    """Rotate float32 ``x`` ``(n_tokens, n_heads, head_dim)`` in place by token position.

    The first ``n_rot`` (default: all) dims of each head rotate by angle
    ``positions[t] * freq_scale * freq_base ** (-2 i / n_rot)``. Returns ``x``.
    """
    k = "rope"
    x = _array(k, "x", x, np.float32, ndim=(3,), writable=True)
    positions = _array(k, "positions", positions, np.int32, ndim=(1,))
    n_tokens, n_heads, head_dim = (int(s) for s in x.shape)
    if positions.shape[0] != n_tokens:
        raise _fail(k, f"positions has {positions.shape[0]} entries for {n_tokens} tokens")
    if np.shares_memory(x, positions):
        raise _fail(k, "x must not overlap positions")
    n_rot = head_dim if n_rot is None else _int_arg(k, "n_rot", n_rot, 2, head_dim)
    if n_rot % 2:
        raise _fail(k, f"n_rot must be even, got {n_rot}")
    mode_i = _int_arg(k, "mode", mode, 0, 2)
    if mode_i not in tuple(RopeMode):
        raise _fail(k, f"mode {mode!r} is not a RopeMode")
    mode = RopeMode(mode_i)
    freq_base = _float_arg(k, "freq_base", freq_base, allow_zero=False)
    freq_scale = _float_arg(k, "freq_scale", freq_scale, allow_zero=False)
    _check(
        k,
        lib.realm_rope(
            _ptr("float *", x),
            _ptr("int32_t *", positions),
            n_tokens,
            n_heads,
            head_dim,
            n_rot,
            int(mode),
            freq_base,
            freq_scale,
        ),
    )
    return x


@_device_choice
def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of float32 ``x``, in place (max-subtracted). Returns ``x``."""
    k = "softmax"
    x = _array(k, "x", x, np.float32, writable=True)
    if x.ndim == 0:
        raise _fail(k, "x must have at least one dimension")
    n = int(x.shape[-1])
    _check(k, lib.realm_softmax(_ptr("float *", x), x.size // n, n))
    return x


def _same_shape(k: str, a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise _fail(k, f"{names} must have the same shape, got {a.shape} and {b.shape}")


@_device_choice
def swiglu(gate: np.ndarray, up: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """``silu(gate) * up`` element-wise on float32 arrays of one shape."""
    k = "swiglu"
    gate = _array(k, "gate", gate, np.float32)
    up = _array(k, "up", up, np.float32)
    _same_shape(k, gate, up, "gate and up")
    out = _out(k, out, gate.shape, (gate, up))
    _check(
        k,
        lib.realm_swiglu(
            _ptr("float *", out), _ptr("float *", gate), _ptr("float *", up), gate.size
        ),
    )
    return out


@_device_choice
def geglu(gate: np.ndarray, up: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """``gelu(gate) * up`` element-wise (GELU's tanh form) on float32 arrays of one shape."""
    k = "geglu"
    gate = _array(k, "gate", gate, np.float32)
    up = _array(k, "up", up, np.float32)
    _same_shape(k, gate, up, "gate and up")
    out = _out(k, out, gate.shape, (gate, up))
    _check(
        k,
        lib.realm_geglu(
            _ptr("float *", out), _ptr("float *", gate), _ptr("float *", up), gate.size
        ),
    )
    return out


@_device_choice
def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """``cap * tanh(x / cap)`` on float32 ``x``, in place (logit soft-capping). Returns ``x``."""
    k = "softcap"
    x = _array(k, "x", x, np.float32, writable=True)
    cap = _float_arg(k, "cap", cap, allow_zero=False)
    if x.size:
        _check(k, lib.realm_softcap(_ptr("float *", x), x.size, cap))
    return x


@_device_choice
def add(a: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """``a + b`` element-wise on float32 arrays of one shape (out may be ``a``: in place)."""
    k = "add"
    a = _array(k, "a", a, np.float32)
    b = _array(k, "b", b, np.float32)
    _same_shape(k, a, b, "a and b")
    if out is not None and (out is a or out is b):
        _array(k, "out", out, np.float32, writable=True)  # exact aliasing is safe here
    else:
        out = _out(k, out, a.shape, (a, b))
    _check(k, lib.realm_add(_ptr("float *", out), _ptr("float *", a), _ptr("float *", b), a.size))
    return out


@_device_choice
def get_rows(
    table: np.ndarray, ids: np.ndarray, *, wtype: WeightType | int | None = None
) -> np.ndarray:
    """Embedding lookup: dequantized rows ``table[ids]`` as float32 ``(len(ids), n)``."""
    k = "get_rows"
    table = _array(k, "table", table, _WEIGHT_DTYPES, ndim=(2,))
    ids = _array(k, "ids", ids, np.int32, ndim=(1,))
    wt = _weight_type(k, table, wtype)
    n = _row_elems(k, table, wt, "table")
    n_rows = int(table.shape[0])
    bad = (ids < 0) | (ids >= n_rows)
    if bad.any():
        raise _fail(k, f"ids: id {int(ids[bad][0])} is out of range [0, {n_rows})")
    out = np.empty((ids.shape[0], n), dtype=np.float32)
    _check(
        k,
        lib.realm_get_rows(
            _ptr("float *", out),
            _ptr("void *", table),
            int(wt),
            n_rows,
            n,
            _ptr("int32_t *", ids),
            ids.shape[0],
        ),
    )
    return out


# --- attention -------------------------------------------------------------------------


@_device_choice
def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    positions: np.ndarray,
    *,
    scale: float | None = None,
    window: int = 0,
    softcap: float = 0.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Causal grouped-query attention of a batch of queries over a KV cache.

    Args:
        q: float32 ``(n_q, n_heads, head_dim)``.
        k, v: cache ``(n_kv, n_kv_heads, head_dim)``, both float32 or both float16;
            ``n_kv_heads`` divides ``n_heads``; ``head_dim <= 256``.
        positions: int32 ``(n_q,)``; query i attends to cache rows ``0..positions[i]``.
        scale: score scale, default ``1/sqrt(head_dim)``.
        window: with ``window > 0``, query i attends only to rows
            ``positions[i] - window + 1 .. positions[i]`` (a sliding window).
        softcap: with ``softcap > 0``, scores become ``softcap * tanh(score / softcap)``.
    Returns:
        float32 ``(n_q, n_heads, head_dim)``.
    """
    kn = "attention"
    q = _array(kn, "q", q, np.float32, ndim=(3,))
    k = _array(kn, "k", k, (np.float32, np.float16), ndim=(3,))
    v = _array(kn, "v", v, (np.float32, np.float16), ndim=(3,))
    positions = _array(kn, "positions", positions, np.int32, ndim=(1,))
    if k.dtype != v.dtype:
        raise _fail(kn, f"k and v must have one dtype, got {k.dtype} and {v.dtype}")
    _same_shape(kn, k, v, "k and v")
    n_q, n_heads, head_dim = (int(s) for s in q.shape)
    n_kv, n_kv_heads, kv_dim = (int(s) for s in k.shape)
    if kv_dim != head_dim:
        raise _fail(kn, f"k/v head_dim {kv_dim} differs from q head_dim {head_dim}")
    if head_dim > MAX_HEAD_DIM:
        raise _fail(kn, f"head_dim {head_dim} exceeds the limit {MAX_HEAD_DIM}")
    if n_heads % n_kv_heads:
        raise _fail(kn, f"n_kv_heads {n_kv_heads} must divide n_heads {n_heads}")
    if positions.shape[0] != n_q:
        raise _fail(kn, f"positions has {positions.shape[0]} entries for {n_q} queries")
    if (positions < 0).any():
        raise _fail(kn, "positions must be >= 0")
    scale = (
        1.0 / math.sqrt(head_dim)
        if scale is None
        else _float_arg(kn, "scale", scale, allow_zero=False)
    )
    window = _int_arg(kn, "window", window, 0, 2**31 - 1)
    softcap = _float_arg(kn, "softcap", softcap, allow_zero=True)
    out = _out(kn, out, q.shape, (q, k, v, positions))
    kv_type = WeightType.F16 if k.dtype == np.float16 else WeightType.F32
    _check(
        kn,
        lib.realm_attention(
            _ptr("float *", out),
            _ptr("float *", q),
            _ptr("void *", k),
            _ptr("void *", v),
            int(kv_type),
            _ptr("int32_t *", positions),
            n_q,
            n_kv,
            n_heads,
            n_kv_heads,
            head_dim,
            scale,
            window,
            softcap,
        ),
    )
    return out


# --- machine limits --------------------------------------------------------------------


def read_bandwidth(buf: np.ndarray, iters: int = 5) -> float:
    """Best seconds to stream-read ``buf`` once with every pool thread (a machine limit)."""
    k = "read_bandwidth"
    buf = _array(k, "buf", buf, (np.uint8, np.float32, np.int64, np.uint64))
    if buf.nbytes < 64:
        raise _fail(k, "buf must hold at least 64 bytes")
    if buf.ctypes.data % 8:
        raise _fail(k, "buf must be 8-byte aligned")
    iters = _int_arg(k, "iters", iters, 1, _INT32_MAX)
    seconds = ffi.new("double *")
    _check(k, lib.realm_read_bandwidth(seconds, _ptr("void *", buf), buf.nbytes, iters))
    return float(seconds[0])
