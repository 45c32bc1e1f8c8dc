"""Device selection: ``device="cpu"`` stays the default and never touches CUDA; a CUDA
request that cannot be served fails with ``CudaUnavailable`` naming why (no CUDA build, a
driver error, no device); bad device names and options are refused at every entry point
(kernels, ``load_model``, the registry, the server config). These run on every machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import realm
from realm import kernels
from realm._errors import KernelError, ModelError
from realm.kernels import _cuda
from realm.server._config import ConfigError, config_from_dict
from realm.testing import write_test_model

AVAILABLE = kernels.cuda_available()
needs_no_gpu = pytest.mark.skipif(AVAILABLE, reason="a usable GPU is here: see test_cuda_kernels")


def test_cpu_import_and_kernels_never_load_cuda() -> None:
    code = (
        "import sys, numpy as np, realm\n"
        "realm.kernels.matmul(np.ones((2, 32), np.float32), np.ones(32, np.float32))\n"
        "print('realm.kernels._cuda_native' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:-1", "CUDA", "cuda:1000", "", 0, None])
def test_bad_device_names_are_refused(device: object) -> None:
    w, x = np.ones((2, 32), np.float32), np.ones(32, np.float32)
    with pytest.raises(KernelError, match="device must be"):
        kernels.matmul(w, x, device=device)  # type: ignore[arg-type]


def test_parse_device() -> None:
    assert kernels.parse_device("cpu") is None
    assert kernels.parse_device("cuda") == 0
    assert kernels.parse_device("cuda:3") == 3


@needs_no_gpu
@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("matmul", (np.ones((4, 32), np.float32), np.ones(32, np.float32))),
        ("rmsnorm", (np.ones((2, 8), np.float32), None, 1e-5)),
        ("swiglu", (np.ones(8, np.float32), np.ones(8, np.float32))),
        ("get_rows", (np.ones((4, 8), np.float32), np.array([1, 2], np.int32))),
    ],
)
def test_cuda_kernels_say_why_they_cannot_run(name: str, args: tuple[object, ...]) -> None:
    with pytest.raises(kernels.CudaUnavailable) as info:
        getattr(kernels, name)(*args, device="cuda")
    assert info.value.reason in ("no-build", "driver", "no-device")
    assert len(str(info.value)) > 30  # a sentence, not a code


def test_bad_arguments_are_refused_before_the_device_is_touched() -> None:
    # the same checks as the CPU's, run first: a wrong dtype never reaches CUDA
    with pytest.raises(KernelError, match="dtype"):
        kernels.matmul(np.ones((4, 32), np.float64), np.ones(32, np.float32), device="cuda")
    with pytest.raises(KernelError, match="columns"):
        kernels.matmul(np.ones((4, 32), np.float32), np.ones(31, np.float32), device="cuda")


def test_no_build_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cuda, "_native", None)
    monkeypatch.setitem(sys.modules, "realm.kernels._cuda_native", None)  # import fails
    monkeypatch.setattr(_cuda, "_devices", {})
    with pytest.raises(kernels.CudaUnavailable, match="built without its CUDA kernels") as info:
        kernels.cuda_device("cuda")
    assert info.value.reason == "no-build"
    assert kernels.cuda_status().startswith("no-build")
    assert not kernels.cuda_available()


@needs_no_gpu
def test_status_names_the_reason() -> None:
    status = kernels.cuda_status()
    assert status.split(":")[0] in ("no-build", "driver", "no-device")


@needs_no_gpu
def test_load_model_on_cuda_says_why(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf")
    with pytest.raises(kernels.CudaUnavailable) as info:
        realm.load_model(path, device="cuda")
    assert info.value.reason in ("no-build", "driver", "no-device")


def test_load_model_options_are_checked(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf")
    with pytest.raises(ModelError, match="device must be"):
        realm.load_model(path, device="tpu")
    with pytest.raises(ModelError, match="needs a CUDA device"):
        realm.load_model(path, max_device_bytes=1 << 20)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ModelError, match="max_device_bytes"):
            realm.load_model(path, device="cuda", max_device_bytes=bad)  # type: ignore[arg-type]
    model = realm.load_model(path)  # the default is the CPU
    assert model.device == "cpu"
    assert model.logits([1, 2, 3]).shape == (3, model.info.vocab_size)


@needs_no_gpu
def test_registry_device_reaches_the_model(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf")
    registry = realm.model.ModelRegistry(device="cuda")
    with pytest.raises(kernels.CudaUnavailable):
        registry.load("m", path)
    assert realm.model.ModelRegistry().load("m", path).device == "cpu"


def test_server_config_device_key(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf")
    doc = {"models": {"m": str(path)}}
    assert config_from_dict(doc).device == "cpu"
    for good in ("cpu", "cuda", "cuda:1"):
        assert config_from_dict({**doc, "server": {"device": good}}).device == good
    for bad in ("gpu", 1, "cuda:x", ""):
        with pytest.raises(ConfigError, match=r"server\.device"):
            config_from_dict({**doc, "server": {"device": bad}})
