"""The CUDA backend: device selection, device memory, the kernels on host arrays and the
device limits the benchmarks measure (the transformer on the GPU is ``_cuda_forward``).

The compiled CUDA library is a second, optional extension (``_cuda_native``, built by
``build_cuda.py`` where ``nvcc`` exists). This module imports it only when a caller asks for
a CUDA device, so the CPU library never depends on it; every way that request can fail
(no CUDA build, no driver, no device) raises ``CudaUnavailable`` naming the reason.

Like ``_ops``, every entry point checks its arguments before a pointer reaches C (the checks
are ``_ops``'s own helpers, so both devices refuse the same inputs with the same messages).
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final

import attrs
import numpy as np

from .._errors import KernelError
from ._ops import (
    _WEIGHT_DTYPES,
    MAX_HEAD_DIM,
    _array,
    _float_arg,
    _int_arg,
    _out,
    _row_elems,
    _same_shape,
    _weight_type,
)
from ._types import RopeMode, WeightType

ECUDA: Final = -5  # REALM_ECUDA in native/cuda/realm_cuda.h
_STATUS = {-1: "invalid argument", -2: "out of memory", -3: "unsupported", -4: "thread error"}
_DEVICE_RE = re.compile(r"^cuda(?::(\d{1,3}))?$")


class CudaUnavailable(KernelError):
    """``device="cuda"`` cannot be served here. ``reason`` is ``"no-build"`` (Realm was built
    without its CUDA kernels), ``"driver"`` (no usable driver: the CUDA runtime's message
    says which) or ``"no-device"`` (the driver sees no such GPU)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, kernel="cuda")
        self.reason = reason


# --- the library and its devices ---------------------------------------------------------

_lock = threading.Lock()
_native: tuple[Any, Any] | None = None
_devices: dict[int, CudaDevice] = {}


def _library() -> tuple[Any, Any]:
    global _native
    if _native is None:
        try:
            from ._cuda_native import ffi, lib  # type: ignore[import-not-found]
        except ImportError as e:
            raise CudaUnavailable(
                "Realm was built without its CUDA kernels (nvcc was not found when it was "
                "built, or the CUDA build failed); build them with `python build_cuda.py` on a "
                f"machine with the CUDA toolkit ({e})",
                reason="no-build",
            ) from None
        _native = (ffi, lib)
    return _native


def _message(kernel: str, status: int) -> str:
    ffi, lib = _library()
    if status == ECUDA:
        return "CUDA error: " + ffi.string(lib.realm_cuda_error()).decode(errors="replace")
    return _STATUS.get(status, f"status {status}")


def _check(kernel: str, status: int) -> None:
    if status != 0:
        if status == -2:  # an allocation: callers turn it into their own exhaustion error
            raise MemoryError(f"{kernel}: {_message(kernel, status)}")
        raise KernelError(_message(kernel, status), kernel=kernel, status=status)


def parse_device(device: Any) -> int | None:
    """``"cpu"`` -> None; ``"cuda"`` / ``"cuda:N"`` -> the CUDA device index."""
    if device == "cpu":
        return None
    m = _DEVICE_RE.match(device) if isinstance(device, str) else None
    if m is None:
        raise KernelError(
            f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r:.60}", kernel="device"
        )
    return int(m.group(1) or 0)


@attrs.frozen
class CudaDevice:
    """One GPU, opened (``cuda_device``): its identity and limits."""

    index: int
    name: str
    total_bytes: int
    n_sm: int
    compute_capability: tuple[int, int]

    def activate(self) -> None:
        """Make this the calling thread's current device (the CUDA runtime's is per thread)."""
        _ffi, lib = _library()
        _check("cuda", lib.realm_cuda_set_device(self.index))

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        ffi, lib = _library()
        self.activate()
        f, t = ffi.new("int64_t *"), ffi.new("int64_t *")
        _check("cuda", lib.realm_cuda_mem_info(f, t))
        return int(f[0]), int(t[0])


def cuda_device(device: str | int = "cuda") -> CudaDevice:
    """Open a CUDA device (``"cuda"``, ``"cuda:N"`` or N); raises ``CudaUnavailable`` naming
    why not: no CUDA build, a driver error, or no such device."""
    index = device if isinstance(device, int) and not isinstance(device, bool) else None
    if index is None:
        index = parse_device(device)
        if index is None:
            raise KernelError("cuda_device needs a CUDA device, not 'cpu'", kernel="device")
    with _lock:
        if index in _devices:
            return _devices[index]
        ffi, lib = _library()
        count = ffi.new("int32_t *")
        status = lib.realm_cuda_device_count(count)
        if status == ECUDA:
            raise CudaUnavailable(
                "no usable CUDA driver: " + ffi.string(lib.realm_cuda_error()).decode(),
                reason="driver",
            )
        _check("cuda", status)
        if count[0] <= index:
            raise CudaUnavailable(
                f"no CUDA device {index}: the driver sees {count[0]} device(s)", reason="no-device"
            )
        _check("cuda", lib.realm_cuda_set_device(index))
        name = ffi.new("char[256]")
        total, n_sm = ffi.new("int64_t *"), ffi.new("int32_t *")
        major, minor = ffi.new("int32_t *"), ffi.new("int32_t *")
        _check("cuda", lib.realm_cuda_device_info(name, total, n_sm, major, minor, index))
        dev = CudaDevice(index, ffi.string(name).decode(errors="replace"), int(total[0]),
                         int(n_sm[0]), (int(major[0]), int(minor[0])))  # fmt: skip
        _devices[index] = dev
        return dev


def cuda_status() -> str:
    """``"ok: <device name>"``, or why ``device="cuda"`` would fail here (never raises)."""
    try:
        return f"ok: {cuda_device('cuda').name}"
    except CudaUnavailable as e:
        return f"{e.reason}: {e}"


def cuda_available() -> bool:
    """Whether ``device="cuda"`` can be used here (a CUDA build, a driver and a device)."""
    return cuda_status().startswith("ok")


# --- device memory -----------------------------------------------------------------------


def _free(lib: Any, ptr: Any, index: int) -> None:
    lib.realm_cuda_set_device(index)
    lib.realm_cuda_free(ptr)


class DeviceBuffer:
    """``nbytes`` of device memory, freed by ``close`` or when collected."""

    def __init__(self, device: CudaDevice, nbytes: int, *, zero: bool = False) -> None:
        ffi, lib = _library()
        self.device = device
        self.nbytes = int(nbytes)
        self.ptr: Any = ffi.NULL
        if self.nbytes > 0:
            device.activate()
            p = ffi.new("void **")
            _check("cuda malloc", lib.realm_cuda_malloc(p, self.nbytes))
            self.ptr = p[0]
            self._finalizer = weakref.finalize(self, _free, lib, self.ptr, device.index)
            if zero:
                _check("cuda memset", lib.realm_cuda_memset(self.ptr, 0, self.nbytes))

    def cast(self, ctype: str) -> Any:
        ffi, _lib = _library()
        return ffi.cast(ctype, self.ptr)

    def upload(self, a: np.ndarray) -> None:
        ffi, lib = _library()
        if a.nbytes != self.nbytes or not a.flags.c_contiguous:
            raise KernelError(f"upload of {a.nbytes} bytes into {self.nbytes}", kernel="cuda")
        self.device.activate()
        _check("cuda upload", lib.realm_cuda_upload(self.ptr, ffi.from_buffer(a), a.nbytes))

    def download(self, out: np.ndarray) -> np.ndarray:
        ffi, lib = _library()
        if out.nbytes != self.nbytes or not out.flags.c_contiguous:
            raise KernelError(f"download of {self.nbytes} bytes into {out.nbytes}", kernel="cuda")
        self.device.activate()
        _check("cuda download", lib.realm_cuda_download(ffi.from_buffer(out), self.ptr,
                                                        out.nbytes))  # fmt: skip
        return out

    def close(self) -> None:
        if self.nbytes > 0 and self._finalizer.alive:
            self._finalizer()


class DeviceArray(DeviceBuffer):
    """A dense array in device memory (``shape`` and ``dtype`` as numpy's)."""

    def __init__(self, device: CudaDevice, shape: tuple[int, ...], dtype: Any, *,
                 zero: bool = False) -> None:  # fmt: skip
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        super().__init__(device, int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize,
                         zero=zero)  # fmt: skip

    @classmethod
    def of(cls, device: CudaDevice, a: np.ndarray) -> DeviceArray:
        a = np.ascontiguousarray(a)
        d = cls(device, a.shape, a.dtype)
        if a.nbytes:
            d.upload(a)
        return d

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        return self.download(out) if self.nbytes else out


def to_device(a: np.ndarray, device: str | CudaDevice = "cuda") -> DeviceArray:
    """A device copy of a numpy array."""
    dev = device if isinstance(device, CudaDevice) else cuda_device(device)
    return DeviceArray.of(dev, a)


# --- kernels on host arrays (realm.kernels' functions with device="cuda") ----------------


class _Staging:
    """Device copies of a call's arrays, freed when the call ends."""

    def __init__(self, device: CudaDevice) -> None:
        self.device = device
        self.bufs: list[DeviceArray] = []

    def put(self, a: np.ndarray) -> Any:
        d = DeviceArray.of(self.device, a)
        self.bufs.append(d)
        return d.ptr

    def alloc(self, a: np.ndarray) -> DeviceArray:
        d = DeviceArray(self.device, a.shape, a.dtype)
        self.bufs.append(d)
        return d

    def __enter__(self) -> _Staging:
        self.device.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        for b in self.bufs:
            b.close()


def _f(p: Any) -> Any:
    ffi, _lib = _library()
    return ffi.cast("float *", p)


def _i(p: Any) -> Any:
    ffi, _lib = _library()
    return ffi.cast("int32_t *", p)


def matmul(w: np.ndarray, x: np.ndarray, *, wtype: WeightType | int | None = None,
           out: np.ndarray | None = None, device: str = "cuda") -> np.ndarray:  # fmt: skip
    """``realm.kernels.matmul`` on a CUDA device (arguments and result on the host)."""
    k = "matmul"
    w = _array(k, "w", w, _WEIGHT_DTYPES, ndim=(2,))
    x = _array(k, "x", x, np.float32, ndim=(1, 2))
    wt = _weight_type(k, w, wtype)
    n_cols = _row_elems(k, w, wt)
    n_rows = int(w.shape[0])
    if x.shape[-1] != n_cols:
        raise KernelError(f"x has {x.shape[-1]} columns but w rows have {n_cols} elements",
                          kernel=k)  # fmt: skip
    batch = 1 if x.ndim == 1 else int(x.shape[0])
    out = _out(k, out, (n_rows,) if x.ndim == 1 else (batch, n_rows), (w, x))
    _ffi, lib = _library()
    with _Staging(cuda_device(device)) as st:
        dw, dx, dy = st.put(w), st.put(x), st.alloc(out)
        _check(k, lib.realm_cuda_matmul(_f(dy.ptr), dw, int(wt), _f(dx), n_rows, n_cols, batch))
        dy.download(out)
    return out


def rmsnorm(x: np.ndarray, weight: np.ndarray | None, eps: float, *,
            out: np.ndarray | None = None, device: str = "cuda") -> np.ndarray:  # fmt: skip
    k = "rmsnorm"
    x = _array(k, "x", x, np.float32)
    if x.ndim == 0:
        raise KernelError("x must have at least one dimension", kernel=k)
    n = int(x.shape[-1])
    if weight is not None:
        weight = _array(k, "weight", weight, np.float32, ndim=(1,))
        if weight.shape[0] != n:
            raise KernelError(f"weight has {weight.shape[0]} elements but rows of x have {n}",
                              kernel=k)  # fmt: skip
    eps = _float_arg(k, "eps", eps, allow_zero=True)
    out = _out(k, out, x.shape, (x,) if weight is None else (x, weight))
    ffi, lib = _library()
    with _Staging(cuda_device(device)) as st:
        dx, dy = st.put(x), st.alloc(out)
        dw = ffi.NULL if weight is None else _f(st.put(weight))
        _check(k, lib.realm_cuda_rmsnorm(_f(dy.ptr), _f(dx), dw, x.size // n, n, eps))
        dy.download(out)
    return out


def rope(x: np.ndarray, positions: np.ndarray, *, n_rot: int | None = None,
         mode: RopeMode | int = RopeMode.NORMAL, freq_base: float = 10000.0,
         freq_scale: float = 1.0, device: str = "cuda") -> np.ndarray:  # fmt: skip
    k = "rope"
    x = _array(k, "x", x, np.float32, ndim=(3,), writable=True)
    positions = _array(k, "positions", positions, np.int32, ndim=(1,))
    n_tokens, n_heads, head_dim = (int(s) for s in x.shape)
    if positions.shape[0] != n_tokens:
        raise KernelError(f"positions has {positions.shape[0]} entries for {n_tokens} tokens",
                          kernel=k)  # fmt: skip
    if np.shares_memory(x, positions):
        raise KernelError("x must not overlap positions", kernel=k)
    n_rot = head_dim if n_rot is None else _int_arg(k, "n_rot", n_rot, 2, head_dim)
    if n_rot % 2:
        raise KernelError(f"n_rot must be even, got {n_rot}", kernel=k)
    mode_i = _int_arg(k, "mode", mode, 0, 2)
    if mode_i not in tuple(RopeMode):
        raise KernelError(f"mode {mode!r} is not a RopeMode", kernel=k)
    freq_base = _float_arg(k, "freq_base", freq_base, allow_zero=False)
    freq_scale = _float_arg(k, "freq_scale", freq_scale, allow_zero=False)
    ffi, lib = _library()
    with _Staging(cuda_device(device)) as st:
        dx = st.alloc(x)
        dx.upload(x)
        dp = st.put(positions)
        _check(k, lib.realm_cuda_rope(_f(dx.ptr), _i(dp), n_tokens, n_heads, head_dim, n_rot,
                                      mode_i, freq_base, freq_scale, ffi.NULL))  # fmt: skip
        dx.download(x)
    return x


def softmax(x: np.ndarray, *, device: str = "cuda") -> np.ndarray:
    k = "softmax"
    x = _array(k, "x", x, np.float32, writable=True)
    if x.ndim == 0:
        raise KernelError("x must have at least one dimension", kernel=k)
    n = int(x.shape[-1])
    _ffi, lib = _library()
    with _Staging(cuda_device(device)) as st:
        dx = st.alloc(x)
        dx.upload(x)
        _check(k, lib.realm_cuda_softmax(_f(dx.ptr), x.size // n, n))
        dx.download(x)
    return x


def _glu(k: str, fn: str, gate: np.ndarray, up: np.ndarray, out: np.ndarray | None,
         device: str) -> np.ndarray:  # fmt: skip
    gate = _array(k, "gate", gate, np.float32)
    up = _array(k, "up", up, np.float32)
    _same_shape(k, gate, up, "gate and up")
    out = _out(k, out, gate.shape, (gate, up))
    _ffi, lib = _library()
    with _Staging(cuda_device(device)) as st:
        dg, du, dy = st.put(gate), st.put(up), st.alloc(out)
        _check(k, getattr(lib, fn)(_f(dy.ptr), _f(dg), _f(du), gate.size))
        dy.download(out)
    return out


def swiglu(gate: np.ndarray, up: np.ndarray, *, out: np.ndarray | None = None,
           device: str = "cuda") -> np.ndarray:  # fmt: skip
    return _glu("swiglu", "realm_cuda_swiglu", gate, up, out, device)


def geglu(gate: np.ndarray, up: np.ndarray, *, out: np.ndarray | None = None,
          device: str = "cuda") -> np.ndarray:  # fmt: skip
    return _glu("geglu", "realm_cuda_geglu", gate, up, out, device)


def softcap(x: np.ndarray, cap: float, *, device: str = "cuda") -> np.ndarray:
    k = "softcap"
    x = _array(k, "x", x, np.float32, writable=True)
    cap = _float_arg(k, "cap", cap, allow_zero=False)
    _ffi, lib = _library()
    with _Staging(cuda_device(device)) as st:
        dx = st.alloc(x)
        dx.upload(x)
        _check(k, lib.realm_cuda_softcap(_f(dx.ptr), x.size, cap))
        dx.download(x)
    return x


def add(a: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None,
        device: str = "cuda") -> np.ndarray:  # fmt: skip
    k = "add"
    a = _array(k, "a", a, np.float32)
    b = _array(k, "b", b, np.float32)
    _same_shape(k, a, b, "a and b")
    if out is not None and (out is a or out is b):
        _array(k, "out", out, np.float32, writable=True)
    else:
        out = _out(k, out, a.shape, (a, b))
    _ffi, lib = _library()
    with _Staging(cuda_device(device)) as st:
        da, db, dy = st.put(a), st.put(b), st.alloc(out)
        _check(k, lib.realm_cuda_add(_f(dy.ptr), _f(da), _f(db), a.size))
        dy.download(out)
    return out


def get_rows(table: np.ndarray, ids: np.ndarray, *, wtype: WeightType | int | None = None,
             device: str = "cuda") -> np.ndarray:  # fmt: skip
    k = "get_rows"
    table = _array(k, "table", table, _WEIGHT_DTYPES, ndim=(2,))
    ids = _array(k, "ids", ids, np.int32, ndim=(1,))
    wt = _weight_type(k, table, wtype)
    n = _row_elems(k, table, wt, "table")
    n_rows = int(table.shape[0])
    bad = (ids < 0) | (ids >= n_rows)
    if bad.any():  # checked here: the device kernel trusts its ids
        raise KernelError(f"ids: id {int(ids[bad][0])} is out of range [0, {n_rows})", kernel=k)
    out = np.empty((ids.shape[0], n), dtype=np.float32)
    _ffi, lib = _library()
    with _Staging(cuda_device(device)) as st:
        dt, di, dy = st.put(table), st.put(ids), st.alloc(out)
        _check(k, lib.realm_cuda_get_rows(_f(dy.ptr), dt, int(wt), n_rows, n, _i(di),
                                          ids.shape[0]))  # fmt: skip
        dy.download(out)
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray, *,
              scale: float | None = None, window: int = 0, softcap: float = 0.0,
              out: np.ndarray | None = None, device: str = "cuda") -> np.ndarray:  # fmt: skip
    kn = "attention"
    q = _array(kn, "q", q, np.float32, ndim=(3,))
    k = _array(kn, "k", k, (np.float32, np.float16), ndim=(3,))
    v = _array(kn, "v", v, (np.float32, np.float16), ndim=(3,))
    positions = _array(kn, "positions", positions, np.int32, ndim=(1,))
    if k.dtype != v.dtype:
        raise KernelError(f"k and v must have one dtype, got {k.dtype} and {v.dtype}", kernel=kn)
    _same_shape(kn, k, v, "k and v")
    n_q, n_heads, head_dim = (int(s) for s in q.shape)
    n_kv, n_kv_heads, kv_dim = (int(s) for s in k.shape)
    if kv_dim != head_dim:
        raise KernelError(f"k/v head_dim {kv_dim} differs from q head_dim {head_dim}", kernel=kn)
    if head_dim > MAX_HEAD_DIM:
        raise KernelError(f"head_dim {head_dim} exceeds the limit {MAX_HEAD_DIM}", kernel=kn)
    if n_heads % n_kv_heads:
        raise KernelError(f"n_kv_heads {n_kv_heads} must divide n_heads {n_heads}", kernel=kn)
    if positions.shape[0] != n_q:
        raise KernelError(f"positions has {positions.shape[0]} entries for {n_q} queries",
                          kernel=kn)  # fmt: skip
    if (positions < 0).any():
        raise KernelError("positions must be >= 0", kernel=kn)
    scale = (1.0 / math.sqrt(head_dim) if scale is None
             else _float_arg(kn, "scale", scale, allow_zero=False))  # fmt: skip
    window = _int_arg(kn, "window", window, 0, 2**31 - 1)
    softcap = _float_arg(kn, "softcap", softcap, allow_zero=True)
    out = _out(kn, out, q.shape, (q, k, v, positions))
    kv_type = WeightType.F16 if k.dtype == np.float16 else WeightType.F32
    _ffi, lib = _library()
    with _Staging(cuda_device(device)) as st:
        dq, dk, dv, dp, dy = st.put(q), st.put(k), st.put(v), st.put(positions), st.alloc(out)
        _check(kn, lib.realm_cuda_attention(_f(dy.ptr), _f(dq), dk, dv, int(kv_type), _i(dp),
                                            n_q, n_kv, n_heads, n_kv_heads, head_dim, scale,
                                            window, softcap))  # fmt: skip
        dy.download(out)
    return out


HOST_OPS: Final[dict[str, Callable[..., np.ndarray]]] = {
    f.__name__: f
    for f in (matmul, rmsnorm, rope, softmax, swiglu, geglu, softcap, add, get_rows, attention)
}


# --- machine limits for the benchmarks ---------------------------------------------------


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 10, *, device: str = "cuda") -> float:
    """Device memory bandwidth in bytes/s (read + write) of a plain copy kernel."""
    nbytes = _int_arg("copy_bandwidth", "nbytes", nbytes, 1 << 16, 1 << 40) // 16 * 16
    iters = _int_arg("copy_bandwidth", "iters", iters, 1, 10_000)
    dev = cuda_device(device)
    ffi, lib = _library()
    src, dst = DeviceBuffer(dev, nbytes, zero=True), DeviceBuffer(dev, nbytes)
    try:
        seconds = ffi.new("double *")
        _check("copy_bandwidth",
               lib.realm_cuda_copy_bandwidth(seconds, dst.ptr, src.ptr, nbytes, iters))  # fmt: skip
        return 2.0 * nbytes / float(seconds[0])
    finally:
        src.close()
        dst.close()


def fma_peak(iters: int = 5, *, device: str = "cuda") -> float:
    """The device's float32 FMA throughput in FLOP/s (a multiply-add counts two)."""
    iters = _int_arg("fma_peak", "iters", iters, 1, 10_000)
    cuda_device(device).activate()
    ffi, lib = _library()
    flops = ffi.new("double *")
    _check("fma_peak", lib.realm_cuda_fma_peak(flops, iters))
    return float(flops[0])


def time_matmul(w: DeviceArray, wtype: WeightType | int, x: DeviceArray, y: DeviceArray,
                iters: int = 10) -> float:  # fmt: skip
    """Best seconds of one device matmul ``y = x . w^T`` over ``iters`` runs (CUDA events)."""
    ffi, lib = _library()
    wt = WeightType(int(wtype))
    n_rows = int(w.shape[0])
    n_cols = wt.row_elems(int(w.shape[1])) if w.dtype == np.uint8 else int(w.shape[1])
    batch = 1 if len(x.shape) == 1 else int(x.shape[0])
    if x.shape[-1] != n_cols or y.nbytes != 4 * batch * n_rows:
        raise KernelError("time_matmul: shapes do not agree", kernel="cuda")
    w.device.activate()
    seconds = ffi.new("double *")
    status = lib.realm_cuda_time_matmul(
        seconds, _f(y.ptr), w.ptr, int(wt), _f(x.ptr), n_rows, n_cols, batch, iters
    )
    _check("time_matmul", status)
    return float(seconds[0])
