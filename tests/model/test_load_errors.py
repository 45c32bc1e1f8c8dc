"""Model files Realm cannot run fail at load, naming the file, the tensor and the reason;
bad arguments to models and sessions fail with a ModelError naming what was wrong."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import realm
from realm.model import ModelRegistry
from realm.testing import write_test_model


def _rewrite(
    src: Path,
    dst: Path,
    *,
    arch: str | None = None,
    tensor: Callable[[str, np.ndarray, Any], tuple[str, np.ndarray, Any] | None] | None = None,
) -> Path:
    """Copy a GGUF model, changing its architecture name and/or tensors on the way."""
    r = gguf.GGUFReader(src)
    old_arch = r.fields["general.architecture"].contents()
    new_arch = arch or old_arch
    w = gguf.GGUFWriter(dst, arch=new_arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        key = name.replace(f"{old_arch}.", f"{new_arch}.", 1)
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, f.contents())
        else:
            w.add_key_value(key, f.contents(), vtype)
    for t in r.tensors:
        item: tuple[str, np.ndarray, Any] | None = (t.name, np.array(t.data), t.tensor_type)
        if tensor is not None:
            item = tensor(t.name, np.array(t.data), t.tensor_type)
        if item is None:
            continue
        name, data, ttype = item
        w.add_tensor(name, data, raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_test_model(tmp_path / "good.gguf", wtype="Q8_0")


def test_rewrite_keeps_a_good_model_good(good: Path, tmp_path: Path) -> None:
    copy = _rewrite(good, tmp_path / "copy.gguf")
    np.testing.assert_array_equal(
        realm.load_model(copy).logits([1, 2, 3]), realm.load_model(good).logits([1, 2, 3])
    )


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(realm.ModelError, match="no such model file"):
        realm.load_model(tmp_path / "nope.gguf")


def test_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"not a model at all" * 10)
    with pytest.raises(realm.ModelError, match=r"x\.gguf.*not a readable GGUF"):
        realm.load_model(p)


def test_truncated_file(good: Path, tmp_path: Path) -> None:
    p = tmp_path / "cut.gguf"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(realm.ModelError, match=r"cut\.gguf"):
        realm.load_model(p)


def test_unsupported_architecture(good: Path, tmp_path: Path) -> None:
    p = _rewrite(good, tmp_path / "gpt.gguf", arch="gptneox")
    with pytest.raises(
        realm.ModelError, match=r"gpt\.gguf: architecture 'gptneox' is not supported"
    ):
        realm.load_model(p)


def test_missing_tensor(good: Path, tmp_path: Path) -> None:
    p = _rewrite(
        good,
        tmp_path / "m.gguf",
        tensor=lambda n, d, t: None if n == "blk.1.ffn_up.weight" else (n, d, t),
    )
    with pytest.raises(
        realm.ModelError, match=r"m\.gguf: tensor 'blk\.1\.ffn_up\.weight' is missing"
    ):
        realm.load_model(p)


def test_wrong_shape(good: Path, tmp_path: Path) -> None:
    def shrink(n: str, d: np.ndarray, t: Any) -> tuple[str, np.ndarray, Any]:
        return (n, d[:-1], t) if n == "blk.0.attn_k.weight" else (n, d, t)

    p = _rewrite(good, tmp_path / "m.gguf", tensor=shrink)
    with pytest.raises(realm.ModelError, match=r"tensor 'blk\.0\.attn_k\.weight' has shape"):
        realm.load_model(p)


def test_unsupported_tensor_types_are_listed_with_their_counts(good: Path, tmp_path: Path) -> None:
    """One error names every unsupported type and how many tensors have it (raw blocks: the
    loader refuses the type before it reads a value)."""
    new_types = {
        "blk.0.ffn_gate.weight": gguf.GGMLQuantizationType.Q8_1,
        "blk.1.ffn_gate.weight": gguf.GGMLQuantizationType.Q8_1,
        "blk.0.attn_q.weight": gguf.GGMLQuantizationType.MXFP4,
    }

    def retype(n: str, d: np.ndarray, t: Any) -> tuple[str, np.ndarray, Any]:
        if n not in new_types:
            return (n, d, t)
        nt = new_types[n]
        rows, cols = gguf.quants.dequantize(d, t).shape
        block, size = gguf.GGML_QUANT_SIZES[nt]
        return (n, np.zeros((rows, cols // block * size), np.uint8), nt)

    p = _rewrite(good, tmp_path / "m.gguf", tensor=retype)
    with pytest.raises(realm.ModelError) as e:
        realm.load_model(p)
    assert "weight types MXFP4 (1 tensor), Q8_1 (2 tensors) not supported" in str(e.value)
    assert "Q4_K" in str(e.value)  # the supported ones are listed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kv_dtype": np.int8}, "kv_dtype"),
        ({"max_kv_bytes": -1}, "max_kv_bytes"),
        ({"max_resident_bytes": -5}, "max_resident_bytes"),
        ({"max_resident_bytes": True}, "max_resident_bytes"),
    ],
)
def test_bad_load_options(good: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(realm.ModelError, match=match):
        realm.load_model(good, **kwargs)


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        ([], "non-empty"),
        ([1, -1], "out of range"),
        ([1, 10**9], "out of range"),
        ([[1, 2]], "1-D"),
        (["a"], "ints"),
        ([1.5], "ints"),
        ([True], "ints"),
    ],
)
def test_bad_tokens(good: Path, tokens: Any, match: str) -> None:
    model = realm.load_model(good)
    with model.open_session() as s:
        with pytest.raises(realm.ModelError, match=match):
            s.extend(tokens)
        assert s.pos == 0
        s.extend([1, 2])  # still usable
        assert s.pos == 2


def test_session_limits_and_misuse(good: Path) -> None:
    model = realm.load_model(good)
    with pytest.raises(realm.ModelError, match="capacity"):
        model.open_session(capacity=0)
    s = model.open_session(capacity=4)
    with pytest.raises(realm.ModelError, match="exceed the session's capacity of 4"):
        s.extend([1, 2, 3, 4, 5])
    s.extend([1, 2, 3])
    with pytest.raises(realm.ModelError, match="rewind position"):
        s.rewind(7)
    with pytest.raises(realm.ModelError, match="logits must be"):
        s.extend([1], logits="some")  # type: ignore[arg-type]
    assert s.pos == 3
    with pytest.raises(realm.ModelError, match="twice"):
        model.step([(s, [1], "last"), (s, [2], "last")])
    s.close()
    with pytest.raises(realm.ModelError, match="closed"):
        s.extend([1])
    other = realm.load_model(good)
    t = other.open_session()
    with pytest.raises(realm.ModelError, match="another model"):
        model.step([(t, [1], "last")])
    with pytest.raises(realm.ModelError, match="at least one"):
        model.logits([])


def test_registry_shares_weights_and_names_unknown_models(good: Path, tmp_path: Path) -> None:
    reg = ModelRegistry()
    a = reg.load("a", good)
    b = reg.load("b", good)
    assert a is b  # same content: one copy of the weights
    c = reg.load("c", write_test_model(tmp_path / "other.gguf", seed=7))
    assert c is not a
    assert reg.names() == ["a", "b", "c"] and "a" in reg and len(reg) == 3
    assert reg.info()["a"]["arch"] == "llama"
    with pytest.raises(realm.ModelError, match=r"unknown model 'zz' \(loaded: a, b, c\)"):
        reg.get("zz")
    with pytest.raises(realm.ModelError, match="loaded already"):
        reg.load("a", good)
    with pytest.raises(realm.ModelError, match="model name"):
        reg.load("", good)
    reg.unload("a")
    assert reg.get("b") is b
