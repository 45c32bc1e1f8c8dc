"""HTTP benchmarks: OpenAI-compatible SSE streams against the WebSocket path, the embedded
runtime and llama-cpp-python's own OpenAI-compatible server.

    python -m benchmarks.http [--quick] [--json] [--json-out FILE] [--threads N] [--isa LEVEL]
                              [--only SUBSTRING] [--model PATH]

Model: a real published GGUF file, SmolLM2-135M-Instruct Q4_1
(``realm.testing.real_models.real_model_path("smollm2-135m")``, the ``[real]`` extra), or
``--model PATH``. Every call is a greedy completion of the same prompt with the same
``max_tokens``.

The Realm server runs in a process of its own (``benchmarks.server``'s server process: the
server on 127.0.0.1 port 0 with API-key tenants, and in the same process an embedded runtime
on the same model with the same tenants, driven over a side connection). The clients run in
this process:
    http        ``POST /v1/completions`` with ``stream: true`` through the official ``openai``
                package (``AsyncOpenAI``, in a worker thread's asyncio loop);
    websocket   ``generate`` through ``realm.client`` (protocol v1 on the same port);
    embedded    ``rt.stream`` in the server's process (no transport at all);
    llama.cpp   llama-cpp-python's server (``python -m llama_cpp.server --model F --n_threads
                T --port P --interrupt_requests False``: concurrent requests wait their turn
                instead of cutting the running stream short; the ``[bench]`` extra's
                ``llama-cpp-python[server]``) on the same file with the same threads, started
                for its rows only and driven by the same ``openai`` client code. It is skipped,
                and its target not measured, when ``llama_cpp.server`` cannot be imported.

Cases:
    stream      one stream at a time, the paths in turn (rotated, so none always runs first):
                time to first token (request start to the first token chunk) and streamed
                tokens/s (token chunks after the first / time from the first to the last, as
                the reader sees them). Medians; ratio = the median over the rounds of
                http / websocket (and http / embedded in the note).
    concurrent  8 streams started together (8 tenants, one key each), through HTTP, then
                through llama.cpp's server; aggregate tokens/s = completion tokens of the round
                / its wall time (median of rounds); ratio = Realm / llama.cpp.

Targets: one HTTP stream's tokens/s >= 0.97x the WebSocket path's; 8 concurrent HTTP streams'
aggregate tokens/s >= 3x llama.cpp's server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from realm import kernels
from realm.client import connect

from ._common import Reporter, Result, Target, Timing, argument_parser, describe_machine
from .server import (
    SOLO,
    ServedModel,
    ServerProcess,
    StreamRun,
    _median,
    _Tee,
    _timing,
    api_key,
    client_stream,
    open_server_process,
    spread_caveat,
    tenant_names,
)

SUITE: Final = "http"
CASES: Final = ("stream", "concurrent")
NAME: Final = "bench"  # the model's name in the server's config
PROMPT: Final = "Once upon a time"
CONCURRENT: Final = 8  # streams of the concurrent case
PEER_START_TIMEOUT: Final = 120.0  # seconds for llama.cpp's server to load and answer
PEER_STOP_TIMEOUT: Final = 10.0
CLIENT_TIMEOUT: Final = 600.0  # the openai client's own timeout per request
IDLE_SECONDS: Final = 0.05  # pause between samples

# Targets.
STREAM_MIN_RATIO: Final = 0.97  # one HTTP stream / the WebSocket path, streamed tokens/s
CONCURRENT_MIN_RATIO: Final = 3.0  # 8 HTTP streams / llama.cpp's server, aggregate tokens/s


@attrs.frozen
class Profile:
    stream_reps: int  # rounds of the stream case (each runs every path once)
    stream_tokens: int
    concurrent_reps: int
    concurrent_tokens: int


FULL: Final = Profile(stream_reps=9, stream_tokens=64, concurrent_reps=3, concurrent_tokens=64)
QUICK: Final = Profile(stream_reps=3, stream_tokens=32, concurrent_reps=1, concurrent_tokens=32)


def completion_params(max_tokens: int) -> dict[str, Any]:
    """The request of every path: greedy, the same prompt and length."""
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}


# --- the openai client (in a worker thread's asyncio loop) --------------------------------------


async def _openai_stream(client: Any, model: str, max_tokens: int) -> dict[str, Any]:
    """One streamed completion as its reader saw it (``time.perf_counter`` times)."""
    start = time.perf_counter()
    times: list[float] = []
    pieces: list[str] = []
    usage = None
    finish = None
    try:
        stream = await client.completions.create(
            model=model, stream=True, stream_options={"include_usage": True},
            **completion_params(max_tokens),
        )  # fmt: skip
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.text:
                    times.append(now)
                    pieces.append(choice.text)
                if choice.finish_reason is not None:
                    finish = choice.finish_reason
    except Exception as e:  # counted as an incomplete call
        return {"start": start, "end": time.perf_counter(), "times": times, "pieces": pieces,
                "usage": usage, "finish": finish, "error": f"{type(e).__name__}: {e}"}  # fmt: skip
    return {"start": start, "end": time.perf_counter(), "times": times, "pieces": pieces,
            "usage": usage, "finish": finish, "error": ""}  # fmt: skip


def _as_run(d: dict[str, Any]) -> StreamRun:
    n = d["usage"] if d["usage"] is not None else len(d["times"])
    result = None if d["error"] else {
        "text": "".join(d["pieces"]), "finish_reason": d["finish"],
        "usage": {"completion_tokens": n},
    }  # fmt: skip
    return StreamRun(
        d["start"], d["end"], tuple(d["times"]), tuple(range(len(d["times"]))),
        tuple(d["pieces"]), result, d["error"],
    )  # fmt: skip


def openai_streams(base_url: str, keys: Sequence[str], model: str, max_tokens: int) -> list[Any]:
    """``len(keys)`` streams started together, one client (and key) each; blocks (run it in a
    worker thread). Returns ``[StreamRun...]`` and the round's wall seconds last."""
    import openai

    async def main() -> list[Any]:
        clients = [
            openai.AsyncOpenAI(base_url=base_url, api_key=k, max_retries=0, timeout=CLIENT_TIMEOUT)
            for k in keys
        ]
        try:
            t0 = time.perf_counter()
            got = await asyncio.gather(*(_openai_stream(c, model, max_tokens) for c in clients))
            wall = time.perf_counter() - t0
        finally:
            for c in clients:
                await c.close()
        return [*(_as_run(d) for d in got), wall]

    return asyncio.run(main())


# --- llama-cpp-python's server -------------------------------------------------------------------


def peer_available() -> str:
    """Why llama.cpp's server cannot run here ("" if it can)."""
    try:
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed (the [bench] extra)"
        if importlib.util.find_spec("llama_cpp.server.app") is None:
            return "llama_cpp.server is missing"
        deps = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
        missing = [m for m in deps if importlib.util.find_spec(m) is None]
    except ImportError as e:
        return f"llama_cpp.server cannot be imported: {e}"
    if missing:
        return f"llama_cpp.server's dependencies are missing ({', '.join(missing)}): " + (
            "install llama-cpp-python[server]"
        )
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@contextlib.asynccontextmanager
async def open_peer(path: Path, threads: int) -> AsyncIterator[str]:
    """llama.cpp's OpenAI-compatible server on ``path``; yields its base URL (``.../v1``)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--n_threads",
           str(threads), "--n_threads_batch", str(threads), "--host", "127.0.0.1",
           "--port", str(port), "--model_alias", NAME,
           # queue concurrent requests (its default cuts a stream short for a new request)
           "--interrupt_requests", "False"]  # fmt: skip
    proc = await trio.lowlevel.open_process(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        with trio.fail_after(PEER_START_TIMEOUT):
            while not await trio.to_thread.run_sync(_answers, base + "/models"):
                if proc.returncode is not None:
                    raise RuntimeError(f"llama.cpp's server exited ({proc.returncode})")
                await trio.sleep(0.5)
        yield base
    finally:
        with trio.CancelScope(shield=True):
            proc.terminate()
            with trio.move_on_after(PEER_STOP_TIMEOUT):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


# --- cases ---------------------------------------------------------------------------------------


@attrs.define(eq=False)
class Bench:
    profile: Profile
    threads: int
    reporter: Any
    server: ServerProcess
    model: ServedModel
    peer: str  # why llama.cpp's server cannot run ("" if it can)
    values: dict[str, float] = attrs.field(factory=dict)
    caveats: dict[str, str] = attrs.field(factory=dict)

    @property
    def http_base(self) -> str:
        return self.server.url.replace("ws://", "http://", 1) + "/v1"

    def emit(
        self, kernel: str, shape: str, timing: Timing, *, case: str = "stream", **kw: Any
    ) -> None:
        """Report a row; keywords that are not ``Result`` fields go to its ``extra``."""
        fields = {f.name for f in attrs.fields(Result)}
        own = {k: v for k, v in kw.items() if k in fields}
        extra = {k: v for k, v in kw.items() if k not in fields}
        own.setdefault("batch", 1)
        r = Result(
            case=case, kernel=kernel, shape=shape, wtype=self.model.wtype,
            threads=self.threads, timing=timing, extra=extra, **own,
        )  # fmt: skip
        self.reporter.result(r)


async def http_stream(b: Bench, base: str, key: str, max_tokens: int) -> StreamRun:
    runs = await trio.to_thread.run_sync(openai_streams, base, [key], NAME, max_tokens)
    return runs[0]


async def websocket_stream(b: Bench, params: dict[str, Any]) -> StreamRun:
    async with connect(b.server.url, api_key=api_key(SOLO)) as client:
        return await client_stream(client, params)


def _rate(runs: Sequence[StreamRun]) -> float:
    return _median([r.rate for r in runs])


def _ttft(runs: Sequence[StreamRun]) -> float:
    return _median([r.ttft for r in runs])


def _problems(runs: Sequence[StreamRun]) -> str:
    bad = [r.error or "no result" for r in runs if r.error or r.result is None]
    return f"; {len(bad)} failed: {bad[0]}" if bad else ""


async def stream(b: Bench) -> None:
    p = b.profile
    params = {"model": NAME, **completion_params(p.stream_tokens)}
    paths = ["http", "websocket", "embedded"] + (["llama.cpp"] if not b.peer else [])
    runs: dict[str, list[StreamRun]] = {k: [] for k in paths}
    peer_stack = contextlib.AsyncExitStack()
    async with peer_stack, b.server.side("/embedded") as ask:
        peer_base = ""
        if not b.peer:
            peer_base = await peer_stack.enter_async_context(open_peer(b.model.path, b.threads))
        # warm-up: each path once, untimed (guest instances, page cache, the peer's first call)
        await http_stream(b, b.http_base, api_key(SOLO), 4)
        await websocket_stream(b, {**params, "max_tokens": 4})
        await ask({"op": "stream", "tenant": SOLO, "params": {**params, "max_tokens": 4}})
        if peer_base:
            await http_stream(b, peer_base, "unused", 4)
        for i in range(p.stream_reps):
            for k in range(len(paths)):
                path = paths[(i + k) % len(paths)]
                await trio.sleep(IDLE_SECONDS)
                if path == "http":
                    run = await http_stream(b, b.http_base, api_key(SOLO), p.stream_tokens)
                elif path == "websocket":
                    run = await websocket_stream(b, params)
                elif path == "embedded":
                    run = StreamRun.from_json(
                        await ask({"op": "stream", "tenant": SOLO, "params": params})
                    )
                else:
                    run = await http_stream(b, peer_base, "unused", p.stream_tokens)
                runs[path].append(run)
    http, ws, emb = runs["http"], runs["websocket"], runs["embedded"]
    pair = [h.rate / w.rate for h, w in zip(http, ws, strict=True)]
    ratio = _median(pair)
    b.values["stream_rate_ratio"] = ratio
    b.caveats["stream_rate_ratio"] = spread_caveat(pair)
    emb_ratio = _median([h.rate / e.rate for h, e in zip(http, emb, strict=True)])
    shape = f"{p.stream_tokens} tokens"
    for path in paths:
        rs = runs[path]
        per_token = _timing([1 / r.rate for r in rs if r.rate == r.rate])
        note = (
            f"time to first token {_ttft(rs) * 1e3:.1f} ms, "
            f"{_median([r.events for r in rs]):.0f} token chunks/events"
        )
        if path == "http":
            note += (
                f"; http / embedded tok/s {emb_ratio:.3f}, ttft http / websocket "
                f"{_ttft(http) / _ttft(ws):.2f}"
            )
        b.emit(
            path, shape, per_token, rate=_rate(rs), unit="tok/s",
            ratio=ratio if path == "http" else None, note=note + _problems(rs),
            ttft=_ttft(rs), path=path,
        )  # fmt: skip
    if "llama.cpp" in runs:
        b.values["stream_vs_llama"] = _median(
            [h.rate / q.rate for h, q in zip(http, runs["llama.cpp"], strict=True)]
        )
        b.reporter.text(f"   http / llama.cpp one stream tok/s: {b.values['stream_vs_llama']:.2f}")


def _aggregate(got: list[Any]) -> tuple[float, int, str]:
    *runs, wall = got
    tokens = sum(r.completion_tokens for r in runs)
    return tokens / wall, tokens, _problems(runs)


async def concurrent(b: Bench) -> None:
    p = b.profile
    keys = [api_key(n) for n in tenant_names(CONCURRENT)]
    await trio.to_thread.run_sync(openai_streams, b.http_base, keys, NAME, 4)  # warm-up
    realm_rates, realm_tok, realm_bad = [], 0, ""
    for _ in range(p.concurrent_reps):
        await trio.sleep(IDLE_SECONDS)
        got = await trio.to_thread.run_sync(
            openai_streams, b.http_base, keys, NAME, p.concurrent_tokens
        )
        rate, realm_tok, realm_bad = _aggregate(got)
        realm_rates.append(rate)
    shape = f"{CONCURRENT} x {p.concurrent_tokens} tokens"
    # the same round embedded in the server's process: what the transport costs
    emb_rates = []
    params = {"model": NAME, **completion_params(p.concurrent_tokens)}
    names = tenant_names(CONCURRENT)
    async with b.server.side("/embedded") as ask:
        warm = {**params, "max_tokens": 4}  # the tenants' guest instances, untimed
        await ask({"op": "round", "tenants": names, "params": warm, "timeout": 600})
        for _ in range(p.concurrent_reps):
            await trio.sleep(IDLE_SECONDS)
            got = await ask({"op": "round", "tenants": names, "params": params, "timeout": 600})
            runs = [StreamRun.from_json(r) for r in got["runs"]]
            wall = max(r.end for r in runs) - min(r.start for r in runs)
            emb_rates.append(sum(r.completion_tokens for r in runs) / wall)
    emb_rate = _median(emb_rates)
    b.emit(
        "embedded", shape, _timing([1 / r for r in emb_rates]), rate=emb_rate, unit="tok/s",
        case="concurrent", batch=CONCURRENT, note="aggregate, in the server's process",
    )  # fmt: skip
    peer_rate = math.nan
    if not b.peer:
        peer_rates, peer_tok, peer_bad = [], 0, ""
        async with open_peer(b.model.path, b.threads) as base:
            await trio.to_thread.run_sync(openai_streams, base, ["unused"], NAME, 4)
            for _ in range(p.concurrent_reps):
                await trio.sleep(IDLE_SECONDS)
                got = await trio.to_thread.run_sync(
                    openai_streams, base, ["unused"] * CONCURRENT, NAME, p.concurrent_tokens
                )
                rate, peer_tok, peer_bad = _aggregate(got)
                peer_rates.append(rate)
        peer_rate = _median(peer_rates)
        b.emit(
            "llama.cpp http", shape, _timing([1 / r for r in peer_rates]), rate=peer_rate,
            unit="tok/s", case="concurrent", batch=CONCURRENT,
            note=f"aggregate; {peer_tok} completion tokens per round{peer_bad}",
        )  # fmt: skip
    realm_rate = _median(realm_rates)
    ratio = realm_rate / peer_rate if not math.isnan(peer_rate) else None
    b.values["concurrent_vs_llama"] = ratio if ratio is not None else math.nan
    b.emit(
        "http", shape, _timing([1 / r for r in realm_rates]), rate=realm_rate, unit="tok/s",
        ratio=ratio, case="concurrent", batch=CONCURRENT,
        note=f"aggregate; {realm_tok} completion tokens per round; http / embedded "
        f"{realm_rate / emb_rate:.2f}{realm_bad}"
        + ("" if ratio is not None else f"; llama.cpp not measured: {b.peer}"),
    )  # fmt: skip


def targets(b: Bench, ran: set[str]) -> list[Target]:
    out: list[Target] = []
    if "stream" in ran:
        out.append(Target(
            "one stream, http / websocket streamed tok/s", b.values.get("stream_rate_ratio"),
            ">=", STREAM_MIN_RATIO, b.caveats.get("stream_rate_ratio", ""),
        ))  # fmt: skip
    if "concurrent" in ran:
        v = b.values.get("concurrent_vs_llama")
        out.append(Target(
            f"{CONCURRENT} concurrent streams, Realm http / llama.cpp server aggregate tok/s",
            None if v is None or math.isnan(v) else v, ">=", CONCURRENT_MIN_RATIO, b.peer,
        ))  # fmt: skip
    return out


async def run(
    profile: Profile, threads: int, reporter: Any, selected: set[str], model: ServedModel,
    peer: str,
) -> Bench:  # fmt: skip
    async with open_server_process([model], threads, CONCURRENT) as server:
        b = Bench(profile, threads, reporter, server, model, peer)
        reporter.text(f"server process {server.pid} at {server.url}")
        if peer:
            reporter.text(f"llama.cpp's server: not measured ({peer})")
        for case, fn in (("stream", stream), ("concurrent", concurrent)):
            if case not in selected:
                continue
            reporter.section(case)
            try:
                await fn(b)
            except Exception as e:  # report, go on
                reporter.error(case, f"{type(e).__name__}: {e!r}")
    return b


def default_model() -> Path:
    from realm.testing.real_models import real_model_path

    return real_model_path("smollm2-135m")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(SUITE, __doc__.splitlines()[0] if __doc__ else SUITE)
    parser.add_argument(
        "--model", type=Path, default=None, metavar="PATH",
        help="a GGUF model (default: SmolLM2-135M-Instruct Q4_1, the [real] extra)",
    )  # fmt: skip
    parser.add_argument(
        "--json-out", type=Path, default=None, metavar="FILE",
        help="also write the JSON lines to FILE",
    )  # fmt: skip
    args = parser.parse_args(argv)
    selected = {c for c in CASES if args.only is None or args.only in c}
    if not selected:
        parser.error(f"no case name contains {args.only!r}; names: {', '.join(CASES)}")
    try:
        import openai  # noqa: F401
    except ImportError:
        parser.error("the openai package is needed (the [test] extra)")
    path = args.model if args.model is not None else default_model()
    threads = kernels.set_threads(args.threads)
    profile = QUICK if args.quick else FULL
    model = ServedModel.load(NAME, path, generated=False)
    peer = peer_available()
    reporters = [Reporter(json_lines=args.json)]
    with contextlib.ExitStack() as stack:
        if args.json_out is not None:
            out = stack.enter_context(open(args.json_out, "w", encoding="utf-8"))
            reporters.append(Reporter(json_lines=True, out=out))
        reporter: Any = reporters[0] if len(reporters) == 1 else _Tee(*reporters)
        settings = {
            "quick": args.quick,
            "only": args.only,
            "model": model.described,
            "prompt": repr(PROMPT),
            "sampling": "greedy (temperature 0)",
            "stream": f"{profile.stream_reps} rounds of each path, max_tokens "
            f"{profile.stream_tokens}",
            "concurrent": f"{CONCURRENT} streams x {profile.concurrent_reps} rounds, max_tokens "
            f"{profile.concurrent_tokens}",
            "peer": "llama-cpp-python server, same file, same threads"
            if not peer
            else f"none ({peer})",
            "client": "openai (AsyncOpenAI, streaming) for http and llama.cpp",
        }
        reporter.machine(describe_machine(SUITE, threads, settings, numpy_limit=False))
        b = trio.run(run, profile, threads, reporter, selected, model, peer)
        reporter.text("")
        reporter.text(
            "stream: median/min per token chunk, rate = chunks after the first / s; "
            "concurrent: per round, rate = completion tokens / round wall time. "
            "ratio = http / websocket (stream), Realm / llama.cpp (concurrent)."
        )
        reporter.targets(targets(b, selected))
        reporter.end()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
