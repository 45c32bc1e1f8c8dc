"""The bulk GGUF reader (``open_gguf``) against ``gguf.GGUFReader``: same fields, contents and
tensors on every value type; truncated and corrupt files raise ``ValueError`` without reading
past the end or allocating by a corrupt count."""

from __future__ import annotations

import math
import random
import struct
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import tokenizer_fixtures as fx
from gguf import GGMLQuantizationType as Q
from gguf import GGUFEndian
from gguf import GGUFValueType as V

import realm
from realm.model._gguf_reader import FastGGUFReader, field_numbers, field_strings, open_gguf
from realm.model._tokenizer import Tokenizer, load_tokenizer
from realm.testing import write_test_model, write_vocab_only
from realm.testing.real_models import REAL_MODELS, RealModelUnavailable, real_model_path

SCALARS = {
    V.UINT8: [0, 7, 255],
    V.INT8: [-128, -1, 127],
    V.UINT16: [0, 65535],
    V.INT16: [-32768, 32767],
    V.UINT32: [0, 2**32 - 1],
    V.INT32: [-(2**31), 2**31 - 1],
    V.UINT64: [0, 2**64 - 1],
    V.INT64: [-(2**63), 2**63 - 1],
    V.FLOAT32: [0.0, -1.5, math.inf, math.nan],
    V.FLOAT64: [1e300, -0.0, math.nan],
    V.BOOL: [True, False, True],
}
STRINGS = ["", "a", "héllo ✓", "東京 🌊", "\x00nul", "▁the", "Ġ" * 40]


# --- comparing with gguf.GGUFReader --------------------------------------------------------------


def _outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", call())
    except Exception as exc:  # both readers must fail the same way
        return ("error", type(exc))


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def _assert_same_contents(got: Any, want: Any, arg: int | slice) -> None:
    g = _outcome(lambda: got.contents(arg))
    w = _outcome(lambda: want.contents(arg))
    if g[0] == w[0] == "ok":
        assert _same_value(g[1], w[1]), (want.name, arg, g, w)
    else:
        assert g == w, (want.name, arg, g, w)


def _same_part(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_as_gguf(path: Path) -> FastGGUFReader:
    """Every field and tensor of ``open_gguf(path)`` is what ``gguf.GGUFReader`` gives."""
    fast, slow = open_gguf(path), gguf.GGUFReader(path)
    assert isinstance(fast, gguf.GGUFReader)
    assert (fast.byte_order, fast.endianess, fast.alignment, fast.data_offset) == (
        slow.byte_order,
        slow.endianess,
        slow.alignment,
        slow.data_offset,
    )
    assert list(fast.fields) == list(slow.fields)
    for name, want in slow.fields.items():
        got = fast.get_field(name)
        assert got is not None and got is fast.fields[name]
        assert (got.offset, got.name, got.types) == (want.offset, want.name, want.types), name
        assert list(got.data) == want.data, name
        assert len(got.parts) == len(want.parts), name
        assert all(_same_part(a, b) for a, b in zip(got.parts, want.parts, strict=True)), name
        assert _same_part(got.parts[-1], want.parts[-1]), name
        for arg in (slice(None), slice(1, None, 2), slice(-2, None), 0, -1, 1):
            _assert_same_contents(got, want, arg)
        if want.types[0] == V.ARRAY and len(want.types) == 2 and want.data:
            if want.types[1] == V.STRING:
                assert field_strings(got, "surrogateescape") == field_strings(
                    want, "surrogateescape"
                )
            else:
                g_num, w_num = field_numbers(got), field_numbers(want)
                assert g_num.dtype == w_num.dtype and g_num.dtype.isnative
                np.testing.assert_array_equal(g_num, w_num)
    assert len(fast.tensors) == len(slow.tensors)
    for got_t, want_t in zip(fast.tensors, slow.tensors, strict=True):
        assert (got_t.name, got_t.tensor_type) == (want_t.name, want_t.tensor_type)
        assert (got_t.n_elements, got_t.n_bytes) == (want_t.n_elements, want_t.n_bytes)
        assert got_t.data_offset == want_t.data_offset
        assert _same_part(got_t.shape, want_t.shape)
        assert _same_part(np.asarray(got_t.data), np.asarray(want_t.data)), got_t.name
    return fast


# --- files ---------------------------------------------------------------------------------------


def write_every_type(
    path: Path, endianess: GGUFEndian = GGUFEndian.LITTLE, alignment: int | None = None
) -> Path:
    """A GGUF file with every value type as scalar and array, nested arrays and tensors."""
    w = gguf.GGUFWriter(path, arch="llama", endianess=endianess)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for vtype, values in SCALARS.items():
        w.add_key_value(f"scalar.{vtype.name.lower()}", values[-1], vtype)
        w.add_key_value(f"array.{vtype.name.lower()}", values, V.ARRAY, sub_type=vtype)
        w.add_key_value(f"one.{vtype.name.lower()}", values[:1], V.ARRAY, sub_type=vtype)
    for i, text in enumerate(STRINGS):
        w.add_string(f"string.{i}", text)
    w.add_array("array.string", STRINGS)
    w.add_array("array.one_string", ["only"])
    w.add_array("nested.ints", [[1, 2], [3], [4, 5, 6]])
    w.add_array("nested.strings", [["a", "ß"], ["東京"]])
    w.add_array("nested.deep", [[[1.5], [2.5, 3.5]], [[4.5]]])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal(7).astype(np.float16))
    w.add_tensor("i8", np.arange(-4, 4, dtype=np.int8))
    w.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), Q.Q8_0)
    w.add_tensor("q8", q8, raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def _str(text: bytes) -> bytes:
    return _u64(len(text)) + text


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _str(key.encode()) + _u32(vtype) + payload


def _array(itype: int, count: int, payload: bytes = b"") -> bytes:
    return _u32(itype) + _u64(count) + payload


def _tensor_info(name: str, dims: Sequence[int], ggml_type: int, offset: int) -> bytes:
    return (
        _str(name.encode())
        + _u32(len(dims))
        + b"".join(map(_u64, dims))
        + _u32(ggml_type)
        + (_u64(offset))
    )


def raw_gguf(
    kvs: Sequence[bytes],
    tensors: Sequence[bytes] = (),
    data: bytes = b"",
    *,
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    """A GGUF v3 file from raw key/value and tensor-info records (then padding to 32, data)."""
    head = b"GGUF" + _u32(3) + _u64(len(tensors) if n_tensors is None else n_tensors)
    head += _u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    if data:
        head += b"\0" * (-len(head) % 32)
    return head + data


# --- the same as gguf.GGUFReader -----------------------------------------------------------------


@pytest.mark.parametrize("endianess", [GGUFEndian.LITTLE, GGUFEndian.BIG], ids=lambda e: e.name)
@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type(tmp_path: Path, endianess: GGUFEndian, alignment: int | None) -> None:
    path = write_every_type(tmp_path / "all.gguf", endianess, alignment)
    reader = assert_same_as_gguf(path)
    assert reader.fields["array.string"].contents() == STRINGS
    assert reader.fields["array.string"].contents(2) == "héllo ✓"
    assert reader.fields["array.uint64"].contents() == SCALARS[V.UINT64]
    assert reader.fields["nested.strings"].contents() == ["a", "ß", "東京"]  # gguf flattens
    assert [t.name for t in reader.tensors] == ["f32", "f16", "i8", "i32", "q8"]


@pytest.mark.parametrize(
    ("arch", "wtype"), [("llama", "Q8_0"), ("qwen2", "F16"), ("llama", "F32"), ("llama", "Q4_0")]
)
def test_test_models(tmp_path: Path, arch: str, wtype: str) -> None:
    assert_same_as_gguf(write_test_model(tmp_path / "m.gguf", arch=arch, wtype=wtype))


def test_vocab_only_files(tmp_path: Path) -> None:
    assert_same_as_gguf(write_vocab_only(tmp_path / "v.gguf"))
    assert_same_as_gguf(write_test_model(tmp_path / "n.gguf", tokenizer="none", vocab_size=100))
    tokens, merges, types = fx.trained_bpe_vocab()
    bpe = fx.write_gguf(
        tmp_path / "bpe.gguf", model="gpt2", pre="llama-bpe", tokens=tokens, merges=merges,
        types=types,
    )  # fmt: skip
    assert_same_as_gguf(bpe)


def test_empty_and_nested_arrays(tmp_path: Path) -> None:
    """Arrays gguf's writer refuses to write: empty ones (of every item type, even an unknown
    one) and nested arrays with empty members."""
    kvs = [_kv(f"empty.{t.name}", V.ARRAY, _array(t, 0)) for t in V]
    kvs.append(_kv("empty.unknown_type", V.ARRAY, _array(99, 0)))
    inner = _array(V.UINT8, 0) + _array(V.UINT8, 2, b"\x01\x02")
    kvs.append(_kv("nested.first_empty", V.ARRAY, _array(V.ARRAY, 2, inner)))
    kvs.append(_kv("nested.all_empty", V.ARRAY, _array(V.ARRAY, 2, _array(V.STRING, 0) * 2)))
    kvs.append(_kv("after", V.STRING, _str(b"still read")))
    path = tmp_path / "e.gguf"
    path.write_bytes(raw_gguf(kvs))
    reader = assert_same_as_gguf(path)
    assert reader.fields["empty.STRING"].contents() == []
    assert reader.fields["empty.STRING"].types == [V.ARRAY]  # as gguf: no item, no item type
    assert reader.fields["nested.first_empty"].contents() == [1, 2]
    assert reader.fields["after"].contents() == "still read"


def test_invalid_utf8_strings(tmp_path: Path) -> None:
    """contents() fails on bytes that are not UTF-8 as gguf's does; field_strings can keep them."""
    payload = _str(b"ok") + _str(b"\xff\xfe") + _str(b"\xe2\x82")
    path = tmp_path / "u.gguf"
    path.write_bytes(raw_gguf([_kv("s", V.ARRAY, _array(V.STRING, 3, payload))]))
    reader = assert_same_as_gguf(path)
    field = reader.fields["s"]
    assert field.contents(0) == "ok"
    with pytest.raises(UnicodeDecodeError):
        field.contents()
    kept = field_strings(field, "surrogateescape")
    assert [s.encode("utf-8", "surrogateescape") for s in kept] == [b"ok", b"\xff\xfe", b"\xe2\x82"]


def test_tokenizers_are_the_same(tmp_path: Path) -> None:
    spm_tokens, scores, spm_types = fx.trained_spm_vocab()
    bpe_tokens, merges, bpe_types = fx.trained_bpe_vocab()
    paths = [
        fx.write_gguf(
            tmp_path / "spm.gguf", model="llama", tokens=spm_tokens, scores=scores,
            types=spm_types, ids={"bos": 1, "eos": 2, "unk": 0},
        ),
        fx.write_gguf(
            tmp_path / "bpe.gguf", model="gpt2", pre="llama-bpe", tokens=bpe_tokens,
            merges=merges, types=bpe_types,
        ),
        write_test_model(tmp_path / "m.gguf"),
    ]  # fmt: skip
    for path in paths:
        _assert_same_tokenizer(
            load_tokenizer(path), Tokenizer.from_reader(gguf.GGUFReader(path), path=path)
        )


# --- truncated and corrupt files -----------------------------------------------------------------


def _needed_bytes(path: Path) -> int:
    """The bytes a reader must see: to the end of the metadata and of the last tensor."""
    slow = gguf.GGUFReader(path)
    last = next(reversed(slow.fields.values()))
    end = last.offset + sum(int(p.nbytes) for p in last.parts)
    for t in slow.tensors:
        info = t.field
        end = max(end, info.offset + sum(int(p.nbytes) for p in info.parts))
        end = max(end, t.data_offset + t.n_bytes)
    return end


@pytest.mark.parametrize("kind", ["every_type", "vocab_only", "model", "big_endian"])
def test_truncated_files_raise(tmp_path: Path, kind: str) -> None:
    full = tmp_path / "full.gguf"
    if kind == "every_type":
        write_every_type(full)
    elif kind == "big_endian":
        write_every_type(full, GGUFEndian.BIG)
    elif kind == "vocab_only":
        write_vocab_only(full, vocab_size=400)
    else:
        write_test_model(full, n_layers=1, n_embd=32, n_ff=64, vocab_size=400, wtype="F32")
    data = full.read_bytes()
    needed = _needed_bytes(full)
    # every cut in the header's first bytes, then a spread to the end
    step = max(1, (len(data) - 512) // 400)
    cuts = sorted({*range(0, min(512, len(data))), *range(512, len(data), step), needed - 1})
    path = tmp_path / "cut.gguf"
    for cut in cuts:
        path.unlink(missing_ok=True)  # a new file: never shrink one a live map still covers
        path.write_bytes(data[:cut])
        if cut < needed:
            with pytest.raises(ValueError):
                open_gguf(path)
        else:
            assert_same_as_gguf(path)


def _corrupt_cases() -> dict[str, bytes]:
    good_kv = _kv("k", V.UINT32, _u32(1))
    strings = _str(b"a") + _u64(2**62) + b"bc" + _str(b"d")
    return {
        "kv_count": raw_gguf([good_kv], n_kv=2**64 - 1),
        "kv_count_one_more": raw_gguf([good_kv], n_kv=2),
        "tensor_count": raw_gguf([good_kv], n_tensors=2**63),
        "key_length": raw_gguf([_u64(2**64 - 1) + b"key" + _u32(V.UINT8) + b"\x01"]),
        "key_length_one_past": raw_gguf([_u64(9) + b"key" + _u32(V.UINT8) + b"\x01"]),
        "string_length": raw_gguf([_kv("s", V.STRING, _u64(2**63) + b"abc")]),
        "string_length_one_past": raw_gguf([_kv("s", V.STRING, _u64(4) + b"abc")]),
        "value_type": raw_gguf([_kv("x", 99, _u32(0))]),
        "item_type": raw_gguf([_kv("x", V.ARRAY, _array(99, 1, _u32(0)))]),
        "uint8_count": raw_gguf([_kv("a", V.ARRAY, _array(V.UINT8, 2**62, b"\x01\x02"))]),
        "uint64_count": raw_gguf([_kv("a", V.ARRAY, _array(V.UINT64, 2**61, _u64(1)))]),
        "uint32_count_one_more": raw_gguf([_kv("a", V.ARRAY, _array(V.UINT32, 3, _u32(1) * 2))]),
        "bool_count": raw_gguf([_kv("a", V.ARRAY, _array(V.BOOL, 2**40, b"\x01"))]),
        "string_count": raw_gguf([_kv("a", V.ARRAY, _array(V.STRING, 2**40, _str(b"x")))]),
        "string_count_one_more": raw_gguf([_kv("a", V.ARRAY, _array(V.STRING, 4, strings))]),
        "string_in_array_length": raw_gguf([_kv("a", V.ARRAY, _array(V.STRING, 3, strings))]),
        "array_count": raw_gguf([_kv("a", V.ARRAY, _array(V.ARRAY, 2**40, _array(V.UINT8, 0)))]),
        "inner_array_count": raw_gguf(
            [_kv("a", V.ARRAY, _array(V.ARRAY, 1, _array(V.UINT16, 2**50, b"\0\0")))]
        ),
        "tensor_dims": raw_gguf([good_kv], [_str(b"t") + _u32(2**32 - 1) + _u64(4)]),
        "tensor_size": raw_gguf([good_kv], [_tensor_info("t", [2**40], Q.F32, 0)], b"\0" * 32),
        "tensor_offset": raw_gguf([good_kv], [_tensor_info("t", [4], Q.F32, 2**62)], b"\0" * 32),
        "tensor_type": raw_gguf([good_kv], [_tensor_info("t", [4], 999, 0)], b"\0" * 32),
        "alignment": raw_gguf([_kv("general.alignment", V.UINT32, _u32(0))]),
        "magic": b"GGUX" + raw_gguf([good_kv])[4:],
        "empty": b"",
        "three_bytes": b"GGU",
    }


@pytest.mark.parametrize(("name", "data"), sorted(_corrupt_cases().items()))
def test_corrupt_files_raise_without_allocating(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            open_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{name}: {peak} bytes allocated"


def test_corrupt_files_fail_with_a_clear_message(tmp_path: Path) -> None:
    cases = _corrupt_cases()
    path = tmp_path / "c.gguf"
    path.write_bytes(cases["string_count"])
    with pytest.raises(ValueError, match=r"array of 1099511627776 STRING .* cannot fit"):
        open_gguf(path)
    path.write_bytes(cases["string_in_array_length"])
    with pytest.raises(ValueError, match=r"string of 4611686018427387904 bytes .* runs past"):
        open_gguf(path)
    path.write_bytes(cases["tensor_size"])
    with pytest.raises(ValueError, match=r"truncated or corrupt GGUF file"):
        open_gguf(path)


def test_random_byte_flips(tmp_path: Path) -> None:
    """A header byte changed at random: the reader raises ValueError or KeyError (a duplicated
    key or tensor), or reads what gguf's reader reads."""
    full = write_every_type(tmp_path / "full.gguf")
    data = full.read_bytes()
    header = open_gguf(full).data_offset
    rng = random.Random(0)
    path = tmp_path / "flip.gguf"
    for _ in range(300):
        flipped = bytearray(data)
        at = rng.randrange(header)
        flipped[at] = rng.choice([0, 0xFF, flipped[at] ^ (1 << rng.randrange(8))])
        path.unlink(missing_ok=True)
        path.write_bytes(bytes(flipped))
        try:
            open_gguf(path)
        except (ValueError, KeyError):
            continue
        assert_same_as_gguf(path)


def test_loaders_name_a_corrupt_file(tmp_path: Path) -> None:
    vocab = write_vocab_only(tmp_path / "v.gguf", vocab_size=400)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(vocab.read_bytes()[: _needed_bytes(vocab) - 10])
    with pytest.raises(realm.TokenizerError, match=r"cut\.gguf: cannot read as GGUF"):
        load_tokenizer(cut)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(_corrupt_cases()["string_count"])
    with pytest.raises(realm.TokenizerError, match=r"corrupt\.gguf: cannot read as GGUF"):
        load_tokenizer(corrupt)


# --- real files ----------------------------------------------------------------------------------


def _assert_same_tokenizer(fast: Tokenizer, slow: Tokenizer) -> None:
    assert fast.vocab_size == slow.vocab_size
    n = fast.vocab_size
    assert [fast.token_text(i) for i in range(n)] == [slow.token_text(i) for i in range(n)]
    assert [fast.token_type(i) for i in range(n)] == [slow.token_type(i) for i in range(n)]
    assert [fast.token_to_piece(i, render_special=True) for i in range(n)] == [
        slow.token_to_piece(i, render_special=True) for i in range(n)
    ]
    for attr in (
        "model", "pre", "bos_id", "eos_id", "eot_id", "unk_id", "pad_id", "eog_ids", "add_bos",
        "add_eos", "add_space_prefix", "chat_template",
    ):  # fmt: skip
        assert getattr(fast, attr) == getattr(slow, attr), attr
    for text in ("Hello, world!", " The lighthouse keeper's light.\n\n", "東京 🌊 café 1987", ""):
        for special in (False, True):
            ids = fast.encode(text, add_special=special, parse_special=special)
            assert ids == slow.encode(text, add_special=special, parse_special=special)
            assert fast.decode(ids) == slow.decode(ids)


@pytest.mark.real_model
@pytest.mark.slow  # gguf.GGUFReader takes ~10 s on a 262k-token vocabulary
@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_model_tokenizer_is_the_same(name: str) -> None:
    try:
        path = real_model_path(name)
    except RealModelUnavailable as exc:
        pytest.skip(str(exc))
    fast = load_tokenizer(path)
    assert fast.vocab_size > 1000
    slow_reader = gguf.GGUFReader(path)
    _assert_same_tokenizer(fast, Tokenizer.from_reader(slow_reader, path=path))
    reader = open_gguf(path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in slow_reader.fields:
            assert reader.fields[key].contents() == slow_reader.fields[key].contents(), key
