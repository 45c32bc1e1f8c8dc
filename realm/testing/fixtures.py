"""Plain helpers for tests of code that runs guests: a tiny model and a ready guest instance.

Import them from here (``realm.testing`` itself does not re-export them)::

    from realm.sandbox import SandboxEngine
    from realm.testing.fixtures import guest_instance, tiny_model

    model = tiny_model()                       # a small random-weight llama, real tokenizer
    with SandboxEngine() as engine:
        guest = guest_instance(engine, model)  # the default guest, tenant "test"
        print(guest.call("count_tokens", {"text": "hello world"}))
        guest.tenant.close()                   # free the tenant's sessions (KV caches)

For pytest, ``realm.testing.pytest_plugin`` wraps these in fixtures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from ..model import Model, load_model
from ..sandbox import (
    GuestInstance,
    GuestLimits,
    GuestModule,
    SandboxEngine,
    TenantState,
    default_guest_path,
)
from .models import write_test_model

__all__ = ["MODEL_NAME", "guest_instance", "tiny_model"]

#: the name under which ``guest_instance`` offers the model to the guest (also the default)
MODEL_NAME = "tiny"


def tiny_model(path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Model:
    """Write a small test model with ``write_test_model`` and load it.

    Args:
        path: where to write the GGUF file (overwritten). None: a fresh temporary directory,
            removed when the returned model is garbage collected.
        **kwargs: passed to :func:`realm.testing.write_test_model` (``n_layers``, ``arch``,
            ``wtype``, ``seed``, ``context_length`` ...); its defaults make a 2-layer llama
            with a 587-token vocabulary that loads in milliseconds.
    """
    if path is not None:
        return load_model(write_test_model(path, **kwargs))
    tmp = tempfile.mkdtemp(prefix="realm-tiny-")
    try:
        model = load_model(write_test_model(Path(tmp) / "tiny.gguf", **kwargs))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the file is memory-mapped; on POSIX it may go once unused, and it does with the model
    weakref.finalize(model, shutil.rmtree, tmp, ignore_errors=True)
    return model


def guest_instance(
    engine: SandboxEngine,
    model: Model,
    wasm: bytes | str | os.PathLike[str] | GuestModule | None = None,
    tenant: str = "test",
    limits: GuestLimits | None = None,
) -> GuestInstance:
    """A guest instance serving a tenant whose only model is ``model`` (named ``"tiny"``).

    Args:
        engine: an open :class:`~realm.sandbox.SandboxEngine` (it compiles and caches modules).
        model: the tenant's model, also its default model.
        wasm: the guest: a ``.wasm`` path, module bytes (or WAT text), an already compiled
            :class:`~realm.sandbox.GuestModule`, or None for Realm's default guest.
        tenant: the tenant's name.
        limits: the tenant's sandbox limits (None: the defaults).

    The instance's ``tenant`` (a :class:`~realm.sandbox.TenantState`) holds the sessions the
    guest opens; call ``instance.tenant.close()`` when done with it.
    """
    if wasm is None:
        wasm = default_guest_path()
    module = wasm if isinstance(wasm, GuestModule) else engine.compile(wasm)
    state = TenantState(tenant, {MODEL_NAME: model}, limits=limits)
    return GuestInstance(engine, module, state)
