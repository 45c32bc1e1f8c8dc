"""cffi out-of-line API-mode builder for Realm's native kernels (``realm.kernels._native``).

``native/kernels.h`` is the single source of the C declarations: its preprocessor lines are
dropped (except integer ``#define`` constants) and the rest is fed to ``ffi.cdef``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent
NATIVE = ROOT / "native"
SOURCES = [
    "kernels.c",
    "lora.c",
    "lora_avx2.c",
    "pool.c",
    "scalar.c",
    "avx2.c",
    "attn_avx2.c",
    "avx512.c",
    "gemm_avx2.c",
    "gemm_avx512.c",
    "gemm_q8_avx512.c",
    "gemm_q8_avx2.c",
    "gemm_kq_avx512.c",
    "gemm_kq_avx2.c",
    "quants.c",
    "quants_avx2.c",
    "quants_avx512.c",
    "matmul.c",
    "packed.c",
    "ops.c",
    "forward.c",
]
_DEFINE = re.compile(r"^#define\s+REALM_\w+\s+-?\d+\b")


def cdef_text(header: str) -> str:
    """Return the header with everything cffi's cdef cannot parse removed."""
    keep = []
    for line in header.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            if _DEFINE.match(stripped):
                keep.append(stripped.split("/*")[0].rstrip())
            continue
        keep.append(line)
    return "\n".join(keep)


def _compile_args() -> list[str]:
    args = ["-O3", "-std=gnu11", "-fno-math-errno", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    if os.environ.get("REALM_NATIVE_SANITIZE"):  # e.g. "address": a debugging build
        args += [
            f"-fsanitize={os.environ['REALM_NATIVE_SANITIZE']}",
            "-fno-omit-frame-pointer",
            "-O1",
        ]
    return args


ffibuilder = FFI()
ffibuilder.cdef(cdef_text((NATIVE / "kernels.h").read_text()))
ffibuilder.set_source(
    "realm.kernels._native",
    '#include "kernels.h"',
    sources=[str(Path("native") / s) for s in SOURCES],
    include_dirs=["native"],
    extra_compile_args=_compile_args(),
    extra_link_args=["-lpthread", "-lm"]
    + (
        [f"-fsanitize={os.environ['REALM_NATIVE_SANITIZE']}"]
        if os.environ.get("REALM_NATIVE_SANITIZE")
        else []
    ),
)


def build_inplace(verbose: bool = False) -> Path:
    """Build the extension beside the sources (``python build_ffi.py``), safely for processes
    that have the old library loaded: it is compiled in a scratch folder and renamed into place
    (a new inode, never overwritten in place), and concurrent builds are serialised by a lock."""
    import fcntl
    import shutil
    import tempfile

    os.chdir(ROOT)
    with open(Path(tempfile.gettempdir()) / "realm-native-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with tempfile.TemporaryDirectory(prefix="realm-native-") as tmp:
            scratch = Path(tmp)
            shutil.copytree(NATIVE, scratch / "native")
            # cffi compiles in tmpdir, where the relative "native/..." source paths resolve
            built = Path(ffibuilder.compile(tmpdir=str(scratch), verbose=verbose))
            if not built.is_absolute():
                built = scratch / built
            target = ROOT / "realm" / "kernels" / built.name
            staged = target.with_name(target.name + ".new")
            shutil.copy2(built, staged)
            os.replace(staged, target)
            return target


if __name__ == "__main__":
    print(build_inplace(verbose="-v" in sys.argv))
