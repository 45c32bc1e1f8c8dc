"""A registry of loaded models by name: one copy of each model's weights for every tenant."""

from __future__ import annotations

import os
import threading
from typing import Any

from .._errors import ModelError
from ._gguf import open_model_file
from ._model import Model
from ._pager import PagerStatistics, PagingBudget


class ModelRegistry:
    """Models loaded by name. Two names for the same file content share one ``Model``.

    With ``max_resident_bytes`` (an int, or a ``PagingBudget`` to share with models loaded
    elsewhere) every model it loads is paged under that one budget: together their resident
    blocks stay within it (docs/models.md, "Layer paging"). ``device`` ("cpu", "cuda",
    "cuda:N") is where every model it loads runs unless a load names its own.
    """

    def __init__(
        self, *, max_resident_bytes: int | PagingBudget | None = None, device: str = "cpu"
    ) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._by_name: dict[str, Model] = {}
        self._by_key: dict[tuple[Any, ...], Model] = {}
        self.budget: PagingBudget | None = (
            None
            if max_resident_bytes is None
            else max_resident_bytes
            if isinstance(max_resident_bytes, PagingBudget)
            else PagingBudget(max_resident_bytes)
        )

    def load(self, name: str, path: str | os.PathLike[str], **options: Any) -> Model:
        """Load ``path`` under ``name`` (options as ``load_model``); returns the model.

        If a model with the same content (fingerprint) and options is loaded already, the new
        name refers to it: weights are never held twice.
        """
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ModelError(f"model name must be a non-empty string of <= 128 chars, got {name!r}")
        if self.budget is not None:
            if options.get("max_resident_bytes") is not None:
                raise ModelError(
                    f"model {name!r}: this registry pages every model under its shared budget; "
                    "max_resident_bytes cannot be given per model"
                )
            options = {**options, "max_resident_bytes": self.budget}
        if self.device != "cpu":
            options = {"device": self.device, **options}
        with self._lock:
            if name in self._by_name:
                raise ModelError(f"a model named {name!r} is loaded already")
        mf = open_model_file(path)
        key = (mf.info.fingerprint, tuple(sorted(options.items(), key=lambda kv: kv[0])))
        with self._lock:
            if name in self._by_name:
                raise ModelError(f"a model named {name!r} is loaded already")
            model = self._by_key.get(key)
            if model is None:
                model = Model(mf, **options)
                self._by_key[key] = model
            self._by_name[name] = model
            return model

    def get(self, name: str) -> Model:
        with self._lock:
            model = self._by_name.get(name) if isinstance(name, str) else None
            if model is None:
                known = ", ".join(sorted(self._by_name)) or "none"
                raise ModelError(f"unknown model {name!r} (loaded: {known})")
            return model

    def unload(self, name: str) -> None:
        """Forget ``name``; the model is dropped when no other name refers to it."""
        with self._lock:
            model = self._by_name.pop(name, None)
            if model is None:
                raise ModelError(f"unknown model {name!r}")
            if model not in self._by_name.values():
                self._by_key = {k: m for k, m in self._by_key.items() if m is not model}

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def info(self) -> dict[str, dict[str, Any]]:
        """``ModelInfo`` of each name, as dicts (what ``system_models`` serves)."""
        with self._lock:
            return {n: m.info.as_dict() for n, m in sorted(self._by_name.items())}

    def pager_statistics(self) -> dict[str, PagerStatistics]:
        """Each paged model's ``PagerStatistics`` by name (names of one model repeat its
        figures); unpaged models are left out."""
        with self._lock:
            paged = {n: m.pager for n, m in sorted(self._by_name.items()) if m.pager is not None}
        return {n: p.statistics() for n, p in paged.items()}

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._by_name

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_name)
