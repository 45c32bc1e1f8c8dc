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
from .._protocol import SHUTDOWN_REASON, ErrorCode


class RemoteError(RealmError):
    """The server answered a call with an error (``code`` is the protocol's error code)."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str, *, call_id: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.call_id = call_id

    @property
    def retryable(self) -> bool:
        """True if the same call may be sent again (to this server or, through a balancer,
        another): the server refused it before it ran (OVERLOADED, RATE_LIMITED after
        ``retry_after``), or ended it because it is shutting down (CANCELLED)."""
        return False

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidRequest(RemoteError):
    code = ErrorCode.INVALID_REQUEST


class RemoteUnknownFunction(RemoteError, UnknownFunction):
    code = ErrorCode.UNKNOWN_FUNCTION


class RemoteInvalidParams(RemoteError, InvalidParams):
    code = ErrorCode.INVALID_PARAMS


class Unauthorized(RemoteError):
    """UNAUTHORIZED: a call's ``tenant_id`` is not the connection's tenant, or (as
    ``KeyRefused``) the server closed the connection because its API key is missing or
    unknown."""

    code = ErrorCode.UNAUTHORIZED


class RateLimited(RemoteError):
    """RATE_LIMITED: the tenant is over its call or token rate; ``retry_after`` is the seconds
    to wait before the next call is admitted (None if the server did not say)."""

    code = ErrorCode.RATE_LIMITED
    retryable = True  # type: ignore[assignment]  # after retry_after

    def __init__(
        self, message: str, *, call_id: Any = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, call_id=call_id)
        self.retry_after = retry_after


class RemoteOverloaded(RemoteError, Overloaded):
    code = ErrorCode.OVERLOADED
    retryable = True  # type: ignore[assignment]  # refused before it ran


class RemoteTenantUnavailable(RemoteError, TenantUnavailable):
    code = ErrorCode.TENANT_UNAVAILABLE


class RemoteGuestTrap(RemoteError, GuestError):
    code = ErrorCode.GUEST_TRAP


class RemoteCancelled(RemoteError, CallCancelled):
    code = ErrorCode.CANCELLED

    @property
    def retryable(self) -> bool:
        """Ended by the server's shutdown (not by the client): it may be sent again."""
        return self.message == SHUTDOWN_REASON


class CallTimeout(RemoteError):
    code = ErrorCode.TIMEOUT


class ServerError(RemoteError):
    code = ErrorCode.INTERNAL


class ConnectionLost(RealmError):
    """The connection closed while a call was in flight (the call's outcome is unknown), or it
    could not be opened. ``close_code`` and ``reason`` are the server's close frame, if any.

    ``retryable`` is True: the client never sends a call twice by itself, but the caller may
    (the next call opens a new connection, which a balancer gives to a server that is up).
    Generated text is not kept by the server, so a retried ``generate`` starts over."""

    code = ErrorCode.INTERNAL
    retryable = True

    def __init__(self, message: str, *, close_code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.close_code = close_code
        self.reason = reason


#: the client's exception for each error code of protocol v1 (every code has one)
class KeyRefused(Unauthorized, ConnectionLost):
    """The server closed the connection (1008 UNAUTHORIZED) because its API key is missing or
    unknown: both an ``Unauthorized`` and a ``ConnectionLost`` (the connection is gone);
    ``close_code`` is 1008 and ``reason`` the close frame's reason."""

    retryable = False  # type: ignore[assignment]  # the same key fails again

    def __init__(self, message: str, *, close_code: int | None = None, reason: str = "") -> None:
        RemoteError.__init__(self, message)
        self.close_code = close_code
        self.reason = reason


BY_CODE: dict[ErrorCode, type[RemoteError]] = {
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
    message = str(error.get("message", ""))
    try:
        cls = BY_CODE[ErrorCode(error.get("code"))]
    except ValueError:
        return ServerError(message, call_id=call_id)
    if cls is RateLimited:
        wait = error.get("retry_after")
        ok = isinstance(wait, int | float) and not isinstance(wait, bool) and wait >= 0
        return RateLimited(message, call_id=call_id, retry_after=float(wait) if ok else None)
    return cls(message, call_id=call_id)
