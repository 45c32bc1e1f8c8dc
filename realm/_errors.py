"""Realm's error tree: one shallow hierarchy, each class mapped to one protocol error code."""

from __future__ import annotations

from typing import ClassVar

from ._protocol import ErrorCode


class RealmError(Exception):
    """Base of every error Realm raises on purpose."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL


class KernelError(RealmError, ValueError):
    """A native kernel was given arguments it cannot use, or failed (status from C)."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str, *, kernel: str, status: int | None = None) -> None:
        super().__init__(f"{kernel}: {message}")
        self.kernel = kernel
        self.status = status


class ModelError(RealmError):
    """A model file cannot be loaded or used."""

    code: ClassVar[ErrorCode] = ErrorCode.INVALID_PARAMS


class TokenizerError(RealmError):
    """Tokenizer data is missing or unusable, or text/ids cannot be converted.

    ``path`` and ``field`` name the GGUF file and metadata key at fault, when there is one.
    """

    code: ClassVar[ErrorCode] = ErrorCode.INVALID_PARAMS

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class KVMemoryExhausted(ModelError):
    """A session's KV cache cannot grow: the model's KV memory cap is reached."""

    code: ClassVar[ErrorCode] = ErrorCode.OVERLOADED


class InvalidParams(RealmError):
    """Call parameters do not match the function's schema (names the parameter)."""

    code: ClassVar[ErrorCode] = ErrorCode.INVALID_PARAMS


class UnknownFunction(RealmError):
    """The guest exports no such function (looked up in its metadata, never by getattr)."""

    code: ClassVar[ErrorCode] = ErrorCode.UNKNOWN_FUNCTION


class CallCancelled(RealmError):
    """The call was cancelled, or its deadline passed, before it finished."""

    code: ClassVar[ErrorCode] = ErrorCode.CANCELLED


class DeadlineExceeded(CallCancelled):
    """The call's deadline passed before it finished (its own timeout or the tenant's
    ``call_timeout_seconds``): the guest was stopped as for a cancel."""

    code: ClassVar[ErrorCode] = ErrorCode.TIMEOUT


class Overloaded(RealmError):
    """A bounded queue is full: try again later."""

    code: ClassVar[ErrorCode] = ErrorCode.OVERLOADED


class GuestError(RealmError):
    """A guest failed: it trapped, broke the ABI, or returned an error."""

    code: ClassVar[ErrorCode] = ErrorCode.GUEST_TRAP


class GuestTrap(GuestError):
    """The guest trapped (its own fault, a limit, or stopped by the host); the instance is
    discarded and rebuilt for the next call."""


class GuestABIError(GuestError):
    """The module does not follow the guest ABI (version, imports, exports, metadata)."""


class GuestRefusedParams(GuestError, InvalidParams):
    """The guest refused the call's params (it returned EINVAL, ENOENT or ENOTSUP: a bad value,
    a model or session that does not exist, something the model cannot do); its message names
    the parameter."""

    code: ClassVar[ErrorCode] = ErrorCode.INVALID_PARAMS


class GuestLimitReached(GuestError, Overloaded):
    """The guest hit a limit (it returned ELIMIT: KV memory, sessions, output size)."""

    code: ClassVar[ErrorCode] = ErrorCode.OVERLOADED


class TenantUnavailable(RealmError):
    """The tenant is unknown here, failed past its restart intensity, or stopping."""

    code: ClassVar[ErrorCode] = ErrorCode.TENANT_UNAVAILABLE


class ProtocolError(RealmError):
    """A message breaks protocol v1, or a call is refused before it starts; ``code`` says
    which (INVALID_REQUEST, UNAUTHORIZED, RATE_LIMITED, ...). A server answers it with an error
    message (``call_id``: the call's id, when one could be read) and keeps the connection open;
    ``retry_after`` is the seconds a RATE_LIMITED caller should wait."""

    code: ClassVar[ErrorCode] = ErrorCode.INVALID_REQUEST

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        call_id: str | int | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)  # type: ignore[misc]  # each instance has its own code
        self.message = message
        self.call_id = call_id
        self.retry_after = retry_after
