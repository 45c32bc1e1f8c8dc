"""What a guest call and a tenant carry across host imports: limits, sessions, the call's state."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import numpy as np

from .._errors import RealmError
from ..model import Model, Session, TokenStream

MAX_SESSIONS: Final = 16  # per tenant
MAX_TOKENS_PER_FORWARD: Final = 4096
MAX_TEXT_BYTES: Final = 1 << 20  # any text a guest hands the host (prompt, emit, JSON)
MAX_LOG_LINES_PER_CALL: Final = 100
MAX_IGNORED_ERRORS: Final = 16  # error statuses a guest may ignore before it is stopped


@attrs.frozen
class GuestLimits:
    """Per-tenant sandbox limits (from the tenant's config)."""

    max_memory_bytes: int = 256 << 20  # linear memory cap (Store.set_limits)
    fuel_per_call: int = 20_000_000_000  # instructions-ish; a runaway loop ends here
    call_timeout_seconds: float = 300.0  # epoch deadline: the backstop for a guest that spins
    max_sessions: int = MAX_SESSIONS
    max_tokens_per_forward: int = MAX_TOKENS_PER_FORWARD
    max_kv_bytes: int | None = None  # KV cache memory of the tenant's sessions, at capacity


# forward(model, [(session, tokens, mode)]) -> logits per entry; the actor layer's batcher
# plugs in here to batch steps across tenants; by default each step runs alone.
ForwardFn = Callable[[Model, Sequence[tuple[Session, np.ndarray, str]]], list[np.ndarray | None]]


def direct_forward(model: Model, work: Sequence[tuple[Session, np.ndarray, str]]) -> list[Any]:
    return model.step(list(work))  # type: ignore[arg-type]


@attrs.define(eq=False)
class SessionSlot:
    session: Session
    model_name: str
    stream: TokenStream
    pending: bytes = b""  # detokenized text not yet taken by the guest


class TenantState:
    """A tenant's host-side state that outlives calls: its sessions (only it can name them)."""

    def __init__(
        self,
        name: str,
        models: dict[str, Model],
        *,
        default_model: str | None = None,
        limits: GuestLimits | None = None,
        forward: ForwardFn = direct_forward,
    ) -> None:
        self.name = name
        self.models = models
        self.default_model = default_model or (next(iter(models)) if models else None)
        self.limits = limits or GuestLimits()
        self.forward = forward
        self.sessions: dict[int, SessionSlot] = {}
        self._next_handle = 0
        self._lock = threading.Lock()  # a tenant's calls may run in several threads

    def model(self, name: str) -> tuple[str, Model]:
        key = name or self.default_model
        if key is None or key not in self.models:
            raise KeyError(name)
        return key, self.models[key]

    def open_session(self, model_name: str, capacity: int) -> int:
        key, model = self.model(model_name)
        cap = capacity or model.info.context_length
        with self._lock:
            if len(self.sessions) >= self.limits.max_sessions:
                raise OverflowError(f"tenant {self.name!r} has {len(self.sessions)} sessions open")
            quota = self.limits.max_kv_bytes
            if quota is not None:  # reserved at capacity, so a session never outgrows it
                held = sum(
                    s.session.capacity * s.session.model.kv_bytes_per_position()
                    for s in self.sessions.values()
                )
                need = cap * model.kv_bytes_per_position()
                if held + need > quota:
                    raise OverflowError(
                        f"tenant {self.name!r}: a session of {cap} positions needs {need} bytes "
                        f"of KV memory; {held} of its {quota} are held"
                    )
            handle = self._next_handle
            self._next_handle += 1
            session = model.open_session(capacity=cap)
            self.sessions[handle] = SessionSlot(session, key, model.tokenizer.stream())
        return handle

    def close_session(self, handle: int) -> None:
        with self._lock:
            slot = self.sessions.pop(handle)
        slot.session.close()

    def close(self) -> None:
        """Close every session (the tenant stops or its instance is rebuilt)."""
        for h in list(self.sessions):
            self.close_session(h)


class CallContext:
    """One guest call's state, seen by every host import the call makes."""

    def __init__(
        self,
        *,
        seed: int | None = None,
        on_emit: Callable[[str], bool] | None = None,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
    ) -> None:
        self.start = time.monotonic()
        self.rng = np.random.default_rng(
            seed if seed is not None else int.from_bytes(os.urandom(8))
        )
        self.on_emit = on_emit
        self.cancel = cancel or threading.Event()
        self.deadline = deadline
        self.result: dict[str, Any] | None = None
        self.errors: list[str] = []  # what went wrong, for the caller's error message
        self.fatal: str | None = None  # why the host stopped the guest
        self.emitted = 0
        self.log_lines = 0
        self.ignored = 0  # error statuses returned so far

    def cancelled(self) -> bool:
        if self.cancel.is_set():
            return True
        return self.deadline is not None and time.monotonic() > self.deadline

    def record(self, message: str) -> None:
        if len(self.errors) < 32:
            self.errors.append(message)


def model_json(name: str, model: Model) -> dict[str, Any]:
    info = model.info.as_dict()
    try:
        tok = model.tokenizer
        info |= {
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "eog_ids": sorted(tok.eog_ids),
            "has_chat_template": tok.chat_template is not None,
            "add_bos": bool(tok.add_bos),
            "add_eos": bool(tok.add_eos),
        }
    except RealmError:  # a model without tokenizer data still runs on ids
        info |= {"bos_id": None, "eos_id": None, "eog_ids": [], "has_chat_template": False,
                 "add_bos": False, "add_eos": False}  # fmt: skip
    info["model"] = name
    info.pop("path", None)  # the host's file system is not the guest's business
    return info
