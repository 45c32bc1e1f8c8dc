"""Weight types and instruction-set levels of the native kernels."""

from __future__ import annotations

import enum

import numpy as np


class WeightType(enum.IntEnum):
    """Element or block type of a weight row; values are GGML's type ids."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    IQ4_NL = 20
    IQ4_XS = 23
    BF16 = 30

    @property
    def block_elems(self) -> int:
        """Elements per block (1 for the float types)."""
        return _BLOCK[self][0]

    @property
    def block_bytes(self) -> int:
        """Bytes per block."""
        return _BLOCK[self][1]

    @property
    def quantized(self) -> bool:
        return self not in (WeightType.F32, WeightType.F16, WeightType.BF16)

    @property
    def writable(self) -> bool:
        """``quantize`` can produce this type (the others are read from files only)."""
        return self in (
            WeightType.F32,
            WeightType.F16,
            WeightType.BF16,
            WeightType.Q8_0,
            WeightType.Q4_0,
        )

    def row_bytes(self, n: int) -> int:
        """Bytes of a row of ``n`` elements; raises ValueError if n does not fill whole blocks."""
        if n <= 0 or n % self.block_elems:
            raise ValueError(
                f"a {self.name} row needs a positive multiple of {self.block_elems} elements, "
                f"got {n}"
            )
        return n // self.block_elems * self.block_bytes

    def row_elems(self, n_bytes: int) -> int:
        """Elements in a row of ``n_bytes``; raises ValueError if that is not whole blocks."""
        if n_bytes <= 0 or n_bytes % self.block_bytes:
            raise ValueError(
                f"a {self.name} row needs a positive multiple of {self.block_bytes} bytes, "
                f"got {n_bytes}"
            )
        return n_bytes // self.block_bytes * self.block_elems


_BLOCK = {
    WeightType.F32: (1, 4),
    WeightType.F16: (1, 2),
    WeightType.BF16: (1, 2),
    WeightType.Q8_0: (32, 34),
    WeightType.Q4_0: (32, 18),
    WeightType.Q4_1: (32, 20),
    WeightType.Q5_0: (32, 22),
    WeightType.Q5_1: (32, 24),
    WeightType.Q2_K: (256, 84),
    WeightType.Q3_K: (256, 110),
    WeightType.Q4_K: (256, 144),
    WeightType.Q5_K: (256, 176),
    WeightType.Q6_K: (256, 210),
    WeightType.IQ4_NL: (32, 18),
    WeightType.IQ4_XS: (256, 136),
}

#: numpy dtypes that name a weight type by themselves
DTYPE_WEIGHT_TYPES = {np.dtype(np.float32): WeightType.F32, np.dtype(np.float16): WeightType.F16}


class Isa(enum.IntEnum):
    """Instruction-set level of the SIMD kernels."""

    SCALAR = 0  # portable C, the reference
    AVX2 = 1  # AVX2 + FMA + F16C
    AVX512 = 2  # AVX-512 F/BW/VL + VNNI


class Activation(enum.IntEnum):
    """The feed-forward block's gate activation."""

    SILU = 0  # silu(gate) * up: llama, qwen, phi3
    GELU = 1  # gelu(gate) * up (tanh form): gemma


class RopeMode(enum.IntEnum):
    """How RoPE pairs dimensions (GGML's numbering)."""

    NORMAL = 0  # adjacent pairs (x[2i], x[2i+1]): llama
    NEOX = 2  # half-split pairs (x[i], x[i + n_rot/2]): NeoX, qwen2
