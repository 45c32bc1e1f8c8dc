"""Build C guests to wasm32 with the ziglang compiler from PyPI (no system toolchain needed).

``build(src, out)`` builds any guest that includes ``realm_guest.h`` (``realm guest build``);
``python -m realm.sandbox._build`` (or ``python guest/build.py``) rebuilds the default guest
``guest/default_guest.c`` into ``realm/sandbox/guests/default.wasm``. Standard library only:
setup.py loads this file by path to build the guest before the package is installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent  # realm/sandbox
ROOT = PACKAGE_DIR.parent.parent
# the SDK: guest/ in a source checkout, realm/sandbox/sdk/ in an installed package
GUEST_DIR = ROOT / "guest" if (ROOT / "guest" / "realm_guest.h").is_file() else PACKAGE_DIR / "sdk"
DEFAULT_SOURCE = GUEST_DIR / "default_guest.c"
DEFAULT_OUTPUT = PACKAGE_DIR / "guests" / "default.wasm"

STACK_SIZE = 1 << 20  # 1 MiB of shadow stack at the bottom of linear memory

# The flags every guest needs. `export_name` attributes export their functions by themselves;
# --no-entry because a guest is a library (no _start); --export-memory for the host's view of it.
FLAGS = (
    "--target=wasm32-freestanding",
    "-nostdlib",
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Werror=implicit-function-declaration",
    "-Werror=int-conversion",
    "-Werror=incompatible-pointer-types",
    "-fno-exceptions",
    "-g0",
    "-Wl,--no-entry",
    "-Wl,--export-memory",
    f"-Wl,-z,stack-size={STACK_SIZE}",
)


class GuestBuildError(RuntimeError):
    """The compiler rejected a guest; the message carries its output."""


def build(
    src: Path,
    out: Path,
    *,
    include: Path = GUEST_DIR,
    opt: str = "-O2",
    extra: tuple[str, ...] = (),
    strip: bool = True,
    timeout: float = 300.0,
) -> Path:
    """Compile the C guest ``src`` to the wasm module ``out`` and return ``out``.

    Args:
        src: the guest's C file (it includes ``realm_guest.h``).
        out: where to write the ``.wasm`` (its directory is created).
        include: directory searched for ``realm_guest.h``.
        opt: the optimisation flag (``-O2``, ``-Os``, ``-O0`` ...).
        extra: more compiler flags (``-D...``, ``-msimd128`` ...).
        strip: drop the name section (smaller; False keeps function names in trap backtraces).
        timeout: seconds before the compiler is given up on.

    Raises:
        GuestBuildError: the compiler failed (its output is in the message), or did not run.
    """
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise GuestBuildError(f"guest source {src} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    cmd = [
        sys.executable,
        "-m",
        "ziglang",
        "cc",
        *FLAGS,
        opt,
        *(("-Wl,--strip-all",) if strip else ()),
        f"-I{include}",
        *extra,
        "-o",
        str(tmp),
        str(src),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GuestBuildError(f"could not run the guest compiler ({' '.join(cmd)}): {e}") from e
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        output = (proc.stderr + proc.stdout).strip() or "(no output)"
        raise GuestBuildError(
            f"building {src.name} failed (exit {proc.returncode}):\n{output}\n"
            f"command: {' '.join(cmd)}"
        )
    tmp.replace(out)  # atomic: a reader never sees a half-written module
    return out


def main() -> int:
    try:
        out = build(DEFAULT_SOURCE, DEFAULT_OUTPUT)
    except GuestBuildError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{out.relative_to(ROOT)}: {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
