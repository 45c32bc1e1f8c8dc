"""Models whose Q8_0 / Q4_0 matrices are packed at load (``load_model(pack=...)``).

Packing changes the layout, not the arithmetic's inputs: a packed model's logits agree with the
file layout's to float32 rounding of the sums' order, and every batched step gives each
session exactly the logits it would get stepped alone (what the batcher and speculative verify
steps rely on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import realm
from realm import ModelError, kernels
from realm.testing import write_test_model

IDS = [1, 5, 9, 2, 7, 3]


@pytest.fixture(params=["Q8_0", "Q4_0"])
def model_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return write_test_model(tmp_path / "m.gguf", n_layers=2, wtype=request.param)


def test_packed_and_file_layouts_agree(model_file: Path) -> None:
    packed = realm.load_model(model_file, pack=True)
    plain = realm.load_model(model_file, pack=False)
    assert packed._native.packed and not plain._native.packed
    a, b = packed.logits(IDS), plain.logits(IDS)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
    assert int(np.argmax(a[-1])) == int(np.argmax(b[-1]))


def test_packed_steps_are_row_invariant(model_file: Path) -> None:
    """Each session's logits are the same bits alone or batched with others, decode or not."""
    model = realm.load_model(model_file, pack=True)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3], [2, 2], [9, 8, 7], [5], [1, 1, 1]]
    alone = []
    for p in prompts:
        with model.open_session() as s:
            alone.append((s.extend(p), s.extend([4])))
    sessions = [model.open_session() for _ in prompts]
    first = model.step(
        [(s, np.array(p, np.int32), "last") for s, p in zip(sessions, prompts, strict=True)]
    )
    second = model.step([(s, np.array([4], np.int32), "last") for s in sessions])
    for (want1, want2), got1, got2 in zip(alone, first, second, strict=True):
        assert np.array_equal(np.asarray(got1).reshape(-1), want1)
        assert np.array_equal(np.asarray(got2).reshape(-1), want2)
    for s in sessions:
        s.close()


def test_paged_models_keep_the_file_layout(model_file: Path) -> None:
    paged = realm.load_model(model_file, max_resident_bytes=1 << 30, pack=True)
    assert not paged._native.packed
    np.testing.assert_array_equal(
        paged.logits(IDS), realm.load_model(model_file, pack=False).logits(IDS)
    )


def test_default_packs_where_the_level_has_a_kernel(model_file: Path) -> None:
    assert realm.load_model(model_file)._native.packed == kernels.pack_preferred()


@pytest.mark.parametrize("bad", [1, "yes", 0.0])
def test_pack_must_be_a_bool_or_none(tmp_path: Path, bad: object) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_layers=1)
    with pytest.raises(ModelError, match="pack must be True, False or None"):
        realm.load_model(path, pack=bad)  # type: ignore[arg-type]


def test_released_file_pages_read_back_the_same(tmp_path: Path) -> None:
    """A packed model drops the file pages it copied (``release_pages``); what lies there still
    reads the same afterwards (the kernel maps it again), and arrays outside the map are left."""
    from realm.model._pager import PAGE, release_pages

    path = tmp_path / "blob"
    want = np.arange(4 * PAGE, dtype=np.uint8)
    want.tofile(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    inner = data[PAGE : 3 * PAGE]
    assert int(inner.sum()) == int(want[PAGE : 3 * PAGE].sum())  # touched: resident
    elsewhere = np.ones(PAGE, np.uint8)
    assert release_pages(data, [inner, elsewhere]) == inner.nbytes
    assert np.array_equal(np.asarray(data), want)
    assert elsewhere.all()


def test_a_packed_model_embeds_from_the_released_file_pages(model_file: Path) -> None:
    packed = realm.load_model(model_file, pack=True)
    plain = realm.load_model(model_file, pack=False)
    np.testing.assert_array_equal(packed.embed(IDS), packed.embed(IDS))
    assert np.allclose(packed.embed(IDS), plain.embed(IDS), atol=1e-3)
