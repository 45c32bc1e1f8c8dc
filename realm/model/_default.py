"""The built-in default model: a tiny llama that ships with the package (no download).

``realm/model/default/realm-tiny.gguf`` is trained by ``scripts/train_tiny.py`` on English text
that ships with Python; ``realm-tiny.json`` beside it records how (see docs/default-model.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from .._errors import ModelError

#: the package directory holding the default model and its training report
DEFAULT_MODEL_DIR: Final = Path(__file__).resolve().parent / "default"
DEFAULT_MODEL_FILE: Final = "realm-tiny.gguf"


def default_model_path() -> Path:
    """The path of the built-in default model's GGUF file.

    Raises:
        ModelError: the file is not there (an install without the package data).
    """
    path = DEFAULT_MODEL_DIR / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelError(
            f"the built-in default model is missing: {path} does not exist (the package was "
            "installed without its data; reinstall realm, or retrain it with "
            "scripts/train_tiny.py)"
        )
    return path
