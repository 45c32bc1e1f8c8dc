"""Several ``realm serve`` processes behind Debian's nginx on loopback, for the balancer test and
benchmark: the shipped site file (deploy/nginx/realm.conf, its upstream and listen lines
replaced) and its includes, nginx run as the current user with a temporary prefix.

Everything listens on 127.0.0.1 only; ``open_cluster`` tears every process down on the way out,
whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import attrs

ROOT: Final = Path(__file__).resolve().parents[2]
NGINX_DIR: Final = ROOT / "deploy" / "nginx"
HAPROXY_CFG: Final = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
START_SECONDS: Final = 60.0  # a server's start-up (its model loaded), at most
STOP_SECONDS: Final = 15.0  # a process's exit after SIGTERM, at most, before SIGKILL
_SERVING = re.compile(r"serving .* on ws://127\.0\.0\.1:(\d+) \(tenants")


def find_nginx() -> str | None:
    """The nginx binary (PATH, then Debian's /usr/sbin), or None."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def free_port() -> int:
    """A port free on 127.0.0.1 now (nginx cannot be told to pick one itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@attrs.define(eq=False)
class ServerProcess:
    """One ``realm serve``; ``port`` is read from its start-up line."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    @property
    def server_id(self) -> str:
        """The id the server gives itself with no ``server_id`` in its config."""
        return f"{socket.gethostname()}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


@attrs.define(eq=False)
class Cluster:
    servers: list[ServerProcess]
    nginx: subprocess.Popen[bytes]
    port: int  # nginx's
    prefix: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def by_id(self, server_id: str) -> ServerProcess:
        for s in self.servers:
            if s.server_id == server_id:
                return s
        raise LookupError(f"no server {server_id!r} in {[s.server_id for s in self.servers]}")

    def logs(self) -> str:
        """Every process's log, for a failing test's message."""
        parts = [f"--- {s.server_id} ---\n{s.log()[-3000:]}" for s in self.servers]
        err = self.prefix / "error.log"
        if err.exists():
            parts.append(f"--- nginx ---\n{err.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def nginx_config(prefix: Path, listen: int, upstreams: list[int]) -> Path:
    """The shipped site file and its includes under ``prefix``, with the test's servers and
    port, inside a main config that runs nginx in the foreground as the current user."""
    site = (NGINX_DIR / "realm.conf").read_text(encoding="utf-8")
    servers = "".join(
        f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;\n" for p in upstreams
    )
    site, n = re.subn(r"(?m)^    server \d+\.\d+\.\d+\.\d+:\d+ [^\n]*;\n", "", site)
    assert n >= 1, "deploy/nginx/realm.conf: no upstream server lines to replace"
    site = site.replace(
        "    hash $realm_route_key consistent;\n",
        "    hash $realm_route_key consistent;\n" + servers,
        1,
    )
    site, n = re.subn(r"(?m)^    listen 80;$", f"    listen 127.0.0.1:{listen};", site)
    assert n == 1, "deploy/nginx/realm.conf: no 'listen 80;' line to replace"
    conf_dir = prefix / "realm"
    conf_dir.mkdir(parents=True, exist_ok=True)
    for name in ("realm-route.conf", "realm-proxy.conf"):
        shutil.copy(NGINX_DIR / name, conf_dir / name)
    (conf_dir / "realm.conf").write_text(site, encoding="utf-8")
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = ""
    if os.geteuid() == 0:  # workers would otherwise switch to "nobody"
        import pwd

        user = f"user {pwd.getpwuid(0).pw_name};\n"
    main = prefix / "nginx.conf"
    main.write_text(
        f"{user}worker_processes 1;\n"
        f"daemon off;\n"
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} info;\n"
        "events { worker_connections 512; }\n"
        "http {\n"
        f"    access_log {prefix / 'access.log'};\n"
        f"{temp}\n"
        "    include realm/realm.conf;\n"
        "}\n",
        encoding="utf-8",
    )
    return main


def find_haproxy() -> str | None:
    """The haproxy binary (PATH, then Debian's /usr/sbin), or None."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")


def haproxy_config(path: Path, listen: int, upstreams: list[int]) -> Path:
    """The shipped deploy/haproxy/haproxy.cfg with the test's servers, port and a small
    connection limit, written to ``path``."""
    text = (HAPROXY_CFG).read_text(encoding="utf-8")
    text, n = re.subn(r"(?m)^    server realm-\d+ [^\n]*\n", "", text)
    assert n >= 1, "deploy/haproxy/haproxy.cfg: no server lines to replace"
    servers = "".join(f"    server realm-{i} 127.0.0.1:{p}\n" for i, p in enumerate(upstreams))
    text = text.rstrip("\n") + "\n" + servers
    text, n = re.subn(r"(?m)^    bind :80$", f"    bind 127.0.0.1:{listen}", text)
    assert n == 1, "deploy/haproxy/haproxy.cfg: no 'bind :80' line to replace"
    text = re.sub(r"(?m)^    maxconn \d+$", "    maxconn 256", text)
    # the test's servers listen on loopback, so they accept loopback names only; and checks
    # come often, so that a failing one shows at once
    text, n = re.subn(r"hdr Host \S+", "hdr Host 127.0.0.1", text)
    assert n == 1, "deploy/haproxy/haproxy.cfg: the health check sends no Host"
    text = text.replace(" inter 2s ", " inter 100ms ")
    path.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def open_haproxy(haproxy: str, tmp: Path, upstreams: list[int]) -> Iterator[int]:
    """HAProxy with the shipped config in front of ``upstreams``; yields its port once every
    server passed its health check (``GET /ready``)."""
    port = free_port()
    cfg = haproxy_config(tmp / "haproxy.cfg", port, upstreams)
    log_path = tmp / "haproxy.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([haproxy, "-f", str(cfg)], stdout=log, stderr=log)
    try:
        if not _wait_port(port, time.monotonic() + 10):
            raise RuntimeError(f"haproxy did not start:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.5)  # a few health checks (every 100 ms; two failures: down)
        log_text = log_path.read_text(errors="replace")
        if " is DOWN" in log_text:
            raise RuntimeError(f"haproxy's health checks failed:\n{log_text[-3000:]}")
        yield port
    finally:
        stop(proc, signal.SIGUSR1)  # haproxy's soft stop


def _wait_port(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """End a process we started: ``sig``, then SIGKILL past ``STOP_SECONDS``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


#: ``realm serve`` at a given kernel level (benchmarks' ``--isa``): argv[1] is the level
_AT_ISA: Final = (
    "import sys; from realm import kernels; kernels.set_isa(kernels.Isa[sys.argv[1]]); "
    "from realm.cli import main; sys.exit(main(sys.argv[2:]))"
)


@contextlib.contextmanager
def open_cluster(
    nginx: str, tmp: Path, config: str, n: int = 3, *, isa: str | None = None
) -> Iterator[Cluster]:
    """``n`` servers of ``config`` (TOML text) on free ports, nginx in front of them; ``isa``:
    the servers' kernel level (default: the best the CPU has)."""
    cfg = tmp / "realm.toml"
    cfg.write_text(config, encoding="utf-8")
    servers: list[ServerProcess] = []
    ngx: subprocess.Popen[bytes] | None = None
    try:
        for i in range(n):
            log_path = tmp / f"server{i}.log"
            with open(log_path, "wb") as log:
                realm = ["-m", "realm.cli"] if isa is None else ["-c", _AT_ISA, isa]
                proc = subprocess.Popen(
                    [sys.executable, *realm, "serve", "--config", str(cfg), "--port", "0"],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    cwd=ROOT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            servers.append(ServerProcess(proc, log_path))
        deadline = time.monotonic() + START_SECONDS
        for s in servers:
            while not s.port:
                found = _SERVING.search(s.log())
                if found:
                    s.port = int(found.group(1))
                elif not s.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"realm serve did not start:\n{s.log()[-3000:]}")
                else:
                    time.sleep(0.05)
        prefix = tmp / "nginx"
        prefix.mkdir()
        port = free_port()
        main = nginx_config(prefix, port, [s.port for s in servers])
        with open(prefix / "stderr.log", "wb") as err_log:
            ngx = subprocess.Popen(
                [nginx, "-p", str(prefix), "-c", str(main)],
                stdout=subprocess.DEVNULL,
                stderr=err_log,
            )
        if not _wait_port(port, time.monotonic() + 10):
            err = (prefix / "stderr.log").read_text(errors="replace")
            raise RuntimeError(f"nginx did not start on port {port}:\n{err}")
        yield Cluster(servers, ngx, port, prefix)
    finally:
        if ngx is not None:
            stop(ngx, signal.SIGQUIT)  # nginx's graceful stop
        for s in servers:
            stop(s.proc)
