"""Every architecture's native forward pass against the float64 reference of the same file.

The test models are written by ``realm.testing.write_test_model`` with each architecture's
llama.cpp tensor names and keys: qwen3 (QK-norm, heads wider than n_embd / n_heads), phi3
(fused QKV and gate/up), gemma2 (post norms, GELU, soft-capping, windowed even layers), gemma3
(post norms, QK-norm, GELU, five windowed layers in six with their own RoPE base) and llama
with llama 3's ``rope_freqs``. The gemma files' window (8 positions) is shorter than the
prompts, so the windowed layers' masking is exercised. Tolerances are test_forward's: float32
kernels and an F16 KV cache against float64.
"""

from __future__ import annotations

from pathlib import Path

import model_reference as ref
import numpy as np
import pytest

import realm
from realm.testing import write_test_model

LOGITS_RTOL_F32 = 2e-3  # relative to max |logit|: F16 KV cache + float32 accumulation
LOGITS_RTOL_QUANT = 3e-2  # 8-bit activations in every matmul
IDS = [1, 5, 9, 200, 17, 3, 42, 300, 7, 11, 13, 99, 4, 250, 8, 21, 2, 77, 6, 120]

#: architecture -> write_test_model arguments (heads wider than n_embd / n_heads where the
#: published models have them)
VARIANTS = {
    "qwen3": {"arch": "qwen3", "head_dim": 32},
    "phi3": {"arch": "phi3"},
    "gemma2": {"arch": "gemma2", "n_layers": 3},
    "gemma3": {"arch": "gemma3", "head_dim": 32, "n_layers": 7, "n_kv_heads": 1},
    "llama3-rope-freqs": {"arch": "llama", "rope_freqs": True},
    "llama-window": {"arch": "llama", "sliding_window": 5},
}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {
        name: write_test_model(root / f"{name}.gguf", wtype="F32", seed=3, **kw)
        for name, kw in VARIANTS.items()
    }


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_reference(files: dict[str, Path], name: str) -> None:
    got = realm.load_model(files[name]).logits(IDS)
    want = ref.reference_logits(files[name], IDS)
    assert _rel(got, want) < LOGITS_RTOL_F32
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_token_by_token_decoding_matches_reference(files: dict[str, Path], name: str) -> None:
    """Decode steps past the window: each step's cache rows and masks are right."""
    model = realm.load_model(files[name])
    want = ref.reference_logits(files[name], IDS)
    with model.open_session() as s:
        first = s.extend(IDS[:3], logits="all")
        steps = [s.extend([t]) for t in IDS[3:]]
    got = np.concatenate([first, np.stack(steps)])
    assert _rel(got, want) < LOGITS_RTOL_F32


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_the_window_changes_the_answer(tmp_path: Path, name: str) -> None:
    """Guards the test above: with a window as wide as the prompt the logits differ, so a
    forward pass that ignored the window would fail it."""
    kw = VARIANTS[name]
    narrow = write_test_model(tmp_path / "narrow.gguf", wtype="F32", seed=3, **kw)
    wide = write_test_model(tmp_path / "wide.gguf", wtype="F32", seed=3, sliding_window=64, **kw)
    a, b = realm.load_model(narrow).logits(IDS), realm.load_model(wide).logits(IDS)
    np.testing.assert_allclose(a[:8], b[:8], atol=1e-5 * np.abs(a).max())  # inside the window
    assert _rel(a[8:], b[8:]) > 10 * LOGITS_RTOL_F32


@pytest.mark.parametrize("name", ["gemma3", "qwen3", "phi3"])
@pytest.mark.parametrize("wtype", ["Q8_0", "F16"])
def test_quantized_files_match_reference(tmp_path: Path, name: str, wtype: str) -> None:
    kw = dict(VARIANTS[name])
    path = write_test_model(tmp_path / "m.gguf", wtype=wtype, seed=4, **kw)
    got = realm.load_model(path).logits(IDS)
    want = ref.reference_logits(path, IDS)
    assert _rel(got, want) < (LOGITS_RTOL_QUANT if wtype == "Q8_0" else LOGITS_RTOL_F32)


def test_batched_sessions_of_a_windowed_model(files: dict[str, Path]) -> None:
    """Sequences at different positions in one step each get their own window."""
    model = realm.load_model(files["gemma3"])
    prompts = [IDS[:3], IDS[:12], IDS[4:15]]
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


def test_layer_pager_on_a_gemma3_file(files: dict[str, Path]) -> None:
    want = realm.load_model(files["gemma3"]).logits(IDS)
    paged = realm.load_model(files["gemma3"], max_resident_bytes=0)
    np.testing.assert_array_equal(paged.logits(IDS), want)


def test_model_info_names_the_variant(files: dict[str, Path]) -> None:
    g3 = realm.load_model(files["gemma3"]).info
    assert (g3.arch, g3.head_dim, g3.sliding_window, g3.activation) == ("gemma3", 32, 8, "gelu")
    assert g3.rope_mode == "neox"
    q3 = realm.load_model(files["qwen3"]).info
    assert (q3.arch, q3.head_dim, q3.sliding_window, q3.activation) == ("qwen3", 32, 0, "silu")
    assert realm.load_model(files["llama-window"]).info.sliding_window == 5


def test_embeddings_of_every_architecture_are_unit_vectors(files: dict[str, Path]) -> None:
    for path in files.values():
        e = realm.load_model(path).embed(IDS[:6])
        assert abs(float(np.linalg.norm(e)) - 1.0) < 1e-5


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("blk.0.attn_q_norm.weight", "attn_q_norm.weight' is missing"),
        ("blk.1.post_ffw_norm.weight", "post_ffw_norm.weight' is missing"),
    ],
)
def test_a_missing_architecture_tensor_is_named(
    tmp_path: Path, files: dict[str, Path], drop: str, message: str
) -> None:
    from gguf import GGUFReader, GGUFWriter

    src = GGUFReader(files["gemma3"])
    out = tmp_path / "broken.gguf"
    w = GGUFWriter(out, "gemma3")
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype.name == "ARRAY":
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    for t in src.tensors:
        if t.name != drop:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(realm.ModelError, match=message):
        realm.load_model(out)


def test_longrope_files_are_refused(tmp_path: Path) -> None:
    from gguf import GGUFReader, GGUFWriter

    path = write_test_model(tmp_path / "phi.gguf", arch="phi3", wtype="F32")
    src = GGUFReader(path)
    out = tmp_path / "longrope.gguf"
    w = GGUFWriter(out, "phi3")
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if field.types[0].name == "ARRAY":
            w.add_array(key, field.contents())
        else:
            w.add_key_value(key, field.contents(), field.types[0])
    for t in src.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.add_tensor("rope_factors_long.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(realm.ModelError, match="LongRoPE"):
        realm.load_model(out)
