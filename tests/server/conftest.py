"""Fixtures for the server tests: one small model for the whole directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from realm.testing import write_test_model


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # a context long enough for streams that outlast a test's cancel/disconnect/shutdown step
    return write_test_model(tmp_path_factory.mktemp("server") / "tiny.gguf", context_length=2048)


@pytest.fixture(scope="session")
def long_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A context of 8192: a stream that outlasts a shutdown's grace period even on a fast,
    idle machine (the tiny model decodes thousands of tokens a second)."""
    return write_test_model(tmp_path_factory.mktemp("server") / "long.gguf", context_length=8192)
