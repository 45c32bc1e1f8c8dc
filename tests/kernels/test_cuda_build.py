"""The optional CUDA build: the sources compile wherever nvcc exists (with or without a GPU),
the extension links against the static runtime and imports without a driver, the CUDA block
readers (compiled for the host) decode every weight type as the CPU library does, and a
missing or failing toolchain never fails an install.

The compile checks use one architecture (``sm_80``) and ``-c`` per source, two at a time, so
syntax and API errors in ``native/cuda`` fail CI on any machine with the CUDA toolkit in well
under 90 s; without nvcc they skip and say so.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _build_cuda() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_realm_build_cuda", ROOT / "build_cuda.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bc = _build_cuda()
NVCC = bc.find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None,
    reason="NO CUDA COMPILE CHECK: nvcc not found (install the CUDA toolkit or set CUDA_HOME)",
)


@pytest.fixture(scope="module")
def object_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One object cache for the compile and link checks: each source is compiled once."""
    return tmp_path_factory.mktemp("cuda-objects")


@needs_nvcc
@pytest.mark.slow
def test_every_cuda_source_compiles(object_cache: Path) -> None:
    try:
        objects = bc.compile_objects(NVCC, object_cache, arch_list=("80",), jobs=2)
    except bc.CudaBuildError as e:
        pytest.fail(str(e), pytrace=False)
    assert len(objects) == len(bc.CUDA_SOURCES) and all(o.stat().st_size > 0 for o in objects)


def test_sources_list_matches_the_folder() -> None:
    on_disk = sorted(p.name for p in bc.CUDA_DIR.glob("*.cu"))
    assert sorted(bc.CUDA_SOURCES) == on_disk


def test_cdef_is_parsed_by_cffi() -> None:
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(bc.cdef_text())
    # the shared types come from kernels.h, once
    assert ffi.sizeof("realm_model") > 0 and ffi.sizeof("realm_seq") > 0
    # CPU functions are not declared (they are not linked into this module)
    assert not re.search(r"\brealm_(forward|matmul|attention)\s*\(", bc.cdef_text())


@needs_nvcc
@pytest.mark.slow
def test_extension_links_and_imports_without_a_driver(tmp_path: Path, object_cache: Path) -> None:
    """Build for one arch into a scratch folder, import it in a fresh process: the status of
    the device count is OK (a GPU is here) or REALM_ECUDA with the runtime's message."""
    env = {**os.environ, "REALM_CUDA_ARCHS": "80"}
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import importlib.util
from pathlib import Path
spec = importlib.util.spec_from_file_location("bc", {str(ROOT / "build_cuda.py")!r})
bc = importlib.util.module_from_spec(spec); spec.loader.exec_module(bc)
out = bc.build(Path({str(tmp_path / "pkg")!r}), cache_dir=Path({str(object_cache)!r}))
spec = importlib.util.spec_from_file_location("realm.kernels._cuda_native", out)
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
n = mod.ffi.new("int32_t *")
rc = mod.lib.realm_cuda_device_count(n)
print(rc, n[0], mod.ffi.string(mod.lib.realm_cuda_error()).decode())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, env=env)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    rc, count, *message = r.stdout.split()
    if int(rc) == 0:
        assert int(count) >= 0
    else:
        assert int(rc) == -5 and message  # REALM_ECUDA names the driver's problem


def test_install_goes_on_without_nvcc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("REALM_CUDA", raising=False)
    monkeypatch.setattr(bc, "find_nvcc", lambda: None)
    assert bc.try_build(tmp_path) is None
    with pytest.raises(bc.CudaBuildError, match="nvcc not found"):
        bc.build(tmp_path)


def test_a_failing_cuda_build_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise bc.CudaBuildError("nvcc failed on ops.cu: error")

    monkeypatch.setattr(bc, "find_nvcc", lambda: "/usr/bin/true")
    monkeypatch.setattr(bc, "build", broken)
    monkeypatch.delenv("REALM_CUDA", raising=False)
    assert bc.try_build(tmp_path) is None
    assert "CUDA kernels were not built" in capsys.readouterr().err
    monkeypatch.setenv("REALM_CUDA", "1")  # asked for: the failure is an error
    with pytest.raises(bc.CudaBuildError):
        bc.try_build(tmp_path)
    monkeypatch.setenv("REALM_CUDA", "0")  # switched off: not even tried
    assert bc.try_build(tmp_path) is None


def test_arch_list_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REALM_CUDA_ARCHS", "86 89")
    assert bc.archs() == ("86", "89")
    flags = bc.nvcc_flags(bc.archs())
    assert "arch=compute_86,code=sm_86" in flags and "arch=compute_89,code=compute_89" in flags
    monkeypatch.setenv("REALM_CUDA_ARCHS", "none")
    with pytest.raises(bc.CudaBuildError):
        bc.archs()


#: a host program of the CUDA library's block readers (common.cuh, __host__ __device__):
#: argv type n_rows n_cols in.bin out.bin; writes the rows decoded as float32
_READER_HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "common.cuh"
int main(int argc, char **argv) {
    if (argc != 6) return 2;
    const int type = atoi(argv[1]);
    const long rows = atol(argv[2]), cols = atol(argv[3]);
    const int64_t rb = realm_cu_row_bytes(type, cols);
    if (rb <= 0) return 3;
    std::vector<uint8_t> in((size_t)(rows * rb));
    std::vector<float> out((size_t)(rows * cols));
    FILE *f = fopen(argv[4], "rb");
    if (!f || fread(in.data(), 1, in.size(), f) != in.size()) return 4;
    fclose(f);
    for (long r = 0; r < rows; r++) {
        const uint8_t *row = in.data() + r * rb;
        float *o = out.data() + r * cols;
        if (realm_cu_block_elems(type) == 1)
            for (long c = 0; c < cols; c++) o[c] = realm_cu_float_elem(type, row, c);
        else
            for (long b = 0; b < cols / 32; b++) realm_cu_dequant_block(type, row, b, o + b * 32);
    }
    f = fopen(argv[5], "wb");
    if (!f || fwrite(out.data(), 4, out.size(), f) != out.size()) return 5;
    fclose(f);
    return 0;
}
"""


@needs_nvcc
@pytest.mark.slow
def test_block_readers_decode_as_the_cpu(tmp_path: Path) -> None:
    """The CUDA unpackers of every block type, built for the host, against the CPU library's
    dequantization (bit-exact with the gguf package): random bytes with real scales, so every
    bit pattern of the quantized fields occurs."""
    import numpy as np

    from realm import kernels
    from realm.kernels import WeightType

    src = tmp_path / "readers.cu"
    src.write_text(_READER_HARNESS)
    exe = tmp_path / "readers"
    cmd = [NVCC, "-std=c++17", "-O2", f"-I{bc.NATIVE}", f"-I{bc.CUDA_DIR}", str(src), "-o",
           str(exe)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rng = np.random.default_rng(7)
    for wt in WeightType:
        n_rows, n_cols = 5, 2 * max(wt.block_elems, 32)
        if wt.block_elems == 1:
            raw = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
            data = kernels.quantize(raw, wt) if wt != WeightType.F32 else raw
        elif wt.writable:
            data = kernels.quantize(rng.standard_normal((n_rows, n_cols)).astype(np.float32), wt)
        else:
            data = rng.integers(0, 256, (n_rows, wt.row_bytes(n_cols)), dtype=np.uint8)
            nb = n_cols // wt.block_elems
            blocks = data.reshape(n_rows, nb, wt.block_bytes)
            for off in _HALF_FIELDS[wt.name]:  # finite scales, as files have
                half = (rng.standard_normal((n_rows, nb)) * 0.02).astype(np.float16)
                blocks[:, :, off : off + 2] = half.view(np.uint8).reshape(n_rows, nb, 2)
        (tmp_path / "in.bin").write_bytes(np.ascontiguousarray(data).tobytes())
        run = subprocess.run([str(exe), str(int(wt)), str(n_rows), str(n_cols),
                              str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                             capture_output=True, timeout=60)  # fmt: skip
        assert run.returncode == 0, (wt.name, run.returncode)
        got = np.fromfile(tmp_path / "out.bin", np.float32).reshape(n_rows, n_cols)
        want = kernels.dequantize(data, wt).reshape(n_rows, n_cols)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=wt.name)


_HALF_FIELDS = {
    "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,),
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,),
}  # fmt: skip
