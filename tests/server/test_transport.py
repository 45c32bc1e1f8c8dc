"""The transport's hold on trio-websocket's internals: it fails loudly when they change.

``realm/server/_transport.py`` copies or overrides private methods of the trio-websocket it was
written against; a new version may change them without notice (the pin is ``<0.13``). These
tests compare each one's source with the digest recorded there, and check the shapes the
transport calls, so an upgrade stops here, not in production.
"""

from __future__ import annotations

import inspect

import pytest
import trio
import trio_websocket
import wsproto

from realm.server._transport import RELIES_ON, UncutStream, source_digest


@pytest.mark.parametrize("qualname", sorted(RELIES_ON))
def test_trio_websocket_private_code_is_what_the_transport_was_written_against(
    qualname: str,
) -> None:
    cls_name, _, attr = qualname.partition(".")
    cls = getattr(trio_websocket, cls_name)
    assert attr in vars(cls), f"trio-websocket {cls_name} no longer has {attr}"
    digest = source_digest(qualname)
    assert digest == RELIES_ON[qualname], (
        f"trio-websocket {getattr(trio_websocket, '__version__', '?')} changed {qualname}: "
        "re-check realm/server/_transport.py against its new source (docs/server.md, "
        "'Transport'), then record the new digest in RELIES_ON"
    )


def test_the_shapes_the_transport_uses() -> None:
    init = inspect.signature(trio_websocket.WebSocketConnection.__init__).parameters
    for name in ("stream", "ws_connection", "message_queue_size", "max_message_size",
                 "receive_buffer_size"):  # fmt: skip
        assert name in init, name
    source = inspect.getsource(trio_websocket.WebSocketConnection.__init__)
    assert "self._wsproto = ws_connection" in source
    assert inspect.iscoroutinefunction(trio_websocket.WebSocketConnection._reader_task)
    assert inspect.iscoroutinefunction(trio_websocket.WebSocketConnection._get_request)
    assert hasattr(wsproto.connection.ConnectionState, "OPEN")


async def test_uncut_stream_gives_back_what_was_read_ahead() -> None:
    left, right = trio.socket.socketpair()
    with left, right:
        wire = UncutStream(trio.SocketStream(left))
        await trio.SocketStream(right).send_all(b"world")
        wire.unread(b"hello ")
        got = b""
        while len(got) < 11:
            got += await wire.receive_some(4)
        assert got == b"hello world"
        assert wire.peer_host == ""  # a socketpair has no address
