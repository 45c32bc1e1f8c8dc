"""What the Python client says about a call that failed: whether it may be sent again
(``retryable``), and the routing key it sends to a balancer (``tenant``)."""

from __future__ import annotations

import pytest
import trio

from realm._protocol import SHUTDOWN_REASON
from realm.client import ConnectionLost, KeyRefused, RateLimited, RemoteCancelled, connect
from realm.client._errors import error_from_wire
from realm.server import (
    Server,
    ServerConfig,
    ServerLimits,
    TenantSpec,
    hash_key,
    open_server,
)
from realm.testing import write_test_model

LIMIT = 30.0


def test_retryable_says_what_may_be_sent_again() -> None:
    def wire(code: str, message: str = "m") -> object:
        return error_from_wire({"code": code, "message": message}, 1)

    assert wire("OVERLOADED").retryable  # type: ignore[attr-defined]
    limited = wire("RATE_LIMITED")
    assert isinstance(limited, RateLimited) and limited.retryable
    assert wire("CANCELLED", SHUTDOWN_REASON).retryable  # type: ignore[attr-defined]
    assert not wire("CANCELLED", "cancelled by the client").retryable  # type: ignore[attr-defined]
    for code in ("INVALID_PARAMS", "UNKNOWN_FUNCTION", "GUEST_TRAP", "TIMEOUT", "INTERNAL"):
        assert not wire(code).retryable, code  # type: ignore[attr-defined]
    assert ConnectionLost("gone").retryable
    assert not KeyRefused("no", close_code=1008).retryable


@pytest.mark.parametrize("tenant", ["", "has space", "x" * 129, "é"])
async def test_a_bad_routing_key_is_refused(tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        async with connect("ws://127.0.0.1:9", tenant=tenant, retries=0):
            pass


async def _serve(
    config: ServerConfig,
    stop: trio.Event,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[Server],
) -> None:
    """A server until ``stop``, then its graceful shutdown; ``done`` once it is closed."""
    try:
        async with open_server(config) as server:
            task_status.started(server)
            await stop.wait()
    finally:
        done.set()


async def test_a_drained_server_ends_the_call_retryably_and_the_next_call_reconnects(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A server shuts down mid-stream: the call ends with CANCELLED "the server is shutting
    down", retryable; a server back on the same port serves the same client's next call, and
    the client says which server it reached."""
    model = write_test_model(tmp_path_factory.mktemp("retry") / "m.gguf", context_length=8192)
    tenants = {"acme": TenantSpec("acme", api_key_hashes=(hash_key("k"),))}

    def config(port: int, name: str) -> ServerConfig:
        # the grace must be short beside the call: greedy decoding of this model ends (its
        # end-of-text token) after about 300 tokens, which a fast machine decodes in 0.16 s
        limits = ServerLimits(shutdown_seconds=0.02, max_tokens=8000)
        return ServerConfig(
            models={"m": str(model)}, tenants=tenants, port=port, server_id=name, limits=limits
        )

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            stop_one, one_done = trio.Event(), trio.Event()
            one = await nursery.start(_serve, config(0, "one"), stop_one, one_done)
            async with connect(one.url, api_key="k", tenant="acme", retries=8) as c:
                assert c.server == "one"
                params = {"prompt": "The", "max_tokens": 8000, "temperature": 0}
                with pytest.raises(RemoteCancelled) as ended:
                    async with c.stream("generate", params) as events:
                        async for _ in events:
                            stop_one.set()  # the server drains; this call outlasts its grace
                assert ended.value.retryable and ended.value.message == SHUTDOWN_REASON
                await one_done.wait()
                stop_two = trio.Event()
                await nursery.start(_serve, config(one.port, "two"), stop_two, trio.Event())
                result = await c.call("generate", {"prompt": "The", "max_tokens": 4})
                assert result["usage"]["completion_tokens"] >= 1
                assert c.server == "two"
                stop_two.set()
