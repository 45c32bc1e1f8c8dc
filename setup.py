"""setuptools needs ``cffi_modules`` here (pyproject.toml has no key for it), and the build
of the default guest: ``guest/default_guest.c`` compiled to wasm32 with ziglang from PyPI."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
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


class BuildWithCuda(build_ext):
    """build_ext that also builds the optional CUDA kernels (``build_cuda.py``) where nvcc
    exists; their failure is a warning, never a failed install (``REALM_CUDA=1`` makes it one,
    ``REALM_CUDA=0`` skips them)."""

    def run(self) -> None:
        super().run()
        spec = importlib.util.spec_from_file_location("realm_build_cuda", ROOT / "build_cuda.py")
        assert spec is not None and spec.loader is not None
        cuda_build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cuda_build)
        target = Path(self.get_ext_fullpath("realm.kernels._cuda_native")).parent
        cuda_build.try_build(target)  # a warning, not an error, unless REALM_CUDA=1


setup(
    cffi_modules=["build_ffi.py:ffibuilder"],
    cmdclass={"build_py": BuildWithGuest, "build_ext": BuildWithCuda},
)
