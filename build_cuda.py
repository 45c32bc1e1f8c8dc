"""Optional builder of Realm's CUDA kernels (``realm.kernels._cuda_native``).

The CUDA sources (``native/cuda/*.cu``) are compiled by ``nvcc`` where it exists and linked,
with CUDA's static runtime, into a second cffi extension beside the CPU one. A machine without
``nvcc`` builds and runs exactly as before; a failing CUDA build never fails the install
(``setup.py`` calls ``try_build``). Nothing imports the extension until a caller asks for
``device="cuda"``, so the CPU library never depends on CUDA being present.

Design (docs/kernels.md, "CUDA"): a second module rather than nvcc objects inside the CPU
extension, so that the CPU build (``build_ffi.py``) stays untouched and cannot be broken by
a CUDA toolchain, and so that a broken or absent CUDA runtime can only ever affect
``device="cuda"`` callers. The static runtime loads the driver (``libcuda``) at the first CUDA
call: importing works on a machine with no driver, and the error comes back as a status.

Compile time is kept small: SASS for ``sm_80`` and ``sm_90`` plus ``compute_90`` PTX (which
newer GPUs JIT-compile), two sources at a time, objects cached under ``build/cuda-cache`` by
a hash of the sources, the flags and the nvcc version. ``REALM_CUDA_ARCHS="86 89"`` overrides
the SASS list; ``REALM_CUDA=0`` skips the build; ``REALM_CUDA=1`` makes its failure an error.

Usage: ``python build_cuda.py`` builds the extension in place (like ``python build_ffi.py``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
NATIVE = ROOT / "native"
CUDA_DIR = NATIVE / "cuda"
CUDA_SOURCES = ["runtime.cu", "ops.cu", "matmul.cu", "attention.cu", "forward.cu"]
DEFAULT_ARCHS = ("80", "90")  # A100-class and H100-class SASS; PTX of the last one
MODULE = "realm.kernels._cuda_native"
NVCC_TIMEOUT_S = 600  # per source file

_DEFINE = re.compile(r"^#define\s+REALM_\w+\s+-?\d+\b")
_TYPEDEF = re.compile(r"^typedef\s+struct\s*\{.*?^\}\s*\w+;|^typedef\s+int\s*\(\*\w+\)[^;]*;",
                      re.S | re.M)  # fmt: skip


class CudaBuildError(RuntimeError):
    """The CUDA extension could not be built (no nvcc, a compile or link error)."""


def find_nvcc() -> str | None:
    """``$REALM_NVCC``, ``$CUDA_HOME/bin/nvcc``, or ``nvcc`` on PATH; None if none exists."""
    home = os.environ.get("CUDA_HOME")
    for candidate in (
        os.environ.get("REALM_NVCC"),
        os.path.join(home, "bin", "nvcc") if home else None,
        shutil.which("nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def cuda_lib_dir(nvcc: str) -> Path:
    """The folder holding ``libcudart_static.a`` for this nvcc."""
    homes = [Path(nvcc).resolve().parent.parent]
    if os.environ.get("CUDA_HOME"):
        homes.insert(0, Path(os.environ["CUDA_HOME"]))
    homes.append(Path("/usr/local/cuda"))  # nvcc may be a wrapper script outside the toolkit
    for home in homes:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (home / sub / "libcudart_static.a").is_file():
                return home / sub
    raise CudaBuildError(f"libcudart_static.a not found under {', '.join(map(str, homes))}")


def archs() -> tuple[str, ...]:
    env = os.environ.get("REALM_CUDA_ARCHS")
    if not env:
        return DEFAULT_ARCHS
    found = tuple(re.findall(r"\d+", env))
    if not found:
        raise CudaBuildError(f"REALM_CUDA_ARCHS={env!r} names no architecture (e.g. '80 90')")
    return found


def nvcc_flags(arch_list: tuple[str, ...]) -> list[str]:
    """Flags for one object: SASS for every arch, and PTX of the last one for newer GPUs."""
    flags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-Wall",
             f"-I{NATIVE}", f"-I{CUDA_DIR}"]  # fmt: skip
    for a in arch_list:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{arch_list[-1]},code=compute_{arch_list[-1]}"]
    return flags


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout


def _source_hash(name: str, flags: list[str], version: str) -> str:
    h = hashlib.sha256()
    h.update(version.encode())
    h.update("\0".join(flags).encode())
    h.update(name.encode())
    for dep in sorted(CUDA_DIR.glob("*.cu*")) + sorted(CUDA_DIR.glob("*.h")):
        if dep.suffix == ".cu" and dep.name != name:
            continue  # other translation units do not affect this one
        h.update(dep.name.encode())
        h.update(dep.read_bytes())
    h.update((NATIVE / "kernels.h").read_bytes())
    return h.hexdigest()[:20]


def compile_objects(
    nvcc: str,
    cache_dir: Path,
    *,
    arch_list: tuple[str, ...] | None = None,
    jobs: int = 2,
    verbose: bool = False,
) -> list[Path]:
    """Compile every CUDA source to an object in ``cache_dir`` (reused when unchanged)."""
    arch_list = archs() if arch_list is None else arch_list
    flags = nvcc_flags(arch_list)
    version = _nvcc_version(nvcc)
    cache_dir.mkdir(parents=True, exist_ok=True)

    def one(name: str) -> Path:
        obj = cache_dir / f"{Path(name).stem}-{_source_hash(name, flags, version)}.o"
        if obj.is_file():
            return obj
        tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
        cmd = [nvcc, *flags, "-c", str(CUDA_DIR / name), "-o", str(tmp)]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise CudaBuildError(f"nvcc timed out on {name}") from e
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise CudaBuildError(f"nvcc failed on {name}:\n{r.stdout}{r.stderr}")
        os.replace(tmp, obj)
        return obj

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, CUDA_SOURCES))


def cdef_text() -> str:
    """The CUDA module's declarations: kernels.h's integer constants and types, then
    realm_cuda.h's functions (preprocessor lines and the ``extern "C"`` wrapper dropped)."""
    header = (NATIVE / "kernels.h").read_text()
    defines = [
        line.strip().split("/*")[0].rstrip()
        for line in header.splitlines()
        if _DEFINE.match(line.strip())
    ]
    types = _TYPEDEF.findall(header)
    keep = []
    for line in (CUDA_DIR / "realm_cuda.h").read_text().splitlines():
        s = line.strip()
        if s.startswith("#"):
            if _DEFINE.match(s):
                keep.append(s.split("/*")[0].rstrip())
            continue
        if s in ('extern "C" {', "}"):
            continue
        keep.append(line)
    return "\n".join(defines + types + keep)


def make_ffibuilder(objects: list[Path], lib_dir: Path) -> object:
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(cdef_text())
    ffi.set_source(
        MODULE,
        '#include "realm_cuda.h"',
        include_dirs=[str(NATIVE), str(CUDA_DIR)],
        extra_objects=[str(o) for o in objects],
        library_dirs=[str(lib_dir)],
        # the static runtime and what it needs; libcuda itself is opened at run time
        libraries=["cudart_static", "stdc++", "dl", "rt", "pthread", "m"],
        extra_compile_args=["-O2"],
    )
    return ffi


def build(target_dir: Path, *, verbose: bool = False, cache_dir: Path | None = None) -> Path:
    """Build the extension and place it in ``target_dir``; returns its path.

    Raises CudaBuildError when nvcc is missing or a step fails.
    """
    import tempfile

    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaBuildError("nvcc not found (set CUDA_HOME or REALM_NVCC, or put it on PATH)")
    cache_dir = ROOT / "build" / "cuda-cache" if cache_dir is None else cache_dir
    objects = compile_objects(nvcc, cache_dir, verbose=verbose)
    ffi = make_ffibuilder(objects, cuda_lib_dir(nvcc))
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="realm-cuda-") as tmp:
        try:
            built = Path(ffi.compile(tmpdir=tmp, verbose=verbose))  # type: ignore[attr-defined]
        except Exception as e:  # distutils' CompileError / LinkError
            raise CudaBuildError(f"linking the CUDA extension failed: {e}") from e
        if not built.is_absolute():
            built = Path(tmp) / built
        target = target_dir / built.name
        staged = target.with_name(target.name + ".new")
        shutil.copy2(built, staged)
        os.replace(staged, target)  # a new inode: processes that loaded the old one are safe
        return target


def try_build(target_dir: Path, *, verbose: bool = False) -> Path | None:
    """``build`` for the install: never raises unless ``REALM_CUDA=1`` asks for CUDA."""
    mode = os.environ.get("REALM_CUDA", "auto").lower()
    if mode in ("0", "off", "no", "false"):
        return None
    if mode == "auto" and find_nvcc() is None:
        return None
    try:
        return build(target_dir, verbose=verbose)
    except Exception as e:
        if mode in ("1", "on", "yes", "true"):
            raise
        print(f"warning: Realm's optional CUDA kernels were not built: {e}", file=sys.stderr)
        return None


def build_inplace(verbose: bool = False) -> Path:
    """Build beside the sources (``python build_cuda.py``), serialised by a lock."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / "realm-cuda-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build(ROOT / "realm" / "kernels", verbose=verbose)


if __name__ == "__main__":
    try:
        print(build_inplace(verbose="-v" in sys.argv))
    except CudaBuildError as e:
        sys.exit(f"error: {e}")
