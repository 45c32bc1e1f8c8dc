"""Reading a GGUF model file: hyper-parameters and weight views, checked at load.

The file is memory-mapped by ``open_gguf`` (``gguf.GGUFReader`` with its metadata read in bulk:
a 262k-token vocabulary in a fraction of a second): opening a multi-GB model reads only its
header; tensors are numpy views into the mapping, paged in by the OS as they are used.
Anything Realm cannot run (architecture, tensor type, missing tensor, wrong shape, truncated
file) fails here with a ``ModelError`` naming the file, the tensor and the reason.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Final

import attrs
import gguf
import numpy as np

from .._errors import ModelError
from ..kernels import Activation, Matrix, RopeMode, WeightType
from ._gguf_reader import open_gguf


@attrs.frozen
class ArchTraits:
    """What an architecture adds to the llama graph, as llama.cpp's graph for it does."""

    rope: RopeMode
    biases: bool = False  # attn_{q,k,v}.bias (qwen2)
    qk_norm: bool = False  # attn_{q,k}_norm: per-head RMSNorm before RoPE (qwen3, gemma3)
    post_norms: bool = False  # post_attention_norm, post_ffw_norm (gemma2, gemma3)
    act: Activation = Activation.SILU
    embd_scale: bool = False  # embeddings times sqrt(n_embd) (gemma)
    fused: bool = False  # attn_qkv and a 2 * n_ff ffn_up holding gate then up (phi3)
    #: every swa_pattern-th layer attends to everything, the others to the file's sliding
    #: window (gemma2: 2, gemma3: 6); 1: every layer windowed; 0: the window is ignored
    swa_pattern: int = 1
    #: RoPE base of the windowed layers (gemma3's local layers: 10000, scale 1); None: the file's
    swa_rope_base: float | None = None
    #: layer counts of the sizes whose attention scale is 1/sqrt(n_embd / n_heads), not
    #: 1/sqrt(head_dim) (llama.cpp: gemma2 27B, gemma3 27B)
    scale_by_embd_layers: tuple[int, ...] = ()
    softcaps: bool = False  # attn_logit_softcapping, final_logit_softcapping (gemma2)


ARCHS: Final = {
    "llama": ArchTraits(rope=RopeMode.NORMAL),
    "qwen2": ArchTraits(rope=RopeMode.NEOX, biases=True, swa_pattern=0),
    "qwen3": ArchTraits(rope=RopeMode.NEOX, qk_norm=True, swa_pattern=0),
    # llama.cpp turns phi3's sliding window off (its files do not say which layers use it)
    "phi3": ArchTraits(rope=RopeMode.NEOX, fused=True, swa_pattern=0),
    "gemma2": ArchTraits(
        rope=RopeMode.NEOX, post_norms=True, act=Activation.GELU, embd_scale=True,
        swa_pattern=2, scale_by_embd_layers=(46,), softcaps=True,
    ),
    "gemma3": ArchTraits(
        rope=RopeMode.NEOX, qk_norm=True, post_norms=True, act=Activation.GELU,
        embd_scale=True, swa_pattern=6, swa_rope_base=10000.0, scale_by_embd_layers=(62,),
    ),
}  # fmt: skip
SUPPORTED_ARCHS = tuple(ARCHS)
_MATRIX_TYPES = {gguf.GGMLQuantizationType(int(w)): w for w in WeightType}
_FINGERPRINT_BYTES = 1 << 20  # head and tail of the file hashed into the fingerprint


@attrs.frozen
class ModelInfo:
    """What a model is: the names users see in ``model.info`` and ``system_models``."""

    arch: str
    name: str
    n_layers: int
    n_embd: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ff: int
    vocab_size: int
    context_length: int
    file_type: str  # the type of most of the weight bytes, e.g. "Q8_0"
    n_params: int
    n_bytes: int  # bytes of weights
    rope_base: float
    rope_scale: float
    rope_mode: str
    n_rot: int
    rms_eps: float
    path: str
    fingerprint: str  # cheap identity: metadata, tensor table, size, head and tail bytes
    sliding_window: int = 0  # positions a windowed layer attends to (0: none)
    activation: str = "silu"

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class GraphOptions:
    """The architecture's parts of the compute graph (``TransformerSpec``'s optional fields)."""

    act: Activation = Activation.SILU
    embd_scale: float = 1.0
    attn_scale: float | None = None
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    window: tuple[int, ...] | None = None
    layer_rope_base: tuple[float, ...] | None = None
    layer_rope_scale: tuple[float, ...] | None = None
    rope_freqs: np.ndarray | None = attrs.field(default=None, eq=False)

    def as_spec_kwargs(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False)


@attrs.frozen
class ModelFile:
    """An open GGUF model: its reader, info and checked tensors (views into the mapping)."""

    path: Path
    reader: gguf.GGUFReader
    info: ModelInfo
    tensors: dict[str, Any]  # name -> gguf ReaderTensor
    graph: GraphOptions = GraphOptions()

    def matrix(self, name: str, rows: tuple[int, int] | None = None) -> Matrix:
        """A weight matrix, or rows ``[a, b)`` of it (a fused tensor's part: a view)."""
        t = self.tensors[name]
        data = t.data if rows is None else t.data[rows[0] : rows[1]]
        return Matrix.of(data, _MATRIX_TYPES[t.tensor_type])

    def vector(self, name: str) -> np.ndarray:
        """A 1-D tensor as float32 (norm weights and biases are small: converted once)."""
        t = self.tensors[name]
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            return np.ascontiguousarray(t.data, dtype=np.float32).reshape(-1)
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)

    def has(self, name: str) -> bool:
        return name in self.tensors


def _field(reader: gguf.GGUFReader, key: str, default: Any = None, *, path: Path) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise ModelError(f"{path}: metadata key {key!r} is missing")
        return default
    try:
        return f.contents()
    except Exception as e:  # a malformed field
        raise ModelError(f"{path}: metadata key {key!r} cannot be read: {e}") from e


def _positive_int(value: Any, key: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) <= 0:
        raise ModelError(f"{path}: metadata key {key!r} must be a positive integer, got {value!r}")
    return int(value)


def _fingerprint(path: Path, reader: gguf.GGUFReader) -> str:
    h = hashlib.blake2b(digest_size=16)
    size = os.path.getsize(path)
    h.update(str(size).encode())
    for t in reader.tensors:
        h.update(f"{t.name}:{int(t.tensor_type)}:{[int(s) for s in t.shape]}".encode())
    data = reader.data
    h.update(bytes(data[:_FINGERPRINT_BYTES]))
    h.update(bytes(data[max(0, size - _FINGERPRINT_BYTES) :]))
    return h.hexdigest()


def content_hash(path: str | os.PathLike[str]) -> str:
    """Full BLAKE2b hash of the file's bytes (reads the whole file: done on request only)."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _check_matrix_types(path: Path, matrices: list[Any]) -> None:
    """One error naming every unsupported weight type and how many tensors have it."""
    bad: dict[str, int] = {}
    for t in matrices:
        if t.tensor_type not in _MATRIX_TYPES:
            bad[t.tensor_type.name] = bad.get(t.tensor_type.name, 0) + 1
    if bad:
        listed = ", ".join(
            f"{name} ({n} tensor{'s' if n > 1 else ''})" for name, n in sorted(bad.items())
        )
        raise ModelError(
            f"{path}: weight type{'s' if len(bad) > 1 else ''} {listed} not supported "
            f"(supported: {', '.join(w.name for w in WeightType)})"
        )


def layer_tensor_names(i: int, arch: str) -> dict[str, str]:
    """GGUF names of block ``i``'s tensors, keyed by role.

    A fused architecture (phi3) has ``wqkv`` (q, k, v rows stacked) instead of ``wq``, ``wk``,
    ``wv``, and ``w_up`` holds the gate's rows, then the up projection's, with no ``w_gate``.
    """
    traits = ARCHS[arch]
    b = f"blk.{i}"
    names = {"attn_norm": f"{b}.attn_norm.weight"}
    if traits.fused:
        names["wqkv"] = f"{b}.attn_qkv.weight"
    else:
        names |= {"wq": f"{b}.attn_q.weight", "wk": f"{b}.attn_k.weight",
                  "wv": f"{b}.attn_v.weight"}  # fmt: skip
    names |= {
        "wo": f"{b}.attn_output.weight",
        "ffn_norm": f"{b}.ffn_norm.weight",
        "w_up": f"{b}.ffn_up.weight",
        "w_down": f"{b}.ffn_down.weight",
    }
    if not traits.fused:
        names["w_gate"] = f"{b}.ffn_gate.weight"
    if traits.biases:
        names |= {"bq": f"{b}.attn_q.bias", "bk": f"{b}.attn_k.bias", "bv": f"{b}.attn_v.bias"}
    if traits.qk_norm:
        names |= {"q_norm": f"{b}.attn_q_norm.weight", "k_norm": f"{b}.attn_k_norm.weight"}
    if traits.post_norms:
        names |= {
            "post_attn_norm": f"{b}.post_attention_norm.weight",
            "post_ffn_norm": f"{b}.post_ffw_norm.weight",
        }
    return names


def _positive_float(value: Any, key: str, path: Path) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = float("nan")
    if isinstance(value, bool) or not (np.isfinite(f) and f > 0):
        raise ModelError(f"{path}: metadata key {key!r} must be a positive number, got {value!r}")
    return f


def _graph_options(
    p: Path, arch: str, key: Any, *, n_layers: int, n_embd: int, n_heads: int,
    head_dim: int, rope_base: float, rope_scale: float, rope_freqs: np.ndarray | None,
) -> tuple[GraphOptions, int]:  # fmt: skip
    """The architecture's graph options and its sliding window (0: none) from the metadata."""
    t = ARCHS[arch]
    window = 0
    if t.swa_pattern:
        w = key("attention.sliding_window", 0)
        if w:
            window = _positive_int(w, f"{arch}.attention.sliding_window", p)
    windows = layer_base = layer_scale = None
    if window:
        # llama.cpp's set_swa_pattern: layer l is windowed unless l % n == n - 1
        swa = [t.swa_pattern == 1 or i % t.swa_pattern < t.swa_pattern - 1 for i in range(n_layers)]
        windows = tuple(window if w else 0 for w in swa)
        if t.swa_rope_base is not None:
            layer_base = tuple(t.swa_rope_base if w else rope_base for w in swa)
            layer_scale = tuple(1.0 if w else rope_scale for w in swa)
    attn_scale = None
    scale_key = key("attention.scale", 0)
    if scale_key:
        attn_scale = _positive_float(scale_key, f"{arch}.attention.scale", p)
    elif n_layers in t.scale_by_embd_layers:
        attn_scale = float((n_embd / n_heads) ** -0.5)
    attn_cap = final_cap = 0.0
    if t.softcaps:
        a, f = key("attn_logit_softcapping", 0), key("final_logit_softcapping", 0)
        attn_cap = _positive_float(a, f"{arch}.attn_logit_softcapping", p) if a else 0.0
        final_cap = _positive_float(f, f"{arch}.final_logit_softcapping", p) if f else 0.0
    opts = GraphOptions(
        act=t.act,
        embd_scale=float(np.float32(np.sqrt(n_embd))) if t.embd_scale else 1.0,
        attn_scale=attn_scale, attn_softcap=attn_cap, final_softcap=final_cap,
        window=windows, layer_rope_base=layer_base, layer_rope_scale=layer_scale,
        rope_freqs=rope_freqs,
    )  # fmt: skip
    return opts, window


def open_model_file(path: str | os.PathLike[str]) -> ModelFile:
    """Open and check a GGUF model file; raises ModelError naming what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such model file")
    try:
        reader = open_gguf(p)
    except Exception as e:  # truncated, not GGUF, bad header: the reader's own words
        raise ModelError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from e

    arch = _field(reader, "general.architecture", path=p)
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(
            f"{p}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    traits = ARCHS[arch]

    def key(k: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{k}", default, path=p)

    n_layers = _positive_int(key("block_count"), f"{arch}.block_count", p)
    n_embd = _positive_int(key("embedding_length"), f"{arch}.embedding_length", p)
    n_ff = _positive_int(key("feed_forward_length"), f"{arch}.feed_forward_length", p)
    n_heads = _positive_int(key("attention.head_count"), f"{arch}.attention.head_count", p)
    n_kv = _positive_int(
        key("attention.head_count_kv", n_heads), f"{arch}.attention.head_count_kv", p
    )
    if n_heads % n_kv:
        raise ModelError(f"{p}: head_count_kv {n_kv} does not divide head_count {n_heads}")
    head_dim = _positive_int(
        key("attention.key_length", n_embd // n_heads), f"{arch}.attention.key_length", p
    )
    n_rot = _positive_int(key("rope.dimension_count", head_dim), f"{arch}.rope.dimension_count", p)
    ctx = _positive_int(key("context_length", 2048), f"{arch}.context_length", p)
    rms_eps = float(key("attention.layer_norm_rms_epsilon", 1e-5))
    rope_base = float(key("rope.freq_base", 10000.0))
    scaling = key("rope.scaling.type", "none")
    rope_scale = 1.0
    if scaling == "linear":
        rope_scale = 1.0 / float(key("rope.scaling.factor", 1.0))
    elif scaling not in ("none", None):
        raise ModelError(f"{p}: RoPE scaling {scaling!r} is not supported (none, linear)")
    if head_dim > 256 or head_dim % 2 or n_rot > head_dim or n_rot % 2:
        raise ModelError(f"{p}: head size {head_dim} / rope dims {n_rot} not supported")

    tensors = {t.name: t for t in reader.tensors}
    for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        if name in tensors:
            raise ModelError(f"{p}: LongRoPE ({name!r}) is not supported")
    vocab = int(tensors["token_embd.weight"].shape[1]) if "token_embd.weight" in tensors else 0
    qd, kvd = n_heads * head_dim, n_kv * head_dim
    expected: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (n_embd, vocab),
        "output_norm.weight": (n_embd,),
    }
    if "output.weight" in tensors:
        expected["output.weight"] = (n_embd, vocab)
    if "rope_freqs.weight" in tensors:  # llama 3's per-pair frequency divisors
        expected["rope_freqs.weight"] = (n_rot // 2,)
    fused = traits.fused
    shapes = {
        "attn_norm": (n_embd,), "ffn_norm": (n_embd,),
        "wq": (n_embd, qd), "wk": (n_embd, kvd), "wv": (n_embd, kvd), "wo": (qd, n_embd),
        "wqkv": (n_embd, qd + 2 * kvd),
        "w_gate": (n_embd, n_ff), "w_up": (n_embd, 2 * n_ff if fused else n_ff),
        "w_down": (n_ff, n_embd),
        "bq": (qd,), "bk": (kvd,), "bv": (kvd,), "q_norm": (head_dim,), "k_norm": (head_dim,),
        "post_attn_norm": (n_embd,), "post_ffn_norm": (n_embd,),
    }  # fmt: skip
    for i in range(n_layers):
        for role, name in layer_tensor_names(i, arch).items():
            expected[name] = shapes[role]
    _check_matrix_types(
        p, [tensors[n] for n, sh in expected.items() if len(sh) == 2 and n in tensors]
    )
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None:
            raise ModelError(f"{p}: tensor {name!r} is missing")
        got = tuple(int(s) for s in t.shape)  # GGML order: (row length, rows)
        if got != shape:
            raise ModelError(f"{p}: tensor {name!r} has shape {got}, expected {shape}")
        if len(shape) == 1 and t.tensor_type not in (
            gguf.GGMLQuantizationType.F32,
            gguf.GGMLQuantizationType.F16,
            gguf.GGMLQuantizationType.BF16,
        ):
            raise ModelError(f"{p}: tensor {name!r} has type {t.tensor_type.name}, want a float")
        if int(t.data.nbytes) != int(t.n_bytes):
            raise ModelError(f"{p}: tensor {name!r} is truncated")

    rope_freqs = None
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        rope_freqs = np.ascontiguousarray(
            gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32
        ).reshape(-1)
        if not (np.all(np.isfinite(rope_freqs)) and (rope_freqs > 0).all()):
            raise ModelError(f"{p}: tensor 'rope_freqs.weight' must be finite and positive")
    graph, window = _graph_options(
        p, arch, key, n_layers=n_layers, n_embd=n_embd, n_heads=n_heads, head_dim=head_dim,
        rope_base=rope_base, rope_scale=rope_scale, rope_freqs=rope_freqs,
    )  # fmt: skip

    by_type: dict[str, int] = {}
    n_params = n_bytes = 0
    for name in expected:
        t = tensors[name]
        n_params += int(t.n_elements)
        n_bytes += int(t.n_bytes)
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    info = ModelInfo(
        arch=arch,
        name=str(_field(reader, "general.name", p.stem, path=p)),
        n_layers=n_layers,
        n_embd=n_embd,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        n_ff=n_ff,
        vocab_size=vocab,
        context_length=ctx,
        file_type=max(by_type, key=by_type.__getitem__),
        n_params=n_params,
        n_bytes=n_bytes,
        rope_base=rope_base,
        rope_scale=rope_scale,
        rope_mode=traits.rope.name.lower(),
        n_rot=n_rot,
        rms_eps=rms_eps,
        path=str(p.resolve()),
        fingerprint=_fingerprint(p, reader),
        sliding_window=window,
        activation=traits.act.name.lower(),
    )
    return ModelFile(path=p, reader=reader, info=info, tensors=tensors, graph=graph)


def rope_mode(info: ModelInfo) -> RopeMode:
    return ARCHS[info.arch].rope
