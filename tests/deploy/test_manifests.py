"""The deployment files under deploy/ are valid and agree with each other and with the server:
the Kubernetes YAML parses (PyYAML) and its realm.toml loads, the nginx site passes ``nginx -t``,
the HAProxy config ``haproxy -c``, the systemd unit ``systemd-analyze verify`` (each where the
tool is installed; the unit is parsed otherwise), the container recipe is well formed.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from realm.server import load_config
from realm.server._config import config_from_dict

from ._cluster import find_nginx, nginx_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
TOOL_SECONDS = 30


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_every_manifest_parses_and_names_its_kind() -> None:
    files = sorted(K8S.glob("*.yaml"))
    assert files, "no manifests in deploy/kubernetes"
    for path in files:
        for doc in _docs(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), (path.name, doc)
            assert doc["metadata"].get("name"), (path.name, doc["kind"])


def test_the_deployment_probes_drains_and_serves_its_configmap() -> None:
    docs = _docs(K8S / "realm.yaml")
    config_map = _kind(docs, "ConfigMap")
    # the ConfigMap's realm.toml is a config the server loads (the built-in model)
    toml = tomllib.loads(config_map["data"]["realm.toml"])
    config = config_from_dict(toml)
    assert config.host == "0.0.0.0" and config.tenants
    deployment = _kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == config.port and ports["metrics"] == config.metrics_port
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # the probes send the public name as Host (Realm checks it)
    ingress = _kind(_docs(K8S / "ingress-nginx.yaml"), "Ingress")
    public = ingress["spec"]["rules"][0]["host"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["httpHeaders"] == [{"name": "Host", "value": public}]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # the pod gets its preStop wait, the calls' grace period and the close after it
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= float(pre_stop[1]) + config.limits.shutdown_seconds + 6, grace
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert container["args"] == ["--config", f"{mount['mountPath']}/realm.toml"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["template"]["metadata"]["labels"] == selector
    service = _kind(docs, "Service")
    assert service["spec"]["selector"] == selector
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)


def test_the_container_config_matches_the_configmap() -> None:
    config_map = _kind(_docs(K8S / "realm.yaml"), "ConfigMap")
    container = tomllib.loads((DEPLOY / "container" / "realm.toml").read_text(encoding="utf-8"))
    assert container == tomllib.loads(config_map["data"]["realm.toml"])
    load_config(DEPLOY / "container" / "realm.toml")  # and the server loads it


def _route_maps() -> str:
    text = (DEPLOY / "nginx" / "realm-route.conf").read_text(encoding="utf-8")
    return "\n".join(line for line in text.splitlines() if not line.startswith("#")).strip()


def test_the_ingress_routes_as_the_nginx_site_does() -> None:
    docs = _docs(K8S / "ingress-nginx.yaml")
    snippet = _kind(docs, "ConfigMap")["data"]["http-snippet"]
    assert snippet.strip() == _route_maps(), (
        "ingress-nginx.yaml's maps differ from realm-route.conf"
    )
    ingress = _kind(docs, "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == (
        "$realm_route_key"
    )
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = _kind(_docs(K8S / "realm.yaml"), "Service")
    assert backend["name"] == service["metadata"]["name"]


def test_nginx_accepts_the_site(tmp_path: Path) -> None:
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("nginx not installed (apt-get install -y nginx-light): `nginx -t` not run")
    main = nginx_config(tmp_path, 8080, [8081, 8082])
    # the shipped site file as it is, beside the test's version of it
    shutil.copy(DEPLOY / "nginx" / "realm.conf", tmp_path / "realm" / "realm.conf")
    r = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(main)],
        capture_output=True,
        text=True,
        timeout=TOOL_SECONDS,
    )
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr


def test_haproxy_accepts_its_config() -> None:
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if haproxy is None:
        pytest.skip("haproxy not installed (apt-get install -y haproxy): `haproxy -c` not run")
    r = subprocess.run(
        [haproxy, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=TOOL_SECONDS,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string((DEPLOY / "systemd" / "realm.service").read_text(encoding="utf-8"))
    return unit


def test_the_systemd_unit_parses_and_drains() -> None:
    unit = _unit()
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    argv = service["ExecStart"].split()
    assert argv[1:3] == ["serve", "--config"], argv
    assert service["KillSignal"] == "SIGTERM"
    config = tomllib.loads((DEPLOY / "container" / "realm.toml").read_text(encoding="utf-8"))
    assert int(service["TimeoutStopSec"]) > config["server"]["shutdown_seconds"]


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed: the unit is only parsed")
    # the unit as installed, with the realm script of this environment in place of /opt/realm
    text = (DEPLOY / "systemd" / "realm.service").read_text(encoding="utf-8")
    realm = Path(sys.executable).with_name("realm")
    assert realm.exists(), realm
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={realm}", text)
    unit = tmp_path / "realm.service"
    unit.write_text(text, encoding="utf-8")
    r = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=TOOL_SECONDS
    )
    # systemd-analyze also reports on the machine's own units; only ours matter here
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "realm.service" in line]
    assert not ours, "\n".join(ours)


INSTRUCTIONS = {
    "FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK", "STOPSIGNAL",
    "ENTRYPOINT", "CMD", "ARG", "LABEL",
}  # fmt: skip


def test_the_container_recipe_is_well_formed() -> None:
    text = (DEPLOY / "container" / "Containerfile").read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)  # continuation lines joined
    steps = [
        line.strip() for line in logical.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert steps[0].startswith("FROM "), steps[0]
    seen: dict[str, list[str]] = {}
    for step in steps:
        word, _, rest = step.partition(" ")
        assert word in INSTRUCTIONS, step
        seen.setdefault(word, []).append(rest.strip())
    assert json.loads(seen["ENTRYPOINT"][-1]) == ["realm", "serve"]
    assert json.loads(seen["CMD"][-1]) == ["--config", "/etc/realm/realm.toml"]
    assert seen["STOPSIGNAL"] == ["SIGTERM"]
    assert "8080" in seen["EXPOSE"][-1]
    health = seen["HEALTHCHECK"][-1]
    assert json.loads(health[health.index("[") :])[0] == "python" and "/health" in health


def test_docs_name_every_deploy_file() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            assert str(path.relative_to(ROOT)) in text, f"docs/deploy.md does not name {path}"
