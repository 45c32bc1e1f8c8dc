"""Test apps and guests against a real runtime: a tiny model, a runtime for synchronous code,
and a Hypothesis state machine that drives the runtime and checks its invariants.

``open_test_runtime`` opens a runtime on a freshly written tiny model::

    from realm.testing.runtime import open_test_runtime

    async def test_counts() -> None:
        async with open_test_runtime() as rt:
            assert (await rt.call("alice", "count_tokens", {"text": "hi"}))["count"] > 0

(the pytest plugin's ``realm_runtime`` fixture yields the same). ``RuntimeThread`` keeps a
runtime open in a background thread with its own Trio loop, for synchronous code (a Hypothesis
state machine, a unittest test) that submits coroutines to it. ``RuntimeStateMachine`` is a
``hypothesis.stateful.RuleBasedStateMachine`` over that: it spawns tenants, calls them (plain,
streamed, several at once, under a deadline that cancels), crashes them with a guest that
traps, resets them, reloads them with another guest and removes them, and after every step
checks that every call ended exactly once, that no tenant keeps sessions or KV memory after its
calls ended, that the batcher's queue is empty when idle, that the statistics add up, and
that the limits held::

    from realm.testing.runtime import RuntimeStateMachine, open_test_runtime

    Machine = RuntimeStateMachine.with_factory(lambda: open_test_runtime(limits=...))
    TestRuntime = Machine.TestCase

``TRAP_GUEST`` and ``minimal_guest`` build small guests in WAT text (the sandbox compiles it).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import attrs
import trio
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from .._errors import (
    CallCancelled,
    GuestTrap,
    Overloaded,
    TenantUnavailable,
    UnknownFunction,
)
from ..actors import Runtime, RuntimeLimits, TenantActor, open_runtime
from ..sandbox import HOST_IMPORTS
from .fixtures import MODEL_NAME
from .models import write_test_model

__all__ = [
    "MODEL_NAME",
    "TRAP_GUEST",
    "RuntimeFactory",
    "RuntimeStateMachine",
    "RuntimeThread",
    "minimal_guest",
    "open_test_runtime",
]

T = TypeVar("T")

#: what makes a runtime for a test: a callable returning ``async with``-able runtimes
RuntimeFactory = Callable[[], AbstractAsyncContextManager[Runtime]]


@contextlib.asynccontextmanager
async def open_test_runtime(
    *,
    tenants: Mapping[str, Mapping[str, Any]] | None = None,
    limits: RuntimeLimits | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> AsyncIterator[Runtime]:
    """Open a runtime on a tiny test model (named ``"tiny"``), written to a temporary directory
    that is removed afterwards.

    Args:
        tenants: passed to :func:`realm.open_runtime` (None: an open runtime, any tenant name
            gets the default guest).
        limits: passed to :func:`realm.open_runtime`.
        model_kwargs: passed to :func:`realm.testing.write_test_model` (``n_layers``, ``arch``,
            ``seed`` ...); its defaults make a 2-layer llama that loads in milliseconds.
    """
    with tempfile.TemporaryDirectory(prefix="realm-rt-", ignore_cleanup_errors=True) as tmp:
        path = write_test_model(Path(tmp) / "tiny.gguf", **dict(model_kwargs or {}))
        async with open_runtime(models={MODEL_NAME: path}, tenants=tenants, limits=limits) as rt:
            yield rt


# --- small guests -----------------------------------------------------------------------------

_IMPORTS = {imp.name: imp for imp in HOST_IMPORTS}
_META_AT = 0x200
_PARAMS_AT = 0x2000
_PARAMS_CAP = 0x2000


def minimal_guest(bodies: Mapping[str, str], *, imports: Sequence[str] = ()) -> bytes:
    """The WAT text (bytes; ``rt.add_tenant(name, guest=...)`` takes it) of a guest that
    follows guest ABI v1 with one exported function per body.

    Args:
        bodies: function name -> body of ``(func (param $ptr i32) (param $len i32)
            (result i32))``: ``"unreachable"`` traps, ``"(i32.const 0)"`` returns ``{}``.
        imports: host imports to declare, each as ``$<name>`` with its ABI signature.
    """
    meta = json.dumps(
        {
            "name": "minimal-guest",
            "version": "0.0.0",
            "functions": [
                {"name": n, "description": n, "params": {"type": "object"}} for n in bodies
            ],
        }
    ).encode()
    if _META_AT + len(meta) > _PARAMS_AT:
        raise ValueError("too many functions for a minimal guest")
    lines = ["(module"]
    for name in imports:
        imp = _IMPORTS[name]
        ps = " ".join(t for _, t in imp.params)
        param = f" (param {ps})" if ps else ""
        result = f" (result {imp.result})" if imp.result else ""
        lines.append(f'  (import "realm" "{name}" (func ${name}{param}{result}))')
    escaped = "".join(f"\\{b:02x}" for b in meta)
    lines += [
        '  (memory (export "memory") 1)',
        f'  (data (i32.const {_META_AT}) "{escaped}")',
        '  (func (export "realm_abi_version") (result i32) (i32.const 1))',
        '  (func (export "realm_alloc") (param $size i32) (result i32)'
        f" (if (result i32) (i32.le_u (local.get $size) (i32.const {_PARAMS_CAP}))"
        f" (then (i32.const {_PARAMS_AT})) (else (i32.const 0))))",
        '  (func (export "realm_free") (param i32 i32))',
        f'  (func (export "realm_metadata_ptr") (result i32) (i32.const {_META_AT}))',
        f'  (func (export "realm_metadata_len") (result i32) (i32.const {len(meta)}))',
    ]
    for name, body in bodies.items():
        lines.append(
            f'  (func (export "realm_fn_{name}") (param $ptr i32) (param $len i32) (result i32)'
            f"\n    {body})"
        )
    lines.append(")")
    return "\n".join(lines).encode()


#: a guest whose ``boom`` traps (``unreachable``) and whose ``fine`` returns ``{}``
TRAP_GUEST: bytes = minimal_guest({"boom": "unreachable", "fine": "(i32.const 0)"})


# --- a runtime for synchronous code -------------------------------------------------------------


class RuntimeThread:
    """A runtime kept open by a Trio loop in a background thread.

    Synchronous code submits coroutine functions with ``run`` (and plain functions with
    ``run_sync``); they run as tasks in that loop, next to the runtime::

        with RuntimeThread(open_test_runtime) as rt_thread:
            rt = rt_thread.runtime
            result = rt_thread.run(rt.call, "alice", "count_tokens", {"text": "hi"})

    Leaving the ``with`` (or ``close()``) leaves the runtime's ``async with`` and joins the
    thread; an error the runtime raised on the way (opening or shutting down) is re-raised
    there.
    """

    def __init__(self, factory: RuntimeFactory = open_test_runtime, *,
                 timeout: float = 60.0) -> None:  # fmt: skip
        self._factory = factory
        self.timeout = timeout  # for the runtime to open, and to shut down
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._runtime: Runtime | None = None
        self._error: BaseException | None = None

    def start(self) -> Runtime:
        """Open the runtime (in the thread) and return it."""
        if self._thread is not None:
            raise RuntimeError("RuntimeThread already started")
        self._thread = threading.Thread(target=self._main, name="realm-runtime", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.timeout):
            raise TimeoutError(f"the runtime did not open within {self.timeout} s")
        if self._runtime is None:
            self._thread.join(self.timeout)
            err, self._error = self._error, None
            raise RuntimeError("the runtime failed to open") from err
        return self._runtime

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as e:  # handed to close(): a thread must not raise
            self._error = e
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        async with self._factory() as rt:
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._runtime = rt
            self._ready.set()
            await self._stop.wait()

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("RuntimeThread is not running")
        return self._runtime

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` in the runtime's loop and return its result (or raise)."""
        if self._token is None:
            raise RuntimeError("RuntimeThread is not running")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the runtime's loop (between its tasks' steps)."""
        if self._token is None:
            raise RuntimeError("RuntimeThread is not running")
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def close(self) -> None:
        """Close the runtime and join the thread; re-raise what the runtime raised, if any."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        thread.join(self.timeout)
        self._token = self._stop = self._runtime = None
        if thread.is_alive():
            raise TimeoutError(f"the runtime did not shut down within {self.timeout} s")
        err, self._error = self._error, None
        if err is not None:
            raise err

    def __enter__(self) -> RuntimeThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the state machine --------------------------------------------------------------------------

# The runtime has no public view of its actors yet (sessions, call slots, operator reset): the
# state machine reads them here and nowhere else.


def _actors(rt: Runtime) -> dict[str, TenantActor]:
    return rt._actors


def _is_open(rt: Runtime) -> bool:
    return rt._open


def _specs(rt: Runtime) -> Mapping[str, Any]:
    return rt._specs


@attrs.define
class _Range:
    """What a statistic should be: between lo and hi (a cancelled call may or may not count)."""

    lo: int = 0
    hi: int = 0

    def add(self, lo: int, hi: int | None = None) -> None:
        self.lo += lo
        self.hi += lo if hi is None else hi

    def holds(self, value: int) -> bool:
        return self.lo <= value <= self.hi


@attrs.define
class _Tenant:
    """The state machine's model of one tenant."""

    guest: str = "default"  # "default" | "trap" | "absent" (a closed runtime's unknown name)
    configured: bool = False  # has a spec in the runtime
    spawned: bool = False  # an actor runs (statistics exist)
    traps: int = 0  # restarts the current actor recorded
    failed: bool = False
    calls: _Range = attrs.Factory(_Range)
    errors: _Range = attrs.Factory(_Range)
    tokens: _Range = attrs.Factory(_Range)

    def new_actor(self) -> None:
        self.spawned = True
        self.traps, self.failed = 0, False
        self.calls, self.errors, self.tokens = _Range(), _Range(), _Range()

    def drop_actor(self) -> None:
        """Reloaded or removed: the next call starts a fresh actor (not failed)."""
        self.spawned, self.traps, self.failed = False, 0, False


@attrs.frozen
class _Outcome:
    """How one call ended: exactly one of a result, an error, or cancelled by its deadline."""

    result: Any = None
    error: BaseException | None = None
    cancelled: bool = False
    events: tuple[Any, ...] = ()  # a streamed call's events


class RuntimeStateMachine(RuleBasedStateMachine):
    """Drives a runtime through spawns, calls, cancellations, crashes, resets, reloads and
    removals, and checks its invariants after every step (see the module docs).

    The runtime comes from ``runtime_factory`` (default: ``open_test_runtime()``); bind
    another with ``with_factory``. The factory's runtime must serve the default guest to the
    tenants it configures (the machine installs the other guests itself) and must not stop
    idle actors during a test (``idle_seconds`` None or long).

    Class attributes tune it: ``tenant_names`` (the names the machine uses, besides the
    runtime's configured tenants), ``max_tokens`` (what calls generate; calls under a
    deadline ask for ``deadline_max_tokens`` so that it passes mid-call), ``prompts``,
    ``call_timeout`` (the longest any step may take: a call that never ends fails the test),
    ``settle_seconds`` (how long a cancelled guest may take to wind down),
    ``sessions_per_call`` (sessions one generate call holds: with ``max_concurrent_calls``, the
    bound on a tenant's open sessions).
    """

    runtime_factory: ClassVar[RuntimeFactory] = staticmethod(open_test_runtime)
    tenant_names: ClassVar[tuple[str, ...]] = ("ada", "bob", "cy")
    max_tokens: ClassVar[int] = 4
    deadline_max_tokens: ClassVar[int] = 48
    call_timeout: ClassVar[float] = 20.0
    settle_seconds: ClassVar[float] = 2.0
    sessions_per_call: ClassVar[int] = 1  # the default guest's generate opens one session
    prompts: ClassVar[tuple[str, ...]] = ("Once upon", "hello world", "a b c")

    @classmethod
    def with_factory(cls, factory: RuntimeFactory, **attributes: Any) -> type[RuntimeStateMachine]:
        """A subclass whose runtimes come from ``factory`` (and other class attributes set)."""
        name = f"{cls.__name__}WithFactory"
        ns: dict[str, Any] = {"runtime_factory": staticmethod(factory), **attributes}
        ns["__module__"] = cls.__module__
        return type(name, (cls,), ns)

    def __init__(self) -> None:
        super().__init__()
        self._thread = RuntimeThread(type(self).runtime_factory, timeout=self.call_timeout * 3)
        self.rt = self._thread.start()
        self.open = _is_open(self.rt)
        specs = _specs(self.rt)
        bad = [n for n, s in specs.items() if getattr(s, "guest", None)]
        if bad:
            self._thread.close()
            raise ValueError(f"configured tenants must run the default guest: {bad}")
        names = sorted(set(self.tenant_names) | set(specs))
        self.model = {
            n: _Tenant(guest="default" if n in specs or self.open else "absent",
                       configured=n in specs)
            for n in names
        }  # fmt: skip
        self.issued = 0  # calls started
        self.outcomes: list[_Outcome] = []  # how each call ended (exactly once)
        self.last_steps = 0

    def teardown(self) -> None:
        models = [self.rt.registry.get(n) for n in self.rt.registry.names()]
        failing = sys.exc_info()[1] is not None  # a step failed: report that, not this
        try:
            self._thread.close()  # a runtime that fails to shut down fails the test
        except Exception:
            if not failing:
                raise
        if not failing:
            for m in models:  # every session closed at shutdown: no KV memory held
                assert m.kv_bytes_used == 0, f"{m.kv_bytes_used} bytes of KV held after close"

    # --- hooks -----------------------------------------------------------------------------

    def classify(self, error: BaseException) -> BaseException:
        """The error a call ended with, as the machine judges it. Override to tolerate a known
        runtime bug (say, unwrap an exception group) while it is being fixed."""
        return error

    # --- helpers -------------------------------------------------------------------------

    def _in_loop(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def bounded() -> T:
            with trio.fail_after(self.call_timeout):  # a call that never ends fails the test
                return await fn(*args)

        return self._thread.run(bounded)

    def _record(self, outcome: _Outcome) -> _Outcome:
        ended = [outcome.result is not None, outcome.error is not None, outcome.cancelled]
        assert sum(ended) == 1, f"a call ended {sum(ended)} times: {outcome}"
        self.outcomes.append(outcome)
        return outcome

    async def _call(self, name: str, function: str, params: dict[str, Any]) -> _Outcome:
        self.issued += 1
        try:
            result = await self.rt.call(name, function, params)
        except Exception as e:  # judged by the rule; a BaseException fails the test as is
            return self._record(_Outcome(error=self.classify(e)))
        assert isinstance(result, dict), f"{function} returned {result!r}"
        return self._record(_Outcome(result=result))

    async def _stream(self, name: str, params: dict[str, Any],
                      during: Callable[[], None] | None = None) -> _Outcome:  # fmt: skip
        events: list[Any] = []
        self.issued += 1
        try:
            async with self.rt.stream(name, "generate", params) as stream:
                async for ev in stream:
                    events.append(ev)
                    if during is not None and ev.kind == "token":
                        during()
                        during = None
        except Exception as e:
            err = self.classify(e)
            assert not any(ev.kind == "result" for ev in events), "a result, then an error"
            return self._record(_Outcome(error=err, events=tuple(events)))
        if during is not None:  # no token came: the reload still happens, after the call
            during()
        kinds = [ev.kind for ev in events]
        assert kinds.count("result") == 1 and kinds[-1] == "result", f"stream events: {kinds}"
        tokens = [ev.data for ev in events[:-1]]
        assert [t["index"] for t in tokens] == list(range(len(tokens))), "token indices"
        result = events[-1].data
        assert result["text"] == "".join(t["token"] for t in tokens), "text != its tokens"
        return self._record(_Outcome(result=result, events=tuple(events)))

    def _callable(self, name: str) -> bool:
        return self.model[name].guest != "absent"

    def _names(self, pred: Callable[[_Tenant], bool]) -> list[str]:
        return [n for n, t in self.model.items() if pred(t)]

    def _serving_default(self) -> list[str]:
        return self._names(lambda t: t.guest == "default" and not t.failed)

    def _touch(self, name: str) -> _Tenant:
        """A call or metadata request reached ``name``: the runtime starts its actor."""
        t = self.model[name]
        if self._callable(name) and not t.spawned:
            t.new_actor()
        return t

    def _expect(self, name: str, function: str, params: dict[str, Any], out: _Outcome) -> None:
        """Check a call's outcome against the model and account for it in the statistics."""
        t = self._touch(name)
        if not self._callable(name):
            assert isinstance(out.error, TenantUnavailable), out
            assert "unknown tenant" in str(out.error)
            return
        if t.failed:
            assert isinstance(out.error, TenantUnavailable), out
            assert "restarted" in str(out.error)
            return
        known = {"default": {"generate", "count_tokens"}, "trap": {"boom", "fine"}}[t.guest]
        if function not in known:
            assert isinstance(out.error, UnknownFunction), out
            t.calls.add(1)
            t.errors.add(1)
            return
        if function == "boom":
            assert isinstance(out.error, GuestTrap), out
            t.calls.add(1)
            t.errors.add(1)
            t.traps += 1
            actor = _actors(self.rt)[name]
            t.failed = t.traps > actor.config.max_restarts
            return
        assert out.error is None, f"{name}.{function}({params}) failed: {out.error!r}"
        r = out.result
        t.calls.add(1)
        if function == "fine":
            assert r == {}, r
        elif function == "count_tokens":
            assert isinstance(r.get("count"), int) and r["count"] > 0, r
        else:
            self._check_generated(r, params["max_tokens"])
            t.tokens.add(r["usage"]["completion_tokens"])

    @staticmethod
    def _check_generated(r: dict[str, Any], max_tokens: int, *, cancelled: bool = False) -> None:
        reasons = {"length", "stop"} | ({"cancelled"} if cancelled else set())
        assert r.get("finish_reason") in reasons, r
        assert isinstance(r.get("text"), str), r
        assert 0 <= r["usage"]["completion_tokens"] <= max_tokens, r

    def _gen(self, data: st.DataObject, max_tokens: int | None = None) -> dict[str, Any]:
        return {
            "prompt": data.draw(st.sampled_from(self.prompts), label="prompt"),
            "max_tokens": max_tokens or data.draw(st.integers(1, self.max_tokens), "max_tokens"),
            "temperature": 0,
        }

    # --- rules: calls --------------------------------------------------------------------

    @precondition(lambda self: any(not t.spawned for t in self.model.values()))
    @rule(data=st.data())
    def spawn(self, data: st.DataObject) -> None:
        """The first call to a tenant without an actor starts one (or is refused)."""
        name = data.draw(st.sampled_from(self._names(lambda t: not t.spawned)), "tenant")
        function = "fine" if self.model[name].guest == "trap" else "count_tokens"
        params = {"text": data.draw(st.sampled_from(self.prompts))}
        out = self._in_loop(self._call, name, function, params)
        self._expect(name, function, params, out)
        if self._callable(name):
            assert name in _actors(self.rt)

    @rule(data=st.data())
    def call(self, data: st.DataObject) -> None:
        """A call to any tenant: generate, streamed generate, count_tokens, the trap guest's
        harmless function, or a function its guest does not have."""
        name = data.draw(st.sampled_from(sorted(self.model)), "tenant")
        guest = self.model[name].guest
        options = ["fine", "nope"] if guest == "trap" else ["generate", "stream", "count_tokens",
                                                            "nope"]  # fmt: skip
        kind = data.draw(st.sampled_from(options), "function")
        if kind in ("generate", "stream"):
            params = self._gen(data)
        elif kind == "count_tokens":
            params = {"text": data.draw(st.sampled_from(self.prompts))}
        else:
            params = {}
        if kind == "stream":
            out = self._in_loop(self._stream, name, params)
            kind = "generate"
        else:
            out = self._in_loop(self._call, name, kind, params)
        self._expect(name, kind, params, out)

    @precondition(lambda self: self._serving_default())
    @rule(data=st.data(), timeout=st.sampled_from([0.0, 0.0001, 0.001, 0.004, 0.015]))
    def call_with_deadline(self, data: st.DataObject, timeout: float) -> None:
        """A generate call whose deadline passes mid-call: it ends exactly once, as a result,
        as cancelled (the deadline's scope caught it) or with CallCancelled."""
        name = data.draw(st.sampled_from(self._serving_default()), "tenant")
        params = self._gen(data, self.deadline_max_tokens)

        async def under_deadline() -> _Outcome:
            try:
                with trio.move_on_after(timeout) as scope:
                    return await self._call(name, "generate", params)
            except Exception as e:  # what escaped the deadline's scope
                return self._record(_Outcome(error=self.classify(e)))
            assert scope.cancelled_caught
            return self._record(_Outcome(cancelled=True))

        out = self._in_loop(under_deadline)
        t = self._touch(name)
        if out.result is not None:
            self._check_generated(out.result, params["max_tokens"], cancelled=True)
            t.calls.add(1)
            t.tokens.add(out.result["usage"]["completion_tokens"])
        else:
            assert out.cancelled or isinstance(out.error, CallCancelled), (
                f"a cancelled call must end as cancelled or with CallCancelled, not {out.error!r}"
            )
            # cancelled before or after it reached the guest: counted or not
            t.calls.add(0, 1)
            t.errors.add(0, 1)
            t.tokens.add(0, params["max_tokens"])

    @precondition(lambda self: self._serving_default())
    @rule(data=st.data(), n=st.integers(1, 6))
    def calls_at_once(self, data: st.DataObject, n: int) -> None:
        """``n`` calls to one tenant at once: at most ``max_concurrent_calls`` run (and hold
        sessions) at a time, at most ``max_queued_calls`` wait; the rest are Overloaded."""
        name = data.draw(st.sampled_from(self._serving_default()), "tenant")
        params = self._gen(data)
        outs: list[_Outcome] = []
        peak = {"sessions": 0, "running": 0}

        async def monitor() -> None:
            while True:
                actor = _actors(self.rt).get(name)
                if actor is not None:
                    peak["sessions"] = max(peak["sessions"], len(actor.state.sessions))
                    running = actor.config.max_concurrent_calls - actor._slots.value
                    peak["running"] = max(peak["running"], running)
                await trio.sleep(0.0005)

        async def one() -> None:
            outs.append(await self._call(name, "generate", params))

        async def all_at_once() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(monitor)
                async with trio.open_nursery() as calls:
                    for _ in range(n):
                        calls.start_soon(one)
                nursery.cancel_scope.cancel()

        self._in_loop(all_at_once)
        assert len(outs) == n
        t = self._touch(name)
        actor = _actors(self.rt)[name]
        slots = actor.config.max_concurrent_calls
        queued = self.rt.limits.max_queued_calls
        over = sum(isinstance(o.error, Overloaded) for o in outs)
        # documented: max_queued_calls wait besides the running ones; never fewer than that
        # many may be admitted in all (the runtime counts running calls as queued, too)
        assert max(0, n - queued - slots) <= over <= max(0, n - queued), (n, over)
        for o in outs:
            if not isinstance(o.error, Overloaded):
                assert o.error is None, f"{name}.generate failed: {o.error!r}"
                self._check_generated(o.result, params["max_tokens"])
                t.calls.add(1)
                t.tokens.add(o.result["usage"]["completion_tokens"])
        assert peak["running"] <= slots, peak
        limit = min(actor.state.limits.max_sessions, slots * self.sessions_per_call)
        assert peak["sessions"] <= limit, f"{peak['sessions']} sessions open, limit {limit}"

    @rule(data=st.data())
    def metadata(self, data: st.DataObject) -> None:
        """The functions a tenant's guest exports: the guest most recently installed."""
        name = data.draw(st.sampled_from(sorted(self.model)), "tenant")

        async def get() -> Any:
            try:
                return self.rt.metadata(name)
            except TenantUnavailable as e:
                return e

        got = self._in_loop(get)
        self._touch(name)
        if not self._callable(name):
            assert isinstance(got, TenantUnavailable), got
            return
        names = {f["name"] for f in got}
        if self.model[name].guest == "trap":
            assert names == {"boom", "fine"}, names
        else:
            assert {"generate", "count_tokens"} <= names, names

    # --- rules: supervision and configuration ------------------------------------------------

    @rule(data=st.data(), times=st.integers(1, 5))
    def crash(self, data: st.DataObject, times: int) -> None:
        """Calls that trap, ``times`` in a row, to a tenant running ``TRAP_GUEST`` (installed
        with ``add_tenant`` first when it runs another guest): each instance is rebuilt; past
        max_restarts (3) the tenant is marked failed and refuses calls until it is reset or
        reloaded."""
        name = data.draw(st.sampled_from(sorted(self.model)), "tenant")
        t = self.model[name]
        if t.guest != "trap":
            self._thread.run_sync(lambda: self.rt.add_tenant(name, guest=TRAP_GUEST))
            t.guest, t.configured = "trap", True
            t.drop_actor()
        for _ in range(times):
            out = self._in_loop(self._call, name, "boom", {})
            self._expect(name, "boom", {}, out)

    @precondition(lambda self: self._names(lambda t: t.spawned))
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        """An operator resets a tenant: a failed one serves calls again."""
        name = data.draw(st.sampled_from(self._names(lambda t: t.spawned)), "tenant")
        self._thread.run_sync(_actors(self.rt)[name].reset)
        t = self.model[name]
        t.traps, t.failed = 0, False

    @rule(data=st.data(), guest=st.sampled_from(["default", "trap"]))
    def reload(self, data: st.DataObject, guest: str) -> None:
        """``add_tenant`` with another guest (or ``reload_tenant``, same guest): new calls get a
        fresh actor on the new guest."""
        name = data.draw(st.sampled_from(sorted(self.model)), "tenant")
        t = self.model[name]
        same = t.guest == guest and data.draw(st.booleans(), "reload_tenant")
        if same:
            self._thread.run_sync(self.rt.reload_tenant, name)
        elif guest == "trap":
            self._thread.run_sync(lambda: self.rt.add_tenant(name, guest=TRAP_GUEST))
        else:
            self._thread.run_sync(lambda: self.rt.add_tenant(name))
        if not same:
            t.guest, t.configured = guest, True
        t.drop_actor()
        assert name not in _actors(self.rt)

    @precondition(lambda self: self._serving_default())
    @rule(data=st.data(), guest=st.sampled_from(["default", "trap"]))
    def reload_during_call(self, data: st.DataObject, guest: str) -> None:
        """A reload while a streamed call runs: the call finishes on the old instance."""
        name = data.draw(st.sampled_from(self._serving_default()), "tenant")
        params = self._gen(data, self.max_tokens * 4)
        old = _actors(self.rt).get(name)

        def swap() -> None:
            nonlocal old
            old = _actors(self.rt).get(name)
            if guest == "trap":
                self.rt.add_tenant(name, guest=TRAP_GUEST)
            else:
                self.rt.add_tenant(name)

        out = self._in_loop(self._stream, name, params, swap)
        assert out.error is None, f"a call in flight failed on reload: {out.error!r}"
        self._check_generated(out.result, params["max_tokens"])
        t = self.model[name]
        t.guest, t.configured = guest, True
        t.drop_actor()
        if old is not None:  # the old actor lets go of everything once its calls ended
            self._in_loop(self._settle_actor, old)

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        """``remove_tenant``: an open runtime serves the name the default guest again; a closed
        one refuses it."""
        name = data.draw(st.sampled_from(sorted(self.model)), "tenant")
        actor = _actors(self.rt).get(name)
        self._thread.run_sync(self.rt.remove_tenant, name)
        t = self.model[name]
        t.configured = False
        t.guest = "default" if self.open else "absent"
        t.drop_actor()
        assert name not in _actors(self.rt)
        if actor is not None:
            assert actor.state.sessions == {}, "a removed tenant keeps sessions"

    # --- invariants ------------------------------------------------------------------------

    async def _settle_actor(self, actor: TenantActor) -> None:
        with trio.move_on_after(self.settle_seconds):
            while actor.in_flight or actor.state.sessions:
                await trio.sleep(0.005)
        assert actor.in_flight == 0, f"{actor.config.name}: {actor.in_flight} calls in flight"
        assert not actor.state.sessions, (
            f"{actor.config.name} keeps {len(actor.state.sessions)} sessions after its calls"
        )

    async def _settle(self) -> None:
        for actor in list(_actors(self.rt).values()):
            await self._settle_actor(actor)
        with trio.move_on_after(self.settle_seconds):
            while self.rt.batcher.statistics().queued:
                await trio.sleep(0.005)

    @invariant()
    def idle_runtime_holds_nothing(self) -> None:
        """Once calls ended: no sessions, no KV memory, nothing queued in the batcher."""
        self._in_loop(self._settle)
        assert self.rt.batcher.statistics().queued == 0, "the batcher's queue is not empty"
        for n in self.rt.registry.names():
            m = self.rt.registry.get(n)
            assert m.kv_bytes_used == 0, f"{m.kv_bytes_used} bytes of KV memory held when idle"

    @invariant()
    def every_call_ended_once(self) -> None:
        """Each call started has ended, once (``_record`` checks each ending is one thing)."""
        assert len(self.outcomes) == self.issued, (len(self.outcomes), self.issued)

    @invariant()
    def statistics_add_up(self) -> None:
        stats = self._thread.run_sync(self.rt.statistics)
        spawned = {n for n, t in self.model.items() if t.spawned}
        assert set(stats.tenants) == spawned, (sorted(stats.tenants), sorted(spawned))
        for name, s in stats.tenants.items():
            t = self.model[name]
            assert t.calls.holds(s["calls"]), f"{name}: calls {s['calls']}, expected {t.calls}"
            assert t.errors.holds(s["errors"]), f"{name}: errors {s['errors']}, want {t.errors}"
            assert s["errors"] <= s["calls"], s
            assert t.tokens.holds(s["completion_tokens"]), (name, s, t.tokens)
            assert s["sessions"] == 0, s
            assert s["failed"] == t.failed, f"{name}: failed {s['failed']}, expected {t.failed}"
        b = stats.batcher
        assert b.steps >= self.last_steps, "the batcher's step count went down"
        self.last_steps = b.steps
        assert b.sequences >= b.steps and b.tokens >= b.sequences, b
        if b.steps:
            assert b.max_batch_size >= 1 and math.isclose(b.mean_batch_size, b.sequences / b.steps)
            assert b.max_batch_size >= b.mean_batch_size, b

    @invariant()
    def tenants_listed(self) -> None:
        """``rt.tenants()``: the configured tenants and those with an actor."""
        listed = set(self._thread.run_sync(self.rt.tenants))
        want = {n for n, t in self.model.items() if t.configured or t.spawned}
        assert listed == want, (sorted(listed), sorted(want))
