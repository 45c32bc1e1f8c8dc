"""Rebuild the default guest: ``python guest/build.py`` (the code is realm/sandbox/_build.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "realm_guest_build", Path(__file__).resolve().parent.parent / "realm" / "sandbox" / "_build.py"
)
assert _spec is not None and _spec.loader is not None
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
build = _mod.build
GuestBuildError = _mod.GuestBuildError
DEFAULT_SOURCE = _mod.DEFAULT_SOURCE
DEFAULT_OUTPUT = _mod.DEFAULT_OUTPUT
GUEST_DIR = _mod.GUEST_DIR

if __name__ == "__main__":
    sys.exit(_mod.main())
