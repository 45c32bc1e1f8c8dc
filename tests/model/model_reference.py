"""A float64 numpy reference of llama.cpp's forward pass for llama-family GGUF files.

Architectures: llama, qwen2, qwen3, phi3, gemma2, gemma3.

This is the specification the native forward pass is tested against, written for clarity, not
speed. Weights are decoded by the ``gguf`` package (the exact values the kernels see) and widened
to float64, so a comparison's only slack is the native code's own rounding.

The graph is llama.cpp's (``src/models/llama.cpp`` and ``qwen2.cpp``)::

    x = token_embd[ids]
    for each layer:
        h = rms_norm(x) * attn_norm
        q, k, v = h @ Wq.T (+ bq), h @ Wk.T (+ bk), h @ Wv.T (+ bv)     # biases: qwen2 only
        q, k = rope(q, pos), rope(k, pos)     # llama: adjacent pairs; qwen2: NeoX halves
        x += causal_gqa_attention(q, k, v, scale=1/sqrt(head_dim)) @ Wo.T
        h = rms_norm(x) * ffn_norm
        x += (silu(h @ Wgate.T) * (h @ Wup.T)) @ Wdown.T
    logits = (rms_norm(x) * output_norm) @ (output or token_embd).T

and the other architectures' additions, after llama.cpp's ``src/models/{qwen3,phi3,gemma2,
gemma3}.cpp``: qwen3 and gemma3 RMS-normalise each q and k head (``attn_{q,k}_norm``) before
RoPE; phi3 stores q, k, v stacked in ``attn_qkv`` and the gate above the up projection in a
double-height ``ffn_up``; gemma2/3 scale the embeddings by sqrt(n_embd), normalise each block's
output before the residual add (``post_attention_norm``, ``post_ffw_norm``), use GELU (tanh
form) for the gate, and give some layers a sliding window (gemma2: the even layers; gemma3: five
in six, with RoPE base 10000 and no scaling there); gemma2 soft-caps scores and logits
(``cap * tanh(x / cap)``); llama 3's ``rope_freqs`` divides pair i's angle by its factor i.

Shapes: a 2-D GGUF tensor of GGML shape ``(ne0, ne1) = (n_in, n_out)`` is read back by
``GGUFReader`` with ``tensor.shape == [n_in, n_out]`` (GGML order) and ``tensor.data`` in numpy
order: ``(n_out, n_in)`` for F32/F16, ``(n_out, bytes_per_row)`` uint8 for BF16/Q8_0/Q4_0.
``quants.dequantize`` turns the latter into ``(n_out, n_in)`` values, so ``y = x @ W.T``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np
from gguf import GGUFReader, quants

ROPE_NORMAL = "normal"  # GGML rope mode 0: rotate (x[2i], x[2i+1])
ROPE_NEOX = "neox"  # GGML rope mode 2: rotate (x[i], x[i + n_rot/2])
ROPE_MODES = {  # llama.cpp's llama_model_rope_type
    "llama": ROPE_NORMAL,
    "qwen2": ROPE_NEOX,
    "qwen3": ROPE_NEOX,
    "phi3": ROPE_NEOX,
    "gemma2": ROPE_NEOX,
    "gemma3": ROPE_NEOX,
}
DEFAULT_ROPE_BASE = 10000.0  # llama.cpp's default when rope.freq_base is absent
#: layer l is windowed unless l % n == n - 1 (n == 1: every layer). llama: a mistral-style
#: window on every layer where the file names one (the model's own semantics; llama.cpp reads
#: no window for llama files); phi3's window is ignored, as llama.cpp ignores it.
SWA_PATTERN = {"llama": 1, "gemma2": 2, "gemma3": 6}
GEMMA3_SWA_ROPE_BASE = 10000.0  # gemma3's windowed layers (llama.cpp's rope_freq_base_train_swa)


@attrs.frozen
class HParams:
    """The hyperparameters of a GGUF file, as llama.cpp reads them."""

    arch: str
    n_layers: int
    n_embd: int
    n_heads: int
    n_kv_heads: int
    n_ff: int
    vocab_size: int
    context_length: int
    rope_base: float
    rms_eps: float  # the file's float32 value, widened
    n_rot: int  # rope.dimension_count: leading dimensions of each head that RoPE rotates
    head_dim: int  # attention.key_length, default n_embd / n_heads
    sliding_window: int = 0  # attention.sliding_window (gemma2/3 only; 0: none)
    rope_scale: float = 1.0  # 1 / rope.scaling.factor for linear scaling
    attn_softcap: float = 0.0  # gemma2
    final_softcap: float = 0.0

    @property
    def rope_mode(self) -> str:
        return ROPE_MODES[self.arch]

    def windowed(self, layer: int) -> bool:
        n = SWA_PATTERN.get(self.arch, 0)
        return bool(self.sliding_window and n and (n == 1 or layer % n < n - 1))


def read_hparams(reader: GGUFReader) -> HParams:
    """Hyperparameters from a reader's metadata (vocab size from ``token_embd``'s shape)."""
    arch = _field(reader, "general.architecture")
    if arch not in ROPE_MODES:
        raise ValueError(f"reference supports {sorted(ROPE_MODES)}, not {arch!r}")
    n_embd = int(_field(reader, f"{arch}.embedding_length"))
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    head_dim = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_heads))
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))
    return HParams(
        head_dim=head_dim,
        sliding_window=int(_field(reader, f"{arch}.attention.sliding_window", 0))
        if arch in SWA_PATTERN
        else 0,
        rope_scale=1.0 / factor if scaling == "linear" else 1.0,
        attn_softcap=float(_field(reader, f"{arch}.attn_logit_softcapping", 0.0))
        if arch == "gemma2"
        else 0.0,
        final_softcap=float(_field(reader, f"{arch}.final_logit_softcapping", 0.0))
        if arch == "gemma2"
        else 0.0,
        arch=arch,
        n_layers=int(_field(reader, f"{arch}.block_count")),
        n_embd=n_embd,
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        n_ff=int(_field(reader, f"{arch}.feed_forward_length")),
        vocab_size=int(embd.shape[1]),
        context_length=int(_field(reader, f"{arch}.context_length")),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", DEFAULT_ROPE_BASE)),
        rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        n_rot=int(_field(reader, f"{arch}.rope.dimension_count", head_dim)),
    )


def read_weights(reader: GGUFReader) -> dict[str, np.ndarray]:
    """Every tensor decoded to float64, in numpy order (2-D weights are ``(n_out, n_in)``)."""
    weights = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        values = quants.dequantize(tensor.data, tensor.tensor_type)
        weights[tensor.name] = np.asarray(values, dtype=np.float64).reshape(shape)
    return weights


# --- operations ----------------------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis (ggml_rms_norm, ggml_mul)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(
    x: np.ndarray,
    positions: np.ndarray,
    *,
    base: float,
    n_rot: int,
    mode: str,
    scale: float = 1.0,
    factors: np.ndarray | None = None,
) -> np.ndarray:
    """Rotary position embedding of ``x`` (n_tokens, n_heads, head_dim) at ``positions``.

    Pair ``i`` (of ``n_rot / 2``) turns by ``pos * scale * base^(-2i / n_rot) / factors[i]``.
    The "normal" mode pairs ``(x[2i], x[2i+1])``, the "neox" mode ``(x[i], x[i + n_rot/2])``;
    dimensions from ``n_rot`` on pass through unchanged.
    """
    half = n_rot // 2
    theta = (
        np.asarray(positions, dtype=np.float64)[:, None]
        * scale
        * base ** (-2.0 * np.arange(half) / n_rot)
    )
    if factors is not None:
        theta = theta / np.asarray(factors, dtype=np.float64)[None, :]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]  # (n_tokens, 1, half)
    out = np.array(x, dtype=np.float64)
    if mode == ROPE_NORMAL:
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = x0 * cos - x1 * sin
        out[..., 1:n_rot:2] = x0 * sin + x1 * cos
    elif mode == ROPE_NEOX:
        x0, x1 = x[..., :half], x[..., half:n_rot]
        out[..., :half] = x0 * cos - x1 * sin
        out[..., half:n_rot] = x0 * sin + x1 * cos
    else:
        raise ValueError(f"unknown rope mode {mode!r}")
    return out


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    n_past: int,
    *,
    scale: float | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> np.ndarray:
    """Causal grouped-query attention.

    Args:
        q: (n_tokens, n_heads, head_dim), the queries at positions n_past, n_past + 1, ...
        k, v: (n_past + n_tokens, n_kv_heads, head_dim), every key and value so far.
        scale: the score scale, default ``1/sqrt(head_dim)``.
        window: > 0: a query at p sees only keys at p - window + 1 .. p (llama.cpp's
            standard sliding window: masked where ``p - j >= window``).
        softcap: > 0: scores become ``softcap * tanh(score / softcap)`` (after the scale).

    Returns:
        (n_tokens, n_heads * head_dim). Query head ``h`` reads kv head ``h // (n_heads /
        n_kv_heads)``, as ggml's broadcasting matmul does; a query sees keys at its own
        position and before.
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv_tokens, n_kv_heads, _ = k.shape
    group = n_heads // n_kv_heads
    kv_head = np.arange(n_heads) // group
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    scores = np.einsum("thd,shd->hts", q, k[:, kv_head]) * scale
    if softcap > 0:
        scores = softcap * np.tanh(scores / softcap)
    query_pos = n_past + np.arange(n_tokens)
    future = np.arange(n_kv_tokens)[None, :] > query_pos[:, None]  # (n_tokens, n_kv_tokens)
    if window > 0:
        future |= query_pos[:, None] - np.arange(n_kv_tokens)[None, :] >= window
    scores = np.where(future[None], -np.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("hts,shd->thd", p, v[:, kv_head])
    return out.reshape(n_tokens, n_heads * head_dim)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU's tanh form (ggml_gelu)."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


# --- the model -----------------------------------------------------------------------------


@attrs.define(eq=False)
class KVCache:
    """Per layer, the keys (after RoPE) and values of past tokens: (n_past, n_kv, head_dim)."""

    k: list[np.ndarray]
    v: list[np.ndarray]

    @property
    def n_past(self) -> int:
        return self.k[0].shape[0]

    def truncate(self, n_past: int) -> None:
        """Forget every token from position ``n_past`` on (to re-decode from there)."""
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"n_past {n_past} out of range 0..{self.n_past}")
        self.k = [k[:n_past] for k in self.k]
        self.v = [v[:n_past] for v in self.v]


class RefModel:
    """A GGUF model of one of the reference's architectures evaluated in float64.

    ``weights`` may be edited by a test (e.g. zeroing a bias) before calling ``logits``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        reader = GGUFReader(path)
        self.hparams = read_hparams(reader)
        self.weights = read_weights(reader)
        #: names of the weights stored in a quantized (non-float) type
        self.quantized = {
            t.name
            for t in reader.tensors
            if t.tensor_type.name not in ("F32", "F16", "BF16") and len(t.shape) == 2
        }
        #: GGML type name of every tensor as stored
        self.types = {t.name: t.tensor_type.name for t in reader.tensors}
        #: None, or a function of (input, the weight's GGML type name) applied to the input of
        #: every product with a quantized weight: a test sets it to model the 8-bit
        #: activations that quantized matmuls use
        self.activation_rounding: Callable[[np.ndarray, str], np.ndarray] | None = None

    def new_cache(self) -> KVCache:
        hp = self.hparams
        empty = np.zeros((0, hp.n_kv_heads, hp.head_dim))
        return KVCache(k=[empty] * hp.n_layers, v=[empty] * hp.n_layers)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (len(ids), vocab_size) at every position, from a fresh context."""
        return self.step(ids, self.new_cache())

    def step(self, ids: Sequence[int], cache: KVCache) -> np.ndarray:
        """Run ``ids`` at positions ``cache.n_past, ...``; extend ``cache``; return their logits."""
        hp, w = self.hparams, self.weights
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and not (ids.min() >= 0 and ids.max() < hp.vocab_size):
            raise ValueError(f"token ids must be in 0..{hp.vocab_size - 1}")
        n_past, n_tokens = cache.n_past, ids.size
        positions = np.arange(n_past, n_past + n_tokens)

        def linear(x: np.ndarray, name: str) -> np.ndarray:
            if self.activation_rounding is not None and f"{name}.weight" in self.quantized:
                x = self.activation_rounding(x, self.types[f"{name}.weight"])
            y = x @ w[f"{name}.weight"].T
            bias = w.get(f"{name}.bias")
            return y if bias is None else y + bias

        gemma = hp.arch in ("gemma2", "gemma3")
        act = gelu if gemma else silu
        qd, kvd = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim

        def rotate(x: np.ndarray, layer: int) -> np.ndarray:
            base, scale = hp.rope_base, hp.rope_scale
            if hp.arch == "gemma3" and hp.windowed(layer):
                base, scale = GEMMA3_SWA_ROPE_BASE, 1.0
            return rope(x, positions, base=base, n_rot=hp.n_rot, mode=hp.rope_mode,
                        scale=scale, factors=w.get("rope_freqs.weight"))  # fmt: skip

        def maybe_norm(x: np.ndarray, name: str) -> np.ndarray:
            return rms_norm(x, w[name], hp.rms_eps) if name in w else x

        x = w["token_embd.weight"][ids]  # (n_tokens, n_embd)
        if gemma:
            x = x * np.sqrt(hp.n_embd)
        for i in range(hp.n_layers):
            blk = f"blk.{i}"
            h = rms_norm(x, w[f"{blk}.attn_norm.weight"], hp.rms_eps)
            if f"{blk}.attn_qkv.weight" in w:  # phi3: q, k, v stacked
                qkv = linear(h, f"{blk}.attn_qkv")
                q, k, v = qkv[:, :qd], qkv[:, qd : qd + kvd], qkv[:, qd + kvd :]
            else:
                q = linear(h, f"{blk}.attn_q")
                k, v = linear(h, f"{blk}.attn_k"), linear(h, f"{blk}.attn_v")
            q = maybe_norm(q.reshape(n_tokens, hp.n_heads, hp.head_dim),
                           f"{blk}.attn_q_norm.weight")  # fmt: skip
            k = maybe_norm(k.reshape(n_tokens, hp.n_kv_heads, hp.head_dim),
                           f"{blk}.attn_k_norm.weight")  # fmt: skip
            v = v.reshape(n_tokens, hp.n_kv_heads, hp.head_dim)
            cache.k[i] = np.concatenate([cache.k[i], rotate(k, i)])
            cache.v[i] = np.concatenate([cache.v[i], v])
            window = hp.sliding_window if hp.windowed(i) else 0
            attn = attention(rotate(q, i), cache.k[i], cache.v[i], n_past, window=window,
                             softcap=hp.attn_softcap)  # fmt: skip
            x = x + maybe_norm(linear(attn, f"{blk}.attn_output"),
                               f"{blk}.post_attention_norm.weight")  # fmt: skip
            h = rms_norm(x, w[f"{blk}.ffn_norm.weight"], hp.rms_eps)
            if f"{blk}.ffn_gate.weight" in w:
                gate, up = linear(h, f"{blk}.ffn_gate"), linear(h, f"{blk}.ffn_up")
            else:  # phi3: the gate's rows, then the up projection's, in one tensor
                gate_up = linear(h, f"{blk}.ffn_up")
                gate, up = gate_up[:, : hp.n_ff], gate_up[:, hp.n_ff :]
            ffn = linear(act(gate) * up, f"{blk}.ffn_down")
            x = x + maybe_norm(ffn, f"{blk}.post_ffw_norm.weight")
        x = rms_norm(x, w["output_norm.weight"], hp.rms_eps)
        out = "output.weight" if "output.weight" in w else "token_embd.weight"
        if self.activation_rounding is not None and out in self.quantized:
            x = self.activation_rounding(x, self.types[out])
        logits = x @ w[out].T
        if hp.final_softcap > 0:
            logits = hp.final_softcap * np.tanh(logits / hp.final_softcap)
        return logits


def reference_logits(path: str | os.PathLike[str], ids: Sequence[int]) -> np.ndarray:
    """float64 logits (len(ids), vocab_size) of the GGUF model at ``path``, fresh context."""
    return RefModel(path).logits(ids)


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is None:
            raise KeyError(f"GGUF key {key!r} is missing")
        return default
    return field.contents()
