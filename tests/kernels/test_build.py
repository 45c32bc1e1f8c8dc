"""The native kernels compile with clang as well as gcc, with ``build_ffi.py``'s flags.

The ISA-specific files (``avx2.c``, ``avx512.c``, the GEMMs, ``quants_avx2.c``) enable their
instruction sets with function target attributes (``internal.h``'s ``REALM_AVX2`` and
``REALM_AVX512*``, on every function, static inline helpers included), not
``#pragma GCC target``, which clang ignores: there, a function without the attribute cannot
use (or inline) an AVX intrinsic. Each source of ``build_ffi.SOURCES`` is compiled to an
object in a temporary directory, two at a time, with ``-O3`` as the real build (about 10 s a
compiler on two cores): with the clang that the ``ziglang`` package (a build dependency)
ships, in a fresh zig cache so that every file is really compiled, and with gcc where there is
one. Success is what is asserted (no ``-Werror``); a failure shows the compiler's messages.
x86-64 only: the attributes name x86 features.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "native"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        platform.machine().lower() not in ("x86_64", "amd64"),
        reason="the ISA-specific kernels target x86-64; this machine is " + platform.machine(),
    ),
]


def _build_config() -> tuple[list[str], list[str]]:
    """build_ffi's SOURCES and compile flags (without a sanitizer build's extras)."""
    saved = os.environ.pop("REALM_NATIVE_SANITIZE", None)
    try:
        spec = importlib.util.spec_from_file_location("_realm_build_ffi", ROOT / "build_ffi.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return list(module.SOURCES), list(module._compile_args())
    except Exception:  # not importable here: read the two definitions from the text
        text = (ROOT / "build_ffi.py").read_text()
        sources = re.search(r"^SOURCES = \[(.*?)\]", text, re.S | re.M)
        args = re.search(r"def _compile_args\(\).*?args = \[(.*?)\]", text, re.S)
        assert sources and args, "build_ffi.py: SOURCES or _compile_args not found"
        return re.findall(r'"([^"]+)"', sources.group(1)), re.findall(r'"([^"]+)"', args.group(1))
    finally:
        if saved is not None:
            os.environ["REALM_NATIVE_SANITIZE"] = saved


SOURCES, COMPILE_ARGS = _build_config()


def _compile_all(cc: list[str], out: Path, env: dict[str, str] | None = None) -> None:
    out.mkdir()

    def compile_one(source: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        obj = out / (Path(source).stem + ".o")
        cmd = [*cc, *COMPILE_ARGS, "-I", str(NATIVE), "-fPIC", "-c", str(NATIVE / source)]
        cmd += ["-o", str(obj)]
        return source, subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, SOURCES))
    failed = [(source, r) for source, r in results if r.returncode != 0]
    report = "\n\n".join(
        f"--- {source} (exit {r.returncode}):\n{r.stderr}{r.stdout}" for source, r in failed
    )
    assert not failed, f"{' '.join(cc)} failed on {len(failed)} of {len(SOURCES)} files\n{report}"
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(s).stem + ".o" for s in SOURCES)


def test_sources_are_the_build_sources() -> None:
    assert SOURCES, "no sources found in build_ffi.py"
    for source in SOURCES:
        assert (NATIVE / source).is_file(), source


@pytest.mark.skipif(importlib.util.find_spec("ziglang") is None, reason="ziglang not installed")
def test_native_sources_compile_with_clang(tmp_path: Path) -> None:
    cache = str(tmp_path / "zig-cache")
    env = {**os.environ, "ZIG_GLOBAL_CACHE_DIR": cache, "ZIG_LOCAL_CACHE_DIR": cache}
    cc = [sys.executable, "-m", "ziglang", "cc", "-target", "x86_64-linux-gnu"]
    _compile_all(cc, tmp_path / "obj", env)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_native_sources_compile_with_gcc(tmp_path: Path) -> None:
    _compile_all(["gcc"], tmp_path / "obj")
