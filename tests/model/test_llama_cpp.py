"""Realm's logits against llama.cpp's on the same GGUF file (the peer, when installed).

llama-cpp-python is in the ``[bench]`` extra (it compiles llama.cpp, ~10 minutes), so CI
without it skips this module; run it with the extra installed. Measured 2026-11-27 with
llama-cpp-python 0.3.36: relative error 2e-4 (F32), 7e-4 (F16), 1.3e-2 (Q8_0), 1.2e-2 (Q4_0),
same argmax at every position. Both sides quantize activations to 8 bits for quantized
weights, with different scale rounding, hence the looser quantized tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import realm
from realm.testing import write_test_model

llama_cpp = pytest.importorskip("llama_cpp")

IDS = [1, 5, 9, 200, 17, 3, 42, 300, 7, 11, 250, 4]
RTOL = {"F32": 2e-3, "F16": 2e-3, "BF16": 2e-3, "Q8_0": 3e-2, "Q4_0": 3e-2}


@pytest.mark.parametrize(
    ("arch", "wtype", "n_kv_heads"),
    [
        ("llama", "F32", 4),
        ("llama", "F16", 2),
        ("llama", "Q8_0", 2),
        ("llama", "Q4_0", 1),
        ("qwen2", "F16", 2),
        ("qwen2", "Q8_0", 2),
    ],
)
def test_logits_match_llama_cpp(tmp_path: Path, arch: str, wtype: str, n_kv_heads: int) -> None:
    path = write_test_model(
        tmp_path / "m.gguf", arch=arch, wtype=wtype, n_layers=3, n_kv_heads=n_kv_heads
    )
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False
    )
    llm.eval(IDS)
    theirs = np.array(llm.scores[: len(IDS)], dtype=np.float32)
    ours = realm.load_model(path).logits(IDS)
    assert ours.shape == theirs.shape
    assert float(np.abs(ours - theirs).max() / np.abs(theirs).max()) < RTOL[wtype]
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
