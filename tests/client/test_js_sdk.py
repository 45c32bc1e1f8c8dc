"""The JavaScript client (clients/js): its Node test suite against a real ``realm serve``, and
the browser bundle the server's playground page loads (realm/server/static/).

``npm ci && npm test`` runs where ``node`` (>= 20) and ``npm`` exist and the package's
dependencies can be installed (the npm registry or npm's cache); otherwise the test is skipped,
saying why. Both steps together are bounded to about a minute. ``npm test`` includes the
playground in headless chromium where chromium is installed (skipped inside it otherwise).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "clients" / "js"
STATIC = ROOT / "realm" / "server" / "static"
BUNDLE = STATIC / "realm-client.js"
LIMIT = 60.0  # seconds for npm ci and npm test together
INSTALL_LIMIT = 35.0

#: what the bundle must export (the playground and docs/js.md use them)
EXPORTS = [
    "connect",
    "RealmClient",
    "CallStream",
    "RealmError",
    "RemoteError",
    "ConnectionLost",
    "KeyRefused",
    "Unauthorized",
    "RateLimited",
    "Cancelled",
    "InvalidParams",
    "UnknownFunction",
    "InvalidRequest",
    "Overloaded",
    "TenantUnavailable",
    "GuestTrap",
    "CallTimeout",
    "ServerError",
    "errorFromWire",
    "ErrorCode",
]


def test_bundle_is_built_from_the_current_source() -> None:
    text = BUNDLE.read_text(encoding="utf-8")
    found = re.search(r"source-sha256: ([0-9a-f]{64})", text)
    assert found, f"{BUNDLE} has no source-sha256 header: regenerate it (npm run bundle)"
    current = hashlib.sha256((JS / "src" / "index.ts").read_bytes()).hexdigest()
    assert found[1] == current, (
        f"{BUNDLE.relative_to(ROOT)} is older than clients/js/src/index.ts: "
        "run `npm run bundle` in clients/js"
    )
    assert not re.search(r"^\s*import\s", text, re.M), "the bundle must be one self-contained file"


def test_bundle_exports_the_api() -> None:
    text = BUNDLE.read_text(encoding="utf-8")
    exported = set(re.findall(r"^export (?:async )?(?:function|class|const) (\w+)", text, re.M))
    missing = [name for name in EXPORTS if name not in exported]
    assert not missing, f"not exported by the bundle: {missing}"


def test_playground_imports_only_what_the_bundle_exports() -> None:
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    found = re.search(r'import \{([^}]*)\} from "\./realm-client\.js"', page)
    assert found, "index.html must import the bundle"
    names = {n.strip() for n in found[1].split(",") if n.strip()}
    text = BUNDLE.read_text(encoding="utf-8")
    exported = set(re.findall(r"^export (?:async )?(?:function|class|const) (\w+)", text, re.M))
    assert names <= exported, names - exported


def _node_major(node: str) -> int:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.match(r"v(\d+)\.", out.strip())
    return int(found[1]) if found else 0


def test_npm_test_against_a_real_server() -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed: the JavaScript client's tests cannot run")
    if _node_major(node) < 20:
        pytest.skip("the JavaScript client needs Node >= 20")
    env = {
        **os.environ,
        "REALM_PYTHON": sys.executable,
        "npm_config_update_notifier": "false",
    }
    env.pop("REALM_API_KEY", None)
    start = time.monotonic()
    try:
        install = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline",
             "--fetch-timeout=10000", "--fetch-retries=0"],
            cwd=JS, env=env, capture_output=True, text=True, timeout=INSTALL_LIMIT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm ci took over {INSTALL_LIMIT:g} s (offline?): not tested")
    if install.returncode != 0:
        why = " / ".join(install.stderr.strip().splitlines()[:2])[:300]
        pytest.skip(f"npm ci failed (offline, or no registry): not tested ({why})")
    left = max(10.0, LIMIT - (time.monotonic() - start))
    try:
        run = subprocess.run(
            [npm, "test"], cwd=JS, env=env, capture_output=True, text=True, timeout=left
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-4000:]
        raise AssertionError(f"npm test ran over {left:.0f} s:\n{out!r}") from None
    assert run.returncode == 0, f"npm test failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    assert re.search(r"^# fail 0$", run.stdout, re.M), run.stdout[-3000:]
