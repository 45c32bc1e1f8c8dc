"""A llama-family transformer step as one native call (``realm_forward``).

This module describes the compute graph's weights and dimensions to C; it knows nothing of
GGUF files, tokenizers or tenants (``realm.model`` builds it from a model file). Like
``_ops``, it checks every array before a pointer reaches C, and keeps the arrays alive for as
long as the native structures point at them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import attrs
import numpy as np

from .._errors import KernelError
from ._native import ffi, lib
from ._ops import (
    PACKABLE,
    Packed,
    _array,
    _check,
    _int_arg,
    _row_elems,
    _weight_type,
    dequantize,
    pack,
    pack_preferred,
)
from ._types import Activation, RopeMode, WeightType

_K = "forward"


@attrs.frozen
class Matrix:
    """A weight matrix ``(n_out, n_in)``: typed float rows or raw GGML blocks (uint8)."""

    data: np.ndarray
    wtype: WeightType

    @classmethod
    def of(cls, data: np.ndarray, wtype: WeightType | int | None = None) -> Matrix:
        data = _array(_K, "matrix", data, (np.float32, np.float16, np.uint16, np.uint8), ndim=(2,))
        return cls(data, _weight_type(_K, data, wtype))

    @property
    def n_out(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_in(self) -> int:
        return _row_elems(_K, self.data, self.wtype)


@attrs.frozen
class LayerWeights:
    """One transformer block's weights (biases only for architectures that have them)."""

    attn_norm: np.ndarray
    wq: Matrix
    wk: Matrix
    wv: Matrix
    wo: Matrix
    ffn_norm: np.ndarray
    w_gate: Matrix
    w_up: Matrix
    w_down: Matrix
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    q_norm: np.ndarray | None = None  # (head_dim,): per-head RMSNorm before RoPE (qwen3, gemma3)
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None  # (n_embd,): norms of the block outputs (gemma2/3)
    post_ffn_norm: np.ndarray | None = None


@attrs.frozen
class TransformerSpec:
    """Dimensions and constants of the graph."""

    n_layers: int
    n_embd: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_rot: int
    rope_mode: RopeMode = RopeMode.NORMAL
    rope_base: float = 10000.0
    rope_scale: float = 1.0
    rms_eps: float = 1e-5
    kv_dtype: type = np.float16
    act: Activation = Activation.SILU
    embd_scale: float = 1.0  # embeddings are multiplied by it (gemma: sqrt(n_embd))
    attn_scale: float | None = None  # attention score scale; None: 1/sqrt(head_dim)
    attn_softcap: float = 0.0  # cap * tanh(score / cap); 0: none (gemma2)
    final_softcap: float = 0.0  # the same on the logits
    #: per layer: sliding window in positions (0: every position); None: no layer windowed
    window: tuple[int, ...] | None = None
    #: per layer: RoPE base and scale; None: rope_base / rope_scale for every layer
    layer_rope_base: tuple[float, ...] | None = None
    layer_rope_scale: tuple[float, ...] | None = None
    #: (n_rot / 2,) divisors of each pair's angle (llama 3's rope_freqs); None: none
    rope_freqs: np.ndarray | None = attrs.field(default=None, eq=False)

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def kv_shape(self, capacity: int) -> tuple[int, int, int, int]:
        """Shape of one sequence's KV cache: (layers, K/V, positions, kv heads x head_dim)."""
        return (self.n_layers, 2, capacity, self.kv_dim)


@attrs.define(eq=False)
class SeqStep:
    """One sequence's share of a step: append ``tokens`` at ``pos`` to the cache ``kv``.

    ``logits`` (float32, ``(n, n_vocab)``) receives the logits of the last ``n`` tokens; None
    for none. ``embedding`` (float32, ``(n_embd,)``) receives the mean over this step's tokens
    of the final normalised hidden state (the input of the output projection).
    """

    tokens: np.ndarray
    pos: int
    kv: np.ndarray
    logits: np.ndarray | None = None
    embedding: np.ndarray | None = None  # (n_embd,) float32: mean final hidden state
    adapter: NativeAdapter | None = None  # LoRA adapter of this sequence (None: base model)
    exact: bool = False  # logits independent of the rest of the batch (the whole step pays)


#: the projections of a block that may carry a LoRA pair, in ``realm_lora`` order
LORA_ROLES: Final = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
_LORA_TYPES = (WeightType.F32, WeightType.F16, WeightType.Q8_0)


@attrs.frozen
class LoraPair:
    """One weight's adapter: ``y += scale * b (a x)``; a ``(rank, n_in)``, b ``(n_out, rank)``."""

    a: Matrix
    b: Matrix
    scale: float

    @property
    def rank(self) -> int:
        return self.a.n_out

    @property
    def nbytes(self) -> int:
        return int(self.a.data.nbytes + self.b.data.nbytes)


class NativeAdapter:
    """A LoRA adapter in native form (``realm_adapter``): a sequence of a step that names it
    (``SeqStep.adapter``) gets each pair's delta added to its own rows only.

    ``layers[i]`` maps roles of ``LORA_ROLES`` to their pairs (missing roles: none);
    ``output`` is the output projection's pair, or None. Read-only once built.
    """

    def __init__(
        self,
        spec: TransformerSpec,
        layers: Sequence[Mapping[str, LoraPair]],
        output: LoraPair | None = None,
    ) -> None:
        self.spec = spec
        s = spec
        if len(layers) != s.n_layers:
            raise KernelError(f"{len(layers)} adapter layers for n_layers {s.n_layers}", kernel=_K)
        qd, kvd = s.n_heads * s.head_dim, s.kv_dim
        dims = {
            "wq": (qd, s.n_embd), "wk": (kvd, s.n_embd), "wv": (kvd, s.n_embd),
            "wo": (s.n_embd, qd), "w_gate": (s.n_ff, s.n_embd), "w_up": (s.n_ff, s.n_embd),
            "w_down": (s.n_embd, s.n_ff),
        }  # fmt: skip
        self._keep: list[Any] = []
        self._c_layers = ffi.new("realm_lora[]", s.n_layers * len(LORA_ROLES))
        self.nbytes = 0
        for i, pairs in enumerate(layers):
            for role in pairs:
                if role not in dims:
                    raise KernelError(
                        f"adapter layer {i}: {role!r} is not one of {', '.join(LORA_ROLES)}",
                        kernel=_K,
                    )
            for j, role in enumerate(LORA_ROLES):
                pair = pairs.get(role)
                if pair is not None:
                    self._fill(self._c_layers[i * len(LORA_ROLES) + j], pair,
                               f"layers[{i}].{role}", *dims[role])  # fmt: skip
        c = ffi.new("realm_adapter *")
        c.n_layers, c.layers = s.n_layers, self._c_layers
        if output is not None:
            self._fill(c.output, output, "output", s.n_vocab, s.n_embd)
        self._c = c

    def _fill(self, c: Any, pair: LoraPair, name: str, n_out: int, n_in: int) -> None:
        if not isinstance(pair, LoraPair):
            raise KernelError(f"adapter {name} must be a LoraPair", kernel=_K)
        for part, m in (("a", pair.a), ("b", pair.b)):
            if not isinstance(m, Matrix) or m.wtype not in _LORA_TYPES:
                raise KernelError(f"adapter {name}.{part} must be an F32, F16 or Q8_0 Matrix",
                                  kernel=_K)  # fmt: skip
        rank = pair.a.n_out
        if pair.a.n_in != n_in or (pair.b.n_out, pair.b.n_in) != (n_out, rank):
            raise KernelError(
                f"adapter {name}: a is ({pair.a.n_out}, {pair.a.n_in}) and b "
                f"({pair.b.n_out}, {pair.b.n_in}); expected (rank, {n_in}) and ({n_out}, rank)",
                kernel=_K,
            )
        if not (isinstance(pair.scale, int | float) and np.isfinite(pair.scale)):
            raise KernelError(f"adapter {name}: scale must be finite, got {pair.scale!r}",
                              kernel=_K)  # fmt: skip
        # B is kept transposed, (rank, n_out), so the kernel runs along output columns:
        # F16 stays F16, anything else becomes F32 (a copy: a rank x n_out array)
        if pair.b.wtype == WeightType.F16:
            bt = np.ascontiguousarray(pair.b.data.T)
        elif pair.b.wtype == WeightType.F32:
            bt = np.ascontiguousarray(pair.b.data.T, dtype=np.float32)
        else:
            bt = np.ascontiguousarray(dequantize(pair.b.data, pair.b.wtype).T)
        pa = ffi.from_buffer(pair.a.data, require_writable=False)
        pb = ffi.from_buffer(bt, require_writable=False)
        self._keep += [pa, pb, bt]
        c.a, c.type_a = pa, int(pair.a.wtype)
        c.b = pb
        c.type_b = int(WeightType.F16 if pair.b.wtype == WeightType.F16 else WeightType.F32)
        c.rank, c.scale = rank, float(pair.scale)
        self.nbytes += int(pair.a.data.nbytes + bt.nbytes)


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# Acquire a layer's resident weights for the duration of its use, then release them.
LayerAcquire = Callable[[int], LayerWeights]
LayerRelease = Callable[[int], None]


class NativeTransformer:
    """The native description of one model; ``forward`` runs a whole step in C.

    Either ``layers`` (all resident) or ``acquire``/``release`` (a layer pager) give the
    blocks' weights. Thread-safe: the description is read-only; each step's state is in its
    sequences' caches.

    ``pack``: resident Q8_0 / Q4_0 matrices (the blocks' and the output's) are copied once into
    interleaved panels (:func:`pack`, docs/kernels.md "Interleaved weight panels"), which the
    products read without repacking, the same bytes per token; None (default) packs where the
    active ISA level has a kernel for them (``pack_preferred``). Paged blocks stay as mapped.
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
        pack: bool | None = None,
    ) -> None:
        self.spec = spec
        s = spec
        self.packed = bool(pack_preferred() if pack is None else pack) and layers is not None
        self._packs: dict[int, Packed] = {}  # id(matrix data) -> its packed copy
        self.packed_sources: list[np.ndarray] = []  # the arrays packed (their memory is unread)
        for name in ("n_layers", "n_embd", "n_heads", "n_kv_heads", "head_dim", "n_ff", "n_vocab"):
            _int_arg(_K, name, getattr(s, name), 1, 2**31 - 1)
        if s.n_heads % s.n_kv_heads:
            raise KernelError(
                f"n_kv_heads {s.n_kv_heads} must divide n_heads {s.n_heads}", kernel=_K
            )
        if s.head_dim > 256 or s.head_dim % 2 or not (0 < s.n_rot <= s.head_dim) or s.n_rot % 2:
            raise KernelError(
                f"head_dim {s.head_dim} (<= 256, even) / n_rot {s.n_rot} (even, <= head_dim)",
                kernel=_K,
            )
        if np.dtype(s.kv_dtype) not in (np.dtype(np.float16), np.dtype(np.float32)):
            raise KernelError(f"kv_dtype must be float16 or float32, got {s.kv_dtype}", kernel=_K)
        if (layers is None) == (acquire is None):
            raise KernelError("give either layers or a pager's acquire, not both", kernel=_K)
        self._check_matrix("tok_embd", tok_embd, s.n_vocab, s.n_embd)
        self._check_matrix("output", output, s.n_vocab, s.n_embd)
        self._output_norm = self._vector("output_norm", output_norm, s.n_embd)
        self._tok_embd, self._output = tok_embd, output
        self._keep: list[Any] = []  # cdata pointing into arrays must not outlive them
        self._layers = list(layers) if layers is not None else None
        self._c_layers = None
        if self._layers is not None:
            if len(self._layers) != s.n_layers:
                raise KernelError(
                    f"{len(self._layers)} layers for n_layers {s.n_layers}", kernel=_K
                )
            self._c_layers = ffi.new("realm_layer[]", s.n_layers)
            for i, lw in enumerate(self._layers):
                self._fill_layer(self._c_layers[i], lw, i)
        self._acquire, self._release = acquire, release
        self._hook_error: BaseException | None = None
        self._step_keep: list[Any] = []
        # unpaged steps share nothing mutable and may run concurrently; paged ones take turns
        self._lock: Any = threading.Lock() if acquire is not None else _NoLock()
        m = ffi.new("realm_model *")
        m.n_layers, m.n_embd, m.n_heads, m.n_kv_heads = (
            s.n_layers,
            s.n_embd,
            s.n_heads,
            s.n_kv_heads,
        )
        m.head_dim, m.n_ff, m.n_vocab, m.n_rot = s.head_dim, s.n_ff, s.n_vocab, s.n_rot
        m.rope_mode, m.rope_base, m.rope_scale = int(s.rope_mode), s.rope_base, s.rope_scale
        m.rms_eps = s.rms_eps
        m.tok_embd, m.type_embd = self._ptr(tok_embd.data), int(tok_embd.wtype)
        m.output_norm = ffi.cast("float *", self._ptr(self._output_norm))
        m.output, m.type_output = self._weight(output, self._keep)
        m.layers = self._c_layers if self._c_layers is not None else ffi.NULL
        m.kv_type = int(WeightType.F16 if np.dtype(s.kv_dtype) == np.float16 else WeightType.F32)
        self._fill_variant(m)
        if acquire is not None:
            self._cb_acquire = ffi.callback("int(void *, int32_t, realm_layer *)", self._on_acquire)
            self._cb_release = ffi.callback("int(void *, int32_t, realm_layer *)", self._on_release)
            m.acquire, m.release = self._cb_acquire, self._cb_release
        self._model = m

    def _fill_variant(self, m: Any) -> None:
        """The architecture's optional parts (activation, scales, windows, RoPE per layer)."""
        s = self.spec
        try:
            m.act = int(Activation(s.act))
        except ValueError:
            raise KernelError(f"act {s.act!r} is not an Activation", kernel=_K) from None
        for name in ("embd_scale", "attn_softcap", "final_softcap"):
            v = getattr(s, name)
            if not (isinstance(v, int | float) and np.isfinite(v) and v >= 0):
                raise KernelError(f"{name} must be a finite number >= 0, got {v!r}", kernel=_K)
        m.embd_scale, m.attn_softcap = s.embd_scale, s.attn_softcap
        m.final_softcap = s.final_softcap
        if s.attn_scale is not None and not (np.isfinite(s.attn_scale) and s.attn_scale > 0):
            raise KernelError(f"attn_scale must be > 0, got {s.attn_scale!r}", kernel=_K)
        m.attn_scale = 0.0 if s.attn_scale is None else s.attn_scale

        def per_layer(name: str, values: Any, dtype: Any, ctype: str) -> Any:
            if values is None:
                return ffi.NULL
            a = np.ascontiguousarray(values, dtype=dtype)
            if a.shape != (s.n_layers,) or not np.all(np.isfinite(a)):
                raise KernelError(f"{name} must have {s.n_layers} finite entries", kernel=_K)
            if (a < 0).any() or (ctype == "float *" and (a <= 0).any()):
                raise KernelError(f"{name} has an out-of-range entry", kernel=_K)
            return ffi.cast(ctype, self._ptr(a))

        m.window = per_layer("window", s.window, np.int32, "int32_t *")
        m.layer_rope_base = per_layer("layer_rope_base", s.layer_rope_base, np.float32, "float *")
        m.layer_rope_scale = per_layer("layer_rope_scale", s.layer_rope_scale, np.float32,
                                       "float *")  # fmt: skip
        m.rope_freqs = ffi.NULL
        if s.rope_freqs is not None:
            f = self._vector("rope_freqs", s.rope_freqs, s.n_rot // 2)
            if not (np.all(np.isfinite(f)) and (f > 0).all()):
                raise KernelError("rope_freqs must be finite and > 0", kernel=_K)
            m.rope_freqs = ffi.cast("float *", self._ptr(f))

    # --- checks and native views ---------------------------------------------------------

    def _ptr(self, a: np.ndarray) -> Any:
        p = ffi.from_buffer(a, require_writable=False)
        self._keep.append(p)
        return p

    @staticmethod
    def _check_matrix(name: str, m: Matrix, n_out: int, n_in: int) -> None:
        if not isinstance(m, Matrix):
            raise KernelError(f"{name} must be a Matrix, got {type(m).__name__}", kernel=_K)
        if (m.n_out, m.n_in) != (n_out, n_in):
            raise KernelError(
                f"{name} is ({m.n_out}, {m.n_in}), expected ({n_out}, {n_in})", kernel=_K
            )

    @staticmethod
    def _vector(name: str, v: Any, n: int) -> np.ndarray:
        v = _array(_K, name, v, np.float32, ndim=(1,))
        if v.shape[0] != n:
            raise KernelError(f"{name} has {v.shape[0]} elements, expected {n}", kernel=_K)
        return v

    def check_layer(self, lw: LayerWeights, i: int) -> None:
        """Raise KernelError if ``lw`` does not fit layer ``i`` of this graph."""
        s = self.spec
        qd, kvd = s.n_heads * s.head_dim, s.kv_dim
        self._vector(f"layers[{i}].attn_norm", lw.attn_norm, s.n_embd)
        self._vector(f"layers[{i}].ffn_norm", lw.ffn_norm, s.n_embd)
        for name, m, shape in (
            ("wq", lw.wq, (qd, s.n_embd)),
            ("wk", lw.wk, (kvd, s.n_embd)),
            ("wv", lw.wv, (kvd, s.n_embd)),
            ("wo", lw.wo, (s.n_embd, qd)),
            ("w_gate", lw.w_gate, (s.n_ff, s.n_embd)),
            ("w_up", lw.w_up, (s.n_ff, s.n_embd)),
            ("w_down", lw.w_down, (s.n_embd, s.n_ff)),
        ):
            self._check_matrix(f"layers[{i}].{name}", m, *shape)
        for name, b, n in (
            ("bq", lw.bq, qd), ("bk", lw.bk, kvd), ("bv", lw.bv, kvd),
            ("q_norm", lw.q_norm, s.head_dim), ("k_norm", lw.k_norm, s.head_dim),
            ("post_attn_norm", lw.post_attn_norm, s.n_embd),
            ("post_ffn_norm", lw.post_ffn_norm, s.n_embd),
        ):  # fmt: skip
            if b is not None:
                self._vector(f"layers[{i}].{name}", b, n)

    def _fill_layer(self, c: Any, lw: LayerWeights, i: int, keep: list[Any] | None = None) -> None:
        self.check_layer(lw, i)
        keep = self._keep if keep is None else keep

        def ptr(a: np.ndarray) -> Any:
            p = ffi.from_buffer(a, require_writable=False)
            keep.append(p)
            return p

        def fptr(a: np.ndarray | None) -> Any:
            return ffi.NULL if a is None else ffi.cast("float *", ptr(a))

        c.attn_norm, c.ffn_norm = fptr(lw.attn_norm), fptr(lw.ffn_norm)
        c.wq, c.type_q = self._weight(lw.wq, keep)
        c.wk, c.type_k = self._weight(lw.wk, keep)
        c.wv, c.type_v = self._weight(lw.wv, keep)
        c.wo, c.type_o = self._weight(lw.wo, keep)
        c.w_gate, c.type_gate = self._weight(lw.w_gate, keep)
        c.w_up, c.type_up = self._weight(lw.w_up, keep)
        c.w_down, c.type_down = self._weight(lw.w_down, keep)
        c.bq, c.bk, c.bv = fptr(lw.bq), fptr(lw.bk), fptr(lw.bv)
        c.q_norm, c.k_norm = fptr(lw.q_norm), fptr(lw.k_norm)
        c.post_attn_norm, c.post_ffn_norm = fptr(lw.post_attn_norm), fptr(lw.post_ffn_norm)

    def _weight(self, m: Matrix, keep: list[Any]) -> tuple[Any, int]:
        """The native pointer and type code of a matrix: its packed copy where this
        description packs (made once per array, also when two roles share it)."""
        data, code = m.data, int(m.wtype)
        if self.packed and m.wtype in PACKABLE:
            p = self._packs.get(id(m.data))
            if p is None:
                p = self._packs[id(m.data)] = pack(m.data, m.wtype)
                keep.append(m.data)  # the id stays unique while the copy is kept
                self.packed_sources.append(m.data)
            data, code = p.data, code | int(lib.REALM_PACKED)
        ptr = ffi.from_buffer(data, require_writable=False)
        keep.append(ptr)
        return ptr, code

    # --- paging hooks (called from C, in the thread running the step) ------------------------

    def _on_acquire(self, _ctx: Any, layer: int, out: Any) -> int:
        try:
            assert self._acquire is not None
            lw = self._acquire(int(layer))
            keep: list[Any] = []
            self._fill_layer(out, lw, int(layer), keep)
            self._step_keep.append(keep)
            return 0
        except BaseException as e:  # never raise into C: record and stop the step
            self._hook_error = e
            return int(lib.REALM_EINVAL)

    def _on_release(self, _ctx: Any, layer: int, _out: Any) -> int:
        try:
            if self._release is not None:
                self._release(int(layer))
            return 0
        except BaseException as e:
            self._hook_error = e
            return int(lib.REALM_EINVAL)

    # --- the step --------------------------------------------------------------------------

    def new_kv(self, capacity: int) -> np.ndarray:
        """A zeroed KV cache for one sequence of up to ``capacity`` positions."""
        capacity = _int_arg(_K, "capacity", capacity, 1, 2**31 - 1)
        return np.zeros(self.spec.kv_shape(capacity), dtype=self.spec.kv_dtype)

    def forward(self, steps: Sequence[SeqStep]) -> None:
        """Run one step for every sequence in ``steps`` (one native call for all of them)."""
        s = self.spec
        if not steps:
            raise KernelError("steps must not be empty", kernel=_K)
        c_seqs = ffi.new("realm_seq[]", len(steps))
        keep: list[Any] = []
        kv_seen: list[np.ndarray] = []
        for i, st in enumerate(steps):
            if not isinstance(st, SeqStep):
                raise KernelError(f"steps[{i}] must be a SeqStep", kernel=_K)
            tokens = _array(_K, f"steps[{i}].tokens", st.tokens, np.int32, ndim=(1,))
            bad = (tokens < 0) | (tokens >= s.n_vocab)
            if bad.any():
                raise KernelError(
                    f"steps[{i}].tokens: id {int(tokens[bad][0])} out of range [0, {s.n_vocab})",
                    kernel=_K,
                )
            kv = _array(_K, f"steps[{i}].kv", st.kv, s.kv_dtype, ndim=(4,), writable=True)
            if kv.shape[:2] != (s.n_layers, 2) or kv.shape[3] != s.kv_dim:
                raise KernelError(
                    f"steps[{i}].kv has shape {kv.shape}, expected {s.kv_shape(kv.shape[2])}",
                    kernel=_K,
                )
            if any(np.may_share_memory(kv, k) for k in kv_seen):
                raise KernelError(f"steps[{i}].kv is shared with another sequence", kernel=_K)
            kv_seen.append(kv)
            capacity = int(kv.shape[2])
            pos = _int_arg(_K, f"steps[{i}].pos", st.pos, 0, capacity)
            if pos + tokens.shape[0] > capacity:
                raise KernelError(
                    f"steps[{i}]: {tokens.shape[0]} tokens at position {pos} exceed the cache's "
                    f"{capacity} positions",
                    kernel=_K,
                )
            n_logits = 0
            if st.logits is not None:
                lg = _array(
                    _K, f"steps[{i}].logits", st.logits, np.float32, ndim=(2,), writable=True
                )
                n_logits = int(lg.shape[0])
                if lg.shape[1] != s.n_vocab or n_logits > tokens.shape[0]:
                    raise KernelError(
                        f"steps[{i}].logits must be (n <= {tokens.shape[0]}, {s.n_vocab}), "
                        f"got {lg.shape}",
                        kernel=_K,
                    )
                c_seqs[i].logits = ffi.cast("float *", ffi.from_buffer(lg))
                keep.append(lg)
            c = c_seqs[i]
            if st.embedding is not None:
                emb = _array(_K, f"steps[{i}].embedding", st.embedding, np.float32, ndim=(1,),
                             writable=True)  # fmt: skip
                if emb.shape[0] != s.n_embd:
                    raise KernelError(
                        f"steps[{i}].embedding must have {s.n_embd} elements, got {emb.shape[0]}",
                        kernel=_K,
                    )
                c.embedding = ffi.cast("float *", ffi.from_buffer(emb))
                keep.append(emb)
            c.tokens = ffi.cast("int32_t *", ffi.from_buffer(tokens, require_writable=False))
            c.n_tokens, c.pos, c.n_logits = int(tokens.shape[0]), pos, n_logits
            c.kv, c.capacity = ffi.from_buffer(kv), capacity
            if st.adapter is not None:
                if not isinstance(st.adapter, NativeAdapter) or st.adapter.spec != s:
                    raise KernelError(f"steps[{i}].adapter is not an adapter of this model",
                                      kernel=_K)  # fmt: skip
                c.adapter = st.adapter._c
            c.exact = 1 if st.exact else 0
            keep += [tokens, kv]
        with self._lock:  # the paging hooks keep per-step state on self
            self._hook_error = None
            self._step_keep = []
            try:
                status = lib.realm_forward(self._model, c_seqs, len(steps))
            finally:
                self._step_keep = []
            err, self._hook_error = self._hook_error, None
        if err is not None:
            raise KernelError(f"layer pager failed: {err!r}", kernel=_K) from err
        _check(_K, status)
