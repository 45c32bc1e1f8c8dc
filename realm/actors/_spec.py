"""A tenant's settings: one attrs class, one set of defaults, for the runtime and the server.

``TenantSpec`` says what a tenant runs (its guest module and default model) and how much of
the shared runtime it may hold: its share of batched steps (``weight``), calls running and
waiting, and its sandbox limits (``GuestLimits``: memory, fuel, deadline, sessions, KV
memory, work and output budgets). ``realm.open_runtime(tenants=...)`` takes specs or plain
mappings of the same keys (missing keys: the runtime's defaults, ``RuntimeLimits``), and the
server's config builds them. Every value is checked when the spec is made; the runtime
reports a bad one as ``TenantUnavailable`` naming the tenant, when it opens or when the tenant
is added.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final

import attrs

from ..sandbox import GuestLimits

MAX_CONCURRENT_CALLS: Final = 2  # per tenant, running at once (each holds a guest instance)
MAX_QUEUED_CALLS: Final = 64  # per tenant, waiting for one of its call slots; past it OVERLOADED


def _number(lo: float, hi: float, *, integer: bool, lo_open: bool = False) -> Any:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        kinds = int if integer else int | float
        ok = not isinstance(value, bool) and isinstance(value, kinds)
        ok = ok and (lo < value if lo_open else lo <= value) and value <= hi
        if not ok:
            kind = "an integer" if integer else "a number"
            bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
            raise ValueError(
                f"{attribute.name} must be {kind} {bound} and <= {hi:g}, not {value!r}"
            )

    return check


def _guest(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, str | bytes | bytearray | os.PathLike):
        raise ValueError(f"guest must be a wasm path or module bytes, not {type(value).__name__}")


MAX_ADAPTER_NAME_CHARS: Final = 128


def _adapter_path(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ValueError(f"an adapter's path must be a file path, not {value!r:.80}")


def _adapter_model(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"an adapter's model must be a model name, not {value!r:.80}")


@attrs.frozen(kw_only=True)
class AdapterSpec:
    """A LoRA adapter a tenant may name (docs/lora.md): a GGUF adapter file, its scale, and
    the model it adapts (None: the tenant's default model)."""

    path: str | os.PathLike[str] = attrs.field(validator=_adapter_path)
    scale: float = attrs.field(default=1.0, validator=_number(-1e6, 1e6, integer=False))
    model: str | None = attrs.field(default=None, validator=_adapter_model)

    @classmethod
    def of(cls, value: Any) -> AdapterSpec:
        """An AdapterSpec, a path, or a mapping of its keys (``path``, ``scale``, ``model``)."""
        if isinstance(value, AdapterSpec):
            return value
        if isinstance(value, str | os.PathLike):
            return cls(path=value)
        if not isinstance(value, Mapping):
            raise ValueError(f"an adapter is a path or a table of path, scale, model, not "
                             f"{value!r:.80}")  # fmt: skip
        unknown = sorted(str(k) for k in value if k not in ("path", "scale", "model"))
        if unknown:
            raise ValueError(f"unknown adapter key {unknown[0]!r} (expected path, scale, model)")
        if "path" not in value:
            raise ValueError("an adapter needs a 'path'")
        return cls(**value)


def _adapter_table(value: Any) -> dict[str, AdapterSpec]:
    if not isinstance(value, Mapping):
        raise ValueError(f"adapters must map names to adapters, not {value!r:.80}")
    out = {}
    for name, spec in value.items():
        if not isinstance(name, str) or not name or len(name) > MAX_ADAPTER_NAME_CHARS:
            raise ValueError(f"adapter name {name!r:.80} must be a string of 1 to "
                             f"{MAX_ADAPTER_NAME_CHARS} characters")  # fmt: skip
        try:
            out[name] = AdapterSpec.of(spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"adapters.{name}: {e}") from None
    return out


def _limits(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, GuestLimits):
        raise ValueError(f"limits must be a GuestLimits, not {type(value).__name__}")


@attrs.frozen(kw_only=True)
class TenantSpec:
    """What a tenant runs and what it may hold (docs/runtime.md explains each setting)."""

    guest: str | bytes | os.PathLike[str] | None = attrs.field(default=None, validator=_guest)
    model: str | None = None  # its default model (None: the runtime's first)
    weight: float = attrs.field(default=1.0, validator=_number(0, 1e6, integer=False, lo_open=True))
    max_concurrent_calls: int = attrs.field(
        default=MAX_CONCURRENT_CALLS, validator=_number(1, 1 << 16, integer=True)
    )
    max_queued_calls: int = attrs.field(
        default=MAX_QUEUED_CALLS, validator=_number(0, 1 << 20, integer=True)
    )
    limits: GuestLimits = attrs.field(factory=GuestLimits, validator=_limits)
    max_restarts: int = attrs.field(default=3, validator=_number(0, 1 << 20, integer=True))
    restart_period_seconds: float = attrs.field(
        default=60.0, validator=_number(0, 1e9, integer=False, lo_open=True)
    )
    cooldown_seconds: float = attrs.field(default=30.0, validator=_number(0, 1e9, integer=False))
    # the first restart in the period waits this long, each next one twice as long (max 2 s)
    restart_backoff_seconds: float = attrs.field(
        default=0.05, validator=_number(0, 60, integer=False)
    )
    # LoRA adapters its calls may name (name -> AdapterSpec, a path or a mapping of its keys)
    adapters: dict[str, AdapterSpec] = attrs.field(
        factory=dict, converter=_adapter_table, hash=False
    )
    # bytes of adapter weights it may hold (None: no limit)
    max_adapter_bytes: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_number(0, 1 << 50, integer=True))
    )

    def __attrs_post_init__(self) -> None:
        if self.limits.max_sessions < self.max_concurrent_calls:
            raise ValueError(
                f"limits.max_sessions ({self.limits.max_sessions}) must be at least "
                f"max_concurrent_calls ({self.max_concurrent_calls}): every running call may "
                "need a session"
            )

    @classmethod
    def from_mapping(
        cls, spec: Mapping[str, Any], defaults: TenantSpec | None = None
    ) -> TenantSpec:
        """A spec from a mapping of its keys; missing keys come from ``defaults``.

        Raises ValueError naming an unknown key or a bad value.
        """
        if isinstance(spec, TenantSpec):
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(f"a tenant spec is a TenantSpec or a mapping, not {spec!r:.80}")
        names = {f.name for f in attrs.fields(cls)}
        unknown = sorted(str(k) for k in spec if k not in names)
        if unknown:
            raise ValueError(
                f"unknown key {unknown[0]!r} (expected one of {', '.join(sorted(names))})"
            )
        return attrs.evolve(defaults or cls(), **spec)
