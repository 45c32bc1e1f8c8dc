"""Server benchmarks: the WebSocket server's round trip, streaming overhead and many streams.

    python -m benchmarks.server [--quick] [--json] [--json-out FILE] [--threads N]
                                [--only SUBSTRING] [--model PATH]

The server runs in a process of its own, as a deployment runs it: ``open_server`` with the
models and API-key tenants, on 127.0.0.1 port 0. The clients (``realm.client.connect``) run in
this process. The peers run in the server's process too, so that they share its CPU share,
native thread pool and page cache:
    echo       a bare trio-websocket server that sends every message back (the transport's
               floor), driven by a bare trio-websocket client from this process;
    embedded   ``realm.open_runtime(models=...)`` on the same model files with the same tenant
               specs, read with ``rt.stream`` by a task in that process (asked for, and its
               timings returned, over a side connection whose own cost is outside every timing);
    lateness   a task in that event loop sleeps 10 ms in a loop and records how late it wakes
               (``time.monotonic`` stamps, so a window can be asked for from this process).

Models: the server process (and its embedded peer) serves two, made by ``benchmarks.models``'s
helpers and cached beside its files, and every call names one (the ``model`` param):
    small      8 layers, hidden 1024, 16 query heads over 4 KV heads, FFN 2816 (~93 MiB): the
               concurrent case's (100 streams of a 1B model are too slow on a few cores), and
               the stream case's informational rows;
    large      TinyLlama-1.1B's shape (22 layers, hidden 2048, 32/4 heads, FFN 5632; ~985 MiB):
               the stream case's target rows. The server costs a roughly fixed amount of CPU
               per token (well under a millisecond on 2 cores): the target bounds its share of
               a token of a model of real size (~27 ms there); of the small model's ~3 ms
               tokens it is a share no real model sees.
Both are Q8_0 with random weights, and their vocabulary is the test tokenizer's own 587 pieces
without padding: the other suites' TinyLlama-shaped model pads its vocabulary to 32000 with
unused entries, which have no text, and greedy decoding of its random weights picks them, so
its calls stream no token events at all. ``--model PATH``: that one model serves every case.

Every call is ``generate`` with the same short prompt, greedy (``temperature`` 0,
``repeat_penalty`` 1), a fixed ``max_tokens``; the random model does not stop early. A token
event carries a piece of text, so a call streams somewhat fewer events than it samples tokens.

Cases:
    round trip   ``system_health`` on one connection, N calls one after another (blocks of
                 calls alternating with the peer's): p50 (the median column), p99 and min per
                 call. Peer: the same request text through the echo server; ratio = p50 / p50.
    stream       one ``generate`` stream through the server (``AsyncClient.stream``) versus
                 embedded (``rt.stream``), in pairs that run back to back (each path first in
                 every other pair); on the large model (the target), then on the small one
                 (informational: the same figures, not checked). Time to first token: call
                 start to the first token event. Streamed tokens/s: token events after the
                 first / time from the first to the last, as the reader sees them (the
                 runtime's own ``tokens_per_second`` definition). Medians; ratio = the median
                 over the pairs of server / embedded. The note gives the time the server adds
                 per token event (and its share of the embedded path's), the ratio of the two
                 medians and that of each path's best sample (the one the rest of a shared
                 machine disturbed least).
    concurrent   C connections (100; ``--quick``: 20), all opened first, then one ``generate``
                 stream on each, all started together. Each connection is a tenant of its own
                 (API keys): the open server's one tenant runs 2 calls at once and queues 64,
                 so 100 calls of one tenant get OVERLOADED, and the runtime runs at most 8
                 calls at once when fewer than 3 tenants are configured. Every call must end
                 with a result of ``max_tokens`` tokens (or the model's end of generation), its
                 event indices must run 0..n-1 without gaps or repeats, and the events' text
                 must equal the result's. Call latency p50 / p99 (start to result, all rounds
                 pooled), aggregate tokens/s (completion tokens / first start to last result;
                 median of rounds); in the note the batcher's mean batch size, native step
                 time and wall time per step outside it, and the CPU time of both processes
                 per wall second. Peer: the same round embedded, same tenants, in pairs as
                 above; ratio = server / embedded aggregate (median over the pairs of
                 rounds). Each tenant makes one short call first (on its own connection), so
                 that its guest instances exist before any timing.
    lateness     the server process's event loop during the server rounds: p50 (median
                 column), p99, max; peers: the same loop idle just before the rounds, and
                 during the embedded rounds (ratio = p99 / p99).

Targets: one stream of the large model through the server at most 5% slower than embedded
(streamed tokens/s >= 0.95x, time to first token <= 1.05x); every concurrent call complete and
intact.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import numpy as np
import trio
import trio_websocket

import realm
from realm import kernels
from realm.actors import Runtime
from realm.client import connect
from realm.model import load_model
from realm.server import ServerConfig, TenantSpec, hash_key, open_server
from realm.testing._vocab import natural_spm_vocab_size

from ._common import (
    MIB,
    Limit,
    Reporter,
    Result,
    Target,
    Timing,
    argument_parser,
    describe_machine,
    format_seconds,
)
from .models import SEED, TINYLLAMA, ModelShape, _log, ensure_model

SUITE: Final = "server"
CASES: Final = ("round trip", "stream", "concurrent")
# Model names in the server's config; a call picks one with its "model" param.
SMALL: Final = "small"
LARGE: Final = "large"
GIVEN: Final = "bench"  # the one model of a run with --model
WTYPE: Final = "Q8_0"
SMALL_SHAPE: Final = ModelShape(
    n_layers=8,
    n_embd=1024,
    n_heads=16,
    n_kv_heads=4,
    n_ff=2816,
    vocab=natural_spm_vocab_size(),
    context=2048,
)
LARGE_SHAPE: Final = attrs.evolve(TINYLLAMA, vocab=natural_spm_vocab_size())
PROMPT: Final = "Once upon a time"
SOLO: Final = "solo"  # the tenant of the round-trip and stream cases
KEY_PREFIX: Final = "bench-key-"  # a tenant's API key is this + its name
IDLE_SECONDS: Final = 0.05  # pause between samples: spinning pool threads fall asleep
LATENESS_PERIOD: Final = 0.010  # the lateness task's sleep
LATENESS_KEEP: Final = 100_000  # samples kept (over 15 minutes' worth)
START_TIMEOUT: Final = 120.0  # seconds for the server process to load and listen
STOP_TIMEOUT: Final = 20.0
SIDE_MESSAGE_BYTES: Final = 64 * MIB  # replies of the side server (a round's timings)

NOISY_SPREAD: Final = 1.25  # pair ratios' p75 / p25 above this: a target's caveat

# Targets.
STREAM_MAX_SLOWDOWN: Final = 0.05  # server vs embedded, one stream


@attrs.frozen
class Profile:
    rtt_calls: int  # system_health calls (and as many echoes)
    rtt_block: int  # calls per block; blocks alternate between Realm and the echo peer
    stream_reps: int  # samples of each path, alternating, on the target's (large) model
    small_stream_reps: int  # ... on the small model (informational)
    stream_tokens: int  # max_tokens of a stream-case call
    connections: int
    concurrent_tokens: int  # max_tokens of each concurrent call
    concurrent_reps: int  # rounds of each path, alternating
    idle_seconds: float  # the lateness baseline
    round_timeout: float  # a concurrent round that takes longer is cut short (and fails)


FULL: Final = Profile(
    rtt_calls=2000,
    rtt_block=100,
    stream_reps=15,
    small_stream_reps=15,
    stream_tokens=32,
    connections=100,
    concurrent_tokens=16,
    concurrent_reps=2,
    idle_seconds=1.0,
    round_timeout=240.0,
)
QUICK: Final = Profile(
    rtt_calls=400,
    rtt_block=50,
    stream_reps=5,
    small_stream_reps=7,
    stream_tokens=24,
    connections=20,
    concurrent_tokens=16,
    concurrent_reps=1,
    idle_seconds=0.5,
    round_timeout=60.0,
)


def gen_params(model: str, max_tokens: int) -> dict[str, Any]:
    """Greedy, no penalties: both paths produce the same tokens."""
    return {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,
    }


def tenant_names(n: int) -> list[str]:
    return [f"t{i:03d}" for i in range(n)]


def api_key(tenant: str) -> str:
    return KEY_PREFIX + tenant


def tenant_specs(n: int) -> dict[str, TenantSpec]:
    """``SOLO`` and ``n`` more tenants, default limits, one API key each."""
    return {
        name: TenantSpec(name=name, api_key_hashes=(hash_key(api_key(name)),))
        for name in [SOLO, *tenant_names(n)]
    }


# --- statistics ----------------------------------------------------------------------------


def percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else math.nan


_NO_TIMING: Final = Timing(math.nan, math.nan, 0, 1)


def _timing(xs: Sequence[float]) -> Timing:
    return Timing(statistics.median(xs), min(xs), len(xs), 1) if xs else _NO_TIMING


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs and not any(math.isnan(x) for x in xs) else math.nan


def pair_order(i: int) -> tuple[str, str]:
    """Which path runs first in the ``i``-th pair: they take turns (ABBA), because a pair's
    first and second run can differ for reasons of their own (which one meets the other's
    leftovers: sleeping pool threads, cold caches, a batch still forming)."""
    return ("embedded", "server") if i % 2 == 0 else ("server", "embedded")


def pair_ratios(emb: Sequence[Any], srv: Sequence[Any], key: str) -> list[float]:
    """Server / embedded ``key`` of each pair: a pair runs back to back, so a machine that
    drifts during the case moves both of it alike."""
    return [getattr(s, key) / getattr(e, key) for e, s in zip(emb, srv, strict=True)]


def paired_ratio(emb: Sequence[Any], srv: Sequence[Any], key: str) -> float:
    """The median of :func:`pair_ratios`."""
    return _median(pair_ratios(emb, srv, key))


def spread_caveat(ratios: Sequence[float]) -> str:
    """Why a median of pair ratios may not be trusted: their middle half is wide."""
    p25, p75 = percentile(ratios, 25), percentile(ratios, 75)
    if len(ratios) > 1 and p75 / p25 > NOISY_SPREAD:
        return f"pair ratios vary: middle half {p25:.2f}-{p75:.2f} (noisy machine)"
    return ""


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


# --- streams -------------------------------------------------------------------------------


@attrs.frozen
class StreamRun:
    """One streamed ``generate`` call as its reader saw it (``time.perf_counter`` times of the
    reader's process)."""

    start: float
    end: float
    token_times: tuple[float, ...]
    indices: tuple[Any, ...]
    pieces: tuple[str, ...]
    result: dict[str, Any] | None
    error: str = ""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StreamRun:
        return cls(
            start=d["start"],
            end=d["end"],
            token_times=tuple(d["token_times"]),
            indices=tuple(d["indices"]),
            pieces=tuple(d["pieces"]),
            result=d["result"],
            error=d["error"],
        )

    @property
    def events(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start if self.token_times else math.nan

    @property
    def rate(self) -> float:
        """Token events after the first per second after the first."""
        n, times = self.events, self.token_times
        return (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else math.nan

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def completion_tokens(self) -> int:
        usage = (self.result or {}).get("usage") or {}
        return int(usage.get("completion_tokens") or 0)

    @property
    def text(self) -> str | None:
        return None if self.result is None else self.result.get("text")

    @property
    def lost(self) -> int:
        """Indices missing below the highest one seen (gaps in the stream)."""
        seen = {i for i in self.indices if isinstance(i, int)}
        return max(seen) + 1 - len(seen) if seen else 0

    @property
    def duplicated(self) -> int:
        return len(self.indices) - len(set(self.indices))

    @property
    def text_matches(self) -> bool:
        return "".join(self.pieces) == self.text

    def problem(self, max_tokens: int) -> str:
        """Why this call does not count as complete and intact ("" if it does)."""
        if self.error:
            return self.error
        if self.result is None:
            return "no result"
        finish = self.result.get("finish_reason")
        if self.completion_tokens != max_tokens and finish != "stop":  # "stop": the model's EOS
            return f"{self.completion_tokens} of {max_tokens} tokens (finish {finish!r})"
        if list(self.indices) != list(range(self.events)):
            return f"indices not 0..n-1: {self.lost} lost, {self.duplicated} duplicated"
        if not self.text_matches:
            return "streamed text differs from the result's"
        return ""


async def read_stream(events: AsyncIterator[Any], start: float) -> StreamRun:
    """Read token events and the result (either path's events: ``kind`` and ``data``)."""
    times: list[float] = []
    indices: list[Any] = []
    pieces: list[str] = []
    result = None
    async for ev in events:
        now = time.perf_counter()
        if ev.kind == "token":
            times.append(now)
            indices.append(ev.data.get("index"))
            pieces.append(ev.data.get("token", ""))
        elif ev.kind == "result":
            result = ev.data
    return StreamRun(
        start, time.perf_counter(), tuple(times), tuple(indices), tuple(pieces), result
    )


async def embedded_stream(rt: Runtime, tenant: str, params: dict[str, Any]) -> StreamRun:
    start = time.perf_counter()
    try:
        async with rt.stream(tenant, "generate", params) as events:
            return await read_stream(events, start)
    except Exception as e:  # counted as an incomplete call
        return _failed(start, e)


async def client_stream(client: Any, params: dict[str, Any]) -> StreamRun:
    start = time.perf_counter()
    try:
        async with client.stream("generate", params) as events:
            return await read_stream(events, start)
    except Exception as e:
        return _failed(start, e)


def _failed(start: float, e: BaseException) -> StreamRun:
    return StreamRun(start, time.perf_counter(), (), (), (), None, f"{type(e).__name__}: {e}")


@attrs.frozen
class Round:
    """C streams started together, and what the runtime's process did meanwhile."""

    runs: tuple[StreamRun, ...]
    connect_seconds: tuple[float, ...]  # empty for an embedded round
    lateness: tuple[float, ...]  # the server process's event loop during the round
    batcher: dict[str, float]  # over the round: steps, mean batch size, step seconds
    server_cpu: float  # CPU seconds of the server process (all its threads) during the round
    client_cpu: float  # ... of this process (0 for an embedded round)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Round:
        return cls(
            runs=tuple(StreamRun.from_json(r) for r in d["runs"]),
            connect_seconds=tuple(d["connect_seconds"]),
            lateness=tuple(d["lateness"]),
            batcher=d["batcher"],
            server_cpu=d["server_cpu"],
            client_cpu=d["client_cpu"],
        )

    @property
    def window(self) -> float:
        return max(r.end for r in self.runs) - min(r.start for r in self.runs)

    @property
    def aggregate(self) -> float:
        return sum(r.completion_tokens for r in self.runs) / self.window

    @property
    def gap_per_step(self) -> float:
        """Wall time per batcher step outside the native step (guests, thread hops, I/O)."""
        steps, step = self.batcher["steps"], self.batcher["step_seconds"]
        return (self.window - steps * step) / steps if steps else math.nan


def batcher_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Batcher steps, mean batch size and mean step seconds between two statistics."""
    steps = after["steps"] - before["steps"]
    seqs = after["sequences"] - before["sequences"]
    busy = (after["step_seconds_mean"] or 0.0) * after["steps"] - (
        before["step_seconds_mean"] or 0.0
    ) * before["steps"]
    return {
        "steps": steps,
        "mean_batch_size": seqs / steps if steps else math.nan,
        "step_seconds": busy / steps if steps else math.nan,
    }


# --- the server process --------------------------------------------------------------------


@attrs.frozen
class ServedModel:
    """A model the server process serves, under the name calls give as their ``model``."""

    name: str
    path: Path
    wtype: str  # the file's weight type, e.g. "Q8_0"
    described: str  # its shape and size, for the report

    @classmethod
    def load(cls, name: str, path: Path, *, generated: bool) -> ServedModel:
        """Read the file's header; ``generated``: made by ``benchmarks.models`` (random)."""
        model = load_model(path)
        info = model.info
        model.close()
        described = (
            f"{path} ({info.arch}, {info.n_layers} layers, n_embd {info.n_embd}, heads "
            f"{info.n_heads}/{info.n_kv_heads}, n_ff {info.n_ff}, vocab {info.vocab_size}, "
            f"{info.file_type}, {info.n_params / 1e6:.1f}M params, {info.n_bytes / MIB:.0f} MiB"
            + (f", random weights, seed {SEED})" if generated else ")")
        )
        return cls(name, path, info.file_type, described)


def served_models(small: ServedModel, large: ServedModel) -> list[ServedModel]:
    """The server process's models, each once; the first is its default model."""
    return [small] if large == small else [small, large]


@attrs.define(eq=False)
class LatenessMonitor:
    """A task that sleeps ``LATENESS_PERIOD`` in a loop and records how late it wakes.

    Samples are ``(time.monotonic() at the wake-up, seconds late)``; ``CLOCK_MONOTONIC`` is
    the same in every process, so another process can ask for a window of its own times.
    """

    samples: deque[tuple[float, float]] = attrs.field(factory=lambda: deque(maxlen=LATENESS_KEEP))

    async def run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await trio.sleep(LATENESS_PERIOD)
            late = time.perf_counter() - t0 - LATENESS_PERIOD
            self.samples.append((time.monotonic(), late))

    def window(self, start: float, end: float) -> list[float]:
        return [late for t, late in self.samples if start <= t <= end]


@attrs.define(eq=False)
class SideServer:
    """The server process's side server (paths ``/echo``, ``/lateness``, ``/embedded``)."""

    monitor: LatenessMonitor
    rt: Runtime

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            if request.path == "/echo":
                while True:
                    await ws.send_message(await ws.get_message())
            while True:
                query = json.loads(await ws.get_message())
                if request.path == "/lateness":
                    reply: Any = self.monitor.window(query["from"], query["to"])
                elif query["op"] == "cpu":
                    reply = {"cpu": time.process_time()}
                elif query["op"] == "stream":
                    run = await embedded_stream(self.rt, query["tenant"], query["params"])
                    reply = attrs.asdict(run)
                else:
                    reply = await self.round(query["tenants"], query["params"], query["timeout"])
                await ws.send_message(json.dumps(reply))
        except trio_websocket.ConnectionClosed:
            pass

    async def round(
        self, tenants: list[str], params: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """C embedded streams started together (cut short after ``timeout`` seconds)."""
        runs: list[StreamRun | None] = [None] * len(tenants)

        async def one(i: int) -> None:
            runs[i] = await embedded_stream(self.rt, tenants[i], params)

        before = attrs.asdict(self.rt.statistics().batcher)
        t_start, cpu = time.monotonic(), time.process_time()
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for i in range(len(tenants)):
                    nursery.start_soon(one, i)
        t_end, cpu = time.monotonic(), time.process_time() - cpu
        after = attrs.asdict(self.rt.statistics().batcher)
        now = time.perf_counter()
        done = [r if r is not None else _failed(now, TimeoutError("cut short")) for r in runs]
        return {
            "runs": [attrs.asdict(r) for r in done],
            "connect_seconds": [],
            "lateness": self.monitor.window(t_start, t_end),
            "batcher": batcher_delta(before, after),
            "server_cpu": cpu,
            "client_cpu": 0.0,
        }


async def _serve_child(spec: dict[str, Any]) -> None:
    models: dict[str, str] = spec["models"]  # name -> path; the first is the default
    tenants = tenant_specs(spec["tenants"])
    config = ServerConfig(models=models, tenants=tenants, port=0)
    runtime_tenants = {n: t.runtime_spec() for n, t in tenants.items()}
    monitor = LatenessMonitor()
    async with (
        open_server(config) as server,
        realm.open_runtime(models=models, tenants=runtime_tenants) as rt,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(monitor.run)
        side = SideServer(monitor, rt)
        listener = await nursery.start(
            trio_websocket.serve_websocket, side.handle, "127.0.0.1", 0, None
        )
        info = {
            "url": server.url,
            "side_url": f"ws://127.0.0.1:{listener.port}",
            "pid": os.getpid(),
        }
        print(json.dumps(info), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        while await stdin.receive_some():  # until the parent closes our stdin
            pass
        nursery.cancel_scope.cancel()


def serve_child(spec_json: str) -> int:
    """Entry point of the server process (``--serve-child SPEC``)."""
    spec = json.loads(spec_json)
    kernels.set_threads(spec["threads"])
    trio.run(_serve_child, spec)
    return 0


@attrs.frozen
class ServerProcess:
    """This process's handle on the server process."""

    pid: int
    url: str
    side_url: str

    @contextlib.asynccontextmanager
    async def side(self, path: str) -> AsyncIterator[Any]:
        """A function sending a JSON query to the side server's ``path`` and returning the
        reply."""
        async with trio_websocket.open_websocket_url(
            self.side_url + path, max_message_size=SIDE_MESSAGE_BYTES
        ) as ws:

            async def ask(query: dict[str, Any]) -> Any:
                await ws.send_message(json.dumps(query))
                return json.loads(await ws.get_message())

            yield ask

    async def lateness(self, start: float, end: float) -> list[float]:
        async with self.side("/lateness") as ask:
            return list(await ask({"from": start, "to": end}))


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await stream.receive_some()
        if not chunk:
            raise RuntimeError(f"the server process exited before it listened ({buf!r})")
        buf += chunk
    return buf


@contextlib.asynccontextmanager
async def open_server_process(
    models: Sequence[ServedModel], threads: int, tenants: int
) -> AsyncIterator[ServerProcess]:
    """Start the server process; closing its stdin at the end makes it shut down gracefully."""
    spec = {
        "models": {m.name: str(m.path) for m in models},
        "threads": threads,
        "tenants": tenants,
    }
    root = Path(__file__).resolve().parents[1]
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", f"benchmarks.{SUITE}", "--serve-child", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=root,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        with trio.fail_after(START_TIMEOUT):
            info = json.loads(await _read_line(proc.stdout))
        yield ServerProcess(int(info["pid"]), info["url"], info["side_url"])
    finally:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await proc.stdin.aclose()
            with trio.move_on_after(STOP_TIMEOUT):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


# --- cases ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class Bench:
    profile: Profile
    threads: int
    reporter: Any  # a Reporter, or a _Tee of two
    server: ServerProcess
    small: ServedModel  # the concurrent case's, and the stream case's informational rows
    large: ServedModel  # the stream case's target (with --model, both are the one model)
    results: list[Result] = attrs.field(factory=list)
    values: dict[str, float] = attrs.field(factory=dict)  # read by the targets
    caveats: dict[str, str] = attrs.field(factory=dict)  # the targets' caveats, by value key

    def emit(
        self,
        case: str,
        kernel: str,
        shape: str,
        timing: Timing,
        *,
        model: ServedModel | None = None,
        **kw: Any,
    ) -> None:
        """Report a row; keywords that are not ``Result`` fields go to its ``extra``. A row
        measured on a model names it: its note begins with the name, and ``extra["model"]``."""
        fields = {f.name for f in attrs.fields(Result)}
        own = {k: v for k, v in kw.items() if k in fields}
        extra = {k: v for k, v in kw.items() if k not in fields}
        if model is not None:
            own["wtype"] = model.wtype
            own["note"] = f"{model.name}: {own.get('note', '')}"
            extra["model"] = model.name
        own.setdefault("wtype", "-")
        own.setdefault("batch", 1)
        r = Result(
            case=case, kernel=kernel, shape=shape, threads=self.threads, timing=timing,
            extra=extra, **own,
        )  # fmt: skip
        self.results.append(r)
        self.reporter.result(r)


async def round_trip(b: Bench) -> None:
    p = b.profile
    request = json.dumps({"type": "call", "id": "c1", "function": "system_health", "params": {}})
    realm_s: list[float] = []
    echo_s: list[float] = []
    async with (
        connect(b.server.url, api_key=api_key(SOLO)) as client,
        trio_websocket.open_websocket_url(b.server.side_url + "/echo") as ws,
    ):

        async def realm_block(n: int, out: list[float]) -> None:
            for _ in range(n):
                t0 = time.perf_counter()
                await client.call("system_health")
                out.append(time.perf_counter() - t0)

        async def echo_block(n: int, out: list[float]) -> None:
            for _ in range(n):
                t0 = time.perf_counter()
                await ws.send_message(request)
                reply = await ws.get_message()
                out.append(time.perf_counter() - t0)
                assert reply == request

        health = await client.call("system_health")
        await realm_block(p.rtt_block, [])  # warm-up
        await echo_block(p.rtt_block, [])
        while len(realm_s) < p.rtt_calls:
            await realm_block(p.rtt_block, realm_s)
            await echo_block(p.rtt_block, echo_s)
    reply_bytes = len(json.dumps({"type": "result", "id": "c1", "data": health}))
    e50, e99 = percentile(echo_s, 50), percentile(echo_s, 99)
    r50, r99 = percentile(realm_s, 50), percentile(realm_s, 99)
    shape = f"{len(realm_s)} calls"
    b.emit(
        "round trip",
        "ws echo",
        shape,
        _timing(echo_s),
        record="limit",
        note=f"p99 {_ms(e99)}; bare trio-websocket client and server, the same {len(request)} B "
        "text both ways",
        p50_seconds=e50,
        p99_seconds=e99,
        max_seconds=max(echo_s),
        message_bytes=len(request),
    )
    b.emit(
        "round trip",
        "system_health",
        shape,
        _timing(realm_s),
        rate=1.0 / r50,
        unit="call/s",
        limit=Limit("bare trio-websocket echo round trip (interleaved)", "echo", e50, "s"),
        ratio=r50 / e50,
        note=f"p99 {_ms(r99)} ({r99 / e99:.2f}x echo p99); realm.client, {len(request)} B "
        f"request, {reply_bytes} B reply",
        p50_seconds=r50,
        p99_seconds=r99,
        max_seconds=max(realm_s),
        p99_ratio=r99 / e99,
        request_bytes=len(request),
        reply_bytes=reply_bytes,
    )


async def stream(b: Bench) -> None:
    """The target on the large model; then the same figures on the small one, informational."""
    await stream_on(b, b.large, b.profile.stream_reps, target=True)
    if b.small != b.large:
        await stream_on(b, b.small, b.profile.small_stream_reps, target=False)


async def stream_on(b: Bench, model: ServedModel, reps: int, *, target: bool) -> None:
    """``reps`` pairs of one stream through the server and one embedded, on ``model``;
    ``target``: the targets check these rows (else their notes say they are informational)."""
    p = b.profile
    params = gen_params(model.name, p.stream_tokens)
    emb: list[StreamRun] = []
    srv: list[StreamRun] = []
    async with (
        connect(b.server.url, api_key=api_key(SOLO)) as client,
        b.server.side("/embedded") as ask,
    ):

        async def embedded() -> StreamRun:
            return StreamRun.from_json(
                await ask({"op": "stream", "tenant": SOLO, "params": params})
            )

        # warm-up: the tenant's actors and guest instances, the model's pages, both paths
        await embedded()
        await client_stream(client, params)
        for i in range(reps):
            for path in pair_order(i):
                if path == "embedded":
                    emb.append(await embedded())
                else:
                    srv.append(await client_stream(client, params))
                await trio.sleep(IDLE_SECONDS)
    runs = emb + srv
    problems = sorted({r.problem(p.stream_tokens) for r in runs} - {""})
    if not problems and len({r.text for r in runs}) != 1:
        problems = ["the two paths' texts differ"]
    if not problems and any(r.events < 2 for r in runs):
        problems = ["fewer than 2 token events per call: the model streams (almost) no text"]
    ok = not problems
    role = "" if target else "informational, not a target; "

    def note(text: str) -> str:
        return role + ("; ".join(problems) or text)

    e_rate, s_rate = _median([r.rate for r in emb]), _median([r.rate for r in srv])
    e_ttft, s_ttft = _median([r.ttft for r in emb]), _median([r.ttft for r in srv])
    e_lat, s_lat = _median([r.latency for r in emb]), _median([r.latency for r in srv])
    rate_ratio, ttft_ratio = paired_ratio(emb, srv, "rate"), paired_ratio(emb, srv, "ttft")
    added = 1 / s_rate - 1 / e_rate  # seconds the server adds per token event
    # the best sample of each path: the one the rest of the machine disturbed least
    best_rate = max(r.rate for r in srv) / max(r.rate for r in emb) if ok else math.nan
    best_ttft = min(r.ttft for r in srv) / min(r.ttft for r in emb) if ok else math.nan
    if target:
        b.values["stream_rate_ratio"] = rate_ratio if ok else math.nan
        b.values["stream_ttft_ratio"] = ttft_ratio if ok else math.nan
        if ok:
            b.caveats["stream_rate_ratio"] = spread_caveat(pair_ratios(emb, srv, "rate"))
            b.caveats["stream_ttft_ratio"] = spread_caveat(pair_ratios(emb, srv, "ttft"))
    events = emb[0].events
    prompt_tokens = ((emb[0].result or {}).get("usage") or {}).get("prompt_tokens")
    shape = f"{prompt_tokens}+{p.stream_tokens} tok"

    def per_event(xs: Sequence[StreamRun]) -> Timing:
        return _timing([1.0 / r.rate for r in xs]) if ok else _NO_TIMING

    common = {
        "model": model,
        "ok": ok,
        "target": target,
        "max_tokens": p.stream_tokens,
        "prompt_tokens": prompt_tokens,
        "token_events": events,
    }
    b.emit(
        "stream",
        "rt.stream",
        shape,
        per_event(emb),
        rate=e_rate,
        unit="tok/s",
        record="limit",
        note=note(f"embedded; {events} token events per call; whole call {format_seconds(e_lat)}"),
        rates=[r.rate for r in emb],
        latency_seconds=e_lat,
        **common,
    )
    b.emit(
        "stream",
        "client.stream",
        shape,
        per_event(srv),
        rate=s_rate,
        unit="tok/s",
        limit=Limit("embedded rt.stream tok/s (interleaved)", "embedded", e_rate, "tok/s"),
        ratio=rate_ratio,
        note=note(
            f"through the server: {added * 1e3:+.3f} ms per token event ({added * e_rate:+.1%} "
            f"of the embedded {format_seconds(1 / e_rate)}); ratio of medians "
            f"{s_rate / e_rate:.3f}, of the best samples {best_rate:.3f}; whole call "
            f"{format_seconds(s_lat)} ({s_lat / e_lat:.3f}x embedded)"
        ),
        rates=[r.rate for r in srv],
        pair_ratios=pair_ratios(emb, srv, "rate"),
        latency_seconds=s_lat,
        rate_ratio=rate_ratio,
        rate_ratio_of_medians=s_rate / e_rate,
        rate_ratio_of_best=best_rate,
        added_seconds_per_event=added,
        **common,
    )
    b.emit(
        "stream",
        "rt.stream",
        "time to 1st token",
        _timing([r.ttft for r in emb]),
        record="limit",
        note=note("embedded: call start to first token event"),
        **common,
    )
    b.emit(
        "stream",
        "client.stream",
        "time to 1st token",
        _timing([r.ttft for r in srv]),
        limit=Limit("embedded time to first token (interleaved)", "embedded", e_ttft, "s"),
        ratio=ttft_ratio,
        note=note(
            f"through the server: {(s_ttft - e_ttft) * 1e3:+.2f} ms; ratio of medians "
            f"{s_ttft / e_ttft:.3f}, of the best samples {best_ttft:.3f}"
        ),
        ttft_ratio=ttft_ratio,
        pair_ratios=pair_ratios(emb, srv, "ttft"),
        ttft_ratio_of_medians=s_ttft / e_ttft,
        ttft_ratio_of_best=best_ttft,
        **common,
    )


@attrs.frozen
class Rounds:
    """Every round of one path: calls and lateness pooled, aggregates per round."""

    rounds: tuple[Round, ...]
    max_tokens: int

    @property
    def runs(self) -> list[StreamRun]:
        return [r for rd in self.rounds for r in rd.runs]

    @property
    def calls(self) -> int:
        return len(self.runs)

    @property
    def good(self) -> int:
        return sum(1 for r in self.runs if not r.problem(self.max_tokens))

    @property
    def problems(self) -> list[str]:
        return sorted({r.problem(self.max_tokens) for r in self.runs} - {""})

    @property
    def latencies(self) -> list[float]:
        return [r.latency for r in self.runs if r.result is not None]

    @property
    def aggregate(self) -> float:
        return statistics.median(rd.aggregate for rd in self.rounds)

    @property
    def lateness(self) -> list[float]:
        return [x for rd in self.rounds for x in rd.lateness]

    def batcher(self, key: str) -> float:
        return statistics.median(rd.batcher[key] for rd in self.rounds)

    @property
    def gap_per_step(self) -> float:
        return statistics.median(rd.gap_per_step for rd in self.rounds)

    def cores(self, key: str) -> float:
        """CPU seconds per wall second of a round (``"server_cpu"`` or ``"client_cpu"``)."""
        return statistics.median(getattr(rd, key) / rd.window for rd in self.rounds)

    def row_fields(self, n: int) -> dict[str, Any]:
        """The fields of a result row both paths share."""
        lat = self.latencies
        return {
            "batch": n,
            "rate": self.aggregate,
            "unit": "tok/s",
            "ok": self.good == self.calls,
            "calls": self.calls,
            "complete": self.good,
            "problems": self.problems,
            "p50_seconds": percentile(lat, 50),
            "p99_seconds": percentile(lat, 99),
            "aggregate_tok_s": self.aggregate,
            "aggregate_runs": [rd.aggregate for rd in self.rounds],
            "mean_batch_size": self.batcher("mean_batch_size"),
            "step_seconds": self.batcher("step_seconds"),
            "gap_per_step_seconds": self.gap_per_step,
            "server_process_cores": self.cores("server_cpu"),
            "client_process_cores": self.cores("client_cpu"),
        }

    def batcher_note(self) -> str:
        return (
            f"mean batch {self.batcher('mean_batch_size'):.1f}, native step "
            f"{format_seconds(self.batcher('step_seconds'))} + "
            f"{format_seconds(self.gap_per_step)} outside it; CPU: server process "
            f"{self.cores('server_cpu'):.2f} cores, client {self.cores('client_cpu'):.2f}"
        )


async def warm_up_tenants(b: Bench, names: Sequence[str]) -> None:
    """One short call per tenant, each on its own connection, so that every tenant's actor and
    guest instance exists (the embedded runtime's too)."""
    params = gen_params(b.small.name, 1)

    async def one(name: str) -> None:
        async with connect(b.server.url, api_key=api_key(name)) as c:
            await c.call("generate", params)

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(one, name)
    async with b.server.side("/embedded") as ask:
        await ask({"op": "round", "tenants": list(names), "params": params, "timeout": 600})


async def server_round(b: Bench, names: Sequence[str], params: dict[str, Any], ask: Any) -> Round:
    """One connection per tenant, all opened first; then one stream on each, all at once.
    ``ask`` queries the side server (for the server process's CPU time)."""
    n = len(names)
    runs: list[StreamRun | None] = [None] * n
    connect_s: list[float] = [math.nan] * n
    ready = 0
    all_ready = trio.Event()
    go = trio.Event()

    def count_ready() -> None:
        nonlocal ready
        ready += 1
        if ready == n:
            all_ready.set()

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            async with connect(b.server.url, api_key=api_key(names[i])) as c:
                connect_s[i] = time.perf_counter() - t0
                count_ready()
                await go.wait()
                runs[i] = await client_stream(c, params)
        except Exception as e:  # the connection failed
            if runs[i] is None:
                runs[i] = _failed(t0, e)
            if math.isnan(connect_s[i]):
                count_ready()

    async with connect(b.server.url, api_key=api_key(SOLO)) as metrics:
        before = (await metrics.call("system_metrics"))["batcher"]
        t_start = t_end = time.monotonic()
        with trio.move_on_after(b.profile.round_timeout):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
                await all_ready.wait()
                server_cpu = (await ask({"op": "cpu"}))["cpu"]
                t_start, client_cpu = time.monotonic(), time.process_time()
                go.set()
            t_end, client_cpu = time.monotonic(), time.process_time() - client_cpu
            server_cpu = (await ask({"op": "cpu"}))["cpu"] - server_cpu
        after = (await metrics.call("system_metrics"))["batcher"]
    lateness = await b.server.lateness(t_start, t_end)
    now = time.perf_counter()
    done = [r if r is not None else _failed(now, TimeoutError("cut short")) for r in runs]
    return Round(
        tuple(done),
        tuple(connect_s),
        tuple(lateness),
        batcher_delta(before, after),
        server_cpu,
        client_cpu,
    )


async def concurrent(b: Bench) -> None:
    p = b.profile
    n, mt = p.connections, p.concurrent_tokens
    names = tenant_names(n)
    params = gen_params(b.small.name, mt)
    await warm_up_tenants(b, names)
    t_idle = time.monotonic()
    await trio.sleep(p.idle_seconds)
    idle = await b.server.lateness(t_idle, time.monotonic())
    srv_rounds: list[Round] = []
    emb_rounds: list[Round] = []
    async with b.server.side("/embedded") as ask:
        for i in range(p.concurrent_reps):
            for path in pair_order(i):
                if path == "embedded":
                    query = {"op": "round", "tenants": names, "params": params}
                    reply = await ask({**query, "timeout": p.round_timeout})
                    emb_rounds.append(Round.from_json(reply))
                else:
                    srv_rounds.append(await server_round(b, names, params, ask))
                await trio.sleep(IDLE_SECONDS)
    srv, emb = Rounds(tuple(srv_rounds), mt), Rounds(tuple(emb_rounds), mt)

    runs = srv.runs
    lost = sum(r.lost for r in runs)
    dup = sum(r.duplicated for r in runs)
    mismatched = sum(1 for r in runs if r.result is not None and not r.text_matches)
    connects = [s for rd in srv.rounds for s in rd.connect_seconds if not math.isnan(s)]
    b.values["concurrent_good"] = srv.good / srv.calls
    shape = f"{n} conns x {mt} tok"
    reps = f"{p.concurrent_reps} round{'s' if p.concurrent_reps > 1 else ''}"
    b.emit(
        "concurrent",
        "rt.stream",
        shape,
        _timing(emb.latencies),
        record="limit",
        note=f"embedded, same tenants, {reps}: {emb.good}/{emb.calls} complete and intact; "
        f"latency p99 {format_seconds(percentile(emb.latencies, 99))}; {emb.batcher_note()}",
        model=b.small,
        **emb.row_fields(n),
    )
    note = (
        f"{srv.good}/{srv.calls} complete and intact ({lost} events lost, {dup} duplicated, "
        f"{mismatched} text mismatches) over {reps}; latency p99 "
        f"{format_seconds(percentile(srv.latencies, 99))}; connect p50 / p99 "
        f"{_ms(percentile(connects, 50))} / {_ms(percentile(connects, 99))}; "
        f"{srv.batcher_note()}"
    )
    if srv.problems:
        note += "; problems: " + "; ".join(srv.problems[:3])
    b.emit(
        "concurrent",
        "client.stream",
        shape,
        _timing(srv.latencies),
        limit=Limit("embedded aggregate tok/s (alternating rounds)", "embedded", emb.aggregate,
                    "tok/s"),
        ratio=paired_ratio(emb.rounds, srv.rounds, "aggregate"),
        note=note,
        lost_events=lost,
        duplicated_events=dup,
        text_mismatches=mismatched,
        connect_p50_seconds=percentile(connects, 50),
        connect_p99_seconds=percentile(connects, 99),
        distinct_texts=len({r.text for r in runs if r.text is not None}),
        model=b.small,
        **srv.row_fields(n),
    )  # fmt: skip
    emb_p99 = percentile(emb.lateness, 99)
    for kernel, where, values, batch in (
        ("loop idle", "idle, just before the rounds", idle, 0),
        ("loop serving", "during the server rounds", srv.lateness, n),
        ("loop embedded", "during the embedded rounds", emb.lateness, n),
    ):
        p99 = percentile(values, 99)
        serving = kernel == "loop serving"
        b.emit(
            "lateness",
            kernel,
            f"sleep {LATENESS_PERIOD * 1e3:g} ms",
            _timing(values),
            model=b.small if batch else None,  # the idle loop ran no model
            batch=batch,
            limit=Limit("p99 lateness, embedded rounds", "emb p99", emb_p99, "s")
            if serving
            else None,
            ratio=p99 / emb_p99 if serving else None,
            record="result" if serving else "limit",
            note=f"server process's event loop {where}: p99 {_ms(p99)}, max "
            f"{_ms(max(values, default=math.nan))} over {len(values)} wake-ups",
            p50_seconds=percentile(values, 50),
            p99_seconds=p99,
            max_seconds=max(values, default=math.nan),
            wakeups=len(values),
        )


# --- main ----------------------------------------------------------------------------------


class _Tee:
    """Hands every record to several reporters (the table, and JSON lines into a file)."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def __getattr__(self, name: str) -> Any:
        def each(*args: Any, **kw: Any) -> None:
            for r in self.reporters:
                getattr(r, name)(*args, **kw)

        return each


def targets(b: Bench, ran: set[str]) -> list[Target]:
    out: list[Target] = []
    if "stream" in ran:
        out += [
            Target(
                f"one stream on {b.large.name}, server / embedded streamed tok/s",
                b.values.get("stream_rate_ratio"),
                ">=",
                1.0 - STREAM_MAX_SLOWDOWN,
                b.caveats.get("stream_rate_ratio", ""),
            ),
            Target(
                f"one stream on {b.large.name}, server / embedded time to first token",
                b.values.get("stream_ttft_ratio"),
                "<=",
                1.0 + STREAM_MAX_SLOWDOWN,
                b.caveats.get("stream_ttft_ratio", ""),
            ),
        ]
    if "concurrent" in ran:
        out.append(
            Target(
                f"{b.profile.connections} concurrent streams: complete and intact / calls",
                b.values.get("concurrent_good"),
                ">=",
                1.0,
            )
        )
    return out


async def run(
    profile: Profile,
    threads: int,
    reporter: Any,
    selected: set[str],
    small: ServedModel,
    large: ServedModel,
) -> Bench:
    models = served_models(small, large)
    async with open_server_process(models, threads, profile.connections) as server:
        b = Bench(profile, threads, reporter, server, small, large)
        reporter.text(f"server process {server.pid} at {server.url}; side server {server.side_url}")
        for case, fn in (
            ("round trip", round_trip),
            ("stream", stream),
            ("concurrent", concurrent),
        ):
            if case not in selected:
                continue
            reporter.section(case)
            try:
                await fn(b)
            except Exception as e:  # the server may be mid-change: report, go on
                reporter.error(case, f"{type(e).__name__}: {e!r}")
    return b


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(SUITE, __doc__.splitlines()[0] if __doc__ else SUITE)
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="PATH",
        help="a GGUF model (default: the suite's small random llama, written once and cached)",
    )
    parser.add_argument(
        "--json-out",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the JSON lines to FILE (the table still goes to stdout)",
    )
    parser.add_argument("--serve-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_child is not None:
        return serve_child(args.serve_child)
    selected = {c for c in CASES if args.only is None or args.only in c}
    if not selected:
        parser.error(f"no case name contains {args.only!r}; names: {', '.join(CASES)}")

    threads = kernels.set_threads(args.threads)
    profile = QUICK if args.quick else FULL
    if args.model is not None:
        small = large = ServedModel.load(GIVEN, args.model, generated=False)
    else:
        small, large = (
            ServedModel.load(name, ensure_model(shape, WTYPE, SEED, _log), generated=True)
            for name, shape in ((SMALL, SMALL_SHAPE), (LARGE, LARGE_SHAPE))
        )
    models = served_models(small, large)

    reporters = [Reporter(json_lines=args.json)]
    with contextlib.ExitStack() as stack:
        if args.json_out is not None:
            out = stack.enter_context(open(args.json_out, "w", encoding="utf-8"))
            reporters.append(Reporter(json_lines=True, out=out))
        reporter: Any = reporters[0] if len(reporters) == 1 else _Tee(*reporters)
        stream_runs = f"{profile.stream_reps} samples per path on {large.name}" + (
            "" if large == small else f" (target), {profile.small_stream_reps} on {small.name}"
        )
        settings = {
            "quick": args.quick,
            "only": args.only,
            **{f"model {m.name}": m.described for m in models},
            "prompt": repr(PROMPT),
            "sampling": "greedy (temperature 0, repeat_penalty 1)",
            "round trip": f"{profile.rtt_calls} calls in blocks of {profile.rtt_block}",
            "stream": f"{stream_runs}, max_tokens {profile.stream_tokens}",
            "concurrent": f"{profile.connections} connections x {profile.concurrent_reps} "
            f"rounds on {small.name}, max_tokens {profile.concurrent_tokens}",
        }
        reporter.machine(describe_machine(SUITE, threads, settings, numpy_limit=False))
        for m in models:
            reporter.text(f"model {m.name}: {m.described}")
        b = trio.run(run, profile, threads, reporter, selected, small, large)
        reporter.text("")
        reporter.text(
            "median/min: round trip per call (median = p50); stream per token event (rate = "
            "token events after the first / s) and to the first token; concurrent per call, "
            "start to result (rate = completion tokens of a round / its wall time, median of "
            "rounds); lateness per wake-up of a 10 ms sleep. ratio = server / peer."
        )
        reporter.targets(targets(b, selected))
        reporter.end()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
