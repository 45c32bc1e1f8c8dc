"""A transformer whose weights and KV caches live on a GPU (``CudaTransformer``).

``NativeTransformer``'s interface on the device: the weights are uploaded once per model and
shared by every session (so by every tenant), the sessions' KV caches are device buffers
(``DeviceKV``), and a step is one ``realm_cuda_forward`` call. With a device budget the
transformer blocks are paged between host and device memory by ``_DevicePager``, which follows
the ``LayerPager``'s policy with the GPU as the fast tier.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from .._errors import KernelError
from ._cuda import CudaDevice, DeviceArray, _check, _f, _library, cuda_device
from ._forward import LayerAcquire, LayerRelease, LayerWeights, Matrix, NativeTransformer, SeqStep
from ._forward import TransformerSpec as TransformerSpec
from ._ops import _array, _int_arg


class DeviceKV(DeviceArray):
    """One sequence's KV cache in device memory: ``(n_layers, 2, capacity, kv_dim)``."""


@attrs.define(eq=False)
class _DeviceLayer:
    bufs: list[DeviceArray]
    c: Any  # the realm_layer with device pointers
    nbytes: int
    in_use: int = 0

    def free(self) -> None:
        for b in self.bufs:
            b.close()


def _layer_bytes(lw: LayerWeights) -> int:
    total = 0
    for f in attrs.fields(LayerWeights):
        v = getattr(lw, f.name)
        if isinstance(v, Matrix):
            total += v.data.nbytes
        elif isinstance(v, np.ndarray):
            total += v.nbytes
    return total


class _DevicePager:
    """One model's transformer blocks on the device under ``budget`` bytes (None: no limit).

    The ``LayerPager``'s policy, single-model: a block is uploaded on first use and stays
    until room is needed; the victim is the resident block not in use whose next use is
    furthest away (a step visits the blocks in order, so the ones just used go first); a
    block in use is never evicted, and one that does not fit beside the blocks in use still
    runs. While block ``l`` is in use, block ``l + 1`` is uploaded by a worker thread if
    room can be made for it, so the copy overlaps the device's work on ``l``.
    """

    def __init__(
        self,
        owner: CudaTransformer,
        budget: int | None,
        layers: Sequence[LayerWeights] | None,
        acquire: LayerAcquire | None,
        release: LayerRelease | None,
    ) -> None:
        self.owner = owner
        self.budget = budget
        self.n_layers = owner.spec.n_layers
        self._layers, self._host_acquire, self._host_release = layers, acquire, release
        self._lock = threading.Lock()
        self._resident: dict[int, _DeviceLayer] = {}
        self._pending: dict[int, concurrent.futures.Future[None]] = {}
        self._reserved = 0  # bytes of uploads under way
        self._cursor = 0
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="realm-cuda-pager")
        self.stats = {"uploads": 0, "evictions": 0, "prefetches": 0, "prefetch_hits": 0}

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(dl.nbytes for dl in self._resident.values())

    def _make_room_locked(self, need: int) -> bool:
        if self.budget is None:
            return True
        used = sum(dl.nbytes for dl in self._resident.values()) + self._reserved
        while used + need > self.budget:
            idle = [layer for layer, dl in self._resident.items() if not dl.in_use]
            if not idle:
                return False
            victim = max(idle, key=lambda layer: (layer - self._cursor - 1) % self.n_layers)
            dl = self._resident.pop(victim)
            dl.free()  # the device is done with it: release waits for the device
            used -= dl.nbytes
            self.stats["evictions"] += 1
        return True

    def _load(self, layer: int, *, prefetch: bool) -> _DeviceLayer | None:
        """Upload block ``layer`` (None: a prefetch found no room beside the blocks in use)."""
        lw = self._host_acquire(layer) if self._host_acquire is not None else None
        try:
            if lw is None:
                assert self._layers is not None
                lw = self._layers[layer]
            need = _layer_bytes(lw)
            with self._lock:
                if not self._make_room_locked(need) and prefetch:
                    return None
                self._reserved += need
            try:
                dl = self.owner._upload_layer(lw, layer)
            finally:
                with self._lock:
                    self._reserved -= need
            with self._lock:
                self.stats["uploads"] += 1
            return dl
        finally:
            if self._host_acquire is not None and self._host_release is not None:
                self._host_release(layer)

    def _prefetch_job(self, layer: int) -> None:
        try:
            dl = self._load(layer, prefetch=True)
        except Exception:  # the step loads the block itself, and reports what goes wrong
            return
        if dl is None:
            return
        with self._lock:
            if self._closed or layer in self._resident:
                dl.free()
            else:
                self._resident[layer] = dl
                self.stats["prefetches"] += 1

    def acquire(self, layer: int) -> _DeviceLayer:
        with self._lock:
            self._cursor = layer
            future = self._pending.pop(layer, None)
        if future is not None:
            future.result()  # the worker has made it resident, or left it to us
        with self._lock:
            dl = self._resident.get(layer)
            if dl is not None:
                dl.in_use += 1
                if future is not None:
                    self.stats["prefetch_hits"] += 1
        if dl is None:
            dl = self._load(layer, prefetch=False)
            assert dl is not None
            with self._lock:
                self._resident[layer] = dl
                dl.in_use += 1
        nxt = layer + 1
        if nxt < self.n_layers:
            with self._lock:
                if not self._closed and nxt not in self._resident and nxt not in self._pending:
                    self._pending[nxt] = self._pool.submit(self._prefetch_job, nxt)
        return dl

    def release(self, layer: int) -> None:
        with self._lock:
            dl = self._resident.get(layer)
            if dl is not None and dl.in_use > 0:
                dl.in_use -= 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)
        with self._lock:
            for dl in self._resident.values():
                dl.free()
            self._resident.clear()


class CudaTransformer:
    """``NativeTransformer``'s interface with the weights uploaded once to a GPU (shared by
    every session of the model) and KV caches in device memory (``new_kv``).

    Layer paging: with a host pager (``acquire``/``release``) or ``max_device_bytes``, the
    blocks are uploaded on first use and kept under that device-memory budget by a
    ``_DevicePager`` (the ``LayerPager``'s policy with the GPU as the fast tier and host
    memory as the slow one). Without either, every block is uploaded at construction.
    """

    def __init__(
        self,
        spec: TransformerSpec,
        *,
        tok_embd: Matrix,
        output_norm: np.ndarray,
        output: Matrix,
        layers: Sequence[LayerWeights] | None = None,
        acquire: LayerAcquire | None = None,
        release: LayerRelease | None = None,
        device: str | CudaDevice = "cuda",
        max_device_bytes: int | None = None,
    ) -> None:
        self.device = device if isinstance(device, CudaDevice) else cuda_device(device)
        # the CPU description checks every argument (shapes, types, variant constants) and
        # serves as the source of the host-side per-layer arrays
        self._host = NativeTransformer(spec, tok_embd=tok_embd, output_norm=output_norm,
                                       output=output, layers=layers, acquire=acquire,
                                       release=release, pack=False)  # fmt: skip
        self.spec = spec
        s = spec
        if max_device_bytes is not None:
            max_device_bytes = _int_arg("cuda", "max_device_bytes", max_device_bytes, 1, 2**62)
        ffi, _lib = _library()
        self._ffi = ffi
        self._weights: list[DeviceArray] = []
        self._tok_embd = self._put(tok_embd.data)
        same = output.data is tok_embd.data or (
            output.data.shape == tok_embd.data.shape
            and output.data.__array_interface__["data"][0]
            == tok_embd.data.__array_interface__["data"][0]
        )
        self._output = self._tok_embd if same else self._put(output.data)
        self._output_norm = self._put(np.ascontiguousarray(output_norm, np.float32))
        m = ffi.new("realm_model *")
        hm = self._host._model
        for name in ("n_layers", "n_embd", "n_heads", "n_kv_heads", "head_dim", "n_ff", "n_vocab",
                     "n_rot", "rope_mode", "rope_base", "rope_scale", "rms_eps", "kv_type", "act",
                     "embd_scale", "attn_scale", "attn_softcap", "final_softcap"):  # fmt: skip
            setattr(m, name, getattr(hm, name))
        m.tok_embd, m.type_embd = self._tok_embd.ptr, int(tok_embd.wtype)
        m.output, m.type_output = self._output.ptr, int(output.wtype)
        m.output_norm = _f(self._output_norm.ptr)
        # per-layer constants stay on the host (read by the step's host code); rope_freqs is
        # read by the RoPE kernel: on the device
        self._host_arrays: list[np.ndarray] = []
        m.window = self._host_array("int32_t *", s.window, np.int32)
        m.layer_rope_base = self._host_array("float *", s.layer_rope_base, np.float32)
        m.layer_rope_scale = self._host_array("float *", s.layer_rope_scale, np.float32)
        m.rope_freqs = ffi.NULL
        if s.rope_freqs is not None:
            m.rope_freqs = _f(self._put(np.ascontiguousarray(s.rope_freqs, np.float32)).ptr)
        self._paged = acquire is not None or max_device_bytes is not None
        self.max_device_bytes = max_device_bytes
        self._hook_error: BaseException | None = None
        self._lock = threading.Lock()
        self._pager = _DevicePager(self, max_device_bytes, layers, acquire, release)
        if not self._paged:  # every block resident for good: the pager just holds them
            self._c_layers = ffi.new("realm_layer[]", s.n_layers)
            for i in range(s.n_layers):
                self._c_layers[i] = self._pager.acquire(i).c[0]
            m.layers = self._c_layers
        else:
            m.layers = ffi.NULL
            self._cb_acquire = ffi.callback("int(void *, int32_t, realm_layer *)", self._on_acquire)
            self._cb_release = ffi.callback("int(void *, int32_t, realm_layer *)", self._on_release)
            m.acquire, m.release = self._cb_acquire, self._cb_release
        self._model = m
        self._closed = False

    # --- weights on the device ----------------------------------------------------------

    def _put(self, a: np.ndarray, keep: list[DeviceArray] | None = None) -> DeviceArray:
        d = DeviceArray.of(self.device, a)
        (self._weights if keep is None else keep).append(d)
        return d

    def _host_array(self, ctype: str, values: Any, dtype: Any) -> Any:
        if values is None:
            return self._ffi.NULL
        a = np.ascontiguousarray(values, dtype=dtype)
        self._host_arrays.append(a)
        return self._ffi.cast(ctype, self._ffi.from_buffer(a))

    def _upload_layer(self, lw: LayerWeights, i: int) -> _DeviceLayer:
        self._host.check_layer(lw, i)
        bufs: list[DeviceArray] = []
        c = self._ffi.new("realm_layer *")

        def mat(m: Matrix) -> Any:
            return self._put(m.data, bufs).ptr

        def vec(v: np.ndarray | None) -> Any:
            if v is None:
                return self._ffi.NULL
            return _f(self._put(np.ascontiguousarray(v, np.float32), bufs).ptr)

        try:
            c.attn_norm, c.ffn_norm = vec(lw.attn_norm), vec(lw.ffn_norm)
            c.wq, c.type_q = mat(lw.wq), int(lw.wq.wtype)
            c.wk, c.type_k = mat(lw.wk), int(lw.wk.wtype)
            c.wv, c.type_v = mat(lw.wv), int(lw.wv.wtype)
            c.wo, c.type_o = mat(lw.wo), int(lw.wo.wtype)
            c.w_gate, c.type_gate = mat(lw.w_gate), int(lw.w_gate.wtype)
            c.w_up, c.type_up = mat(lw.w_up), int(lw.w_up.wtype)
            c.w_down, c.type_down = mat(lw.w_down), int(lw.w_down.wtype)
            c.bq, c.bk, c.bv = vec(lw.bq), vec(lw.bk), vec(lw.bv)
            c.q_norm, c.k_norm = vec(lw.q_norm), vec(lw.k_norm)
            c.post_attn_norm, c.post_ffn_norm = vec(lw.post_attn_norm), vec(lw.post_ffn_norm)
        except BaseException:
            for b in bufs:
                b.close()
            raise
        return _DeviceLayer(bufs, c, sum(b.nbytes for b in bufs))

    def device_bytes(self) -> int:
        """Bytes of weights this model holds on the device now."""
        return sum(w.nbytes for w in self._weights) + self._pager.resident_bytes()

    def statistics(self) -> dict[str, int]:
        """Layer uploads and evictions so far, blocks and bytes resident on the device."""
        with self._pager._lock:
            resident = len(self._pager._resident)
        return {**self._pager.stats, "resident_layers": resident,
                "device_bytes": self.device_bytes()}  # fmt: skip

    # --- paging hooks (called from C in the thread running the step) ---------------------

    def _on_acquire(self, _ctx: Any, layer: int, out: Any) -> int:
        try:
            out[0] = self._pager.acquire(int(layer)).c[0]
            return 0
        except BaseException as e:  # never raise into C: record and stop the step
            self._hook_error = e
            return -1

    def _on_release(self, _ctx: Any, layer: int, _out: Any) -> int:
        self._pager.release(int(layer))  # the device has finished with it (realm_cuda.h)
        return 0

    # --- KV caches -----------------------------------------------------------------------

    def new_kv(self, capacity: int) -> DeviceKV:
        """A zeroed device KV cache of ``capacity`` positions (0: an empty placeholder).

        Raises MemoryError when the device has no room for it."""
        capacity = _int_arg("cuda", "capacity", capacity, 0, 2**31 - 1)
        return DeviceKV(self.device, self.spec.kv_shape(capacity), self.spec.kv_dtype, zero=True)

    def copy_kv(self, dst: DeviceKV, src: DeviceKV, n: int) -> None:
        """Copy the first ``n`` positions of every layer's K and V from ``src`` to ``dst``."""
        if n <= 0:
            return
        if n > src.shape[2] or n > dst.shape[2]:
            raise KernelError(f"copy_kv: {n} positions exceed a cache", kernel="cuda")
        _ffi, lib = _library()
        row = self.spec.kv_dim * np.dtype(self.spec.kv_dtype).itemsize
        self.device.activate()
        _check("copy_kv", lib.realm_cuda_copy_2d(dst.ptr, dst.shape[2] * row, src.ptr,
                                                 src.shape[2] * row, n * row,
                                                 2 * self.spec.n_layers))  # fmt: skip

    # --- the step ------------------------------------------------------------------------

    def forward(self, steps: Sequence[SeqStep]) -> None:
        """Run one step for every sequence in ``steps`` on the device, in one native call.
        Each step's ``kv`` is a ``DeviceKV`` of this model's shape; tokens, logits and
        embeddings are host arrays, as for the CPU."""
        s = self.spec
        k = "forward"
        if self._closed:
            raise KernelError("the model was closed", kernel=k)
        if not steps:
            raise KernelError("steps must not be empty", kernel=k)
        ffi, lib = _library()
        c_seqs = ffi.new("realm_seq[]", len(steps))
        keep: list[Any] = []
        seen: set[int] = set()
        for i, st in enumerate(steps):
            if not isinstance(st, SeqStep):
                raise KernelError(f"steps[{i}] must be a SeqStep", kernel=k)
            tokens = _array(k, f"steps[{i}].tokens", st.tokens, np.int32, ndim=(1,))
            bad = (tokens < 0) | (tokens >= s.n_vocab)
            if bad.any():
                raise KernelError(f"steps[{i}].tokens: id {int(tokens[bad][0])} out of range "
                                  f"[0, {s.n_vocab})", kernel=k)  # fmt: skip
            kv = st.kv
            if not isinstance(kv, DeviceKV) or kv.device.index != self.device.index:
                raise KernelError(f"steps[{i}].kv must be a DeviceKV of this model's device "
                                  "(CudaTransformer.new_kv)", kernel=k)  # fmt: skip
            if (
                kv.shape[:2] != (s.n_layers, 2)
                or kv.shape[3] != s.kv_dim
                or (kv.dtype != np.dtype(s.kv_dtype))
            ):
                raise KernelError(f"steps[{i}].kv has shape {kv.shape} {kv.dtype}, expected "
                                  f"{s.kv_shape(kv.shape[2])}", kernel=k)  # fmt: skip
            if id(kv) in seen:
                raise KernelError(f"steps[{i}].kv is shared with another sequence", kernel=k)
            seen.add(id(kv))
            capacity = int(kv.shape[2])
            pos = _int_arg(k, f"steps[{i}].pos", st.pos, 0, capacity)
            if pos + tokens.shape[0] > capacity:
                raise KernelError(f"steps[{i}]: {tokens.shape[0]} tokens at position {pos} "
                                  f"exceed the cache's {capacity} positions", kernel=k)  # fmt: skip
            c = c_seqs[i]
            n_logits = 0
            if st.logits is not None:
                lg = _array(k, f"steps[{i}].logits", st.logits, np.float32, ndim=(2,),
                            writable=True)  # fmt: skip
                n_logits = int(lg.shape[0])
                if lg.shape[1] != s.n_vocab or n_logits > tokens.shape[0]:
                    raise KernelError(f"steps[{i}].logits must be (n <= {tokens.shape[0]}, "
                                      f"{s.n_vocab}), got {lg.shape}", kernel=k)  # fmt: skip
                c.logits = ffi.cast("float *", ffi.from_buffer(lg))
                keep.append(lg)
            if st.embedding is not None:
                emb = _array(k, f"steps[{i}].embedding", st.embedding, np.float32, ndim=(1,),
                             writable=True)  # fmt: skip
                if emb.shape[0] != s.n_embd:
                    raise KernelError(f"steps[{i}].embedding must have {s.n_embd} elements",
                                      kernel=k)  # fmt: skip
                c.embedding = ffi.cast("float *", ffi.from_buffer(emb))
                keep.append(emb)
            if getattr(st, "adapter", None) is not None:
                raise NotImplementedError(
                    f"steps[{i}]: LoRA adapters are not supported on CUDA yet (run adapted "
                    "sessions on a model loaded with device='cpu')"
                )
            c.exact = 1 if getattr(st, "exact", False) else 0
            c.tokens = ffi.cast("int32_t *", ffi.from_buffer(tokens, require_writable=False))
            c.n_tokens, c.pos, c.n_logits = int(tokens.shape[0]), pos, n_logits
            c.kv, c.capacity = kv.ptr, capacity
            keep += [tokens, kv]
        self.device.activate()
        if self._paged:
            with self._lock:  # the paging hooks change the resident set: one step at a time
                self._hook_error = None
                status = lib.realm_cuda_forward(self._model, c_seqs, len(steps))
                err, self._hook_error = self._hook_error, None
            if err is not None:
                if isinstance(err, MemoryError):
                    raise err
                raise KernelError(f"layer paging failed: {err!r}", kernel=k) from err
        else:
            status = lib.realm_cuda_forward(self._model, c_seqs, len(steps))
        _check(k, status)

    def close(self) -> None:
        """Free the model's device memory (its sessions' caches are their own)."""
        self._closed = True
        self._pager.close()
        for w in self._weights:
            w.close()
        self._weights.clear()
