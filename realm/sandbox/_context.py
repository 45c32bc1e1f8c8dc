"""What a guest call and a tenant carry across host imports: limits, sessions, the call's state."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import numpy as np

from .._errors import CallCancelled, RealmError
from ..model import Adapter, Model, Session, TokenStream
from ._compute import COMPUTE

MAX_SESSIONS: Final = 16  # per tenant
MAX_TOKENS_PER_FORWARD: Final = 4096
MAX_TEXT_BYTES: Final = 1 << 20  # any text a guest hands the host (prompt, result, JSON)
MAX_LOG_LINES_PER_CALL: Final = 100
MAX_LOG_BYTES: Final = 4096  # one log line; longer text is cut
MAX_IGNORED_ERRORS: Final = 16  # error statuses a guest may ignore before it is stopped
MAX_EMIT_CHUNK_BYTES: Final = 64 << 10  # one emitted chunk (a token is a few bytes)
MAX_EMIT_BYTES: Final = 16 << 20  # everything one call emits
# work units (about one multiply-add of native compute each) one call may spend in imports;
# 2^46 is ~20 minutes of a 2-core machine's matmul: far past any real call, but finite
MAX_WORK_PER_CALL: Final = 1 << 46
WAIT_POLL_SECONDS: Final = 0.01  # how often a waiting import looks at its call's cancel flag


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"GuestLimits.{attribute.name} must be a number > 0, not {value!r}")


def _positive_or_none(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _positive(inst, attribute, value)


@attrs.frozen
class GuestLimits:
    """Per-tenant sandbox limits (from the tenant's spec); docs/sandbox.md explains each."""

    max_memory_bytes: int = attrs.field(default=256 << 20, validator=_positive)  # linear memory
    fuel_per_call: int = attrs.field(default=20_000_000_000, validator=_positive)  # wasm work
    call_timeout_seconds: float = attrs.field(default=300.0, validator=_positive)  # TIMEOUT
    max_sessions: int = attrs.field(default=MAX_SESSIONS, validator=_positive)
    max_tokens_per_forward: int = attrs.field(default=MAX_TOKENS_PER_FORWARD, validator=_positive)
    # KV cache memory of the tenant's sessions, reserved at each session's capacity
    max_kv_bytes: int | None = attrs.field(default=None, validator=_positive_or_none)
    max_work_per_call: int = attrs.field(default=MAX_WORK_PER_CALL, validator=_positive)
    max_emit_bytes: int = attrs.field(default=MAX_EMIT_BYTES, validator=_positive)
    max_emit_chunk_bytes: int = attrs.field(default=MAX_EMIT_CHUNK_BYTES, validator=_positive)


# forward(model, [(session, tokens, mode)]) -> logits per entry; the actor layer's batcher
# plugs in here to batch steps across tenants; by default each step runs alone.
ForwardFn = Callable[[Model, Sequence[tuple[Session, np.ndarray, str]]], list[np.ndarray | None]]


def direct_forward(model: Model, work: Sequence[tuple[Session, np.ndarray, str]]) -> list[Any]:
    """A step run at once in the calling thread (a forward step: ahead of guests' kernels)."""
    with COMPUTE.forward_step():
        return model.step(list(work))  # type: ignore[arg-type]


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
        self.on_emit = on_emit  # may block (backpressure); False: the caller went away
        self.cancel = cancel or threading.Event()
        # set (with cancel) to wake the call's thread where it waits for the host (a forward
        # step); None while it does not wait
        self.waker: threading.Event | None = None
        self.deadline = deadline  # time.monotonic() value; TIMEOUT past it
        self.expired = False  # the deadline passed (seen by cancelled())
        self.result: dict[str, Any] | None = None
        self.errors: list[str] = []  # what went wrong, for the caller's error message
        self.fatal: str | None = None  # why the host stopped the guest
        self.emitted = 0  # chunks
        self.emitted_bytes = 0
        self.work = 0  # work units charged by imports
        self.log_lines = 0
        self.ignored = 0  # error statuses returned so far
        self.opened: set[int] = set()  # sessions this call opened (closed if it ends badly)
        self.wasm_since = self.start  # when the guest last went back to running wasm
        self.stop_seen: float | None = None  # when the epoch callback first saw it stopped

    def cancelled(self) -> bool:
        """The call was cancelled or is past its deadline: imports return ECANCELLED."""
        if self.cancel.is_set():
            return True
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.expired = True
            return True
        return False

    def timed_out(self) -> bool:
        """The call stopped because its deadline passed (TIMEOUT rather than CANCELLED)."""
        self.cancelled()
        return self.expired

    def record(self, message: str) -> None:
        if len(self.errors) < 32:
            self.errors.append(message[:1000])


@attrs.define(eq=False)
class SessionSlot:
    session: Session
    model_name: str
    stream: TokenStream
    pending: bytes = b""  # detokenized text not yet taken by the guest
    owner: CallContext | None = None  # the running call that opened it (None: outlives calls)
    kept: bool = False  # session_keep: survives however its call ends


class TenantState:
    """A tenant's host-side state that outlives calls: its sessions (only it can name them).

    Thread-safe: a tenant's calls run in several worker threads at once.
    """

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
        # LoRA adapters this tenant's calls may name wherever they name a model (a session
        # opened with one runs its model with the adapter); set by the runtime
        self.adapters: dict[str, Adapter] = {}
        self._next_handle = 0
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)  # a session was closed or released

    def model(self, name: str) -> tuple[str, Model]:
        """(model name, model) of a model's name or of one of the tenant's adapters' names
        (its base model); KeyError for neither."""
        key = name or self.default_model
        if key is not None and key not in self.models and key in self.adapters:
            base = self.adapters[key].model
            key = next((k for k, m in self.models.items() if m is base), None)
        if key is None or key not in self.models:
            raise KeyError(name)
        return key, self.models[key]

    def adapter(self, name: str) -> Adapter | None:
        """The tenant's adapter called ``name`` (None: a model's name, or no such adapter)."""
        return None if not name or name in self.models else self.adapters.get(name)

    def _may_wait(self, ctx: CallContext | None) -> bool:
        """At the session limit: whether a running call other than ``ctx`` holds a session it
        will give back when it ends (and ``ctx`` holds none, so two calls never wait for each
        other)."""
        if ctx is None or any(s.owner is ctx for s in self.sessions.values()):
            return False
        return any(s.owner is not None and not s.kept for s in self.sessions.values())

    def open_session(self, model_name: str, capacity: int, ctx: CallContext | None = None) -> int:
        """Open a session for ``ctx`` (its call owns it until it returns).

        At the tenant's session limit, waits while another running call holds a session it
        will give back; raises OverflowError (a limit) when none will, KeyError for an
        unknown model, CallCancelled when ``ctx`` is cancelled while it waits.
        """
        key, model = self.model(model_name)
        cap = capacity or model.info.context_length
        with self._lock:
            while len(self.sessions) >= self.limits.max_sessions:
                if not self._may_wait(ctx):
                    raise OverflowError(
                        f"tenant {self.name!r} has {len(self.sessions)} sessions open (its "
                        f"limit is {self.limits.max_sessions})"
                    )
                assert ctx is not None
                if ctx.cancelled():
                    raise CallCancelled("cancelled while waiting for a session")
                self._freed.wait(WAIT_POLL_SECONDS)
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
            session = model.open_session(capacity=cap, adapter=self.adapter(model_name))
            handle = self._next_handle
            self._next_handle += 1
            self.sessions[handle] = SessionSlot(session, key, model.tokenizer.stream(), owner=ctx)
            if ctx is not None:
                ctx.opened.add(handle)
        return handle

    def keep_session(self, handle: int) -> None:
        with self._lock:
            slot = self.sessions[handle]
            slot.kept, slot.owner = True, None
            self._freed.notify_all()

    def close_session(self, handle: int) -> None:
        with self._lock:
            slot = self.sessions.pop(handle)
            self._freed.notify_all()
        slot.session.close()

    def end_call(self, ctx: CallContext, *, abnormal: bool) -> int:
        """A call ended: the sessions it opened and did not keep are closed when it ended
        abnormally (trap, cancel, deadline, broken instance), released to the tenant when it
        returned. Returns how many were closed."""
        closing: list[SessionSlot] = []
        with self._lock:
            for h in ctx.opened:
                slot = self.sessions.get(h)
                if slot is None or slot.kept:
                    continue
                if abnormal:
                    closing.append(self.sessions.pop(h))
                else:
                    slot.owner = None
            ctx.opened.clear()
            self._freed.notify_all()
        for slot in closing:
            slot.session.close()
        return len(closing)

    def close(self) -> None:
        """Close every session (the tenant stops)."""
        with self._lock:
            slots = list(self.sessions.values())
            self.sessions.clear()
            self._freed.notify_all()
        for slot in slots:
            slot.session.close()


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
