"""The CUDA backend's Python side on every machine, through a stand-in for the CUDA library.

The stand-in implements the ``realm_cuda_*`` ABI on host memory with the CPU kernels (a
"device pointer" is a host address): it checks what the GPU tests cannot check without a
GPU — device selection, uploads of shared weights, device KV caches (growth, forks,
accounting, freeing), layer paging under a device budget, the step's structures as
``realm_cuda_forward`` receives them, the kernels' ``device="cuda"`` entry points, the
runtime's batcher on top and the benchmark's model cases — and says nothing about the CUDA
kernels themselves (``test_cuda_kernels.py`` does, on a GPU). Results must therefore equal
the CPU path's exactly.
"""

from __future__ import annotations

import collections
import gc
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from realm.kernels._native import ffi, lib

import realm
from realm import kernels
from realm.kernels import SeqStep, _cuda
from realm.testing import write_test_model

IDS = [1, 5, 9, 200, 17, 3, 42, 300, 7, 11]
DEVICE_BYTES = 1 << 30


def _addr(p: Any) -> int:
    return int(ffi.cast("uintptr_t", p))


class FakeCudaLib:
    """``realm_cuda_*`` on host memory: allocations are numpy buffers, kernels the CPU's."""

    def __init__(self) -> None:
        self.live: dict[int, np.ndarray] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self._err = ffi.new("char[]", b"")

    def __getattr__(self, name: str) -> Any:
        # the kernels: same signature as the CPU function of the same name
        cpu = {"realm_cuda_rope": None}.get(name, getattr(lib, name.replace("_cuda", ""), None))
        if name.startswith("realm_cuda_") and cpu is not None:

            def run(*args: Any) -> int:
                self.calls[name] += 1
                return int(cpu(*args))

            return run
        raise AttributeError(name)

    def realm_cuda_error(self) -> Any:
        return self._err

    def realm_cuda_device_count(self, count: Any) -> int:
        count[0] = 1
        return 0

    def realm_cuda_set_device(self, index: int) -> int:
        return 0 if index == 0 else -1

    def realm_cuda_device_info(
        self, name: Any, total: Any, n_sm: Any, major: Any, minor: Any, index: int
    ) -> int:
        ffi.memmove(name, b"Stand-in GPU\0", 13)
        total[0], n_sm[0], major[0], minor[0] = DEVICE_BYTES, 4, 9, 0
        return 0

    def realm_cuda_mem_info(self, free: Any, total: Any) -> int:
        total[0] = DEVICE_BYTES
        free[0] = DEVICE_BYTES - sum(b.nbytes for b in self.live.values())
        return 0

    def realm_cuda_malloc(self, out: Any, n: int) -> int:
        if sum(b.nbytes for b in self.live.values()) + n > DEVICE_BYTES:
            return -2
        buf = np.full(n + 256, 0xA5, np.uint8)  # not zeroed: callers must not rely on it
        base = (buf.ctypes.data + 255) // 256 * 256
        self.live[base] = buf
        out[0] = ffi.cast("void *", base)
        return 0

    def realm_cuda_free(self, p: Any) -> int:
        del self.live[_addr(p)]
        return 0

    def _copy(self, dst: Any, src: Any, n: int) -> int:
        ffi.memmove(ffi.cast("char *", _addr(dst)), ffi.cast("char *", _addr(src)), n)
        return 0

    realm_cuda_upload = realm_cuda_download = realm_cuda_copy = _copy

    def realm_cuda_memset(self, dst: Any, value: int, n: int) -> int:
        ffi.buffer(ffi.cast("char *", _addr(dst)), n)[:] = bytes([value]) * n
        return 0

    def realm_cuda_copy_2d(
        self, dst: Any, dpitch: int, src: Any, spitch: int, row: int, rows: int
    ) -> int:
        for r in range(rows):
            self._copy(_addr(dst) + r * dpitch, _addr(src) + r * spitch, row)
        return 0

    def realm_cuda_rope(self, x: Any, pos: Any, *args: Any) -> int:
        *rest, factors = args
        assert factors == ffi.NULL
        return int(lib.realm_rope(x, pos, *rest))

    def realm_cuda_forward(self, m: Any, seqs: Any, n: int) -> int:
        self.calls["realm_cuda_forward"] += 1
        assert m.layers != ffi.NULL or m.acquire != ffi.NULL
        for i in range(n):  # the KV pointer is a device allocation of the right size
            base = _addr(seqs[i].kv)
            assert base in self.live and seqs[i].capacity > 0
        return int(lib.realm_forward(m, seqs, n))

    def realm_cuda_copy_bandwidth(self, seconds: Any, *args: Any) -> int:
        seconds[0] = 1e-3
        return 0

    def realm_cuda_fma_peak(self, flops: Any, iters: int) -> int:
        flops[0] = 1e12
        return 0

    def realm_cuda_time_matmul(self, seconds: Any, *args: Any) -> int:
        seconds[0] = 1e-4
        return int(lib.realm_matmul(*args[:-1]))


@pytest.fixture
def fake() -> Iterator[FakeCudaLib]:
    fake = FakeCudaLib()
    saved = (_cuda._native, dict(_cuda._devices))
    _cuda._native = (ffi, fake)
    _cuda._devices.clear()
    try:
        yield fake
    finally:
        _cuda._native = saved[0]
        _cuda._devices.clear()
        _cuda._devices.update(saved[1])


def test_device_is_opened_once(fake: FakeCudaLib) -> None:
    dev = kernels.cuda_device("cuda:0")
    assert dev.name == "Stand-in GPU" and dev.total_bytes == DEVICE_BYTES
    assert kernels.cuda_device("cuda") is dev
    assert kernels.cuda_status() == "ok: Stand-in GPU"
    with pytest.raises(kernels.CudaUnavailable, match="no CUDA device 1") as info:
        kernels.cuda_device("cuda:1")
    assert info.value.reason == "no-device"


def test_host_entry_points_upload_compute_and_free(fake: FakeCudaLib) -> None:
    rng = np.random.default_rng(0)
    w = kernels.quantize(rng.standard_normal((33, 64)).astype(np.float32), kernels.WeightType.Q8_0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    wt = kernels.WeightType.Q8_0
    np.testing.assert_array_equal(
        kernels.matmul(w, x, wtype=wt, device="cuda"), kernels.matmul(w, x, wtype=wt)
    )
    q = rng.standard_normal((4, 4, 32)).astype(np.float32)
    k = rng.standard_normal((9, 2, 32)).astype(np.float16)
    pos = np.array([2, 5, 7, 8], np.int32)
    np.testing.assert_array_equal(
        kernels.attention(q, k, k, pos, window=3, device="cuda"),
        kernels.attention(q, k, k, pos, window=3),
    )
    r = rng.standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(
        kernels.rope(r.copy(), np.array([3, 4], np.int32), device="cuda"),
        kernels.rope(r.copy(), np.array([3, 4], np.int32)),
    )
    assert fake.calls["realm_cuda_matmul"] == 1 and fake.calls["realm_cuda_attention"] == 1
    assert not fake.live  # every staging buffer was freed


def test_model_on_the_device_equals_the_cpu(fake: FakeCudaLib, tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_layers=3, tied_embeddings=True)
    cpu = realm.load_model(path, pack=False)  # the file's layout, as the device
    gpu = realm.load_model(path, device="cuda")
    assert gpu.device == "cuda:0"
    np.testing.assert_array_equal(gpu.logits(IDS), cpu.logits(IDS))
    np.testing.assert_array_equal(gpu.embed(IDS), cpu.embed(IDS))
    # tied embeddings are uploaded once
    st = gpu._native.statistics()
    assert st["uploads"] == 3 and st["evictions"] == 0
    gpu.close()
    gc.collect()
    assert not fake.live  # weights and caches all freed


def test_sessions_grow_fork_rewind_and_are_accounted(fake: FakeCudaLib, tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_layers=2, context_length=1024)
    cpu, gpu = realm.load_model(path, pack=False), realm.load_model(path, device="cuda")
    long = [int(t) for t in np.random.default_rng(3).integers(1, 300, 300)]
    with cpu.open_session() as sc, gpu.open_session() as sg:
        for chunk in (long[:10], long[10:260], long[260:]):  # grows past 256 positions
            np.testing.assert_array_equal(sg.extend(chunk), sc.extend(chunk))
        assert isinstance(sg._kv, kernels.DeviceKV) and sg._kv.shape[2] >= 300
        assert gpu.kv_bytes_used == cpu.kv_bytes_used == sg.kv_bytes > 0
        fc, fg = sc.fork(), sg.fork()
        np.testing.assert_array_equal(fg.extend([4, 5]), fc.extend([4, 5]))
        sg.rewind(100)
        sc.rewind(100)
        np.testing.assert_array_equal(sg.extend([8]), sc.extend([8]))
        fg.close()
        fc.close()
    assert gpu.kv_bytes_used == 0


def test_batched_tenants_and_exact_steps(fake: FakeCudaLib, tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_layers=2)
    cpu, gpu = realm.load_model(path, pack=False), realm.load_model(path, device="cuda")
    prompts = [[1, 2, 3], [40, 41], [7, 8, 9, 10, 11]]
    outs = []
    for model in (cpu, gpu):
        sessions = [model.open_session() for _ in prompts]
        model.step([(s, p, "none") for s, p in zip(sessions, prompts, strict=True)])
        outs.append(model.step([(s, [5], "verify") for s in sessions]))
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert fake.calls["realm_cuda_forward"] == 2  # one native call per step


def test_kv_exhaustion_on_the_device(fake: FakeCudaLib, tmp_path: Path, monkeypatch: Any) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_layers=2)
    gpu = realm.load_model(path, device="cuda")
    monkeypatch.setattr(fake, "realm_cuda_malloc", lambda out, n: -2)  # device memory full
    with pytest.raises(realm.KVMemoryExhausted), gpu.open_session() as s:
        s.extend(IDS)
    assert gpu.kv_bytes_used == 0


@pytest.mark.parametrize("budget", [1, 60_000, 10**9])
def test_layer_paging_under_a_device_budget(fake: FakeCudaLib, tmp_path: Path, budget: int) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_layers=4)
    want = realm.load_model(path, pack=False).logits(IDS)
    model = realm.load_model(path, device="cuda", max_device_bytes=budget)
    for _ in range(2):
        np.testing.assert_array_equal(model.logits(IDS), want)
    st = model._native.statistics()
    if budget == 10**9:
        assert st["uploads"] == 4 and st["evictions"] == 0 and st["resident_layers"] == 4
    else:
        assert st["uploads"] > 4 and st["evictions"] > 0
        assert st["resident_layers"] <= 1 if budget == 1 else st["resident_layers"] < 4
    both = realm.load_model(path, device="cuda", max_device_bytes=budget, max_resident_bytes=50_000)
    np.testing.assert_array_equal(both.logits(IDS), want)
    assert both.pager is not None and both.pager.statistics().bytes_paged > 0


def test_adapters_and_foreign_caches_are_refused(fake: FakeCudaLib, tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_layers=2)
    gpu = realm.load_model(path, device="cuda")
    kv = gpu._native.new_kv(8)
    with pytest.raises(NotImplementedError, match="LoRA"):
        gpu._native.forward([SeqStep(np.array([1], np.int32), 0, kv, adapter=object())])
    host_kv = np.zeros(gpu.spec.kv_shape(8), gpu.spec.kv_dtype)
    with pytest.raises(realm.KernelError, match="DeviceKV"):
        gpu._native.forward([SeqStep(np.array([1], np.int32), 0, host_kv)])
    with pytest.raises(realm.KernelError, match="shared"):
        gpu._native.forward(
            [SeqStep(np.array([1], np.int32), 0, kv), SeqStep(np.array([2], np.int32), 0, kv)]
        )


async def test_runtime_on_a_device_model(fake: FakeCudaLib, tmp_path: Path) -> None:
    import trio

    path = write_test_model(tmp_path / "m.gguf", n_layers=2)
    texts = []
    for model in (realm.load_model(path, pack=False), realm.load_model(path, device="cuda")):
        with trio.fail_after(60):
            async with realm.open_runtime(models={"m": model}) as rt:
                r = await rt.call(
                    "t", "generate", {"prompt": "Hi", "max_tokens": 6, "temperature": 0}
                )
        texts.append(r["text"])
    assert texts[0] == texts[1]


def test_benchmark_model_cases_run(fake: FakeCudaLib, tmp_path: Path) -> None:
    from benchmarks import cuda as bench
    from benchmarks._common import Reporter

    path = write_test_model(tmp_path / "m.gguf", n_layers=2, context_length=600)
    out = io.StringIO()
    reporter = Reporter(json_lines=True, out=out)
    copy, fma = bench._limits(reporter, 1 << 20, "start")
    bench.bench_model(reporter, path, copy, fma, tenants=4, quick=True)
    records = out.getvalue().splitlines()
    assert sum('"record": "result"' in r for r in records) == 3  # decode, batched, prefill
    assert all('"ratio": ' in r for r in records if '"record": "result"' in r)


def test_benchmark_kernel_cases_run(fake: FakeCudaLib, monkeypatch: Any) -> None:
    from benchmarks import cuda as bench
    from benchmarks._common import Reporter

    monkeypatch.setattr(bench, "MATVEC_SHAPE", (40, 512))
    monkeypatch.setattr(bench, "GEMM_ROWS", 9)
    out = io.StringIO()
    reporter = Reporter(json_lines=True, out=out)
    copy, fma = bench._limits(reporter, 1 << 20, "start")
    bench.bench_kernels(reporter, copy, fma, quick=True)
    results = [r for r in out.getvalue().splitlines() if '"record": "result"' in r]
    assert len(results) == 8  # matvec and gemm of F16, Q8_0, Q4_0, Q4_K
    assert not fake.live  # every weight and activation buffer freed


def test_device_pager_prefetches_and_evicts_the_blocks_just_used(
    fake: FakeCudaLib, tmp_path: Path
) -> None:
    from realm.kernels._cuda_forward import _layer_bytes

    path = write_test_model(tmp_path / "m.gguf", n_layers=4)
    want = realm.load_model(path, pack=False).logits(IDS)
    block = _layer_bytes(realm.load_model(path).layer_weights(0))
    roomy = realm.load_model(path, device="cuda", max_device_bytes=10**9)
    np.testing.assert_array_equal(roomy.logits(IDS), want)
    st = roomy._native.statistics()
    assert st["prefetches"] == st["prefetch_hits"] == 3  # blocks 1..3 came from the worker
    # room for three blocks of four: a pass visits them in order, so a victim is a block
    # already used in this pass (needed furthest ahead): one or two uploads a pass (when the
    # worker's eviction runs decides which), where least recently used would evict the very
    # block needed next and upload all four every pass
    tight = realm.load_model(path, device="cuda", max_device_bytes=3 * block + 100)
    for _ in range(3):
        np.testing.assert_array_equal(tight.logits(IDS), want)
    st = tight._native.statistics()
    assert 4 + 2 <= st["uploads"] <= 4 + 2 * 2 and st["resident_layers"] == 3
    assert st["device_bytes"] - roomy._native.statistics()["device_bytes"] == -block
