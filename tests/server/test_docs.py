"""The server's docs say what the code does, and cite nothing outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from realm._protocol import CloseCode, ErrorCode
from realm.server import ServerLimits

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("docs/server.md", "docs/protocol.md", "docs/reliability.md")


@pytest.mark.parametrize("doc", DOCS)
def test_links_stay_inside_the_repository(doc: str) -> None:
    path = ROOT / doc
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text):
        if "://" in target:
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{doc}: {target}"
    for outside in ("RELIABILITY.md", "STYLE.md", "DESIGN.md", "../shared", "/work/"):
        assert outside not in text, f"{doc} cites {outside}"


def test_protocol_md_lists_every_error_and_close_code() -> None:
    text = (ROOT / "docs/protocol.md").read_text(encoding="utf-8")
    for code in ErrorCode:
        assert f"| `{code}` |" in text, code
    for close in CloseCode:
        assert f"| {int(close)} |" in text, close


def test_server_md_names_every_setting() -> None:
    text = (ROOT / "docs/server.md").read_text(encoding="utf-8")
    for name in [f.name for f in attrs.fields(ServerLimits)] + ["allowed_origins", "allowed_hosts"]:
        assert f"\n{name} = " in text, name


def test_reliability_md_has_the_bad_input_table() -> None:
    text = (ROOT / "docs/reliability.md").read_text(encoding="utf-8")
    assert "## Bad input: what each gets" in text
    assert "| plain HTTP request" in text and "| a web page's handshake" in text
