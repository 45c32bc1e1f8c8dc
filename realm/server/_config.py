"""Server configuration: limits, models and tenants, from arguments or a TOML file.

A TOML file (read with the standard library's ``tomllib``) looks like docs/server.md shows.
Every value is checked at load time; a bad one fails fast with its dotted key named
(``ConfigError: tenants.acme.tokens_per_second: must be a number > 0, not 'fast'``).
API keys are stored as SHA-256 digests (``"sha256:<hex>"``); ``realm key`` prints one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from .._errors import RealmError
from .._protocol import ErrorCode
from ..actors import AdapterSpec
from ..actors import TenantSpec as RuntimeTenantSpec

_RUNTIME: Final = RuntimeTenantSpec()  # the runtime's defaults of a tenant's settings

OPEN_TENANT: Final = "local"  # the tenant of a server started without a config
BUILTIN_MODEL: Final = "builtin"  # a model path naming the built-in model


class ConfigError(RealmError):
    """A configuration value is missing or wrong (the message names its key)."""

    code = ErrorCode.INVALID_PARAMS


@attrs.frozen
class ServerLimits:
    """Connection and call limits (docs/server.md explains each)."""

    max_message_bytes: int = 1 << 20  # a bigger client message closes the connection (1009)
    max_connections: int = 1024  # more are refused at the handshake (HTTP 503)
    max_calls_per_connection: int = 64  # in flight at once; past it, OVERLOADED
    outbound_queue: int = 1024  # messages waiting to be written to one connection
    send_timeout_seconds: float = 10.0  # a client that reads nothing this long is closed (1008)
    ping_interval_seconds: float = 20.0  # keepalive ping; no pong within the timeout: close
    ping_timeout_seconds: float = 20.0
    idle_timeout_seconds: float = 300.0  # no message and no call in flight: close (1000)
    handshake_timeout_seconds: float = 10.0
    shutdown_seconds: float = 10.0  # on SIGTERM/SIGINT: calls in flight get this long
    max_tokens: int = 4096  # cap on a call's max_tokens param
    call_timeout_seconds: float = 600.0  # a call still running after this ends with TIMEOUT
    # failed logins: this many in a row from one address are free; each one past them refuses
    # that address's handshakes (HTTP 429) for auth_backoff_seconds, doubling, at most the max
    auth_failures_allowed: int = 5
    auth_backoff_seconds: float = 1.0
    auth_backoff_max_seconds: float = 60.0
    tenant_idle_seconds: float = 300.0  # an idle tenant's guest instances and sessions are freed


@attrs.frozen
class TenantSpec:
    name: str
    api_key_hashes: tuple[str, ...] = ()
    guest: str | None = None  # a wasm path; None: the default guest
    model: str | None = None
    max_concurrent_calls: int = _RUNTIME.max_concurrent_calls
    max_queued_calls: int = _RUNTIME.max_queued_calls
    tokens_per_second: float | None = None  # token bucket on generated tokens (None: no limit)
    burst_tokens: float | None = None  # bucket size (default: 2 seconds' worth)
    calls_per_second: float | None = None  # bucket on calls started
    max_kv_bytes: int | None = None
    weight: float = _RUNTIME.weight  # share of batched steps under contention (fair queuing)
    # LoRA adapters its calls may name: name -> AdapterSpec (docs/lora.md)
    adapters: dict[str, AdapterSpec] = attrs.field(factory=dict, hash=False)
    max_adapter_bytes: int | None = None

    def runtime_spec(self) -> RuntimeTenantSpec:
        """The runtime's ``TenantSpec`` of this tenant (every call running may hold a session,
        so the session limit is at least ``max_concurrent_calls``)."""
        limits = attrs.evolve(
            _RUNTIME.limits,
            max_kv_bytes=self.max_kv_bytes,
            max_sessions=max(_RUNTIME.limits.max_sessions, self.max_concurrent_calls),
        )
        return RuntimeTenantSpec(
            guest=self.guest or None,
            model=self.model or None,
            weight=self.weight,
            max_concurrent_calls=self.max_concurrent_calls,
            max_queued_calls=self.max_queued_calls,
            limits=limits,
            adapters=dict(self.adapters),
            max_adapter_bytes=self.max_adapter_bytes,
        )


def _lowered(values: Any) -> tuple[str, ...] | None:
    """Origins and host names compare in lower case, without a trailing slash."""
    if values is None:
        return None
    return tuple(str(v).strip().rstrip("/").lower() for v in values)


@attrs.frozen
class ServerConfig:
    models: dict[str, str]  # name -> GGUF path
    tenants: dict[str, TenantSpec] | None = None  # None: open, one local tenant, no auth
    host: str = "127.0.0.1"
    port: int = 8080
    metrics_port: int | None = None
    limits: ServerLimits = attrs.field(factory=ServerLimits)
    # web pages (their Origin) allowed to connect; None: loopback pages only ("*": any page)
    allowed_origins: tuple[str, ...] | None = attrs.field(default=None, converter=_lowered)
    # Host headers accepted; None: loopback names when listening on loopback, else any
    allowed_hosts: tuple[str, ...] | None = attrs.field(default=None, converter=_lowered)
    # this server's name in the X-Realm-Server header, /health and system_health (None: the
    # machine's host name and the port, e.g. "web-1:8080")
    server_id: str | None = attrs.field(default=None)
    # balancers (addresses or networks) whose X-Forwarded-For names the client (login
    # throttling and logs); empty: the peer's own address is the client's
    trusted_proxies: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    # where the models run: "cpu", "cuda" or "cuda:N" (docs/kernels.md, "CUDA")
    device: str = "cpu"
    # one layer-paging budget for every model's weights (bytes resident at most; None: all)
    max_resident_bytes: int | None = None
    # Q8_0 / Q4_0 weights packed into interleaved panels at load (docs/models.md); None: where
    # the CPU's ISA level has a kernel for them; False: the file's pages, shared by processes
    pack_weights: bool | None = None
    # the open server's one tenant: a local user whose many connections share it
    open_tenant: TenantSpec = attrs.field(
        factory=lambda: TenantSpec(OPEN_TENANT, max_concurrent_calls=16, max_queued_calls=1024)
    )

    @server_id.validator
    def _check_server_id(self, attribute: Any, value: str | None) -> None:
        if value is not None:
            check_server_id("server_id", value)

    @trusted_proxies.validator
    def _check_trusted_proxies(self, attribute: Any, value: tuple[str, ...]) -> None:
        proxy_networks("trusted_proxies", list(value))

    @property
    def open(self) -> bool:
        return self.tenants is None

    def tenant_for_key(self, key: str | None) -> str | None:
        """The tenant an API key belongs to, or None (compared in constant time)."""
        if not key or self.tenants is None:
            return None
        digest = hash_key(key)
        found = None
        for spec in self.tenants.values():
            for h in spec.api_key_hashes:
                if hmac.compare_digest(h, digest):
                    found = spec.name
        return found


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh API key and the digest to put in the config."""
    key = "rk-" + secrets.token_urlsafe(32)
    return key, hash_key(key)


# --- checking values ---------------------------------------------------------------------------


def _int(where: str, v: Any, lo: int = 1, hi: int = 2**62) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{where}: must be an integer in {lo}..{hi}, not {v!r}")
    return v


def _num(where: str, v: Any, *, positive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or (positive and not v > 0):
        raise ConfigError(f"{where}: must be a number > 0, not {v!r}")
    return float(v)


def _str(where: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: must be a non-empty string, not {v!r}")
    return v


def _check_keys(where: str, table: Mapping[str, Any], allowed: set[str]) -> None:
    for k in table:
        if k not in allowed:
            key = f"{where}.{k}" if where else k  # a top-level key has no table before it
            raise ConfigError(f"{key}: unknown key (expected one of {', '.join(sorted(allowed))})")


def _origins(where: str, v: Any) -> tuple[str, ...]:
    """``allowed_origins``: ``"*"`` or origins such as ``"https://app.example.com"``."""
    if not isinstance(v, list) or not all(isinstance(o, str) for o in v):
        raise ConfigError(f"{where}: must be a list of origins such as 'https://app.example.com'")
    out = []
    for i, origin in enumerate(v):
        o = origin.strip().rstrip("/").lower()
        if o != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s?#@]+", o):
            raise ConfigError(
                f"{where}[{i}]: {origin!r} is not an origin (scheme://host[:port], or '*')"
            )
        out.append(o)
    return tuple(out)


def _hosts(where: str, v: Any) -> tuple[str, ...]:
    """``allowed_hosts``: ``"*"`` or host names with an optional port (``"realm.example.com"``)."""
    if not isinstance(v, list) or not all(isinstance(h, str) for h in v):
        raise ConfigError(f"{where}: must be a list of host names such as 'realm.example.com'")
    out = []
    for i, host in enumerate(v):
        h = host.strip().lower()
        if h != "*" and not re.fullmatch(r"[a-z0-9.\-]+(:\d{1,5})?|\[[0-9a-f:.]+\](:\d{1,5})?", h):
            raise ConfigError(f"{where}[{i}]: {host!r} is not a host name (host[:port], or '*')")
        out.append(h)
    return tuple(out)


def _device(where: str, v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"cpu|cuda(:\d{1,3})?", v):
        raise ConfigError(f"{where}: must be 'cpu', 'cuda' or 'cuda:N', not {v!r:.60}")
    return v


def check_server_id(where: str, v: Any) -> str:
    """``server_id``: 1-128 letters, digits and ``._:@-`` (it goes into a response header)."""
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9._:@-]{1,128}", v):
        raise ConfigError(
            f"{where}: must be 1-128 letters, digits or '._:@-' (a header value), not {v!r}"
        )
    return v


def proxy_networks(where: str, v: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``trusted_proxies``: addresses or networks such as ``"10.0.0.5"``, ``"10.0.0.0/24"``."""
    if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
        raise ConfigError(f"{where}: must be a list of addresses or networks such as '10.0.0.5'")
    out = []
    for i, a in enumerate(v):
        try:
            out.append(ipaddress.ip_network(a.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{where}[{i}]: {a!r:.60} is not an IP address or network (10.0.0.0/24)"
            ) from None
    return tuple(out)


def _limits(table: Mapping[str, Any]) -> ServerLimits:
    fields = {f.name: f for f in attrs.fields(ServerLimits)}
    values: dict[str, Any] = {}
    for k, v in table.items():
        if k not in fields:
            continue
        where = f"server.{k}"
        values[k] = _num(where, v) if k.endswith("_seconds") else _int(where, v)
    return ServerLimits(**values)


def _tenant(name: str, table: Any, base: Path, models: Mapping[str, str]) -> TenantSpec:
    where = f"tenants.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    _check_keys(where, table, {f.name for f in attrs.fields(TenantSpec)} - {"name"} | {"api_keys"})
    if "api_key_hashes" in table:
        raise ConfigError(f"{where}.api_key_hashes: write the digests under 'api_keys'")
    keys = table.get("api_keys", [])
    if not isinstance(keys, list) or not keys:
        raise ConfigError(f"{where}.api_keys: must be a non-empty list of 'sha256:<hex>' digests")
    for i, k in enumerate(keys):
        if not (isinstance(k, str) and k.startswith("sha256:") and len(k) == 71):
            raise ConfigError(
                f"{where}.api_keys[{i}]: must be 'sha256:' + 64 hex digits "
                "(store digests, not keys: `realm key` prints a key and its digest)"
            )
        try:
            bytes.fromhex(k[7:])
        except ValueError:
            raise ConfigError(f"{where}.api_keys[{i}]: not hex") from None
    guest = table.get("guest")
    if guest is not None:
        path = base / _str(f"{where}.guest", guest)
        if not path.is_file():
            raise ConfigError(f"{where}.guest: no such file {str(path)!r}")
        guest = str(path)
    model = table.get("model")
    if model is not None and _str(f"{where}.model", model) not in models:
        raise ConfigError(f"{where}.model: no model named {model!r} in [models]")
    adapters = _adapters(where, table.get("adapters", {}), base, models)
    opt_num = {
        k: _num(f"{where}.{k}", table[k])
        for k in ("tokens_per_second", "burst_tokens", "calls_per_second", "weight")
        if k in table
    }
    return TenantSpec(
        name=name,
        api_key_hashes=tuple(k.lower() for k in keys),
        guest=guest,
        model=model,
        max_concurrent_calls=_int(
            f"{where}.max_concurrent_calls",
            table.get("max_concurrent_calls", _RUNTIME.max_concurrent_calls),
            1,
            1024,
        ),
        max_queued_calls=_int(
            f"{where}.max_queued_calls",
            table.get("max_queued_calls", _RUNTIME.max_queued_calls),
            0,
            1 << 20,
        ),
        max_kv_bytes=(
            _int(f"{where}.max_kv_bytes", table["max_kv_bytes"])
            if "max_kv_bytes" in table
            else None
        ),
        adapters=adapters,
        max_adapter_bytes=(
            _int(f"{where}.max_adapter_bytes", table["max_adapter_bytes"])
            if "max_adapter_bytes" in table
            else None
        ),
        **opt_num,
    )


def _adapter_names(table: dict[str, AdapterSpec]) -> None:
    RuntimeTenantSpec(adapters=table)  # the runtime's checks of the names


def _adapters(
    where: str, table: Any, base: Path, models: Mapping[str, str]
) -> dict[str, AdapterSpec]:
    """A tenant's ``adapters`` table: name = "path" or name = {path, scale, model}; paths are
    relative to the config file, models are names in [models]."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}.adapters: must be a table of name = path or name = table")
    out = {}
    for name, value in table.items():
        at = f"{where}.adapters.{name}"
        if name in models:
            raise ConfigError(f"{at}: the name is a model's in [models]")
        entry = {"path": value} if isinstance(value, str) else value
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ConfigError(f"{at}: must be a path or a table with a 'path'")
        path = base / entry["path"]
        if not path.is_file():
            raise ConfigError(f"{at}.path: no such file {str(path)!r}")
        model = entry.get("model")
        if model is not None and model not in models:
            raise ConfigError(f"{at}.model: no model named {model!r} in [models]")
        try:
            out[name] = AdapterSpec.of({**entry, "path": str(path)})
            _adapter_names({name: out[name]})
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{at}: {e}") from None
    return out


def load_config(path: str | os.PathLike[str]) -> ServerConfig:
    """Read and check a TOML config; relative paths in it are relative to the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return config_from_dict(doc, base=path.parent)


def config_from_dict(doc: Mapping[str, Any], *, base: Path | None = None) -> ServerConfig:
    base = base or Path.cwd()
    _check_keys("", doc, {"server", "models", "tenants"})
    server = doc.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError("server: must be a table")
    _check_keys(
        "server",
        server,
        {"host", "port", "metrics_port", "allowed_origins", "allowed_hosts", "server_id", "device"}
        | {"trusted_proxies", "max_resident_bytes", "pack_weights"}
        | {f.name for f in attrs.fields(ServerLimits)},
    )
    models_t = doc.get("models")
    if not isinstance(models_t, dict) or not models_t:
        raise ConfigError(
            'models: must be a table of name = "path.gguf" or "builtin" (at least one)'
        )
    models: dict[str, str] = {}
    for name, p in models_t.items():
        if p == BUILTIN_MODEL:  # the model that ships with Realm
            from ..model import default_model_path

            models[name] = str(default_model_path())
            continue
        mp = base / _str(f"models.{name}", p)
        if not mp.is_file():
            raise ConfigError(f"models.{name}: no such file {str(mp)!r}")
        models[name] = str(mp)
    tenants_t = doc.get("tenants")
    tenants = None
    if tenants_t is not None:
        if not isinstance(tenants_t, dict) or not tenants_t:
            raise ConfigError("tenants: must be a table of [tenants.<name>] tables (at least one)")
        tenants = {n: _tenant(n, t, base, models) for n, t in tenants_t.items()}
    metrics_port = server.get("metrics_port")
    return ServerConfig(
        models=models,
        tenants=tenants,
        host=_str("server.host", server.get("host", "127.0.0.1")),
        port=_int("server.port", server.get("port", 8080), 0, 65535),
        metrics_port=(
            None if metrics_port is None else _int("server.metrics_port", metrics_port, 0, 65535)
        ),
        limits=_limits(server),
        allowed_origins=(
            _origins("server.allowed_origins", server["allowed_origins"])
            if "allowed_origins" in server
            else None
        ),
        allowed_hosts=(
            _hosts("server.allowed_hosts", server["allowed_hosts"])
            if "allowed_hosts" in server
            else None
        ),
        trusted_proxies=tuple(
            str(n) for n in proxy_networks("server.trusted_proxies", server["trusted_proxies"])
        )
        if "trusted_proxies" in server
        else (),
        server_id=(
            check_server_id("server.server_id", server["server_id"])
            if "server_id" in server
            else None
        ),
        device=_device("server.device", server.get("device", "cpu")),
        max_resident_bytes=(
            _int("server.max_resident_bytes", server["max_resident_bytes"], 0, 1 << 50)
            if "max_resident_bytes" in server
            else None
        ),
        pack_weights=_pack_weights(server.get("pack_weights")),
    )


def _pack_weights(v: Any) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    raise ConfigError(f"server.pack_weights must be true or false, got {v!r}")
