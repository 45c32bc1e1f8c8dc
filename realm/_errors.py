"""Realm's error tree: one shallow hierarchy, each class mapped to one protocol error code."""

from __future__ import annotations

from typing import ClassVar


class RealmError(Exception):
    """Base of every error Realm raises on purpose."""

    code: ClassVar[str] = "INTERNAL"


class KernelError(RealmError, ValueError):
    """A native kernel was given arguments it cannot use, or failed (status from C)."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, kernel: str, status: int | None = None) -> None:
        super().__init__(f"{kernel}: {message}")
        self.kernel = kernel
        self.status = status


class ModelError(RealmError):
    """A model file cannot be loaded or used."""

    code: ClassVar[str] = "INVALID_PARAMS"


class TokenizerError(RealmError):
    """Tokenizer data is missing or unusable, or text/ids cannot be converted.

    ``path`` and ``field`` name the GGUF file and metadata key at fault, when there is one.
    """

    code: ClassVar[str] = "INVALID_PARAMS"

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class KVMemoryExhausted(ModelError):
    """A session's KV cache cannot grow: the model's KV memory cap is reached."""

    code: ClassVar[str] = "OVERLOADED"


class InvalidParams(RealmError):
    """Call parameters do not match the function's schema (names the parameter)."""

    code: ClassVar[str] = "INVALID_PARAMS"


class UnknownFunction(RealmError):
    """The guest exports no such function (looked up in its metadata, never by getattr)."""

    code: ClassVar[str] = "UNKNOWN_FUNCTION"


class CallCancelled(RealmError):
    """The call was cancelled, or its deadline passed, before it finished."""

    code: ClassVar[str] = "CANCELLED"


class Overloaded(RealmError):
    """A bounded queue is full: try again later."""

    code: ClassVar[str] = "OVERLOADED"


class GuestError(RealmError):
    """A guest failed: it trapped, broke the ABI, or returned an error."""

    code: ClassVar[str] = "GUEST_TRAP"


class GuestTrap(GuestError):
    """The guest trapped (its own fault, a limit, or stopped by the host); the instance is
    discarded and rebuilt for the next call."""


class GuestABIError(GuestError):
    """The module does not follow the guest ABI (version, imports, exports, metadata)."""


class GuestRefusedParams(GuestError, InvalidParams):
    """The guest refused the call's params (it returned EINVAL, ENOENT or ENOTSUP: a bad value,
    a model or session that does not exist, something the model cannot do); its message names
    the parameter."""

    code: ClassVar[str] = "INVALID_PARAMS"


class GuestLimitReached(GuestError, Overloaded):
    """The guest hit a limit (it returned ELIMIT: KV memory, sessions, output size)."""

    code: ClassVar[str] = "OVERLOADED"


class TenantUnavailable(RealmError):
    """The tenant is unknown here, failed past its restart intensity, or stopping."""

    code: ClassVar[str] = "TENANT_UNAVAILABLE"
