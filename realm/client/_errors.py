"""Errors a client raises: one class per protocol error code, carrying the code.

Each also derives from the error the embedded runtime raises for the same condition where
there is one, so ``except realm.Overloaded`` catches the embedded and the remote case alike.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .._errors import (
    CallCancelled,
    GuestError,
    InvalidParams,
    Overloaded,
    RealmError,
    TenantUnavailable,
    UnknownFunction,
)


class RemoteError(RealmError):
    """The server answered a call with an error (``code`` is the protocol's error code)."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, call_id: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.call_id = call_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidRequest(RemoteError):
    code = "INVALID_REQUEST"


class RemoteUnknownFunction(RemoteError, UnknownFunction):
    code = "UNKNOWN_FUNCTION"


class RemoteInvalidParams(RemoteError, InvalidParams):
    code = "INVALID_PARAMS"


class Unauthorized(RemoteError):
    code = "UNAUTHORIZED"


class RateLimited(RemoteError):
    code = "RATE_LIMITED"


class RemoteOverloaded(RemoteError, Overloaded):
    code = "OVERLOADED"


class RemoteTenantUnavailable(RemoteError, TenantUnavailable):
    code = "TENANT_UNAVAILABLE"


class RemoteGuestTrap(RemoteError, GuestError):
    code = "GUEST_TRAP"


class RemoteCancelled(RemoteError, CallCancelled):
    code = "CANCELLED"


class CallTimeout(RemoteError):
    code = "TIMEOUT"


class ServerError(RemoteError):
    code = "INTERNAL"


class ConnectionLost(RealmError):
    """The connection closed while a call was in flight (the call's outcome is unknown), or it
    could not be opened. ``close_code`` and ``reason`` are the server's close frame, if any."""

    code = "INTERNAL"

    def __init__(self, message: str, *, close_code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.close_code = close_code
        self.reason = reason


BY_CODE: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        RemoteUnknownFunction,
        RemoteInvalidParams,
        Unauthorized,
        RateLimited,
        RemoteOverloaded,
        RemoteTenantUnavailable,
        RemoteGuestTrap,
        RemoteCancelled,
        CallTimeout,
        ServerError,
    )
}


def error_from_wire(error: Any, call_id: Any = None) -> RemoteError:
    """The exception for an ``error`` object of a server message (unknown codes: ServerError)."""
    if not isinstance(error, dict):
        return ServerError(f"malformed error object {error!r}", call_id=call_id)
    cls = BY_CODE.get(str(error.get("code")), ServerError)
    return cls(str(error.get("message", "")), call_id=call_id)
