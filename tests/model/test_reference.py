"""Self-checks of the float64 reference forward pass and of ``realm.testing``'s model files.

The reference is the specification the native forward pass is held to, so it is checked here
against what must hold whatever the implementation: incremental decoding equals one-shot,
attention is causal, grouped-query attention equals multi-head attention with the K/V heads
repeated, RoPE depends only on relative position, and each operation agrees with a plain
scalar loop written after ggml's C code.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import attrs
import model_reference as _reference
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, TokenType, quants

from realm.testing import WEIGHT_TYPES, write_test_model, write_vocab_only

ROPE_NEOX = _reference.ROPE_NEOX
ROPE_NORMAL = _reference.ROPE_NORMAL
RefModel = _reference.RefModel
attention = _reference.attention
reference_logits = _reference.reference_logits
rms_norm = _reference.rms_norm
rope = _reference.rope

EXACT = 1e-9  # float64 re-orderings of the same sums (incremental vs one-shot)
SAME_ROWS = 1e-12  # the same row computed inside matrices of different heights


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small model per architecture (F32, so the reference reads exact values)."""
    root = tmp_path_factory.mktemp("models")
    return {
        arch: write_test_model(root / f"{arch}.gguf", arch=arch, wtype="F32", seed=1)
        for arch in ("llama", "qwen2")
    }


def token_ids(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab_size, n).tolist()


# --- incremental state -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_token_by_token_equals_one_shot(models: dict[str, Path], arch: str) -> None:
    model = RefModel(models[arch])
    ids = token_ids(12, model.hparams.vocab_size)
    one_shot = model.logits(ids)
    cache = model.new_cache()
    stepwise = np.concatenate([model.step([t], cache) for t in ids])
    assert cache.n_past == len(ids)
    np.testing.assert_allclose(stepwise, one_shot, rtol=0, atol=EXACT)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefill_then_decode_in_chunks(models: dict[str, Path], arch: str) -> None:
    model = RefModel(models[arch])
    ids = token_ids(11, model.hparams.vocab_size)
    cache = model.new_cache()
    chunks = [ids[:5], ids[5:6], ids[6:9], [], ids[9:]]
    chunked = np.concatenate([model.step(chunk, cache) for chunk in chunks])
    np.testing.assert_allclose(chunked, model.logits(ids), rtol=0, atol=EXACT)


def test_truncated_cache_redecodes(models: dict[str, Path]) -> None:
    model = RefModel(models["llama"])
    ids = token_ids(8, model.hparams.vocab_size)
    other = token_ids(3, model.hparams.vocab_size, seed=1)
    cache = model.new_cache()
    model.step(ids, cache)
    cache.truncate(5)
    resumed = model.step(other, cache)
    expected = model.logits(ids[:5] + other)[5:]
    np.testing.assert_allclose(resumed, expected, rtol=0, atol=EXACT)
    with pytest.raises(ValueError, match="n_past"):
        cache.truncate(9)


def test_reference_logits_is_a_fresh_context(models: dict[str, Path]) -> None:
    model = RefModel(models["qwen2"])
    ids = token_ids(4, model.hparams.vocab_size)
    logits = reference_logits(models["qwen2"], ids)
    assert logits.shape == (4, model.hparams.vocab_size)
    assert logits.dtype == np.float64
    np.testing.assert_array_equal(logits, model.logits(ids))


@pytest.mark.parametrize("bad", [[-1], [10**6]])
def test_reference_rejects_bad_ids(models: dict[str, Path], bad: list[int]) -> None:
    with pytest.raises(ValueError, match="token ids"):
        reference_logits(models["llama"], bad)


# --- attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_attention_is_causal(models: dict[str, Path], arch: str) -> None:
    model = RefModel(models[arch])
    ids = token_ids(10, model.hparams.vocab_size)
    changed = ids[:6] + token_ids(4, model.hparams.vocab_size, seed=7)
    before, after = model.logits(ids), model.logits(changed)
    np.testing.assert_allclose(after[:6], before[:6], rtol=0, atol=SAME_ROWS)
    assert np.abs(after[6:] - before[6:]).max(axis=1).min() > 1e-3  # every later row moved


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_equals_mha_with_repeated_kv_heads(tmp_path: Path, n_kv_heads: int) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_heads=4, n_kv_heads=n_kv_heads, wtype="F32")
    gqa = RefModel(path)
    hp = gqa.hparams
    assert hp.n_kv_heads == n_kv_heads
    assert gqa.weights["blk.0.attn_k.weight"].shape == (n_kv_heads * hp.head_dim, hp.n_embd)

    # query head h reads kv head h // (n_heads / n_kv_heads): repeat each K/V head that often
    mha = RefModel(path)
    mha.hparams = attrs.evolve(hp, n_kv_heads=hp.n_heads)
    group = hp.n_heads // n_kv_heads
    for name, w in gqa.weights.items():
        if ".attn_k." in name or ".attn_v." in name:
            heads = w.reshape(n_kv_heads, hp.head_dim, *w.shape[1:])
            mha.weights[name] = np.repeat(heads, group, axis=0).reshape(-1, *w.shape[1:])
    ids = token_ids(9, hp.vocab_size)
    np.testing.assert_allclose(gqa.logits(ids), mha.logits(ids), rtol=0, atol=EXACT)


def attention_loop(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_past: int) -> np.ndarray:
    """Scalar attention, one query head and position at a time (ggml's kq, soft_max, kqv)."""
    n_tokens, n_heads, head_dim = q.shape
    group = n_heads // k.shape[1]
    out = np.zeros((n_tokens, n_heads, head_dim))
    for t in range(n_tokens):
        for h in range(n_heads):
            seen = range(n_past + t + 1)
            scores = [float(q[t, h] @ k[s, h // group]) / np.sqrt(head_dim) for s in seen]
            top = max(scores)
            weights = [np.exp(s - top) for s in scores]
            total = sum(weights)
            for s, weight in zip(seen, weights, strict=True):
                out[t, h] += weight / total * v[s, h // group]
    return out.reshape(n_tokens, n_heads * head_dim)


@pytest.mark.parametrize(("n_heads", "n_kv_heads"), [(4, 1), (4, 2), (4, 4), (6, 3)])
@pytest.mark.parametrize("n_past", [0, 3])
def test_attention_matches_scalar_loop(n_heads: int, n_kv_heads: int, n_past: int) -> None:
    rng = np.random.default_rng(n_heads * 10 + n_kv_heads + n_past)
    n_tokens, head_dim = 4, 8
    q = rng.standard_normal((n_tokens, n_heads, head_dim))
    k = rng.standard_normal((n_past + n_tokens, n_kv_heads, head_dim))
    v = rng.standard_normal((n_past + n_tokens, n_kv_heads, head_dim))
    np.testing.assert_allclose(
        attention(q, k, v, n_past), attention_loop(q, k, v, n_past), rtol=0, atol=1e-12
    )


# --- RoPE, RMSNorm, biases -------------------------------------------------------------------


def rope_loop(x: np.ndarray, pos: int, base: float, n_rot: int, mode: str) -> np.ndarray:
    """One head at one position, as ggml's rope_f32 loops (theta *= theta_scale per pair)."""
    out = np.array(x, dtype=np.float64)
    theta_scale = base ** (-2.0 / n_rot)
    theta = float(pos)
    for i in range(n_rot // 2):
        a, b = (2 * i, 2 * i + 1) if mode == ROPE_NORMAL else (i, i + n_rot // 2)
        c, s = np.cos(theta), np.sin(theta)
        out[a], out[b] = x[a] * c - x[b] * s, x[a] * s + x[b] * c
        theta *= theta_scale
    return out


@pytest.mark.parametrize("mode", [ROPE_NORMAL, ROPE_NEOX])
@pytest.mark.parametrize("n_rot", [16, 8])
def test_rope_matches_scalar_loop(mode: str, n_rot: int) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3, 16))  # n_rot 8 < head_dim 16: the tail passes through
    positions = np.array([0, 1, 2, 17, 255])
    got = rope(x, positions, base=10000.0, n_rot=n_rot, mode=mode)
    for t, pos in enumerate(positions):
        for h in range(3):
            want = rope_loop(x[t, h], int(pos), 10000.0, n_rot, mode)
            np.testing.assert_allclose(got[t, h], want, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got[0], x[0])  # position 0 is the identity
    np.testing.assert_array_equal(got[..., n_rot:], x[..., n_rot:])


@pytest.mark.parametrize("mode", [ROPE_NORMAL, ROPE_NEOX])
def test_rope_scores_depend_on_relative_position(mode: str) -> None:
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((2, 1, 1, 32))

    def score(m: int, n: int) -> float:
        rq = rope(q, np.array([m]), base=500.0, n_rot=32, mode=mode)
        rk = rope(k, np.array([n]), base=500.0, n_rot=32, mode=mode)
        return float(rq.ravel() @ rk.ravel())

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-12)
    assert score(7, 3) != pytest.approx(score(8, 3), abs=1e-6)


def test_neox_is_normal_rope_on_deinterleaved_pairs() -> None:
    x = np.random.default_rng(5).standard_normal((3, 2, 16))
    positions = np.array([1, 5, 9])
    # pair i is (x[2i], x[2i+1]) in normal mode and (x[i], x[i+8]) in NeoX mode
    interleave = np.stack([np.arange(8), np.arange(8) + 8], axis=1).ravel()
    normal = rope(x[..., interleave], positions, base=10000.0, n_rot=16, mode=ROPE_NORMAL)
    neox = rope(x, positions, base=10000.0, n_rot=16, mode=ROPE_NEOX)
    np.testing.assert_allclose(normal, neox[..., interleave], rtol=0, atol=1e-15)


def test_rms_norm() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    weight = np.array([2.0, -1.0])
    out = rms_norm(x, weight, 1e-5)
    scale = 1.0 / np.sqrt(12.5 + 1e-5)
    np.testing.assert_allclose(out[0], [6.0 * scale, -4.0 * scale], rtol=1e-15)
    np.testing.assert_array_equal(out[1], [0.0, 0.0])


def test_qwen2_biases_are_used(models: dict[str, Path]) -> None:
    model = RefModel(models["qwen2"])
    assert model.hparams.rope_mode == ROPE_NEOX
    ids = token_ids(6, model.hparams.vocab_size)
    with_biases = model.logits(ids)
    for part in ("q", "k", "v"):
        edited = RefModel(models["qwen2"])
        edited.weights[f"blk.1.attn_{part}.bias"][:] = 0.0
        assert np.abs(edited.logits(ids) - with_biases).max() > 1e-4, part
    assert not any(".bias" in name for name in RefModel(models["llama"]).weights)
    assert RefModel(models["llama"]).hparams.rope_mode == ROPE_NORMAL


def test_tied_embeddings_use_token_embd(tmp_path: Path) -> None:
    untied = RefModel(write_test_model(tmp_path / "untied.gguf", wtype="F32", seed=2))
    tied = RefModel(
        write_test_model(tmp_path / "tied.gguf", wtype="F32", seed=2, tied_embeddings=True)
    )
    assert "output.weight" not in tied.weights
    untied.weights["output.weight"] = untied.weights["token_embd.weight"]
    ids = token_ids(5, tied.hparams.vocab_size)
    np.testing.assert_array_equal(tied.logits(ids), untied.logits(ids))


@pytest.mark.parametrize("n_layers", [2, 8])
def test_activations_stay_order_one(tmp_path: Path, n_layers: int) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_layers=n_layers, n_embd=128, n_ff=256)
    model = RefModel(path)
    logits = model.logits(token_ids(16, model.hparams.vocab_size))
    assert 0.3 < logits.std() < 3.0
    assert np.abs(logits).max() < 20.0


# --- the files -------------------------------------------------------------------------------


def expected_tensors(
    arch: str, n_layers: int, n_embd: int, n_q: int, n_kv: int, n_ff: int, vocab: int, tied: bool
) -> dict[str, tuple[int, ...]]:
    """Tensor name → GGML shape (ne0 = row length first), as llama.cpp's loader checks them."""
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_embd, vocab)}
    for i in range(n_layers):
        b = f"blk.{i}"
        shapes |= {
            f"{b}.attn_norm.weight": (n_embd,),
            f"{b}.attn_q.weight": (n_embd, n_q),
            f"{b}.attn_k.weight": (n_embd, n_kv),
            f"{b}.attn_v.weight": (n_embd, n_kv),
            f"{b}.attn_output.weight": (n_q, n_embd),
            f"{b}.ffn_norm.weight": (n_embd,),
            f"{b}.ffn_gate.weight": (n_embd, n_ff),
            f"{b}.ffn_up.weight": (n_embd, n_ff),
            f"{b}.ffn_down.weight": (n_ff, n_embd),
        }
        if arch == "qwen2":
            shapes |= {
                f"{b}.attn_q.bias": (n_q,),
                f"{b}.attn_k.bias": (n_kv,),
                f"{b}.attn_v.bias": (n_kv,),
            }
    shapes["output_norm.weight"] = (n_embd,)
    if not tied:
        shapes["output.weight"] = (n_embd, vocab)
    return shapes


def field(reader: GGUFReader, key: str) -> Any:
    found = reader.get_field(key)
    assert found is not None, key
    return found.contents()


@pytest.mark.parametrize(
    ("arch", "wtype", "tied"),
    [("llama", "Q8_0", False), ("llama", "BF16", True), ("qwen2", "Q4_0", False)],
)
def test_file_layout(tmp_path: Path, arch: str, wtype: str, tied: bool) -> None:
    path = write_test_model(
        tmp_path / "m.gguf",
        arch=arch,
        wtype=wtype,
        tied_embeddings=tied,
        n_layers=3,
        n_embd=96,
        n_heads=6,
        n_kv_heads=2,
        n_ff=160,
        vocab_size=700,
        context_length=512,
        rope_base=500000.0,
        rms_eps=1e-6,
    )
    reader = GGUFReader(path)
    ggml_type, file_type = WEIGHT_TYPES[wtype]
    expected = expected_tensors(arch, 3, 96, 96, 32, 160, 700, tied)
    assert sorted(t.name for t in reader.tensors) == sorted(expected)
    for tensor in reader.tensors:
        shape = expected[tensor.name]
        assert tuple(int(n) for n in tensor.shape) == shape, tensor.name  # GGML order
        if len(shape) == 1:
            assert tensor.tensor_type == GGMLQuantizationType.F32, tensor.name
            assert tensor.data.shape == shape
        else:
            assert tensor.tensor_type == ggml_type, tensor.name
            n_in, n_out = shape
            # numpy order, rows of raw bytes for the block types
            block, block_bytes = GGML_QUANT_SIZES[ggml_type]
            assert tensor.data.shape == (n_out, n_in // block * block_bytes), tensor.name
            assert tensor.data.dtype == np.uint8
    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.file_type") == file_type
    assert field(reader, f"{arch}.block_count") == 3
    assert field(reader, f"{arch}.embedding_length") == 96
    assert field(reader, f"{arch}.feed_forward_length") == 160
    assert field(reader, f"{arch}.attention.head_count") == 6
    assert field(reader, f"{arch}.attention.head_count_kv") == 2
    assert field(reader, f"{arch}.context_length") == 512
    assert field(reader, f"{arch}.rope.dimension_count") == 16
    assert field(reader, f"{arch}.rope.freq_base") == 500000.0
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == np.float32(1e-6)
    assert field(reader, f"{arch}.vocab_size") == 700
    assert len(field(reader, "tokenizer.ggml.tokens")) == 700


def test_default_file_is_llama_q8_0(tmp_path: Path) -> None:
    reader = GGUFReader(write_test_model(tmp_path / "m.gguf"))
    weights = {t.name: t for t in reader.tensors}
    q = weights["blk.0.attn_q.weight"]
    assert q.tensor_type == GGMLQuantizationType.Q8_0
    assert [int(n) for n in q.shape] == [64, 64]
    assert q.data.shape == (64, 68)  # 64 values per row = 2 blocks of (fp16 scale + 32 int8)
    assert [int(n) for n in weights["blk.1.attn_k.weight"].shape] == [64, 32]
    assert [int(n) for n in weights["blk.1.ffn_down.weight"].shape] == [128, 64]
    assert field(reader, "llama.rope.dimension_count") == 16


@pytest.mark.parametrize("wtype", list(WEIGHT_TYPES))
def test_every_wtype_round_trips(tmp_path: Path, wtype: str) -> None:
    """The same seed draws the same weights for every wtype; the file holds exactly their
    gguf.quants encoding, and dequantizing what GGUFReader returns gives it back."""
    exact = GGUFReader(write_test_model(tmp_path / "f32.gguf", arch="qwen2", wtype="F32"))
    typed = GGUFReader(write_test_model(tmp_path / "typed.gguf", arch="qwen2", wtype=wtype))
    ggml_type, _ = WEIGHT_TYPES[wtype]
    assert [t.name for t in typed.tensors] == [t.name for t in exact.tensors]
    for original, stored in zip(exact.tensors, typed.tensors, strict=True):
        values = np.array(original.data, dtype=np.float32)
        if values.ndim == 1:
            assert stored.tensor_type == GGMLQuantizationType.F32
            np.testing.assert_array_equal(stored.data, values)
            continue
        encoded = quants.quantize(values, ggml_type)
        np.testing.assert_array_equal(stored.data, encoded, err_msg=original.name)
        decoded = quants.dequantize(stored.data, stored.tensor_type)
        assert decoded.shape == values.shape
        np.testing.assert_array_equal(decoded, quants.dequantize(encoded, ggml_type))
        if wtype != "F32":  # a real rounding happened, and a small one
            error = np.abs(decoded - values).max() / np.abs(values).max()
            assert 0 < error < 0.15, original.name


def test_same_seed_same_file_other_seed_other_weights(tmp_path: Path) -> None:
    a = write_test_model(tmp_path / "a.gguf", seed=5)
    b = write_test_model(tmp_path / "b.gguf", seed=5)
    c = write_test_model(tmp_path / "c.gguf", seed=6)
    assert a.read_bytes() == b.read_bytes()
    wa, wc = RefModel(a).weights, RefModel(c).weights
    assert not np.array_equal(wa["blk.0.attn_q.weight"], wc["blk.0.attn_q.weight"])


# --- tokenizer metadata ----------------------------------------------------------------------


def read_vocab(reader: GGUFReader) -> tuple[list[str], list[float], list[int]]:
    return (
        field(reader, "tokenizer.ggml.tokens"),
        field(reader, "tokenizer.ggml.scores"),
        field(reader, "tokenizer.ggml.token_type"),
    )


def test_spm_vocabulary(tmp_path: Path) -> None:
    reader = GGUFReader(write_test_model(tmp_path / "m.gguf"))
    tokens, scores, types = read_vocab(reader)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert field(reader, "tokenizer.ggml.unknown_token_id") == 0
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.ggml.add_eos_token") is False
    assert len(tokens) == len(scores) == len(types) == field(reader, "llama.vocab_size")
    assert len(set(tokens)) == len(tokens)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert types[:3] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[3:259]) == {TokenType.BYTE}
    pieces = tokens[259:]
    assert set(types[259:]) == {TokenType.NORMAL}
    assert all(a > b for a, b in itertools.pairwise(scores[259:]))
    for word in ("▁the", "▁and", "▁river", "▁", "e", ","):
        assert word in pieces, word
    # every longer piece is a merge of two pieces of the vocabulary (what SPM merging needs)
    vocab = set(pieces)
    for piece in pieces:
        if len(piece) > 1:
            splits = ((piece[:i], piece[i:]) for i in range(1, len(piece)))
            assert any(a in vocab and b in vocab for a, b in splits), piece


def test_vocab_size_pads_or_trims(tmp_path: Path) -> None:
    natural, _, _ = read_vocab(GGUFReader(write_test_model(tmp_path / "n.gguf", wtype="F32")))
    big = GGUFReader(write_test_model(tmp_path / "b.gguf", wtype="F32", vocab_size=1000))
    tokens, _, types = read_vocab(big)
    assert len(tokens) == 1000
    assert tokens[: len(natural)] == natural
    assert tokens[-1] == "[PAD999]"
    assert set(types[len(natural) :]) == {TokenType.UNUSED}
    small = GGUFReader(write_test_model(tmp_path / "s.gguf", wtype="F32", vocab_size=400))
    tokens, _, _ = read_vocab(small)
    assert len(tokens) == 400
    assert set(tokens) <= set(natural)
    embd = next(t for t in small.tensors if t.name == "token_embd.weight")
    assert [int(n) for n in embd.shape] == [64, 400]


def test_no_tokenizer(tmp_path: Path) -> None:
    reader = GGUFReader(write_test_model(tmp_path / "m.gguf", tokenizer="none", vocab_size=100))
    assert not [key for key in reader.fields if key.startswith("tokenizer.")]
    assert field(reader, "llama.vocab_size") == 100
    assert RefModel(tmp_path / "m.gguf").logits([99]).shape == (1, 100)


def test_vocab_only(tmp_path: Path) -> None:
    vocab = GGUFReader(write_vocab_only(tmp_path / "v.gguf"))
    model = GGUFReader(write_test_model(tmp_path / "m.gguf"))
    assert len(vocab.tensors) == 0
    assert read_vocab(vocab) == read_vocab(model)
    for key in [k for k in model.fields if k.startswith("tokenizer.")]:
        assert field(vocab, key) == field(model, key), key
    with pytest.raises(ValueError, match="tokenizer"):
        write_vocab_only(tmp_path / "x.gguf", "none")
    with pytest.raises(ValueError, match="vocab_size"):
        write_vocab_only(tmp_path / "x.gguf", vocab_size=10)


# --- argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"arch": "gpt2"}, "arch"),
        ({"wtype": "Q4_K"}, "wtype"),
        ({"wtype": "q8_0"}, "wtype"),
        ({"tokenizer": "bpe"}, "tokenizer"),
        ({"n_layers": 0}, "n_layers"),
        ({"n_embd": -64}, "n_embd"),
        ({"n_embd": 64.0}, "n_embd"),
        ({"n_heads": True}, "n_heads"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"n_kv_heads": 8}, "n_kv_heads"),
        ({"n_ff": 0}, "n_ff"),
        ({"context_length": 0}, "context_length"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"vocab_size": 300}, "vocab_size"),  # below specials + bytes + characters
        ({"seed": -1}, "seed"),
        ({"rope_base": 0.0}, "rope_base"),
        ({"rope_base": float("inf")}, "rope_base"),
        ({"rms_eps": float("nan")}, "rms_eps"),
        ({"rms_eps": "1e-5"}, "rms_eps"),
        ({"tied_embeddings": 1}, "tied_embeddings"),
        ({"n_embd": 60, "n_heads": 8}, "n_heads"),  # not a multiple
        ({"n_embd": 36, "n_heads": 4, "wtype": "F32"}, "even"),  # head_dim 9
        ({"n_embd": 48, "n_heads": 4}, "n_embd"),  # not a multiple of 32 for Q8_0
        ({"n_ff": 100, "wtype": "Q4_0"}, "n_ff"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        write_test_model(tmp_path / "m.gguf", **kwargs)
    assert not (tmp_path / "m.gguf").exists()


def test_unquantized_types_allow_any_even_head_dim(tmp_path: Path) -> None:
    path = write_test_model(
        tmp_path / "m.gguf", n_embd=36, n_heads=3, n_kv_heads=1, n_ff=20, wtype="F16"
    )
    model = RefModel(path)
    assert model.hparams.head_dim == 12
    assert np.isfinite(model.logits([1, 2, 3])).all()
