"""pytest fixtures for tests that run guests: an engine, a tiny model, a default-guest instance.

Enable the plugin in your root ``conftest.py`` (pytest only reads ``pytest_plugins`` there)::

    pytest_plugins = ["realm.testing.pytest_plugin"]

or on the command line with ``pytest -p realm.testing.pytest_plugin``, or import the fixtures
into one test module::

    from realm.testing.pytest_plugin import (  # noqa: F401
        realm_guest, realm_sandbox_engine, realm_tiny_model,
    )

Fixtures:

``realm_sandbox_engine`` (session)
    an open :class:`~realm.sandbox.SandboxEngine`, closed at the end of the session.
``realm_tiny_model`` (session)
    a tiny random-weight model (:func:`realm.testing.fixtures.tiny_model`) written under
    pytest's temporary directory.
``realm_guest`` (function)
    the default guest for tenant ``"test"`` with ``realm_tiny_model`` as model ``"tiny"``;
    the tenant's sessions are closed after the test::

        def test_counts(realm_guest):
            assert realm_guest.call("count_tokens", {"text": "hi"})["count"] > 0

The plain functions behind them are in :mod:`realm.testing.fixtures`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..model import Model
from ..sandbox import GuestInstance, SandboxEngine
from .fixtures import guest_instance, tiny_model

__all__ = ["realm_guest", "realm_sandbox_engine", "realm_tiny_model"]


@pytest.fixture(scope="session")
def realm_sandbox_engine() -> Iterator[SandboxEngine]:
    """An open sandbox engine shared by the whole test session."""
    engine = SandboxEngine().start()
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def realm_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """A tiny test model (2-layer llama, real tokenizer) shared by the whole test session."""
    return tiny_model(tmp_path_factory.mktemp("realm-model") / "tiny.gguf")


@pytest.fixture
def realm_guest(
    realm_sandbox_engine: SandboxEngine, realm_tiny_model: Model
) -> Iterator[GuestInstance]:
    """A fresh default-guest instance for tenant "test"; its sessions are closed afterwards."""
    inst = guest_instance(realm_sandbox_engine, realm_tiny_model)
    try:
        yield inst
    finally:
        inst.tenant.close()
