"""Protocol v1 on the wire: its error codes, close codes and messages, for server and client.

The one home of the protocol's contract (docs/protocol.md): ``ErrorCode`` is the list of error
codes (the runtime's errors carry them too, ``realm._errors``); the server reads client messages
with ``parse_message`` and builds its own with ``stream_message``, ``result_message`` and
``error_message``; the client builds ``call_message`` / ``cancel_message`` and reads the
server's with ``read_server_message``.

``parse_message`` never raises anything but ``ProtocolError`` (with the code, a message naming
the field at fault, and the call id when one could be read), so a server can always answer.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any, Final

import attrs

# ``ProtocolError`` lives in the error tree, which imports ``ErrorCode`` from here: the module,
# not the name, is imported (it is complete by the time a message is parsed)
from . import _errors

PROTOCOL_VERSION: Final = 1
MAX_ID_CHARS: Final = 128
MAX_FUNCTION_CHARS: Final = 128
MAX_DEPTH: Final = 32  # nesting of objects/arrays in one message
MAX_INT_DIGITS: Final = 32  # longer integers are refused (never parsed into bignums)
SAFE_INT: Final = 2**53 - 1  # largest integer id every JSON client reads exactly

#: the WebSocket subprotocol of protocol v1; a browser offers it with its key (next line)
SUBPROTOCOL: Final = "realm.v1"
#: ``Sec-WebSocket-Protocol: realm.v1, realm.bearer.<KEY>``: the API key of a browser, which
#: cannot set an ``Authorization`` header on a WebSocket
BEARER_SUBPROTOCOL: Final = "realm.bearer."


class ErrorCode(enum.StrEnum):
    """The error codes of protocol v1: the whole list, nothing else is sent."""

    INVALID_REQUEST = "INVALID_REQUEST"
    UNKNOWN_FUNCTION = "UNKNOWN_FUNCTION"
    INVALID_PARAMS = "INVALID_PARAMS"
    UNAUTHORIZED = "UNAUTHORIZED"
    RATE_LIMITED = "RATE_LIMITED"
    OVERLOADED = "OVERLOADED"
    TENANT_UNAVAILABLE = "TENANT_UNAVAILABLE"
    GUEST_TRAP = "GUEST_TRAP"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    INTERNAL = "INTERNAL"


class CloseCode(enum.IntEnum):
    """The WebSocket close codes a Realm server sends (docs/protocol.md, "Close codes")."""

    NORMAL = 1000  # also after the idle timeout
    GOING_AWAY = 1001  # the server shuts down
    PROTOCOL_ERROR = 1002  # frames wsproto cannot parse
    INVALID_DATA = 1007  # invalid UTF-8 in a text frame
    POLICY = 1008  # a missing or unknown API key, a slow reader, no pong
    TOO_BIG = 1009  # a message over max_message_bytes


#: the reason of the close (1008) that ends a connection with a missing or unknown API key
UNAUTHORIZED_REASON: Final = f"{ErrorCode.UNAUTHORIZED}: missing or unknown API key"
#: the message of the error that ends a call the server would not finish because it is shutting
#: down (CANCELLED past the grace period, OVERLOADED for a call arriving while it drains): the
#: call may be retried on another server
SHUTDOWN_REASON: Final = "the server is shutting down"
#: the header naming the server that answered (HTTP responses and the WebSocket handshake)
SERVER_HEADER: Final = "X-Realm-Server"

CallId = str | int


@attrs.frozen
class Call:
    id: CallId
    function: str
    params: dict[str, Any]
    tenant_id: str | None = None


@attrs.frozen
class Cancel:
    id: CallId


@attrs.frozen
class ServerMessage:
    """A server message as a client reads it: ``type`` is ``stream``, ``result`` or ``error``;
    ``data`` the stream or result data; ``error`` the error object (code, message, ...)."""

    type: str
    id: CallId | None
    data: dict[str, Any] = attrs.field(factory=dict)
    error: dict[str, Any] = attrs.field(factory=dict)


_CALL_FIELDS: Final = frozenset({"type", "id", "function", "params", "tenant_id"})
_CANCEL_FIELDS: Final = frozenset({"type", "id"})
_SERVER_TYPES: Final = frozenset({"stream", "result", "error"})


# --- reading client messages (the server) --------------------------------------------------------


def _bad_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]!r} is out of range")
    return value


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


_decoder = json.JSONDecoder(
    parse_constant=_bad_constant, parse_float=_parse_float, parse_int=_parse_int
)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (never recursing on client data)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in v)
    return deepest


def _read_id(msg: dict[str, Any]) -> CallId | None:
    """The message's id if it is a usable one (for echoing in errors), else None."""
    v = msg.get("id")
    if isinstance(v, str) and 0 < len(v) <= MAX_ID_CHARS:
        return v
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= SAFE_INT:
        return v
    return None


def _refuse(message: str, call_id: CallId | None = None) -> _errors.ProtocolError:
    return _errors.ProtocolError(ErrorCode.INVALID_REQUEST, message, call_id)


def parse_message(text: str) -> Call | Cancel:
    """Parse one text frame into a ``Call`` or ``Cancel``; raise ``ProtocolError``."""
    try:
        msg = _decoder.decode(text)
    except RecursionError:
        raise _refuse("message is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and our own refusals above
        raise _refuse(f"message is not valid JSON: {e}") from None
    if not isinstance(msg, dict):
        raise _refuse(f"message must be a JSON object, not {type(msg).__name__}")
    if _depth(msg) > MAX_DEPTH:
        raise _refuse(f"message is nested deeper than {MAX_DEPTH} levels")
    call_id = _read_id(msg)
    kind = msg.get("type")
    if "type" not in msg:
        raise _refuse("missing field 'type'", call_id)
    if kind not in ("call", "cancel"):
        raise _refuse(
            f"field 'type': unknown message type {_show(kind)} (expected 'call' or 'cancel')",
            call_id,
        )
    allowed = _CALL_FIELDS if kind == "call" else _CANCEL_FIELDS
    extra = sorted(k for k in msg if k not in allowed)
    if extra:
        raise _refuse(f"unknown field {_show(extra[0])} in a {kind!r} message", call_id)
    if "id" not in msg:
        raise _refuse("missing field 'id'")
    if call_id is None:
        raise _refuse(
            f"field 'id' must be a string of 1-{MAX_ID_CHARS} characters or an integer in "
            f"0..2**53-1, not {_show(msg['id'])}"
        )
    if kind == "cancel":
        return Cancel(call_id)
    function = msg.get("function")
    if "function" not in msg:
        raise _refuse("missing field 'function'", call_id)
    if not isinstance(function, str) or not 0 < len(function) <= MAX_FUNCTION_CHARS:
        raise _refuse(
            f"field 'function' must be a name of 1-{MAX_FUNCTION_CHARS} characters, "
            f"not {_show(function)}",
            call_id,
        )
    params = msg.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _refuse(f"field 'params' must be a JSON object, not {type(params).__name__}", call_id)
    tenant_id = msg.get("tenant_id")
    if tenant_id is not None and not isinstance(tenant_id, str):
        raise _refuse("field 'tenant_id' must be a string", call_id)
    return Call(call_id, function, params, tenant_id)


def _show(value: Any) -> str:
    """A short, safe rendering of a client value for an error message."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- building messages -------------------------------------------------------------------------


def dumps(message: dict[str, Any]) -> str:
    """Compact JSON, UTF-8 text where it can be: a string holding a lone surrogate (a client's
    ``"\\ud800"`` id, a guest's result) cannot be encoded as UTF-8, so then every non-ASCII
    character is escaped instead (the frame would otherwise fail to send). NaN is refused
    (``ValueError``): JSON has none."""
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(message, separators=(",", ":"), allow_nan=False)
    return text


def call_message(
    call_id: CallId, function: str, params: dict[str, Any] | None = None, *,
    tenant_id: str | None = None,
) -> str:  # fmt: skip
    """A client's ``call``."""
    message: dict[str, Any] = {"type": "call", "id": call_id, "function": function}
    message["params"] = params or {}
    if tenant_id is not None:
        message["tenant_id"] = tenant_id
    return dumps(message)


def cancel_message(call_id: CallId) -> str:
    """A client's ``cancel`` of a call in flight."""
    return dumps({"type": "cancel", "id": call_id})


def stream_message(call_id: CallId, data: dict[str, Any]) -> str:
    return dumps({"type": "stream", "id": call_id, "data": data})


def result_message(call_id: CallId, data: dict[str, Any]) -> str:
    return dumps({"type": "result", "id": call_id, "data": data})


def error_message(
    call_id: CallId | None, code: ErrorCode | str, message: str, *,
    retry_after: float | None = None,
) -> str:  # fmt: skip
    """An ``error``; ``retry_after`` (seconds) goes with RATE_LIMITED."""
    error: dict[str, Any] = {"code": str(ErrorCode(code)), "message": message}
    if retry_after is not None:
        error["retry_after"] = retry_after
    return dumps({"type": "error", "id": call_id, "error": error})


# --- reading server messages (the client) ------------------------------------------------------


def read_server_message(text: str | bytes) -> ServerMessage | None:
    """A server message, or None for anything that is not one (a client ignores those)."""
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(msg, dict) or msg.get("type") not in _SERVER_TYPES:
        return None
    call_id = msg.get("id")
    if call_id is not None and not isinstance(call_id, str | int):
        return None
    data, error = msg.get("data"), msg.get("error")
    return ServerMessage(
        msg["type"],
        call_id,
        data if isinstance(data, dict) else {},
        error if isinstance(error, dict) else {},
    )
