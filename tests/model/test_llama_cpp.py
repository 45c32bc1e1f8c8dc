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


#: the other architectures, with their distinguishing parts switched on (heads wider than
#: n_embd / n_heads, gemma's windows shorter than the prompt); GELU makes llama.cpp's gemma
#: graphs differ a little more (ggml evaluates GELU through an F16 table)
ARCH_VARIANTS = {
    "qwen3": {"arch": "qwen3", "head_dim": 32},
    # phi3 is not here: llama.cpp's phi3 loader looks up Phi-3's own special tokens, which the
    # test vocabulary lacks; tests/model/test_architectures.py checks it against float64
    "gemma2": {"arch": "gemma2", "n_layers": 3},
    "gemma3": {"arch": "gemma3", "head_dim": 32, "n_layers": 7, "n_kv_heads": 1},
    "llama3-rope-freqs": {"arch": "llama", "rope_freqs": True},
}
ARCH_RTOL = {"F32": 5e-3, "Q8_0": 3e-2}


@pytest.mark.parametrize("wtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("name", sorted(ARCH_VARIANTS))
def test_architectures_match_llama_cpp(tmp_path: Path, name: str, wtype: str) -> None:
    path = write_test_model(tmp_path / "m.gguf", wtype=wtype, seed=5, **ARCH_VARIANTS[name])
    ids = [*IDS, 13, 99, 4, 250, 8, 21]  # longer than gemma's 8-position window
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False
    )
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    ours = realm.load_model(path).logits(ids)
    assert float(np.abs(ours - theirs).max() / np.abs(theirs).max()) < ARCH_RTOL[wtype]
    assert float(np.mean(ours.argmax(-1) == theirs.argmax(-1))) >= 0.9


#: llama.cpp's own quantizer on an F16 test model: the file types people download
QUANT_FTYPES = [
    "Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K", "Q6_K", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS",
]  # fmt: skip


@pytest.mark.parametrize("ftype", QUANT_FTYPES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_llama_cpp_quantized_files_match_llama_cpp(tmp_path: Path, arch: str, ftype: str) -> None:
    src = write_test_model(tmp_path / "f16.gguf", arch=arch, wtype="F16", n_embd=256, n_ff=512,
                           n_heads=4, n_kv_heads=2, n_layers=2, seed=6)  # fmt: skip
    out = tmp_path / f"{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) == 0
    ids = [*IDS, 13, 99, 4, 250, 8, 21]
    llm = llama_cpp.Llama(
        model_path=str(out), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False
    )
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    model = realm.load_model(out)
    ours = model.logits(ids)
    with model.open_session() as s:  # and one token a step (the matvec path)
        steps = np.stack([s.extend([t]) for t in ids])
    for got in (ours, steps):
        assert float(np.abs(got - theirs).max() / np.abs(theirs).max()) < 5e-2
        assert float(np.mean(got.argmax(-1) == theirs.argmax(-1))) >= 0.9
