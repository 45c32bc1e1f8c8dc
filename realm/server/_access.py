"""Who may connect: a request's Host and Origin, its API key, and failed-login throttling.

Browsers let any web page open a WebSocket to any address, the user's own machine included,
and send no credentials a page could not also send. So a handshake (and any plain HTTP request)
is checked before anything else:

- ``Origin``, which browsers always send and pages cannot forge: absent (not a browser), or one
  of ``allowed_origins``; without that setting, only pages served from the loopback interface
  (``http://localhost:3000``, ``http://127.0.0.1``, ``http://[::1]``).
- ``Host``, against DNS rebinding (a page whose own name is made to resolve to 127.0.0.1): one
  of ``allowed_hosts``; without that setting, a server listening on loopback accepts loopback
  names only.

API keys come from ``Authorization: Bearer KEY``, from the subprotocol list
``Sec-WebSocket-Protocol: realm.v1, realm.bearer.KEY`` (what a browser can send), or from
``?api_key=KEY`` in the URL (which proxies, logs and browser history keep: the docs say so).
Failed logins are throttled per client address by ``LoginThrottle``.
"""

from __future__ import annotations

import collections
import ipaddress
import time
import urllib.parse
from collections.abc import Callable
from typing import Final

import attrs

from .._protocol import BEARER_SUBPROTOCOL, SUBPROTOCOL
from ._http import HttpRequest

MAX_TRACKED_ADDRESSES: Final = 4096  # addresses with failed logins remembered at once
FORGET_SECONDS: Final = 600.0  # an address's failures are forgotten after this long in peace


def is_loopback_name(host: str) -> bool:
    """``localhost``, ``*.localhost``, 127.0.0.0/8 or ::1 (brackets allowed)."""
    h = host.strip().strip("[]").lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _host_name(value: str) -> str:
    """The name of a ``Host`` header value, without its port."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8080
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


@attrs.frozen
class AccessPolicy:
    """The Host and Origin rules of one server (see the module docs)."""

    allowed_origins: tuple[str, ...] | None = None
    allowed_hosts: tuple[str, ...] | None = None
    loopback: bool = True  # the server listens on a loopback address

    def refusal(self, request: HttpRequest) -> str | None:
        """Why ``request`` is refused (HTTP 403), or None if it may go on."""
        hosts = request.header_values("host")
        if len(hosts) > 1:
            return "more than one Host header"
        host = hosts[0] if hosts else None
        if self.allowed_hosts is not None:
            if "*" not in self.allowed_hosts and (
                host is None
                or (host.lower() not in self.allowed_hosts
                    and _host_name(host) not in self.allowed_hosts)
            ):  # fmt: skip
                return f"Host {host!r} is not one of this server's names (server.allowed_hosts)"
        elif self.loopback and (host is None or not is_loopback_name(_host_name(host))):
            return (
                f"Host {host!r} is not a loopback name: this server listens on loopback "
                "(set server.allowed_hosts to serve other names)"
            )
        origins = [v for k, v in request.headers if k == "origin"]
        if not origins:
            return None  # not a browser
        if len(origins) > 1:
            return "more than one Origin header"
        origin = origins[0].strip().rstrip("/").lower()
        if self.allowed_origins is None:
            parts = urllib.parse.urlsplit(origin)
            if parts.scheme in ("http", "https") and is_loopback_name(parts.hostname or ""):
                return None
            return (
                f"Origin {origins[0][:100]!r} is not allowed: only pages from this machine "
                "(set server.allowed_origins to allow others)"
            )
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return None
        return f"Origin {origins[0][:100]!r} is not allowed (server.allowed_origins)"


@attrs.frozen
class Credentials:
    """The API key a request presents, and where it came from (``header``, ``subprotocol``,
    ``query``; ``none`` without one). Never logged: only ``via`` is."""

    key: str | None = attrs.field(repr=False)
    via: str


def credentials(request: HttpRequest) -> Credentials:
    """The request's API key: the first ``Authorization: Bearer`` header, else a
    ``realm.bearer.KEY`` subprotocol, else ``?api_key=``."""
    for name, value in request.headers:
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return Credentials(token.strip(), "header")
            break  # the first Authorization header is the one
    for proto in request.header_values("sec-websocket-protocol"):
        if proto.startswith(BEARER_SUBPROTOCOL) and len(proto) > len(BEARER_SUBPROTOCOL):
            return Credentials(proto[len(BEARER_SUBPROTOCOL) :], "subprotocol")
    keys = urllib.parse.parse_qs(request.query).get("api_key")
    if keys and keys[0]:
        return Credentials(keys[0], "query")
    return Credentials(None, "none")


def chosen_subprotocol(request: HttpRequest) -> str | None:
    """The subprotocol a server answers with: ``realm.v1`` if offered (a browser that offered
    subprotocols fails a handshake answered with none), never the key."""
    return SUBPROTOCOL if SUBPROTOCOL in request.header_values("sec-websocket-protocol") else None


@attrs.define
class _Record:
    failures: int = 0  # failed logins in a row
    blocked_until: float = 0.0
    last: float = 0.0


class LoginThrottle:
    """Failed logins per client address: ``allowed`` in a row are free; each one past them
    blocks the address for ``backoff_seconds``, doubling, at most ``max_seconds``. A success
    clears the address. Memory is bounded: at most ``MAX_TRACKED_ADDRESSES`` addresses (the
    longest quiet ones are dropped first), each forgotten after ``FORGET_SECONDS`` of quiet."""

    def __init__(
        self,
        allowed: int,
        backoff_seconds: float,
        max_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allowed = allowed
        self.backoff_seconds = backoff_seconds
        self.max_seconds = max_seconds
        self._clock = clock
        self._records: collections.OrderedDict[str, _Record] = collections.OrderedDict()

    def _forget_stale(self, now: float) -> None:
        while self._records:
            address, record = next(iter(self._records.items()))
            if now - record.last < FORGET_SECONDS and len(self._records) <= MAX_TRACKED_ADDRESSES:
                break
            del self._records[address]

    def blocked_for(self, address: str) -> float:
        """Seconds ``address`` must still wait before its next login is looked at (0: none)."""
        record = self._records.get(address)
        if record is None:
            return 0.0
        return max(0.0, record.blocked_until - self._clock())

    def failed(self, address: str) -> int:
        """Record a failed login; returns the failures in a row from ``address``."""
        now = self._clock()
        record = self._records.pop(address, None) or _Record()
        if now - record.last >= FORGET_SECONDS:
            record = _Record()
        record.failures += 1
        record.last = now
        over = record.failures - self.allowed
        if over > 0:
            delay = min(self.max_seconds, self.backoff_seconds * 2.0 ** min(over - 1, 60))
            record.blocked_until = now + delay
        self._records[address] = record  # the most recent last
        self._forget_stale(now)
        return record.failures

    def succeeded(self, address: str) -> None:
        self._records.pop(address, None)

    def __len__(self) -> int:
        return len(self._records)
