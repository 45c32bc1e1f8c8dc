"""The server-side ``realm`` subcommands: ``serve``, ``call``, ``models``, ``key``, ``bench``;
``realm --version``.

``realm call`` runs in a worker thread (it has its own Trio loop) against a server in the test's
loop; ``realm serve`` runs as a real process. Every test runs under an absolute time limit.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from realm.cli import main
from realm.client import Client
from realm.server import ServerConfig, ServerLimits, TenantSpec, hash_key, open_server
from realm.testing import write_test_model

LIMIT = 20  # seconds, every test
PROMPT = json.dumps({"prompt": "Once upon", "max_tokens": 8, "temperature": 0})
KEY = "rk-cli-test-key"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("cli_server") / "tiny.gguf", n_layers=2)


@pytest.fixture(autouse=True)
def no_api_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REALM_API_KEY", raising=False)


def config(model_path: Path, **changes: object) -> ServerConfig:
    return ServerConfig(models={"tiny": str(model_path)}, port=0, **changes)  # type: ignore[arg-type]


async def run_cli(*argv: str) -> int:
    """``realm ARGV`` in a worker thread, so a server in this loop can answer it."""
    return await trio.to_thread.run_sync(main, list(argv))


# --- key ---------------------------------------------------------------------------------------


def test_key_prints_a_key_and_its_digest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["key"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"^key:\s+(\S+)$", out, re.M)
    digest = re.search(r"^digest:\s+(sha256:[0-9a-f]{64})\b", out, re.M)
    assert key and digest, out
    assert hash_key(key[1]) == digest[1]
    assert main(["key"]) == 0
    assert key[1] not in capsys.readouterr().out  # a fresh key each time


def test_key_with_an_argument_prints_its_digest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["key", KEY]) == 0
    assert capsys.readouterr().out == hash_key(KEY) + "\n"


# --- call --------------------------------------------------------------------------------------


async def test_call_streams_text_to_stdout_and_usage_to_stderr(
    model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            assert await run_cli("call", server.url, "generate", PROMPT) == 0
            out, err = capsys.readouterr()
            assert await run_cli("call", "--json", server.url, "generate", PROMPT) == 0
            whole = json.loads(capsys.readouterr().out)
    assert whole["text"] and out == whole["text"] + "\n"  # greedy: the same text both times
    rest = json.loads(err.strip().splitlines()[-1])
    assert "text" not in rest and rest["usage"] == whole["usage"]
    assert rest["usage"]["completion_tokens"] == 8 and rest["finish_reason"] == "length"


async def test_call_a_function_without_text_prints_json(
    model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            assert await run_cli("call", server.url, "system_health") == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"


async def test_call_with_an_api_key(
    model_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tenants = {"acme": TenantSpec("acme", api_key_hashes=(hash_key(KEY),))}
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=tenants)) as server:
            assert await run_cli("call", server.url, "system_metadata", "--api-key", KEY) == 0
            assert json.loads(capsys.readouterr().out)["tenant"] == "acme"
            monkeypatch.setenv("REALM_API_KEY", KEY)
            assert await run_cli("call", server.url, "system_metadata") == 0
            assert json.loads(capsys.readouterr().out)["tenant"] == "acme"
            monkeypatch.delenv("REALM_API_KEY")
            assert await run_cli("call", server.url, "system_metadata") == 2
            err = capsys.readouterr().err
    assert "KeyRefused" in err and "1008 UNAUTHORIZED: missing or unknown API key" in err


async def test_call_errors_exit_2_with_a_message(
    model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            assert await run_cli("call", server.url, "no_such_function") == 2
            err = capsys.readouterr().err
            assert "RemoteUnknownFunction: UNKNOWN_FUNCTION:" in err and "no_such_function" in err
            assert await run_cli("call", server.url, "generate", '{"prompt": 5}') == 2
            assert "INVALID_PARAMS" in capsys.readouterr().err
        # the server is gone: nothing listens there any more
        assert await run_cli("call", server.url, "system_health") == 2
        assert f"cannot connect to {server.url}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("params", "message"),
    [("{not json", "PARAMS is not JSON"), ("[1, 2]", "PARAMS must be a JSON object")],
)
def test_call_with_bad_params_exits_2(
    params: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # refused before connecting: no server is needed
    assert main(["call", "ws://127.0.0.1:9", "generate", params]) == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""


# --- models ------------------------------------------------------------------------------------


def test_models_lists_the_model(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--model", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"tiny: {model_path}\n")
    assert "llama, 2 layers, n_embd 64" in out and "context 256" in out


def test_models_from_a_config(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "realm.toml"
    toml.write_text(f'[models]\nsmall = "{model_path}"\nother = "{model_path}"\n')
    assert main(["models", "--config", str(toml)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"small: {model_path}\n") and f"\nother: {model_path}\n" in out


# --- serve -------------------------------------------------------------------------------------


class _Lines:
    """A process's stderr, read line by line in a thread (so the pipe never fills)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stderr is not None
        stderr = proc.stderr
        self._thread = threading.Thread(target=self._read, args=(stderr,), daemon=True)
        self._thread.start()

    def _read(self, stderr: object) -> None:
        for line in stderr:  # type: ignore[attr-defined]
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, deadline: float) -> re.Match[str]:
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(self.seen)}")
            self.seen.append(line)
            if found := re.search(pattern, line):
                return found

    def rest(self) -> str:
        self._thread.join(timeout=5)
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                self.seen.append(line)
        return "".join(self.seen)


@pytest.fixture
def serve() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; any still running at the end are killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def start(procs: list[subprocess.Popen[str]], *argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("REALM_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "realm.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    procs.append(proc)
    return proc


def test_serve_answers_calls_and_stops_on_sigterm(
    model_path: Path, serve: list[subprocess.Popen[str]]
) -> None:
    deadline = time.monotonic() + LIMIT
    proc = start(serve, "serve", "--model", str(model_path), "--port", "0", "--metrics-port", "0")
    log = _Lines(proc)
    found = log.wait_for(
        r"serving tiny=\S+ on (ws://127\.0\.0\.1:\d+) .*metrics on (http://\S+)", deadline
    )
    url, metrics_url = found[1], found[2]
    with Client(url, retries=0) as c:
        health = c.health()
        assert health["status"] == "ok" and health["connections"] == 1
        text = c.call("generate", json.loads(PROMPT))["text"]
        assert text
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        assert b"realm_calls_total" in response.read()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=max(0.1, deadline - time.monotonic())) == 0
    assert "SIGTERM: shutting down" in log.rest()


def test_serve_on_a_port_in_use_says_so(
    model_path: Path, serve: list[subprocess.Popen[str]]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = start(serve, "serve", "--model", str(model_path), "--port", port)
        _, err = proc.communicate(timeout=LIMIT)
    assert proc.returncode == 1
    assert f"realm serve: cannot serve on 127.0.0.1 port {port}: Address already in use" in err
    assert "Traceback" not in err


def test_serve_with_a_bad_config_key_exits_naming_it(
    model_path: Path, tmp_path: Path, serve: list[subprocess.Popen[str]]
) -> None:
    toml = tmp_path / "realm.toml"
    toml.write_text(f'[server]\nport = 0\nidle_timeout = 5\n\n[models]\ntiny = "{model_path}"\n')
    proc = start(serve, "serve", "--config", str(toml))
    _, err = proc.communicate(timeout=LIMIT)
    assert proc.returncode == 2
    assert "ConfigError: server.idle_timeout: unknown key" in err
    assert "idle_timeout_seconds" in err  # the message lists the keys there are


# --- bench -------------------------------------------------------------------------------------


def test_bench_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: realm bench") and "kernels" in out


@pytest.fixture
def no_benchmarks(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the commands ``realm bench`` would run instead of running them."""
    commands: list[list[str]] = []

    def call(cmd: list[str], **kwargs: object) -> int:
        commands.append(cmd)
        return 0

    monkeypatch.setattr(subprocess, "call", call)
    return commands


def test_bench_passes_arguments_after_a_double_dash(
    no_benchmarks: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "kernels", "models", "--", "--quick", "--json"]) == 0
    assert no_benchmarks == [
        [sys.executable, "-m", "benchmarks.kernels", "--quick", "--json"],
        [sys.executable, "-m", "benchmarks.models", "--quick", "--json"],
    ]


def test_bench_refuses_an_unknown_suite_before_running_any(
    no_benchmarks: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "kernels", "no_such_suite"]) == 2
    assert no_benchmarks == []
    assert "no suite 'no_such_suite'" in capsys.readouterr().err


# --- version, ports, pipes ---------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import realm

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"realm {realm.__version__}\n"


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
@pytest.mark.parametrize("value", ["70000", "-1", "eighty", "8080.5", ""])
def test_serve_checks_its_ports_like_the_config(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", flag, value])  # refused before anything loads
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be an integer in 0..65535, not {value!r}" in err


@pytest.fixture(scope="module")
def long_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A context long enough for a stream that lasts seconds."""
    return write_test_model(tmp_path_factory.mktemp("cli_long") / "long.gguf", context_length=4096)


async def test_call_into_a_pipe_that_closes_ends_quietly(long_model_path: Path) -> None:
    """``realm call ... | head -c 20``: the reader goes away mid-stream; the call is cancelled
    and realm exits 0 with nothing on stderr (no BrokenPipeError, no traceback)."""
    params = json.dumps({"prompt": "Once upon", "max_tokens": 4000, "temperature": 0})

    def run(url: str) -> tuple[int, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("REALM_API_KEY", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "realm.cli", "call", url, "generate", params],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        got = b""
        while len(got) < 20:  # like `head -c 20`: read a little, then stop reading
            chunk = proc.stdout.read1(20 - len(got))  # type: ignore[attr-defined]
            assert chunk, "the stream ended early"
            got += chunk
        proc.stdout.close()
        try:
            err = proc.stderr.read().decode()
            return proc.wait(timeout=LIMIT), err
        finally:
            proc.stderr.close()
            if proc.poll() is None:
                proc.kill()

    with trio.fail_after(LIMIT):
        limits = ServerLimits(max_tokens=4000)
        async with open_server(config(long_model_path, limits=limits)) as server:
            status, err = await trio.to_thread.run_sync(run, server.url)
            registry = server.metrics.registry
            labels = {"tenant": "local", "function": "generate", "outcome": "cancelled"}
            while not registry.get_sample_value("realm_calls_total", labels):
                await trio.sleep(0.02)  # the call was cancelled, not run to its end
    assert status == 0
    assert err == "", err
