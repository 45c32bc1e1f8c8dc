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

``realm_runtime`` (function, async: pytest-trio)
    an open runtime (:func:`realm.testing.runtime.open_test_runtime`) on a tiny model named
    ``"tiny"``; ``realm_runtime_options`` (override it) gives its ``tenants``, ``limits`` and
    ``model_kwargs``.

``realm_server`` (function, async: pytest-trio)
    a running WebSocket server (:func:`realm.server.open_server`) on 127.0.0.1, a free port,
    serving ``realm_tiny_model`` as ``"tiny"``; ``realm_server_options`` (override it) gives
    the other :class:`~realm.server.ServerConfig` fields (``tenants``, ``limits``)::

        async def test_health(realm_server):
            async with realm.client.connect(realm_server.url) as c:
                assert (await c.health())["status"] == "ok"

The plain functions behind them are in :mod:`realm.testing.fixtures` and
:mod:`realm.testing.runtime`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from ..actors import Runtime
from ..model import Model
from ..sandbox import GuestInstance, SandboxEngine
from .fixtures import guest_instance, tiny_model

__all__ = [
    "realm_guest",
    "realm_runtime",
    "realm_runtime_options",
    "realm_sandbox_engine",
    "realm_server",
    "realm_server_options",
    "realm_tiny_model",
]


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


# --- a runtime (pytest-trio) ------------------------------------------------------------------


@pytest.fixture
def realm_runtime_options() -> dict[str, Any]:
    """Keyword arguments of ``open_test_runtime`` for ``realm_runtime`` (``tenants``,
    ``limits``, ``model_kwargs``); override this fixture in a module or conftest to change them.
    """
    return {}


@pytest.fixture
async def realm_runtime(realm_runtime_options: dict[str, Any]) -> AsyncIterator[Runtime]:
    """An open runtime on a tiny model named "tiny" (``realm.testing.runtime.open_test_runtime``),
    for trio tests (pytest-trio)::

        async def test_counts(realm_runtime):
            r = await realm_runtime.call("alice", "count_tokens", {"text": "hi"})
            assert r["count"] > 0
    """
    from .runtime import open_test_runtime  # imports hypothesis, needed only here

    async with open_test_runtime(**realm_runtime_options) as rt:
        yield rt


# --- a server (pytest-trio) -------------------------------------------------------------------


@pytest.fixture
def realm_server_options() -> dict[str, Any]:
    """Keyword arguments of ``ServerConfig`` for ``realm_server`` besides ``models`` and
    ``port`` (``tenants``, ``limits``, ``host``); override it in a module or conftest."""
    return {}


@pytest.fixture
async def realm_server(
    realm_tiny_model: Model, realm_server_options: dict[str, Any]
) -> AsyncIterator[Any]:
    """A running server on a free port (``.url``), shut down gracefully after the test."""
    from ..server import ServerConfig, open_server

    config = ServerConfig(models={"tiny": realm_tiny_model.path}, port=0, **realm_server_options)
    async with open_server(config) as server:
        yield server
