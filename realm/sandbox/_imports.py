"""The host imports of guest ABI v1: one function per row of ``_abi.HOST_IMPORTS``.

Each ``imp_<name>(host, ctx, *args)`` gets the instance it serves (``host.mem``: its checked
memory, ``host.tenant``: the tenant's sessions and models) and the call's context, and returns
what the import returns. It may raise ``Stop`` (the guest broke a rule: it is stopped) or
``Fail`` (an error status). ``guard`` wraps each into the function the linker calls, which
never raises into wasmtime (an exception raised in a host function travels through one
process-wide variable, unsafe with several threads running guests): it turns everything into
a status, records what went wrong on the call's own context, and stops a guest that breaks a
rule or ignores errors by setting its store's fuel to zero.

Every import checks sizes and counts before it allocates or works, charges the call's work
budget (``charge``) before it works, and checks the call's cancel flag and deadline: before
it starts (``guard``), and between the slices its heavy work runs in (``_compute``: native
kernels in chunks, Python work under ``COMPUTE.guest_python``), so it yields to other
tenants' forward steps.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np

from .._errors import CallCancelled, RealmError
from ..model._speculative import MAX_DRAFT_TOKENS, vocab_fingerprint
from ._abi import HOST_IMPORTS, Status
from ._compute import (
    COMPUTE,
    DECODE_WORK_PER_ID,
    DETOKENIZE_WORK,
    MAX_ATTENTION_QUERY_SCORES,
    MAX_ATTENTION_SCORES,
    TEMPLATE_WORK_PER_BYTE,
    TOKENIZE_WORK_PER_BYTE,
    Interrupted,
    attention_work,
    chunked_attention,
    chunked_matmul,
    matmul_work,
)
from ._context import (
    MAX_IGNORED_ERRORS,
    MAX_LOG_BYTES,
    MAX_LOG_LINES_PER_CALL,
    MAX_TEXT_BYTES,
    CallContext,
    SessionSlot,
    TenantState,
    model_json,
)
from ._memory import U32, Fail, GuestMemory, Stop, overlaps

if TYPE_CHECKING:
    from ..model import Model

log = logging.getLogger("realm.guest")

# imports that still work after the call is cancelled, so a guest can clean up and report
ALWAYS_ALLOWED: Final = frozenset(
    {"result", "log", "clock_ms", "session_close", "session_keep", "session_pos"}
)
MAX_DECODE_IDS: Final = 1 << 20  # ids one decode call takes (checked before they are read)
MAX_MATMUL_ELEMS: Final = 1 << 26  # rows * cols, and batch * cols
MAX_ATTENTION_ELEMS: Final = 1 << 24  # n_q * n_heads * head_dim, and n_kv * n_kv_heads * ...
MAX_HEAD_DIM: Final = 256


class ImportHost(Protocol):
    """What an import sees of the instance it serves."""

    mem: GuestMemory
    tenant: TenantState

    def current_call(self) -> CallContext | None: ...

    def stop_guest(self, ctx: CallContext, why: str) -> None: ...


# --- helpers --------------------------------------------------------------------------------------


def charge(ctx: CallContext, host: ImportHost, units: int, what: str) -> None:
    """Charge ``units`` of work to the call before doing it (ELIMIT when it does not fit)."""
    budget = host.tenant.limits.max_work_per_call
    if ctx.work + units > budget:
        raise Fail(
            Status.ELIMIT,
            f"{what} needs {units} work units; the call has {max(0, budget - ctx.work)} of its "
            f"{budget} left (max_work_per_call)",
        )
    ctx.work += units


def escape_text(text: str) -> str:
    """``text`` as one printable line: control and separator characters (newlines, ANSI
    escapes, U+2028...) and backslashes written as Python escapes, so a guest cannot forge
    log lines or drive a terminal."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        "\\\\" if ch == "\\" else ch if ch.isprintable() else ch.encode("unicode_escape").decode()
        for ch in text
    )


def _model(host: ImportHost, ptr: int, n: int) -> tuple[str, Model]:
    name = host.mem.text(ptr, n, limit=256) if n else ""
    try:
        return host.tenant.model(name)
    except KeyError:
        raise Fail(Status.ENOENT, f"no model {name!r}") from None


def _slot(host: ImportHost, handle: int) -> SessionSlot:
    slot = host.tenant.sessions.get(handle)
    if slot is None:
        raise Fail(Status.ENOENT, f"no session {handle} for this tenant")
    return slot


def _realm_fail(e: RealmError) -> Fail:
    if e.code == "OVERLOADED":
        return Fail(Status.ELIMIT, str(e))
    return Fail(Status.EINVAL, str(e))


# --- the imports, in the table's order ----------------------------------------------------------


def imp_log(host: ImportHost, ctx: CallContext, level: int, ptr: int, n: int) -> int:
    if n < 0:
        raise Fail(Status.EINVAL, f"negative length {n}")
    raw = host.mem.read(ptr, min(n, MAX_LOG_BYTES))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if n > MAX_LOG_BYTES and e.start >= len(raw) - 3:  # a character cut at the limit
            text = raw[: e.start].decode("utf-8")
        else:
            raise Fail(Status.EINVAL, f"text is not UTF-8: {e}") from None
    ctx.log_lines += 1
    if ctx.log_lines <= MAX_LOG_LINES_PER_CALL:
        lvl = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING}.get(level, logging.ERROR)
        log.log(lvl, "[%s] %s", escape_text(host.tenant.name), escape_text(text))
    return 0


def imp_clock_ms(host: ImportHost, ctx: CallContext) -> int:
    return int((time.monotonic() - ctx.start) * 1000)


def imp_random(host: ImportHost, ctx: CallContext, ptr: int, n: int) -> int:
    if n < 0 or n > MAX_TEXT_BYTES:
        raise Fail(Status.EINVAL, f"length {n}")
    host.mem.span(ptr, n)  # checked before the bytes are drawn
    host.mem.write(ptr, ctx.rng.bytes(n))
    return 0


def imp_model_info(host: ImportHost, ctx: CallContext, mp: int, ml: int, out: int, cap: int) -> int:
    key, model = _model(host, mp, ml)
    info = model_json(key, model)
    info["max_tokens_per_forward"] = host.tenant.limits.max_tokens_per_forward
    name = host.mem.text(mp, ml, limit=256) if ml else ""
    if host.tenant.adapter(name) is not None:  # a LoRA adapter's name: its model, adapted
        info["adapter"] = name
    info["vocab_hash"] = vocab_fingerprint(model)  # a speculative draft must match it
    info["max_verify_tokens"] = MAX_DRAFT_TOKENS + 1
    return host.mem.out(json.dumps(info).encode(), out, cap)


def imp_tokenize(
    host: ImportHost, ctx: CallContext, mp: int, ml: int, tp: int, tl: int, flags: int,
    out: int, cap: int,
) -> int:  # fmt: skip
    _, model = _model(host, mp, ml)
    if flags & ~3:
        raise Fail(Status.EINVAL, f"unknown flags {flags}")
    if cap < 0:
        raise Fail(Status.EINVAL, f"negative capacity {cap}")
    text = host.mem.text(tp, tl, limit=MAX_TEXT_BYTES)
    charge(ctx, host, tl * TOKENIZE_WORK_PER_BYTE, "tokenize")
    try:
        with COMPUTE.guest_python(ctx):
            ids = model.tokenizer.encode(text, bool(flags & 1), parse_special=bool(flags & 2))
    except RealmError as e:
        raise Fail(Status.EINVAL, str(e)) from None
    host.mem.write(out, np.asarray(ids[:cap], dtype="<i4").tobytes())
    return len(ids)


def imp_decode(
    host: ImportHost, ctx: CallContext, mp: int, ml: int, ids_ptr: int, n: int, out: int, cap: int
) -> int:
    _, model = _model(host, mp, ml)
    host.mem.check_array(ids_ptr, n, "<i4")  # bounds first (a bad pointer stops the guest)
    if n > MAX_DECODE_IDS:  # before a single id is read
        raise Fail(Status.ELIMIT, f"decode of {n} ids exceeds {MAX_DECODE_IDS}")
    if cap < 0:
        raise Fail(Status.EINVAL, f"negative capacity {cap}")
    ids = np.array(host.mem.array(ids_ptr, n, "<i4"))
    charge(ctx, host, n * DECODE_WORK_PER_ID, "decode")
    try:
        with COMPUTE.guest_python(ctx):
            text = model.tokenizer.decode(ids.tolist(), max_tokens=MAX_DECODE_IDS)
    except RealmError as e:
        raise Fail(Status.EINVAL, str(e)) from None
    return host.mem.out(text.encode(), out, cap)


def imp_chat_template(
    host: ImportHost, ctx: CallContext, mp: int, ml: int, msp: int, msl: int, add: int,
    out: int, cap: int,
) -> int:  # fmt: skip
    _, model = _model(host, mp, ml)
    raw = host.mem.text(msp, msl, limit=MAX_TEXT_BYTES)
    charge(ctx, host, msl * TEMPLATE_WORK_PER_BYTE, "chat_template")
    try:
        with COMPUTE.guest_python(ctx):
            messages = json.loads(raw, parse_constant=_no_constant)
            text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=bool(add))
    except (ValueError, RecursionError) as e:
        raise Fail(Status.EINVAL, f"messages: {e}") from None
    except RealmError as e:
        raise Fail(Status.EINVAL, str(e)) from None
    data = text.encode()
    if len(data) > MAX_TEXT_BYTES:
        raise Fail(Status.ELIMIT, f"the rendered prompt of {len(data)} bytes exceeds the limit")
    return host.mem.out(data, out, cap)


def imp_session_open(host: ImportHost, ctx: CallContext, mp: int, ml: int, capacity: int) -> int:
    name = host.mem.text(mp, ml, limit=256) if ml else ""
    if capacity < 0:
        raise Fail(Status.EINVAL, f"negative capacity {capacity}")
    try:
        return host.tenant.open_session(name, capacity, ctx)
    except KeyError:
        raise Fail(Status.ENOENT, f"no model {name!r}") from None
    except OverflowError as e:
        raise Fail(Status.ELIMIT, str(e)) from None
    except CallCancelled:
        return int(Status.ECANCELLED)
    except RealmError as e:
        raise Fail(Status.EINVAL, str(e)) from None


def imp_session_close(host: ImportHost, ctx: CallContext, handle: int) -> int:
    _slot(host, handle)
    try:
        host.tenant.close_session(handle)
    except KeyError:  # closed by another of the tenant's calls just now
        raise Fail(Status.ENOENT, f"no session {handle} for this tenant") from None
    return 0


def imp_session_rewind(host: ImportHost, ctx: CallContext, handle: int, pos: int) -> int:
    slot = _slot(host, handle)
    if not 0 <= pos <= slot.session.pos:
        raise Fail(Status.EINVAL, f"rewind to {pos} of a session at {slot.session.pos}")
    slot.session.rewind(pos)
    return slot.session.pos


def imp_session_pos(host: ImportHost, ctx: CallContext, handle: int) -> int:
    return int(_slot(host, handle).session.pos)


def imp_session_keep(host: ImportHost, ctx: CallContext, handle: int) -> int:
    _slot(host, handle)
    try:
        host.tenant.keep_session(handle)
    except KeyError:
        raise Fail(Status.ENOENT, f"no session {handle} for this tenant") from None
    return 0


def imp_forward(
    host: ImportHost, ctx: CallContext, handle: int, tp: int, n: int, lp: int, cap: int, mode: int
) -> int:
    slot = _slot(host, handle)
    limit = host.tenant.limits.max_tokens_per_forward
    if not 0 < n <= limit:
        raise Fail(Status.ELIMIT if n > 0 else Status.EINVAL, f"n_tokens {n} not in [1, {limit}]")
    if mode not in (0, 1, 2, 3):
        raise Fail(Status.EINVAL, f"mode {mode} (0 none, 1 last, 2 all, 3 verify)")
    if mode == 3 and n > MAX_DRAFT_TOKENS + 1:
        raise Fail(Status.ELIMIT, f"a verify step takes at most {MAX_DRAFT_TOKENS + 1} tokens")
    model = slot.session.model
    vocab = model.info.vocab_size
    need = {0: 0, 1: vocab, 2: n * vocab, 3: n * vocab}[mode]
    if cap < need:
        raise Fail(Status.EINVAL, f"logits buffer of {cap} floats, {need} needed")
    if need:
        host.mem.check_array(lp, need, "<f4")  # the output, before the work
    tokens = np.array(host.mem.array(tp, n, "<i4"), dtype=np.int32)  # copy: memory may move
    charge(ctx, host, n * model.info.n_params, "forward")
    try:
        (logits,) = host.tenant.forward(
            model, [(slot.session, tokens, ("none", "last", "all", "verify")[mode])]
        )
    except RealmError as e:
        if e.code == "CANCELLED":  # the batcher's wait was cancelled with the call
            ctx.cancel.set()
            return int(Status.ECANCELLED)
        raise _realm_fail(e) from None
    if ctx.cancelled():
        return int(Status.ECANCELLED)
    if need:
        out = host.mem.array(lp, need, "<f4", writable=True)  # memory re-read after the step
        out[:] = np.asarray(logits, dtype=np.float32).reshape(-1)
    return need


def imp_detokenize(
    host: ImportHost, ctx: CallContext, handle: int, token: int, out: int, cap: int
) -> int:
    slot = _slot(host, handle)
    if cap < 0:
        raise Fail(Status.EINVAL, f"negative capacity {cap}")
    charge(ctx, host, DETOKENIZE_WORK, "detokenize")
    if len(slot.pending) > MAX_TEXT_BYTES:  # a guest that pushes and never takes
        raise Fail(Status.ELIMIT, f"{len(slot.pending)} detokenized bytes are waiting to be taken")
    try:
        if token >= 0:
            slot.pending += slot.stream.push(token).encode()
        elif token == -2:
            slot.pending += slot.stream.flush().encode()
        elif token != -1:
            raise Fail(Status.EINVAL, f"token {token}")
    except RealmError as e:
        raise Fail(Status.EINVAL, str(e)) from None
    take, rest = slot.pending[:cap], slot.pending[cap:]
    # never split a UTF-8 character across calls
    while rest and take and (rest[0] & 0xC0) == 0x80:
        rest = take[-1:] + rest
        take = take[:-1]
    host.mem.write(out, take)  # checked before the text leaves the queue
    slot.pending = rest
    return len(take)


def imp_emit(host: ImportHost, ctx: CallContext, ptr: int, n: int) -> int:
    limits = host.tenant.limits
    if n > MAX_TEXT_BYTES:
        raise Fail(Status.ELIMIT, f"text of {n} bytes exceeds {MAX_TEXT_BYTES}")
    if n:
        host.mem.span(ptr, n)  # a bad pointer stops the guest whatever the size
    if n > limits.max_emit_chunk_bytes:
        raise Fail(
            Status.ELIMIT, f"a chunk of {n} bytes exceeds max_emit_chunk_bytes "
            f"({limits.max_emit_chunk_bytes})",
        )  # fmt: skip
    if ctx.emitted_bytes + max(n, 0) > limits.max_emit_bytes:
        raise Fail(
            Status.ELIMIT, f"the call emitted {ctx.emitted_bytes} bytes; {n} more exceed "
            f"max_emit_bytes ({limits.max_emit_bytes})",
        )  # fmt: skip
    text = host.mem.text(ptr, n, limit=limits.max_emit_chunk_bytes)
    ctx.emitted += 1
    ctx.emitted_bytes += n
    if ctx.on_emit is not None and ctx.on_emit(text) is False:
        ctx.cancel.set()
        return int(Status.ECANCELLED)
    return 0


def imp_result(host: ImportHost, ctx: CallContext, ptr: int, n: int) -> int:
    text = host.mem.text(ptr, n, limit=MAX_TEXT_BYTES)
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:
        raise Fail(
            Status.EINVAL,
            f"result is not JSON (or holds NaN, Infinity or an overflowing number): {e}",
        ) from None
    if not isinstance(value, dict):
        raise Fail(Status.EINVAL, "result must be a JSON object")
    ctx.result = value
    return 0


def imp_embed(
    host: ImportHost, ctx: CallContext, mp: int, ml: int, tp: int, n: int, out: int, cap: int
) -> int:
    _, model = _model(host, mp, ml)
    adapter = host.tenant.adapter(host.mem.text(mp, ml, limit=256) if ml else "")
    dim = model.info.n_embd
    if cap < dim:  # snprintf-style size query: no work
        if cap < 0:
            raise Fail(Status.EINVAL, f"negative capacity {cap}")
        return dim
    limit = min(host.tenant.limits.max_tokens_per_forward, model.info.context_length)
    if not 0 < n <= limit:
        raise Fail(Status.ELIMIT if n > 0 else Status.EINVAL, f"n_tokens {n} not in [1, {limit}]")
    host.mem.check_array(out, dim, "<f4")
    tokens = np.array(host.mem.array(tp, n, "<i4"), dtype=np.int32)
    charge(ctx, host, n * model.info.n_params, "embed")
    try:
        # one native pass (the model has no chunked embedding): a guest piece of the pool,
        # behind every forward step that waits
        with COMPUTE.guest_chunk(ctx):
            vec = model.embed(tokens, adapter=adapter)
    except CallCancelled:
        return int(Status.ECANCELLED)
    except RealmError as e:
        raise _realm_fail(e) from None
    host.mem.array(out, dim, "<f4", writable=True)[:] = vec
    return dim


def imp_matmul_f32(
    host: ImportHost, ctx: CallContext, yp: int, wp: int, xp: int, rows: int, cols: int, batch: int
) -> int:
    if (
        min(rows, cols, batch) <= 0
        or rows * cols > MAX_MATMUL_ELEMS
        or (batch * cols > MAX_MATMUL_ELEMS or batch * rows > MAX_MATMUL_ELEMS)
    ):
        raise Fail(Status.EINVAL, f"shape rows={rows} cols={cols} batch={batch}")
    mem = host.mem
    y_range = mem.check_array(yp, batch * rows, "<f4")
    for name, ptr, count in (("w", wp, rows * cols), ("x", xp, batch * cols)):
        if overlaps(y_range, mem.check_array(ptr, count, "<f4")):
            raise Fail(Status.EINVAL, f"y overlaps {name}")
    charge(ctx, host, matmul_work(rows, cols, batch), "matmul_f32")
    w = mem.array(wp, rows * cols, "<f4").reshape(rows, cols)
    x = mem.array(xp, batch * cols, "<f4").reshape(batch, cols)
    y = mem.array(yp, batch * rows, "<f4", writable=True).reshape(batch, rows)
    try:
        done = chunked_matmul(ctx, w, x, y)
    except RealmError as e:
        raise Fail(Status.EINVAL, str(e)) from None
    return 0 if done else int(Status.ECANCELLED)


def imp_attention_f32(
    host: ImportHost, ctx: CallContext, op: int, qp: int, kp: int, vp: int, pp: int,
    n_q: int, n_kv: int, n_heads: int, n_kv_heads: int, head_dim: int,
) -> int:  # fmt: skip
    dims = (n_q, n_kv, n_heads, n_kv_heads, head_dim)
    if (
        min(dims) <= 0
        or head_dim > MAX_HEAD_DIM
        or n_heads % n_kv_heads
        or n_q * n_heads * head_dim > MAX_ATTENTION_ELEMS
        or n_kv * n_kv_heads * head_dim > MAX_ATTENTION_ELEMS
    ):
        raise Fail(Status.EINVAL, f"shape {dims}")
    if n_heads * n_kv > MAX_ATTENTION_QUERY_SCORES or (
        n_kv * (n_heads // n_kv_heads) > MAX_ATTENTION_SCORES
    ):
        raise Fail(Status.ELIMIT, f"shape {dims}: one query's work exceeds the limit")
    mem = host.mem
    q_n, kv_n = n_q * n_heads * head_dim, n_kv * n_kv_heads * head_dim
    out_range = mem.check_array(op, q_n, "<f4")
    for name, ptr, count, dt in (("q", qp, q_n, "<f4"), ("k", kp, kv_n, "<f4"),
                                 ("v", vp, kv_n, "<f4"), ("pos", pp, n_q, "<i4")):  # fmt: skip
        if overlaps(out_range, mem.check_array(ptr, count, dt)):
            raise Fail(Status.EINVAL, f"out overlaps {name}")
    pos = np.array(mem.array(pp, n_q, "<i4"), dtype=np.int32)  # the host's own copy
    if n_q and int(pos.min()) < 0:  # past the cache is fine: the query sees all of it
        raise Fail(Status.EINVAL, "positions must be >= 0")
    charge(ctx, host, attention_work(pos, n_kv, n_heads, head_dim), "attention_f32")
    q = mem.array(qp, q_n, "<f4").reshape(n_q, n_heads, head_dim)
    k = mem.array(kp, kv_n, "<f4").reshape(n_kv, n_kv_heads, head_dim)
    v = mem.array(vp, kv_n, "<f4").reshape(n_kv, n_kv_heads, head_dim)
    out = mem.array(op, q_n, "<f4", writable=True).reshape(n_q, n_heads, head_dim)
    try:
        done = chunked_attention(ctx, q, k, v, pos, out)
    except RealmError as e:
        raise Fail(Status.EINVAL, str(e)) from None
    return 0 if done else int(Status.ECANCELLED)


def imp_pager_hint(
    host: ImportHost, ctx: CallContext, mp: int, ml: int, layer: int, hint: int
) -> int:
    _, model = _model(host, mp, ml)
    if model.pager is None:
        raise Fail(Status.ENOTSUP, "the model is not paged")
    if not 0 <= layer < model.info.n_layers or hint not in (1, 2, 3):
        raise Fail(Status.EINVAL, f"layer {layer} / hint {hint}")
    if hint == 1:
        model.pager.prefetch(layer)
    elif hint == 2:
        model.pager.acquire(layer)
    else:
        model.pager.release(layer)
    return 0


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows a double")
    return value


IMPLEMENTATIONS: Final[dict[str, Callable[..., int]]] = {
    imp.name: globals()[f"imp_{imp.name}"] for imp in HOST_IMPORTS
}


# --- the guard ------------------------------------------------------------------------------------


def guard(host: Any, name: str) -> Callable[..., int]:
    """The function the linker calls for import ``name``: never raises (see module docs).

    ``host`` (an ``ImportHost``, usually a weak proxy of the instance) gives the running
    call with ``host.current_call()`` (None outside a call).
    """
    impl = IMPLEMENTATIONS[name]
    allowed = name in ALWAYS_ALLOWED

    def host_import(*args: int) -> int:
        try:
            ctx = host.current_call()
        except BaseException:  # the instance is gone
            return int(Status.EINTERNAL)
        if ctx is None:  # e.g. from a start function: no call to account it to
            return int(Status.EINTERNAL)
        if ctx.fatal is not None:  # stopped: nothing more until the trap lands
            return int(Status.EBOUNDS)
        mem = None
        try:
            if not allowed and ctx.cancelled():
                ctx.ignored += 1
                if ctx.ignored > MAX_IGNORED_ERRORS:
                    host.stop_guest(ctx, "the guest kept calling after its call was cancelled")
                return int(Status.ECANCELLED)
            mem = host.mem
            mem.pause()  # the guest waits for this import: its memory stays where it is
            return int(impl(host, ctx, *args))
        except Interrupted:
            ctx.record(f"{name}: interrupted: the call was cancelled or its deadline passed")
            return int(Status.ECANCELLED)
        except Stop as e:
            ctx.record(f"{name}: {e}")
            host.stop_guest(ctx, f"{name}: {e}")
            return int(Status.EBOUNDS)
        except Fail as e:
            ctx.record(f"{name}: {e}")
            ctx.ignored += 1
            if ctx.ignored > MAX_IGNORED_ERRORS:
                host.stop_guest(ctx, f"the guest ignored {ctx.ignored} error statuses")
            return int(e.status)
        except BaseException as e:  # never raise into wasmtime
            ctx.record(f"{name}: internal error: {e!r}")
            host.stop_guest(ctx, f"{name}: internal error: {e!r}")
            return int(Status.EINTERNAL)
        finally:
            if mem is not None:
                mem.resume()
            ctx.wasm_since = time.monotonic()  # back to wasm (the CPU share counts from here)

    return host_import


__all__ = ["ALWAYS_ALLOWED", "IMPLEMENTATIONS", "U32", "charge", "escape_text", "guard"]
