"""setuptools needs ``cffi_modules`` here (pyproject.toml has no key for it), and the build
of the default guest: ``guest/default_guest.c`` compiled to wasm32 with ziglang from PyPI."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithGuest(build_py):
    """build_py that also ships the guest SDK and compiles the default guest into the package."""

    def run(self) -> None:
        super().run()
        spec = importlib.util.spec_from_file_location(
            "realm_guest_build", ROOT / "realm" / "sandbox" / "_build.py"
        )
        assert spec is not None and spec.loader is not None
        guest_build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(guest_build)
        pkg = Path(self.build_lib) / "realm" / "sandbox"
        (pkg / "sdk").mkdir(parents=True, exist_ok=True)
        for name in ("realm_guest.h", "default_guest.c"):
            shutil.copy2(ROOT / "guest" / name, pkg / "sdk" / name)
        guest_build.build(ROOT / "guest" / "default_guest.c", pkg / "guests" / "default.wasm")


setup(cffi_modules=["build_ffi.py:ffibuilder"], cmdclass={"build_py": BuildWithGuest})
