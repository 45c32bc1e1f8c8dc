"""setuptools needs ``cffi_modules`` here (pyproject.toml has no key for it), and the build
of the default guest: ``guest/default_guest.c`` compiled to wasm32 with ziglang from PyPI."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithGuest(build_py):
    """build_py that also compiles the default guest into the built package."""

    def run(self) -> None:
        super().run()
        sys.path.insert(0, str(ROOT / "guest"))
        try:
            import build as guest_build  # guest/build.py

            out = Path(self.build_lib) / "realm" / "sandbox" / "guests" / "default.wasm"
            guest_build.build(guest_build.DEFAULT_SOURCE, out)
        finally:
            sys.path.pop(0)


setup(cffi_modules=["build_ffi.py:ffibuilder"], cmdclass={"build_py": BuildWithGuest})
