"""Hypothesis against a live server: batches of well-formed and hostile client messages.

The server runs in its own thread (its own Trio loop); each example opens a connection with the
independent ``websockets`` client, sends a batch drawn from ``realm.testing.strategies
.protocol_messages``, and checks the protocol's invariants: every message but a cancel gets
exactly one final reply (a result or an error), stream indices of a call are contiguous, and a
fresh connection is still served afterwards.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import websockets.sync.client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realm import ProtocolError
from realm._protocol import Cancel, parse_message
from realm.server import ServerConfig, ServerLimits, open_server
from realm.testing.strategies import protocol_messages

RECV_SECONDS = 20.0


class ServerThread:
    """A server on a free port, in a thread of its own, until ``stop``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.url = ""
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with open_server(self.config) as server:
            self.url = server.url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(30), "the server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)
        assert not self._thread.is_alive()


def _connect(url: str) -> Any:
    return websockets.sync.client.connect(url, proxy=None, open_timeout=10, close_timeout=2)


def _call(ws: Any, function: str, call_id: str = "q") -> dict[str, Any]:
    ws.send(json.dumps({"type": "call", "id": call_id, "function": function}))
    while True:
        msg = json.loads(ws.recv(timeout=RECV_SECONDS))
        if msg["id"] == call_id and msg["type"] != "stream":
            return msg


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[ServerThread]:
    limits = ServerLimits(max_tokens=16)  # generated params stay cheap
    with ServerThread(ServerConfig(models={"tiny": str(model_path)}, port=0, limits=limits)) as s:
        yield s


@pytest.fixture(scope="module")
def functions(server: ServerThread) -> dict[str, dict[str, Any]]:
    with _connect(server.url) as ws:
        meta = _call(ws, "system_metadata")["data"]
    return {
        f["name"]: f["params"]
        for f in meta["functions"]
        if not f["name"].startswith("system_") and f["name"] != "chat"  # chat keeps sessions
    }


def _expected_finals(messages: list[str]) -> int:
    """Every message gets one final reply, except a well-formed cancel."""
    n = 0
    for text in messages:
        try:
            if isinstance(parse_message(text), Cancel):
                continue
        except ProtocolError:
            pass
        n += 1
    return n


def test_batches_of_hostile_messages(server: ServerThread, functions: dict[str, Any]) -> None:
    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(protocol_messages(functions), min_size=1, max_size=6))
    def check(messages: list[str]) -> None:
        with _connect(server.url) as ws:
            for text in messages:
                ws.send(text)
            want = _expected_finals(messages)
            finals: list[dict[str, Any]] = []
            indices: dict[Any, list[int]] = {}
            while len(finals) < want:
                msg = json.loads(ws.recv(timeout=RECV_SECONDS))
                assert msg["type"] in ("stream", "result", "error"), msg
                if msg["type"] == "stream":
                    indices.setdefault(json.dumps(msg["id"]), []).append(msg["data"]["index"])
                else:
                    finals.append(msg)
            for got in indices.values():
                assert got == list(range(len(got))), got
            for msg in finals:
                if msg["type"] == "error":
                    assert msg["error"]["code"] != "INTERNAL", msg
            # nothing more for this batch: a health call's reply is the next final message
            assert _call(ws, "system_health", "after")["type"] == "result"
        with _connect(server.url) as other:  # and the server serves a fresh connection
            assert _call(other, "system_health")["data"]["status"] == "ok"

    check()
