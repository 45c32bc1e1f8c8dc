"""docs/guest-abi.md is generated from the ABI table and must agree with it."""

from __future__ import annotations

from pathlib import Path

from realm.sandbox import render_abi_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "guest-abi.md"


def test_guest_abi_doc_matches_the_table() -> None:
    assert DOC.read_text(encoding="utf-8") == render_abi_markdown(), (
        "regenerate: python -m realm.sandbox._abi > docs/guest-abi.md"
    )
