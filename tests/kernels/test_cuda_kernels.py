"""The CUDA kernels against the CPU kernels and the float64 references, on a GPU.

Every kernel on ragged shapes (both matmul paths: the small-batch kernel up to 8 rows and the
tiled GEMM above; every weight type of the CPU library), then whole models: logits against
the CPU path and the float64 reference for each architecture, tenants batched in one step
against each alone, exact (batch-independent) steps, forks, KV accounting, layer paging
under a device budget, and the runtime's batcher on top of a CUDA model.

The GPU computes matmuls with float32 activations where the CPU quantizes them to 8 bits, so
it is compared tightly with the exact product and loosely with the CPU.

Without a usable GPU (no CUDA build, no driver, no device) the whole module skips, and the
skip reason says which.
"""

from __future__ import annotations

from pathlib import Path

import kernel_reference as reference
import numpy as np
import pytest

import realm
from realm import kernels
from realm.kernels import RopeMode, WeightType
from realm.testing import write_test_model

STATUS = kernels.cuda_status()
pytestmark = pytest.mark.skipif(
    not STATUS.startswith("ok"), reason=f"NO GPU CHECKS RAN: CUDA unavailable ({STATUS})"
)

ROWS = (1, 3, 7, 33, 100)
BATCHES = (1, 2, 5, 8, 9, 16, 67)  # <= 8: the matvec kernel; above: the GEMM
FLOAT_TYPES = (WeightType.F32, WeightType.F16, WeightType.BF16)
BLOCK_TYPES = [wt for wt in WeightType if wt.quantized]
#: byte offsets of each read-only block type's half-precision scales (ggml-common.h)
HALF_FIELDS = {
    WeightType.Q4_1: (0, 2), WeightType.Q5_0: (0,), WeightType.Q5_1: (0, 2),
    WeightType.Q2_K: (80, 82), WeightType.Q3_K: (108,), WeightType.Q4_K: (0, 2),
    WeightType.Q5_K: (0, 2), WeightType.Q6_K: (208,), WeightType.IQ4_NL: (0,),
    WeightType.IQ4_XS: (0,),
}  # fmt: skip
GPU_VS_EXACT = 2e-5  # relative to the largest |y|: float32 sums, another order
GPU_VS_CPU = 3e-2  # the CPU's 8-bit activations
IDS = [1, 5, 9, 200, 17, 3, 42, 300, 7, 11]


def _weights(wt: WeightType, n_rows: int, n_cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if wt == WeightType.F32:
        return rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    if wt == WeightType.F16:
        return rng.standard_normal((n_rows, n_cols)).astype(np.float16)
    if wt == WeightType.BF16:
        return (rng.standard_normal((n_rows, n_cols)).astype(np.float32).view(np.uint32) >> 16
                ).astype(np.uint16)  # fmt: skip
    if wt.writable:  # Q8_0, Q4_0: the CPU library quantizes them
        return kernels.quantize(rng.standard_normal((n_rows, n_cols)).astype(np.float32), wt)
    nb = n_cols // wt.block_elems
    raw = rng.integers(0, 256, (n_rows, nb, wt.block_bytes), dtype=np.uint8)
    for off in HALF_FIELDS[wt]:
        half = (rng.standard_normal((n_rows, nb)) * 0.02).astype(np.float16)
        raw[:, :, off : off + 2] = half.view(np.uint8).reshape(n_rows, nb, 2)
    return raw.reshape(n_rows, nb * wt.block_bytes)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


# --- kernels -------------------------------------------------------------------------------


@pytest.mark.parametrize("wt", [*FLOAT_TYPES, *BLOCK_TYPES], ids=lambda w: w.name)
@pytest.mark.parametrize("batch", BATCHES)
def test_matmul_every_type(wt: WeightType, batch: int) -> None:
    n_cols = 2 * wt.block_elems if wt.quantized else 77
    if wt.block_elems == 1:
        n_cols = 77  # float rows need no block multiple: a ragged length
    for n_rows in ROWS:
        w = _weights(wt, n_rows, n_cols, seed=n_rows * 31 + batch)
        x = np.random.default_rng(batch).standard_normal((batch, n_cols)).astype(np.float32)
        exact = x.astype(np.float64) @ reference.dequantize(w, wt).astype(np.float64).T
        got = kernels.matmul(w, x, wtype=wt, device="cuda")
        assert got.shape == (batch, n_rows)
        assert _rel(got, exact) < GPU_VS_EXACT, (wt.name, n_rows, batch)
        cpu = kernels.matmul(w, x, wtype=wt)
        assert _rel(got, cpu) < GPU_VS_CPU


def test_matmul_vector_and_large_shapes() -> None:
    w = _weights(WeightType.Q4_0, 4099, 4096, seed=1)
    x = np.random.default_rng(2).standard_normal(4096).astype(np.float32)
    exact = reference.dequantize(w, WeightType.Q4_0).astype(np.float64) @ x
    got = kernels.matmul(w, x, wtype=WeightType.Q4_0, device="cuda")
    assert got.shape == (4099,) and _rel(got, exact) < GPU_VS_EXACT


@pytest.mark.parametrize("wt", [*FLOAT_TYPES, *BLOCK_TYPES], ids=lambda w: w.name)
def test_get_rows_is_the_cpu_dequantization(wt: WeightType) -> None:
    table = _weights(wt, 37, 2 * wt.block_elems if wt.quantized else 64, seed=5)
    ids = np.array([0, 36, 5, 5, 17], np.int32)
    np.testing.assert_array_equal(
        kernels.get_rows(table, ids, wtype=wt, device="cuda"),
        kernels.get_rows(table, ids, wtype=wt),
    )


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 64, 1023, 4096])
def test_row_kernels(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, n)).astype(np.float32)
    wgt = rng.standard_normal(n).astype(np.float32)
    for weight in (wgt, None):
        got = kernels.rmsnorm(x, weight, 1e-5, device="cuda")
        reference.assert_within(got, reference.rmsnorm(x, weight, 1e-5), 4e-6 * np.abs(got).max())
    y = x.copy()
    kernels.softmax(y, device="cuda")
    reference.assert_within(y, reference.softmax(x), 1e-6)
    g, u = x * 4, rng.standard_normal((3, n)).astype(np.float32)
    for fn, ref in (("swiglu", reference.swiglu), ("geglu", reference.geglu)):
        got = getattr(kernels, fn)(g, u, device="cuda")
        reference.assert_within(got, ref(g, u), 1e-5 * (np.abs(ref(g, u)) + 1e-3))
    np.testing.assert_allclose(kernels.add(x, u, device="cuda"), x + u, rtol=0, atol=0)
    c = x * 50
    kernels.softcap(c, 30.0, device="cuda")
    np.testing.assert_allclose(c, 30.0 * np.tanh(x * 50 / 30.0), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("mode", list(RopeMode))
@pytest.mark.parametrize(("head_dim", "n_rot"), [(64, 64), (128, 64), (6, 4), (256, 256)])
def test_rope_both_modes(mode: RopeMode, head_dim: int, n_rot: int) -> None:
    rng = np.random.default_rng(head_dim)
    x = rng.standard_normal((5, 3, head_dim)).astype(np.float32)
    pos = np.array([0, 1, 7, 300, 4095], np.int32)
    want = reference.rope(x, pos, n_rot=n_rot, mode=mode, freq_base=500000.0, freq_scale=0.5)
    got = kernels.rope(x.copy(), pos, n_rot=n_rot, mode=mode, freq_base=500000.0,
                       freq_scale=0.5, device="cuda")  # fmt: skip
    reference.assert_within(got, want, 2e-6 * (np.abs(want) + 1))
    cpu = kernels.rope(x.copy(), pos, n_rot=n_rot, mode=mode, freq_base=500000.0, freq_scale=0.5)
    reference.assert_within(got, cpu, 2e-6 * (np.abs(want) + 1))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(
    ("n_q", "n_kv", "n_heads", "n_kv_heads", "head_dim", "window", "softcap"),
    [
        (1, 1, 1, 1, 32, 0, 0.0),
        (1, 37, 4, 4, 64, 0, 0.0),
        (5, 300, 8, 2, 128, 0, 0.0),
        (3, 100, 4, 1, 256, 16, 0.0),
        (7, 7, 6, 3, 80, 0, 50.0),
        (2, 1000, 2, 2, 96, 5, 0.0),
    ],
)
def test_attention(dtype: type, n_q: int, n_kv: int, n_heads: int, n_kv_heads: int,
                   head_dim: int, window: int, softcap: float) -> None:  # fmt: skip
    rng = np.random.default_rng(n_kv)
    q = rng.standard_normal((n_q, n_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((n_kv, n_kv_heads, head_dim)).astype(dtype)
    v = rng.standard_normal((n_kv, n_kv_heads, head_dim)).astype(dtype)
    pos = np.sort(rng.integers(0, n_kv, n_q)).astype(np.int32)
    pos[-1] = n_kv - 1
    got = kernels.attention(q, k, v, pos, window=window, softcap=softcap, device="cuda")
    want, bound = reference.attention(q, k, v, pos, window=window, softcap=softcap)
    reference.assert_within(got, want, 4 * bound + 1e-6)
    cpu = kernels.attention(q, k, v, pos, window=window, softcap=softcap)
    reference.assert_within(got, cpu, 8 * bound + 1e-6)


def test_copy_bandwidth_is_plausible() -> None:
    from realm.kernels import _cuda

    bw = _cuda.copy_bandwidth(1 << 28, iters=3)
    assert 50e9 < bw < 20e12  # bytes/s: any data-centre or desktop GPU


# --- whole models --------------------------------------------------------------------------


def _model_ref() -> object:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "model" / "model_reference.py"
    spec = importlib.util.spec_from_file_location("model_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("wtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"])
def test_logits_match_cpu_and_reference(tmp_path: Path, arch: str, wtype: str) -> None:
    path = write_test_model(tmp_path / "m.gguf", arch=arch, wtype=wtype,
                                          n_layers=3)  # fmt: skip
    gpu_model = realm.load_model(path, device="cuda")
    got = gpu_model.logits(IDS)
    want = _model_ref().reference_logits(path, IDS)  # type: ignore[attr-defined]
    cpu = realm.load_model(path).logits(IDS)
    assert got.shape == want.shape and got.dtype == np.float32
    assert _rel(got, want) < 5e-3  # float activations: tighter than the CPU's quantized path
    assert _rel(got, cpu) < (5e-3 if wtype in ("F32", "F16", "BF16") else GPU_VS_CPU)
    gpu_model.close()


def test_rope_freqs_and_windows(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf", rope_freqs=True,
                                          sliding_window=4, wtype="F16")  # fmt: skip
    got = realm.load_model(path, device="cuda").logits(IDS)
    assert _rel(got, realm.load_model(path).logits(IDS)) < 5e-3


def test_tenants_batched_equal_alone_and_stay_isolated(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_layers=3)
    model = realm.load_model(path, device="cuda")
    prompts = [[1, 2, 3], [40, 41], [7, 8, 9, 10, 11]]
    alone = []
    for p in prompts:
        with model.open_session() as s:
            s.extend(p, logits="none")
            alone.append(s.extend([5]))
    sessions = [model.open_session() for _ in prompts]
    model.step([(s, p, "none") for s, p in zip(sessions, prompts, strict=True)])
    together = model.step([(s, [5], "last") for s in sessions])
    for a, b in zip(alone, together, strict=True):
        assert b is not None and _rel(b, a) < 1e-4
    # a step of one tenant leaves the others' caches as they were
    before = [s._kv.numpy().copy() for s in sessions]
    sessions[0].extend([9, 9, 9])
    for s, b in zip(sessions[1:], before[1:], strict=True):
        np.testing.assert_array_equal(s._kv.numpy(), b)
    for s in sessions:
        s.close()
    assert model.kv_bytes_used == 0


def test_exact_steps_do_not_depend_on_the_batch(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_layers=2)
    model = realm.load_model(path, device="cuda")
    a, b, c = (model.open_session() for _ in range(3))
    a.extend(list(range(1, 12)), logits="none")
    alone = model.step([(a, [3, 4, 5], "verify")])[0]
    a.rewind(11)
    mixed = model.step([(a, [3, 4, 5], "verify"), (b, list(range(20, 60)), "verify"),
                        (c, [1], "verify")])[0]  # fmt: skip
    np.testing.assert_array_equal(alone, mixed)


def test_kv_accounting_fork_and_rewind(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_layers=2)
    cpu, gpu = realm.load_model(path), realm.load_model(path, device="cuda", max_kv_bytes=200_000)
    with cpu.open_session() as sc, gpu.open_session() as sg:
        sc.extend(IDS, logits="none")
        sg.extend(IDS, logits="none")
        assert gpu.kv_bytes_used == cpu.kv_bytes_used > 0
        fc, fg = sc.fork(), sg.fork()
        assert _rel(fg.extend([4]), fc.extend([4])) < 3e-2
        sg.rewind(3)
        sc.rewind(3)
        assert _rel(sg.extend([8]), sc.extend([8])) < 3e-2
        fc.close()
        fg.close()
    assert gpu.kv_bytes_used == 0
    with pytest.raises(realm.KVMemoryExhausted):
        gpu.open_session(capacity=10**6).extend(list(range(1, 300)) * 4)


@pytest.mark.parametrize("budget", [1, 60_000, 10**9])
def test_layer_paging_on_the_device(tmp_path: Path, budget: int) -> None:
    path = write_test_model(tmp_path / "m.gguf", n_layers=4)
    want = realm.load_model(path, device="cuda").logits(IDS)
    model = realm.load_model(path, device="cuda", max_device_bytes=budget)
    np.testing.assert_array_equal(model.logits(IDS), want)
    np.testing.assert_array_equal(model.logits(IDS), want)
    st = model._native.statistics()
    if budget == 10**9:
        assert st["uploads"] == 4 and st["evictions"] == 0
    else:
        assert st["evictions"] > 0 and st["resident_layers"] <= 4
    # with the host pager underneath as well
    both = realm.load_model(path, device="cuda", max_device_bytes=budget,
                            max_resident_bytes=50_000)  # fmt: skip
    np.testing.assert_array_equal(both.logits(IDS), want)


def test_adapters_are_refused_clearly(tmp_path: Path) -> None:
    from realm.kernels import SeqStep

    path = write_test_model(tmp_path / "m.gguf", n_layers=2)
    model = realm.load_model(path, device="cuda")
    kv = model._native.new_kv(8)
    step = SeqStep(np.array([1, 2], np.int32), 0, kv, adapter=object())  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match="LoRA"):
        model._native.forward([step])


async def test_runtime_batcher_on_a_cuda_model(tmp_path: Path) -> None:
    import trio

    path = write_test_model(tmp_path / "m.gguf", n_layers=2)
    model = realm.load_model(path, device="cuda")
    with trio.fail_after(120):
        async with realm.open_runtime(models={"m": model}) as rt:

            async def one(tenant: str, out: list[dict[str, object]]) -> None:
                out.append(await rt.call(tenant, "generate", {"prompt": "Hi", "max_tokens": 8,
                                                              "temperature": 0}))  # fmt: skip

            results: list[dict[str, object]] = []
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(one, f"t{i}", results)
    assert len(results) == 4
    for r in results:
        assert r["finish_reason"] in ("stop", "length")
        assert r["usage"]["completion_tokens"] >= 1  # type: ignore[index]
