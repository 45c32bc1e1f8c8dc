"""LoRA adapters (realm/model/_lora.py, native/lora.c): applied per sequence at step time.

References: the same model with every adapted weight merged (``W + scale * B A``, float64 math
in float32 weights) run through the same native graph; llama.cpp on the same two files, when
llama-cpp-python is installed (it skips loudly otherwise, like test_llama_cpp.py). Measured
2026-12-07 with llama-cpp-python 0.3.36 (rank 8, alpha 16, user scale 0.75, all projections
and the output; the adapter moves the logits by 18%): relative error 3e-4 (F32 model and
adapter), 5e-4 (F16), 1.4e-2 (Q8_0), same argmax at every position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import gguf
import numpy as np
import pytest

import realm
from realm import ModelError
from realm.kernels import Matrix, NativeTransformer, SeqStep
from realm.model import Adapter, load_adapter, save_adapter
from realm.testing import write_test_model

IDS = [1, 5, 9, 200, 17, 3, 42, 300, 7, 11]
ROLES = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
         "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}  # fmt: skip


def random_pairs(
    model: realm.model.Model, rank: int, *, seed: int, targets: tuple[str, ...] = tuple(ROLES),
    output: bool = True, std: float = 0.1,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    s = model.spec
    qd = s.n_heads * s.head_dim
    dims = {"attn_q": (qd, s.n_embd), "attn_k": (s.kv_dim, s.n_embd),
            "attn_v": (s.kv_dim, s.n_embd), "attn_output": (s.n_embd, qd),
            "ffn_gate": (s.n_ff, s.n_embd), "ffn_up": (s.n_ff, s.n_embd),
            "ffn_down": (s.n_embd, s.n_ff)}  # fmt: skip
    rng = np.random.default_rng(seed)
    pairs = {}
    for layer in range(s.n_layers):
        for t in targets:
            n_out, n_in = dims[t]
            pairs[f"blk.{layer}.{t}.weight"] = (
                rng.normal(0, std, (rank, n_in)),
                rng.normal(0, std, (n_out, rank)),
            )
    if output:
        pairs["output.weight"] = (
            rng.normal(0, std, (rank, s.n_embd)),
            rng.normal(0, std, (s.n_vocab, rank)),
        )
    return pairs


def stored(pairs: dict[str, Any], wtype: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The pairs as the file holds them (rounded to its type)."""
    kind = getattr(gguf.GGMLQuantizationType, wtype)

    def r(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if wtype == "F16" or (wtype == "Q8_0" and x.shape[1] % 32):
            return x.astype(np.float16).astype(np.float64)
        if wtype == "Q8_0":
            return gguf.quants.dequantize(gguf.quants.quantize(x, kind), kind).astype(np.float64)
        return x.astype(np.float64)

    return {k: (r(a), r(b)) for k, (a, b) in pairs.items()}


def merged_logits(
    model: realm.model.Model, pairs: dict[str, Any], scale: float, ids: list[int] = IDS
) -> np.ndarray:
    """Logits of ``ids`` with every pair merged into float32 weights (the reference)."""
    mf = model._file
    layers = []
    for layer in range(model.spec.n_layers):
        lw = model.layer_weights(layer)
        changed = {}
        for t, role in ROLES.items():
            key = f"blk.{layer}.{t}.weight"
            if key in pairs:
                a, b = pairs[key]
                w = np.asarray(getattr(lw, role).data, np.float64) + scale * (b @ a)
                changed[role] = Matrix.of(np.ascontiguousarray(w, np.float32))
        layers.append(attrs.evolve(lw, **changed))
    out = mf.matrix("output.weight")
    if "output.weight" in pairs:
        a, b = pairs["output.weight"]
        w = np.asarray(out.data, np.float64) + scale * (b @ a)
        out = Matrix.of(np.ascontiguousarray(w, np.float32))
    nt = NativeTransformer(
        model.spec, tok_embd=mf.matrix("token_embd.weight"),
        output_norm=mf.vector("output_norm.weight"), output=out, layers=layers,
    )  # fmt: skip
    logits = np.empty((len(ids), model.spec.n_vocab), np.float32)
    nt.forward([SeqStep(np.array(ids, np.int32), 0, nt.new_kv(len(ids)), logits)])
    return logits


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory: pytest.TempPathFactory) -> realm.model.Model:
    path = write_test_model(tmp_path_factory.mktemp("lora") / "m.gguf", wtype="F32", n_layers=2)
    return realm.load_model(path)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("wtype", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize(
    ("rank", "alpha", "scale"), [(4, 8.0, 0.5), (32, 0.0, 1.0), (1, 2.0, -1.5)]
)
def test_adapter_equals_merged_weights(
    f32_model: realm.model.Model, tmp_path: Path, wtype: str, rank: int, alpha: float,
    scale: float,
) -> None:  # fmt: skip
    pairs = random_pairs(f32_model, rank, seed=rank)
    path = save_adapter(tmp_path / "a.gguf", pairs, arch="llama", alpha=alpha, wtype=wtype)
    ad = load_adapter(path, f32_model, scale=scale)
    assert ad.rank == rank and ad.alpha == alpha and len(ad.tensors) == len(pairs)
    ours = f32_model.logits(IDS, adapter=ad)
    base = f32_model.logits(IDS)
    ref = merged_logits(f32_model, stored(pairs, wtype), scale * alpha / rank if alpha else scale)
    assert rel(ours, base) > 1e-2  # the adapter changes the output
    # Q8_0 A quantizes the activations to 8 bits, as llama.cpp does
    assert rel(ours, ref) < (2e-2 if wtype == "Q8_0" else 1e-4)


def test_every_isa_level(f32_model: realm.model.Model, tmp_path: Path, isa: object) -> None:
    """The scalar reference and the SIMD levels give the merged weights' logits."""
    pairs = random_pairs(f32_model, 12, seed=7)
    for wtype in ("F32", "F16"):
        path = save_adapter(tmp_path / f"{wtype}.gguf", pairs, arch="llama", alpha=6, wtype=wtype)
        ad = f32_model.load_adapter(path)
        ours = f32_model.logits(IDS, adapter=ad)  # prefill rows: the matmul path
        assert rel(ours, merged_logits(f32_model, stored(pairs, wtype), 0.5)) < 1e-4
        few = IDS[:3]  # a group of few rows: the dot-product path
        ref = merged_logits(f32_model, stored(pairs, wtype), 0.5, few)
        assert rel(f32_model.logits(few, adapter=ad), ref) < 1e-4


def test_only_some_weights(f32_model: realm.model.Model, tmp_path: Path) -> None:
    pairs = random_pairs(f32_model, 8, seed=3, targets=("attn_q", "attn_v"), output=False)
    path = save_adapter(tmp_path / "qv.gguf", pairs, arch="llama", alpha=16, wtype="F32")
    ad = f32_model.load_adapter(path)
    ref = merged_logits(f32_model, stored(pairs, "F32"), 16 / 8)
    assert rel(f32_model.logits(IDS, adapter=ad), ref) < 1e-4


def test_rows_of_other_sequences_untouched(f32_model: realm.model.Model, tmp_path: Path) -> None:
    """One step: rows with adapter X, Y, none, X again: each equals its solo run."""
    m = f32_model
    x = m.load_adapter(save_adapter(tmp_path / "x.gguf", random_pairs(m, 4, seed=1), arch="llama",
                                    wtype="F32"))  # fmt: skip
    y = m.load_adapter(save_adapter(tmp_path / "y.gguf", random_pairs(m, 16, seed=2),
                                    arch="llama", alpha=4, wtype="F16"))  # fmt: skip
    prompts = [IDS[:3], IDS[2:7], IDS[1:5], IDS[4:6], IDS]
    adapters: list[Adapter | None] = [x, y, None, x, y]
    solo = []
    for ids, ad in zip(prompts, adapters, strict=True):
        with m.open_session(adapter=ad) as s:
            first = s.extend(ids, logits="all")
            solo.append((first, s.extend([12], logits="last")))
    sessions = [m.open_session(adapter=ad) for ad in adapters]
    try:
        firsts = m.step([(s, ids, "all") for s, ids in zip(sessions, prompts, strict=True)])
        seconds = m.step([(s, [12], "last") for s in sessions])  # a batched decode step
        for (f0, s0), f1, s1 in zip(solo, firsts, seconds, strict=True):
            assert f1 is not None and s1 is not None
            np.testing.assert_allclose(f1, f0, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(s1, s0, rtol=1e-4, atol=1e-4)
        assert rel(seconds[0], seconds[2]) > 1e-3  # X's row differs from the base row
    finally:
        for s in sessions:
            s.close()


def test_quantized_base_with_adapter(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "q.gguf", wtype="Q8_0", n_layers=2)
    m = realm.load_model(path)
    pairs = random_pairs(m, 8, seed=5)
    ad = m.load_adapter(save_adapter(tmp_path / "a.gguf", pairs, arch="llama", alpha=8,
                                     wtype="Q8_0"))  # fmt: skip
    assert ad.nbytes > 0
    assert rel(m.logits(IDS, adapter=ad), m.logits(IDS)) > 1e-2


# --- bad files and bad use ------------------------------------------------------------------


def _write(path: Path, tensors: dict[str, np.ndarray], **kv: Any) -> Path:
    w = gguf.GGUFWriter(str(path), kv.pop("arch", "llama"))
    if kv.pop("adapter", True):
        w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, kv.pop("kind", "lora"))
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_adapter_files(f32_model: realm.model.Model, tmp_path: Path) -> None:
    m = f32_model
    s = m.spec
    a = np.zeros((4, s.n_embd), np.float32)
    b = np.zeros((s.n_heads * s.head_dim, 4), np.float32)
    bk = np.zeros((s.kv_dim, 4), np.float32)
    q, k = "blk.0.attn_q.weight", "blk.0.attn_k.weight"
    e = "token_embd.weight"
    pair = {q + ".lora_a": a, q + ".lora_b": b}
    cases = {
        "no such adapter file": None,
        "not an adapter file": _write(tmp_path / "1.gguf", pair, adapter=False),
        "only 'lora'": _write(tmp_path / "2.gguf", pair, kind="control_vector"),
        "an adapter for 'qwen2'": _write(tmp_path / "3.gguf", pair, arch="qwen2"),
        "are A and B swapped": _write(tmp_path / "4.gguf", {k + ".lora_a": bk.T.copy(),
                                                            k + ".lora_b": a.T.copy()}),
        "has no lora_b": _write(tmp_path / "5.gguf", {q + ".lora_a": a}),
        "token_embd.weight are not supported": _write(
            tmp_path / "6.gguf", {e + ".lora_a": a, e + ".lora_b": a.T.copy()}),
        "not a weight of the model": _write(
            tmp_path / "7.gguf", {k.replace("0", "9") + ".lora_a": a,
                                  k.replace("0", "9") + ".lora_b": bk}),
        "not a .lora_a or .lora_b": _write(tmp_path / "8.gguf", {q: a}),
        "must be F32, F16 or Q8_0": _write(
            tmp_path / "9.gguf", {q + ".lora_a": a.astype(np.float64), q + ".lora_b": b}),
        "has no tensors": _write(tmp_path / "10.gguf", {}),
        "rank 4 but lora_b 3": _write(
            tmp_path / "11.gguf", {q + ".lora_a": a, q + ".lora_b": b[:, :3].copy()}),
    }  # fmt: skip
    for message, path in cases.items():
        with pytest.raises(ModelError, match=message):
            load_adapter(path or tmp_path / "missing.gguf", m)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 40)
    with pytest.raises(ModelError, match="not a readable GGUF"):
        load_adapter(tmp_path / "junk.gguf", m)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), True, "1", 1e9])
def test_bad_scale(f32_model: realm.model.Model, tmp_path: Path, scale: Any) -> None:
    path = save_adapter(tmp_path / "a.gguf", random_pairs(f32_model, 2, seed=0), arch="llama")
    with pytest.raises(ModelError, match="scale"):
        load_adapter(path, f32_model, scale=scale)


def test_session_adapter_rules(f32_model: realm.model.Model, tmp_path: Path) -> None:
    m = f32_model
    ad = m.load_adapter(save_adapter(tmp_path / "a.gguf", random_pairs(m, 2, seed=0),
                                     arch="llama"))  # fmt: skip
    other = realm.load_model(m.path)
    with pytest.raises(ModelError, match="another model"):
        other.open_session(adapter=ad)
    with pytest.raises(ModelError, match="an Adapter"):
        m.open_session(adapter="a.gguf")  # type: ignore[arg-type]
    with m.open_session(adapter=ad) as s:
        s.extend(IDS[:3])
        with pytest.raises(ModelError, match="only while it is empty"):
            s.adapter = None
        s.rewind(0)
        s.adapter = None  # an empty session may switch
        assert s.fork().adapter is None


# --- the peer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("wtype", ["F32", "F16", "Q8_0"])
def test_logits_match_llama_cpp(tmp_path: Path, wtype: str) -> None:
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed: the peer check of LoRA logits did not run")
    path = write_test_model(tmp_path / "m.gguf", wtype=wtype, n_layers=3)
    m = realm.load_model(path)
    pairs = random_pairs(m, 8, seed=11, std=0.05)
    apath = save_adapter(tmp_path / "a.gguf", pairs, arch="llama", alpha=16, wtype=wtype)
    llm = llama_cpp.Llama(
        model_path=str(path), lora_path=str(apath), lora_scale=0.75, n_ctx=64, n_batch=64,
        logits_all=True, n_threads=2, verbose=False,
    )  # fmt: skip
    llm.eval(IDS)
    theirs = np.array(llm.scores[: len(IDS)], dtype=np.float32)
    ours = m.logits(IDS, adapter=m.load_adapter(apath, scale=0.75))
    assert rel(ours, m.logits(IDS)) > 1e-2
    # Q8_0: both sides quantize activations to 8 bits, with different scale rounding
    assert rel(ours, theirs) < (3e-2 if wtype == "Q8_0" else 2e-3)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("wtype", ["F16", "Q8_0"])
def test_verify_steps_are_row_invariant(
    f32_model: realm.model.Model, tmp_path: Path, wtype: str
) -> None:
    """A "verify" step (speculative decoding's check) with an adapter gives each position
    exactly the logits that one-token steps give it."""
    m = f32_model
    pairs = random_pairs(m, 16, seed=9)
    ad = m.load_adapter(save_adapter(tmp_path / "a.gguf", pairs, arch="llama", wtype=wtype))
    with m.open_session(adapter=ad) as s:
        s.extend(IDS[:4])
        t = s.fork()
        draft = IDS[4:10]
        together = s.model.step([(s, draft, "verify")])[0]
        alone = np.stack([t.extend([tok], logits="last") for tok in draft])
        t.close()
    assert together is not None
    np.testing.assert_array_equal(together, alone)


def test_paged_model_and_partial_adapter(f32_model: realm.model.Model, tmp_path: Path) -> None:
    """An adapter on one layer only, on a model whose blocks are paged under a byte budget."""
    pairs = {k: v for k, v in random_pairs(f32_model, 4, seed=13).items() if k.startswith("blk.1.")}
    path = save_adapter(tmp_path / "one.gguf", pairs, arch="llama", alpha=4, wtype="F32")
    ref = merged_logits(f32_model, stored(pairs, "F32"), 1.0)
    paged = realm.load_model(f32_model.path, max_resident_bytes=1)
    assert paged.pager is not None
    ad = paged.load_adapter(path)
    assert ad.tensors == tuple(sorted(pairs))
    assert rel(paged.logits(IDS, adapter=ad), ref) < 1e-4


def test_fused_phi3_weights(tmp_path: Path) -> None:
    """phi3's attn_qkv and double-height ffn_up: one A, B's rows split as the weight's."""
    m = realm.load_model(write_test_model(tmp_path / "phi3.gguf", arch="phi3", wtype="F32"))
    s = m.spec
    qd, kvd, ff = s.n_heads * s.head_dim, s.kv_dim, s.n_ff
    rng = np.random.default_rng(17)
    pairs = {}
    for layer in range(s.n_layers):
        pairs[f"blk.{layer}.attn_qkv.weight"] = (
            rng.normal(0, 0.1, (4, s.n_embd)), rng.normal(0, 0.1, (qd + 2 * kvd, 4))
        )  # fmt: skip
        pairs[f"blk.{layer}.ffn_up.weight"] = (
            rng.normal(0, 0.1, (4, s.n_embd)), rng.normal(0, 0.1, (2 * ff, 4))
        )  # fmt: skip
    ad = m.load_adapter(save_adapter(tmp_path / "a.gguf", pairs, arch="phi3", wtype="F32"))
    split = {}  # the same deltas on the parts, as merged_logits names them
    for layer in range(s.n_layers):
        a, b = pairs[f"blk.{layer}.attn_qkv.weight"]
        for name, (lo, hi) in (("attn_q", (0, qd)), ("attn_k", (qd, qd + kvd)),
                               ("attn_v", (qd + kvd, qd + 2 * kvd))):  # fmt: skip
            split[f"blk.{layer}.{name}.weight"] = (a, b[lo:hi])
        a, b = pairs[f"blk.{layer}.ffn_up.weight"]
        split[f"blk.{layer}.ffn_gate.weight"] = (a, b[:ff])
        split[f"blk.{layer}.ffn_up.weight"] = (a, b[ff:])
    ref = merged_logits(m, split, 1.0)
    ours = m.logits(IDS, adapter=ad)
    assert rel(ours, m.logits(IDS)) > 1e-2
    assert rel(ours, ref) < 1e-4
