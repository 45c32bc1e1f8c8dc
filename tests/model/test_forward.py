"""The native forward pass against the float64 numpy reference of the same model.

Tolerances: with F32 weights the only differences are float32 rounding in the native kernels
and F16 storage of the KV cache, so logits agree to LOGITS_RTOL_F32 of their spread. With
quantized weights both sides use the same dequantized weights, but the native matmul also
quantizes activations to 8 bits per 32-block (as llama.cpp does), so agreement is looser
(LOGITS_RTOL_QUANT) and the argmax is checked only where the reference's top two logits are
further apart than that error.
"""

from __future__ import annotations

from pathlib import Path

import model_reference as ref
import numpy as np
import pytest

import realm
from realm.testing import write_test_model

LOGITS_RTOL_F32 = 2e-3  # relative to max |logit|: F16 KV cache + float32 accumulation
LOGITS_RTOL_QUANT = 3e-2  # 8-bit activations in every matmul, through every layer
IDS = [1, 5, 9, 200, 17, 3, 42, 300, 7, 11]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _check_argmax(got: np.ndarray, want: np.ndarray, tol: float) -> None:
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()


@pytest.mark.parametrize(
    ("arch", "n_heads", "n_kv_heads"),
    [("llama", 4, 4), ("llama", 4, 2), ("llama", 4, 1), ("qwen2", 4, 2)],
)
def test_logits_match_reference_f32(
    tmp_path: Path, arch: str, n_heads: int, n_kv_heads: int
) -> None:
    path = write_test_model(
        tmp_path / "m.gguf", arch=arch, wtype="F32", n_heads=n_heads, n_kv_heads=n_kv_heads
    )
    got = realm.load_model(path).logits(IDS)
    want = ref.reference_logits(path, IDS)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert _rel(got, want) < LOGITS_RTOL_F32
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("wtype", ["F16", "BF16", "Q8_0", "Q4_0"])
def test_logits_match_reference_quantized(tmp_path: Path, wtype: str) -> None:
    path = write_test_model(tmp_path / "m.gguf", wtype=wtype, n_layers=3)
    got = realm.load_model(path).logits(IDS)
    want = ref.reference_logits(path, IDS)  # dequantizes the same stored weights
    tol = LOGITS_RTOL_F32 if wtype in ("F16", "BF16") else LOGITS_RTOL_QUANT
    assert _rel(got, want) < tol
    _check_argmax(got, want, tol)


def test_f32_kv_cache_is_tighter(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf", wtype="F32")
    got = realm.load_model(path, kv_dtype=np.float32).logits(IDS)
    assert _rel(got, ref.reference_logits(path, IDS)) < 2e-5


def test_tied_embeddings(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf", wtype="F32", tied_embeddings=True)
    got = realm.load_model(path).logits(IDS)
    assert _rel(got, ref.reference_logits(path, IDS)) < LOGITS_RTOL_F32


def test_incremental_equals_one_shot(tmp_path: Path) -> None:
    model = realm.load_model(write_test_model(tmp_path / "m.gguf"))
    full = model.logits(IDS)
    with model.open_session() as s:
        first = s.extend(IDS[:4], logits="all")
        rest = [s.extend([t]) for t in IDS[4:]]
    assert first is not None
    # a 4-token and a 10-token step may take different matmul paths (row dots vs GEMM)
    np.testing.assert_allclose(first, full[:4], rtol=0, atol=1e-5 * np.abs(full).max())
    np.testing.assert_allclose(np.stack(rest), full[4:], rtol=0, atol=1e-5 * np.abs(full).max())


def test_batched_step_equals_separate_steps(tmp_path: Path) -> None:
    """Sequences of different lengths and positions in one step give their own logits."""
    model = realm.load_model(write_test_model(tmp_path / "m.gguf"))
    prompts = [IDS[:3], IDS[2:9], IDS[5:6]]
    alone = [model.logits([*p, 4, 8]) for p in prompts]
    sessions = [model.open_session() for _ in prompts]
    for s, p in zip(sessions, prompts, strict=True):
        s.extend(p, logits="none")
    out = model.step([(s, [4, 8], "all") for s in sessions])
    for got, want, p in zip(out, alone, prompts, strict=True):
        assert got is not None
        np.testing.assert_allclose(got, want[len(p) :], atol=1e-5 * np.abs(want).max())
    for s in sessions:
        s.close()


def test_rewind_and_fork(tmp_path: Path) -> None:
    model = realm.load_model(write_test_model(tmp_path / "m.gguf"))
    full = model.logits(IDS)
    s = model.open_session()
    s.extend(IDS[:6], logits="none")
    child = s.fork()
    s.rewind(2)
    assert s.pos == 2 and s.tokens == IDS[:2]
    again = s.extend(IDS[2:], logits="all")
    np.testing.assert_allclose(again, full[2:], atol=1e-5 * np.abs(full).max())
    assert child.pos == 6
    tail = child.extend(IDS[6:], logits="all")
    np.testing.assert_allclose(tail, full[6:], atol=1e-5 * np.abs(full).max())
    s.close()
    child.close()
    assert model.kv_bytes_used == 0


def test_kv_memory_is_accounted_and_capped(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf")
    model = realm.load_model(path, max_kv_bytes=0)
    per = model.kv_bytes_per_position()
    model = realm.load_model(path, max_kv_bytes=300 * per)
    a = model.open_session(capacity=200)
    a.extend(IDS)
    assert model.kv_bytes_used == 200 * per  # grown once, to the capacity
    b = model.open_session(capacity=200)
    with pytest.raises(realm.KVMemoryExhausted, match="cap"):
        b.extend(IDS)
    assert b.pos == 0  # nothing changed
    a.close()
    b.extend(IDS)  # room again
    b.close()
    assert model.kv_bytes_used == 0


@pytest.mark.parametrize("budget", [0, 50_000, None])
def test_layer_pager_gives_the_same_logits(tmp_path: Path, budget: int | None) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_layers=4)
    want = realm.load_model(path).logits(IDS)
    model = realm.load_model(path, max_resident_bytes=10**9 if budget is None else budget)
    assert model.pager is not None
    np.testing.assert_array_equal(model.logits(IDS), want)
    np.testing.assert_array_equal(model.logits(IDS), want)
    st = model.pager.statistics()
    assert st.misses + st.prefetches >= 4 and st.bytes_paged > 0  # every layer paged in
    if budget is None:
        assert st.hits >= 4 and st.evictions == 0 and len(st.resident_layers) == 4
    else:
        assert st.resident_bytes <= max(budget, 0) or st.evictions > 0


def test_model_info(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf", wtype="Q8_0", n_layers=3, n_kv_heads=2)
    info = realm.load_model(path).info
    assert (info.arch, info.n_layers, info.n_embd, info.n_heads, info.n_kv_heads) == (
        "llama",
        3,
        64,
        4,
        2,
    )
    assert info.file_type == "Q8_0" and info.vocab_size == 587 and info.context_length == 256
    assert info.n_params > 0 and len(info.fingerprint) == 32


def test_embed_is_the_mean_final_hidden_state(tmp_path: Path) -> None:
    """Recover the reference's final normalised hidden states from its logits (vocab > n_embd,
    so the output matrix has full column rank) and compare their normalised mean."""
    path = write_test_model(tmp_path / "m.gguf", wtype="F32")
    model = realm.load_model(path, kv_dtype=np.float32)
    got = model.embed(IDS)
    want_logits = ref.reference_logits(path, IDS)  # (T, vocab) = H @ W_out.T
    w_out = ref.RefModel(path).weights["output.weight"]  # (vocab, n_embd)
    hidden = np.linalg.lstsq(w_out, want_logits.T, rcond=None)[0].T  # (T, n_embd)
    want = hidden.mean(axis=0)
    want /= np.linalg.norm(want)
    assert got.shape == (model.info.n_embd,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5
    with pytest.raises(realm.ModelError, match="at least one"):
        model.embed([])
