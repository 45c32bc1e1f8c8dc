"""Reading a GGUF model file: hyper-parameters and weight views, checked at load.

The file is memory-mapped by ``gguf.GGUFReader``: opening a multi-GB model reads only its
header; tensors are numpy views into the mapping, paged in by the OS as they are used.
Anything Realm cannot run (architecture, tensor type, missing tensor, wrong shape, truncated
file) fails here with a ``ModelError`` naming the file, the tensor and the reason.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import attrs
import gguf
import numpy as np

from .._errors import ModelError
from ..kernels import Matrix, RopeMode, WeightType

SUPPORTED_ARCHS = ("llama", "qwen2")
_ROPE_MODE = {"llama": RopeMode.NORMAL, "qwen2": RopeMode.NEOX}
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

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class ModelFile:
    """An open GGUF model: its reader, info and checked tensors (views into the mapping)."""

    path: Path
    reader: gguf.GGUFReader
    info: ModelInfo
    tensors: dict[str, Any]  # name -> gguf ReaderTensor

    def matrix(self, name: str) -> Matrix:
        t = self.tensors[name]
        return Matrix.of(t.data, _MATRIX_TYPES[t.tensor_type])

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
    """GGUF names of block ``i``'s tensors, keyed by role."""
    names = {
        "attn_norm": f"blk.{i}.attn_norm.weight",
        "wq": f"blk.{i}.attn_q.weight",
        "wk": f"blk.{i}.attn_k.weight",
        "wv": f"blk.{i}.attn_v.weight",
        "wo": f"blk.{i}.attn_output.weight",
        "ffn_norm": f"blk.{i}.ffn_norm.weight",
        "w_gate": f"blk.{i}.ffn_gate.weight",
        "w_up": f"blk.{i}.ffn_up.weight",
        "w_down": f"blk.{i}.ffn_down.weight",
    }
    if arch == "qwen2":
        names |= {
            "bq": f"blk.{i}.attn_q.bias",
            "bk": f"blk.{i}.attn_k.bias",
            "bv": f"blk.{i}.attn_v.bias",
        }
    return names


def open_model_file(path: str | os.PathLike[str]) -> ModelFile:
    """Open and check a GGUF model file; raises ModelError naming what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such model file")
    try:
        reader = gguf.GGUFReader(p, "r")
    except Exception as e:  # truncated, not GGUF, bad header: the reader's own words
        raise ModelError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from e

    arch = _field(reader, "general.architecture", path=p)
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(
            f"{p}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )

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
    vocab = int(tensors["token_embd.weight"].shape[1]) if "token_embd.weight" in tensors else 0
    qd, kvd = n_heads * head_dim, n_kv * head_dim
    expected: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (n_embd, vocab),
        "output_norm.weight": (n_embd,),
    }
    if "output.weight" in tensors:
        expected["output.weight"] = (n_embd, vocab)
    shapes = {
        "attn_norm": (n_embd,), "ffn_norm": (n_embd,),
        "wq": (n_embd, qd), "wk": (n_embd, kvd), "wv": (n_embd, kvd), "wo": (qd, n_embd),
        "w_gate": (n_embd, n_ff), "w_up": (n_embd, n_ff), "w_down": (n_ff, n_embd),
        "bq": (qd,), "bk": (kvd,), "bv": (kvd,),
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
        rope_mode=_ROPE_MODE[arch].name.lower(),
        n_rot=n_rot,
        rms_eps=rms_eps,
        path=str(p.resolve()),
        fingerprint=_fingerprint(p, reader),
    )
    return ModelFile(path=p, reader=reader, info=info, tensors=tensors)


def rope_mode(info: ModelInfo) -> RopeMode:
    return _ROPE_MODE[info.arch]
