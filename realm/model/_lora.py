"""LoRA adapters in llama.cpp's GGUF adapter format, applied per sequence at step time.

An adapter file (``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``)
holds, for some weights ``W`` of the base model, a pair ``<name>.lora_a`` / ``<name>.lora_b``.
In numpy's (row-major) view of the file, ``a`` is ``(rank, n_in)`` and ``b`` ``(n_out, rank)``
(GGML's ``ne`` of ``a`` is ``[n_in, rank]``, of ``b`` ``[rank, n_out]``), so the adapted
projection is ``W x + scale * b (a x)`` with ``scale = user_scale * alpha / rank`` (just
``user_scale`` when ``alpha`` is 0), as llama.cpp computes it. The adapter is never merged into
the shared weights: a session that names it (``Session.adapter``) gets the delta on its own
rows of each batched step; other sessions of the same step are untouched (docs/lora.md).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import gguf
import numpy as np

from .._errors import KernelError, ModelError
from ..kernels import LoraPair, Matrix, NativeAdapter, WeightType
from ._gguf import layer_tensor_names
from ._gguf_reader import open_gguf

if TYPE_CHECKING:
    from ._model import Model

#: the tensor types an adapter's pairs may have
ADAPTER_TYPES: Final = {
    gguf.GGMLQuantizationType.F32: WeightType.F32,
    gguf.GGMLQuantizationType.F16: WeightType.F16,
    gguf.GGMLQuantizationType.Q8_0: WeightType.Q8_0,
}
MAX_SCALE: Final = 1e6  # |user scale|; past it the logits are meaningless anyway


def check_scale(scale: Any) -> float:
    """A user scale: a finite number with ``|scale| <= MAX_SCALE`` (ModelError otherwise)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ModelError(f"adapter scale must be a finite number, not {scale!r}")
    if abs(scale) > MAX_SCALE:
        raise ModelError(f"adapter scale {scale!r} is out of range [-{MAX_SCALE:g}, {MAX_SCALE:g}]")
    return float(scale)


class Adapter:
    """A LoRA adapter loaded for one model (use ``load_adapter`` or ``Model.load_adapter``).

    Read-only and shareable: any number of sessions of its model may name it at once. The
    ``lora_a`` tensors are views into the memory-mapped file, the ``lora_b`` ones are kept
    transposed in memory (F16 stays F16, others become F32); ``nbytes`` counts both.
    """

    def __init__(
        self,
        model: Model,
        native: NativeAdapter,
        *,
        path: Path,
        alpha: float,
        scale: float,
        rank: int,
        tensors: tuple[str, ...],
        nbytes: int,
        reader: Any,
    ) -> None:
        self.model = model
        self.native = native
        self.path = path
        self.alpha = alpha
        self.scale = scale  # the user's scale (each pair also carries alpha / rank)
        self.rank = rank  # the largest rank of its pairs
        self.tensors = tensors  # base-model weights it adapts
        self.nbytes = nbytes
        self._reader = reader  # keeps the mapping alive

    def __repr__(self) -> str:
        return (
            f"<Adapter {self.path.name!r} rank={self.rank} alpha={self.alpha:g} "
            f"scale={self.scale:g} tensors={len(self.tensors)} bytes={self.nbytes}>"
        )


def _field(reader: Any, key: str, path: Path) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception as e:  # a malformed field
        raise ModelError(f"{path}: metadata key {key!r} is unreadable ({e})") from e


def _roles(model: Model) -> dict[str, tuple[int, str]]:
    """Base tensor name -> (layer, role) for every weight an adapter may carry a pair for."""
    out: dict[str, tuple[int, str]] = {}
    for i in range(model.info.n_layers):
        for role, name in layer_tensor_names(i, model.info.arch).items():
            if role in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "wqkv"):
                out[name] = (i, role)
    out["output.weight"] = (-1, "output")
    return out


def load_adapter(path: str | os.PathLike[str], model: Model, *, scale: float = 1.0) -> Adapter:
    """Load a LoRA adapter GGUF file for ``model``.

    Args:
        scale: the user's scale (llama.cpp's ``--lora-scaled``); each pair's delta is
            multiplied by ``scale * alpha / rank`` (``scale`` when the file's alpha is 0).

    Raises:
        ModelError naming what is wrong: not an adapter file, another architecture, a tensor
        the model does not have or that cannot carry an adapter, a shape that does not fit,
        an unsupported tensor type.
    """
    scale = check_scale(scale)
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such adapter file")
    try:
        reader = open_gguf(p)
    except Exception as e:
        raise ModelError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    if _field(reader, "general.type", p) != "adapter":
        raise ModelError(f"{p}: not an adapter file (general.type must be 'adapter')")
    kind = _field(reader, "adapter.type", p)
    if kind != "lora":
        raise ModelError(f"{p}: adapter.type is {kind!r}; only 'lora' adapters are supported")
    arch = _field(reader, "general.architecture", p)
    if arch is not None and arch != model.info.arch:
        raise ModelError(f"{p}: an adapter for {arch!r}, but the model is {model.info.arch!r}")
    alpha = _field(reader, "adapter.lora.alpha", p)
    alpha = 0.0 if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ModelError(f"{p}: adapter.lora.alpha must be a finite number, not {alpha!r}")

    parts: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        name = str(t.name)
        for suffix in (".lora_a", ".lora_b"):
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[suffix[-1]] = t
                break
        else:
            raise ModelError(f"{p}: tensor {name!r} is not a .lora_a or .lora_b tensor")
    if not parts:
        raise ModelError(f"{p}: the adapter has no tensors")

    roles = _roles(model)
    s = model.spec
    qd, kvd = s.n_heads * s.head_dim, s.kv_dim
    layers: list[dict[str, LoraPair]] = [{} for _ in range(s.n_layers)]
    output: LoraPair | None = None
    max_rank = 0
    for base, ab in sorted(parts.items()):
        if set(ab) != {"a", "b"}:
            missing = "lora_b" if "a" in ab else "lora_a"
            raise ModelError(f"{p}: {base!r} has no {missing} tensor")
        if base == "token_embd.weight":
            raise ModelError(f"{p}: adapters on token_embd.weight are not supported")
        if base not in roles:
            raise ModelError(
                f"{p}: {base!r} is not a weight of the model an adapter may change (the "
                "attention and feed-forward projections and output.weight)"
            )
        if base == "output.weight" and not model._file.has("output.weight"):
            raise ModelError(f"{p}: the model's output is tied to token_embd (no output.weight)")
        a, b = (_matrix(p, ab[k]) for k in ("a", "b"))
        layer, role = roles[base]
        n_out, n_in = _base_dims(model, role)
        rank = a.n_out
        if a.n_in != n_in or b.n_out != n_out:
            raise ModelError(
                f"{p}: {base}: lora_a is ({a.n_out}, {a.n_in}) and lora_b ({b.n_out}, {b.n_in}) "
                f"(rows, cols); the weight is ({n_out}, {n_in}), so they must be (rank, {n_in}) "
                f"and ({n_out}, rank) (are A and B swapped?)"
            )
        if b.n_in != rank:
            raise ModelError(
                f"{p}: {base}: lora_a has rank {rank} but lora_b {b.n_in} (is lora_a transposed?)"
            )
        pair_scale = scale * alpha / rank if alpha else scale
        max_rank = max(max_rank, rank)
        if role == "output":
            output = LoraPair(a, b, pair_scale)
        elif role == "wqkv":  # fused (phi3): one A, B's rows split as the weight's are
            for r, (lo, hi) in (("wq", (0, qd)), ("wk", (qd, qd + kvd)),
                                ("wv", (qd + kvd, qd + 2 * kvd))):  # fmt: skip
                layers[layer][r] = LoraPair(a, Matrix.of(b.data[lo:hi], b.wtype), pair_scale)
        elif role == "w_up" and "w_gate" not in layer_tensor_names(0, model.info.arch):
            ff = s.n_ff  # fused gate and up (phi3): the gate's rows, then up's
            layers[layer]["w_gate"] = LoraPair(a, Matrix.of(b.data[:ff], b.wtype), pair_scale)
            layers[layer]["w_up"] = LoraPair(a, Matrix.of(b.data[ff:], b.wtype), pair_scale)
        else:
            layers[layer][role] = LoraPair(a, b, pair_scale)
    try:
        native = NativeAdapter(model.spec, layers, output)
    except KernelError as e:  # a shape or type the kernels refuse
        raise ModelError(f"{p}: {e}") from e
    return Adapter(
        model, native, path=p, alpha=float(alpha), scale=scale, rank=max_rank,
        tensors=tuple(sorted(parts)), nbytes=native.nbytes, reader=reader,
    )  # fmt: skip


def _matrix(path: Path, t: Any) -> Matrix:
    wtype = ADAPTER_TYPES.get(t.tensor_type)
    if wtype is None:
        raise ModelError(
            f"{path}: {t.name} is {t.tensor_type.name}; adapter tensors must be F32, F16 or Q8_0"
        )
    data = t.data
    if data.ndim != 2:
        raise ModelError(f"{path}: {t.name} must be 2-D, got shape {tuple(data.shape)}")
    return Matrix.of(np.ascontiguousarray(data), wtype)


def _base_dims(model: Model, role: str) -> tuple[int, int]:
    s = model.spec
    qd, kvd = s.n_heads * s.head_dim, s.kv_dim
    return {
        "wq": (qd, s.n_embd), "wk": (kvd, s.n_embd), "wv": (kvd, s.n_embd),
        "wqkv": (qd + 2 * kvd, s.n_embd), "wo": (s.n_embd, qd),
        "w_gate": (s.n_ff, s.n_embd),
        "w_up": (s.n_ff if "w_gate" in layer_tensor_names(0, model.info.arch) else 2 * s.n_ff,
                 s.n_embd),
        "w_down": (s.n_embd, s.n_ff), "output": (s.n_vocab, s.n_embd),
    }[role]  # fmt: skip


def save_adapter(
    path: str | os.PathLike[str],
    pairs: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    arch: str,
    alpha: float = 0.0,
    wtype: str = "F16",
) -> Path:
    """Write a LoRA adapter GGUF file in llama.cpp's format and return its path.

    Args:
        pairs: base weight name (``blk.0.attn_q.weight``) -> ``(a, b)`` float arrays, ``a``
            ``(rank, n_in)`` and ``b`` ``(n_out, rank)``: the delta is ``b @ a``.
        arch: the base model's ``general.architecture``.
        wtype: "F32", "F16" or "Q8_0" (Q8_0 only where a row's length is a multiple of 32;
            other tensors are written as F16).
    """
    kinds = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
             "Q8_0": gguf.GGMLQuantizationType.Q8_0}  # fmt: skip
    if wtype not in kinds:
        raise ModelError(f"wtype must be one of {', '.join(kinds)}, not {wtype!r}")
    p = Path(path)
    w = gguf.GGUFWriter(str(p), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for base, (a, b) in pairs.items():
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ModelError(f"{base}: a must be (rank, n_in) and b (n_out, rank)")
        for suffix, arr in ((".lora_a", a), (".lora_b", b)):
            kind = kinds[wtype]
            if kind == gguf.GGMLQuantizationType.Q8_0 and arr.shape[1] % 32:
                kind = gguf.GGMLQuantizationType.F16
            if kind == gguf.GGMLQuantizationType.F32:
                w.add_tensor(base + suffix, np.ascontiguousarray(arr))
            elif kind == gguf.GGMLQuantizationType.F16:
                w.add_tensor(base + suffix, arr.astype(np.float16))
            else:
                q = gguf.quants.quantize(arr, kind)
                w.add_tensor(base + suffix, q, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p
