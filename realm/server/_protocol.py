"""Protocol v1: parsing and checking client messages, building server messages.

Everything a client sends passes through ``parse_message`` before anything else looks at it.
It never raises anything but ``ProtocolError`` (with the code, a message naming the field at
fault, and the call id when one could be read), so the connection handler can always answer.
The full specification, with examples, is docs/protocol.md.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

import attrs

PROTOCOL_VERSION: Final = 1
MAX_ID_CHARS: Final = 128
MAX_FUNCTION_CHARS: Final = 128
MAX_DEPTH: Final = 32  # nesting of objects/arrays in one message
MAX_INT_DIGITS: Final = 32  # longer integers are refused (never parsed into bignums)
SAFE_INT: Final = 2**53 - 1  # largest integer id every JSON client reads exactly

# Error codes of protocol v1 (docs/protocol.md): the whole list, nothing else is sent.
INVALID_REQUEST: Final = "INVALID_REQUEST"
UNKNOWN_FUNCTION: Final = "UNKNOWN_FUNCTION"
INVALID_PARAMS: Final = "INVALID_PARAMS"
UNAUTHORIZED: Final = "UNAUTHORIZED"
RATE_LIMITED: Final = "RATE_LIMITED"
OVERLOADED: Final = "OVERLOADED"
TENANT_UNAVAILABLE: Final = "TENANT_UNAVAILABLE"
GUEST_TRAP: Final = "GUEST_TRAP"
CANCELLED: Final = "CANCELLED"
TIMEOUT: Final = "TIMEOUT"
INTERNAL: Final = "INTERNAL"
ERROR_CODES: Final = frozenset(
    {
        INVALID_REQUEST,
        UNKNOWN_FUNCTION,
        INVALID_PARAMS,
        UNAUTHORIZED,
        RATE_LIMITED,
        OVERLOADED,
        TENANT_UNAVAILABLE,
        GUEST_TRAP,
        CANCELLED,
        TIMEOUT,
        INTERNAL,
    }
)

CallId = str | int


class ProtocolError(Exception):
    """A message the server answers with an error (and keeps the connection open)."""

    def __init__(self, code: str, message: str, call_id: CallId | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.call_id = call_id


@attrs.frozen
class Call:
    id: CallId
    function: str
    params: dict[str, Any]
    tenant_id: str | None = None


@attrs.frozen
class Cancel:
    id: CallId


_CALL_FIELDS: Final = frozenset({"type", "id", "function", "params", "tenant_id"})
_CANCEL_FIELDS: Final = frozenset({"type", "id"})


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


def parse_message(text: str) -> Call | Cancel:
    """Parse one text frame into a ``Call`` or ``Cancel``; raise ``ProtocolError``."""
    try:
        msg = _decoder.decode(text)
    except RecursionError:
        raise ProtocolError(INVALID_REQUEST, "message is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and our own refusals above
        raise ProtocolError(INVALID_REQUEST, f"message is not valid JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(
            INVALID_REQUEST, f"message must be a JSON object, not {type(msg).__name__}"
        )
    if _depth(msg) > MAX_DEPTH:
        raise ProtocolError(INVALID_REQUEST, f"message is nested deeper than {MAX_DEPTH} levels")
    call_id = _read_id(msg)
    kind = msg.get("type")
    if "type" not in msg:
        raise ProtocolError(INVALID_REQUEST, "missing field 'type'", call_id)
    if kind not in ("call", "cancel"):
        raise ProtocolError(
            INVALID_REQUEST,
            f"field 'type': unknown message type {_show(kind)} (expected 'call' or 'cancel')",
            call_id,
        )
    allowed = _CALL_FIELDS if kind == "call" else _CANCEL_FIELDS
    extra = sorted(k for k in msg if k not in allowed)
    if extra:
        raise ProtocolError(
            INVALID_REQUEST, f"unknown field {_show(extra[0])} in a {kind!r} message", call_id
        )
    if "id" not in msg:
        raise ProtocolError(INVALID_REQUEST, "missing field 'id'")
    if call_id is None:
        raise ProtocolError(
            INVALID_REQUEST,
            f"field 'id' must be a string of 1-{MAX_ID_CHARS} characters or an integer in "
            f"0..2**53-1, not {_show(msg['id'])}",
        )
    if kind == "cancel":
        return Cancel(call_id)
    function = msg.get("function")
    if "function" not in msg:
        raise ProtocolError(INVALID_REQUEST, "missing field 'function'", call_id)
    if not isinstance(function, str) or not 0 < len(function) <= MAX_FUNCTION_CHARS:
        raise ProtocolError(
            INVALID_REQUEST,
            f"field 'function' must be a name of 1-{MAX_FUNCTION_CHARS} characters, "
            f"not {_show(function)}",
            call_id,
        )
    params = msg.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError(
            INVALID_REQUEST,
            f"field 'params' must be a JSON object, not {type(params).__name__}",
            call_id,
        )
    tenant_id = msg.get("tenant_id")
    if tenant_id is not None and not isinstance(tenant_id, str):
        raise ProtocolError(INVALID_REQUEST, "field 'tenant_id' must be a string", call_id)
    return Call(call_id, function, params, tenant_id)


def _show(value: Any) -> str:
    """A short, safe rendering of a client value for an error message."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def dumps(message: dict[str, Any]) -> str:
    """Compact JSON, UTF-8 text where it can be: a string holding a lone surrogate (a client's
    ``"\\ud800"`` id, a guest's result) cannot be encoded as UTF-8, so then every non-ASCII
    character is escaped instead (the frame would otherwise fail to send)."""
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(message, separators=(",", ":"), allow_nan=False)
    return text


def stream_message(call_id: CallId, data: dict[str, Any]) -> str:
    return dumps({"type": "stream", "id": call_id, "data": data})


def result_message(call_id: CallId, data: dict[str, Any]) -> str:
    return dumps({"type": "result", "id": call_id, "data": data})


def error_message(call_id: CallId | None, code: str, message: str) -> str:
    assert code in ERROR_CODES, code
    return dumps({"type": "error", "id": call_id, "error": {"code": code, "message": message}})
