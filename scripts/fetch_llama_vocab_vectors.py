"""Fetch llama.cpp's tokenizer test vectors (``models/ggml-vocab-*.gguf`` with ``.inp``/``.out``).

They ship inside the ``llama-cpp-python`` source distribution on PyPI, so this takes them from
the package registry (an install-time step, like any dependency), unpacks only the vocabulary
files and their vectors, and stores them in ``REALM_LLAMA_VOCAB_DIR`` (default
``~/.cache/realm/llama-vocab``), where ``tests/model/test_tokenizer_vectors.py`` finds them.
Nothing is fetched at test time; without this step those tests skip.

    python scripts/fetch_llama_vocab_vectors.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
VOCABS = ("llama-spm", "llama-bpe", "qwen2", "gpt-2", "falcon", "starcoder", "phi-3")


def vocab_dir() -> Path:
    return Path(os.environ.get("REALM_LLAMA_VOCAB_DIR", Path.home() / ".cache/realm/llama-vocab"))


def main() -> int:
    dest = vocab_dir()
    wanted = {f"ggml-vocab-{v}.gguf{ext}" for v in VOCABS for ext in ("", ".inp", ".out")}
    if dest.is_dir() and wanted <= {p.name for p in dest.iterdir()}:
        print(f"llama.cpp vocab vectors already in {dest}")
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*cmd, SDIST, "-d", tmp], check=True)
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name in wanted and "/models/" in member.name:
                    src = tar.extractfile(member)
                    assert src is not None
                    (dest / name).write_bytes(src.read())
    missing = wanted - {p.name for p in dest.iterdir()}
    if missing:
        print(f"missing from {SDIST}: {sorted(missing)}", file=sys.stderr)
        return 1
    print(f"llama.cpp vocab vectors for {', '.join(VOCABS)} in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
