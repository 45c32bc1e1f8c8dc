"""realm.testing.quant_blocks: random matrices in the read-only block types, for benchmarks."""

from __future__ import annotations

import numpy as np
import pytest

from realm import kernels
from realm.kernels import WeightType
from realm.testing.quant_blocks import HALF_FIELDS, random_blocks

READ_ONLY_TYPES = [wt for wt in WeightType if not wt.writable]


def test_every_read_only_type_has_its_scale_offsets() -> None:
    assert set(HALF_FIELDS) == set(READ_ONLY_TYPES)


@pytest.mark.parametrize("wt", READ_ONLY_TYPES, ids=lambda wt: wt.name)
def test_the_spread_is_the_one_asked_for_and_centred(wt: WeightType) -> None:
    rng = np.random.default_rng(int(wt))
    w = random_blocks(wt, 16, 1024, 0.02, rng)
    assert w.dtype == np.uint8 and w.shape == (16, wt.row_bytes(1024))
    values = kernels.dequantize(w, wt)
    assert np.all(np.isfinite(values))
    assert 0.015 < float(np.std(values)) < 0.025
    assert abs(float(np.mean(values))) < 0.1 * float(np.std(values))


def test_bad_arguments_are_refused_by_name() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="Q8_0 is not a read-only block type"):
        random_blocks(WeightType.Q8_0, 4, 256, 0.02, rng)
    with pytest.raises(ValueError, match="n_cols 100 is not a multiple of Q4_K's 256-element"):
        random_blocks(WeightType.Q4_K, 4, 100, 0.02, rng)
