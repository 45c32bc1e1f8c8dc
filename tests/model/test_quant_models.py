"""Whole models whose matrices are stored in the types published files use (Q4_1, Q5_0, Q5_1,
Q2_K … Q6_K, mixed per tensor as a Q4_K_M file mixes them), against the float64 reference
reading the same stored blocks.

The blocks are random bytes (every bit pattern of the quantized fields occurs) whose
half-precision scales are set so each matrix has the spread of a trained one (standard
deviation 1/sqrt(n_in)); the reference dequantizes them with the ``gguf`` package. Prefill of
20 tokens takes the batched paths (per type and level: the integer GEMM with activations
quantized per 32, the row-streaming dots, or dequantized panels with the activations
themselves; ``kernels.matmul_path`` says which), decoding one token at a time the matvec path,
at every ISA level the CPU has.
"""

from __future__ import annotations

from pathlib import Path

import model_reference as ref
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

import realm
from realm import kernels
from realm.kernels import Isa, WeightType
from realm.testing import write_test_model
from realm.testing.quant_blocks import HALF_FIELDS

LOGITS_RTOL = 5e-2  # relative to max |logit|: what 8-bit activations cost these models
ROUNDING_RTOL = 2e-3  # the same computation in float32 (F32 KV cache) against float64
#: decode against the model of its 8-bit activations: float32 rounding upstream can move an
#: activation across a rounding boundary of its block, and with the K-quants' blocks of 256
#: (one scale for 256 values, as llama.cpp's Q8_K) one such step moved the logits by 2.3e-3
STEP_RTOL = 5e-3
#: prefill on the integer GEMMs against the model of their 8-bit activations per 32: the same
#: boundary effect over 20 positions at once (the Q4_K_M model's own reference moves by
#: 6.4e-3 when its activations are perturbed by 3e-7 relative before rounding)
PREFILL_Q_RTOL = 1.5e-2
IDS = [1, 5, 9, 200, 17, 3, 42, 300, 7, 11, 13, 99, 4, 250, 8, 21, 2, 77, 6, 120]
QK_SPREAD = 0.3  # q and k projections' spread, relative to 1/sqrt(n_in)
#: a Q4_K_M-like mix: which type each matrix gets (token_embd stays Q8_0, as in such files)
MIXES = {
    "Q4_K_M": {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
               "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K", "output": "Q6_K"},
    "Q3_K_M": {"attn_q": "Q3_K", "attn_k": "Q3_K", "attn_v": "Q5_K", "attn_output": "Q4_K",
               "ffn_gate": "Q3_K", "ffn_up": "Q3_K", "ffn_down": "Q5_K", "output": "Q6_K"},
    "Q2_K": {"attn_q": "Q2_K", "attn_k": "Q2_K", "attn_v": "Q3_K", "attn_output": "Q3_K",
             "ffn_gate": "Q2_K", "ffn_up": "Q2_K", "ffn_down": "Q3_K", "output": "Q6_K"},
    "IQ4": {"attn_q": "IQ4_XS", "attn_k": "IQ4_XS", "attn_v": "IQ4_NL", "attn_output": "IQ4_XS",
            "ffn_gate": "IQ4_XS", "ffn_up": "IQ4_NL", "ffn_down": "IQ4_XS", "output": "IQ4_NL"},
    "legacy": {"attn_q": "Q4_1", "attn_k": "Q5_0", "attn_v": "Q5_1", "attn_output": "Q4_1",
               "ffn_gate": "Q5_0", "ffn_up": "Q5_1", "ffn_down": "Q4_1", "output": "Q5_0"},
}  # fmt: skip


def random_blocks(
    wt: WeightType, n_out: int, n_in: int, rng: np.random.Generator, std: float
) -> np.ndarray:
    """Random blocks of type ``wt`` for an ``(n_out, n_in)`` matrix of standard deviation std."""
    nb = n_in // wt.block_elems
    raw = rng.integers(0, 256, (n_out, nb, wt.block_bytes), dtype=np.uint8)
    for off in HALF_FIELDS[wt]:
        half = np.abs(rng.standard_normal((n_out, nb)) * 0.01 + 0.01).astype(np.float16)
        raw[:, :, off : off + 2] = half.view(np.uint8).reshape(n_out, nb, 2)
    raw = raw.reshape(n_out, nb * wt.block_bytes)
    # every value is linear in the scale fields: scale them all by one factor
    factor = std / float(kernels.dequantize(raw, wt).std())
    raw = raw.reshape(n_out, nb, wt.block_bytes)
    for off in HALF_FIELDS[wt]:
        half = raw[:, :, off : off + 2].copy().view(np.float16)
        raw[:, :, off : off + 2] = (
            (half.astype(np.float32) * factor).astype(np.float16).view(np.uint8)
        )
    return raw.reshape(n_out, nb * wt.block_bytes)


def write_mixed_model(
    path: Path, mix: dict[str, str], *, arch: str = "llama", seed: int = 0
) -> Path:
    """A test model (write_test_model's F32 file) with its matrices replaced by random blocks."""
    src = write_test_model(path.with_suffix(".f32.gguf"), arch=arch, wtype="F32", n_embd=256,
                           n_heads=4, n_kv_heads=2, n_ff=512, n_layers=2)  # fmt: skip
    reader = ref.GGUFReader(src)
    writer = GGUFWriter(path, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if field.types[0].name == "ARRAY":
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    rng = np.random.default_rng(seed)
    for t in reader.tensors:
        role = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.split(".")[0]
        data = np.asarray(t.data)
        if data.ndim == 2 and role in mix:
            wt = WeightType[mix[role]]
            # random blocks are heavy-tailed (per-block minimums, 6-bit sub-block scales);
            # at full spread the q and k projections make attention nearly hard, and the model
            # chaotic (a 0.3% weight change moved logits by 98%): keep attention soft
            std = data.shape[1] ** -0.5 * (QK_SPREAD if role in ("attn_q", "attn_k") else 1.0)
            blocks = random_blocks(wt, data.shape[0], data.shape[1], rng, std)
            writer.add_tensor(t.name, blocks, raw_dtype=GGMLQuantizationType(int(wt)))
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


#: the draw of each mix: one whose logits are not chaotic (test_the_models_are_well_conditioned
#: says so; some draws of the Q4_K_M mix move by 5% under 0.5% weight noise, and then 8-bit
#: activations alone would fail the comparison)
SEEDS = {"Q4_K_M": 3, "Q3_K_M": 0, "Q2_K": 0, "IQ4": 0, "legacy": 0}
WEIGHT_NOISE = 0.005  # relative weight perturbation of the conditioning check
MAX_SENSITIVITY = 0.02  # its largest allowed effect on the logits (relative to max |logit|)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant-models")
    return {
        name: write_mixed_model(root / f"{name}.gguf", mix, seed=SEEDS[name])
        for name, mix in MIXES.items()
    }


@pytest.mark.parametrize("name", sorted(MIXES))
def test_the_models_are_well_conditioned(files: dict[str, Path], name: str) -> None:
    """Guards the comparison below: a small weight change moves the float64 logits little, so
    a large difference means a wrong kernel, not a chaotic random model."""
    model = ref.RefModel(files[name])
    base = model.logits(IDS)
    rng = np.random.default_rng(0)
    for key, w in list(model.weights.items()):
        if key.startswith("blk.") and w.ndim == 2:
            model.weights[key] = w * (1 + WEIGHT_NOISE * rng.standard_normal(w.shape))
    assert _rel(model.logits(IDS), base) < MAX_SENSITIVITY


#: the K-quants, whose matmuls quantize activations per 256 (Q8_K)
SUPER_BLOCK_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def q8_roundtrip(x: np.ndarray, wtype: str) -> np.ndarray:
    """x through the kernels' 8-bit activation blocks for weights of GGML type ``wtype`` (32
    values, or 256 for the K-quants; d = amax / 127, float32)."""
    shape = x.shape
    block = 256 if wtype in SUPER_BLOCK_TYPES else 32
    blocks = np.asarray(x, np.float32).reshape(*shape[:-1], -1, block)
    d = (np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    return (np.rint(blocks * inv) * d.astype(np.float64)).reshape(shape)


def prefill_rounding(n_tokens: int):
    """The activation rounding of a step of ``n_tokens`` at the active level, per weight type:
    8-bit blocks of 32 (the integer GEMMs, the row-streaming dots of the blocks of 32) or 256
    (the K-quants' row-streaming dots), none on the float paths."""

    def rounding(x: np.ndarray, wtype: str) -> np.ndarray:
        path = kernels.matmul_path(WeightType[wtype], n_tokens)
        if path in ("gemm-f32", "gemm-dequant"):
            return np.asarray(x, np.float64)
        block = 256 if path == "rows-q8k" else 32
        blocks = np.asarray(x, np.float32).reshape(*x.shape[:-1], -1, block)
        d = (np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        return (np.rint(blocks * inv) * d.astype(np.float64)).reshape(x.shape)

    return rounding


_PREFILL_REFERENCES: dict[tuple, np.ndarray] = {}


def prefill_reference(path: Path, name: str) -> tuple[np.ndarray, bool]:
    """The float64 logits of a batched prefill at the active level, and whether any matrix
    takes 8-bit activations there."""
    paths = tuple(
        kernels.matmul_path(WeightType[t], len(IDS)) for t in sorted(set(MIXES[name].values()))
    )
    key = (name, paths)
    if key not in _PREFILL_REFERENCES:
        model = ref.RefModel(path)
        model.activation_rounding = prefill_rounding(len(IDS))
        _PREFILL_REFERENCES[key] = model.logits(IDS)
    return _PREFILL_REFERENCES[key], any(p not in ("gemm-f32", "gemm-dequant") for p in paths)


@pytest.fixture(scope="module")
def references(files: dict[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per file: the exact float64 logits, and those with 8-bit activations into every
    quantized matrix (what the matvec path computes, up to float32 rounding)."""
    out = {}
    for name, path in files.items():
        model = ref.RefModel(path)
        exact = model.logits(IDS)
        model.activation_rounding = q8_roundtrip
        out[name] = (exact, model.logits(IDS))
    return out


@pytest.mark.parametrize("name", sorted(MIXES))
def test_prefill_and_decode_match_reference(
    files: dict[str, Path], references: dict, name: str, isa: Isa
) -> None:
    model = realm.load_model(files[name], kv_dtype=np.float32)
    exact, rounded = references[name]
    # one step of 20 tokens: the batched paths (8-bit activations, or the activations
    # themselves on the float ones), against the reference rounding as each matrix's path does
    prefill = model.logits(IDS)
    want, quantized = prefill_reference(files[name], name)
    assert _rel(prefill, want) < (PREFILL_Q_RTOL if quantized else ROUNDING_RTOL)
    with model.open_session() as s:  # one token a step: the matvec path, 8-bit activations
        steps = np.stack([s.extend([t]) for t in IDS])
    assert _rel(steps, rounded) < STEP_RTOL
    # and the 8-bit activations cost what they cost llama.cpp: a few percent at most
    assert _rel(rounded, exact) < LOGITS_RTOL


def test_the_info_names_the_main_type(files: dict[str, Path]) -> None:
    info = realm.load_model(files["Q4_K_M"]).info
    assert info.file_type in ("Q4_K", "Q6_K", "F32")
    assert info.n_bytes < realm.load_model(files["Q4_K_M"].with_suffix(".f32.gguf")).info.n_bytes


def test_a_gemma3_file_in_k_quants(tmp_path: Path) -> None:
    path = write_mixed_model(
        tmp_path / "g3.gguf", MIXES["Q4_K_M"], arch="gemma3", seed=SEEDS["Q4_K_M"]
    )
    model = ref.RefModel(path)
    model.activation_rounding = q8_roundtrip
    with realm.load_model(path, kv_dtype=np.float32).open_session() as s:
        steps = np.stack([s.extend([t]) for t in IDS])
    assert _rel(steps, model.logits(IDS)) < STEP_RTOL
