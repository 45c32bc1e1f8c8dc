"""Random matrices in the block types that published files use and Realm reads but never writes
(Q4_1, Q5_0, Q5_1, the K-quants, IQ4), for benchmarks and tests of speed.

Every quantized field is random bytes, so every bit pattern occurs; the half-precision scale
fields are then set to one value each for the whole matrix, chosen so the dequantized matrix
has mean about 0 (the types with a minimum field: its value offsets the codes' mean) and the
standard deviation asked for (a trained matrix's spread, so activations stay O(1) through
many layers). Kernel speed does not depend on the values; results through these matrices are
meaningful as computations (llama.cpp and Realm agree on them), not as a language model.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from realm.kernels import WeightType, dequantize

#: byte offsets of each block's half-precision scale fields (ggml-common.h)
HALF_FIELDS: Final = {
    WeightType.Q4_1: (0, 2),
    WeightType.Q5_0: (0,),
    WeightType.Q5_1: (0, 2),
    WeightType.Q2_K: (80, 82),
    WeightType.Q3_K: (108,),
    WeightType.Q4_K: (0, 2),
    WeightType.Q5_K: (0, 2),
    WeightType.Q6_K: (208,),
    WeightType.IQ4_NL: (0,),
    WeightType.IQ4_XS: (0,),
}


def random_blocks(
    wtype: WeightType, n_rows: int, n_cols: int, std: float, rng: np.random.Generator
) -> np.ndarray:
    """A ``(n_rows, row_bytes)`` uint8 matrix of ``wtype`` blocks whose values have standard
    deviation about ``std``. Every half-precision scale of the matrix is the same value."""
    if wtype not in HALF_FIELDS:
        raise ValueError(f"random_blocks: {wtype.name} is not a read-only block type")
    if n_cols % wtype.block_elems:
        raise ValueError(
            f"random_blocks: n_cols {n_cols} is not a multiple of {wtype.name}'s "
            f"{wtype.block_elems}-element blocks"
        )
    nb = n_cols // wtype.block_elems
    raw = rng.integers(0, 256, (n_rows, nb, wtype.block_bytes), dtype=np.uint8)

    fields = HALF_FIELDS[wtype]

    def set_fields(*values: float) -> None:
        for off, value in zip(fields, values, strict=True):
            raw[:, :, off : off + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)

    def sample(*values: float) -> np.ndarray:
        set_fields(*values)
        rows = min(n_rows, 8)
        return dequantize(raw[:rows].reshape(rows, nb * wtype.block_bytes), wtype)

    # the values are linear in the scale fields: a * (scale's part) + b * (minimum's part)
    a, b = 1.0, 0.0
    if len(fields) == 2:
        x, y = sample(1.0, 0.0), sample(0.0, 1.0)
        b = -float(np.mean(x)) / float(np.mean(y)) if np.mean(y) else 0.0
    spread = float(np.std(sample(*(a, b)[: len(fields)])))
    k = std / spread if spread > 0 else 0.0
    set_fields(*(v * k for v in (a, b)[: len(fields)]))
    return raw.reshape(n_rows, nb * wtype.block_bytes)
