"""The guest modules that ship with Realm."""

from __future__ import annotations

from pathlib import Path

from .._errors import GuestABIError

GUESTS_DIR = Path(__file__).resolve().parent / "guests"


def default_guest_path() -> Path:
    """The default guest runtime (``guest/default_guest.c`` built to wasm32)."""
    path = GUESTS_DIR / "default.wasm"
    if not path.is_file():
        raise GuestABIError(
            f"the default guest is missing at {path}: rebuild it with `python guest/build.py`"
        )
    return path
