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

#: architectures ``write_test_model`` writes (qwen2 = llama + Q/K/V biases + NeoX RoPE)
ARCHS: Final = ("llama", "qwen2")
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
) -> Path:
    """Write a small random-weight GGUF model to ``path`` (overwritten) and return its path.

    Args:
        arch: "llama" or "qwen2" (adds ``attn_{q,k,v}.bias``; llama.cpp runs it with NeoX RoPE).
        n_embd, n_heads, n_kv_heads: head_dim = n_embd / n_heads must be a whole even number;
            n_heads must be a multiple of n_kv_heads (grouped-query attention).
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
    if n_embd % n_heads:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_heads ({n_heads})")
    head_dim = n_embd // n_heads
    if head_dim % 2:
        raise ValueError(f"n_embd / n_heads must be even for RoPE, got head_dim {head_dim}")
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

    def norm(name: str) -> None:
        vector(name, 1.0 + NORM_JITTER * rng.standard_normal(n_embd))

    matrix("token_embd.weight", vocab_size, n_embd, 1.0)
    for i in range(n_layers):
        blk = f"blk.{i}"
        norm(f"{blk}.attn_norm.weight")
        matrix(f"{blk}.attn_q.weight", n_q, n_embd, n_embd**-0.5)
        matrix(f"{blk}.attn_k.weight", n_kv, n_embd, n_embd**-0.5)
        matrix(f"{blk}.attn_v.weight", n_kv, n_embd, n_embd**-0.5)
        if arch == "qwen2":
            vector(f"{blk}.attn_q.bias", BIAS_STD * rng.standard_normal(n_q))
            vector(f"{blk}.attn_k.bias", BIAS_STD * rng.standard_normal(n_kv))
            vector(f"{blk}.attn_v.bias", BIAS_STD * rng.standard_normal(n_kv))
        matrix(f"{blk}.attn_output.weight", n_embd, n_q, n_q**-0.5)
        norm(f"{blk}.ffn_norm.weight")
        matrix(f"{blk}.ffn_gate.weight", n_ff, n_embd, n_embd**-0.5)
        matrix(f"{blk}.ffn_up.weight", n_ff, n_embd, n_embd**-0.5)
        matrix(f"{blk}.ffn_down.weight", n_embd, n_ff, n_ff**-0.5)
    norm("output_norm.weight")
    if not tied_embeddings:
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
