"""Small GGUF models with random weights and a real tokenizer, for tests.

The files use GGUF's standard llama tensor names, shapes and metadata keys, so llama.cpp and
``realm.load_model`` read them like any converted model. The weights are random but scaled so
activations stay O(1) through any number of layers: projections are normal with standard
deviation ``1/sqrt(n_in)``, norm weights are near 1, and the embeddings are unit normal.

The random draw depends only on the shape arguments and ``seed``, never on ``wtype``: the same
call with ``wtype="F32"`` gives the exact values that the quantized file rounds.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Final

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, quants

from ._vocab import Vocab, natural_spm_vocab_size, spm_vocab

__all__ = ["ARCHS", "TOKENIZERS", "WEIGHT_TYPES", "write_test_model", "write_vocab_only"]

#: architectures ``write_test_model`` writes, with llama.cpp's tensor names and keys for each
#: (qwen2: llama + Q/K/V biases + NeoX RoPE; qwen3: QK-norm; phi3: fused QKV and gate/up;
#: gemma2: post norms, GELU, soft-capping, every other layer windowed; gemma3: post norms,
#: QK-norm, GELU, five layers in six windowed)
ARCHS: Final = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
GEMMA_DEFAULT_WINDOW: Final = 8  # positions: small, so that tests cross it
GEMMA2_SOFTCAPS: Final = (50.0, 30.0)  # attention scores, final logits (Gemma 2's own values)
#: tokenizers it writes ("none": no tokenizer keys at all)
TOKENIZERS: Final = ("spm", "none")
#: weight type of the 2-D matrices → (GGML tensor type, GGUF general.file_type)
WEIGHT_TYPES: Final = {
    "F32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "F16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
QUANT_BLOCK: Final = 32  # elements per Q8_0 / Q4_0 block: a row length must be a multiple
QUANTIZATION_VERSION: Final = 2  # GGML_QNT_VERSION, written as general.quantization_version
NORM_JITTER: Final = 0.1  # norm weights are 1 + NORM_JITTER * normal
BIAS_STD: Final = 0.2  # qwen2 Q/K/V biases


def write_test_model(
    path: str | os.PathLike[str],
    *,
    arch: str = "llama",
    n_layers: int = 2,
    n_embd: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    n_ff: int = 128,
    vocab_size: int | None = None,
    context_length: int = 256,
    wtype: str = "Q8_0",
    seed: int = 0,
    rope_base: float = 10000.0,
    rms_eps: float = 1e-5,
    tied_embeddings: bool = False,
    tokenizer: str = "spm",
    head_dim: int | None = None,
    sliding_window: int | None = None,
    rope_freqs: bool = False,
) -> Path:
    """Write a small random-weight GGUF model to ``path`` (overwritten) and return its path.

    Args:
        arch: one of ``ARCHS``: "llama", "qwen2" (adds ``attn_{q,k,v}.bias``), "qwen3"
            (``attn_{q,k}_norm``), "phi3" (``attn_qkv``, a double-height ``ffn_up``), "gemma2"
            or "gemma3" (post norms, GELU; gemma3 has QK-norm; tied embeddings as published).
        n_embd, n_heads, n_kv_heads: n_heads must be a multiple of n_kv_heads (grouped-query
            attention).
        head_dim: per-head size, written as ``attention.key_length`` (qwen3 and gemma use heads
            wider than n_embd / n_heads); None for n_embd / n_heads, which must then be whole.
            Even.
        sliding_window: the window of the windowed layers (gemma2/3: default
            ``GEMMA_DEFAULT_WINDOW``; other architectures: None writes no window).
        rope_freqs: llama only: write a ``rope_freqs`` tensor (llama 3's per-pair divisors).
        vocab_size: None for the tokenizer's own size (that of the "spm" vocabulary, also
            for tokenizer="none"); with "spm", a larger size pads with unused tokens and a
            smaller one keeps fewer learned pieces.
        wtype: type of every 2-D matrix, ``token_embd`` included: "F32", "F16", "BF16",
            "Q8_0" or "Q4_0". Norms and biases are always F32. For the Q types, n_embd and
            n_ff must be multiples of 32 (the row lengths).
        tied_embeddings: omit ``output.weight``; the output projection reuses ``token_embd``.
        tokenizer: "spm" (llama SentencePiece vocabulary with byte fallback) or "none".

    Raises:
        ValueError: an argument is out of range; the message names it.
    """
    _check_choice("arch", arch, ARCHS)
    _check_choice("wtype", wtype, tuple(WEIGHT_TYPES))
    _check_choice("tokenizer", tokenizer, TOKENIZERS)
    for name, value in [
        ("n_layers", n_layers),
        ("n_embd", n_embd),
        ("n_heads", n_heads),
        ("n_kv_heads", n_kv_heads),
        ("n_ff", n_ff),
        ("context_length", context_length),
    ]:
        _check_positive_int(name, value)
    if vocab_size is not None:
        _check_positive_int("vocab_size", vocab_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    for name, number in [("rope_base", rope_base), ("rms_eps", rms_eps)]:
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ValueError(f"{name} must be a number, got {number!r}")
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{name} must be finite and positive, got {number!r}")
    if not isinstance(tied_embeddings, bool):
        raise ValueError(f"tied_embeddings must be a bool, got {tied_embeddings!r}")
    explicit_head_dim = head_dim is not None
    if head_dim is None:
        if n_embd % n_heads:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_heads ({n_heads})")
        head_dim = n_embd // n_heads
    else:
        _check_positive_int("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    gemma = arch in ("gemma2", "gemma3")
    if sliding_window is None and gemma:
        sliding_window = GEMMA_DEFAULT_WINDOW
    if sliding_window is not None:
        _check_positive_int("sliding_window", sliding_window)
    if not isinstance(rope_freqs, bool) or (rope_freqs and arch != "llama"):
        raise ValueError(f"rope_freqs must be a bool, and True only for llama; got {rope_freqs!r}")
    if n_kv_heads > n_heads or n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
    ggml_type, file_type = WEIGHT_TYPES[wtype]
    if ggml_type in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0):
        for name, value in [("n_embd", n_embd), ("n_ff", n_ff)]:
            if value % QUANT_BLOCK:
                raise ValueError(
                    f"{name} ({value}) must be a multiple of {QUANT_BLOCK} for wtype {wtype}"
                )
    vocab = None
    if tokenizer == "spm":
        vocab = spm_vocab(vocab_size)  # raises if vocab_size is too small for it
        vocab_size = len(vocab)
    elif vocab_size is None:
        vocab_size = natural_spm_vocab_size()

    path = Path(path)
    writer = GGUFWriter(path, arch)
    writer.add_name(f"realm test model ({arch}, {wtype}, seed {seed})")
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(QUANTIZATION_VERSION)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(float(rope_base))
    writer.add_layer_norm_rms_eps(float(rms_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab_size)
    if explicit_head_dim:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if sliding_window is not None:
        writer.add_sliding_window(sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(GEMMA2_SOFTCAPS[0])
        writer.add_final_logit_softcapping(GEMMA2_SOFTCAPS[1])
    if vocab is not None:
        vocab.write(writer)

    rng = np.random.default_rng(seed)
    n_q, n_kv = n_heads * head_dim, n_kv_heads * head_dim

    def matrix(name: str, n_out: int, n_in: int, std: float) -> None:
        # GGML shape (n_in, n_out): ne0 = n_in is the row length; numpy's order is reversed
        w = (rng.standard_normal((n_out, n_in)) * std).astype(np.float32)
        writer.add_tensor(name, quants.quantize(w, ggml_type), raw_dtype=ggml_type)

    def vector(name: str, values: np.ndarray) -> None:
        writer.add_tensor(name, values.astype(np.float32))

    def norm(name: str, n: int = n_embd) -> None:
        vector(name, 1.0 + NORM_JITTER * rng.standard_normal(n))

    # gemma multiplies the embeddings by sqrt(n_embd): store them that much smaller
    matrix("token_embd.weight", vocab_size, n_embd, n_embd**-0.5 if gemma else 1.0)
    if rope_freqs:  # llama 3's shape: 1 for the fast pairs, growing to 8 for the slow ones
        vector("rope_freqs.weight", np.geomspace(1.0, 8.0, head_dim // 2))
    for i in range(n_layers):
        blk = f"blk.{i}"
        norm(f"{blk}.attn_norm.weight")
        if arch == "phi3":
            matrix(f"{blk}.attn_qkv.weight", n_q + 2 * n_kv, n_embd, n_embd**-0.5)
        else:
            matrix(f"{blk}.attn_q.weight", n_q, n_embd, n_embd**-0.5)
            matrix(f"{blk}.attn_k.weight", n_kv, n_embd, n_embd**-0.5)
            matrix(f"{blk}.attn_v.weight", n_kv, n_embd, n_embd**-0.5)
        if arch == "qwen2":
            vector(f"{blk}.attn_q.bias", BIAS_STD * rng.standard_normal(n_q))
            vector(f"{blk}.attn_k.bias", BIAS_STD * rng.standard_normal(n_kv))
            vector(f"{blk}.attn_v.bias", BIAS_STD * rng.standard_normal(n_kv))
        if arch in ("qwen3", "gemma3"):
            norm(f"{blk}.attn_q_norm.weight", head_dim)
            norm(f"{blk}.attn_k_norm.weight", head_dim)
        matrix(f"{blk}.attn_output.weight", n_embd, n_q, n_q**-0.5)
        if gemma:
            norm(f"{blk}.post_attention_norm.weight")
        norm(f"{blk}.ffn_norm.weight")
        if arch == "phi3":
            matrix(f"{blk}.ffn_up.weight", 2 * n_ff, n_embd, n_embd**-0.5)
        else:
            matrix(f"{blk}.ffn_gate.weight", n_ff, n_embd, n_embd**-0.5)
            matrix(f"{blk}.ffn_up.weight", n_ff, n_embd, n_embd**-0.5)
        matrix(f"{blk}.ffn_down.weight", n_embd, n_ff, n_ff**-0.5)
        if gemma:
            norm(f"{blk}.post_ffw_norm.weight")
    norm("output_norm.weight")
    if not (tied_embeddings or gemma):  # gemma files tie them (llama.cpp's gemma2 requires it)
        matrix("output.weight", vocab_size, n_embd, n_embd**-0.5)

    _write(writer)
    return path


def write_vocab_only(
    path: str | os.PathLike[str], tokenizer: str = "spm", *, vocab_size: int | None = None
) -> Path:
    """Write a GGUF file holding only tokenizer metadata (no tensors), like llama.cpp's
    ``ggml-vocab-*.gguf`` files, and return its path.

    Raises:
        ValueError: ``tokenizer`` is not "spm", or ``vocab_size`` is too small for it.
    """
    _check_choice("tokenizer", tokenizer, ("spm",))
    if vocab_size is not None:
        _check_positive_int("vocab_size", vocab_size)
    vocab: Vocab = spm_vocab(vocab_size)
    path = Path(path)
    writer = GGUFWriter(path, "llama")
    writer.add_name(f"realm test vocabulary ({tokenizer})")
    writer.add_vocab_size(len(vocab))
    vocab.write(writer)
    _write(writer)
    return path


def _write(writer: GGUFWriter) -> None:
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
