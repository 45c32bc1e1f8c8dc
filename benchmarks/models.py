"""Model benchmarks: a TinyLlama-1.1B-shaped model end to end, against llama.cpp and the machine.

    python -m benchmarks.models [--quick] [--json] [--threads N] [--only SUBSTRING]
                                [--wtype Q8_0,Q4_0,F16,Q4_K_M] [--shape tinyllama|smollm2]

The model is a llama with TinyLlama-1.1B's shape (22 layers, hidden 2048, 32 query heads over
4 KV heads, FFN 5632, vocabulary 32000, context 2048; ``--shape smollm2``: SmolLM2-135M's, 30
layers, hidden 576, 9 heads over 3, FFN 1536, vocabulary 49152) and random weights, written
once per weight type and cached under ``~/.cache/realm/bench/`` (``$XDG_CACHE_HOME/realm/bench``),
keyed by shape, type and seed; a missing file is regenerated (progress on stderr). Weights are
quantized by ``realm.kernels.quantize`` (bit for bit GGML's) and written one tensor at a time,
so generating never holds more than one tensor in memory. ``Q4_K_M`` mixes types per tensor as
llama.cpp's Q4_K_M does (Q4_K; Q6_K for attn_v, ffn_down and the output; rows whose length is
not a multiple of 256 fall back to Q5_0 / Q8_0 as llama.cpp's do) with random blocks of the
right spread (``realm.testing.quant_blocks``): speed is what it measures, the values are noise.

Cases, for each weight type (``--quick``: Q8_0 only, unless ``--wtype`` says otherwise):
    prefill   a prompt of 128 tokens (``--quick``: 64) into a fresh session, logits of the
              last token only. Rate = prompt tokens / s.
    decode    one session, 32 steps of one token each (logits of each) after a 16-token
              prompt; between samples the session is rewound to the prompt. Rate = tokens / s.
    batched   B = 1, 4, 8 sessions stepped together by ``Model.step`` (one native forward for
              all of them), one token each per step. Rate = B tokens per step / s; the note
              gives the mean step latency and its ratio to B=1's.

Limits, measured in the same run: the read bandwidth of every pool thread (as in
``benchmarks.kernels``), measured just before and after each decode case; the better of the
two gives the decode bound = bandwidth / weight bytes read per token (every matrix, the output
projection included, plus the norms and one embedding row; KV-cache reads, under 0.1% at these
lengths, are left out). A batch of B reads the weights once per step: its bound is B times
that.

Peer: llama.cpp through llama-cpp-python (the ``[bench]`` extra), when it imports. It loads
the same file with the same thread count and runs the same prefill and decode through
``Llama.eval`` (llama_decode, no sampling), timed interleaved with Realm's samples so that the
ratio holds even if the machine drifts. Without it the peer rows and targets are skipped.

Targets: Q8_0 decode >= 1.0x llama.cpp and >= 0.7 of the decode bound; Q8_0 prefill >= 1.0x
llama.cpp. Times are medians (and minimums) of samples after a warm-up.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import gguf
import numpy as np

from realm import kernels
from realm.kernels import WeightType
from realm.model import Model, Session, load_model
from realm.model._gguf_reader import open_gguf
from realm.testing._vocab import spm_vocab
from realm.testing.models import QUANTIZATION_VERSION, WEIGHT_TYPES
from realm.testing.quant_blocks import random_blocks

from ._common import (
    GB,
    MIB,
    Budget,
    Limit,
    ReadBandwidth,
    Reporter,
    Result,
    Target,
    Timing,
    argument_parser,
    bracket,
    describe_machine,
    relative_error,
)

SUITE: Final = "models"
SEED: Final = 20240601
FORMAT_VERSION: Final = 1  # bump when the generated file changes: it is part of the cache key

ALL_WTYPES: Final = ("Q8_0", "Q4_0", "F16", "Q4_K_M")
QUICK_WTYPES: Final = ("Q8_0",)
DECODE_PROMPT: Final = 16  # tokens in the session before decoding
BATCHES: Final = (1, 4, 8)
NORM_JITTER: Final = 0.1  # norm weights are 1 + NORM_JITTER * normal, as in realm.testing
IDLE_SECONDS: Final = 0.03  # pause between samples: spinning workers (OpenMP's) fall asleep
PEER_CTX: Final = 512
PEER_INSTALL: Final = "pip install -e '.[bench]'"
# A sanity check of Realm's prefill logits against llama.cpp's: both round differently (and
# 22 random layers amplify it), so this catches garbage, not rounding.
CHECK_MAX_ERROR: Final = 0.1  # max |realm - llama.cpp| / max |llama.cpp|

# Targets from the issue.
DECODE_MIN_PEER_RATIO: Final = 1.0
DECODE_MIN_BOUND_RATIO: Final = 0.7
PREFILL_MIN_PEER_RATIO: Final = 1.0
TARGET_WTYPE: Final = "Q8_0"


@attrs.frozen
class ModelShape:
    """Hyper-parameters of the generated llama."""

    n_layers: int
    n_embd: int
    n_heads: int
    n_kv_heads: int
    n_ff: int
    vocab: int
    context: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @property
    def key(self) -> str:
        return (
            f"L{self.n_layers}-E{self.n_embd}-H{self.n_heads}-KV{self.n_kv_heads}-"
            f"FF{self.n_ff}-V{self.vocab}-C{self.context}"
        )


TINYLLAMA: Final = ModelShape(
    n_layers=22, n_embd=2048, n_heads=32, n_kv_heads=4, n_ff=5632, vocab=32000, context=2048
)
SMOLLM2: Final = ModelShape(
    n_layers=30, n_embd=576, n_heads=9, n_kv_heads=3, n_ff=1536, vocab=49152, context=2048
)
SHAPES: Final = {"tinyllama": (TINYLLAMA, "TinyLlama-1.1B"), "smollm2": (SMOLLM2, "SmolLM2-135M")}


@attrs.frozen
class Profile:
    """Sizes and repetitions of a full or a ``--quick`` run."""

    prefill_tokens: int
    decode_steps: int
    batch_steps: int
    bandwidth_bytes: int  # read-bandwidth buffer: much larger than the L3 cache
    bandwidth_iters: int
    budget: Budget  # samples of a case (each sample is a whole prompt or a run of steps)


FULL: Final = Profile(
    prefill_tokens=128,
    decode_steps=32,
    batch_steps=16,
    bandwidth_bytes=1024 * MIB,
    bandwidth_iters=10,
    budget=Budget(warmup=1, min_reps=5, max_reps=20, seconds=6.0),
)
QUICK: Final = Profile(
    prefill_tokens=64,
    decode_steps=32,
    batch_steps=16,
    bandwidth_bytes=256 * MIB,
    bandwidth_iters=5,
    budget=Budget(warmup=1, min_reps=3, max_reps=3, seconds=0.0),
)


# --- the model file --------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "realm" / "bench"


def model_path(shape: ModelShape, wtype: str, seed: int) -> Path:
    return cache_dir() / f"llama-{shape.key}-{wtype}-seed{seed}-v{FORMAT_VERSION}.gguf"


@attrs.frozen
class _TensorSpec:
    name: str
    n_out: int  # rows; 0 for a vector
    n_in: int  # row length (a vector's length)
    std: float  # matrices: normal * std; vectors (norms): 1 + NORM_JITTER * normal


def _tensor_specs(s: ModelShape) -> list[_TensorSpec]:
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    e, ff = s.n_embd, s.n_ff
    out = [_TensorSpec("token_embd.weight", s.vocab, e, 1.0)]
    for i in range(s.n_layers):
        b = f"blk.{i}"
        out += [
            _TensorSpec(f"{b}.attn_norm.weight", 0, e, NORM_JITTER),
            _TensorSpec(f"{b}.attn_q.weight", q, e, e**-0.5),
            _TensorSpec(f"{b}.attn_k.weight", kv, e, e**-0.5),
            _TensorSpec(f"{b}.attn_v.weight", kv, e, e**-0.5),
            _TensorSpec(f"{b}.attn_output.weight", e, q, q**-0.5),
            _TensorSpec(f"{b}.ffn_norm.weight", 0, e, NORM_JITTER),
            _TensorSpec(f"{b}.ffn_gate.weight", ff, e, e**-0.5),
            _TensorSpec(f"{b}.ffn_up.weight", ff, e, e**-0.5),
            _TensorSpec(f"{b}.ffn_down.weight", e, ff, ff**-0.5),
        ]
    out += [
        _TensorSpec("output_norm.weight", 0, e, NORM_JITTER),
        _TensorSpec("output.weight", s.vocab, e, e**-0.5),
    ]
    return out


#: Q4_K_M's mix (llama.cpp's): Q6_K for these, Q4_K for the other matrices; a row length that
#: is not a multiple of 256 takes the fallback type of llama.cpp's quantizer instead
_Q4_K_M_HIGH: Final = ("attn_v.weight", "ffn_down.weight", "output.weight")
_K_FALLBACK: Final = {WeightType.Q4_K: WeightType.Q5_0, WeightType.Q6_K: WeightType.Q8_0}


def _tensor_type(spec: _TensorSpec, wtype: str) -> WeightType:
    """The weight type of one matrix of a ``wtype`` file."""
    if wtype != "Q4_K_M":
        return WeightType[wtype]
    wt = WeightType.Q6_K if spec.name.endswith(_Q4_K_M_HIGH) else WeightType.Q4_K
    return _K_FALLBACK[wt] if spec.n_in % 256 else wt


def _file_types(wtype: str) -> tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]:
    if wtype == "Q4_K_M":
        return gguf.GGMLQuantizationType.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M
    return WEIGHT_TYPES[wtype]


def _encoded_layout(spec: _TensorSpec, wt: WeightType) -> tuple[tuple[int, ...], np.dtype]:
    """numpy shape and dtype of a tensor's data as written."""
    if not spec.n_out:
        return (spec.n_in,), np.dtype(np.float32)
    if wt.quantized:
        return (spec.n_out, wt.row_bytes(spec.n_in)), np.dtype(np.uint8)
    return (spec.n_out, spec.n_in), np.dtype(np.float16 if wt == WeightType.F16 else np.float32)


def _generate(spec: _TensorSpec, index: int, seed: int, wt: WeightType) -> np.ndarray:
    """One tensor's data; the draw depends on (seed, index) only, not on the weight type."""
    rng = np.random.default_rng([seed, index])
    if not spec.n_out:
        v = rng.standard_normal(spec.n_in, dtype=np.float32)
        v *= spec.std
        v += 1.0
        return v
    if wt.quantized and not wt.writable:  # K-quants and the like: random blocks
        return random_blocks(wt, spec.n_out, spec.n_in, spec.std, rng)
    w = rng.standard_normal((spec.n_out, spec.n_in), dtype=np.float32)
    w *= spec.std
    if wt.quantized:
        return kernels.quantize(w, wt)
    if wt == WeightType.F16:
        return w.astype(np.float16)
    return w


def write_model(
    path: Path, shape: ModelShape, wtype: str, seed: int, log: Callable[[str], None]
) -> None:
    """Write the random-weight llama to ``path``, one tensor in memory at a time.

    The tensor table is written first (every size is known from the shapes), then each
    tensor is drawn, encoded and appended, and dropped.
    """
    _, file_type = _file_types(wtype)
    specs = _tensor_specs(shape)
    writer = gguf.GGUFWriter(path, "llama")
    try:
        writer.add_name(f"realm bench llama {shape.key} ({wtype}, seed {seed})")
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(QUANTIZATION_VERSION)
        writer.add_context_length(shape.context)
        writer.add_embedding_length(shape.n_embd)
        writer.add_block_count(shape.n_layers)
        writer.add_feed_forward_length(shape.n_ff)
        writer.add_head_count(shape.n_heads)
        writer.add_head_count_kv(shape.n_kv_heads)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_dimension_count(shape.head_dim)
        writer.add_vocab_size(shape.vocab)
        spm_vocab(shape.vocab).write(writer)  # llama.cpp needs a tokenizer to load the file
        for spec in specs:
            wt = _tensor_type(spec, wtype)
            np_shape, dtype = _encoded_layout(spec, wt)
            nbytes = math.prod(np_shape) * dtype.itemsize
            raw = gguf.GGMLQuantizationType(int(wt)) if spec.n_out and wt.quantized else None
            writer.add_tensor_info(spec.name, np_shape, dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        start = time.perf_counter()
        written = 0
        for i, spec in enumerate(specs):
            data = _generate(spec, i, seed, _tensor_type(spec, wtype))
            writer.write_tensor_data(data)
            written += data.nbytes
            if spec.name.endswith("ffn_down.weight") or i == len(specs) - 1:
                log(
                    f"  {wtype}: {i + 1}/{len(specs)} tensors, {written / MIB:.0f} MiB, "
                    f"{time.perf_counter() - start:.1f} s"
                )
        writer.flush()
    finally:
        writer.close()


def ensure_model(shape: ModelShape, wtype: str, seed: int, log: Callable[[str], None]) -> Path:
    """The cached model file, written first if it is missing."""
    path = model_path(shape, wtype, seed)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    log(f"models: writing {path} (once; it is cached)")
    try:
        write_model(tmp, shape, wtype, seed, log)
        os.replace(tmp, path)  # never a half-written file under the cached name
    finally:
        tmp.unlink(missing_ok=True)
    return path


def weight_bytes_per_token(path: Path) -> tuple[int, int]:
    """(weight bytes read to decode one token, all weight bytes) of a model file.

    Every tensor is read once per step except the token embeddings, of which one row is.
    """
    reader = open_gguf(path)
    total = per_token = 0
    for t in reader.tensors:
        n = int(t.n_bytes)
        total += n
        per_token += n // int(t.shape[1]) if t.name == "token_embd.weight" else n
    return per_token, total


# --- the peer --------------------------------------------------------------------------


def import_peer() -> tuple[Any, str]:
    """(the llama_cpp module or None, its version and the ISA level its CPU backend was built
    for, or why it is missing). ``LLAMA_CPP_LIB_PATH`` points llama-cpp-python at another
    build of the library (e.g. one built for AVX2 only, to compare at that level)."""
    try:
        import llama_cpp
    except Exception as e:  # ImportError, or an OSError from its shared library
        return None, f"{type(e).__name__}: {e}"
    version = str(getattr(llama_cpp, "__version__", "unknown version"))
    return llama_cpp, f"{version} ({peer_isa(llama_cpp)} build)"


def peer_isa(llama_cpp: Any) -> str:
    """The best x86 level llama.cpp's CPU backend was built with (from its system info)."""
    try:
        info = llama_cpp.llama_print_system_info().decode(errors="replace")
    except Exception:  # an older binding without it
        return "unknown ISA"
    flags = {part.split("=")[0].strip() for part in info.split("|") if part.strip().endswith("= 1")}
    for level in ("AVX512", "AVX2", "AVX"):
        if level in flags:
            return level
    return "scalar"


class Peer:
    """llama.cpp on the same file, driven through ``Llama.eval`` (no sampling)."""

    def __init__(self, llama_cpp: Any, path: Path, threads: int) -> None:
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=PEER_CTX,
            logits_all=False,
            verbose=False,
        )

    def rewind(self, n: int) -> None:
        """Keep the first ``n`` positions (``eval`` drops the cache from ``n_tokens`` on)."""
        self.llm.n_tokens = n

    def eval(self, tokens: Sequence[int]) -> None:
        self.llm.eval(tokens)

    def last_logits(self) -> np.ndarray:
        """A copy of the last evaluated token's logits (``eval`` keeps none without
        ``logits_all``: they are read from the context, after the timing)."""
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()
        self.llm = None


# --- timing ----------------------------------------------------------------------------

Sample = Callable[[], float]  # runs one sample and returns the seconds of its timed part


def time_samples(fns: Sequence[Sample], budget: Budget, inner: Sequence[int]) -> list[Timing]:
    """Run self-timed samples of several engines interleaved, after a warm-up.

    Each ``fn`` does its own setup (opening or rewinding a session), times only the work and
    returns those seconds; ``inner`` is the number of units (steps) a sample covers, so the
    timings are per unit. Samples alternate between the functions, with a short pause after
    each so one engine's spinning threads do not run into the other's sample.
    """
    for _ in range(max(1, budget.warmup)):
        for fn in fns:
            fn()
            time.sleep(IDLE_SECONDS)
    samples: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    reps = 0
    while reps < budget.max_reps and (
        reps < budget.min_reps or time.perf_counter() - start < budget.seconds
    ):
        for fn, k, out in zip(fns, inner, samples, strict=True):
            out.append(fn() / k)
            time.sleep(IDLE_SECONDS)
        reps += 1
    return [
        Timing(statistics.median(xs), min(xs), len(xs), k)
        for xs, k in zip(samples, inner, strict=True)
    ]


# --- cases -----------------------------------------------------------------------------


@attrs.define(eq=False)
class Bench:
    """State of one run: options, the read-bandwidth probe, the loaded engines, results."""

    profile: Profile
    threads: int
    probe: ReadBandwidth
    rng: np.random.Generator
    llama_cpp: Any  # the module, or None
    results: list[Result] = attrs.field(factory=list)

    def tokens(self, n: int) -> np.ndarray:
        """Random token ids (no specials: ids 0-2 are <unk>, <s>, </s>)."""
        return self.rng.integers(3, TINYLLAMA.vocab, n, dtype=np.int32)

    def result(self, case: str, engine: str, batch: int = 1) -> Result | None:
        for r in self.results:
            if r.case == case and r.kernel == engine and r.batch == batch:
                return r
        return None


@attrs.define(eq=False)
class Loaded:
    """One weight type's model in Realm and (optionally) in llama.cpp."""

    wtype: str
    path: Path
    model: Model
    peer: Peer | None
    bytes_per_token: int
    n_bytes: int


def _bound(bw: Limit, bytes_per_token: int, batch: int) -> Limit:
    """The decode bound of ``batch`` sessions per step, from a read-bandwidth limit."""
    per = batch * GB / bytes_per_token
    return Limit(
        "decode bound (read bandwidth / weight bytes per token)",
        "bound",
        bw.value * per,
        "tok/s",
        tuple(s * per for s in bw.samples),
    )


def _row(
    case: str,
    engine: str,
    shape: str,
    lm: Loaded,
    b: Bench,
    timing: Timing,
    tokens: int,
    limit: Limit | None,
    *,
    batch: int = 1,
    ok: bool = True,
    note: str = "",
    **extra: Any,
) -> Result:
    """A row whose rate is ``tokens`` per median second of ``timing``."""
    rate = tokens / timing.median
    ratio = rate / limit.value if limit is not None and limit.unit == "tok/s" else None
    return Result(
        case=case,
        kernel=engine,
        shape=shape,
        wtype=lm.wtype,
        batch=batch,
        threads=b.threads,
        timing=timing,
        rate=rate,
        unit="tok/s",
        limit=limit,
        ratio=ratio,
        ok=ok,
        note=note,
        extra={
            "engine": engine,
            "tokens_per_sample_unit": tokens,
            "weight_bytes_per_token": lm.bytes_per_token,
            "model_bytes": lm.n_bytes,
            **extra,
        },
    )


def prefill(b: Bench, lm: Loaded) -> Iterator[Result]:
    case = f"prefill {lm.wtype}"
    n = b.profile.prefill_tokens
    prompt = b.tokens(n)
    prompt_list = [int(t) for t in prompt]
    got: dict[str, np.ndarray] = {}

    def realm() -> float:
        with lm.model.open_session(capacity=n) as s:
            t0 = time.perf_counter()
            out = s.extend(prompt, logits="last")
            seconds = time.perf_counter() - t0
        assert out is not None
        got["realm"] = out
        return seconds

    fns: list[Sample] = [realm]
    peer = lm.peer
    if peer is not None:

        def llama() -> float:
            peer.rewind(0)
            t0 = time.perf_counter()
            peer.eval(prompt_list)
            seconds = time.perf_counter() - t0
            got["peer"] = peer.last_logits()
            return seconds

        fns.append(llama)

    timings = time_samples(fns, b.profile.budget, [1] * len(fns))
    shape = f"prompt {n}"
    realm_logits = got["realm"]
    ok = bool(np.isfinite(realm_logits).all())
    note = "" if ok else "non-finite logits"
    error = None
    limit = None
    if peer is not None:
        peer_timing = timings[1]
        peer_row = _row(case, "llama.cpp", shape, lm, b, peer_timing, n, None, note="peer")
        limit = Limit("llama.cpp prefill", "llama.cpp", peer_row.rate or 0.0, "tok/s")
        error = relative_error(realm_logits, got["peer"])
        if ok and error > CHECK_MAX_ERROR:
            ok, note = False, f"logits max rel. error {error:.2g} vs llama.cpp"
        elif ok:
            note = f"logits vs llama.cpp: max rel. error {error:.2g}"
    else:
        peer_row = None
    yield _row(
        case,
        "realm",
        shape,
        lm,
        b,
        timings[0],
        n,
        limit,
        ok=ok,
        note=note,
        prompt_tokens=n,
        vs_peer=None if limit is None else timings[1].median / timings[0].median,
        logits_error_vs_peer=error,
    )
    if peer_row is not None:
        yield peer_row


def decode(b: Bench, lm: Loaded) -> Iterator[Result]:
    case = f"decode {lm.wtype}"
    p, steps = DECODE_PROMPT, b.profile.decode_steps
    prompt = b.tokens(p)
    toks = [b.tokens(1) for _ in range(steps)]
    session = lm.model.open_session(capacity=p + steps)
    session.extend(prompt, logits="none")

    def realm() -> float:
        session.rewind(p)
        t0 = time.perf_counter()
        for t in toks:
            session.extend(t, logits="last")
        return time.perf_counter() - t0

    fns: list[Sample] = [realm]
    peer = lm.peer
    if peer is not None:
        peer_toks = [[int(t[0])] for t in toks]
        peer.rewind(0)
        peer.eval([int(t) for t in prompt])

        def llama() -> float:
            peer.rewind(p)
            t0 = time.perf_counter()
            for t in peer_toks:
                peer.eval(t)
            return time.perf_counter() - t0

        fns.append(llama)

    try:
        timings, bw = bracket(
            b.probe, lambda: time_samples(fns, b.profile.budget, [steps] * len(fns))
        )
    finally:
        session.close()
    bound = _bound(bw, lm.bytes_per_token, 1)
    shape = f"ctx {p}+{steps}"
    common = {"prompt_tokens": p, "steps": steps, "read_bandwidth": bw.value}
    base = f"read {bw.value:.1f} GB/s, {lm.bytes_per_token / MIB:.0f} MiB/token"
    vs_peer = None if peer is None else timings[1].median / timings[0].median
    note = base if vs_peer is None else f"{base}; {vs_peer:.2f}x llama.cpp"
    yield _row(
        case, "realm", shape, lm, b, timings[0], 1, bound, note=note, vs_peer=vs_peer, **common
    )
    if peer is not None:
        yield _row(case, "llama.cpp", shape, lm, b, timings[1], 1, bound, note="peer", **common)


def batched(b: Bench, lm: Loaded) -> Iterator[Result]:
    case = f"batched {lm.wtype}"
    p, steps = DECODE_PROMPT, b.profile.batch_steps
    sessions: list[Session] = []
    try:
        for _ in range(max(BATCHES)):
            s = lm.model.open_session(capacity=p + steps)
            sessions.append(s)
            s.extend(b.tokens(p), logits="none")
        toks = [b.tokens(1) for _ in range(steps)]

        def caller(batch: int) -> Sample:
            group = sessions[:batch]

            def run() -> float:
                for s in group:
                    s.rewind(p)
                t0 = time.perf_counter()
                for t in toks:
                    lm.model.step([(s, t, "last") for s in group])
                return time.perf_counter() - t0

            return run

        fns = [caller(batch) for batch in BATCHES]
        timings, bw = bracket(
            b.probe, lambda: time_samples(fns, b.profile.budget, [steps] * len(fns))
        )
    finally:
        for s in sessions:
            s.close()
    t1 = timings[0].median
    for batch, timing in zip(BATCHES, timings, strict=True):
        vs_b1 = timing.median / t1
        yield _row(
            case,
            "realm",
            f"ctx {p}+{steps} x{batch}",
            lm,
            b,
            timing,
            batch,
            _bound(bw, lm.bytes_per_token, batch),
            batch=batch,
            note=f"step {timing.median * 1e3:.1f} ms, t/t(B=1) {vs_b1:.2f}",
            prompt_tokens=p,
            steps=steps,
            step_seconds=timing.median,
            time_vs_b1=vs_b1,
            read_bandwidth=bw.value,
        )


CASES: Final[dict[str, Callable[[Bench, Loaded], Iterator[Result]]]] = {
    "prefill": prefill,
    "decode": decode,
    "batched": batched,
}


# --- targets ---------------------------------------------------------------------------


def targets(b: Bench, ran: set[str], peer_ran: bool) -> list[Target]:
    """The issue's targets whose cases ran (a case that failed counts as FAIL)."""

    def extra(case: str, key: str) -> float | None:
        r = b.result(case, "realm")
        if r is None or not r.ok:
            return None
        return r.ratio if key == "ratio" else r.extra.get(key)

    wt = TARGET_WTYPE
    out: list[Target] = []
    case = f"decode {wt}"
    if case in ran:
        if peer_ran:
            out.append(Target(f"{wt} decode tok/s / llama.cpp", extra(case, "vs_peer"), ">=", 1.0))
        out.append(
            Target(
                f"{wt} decode tok/s / bound (read bandwidth / bytes per token)",
                extra(case, "ratio"),
                ">=",
                DECODE_MIN_BOUND_RATIO,
            )
        )
    case = f"prefill {wt}"
    if case in ran and peer_ran:
        out.append(
            Target(
                f"{wt} prefill tok/s / llama.cpp",
                extra(case, "vs_peer"),
                ">=",
                PREFILL_MIN_PEER_RATIO,
            )
        )
    return out


# --- main ------------------------------------------------------------------------------


def _wtypes(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(w.strip().upper() for w in text.split(",") if w.strip()))
    bad = [w for w in names if w not in ALL_WTYPES]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"weight types are a comma-separated list of {', '.join(ALL_WTYPES)}; got {text!r}"
        )
    return names


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(SUITE, __doc__.splitlines()[0] if __doc__ else SUITE)
    parser.add_argument(
        "--wtype",
        type=_wtypes,
        default=None,
        metavar="TYPES",
        help=f"weight types, comma-separated (default: {','.join(ALL_WTYPES)}; --quick: "
        f"{','.join(QUICK_WTYPES)})",
    )
    parser.add_argument(
        "--shape",
        choices=tuple(SHAPES),
        default="tinyllama",
        help="the model's shape (default: tinyllama, TinyLlama-1.1B's; smollm2: SmolLM2-135M's)",
    )
    args = parser.parse_args(argv)
    wtypes = args.wtype or (QUICK_WTYPES if args.quick else ALL_WTYPES)
    names = [f"{c} {wt}" for wt in wtypes for c in CASES]
    selected = {n for n in names if args.only is None or args.only in n}
    if not selected:
        parser.error(f"no case name contains {args.only!r}; names: {', '.join(names)}")
    wtypes = tuple(wt for wt in wtypes if any(n.endswith(f" {wt}") for n in selected))

    threads = kernels.set_threads(args.threads)
    profile = QUICK if args.quick else FULL
    llama_cpp, peer_version = import_peer()
    shape, shape_name = SHAPES[args.shape]
    # Generate (or find) every file before any measurement: writing one takes a while.
    paths = {wt: ensure_model(shape, wt, SEED, _log) for wt in wtypes}

    reporter = Reporter(json_lines=args.json)
    settings = {
        "quick": args.quick,
        "only": args.only,
        "wtypes": ",".join(wtypes),
        "model": f"llama {shape.key} ({shape_name} shape), random weights, seed {SEED}",
        "peer": f"llama-cpp-python {peer_version}"
        if llama_cpp is not None
        else f"skipped ({peer_version}); install it with `{PEER_INSTALL}`",
    }
    machine = describe_machine(SUITE, threads, settings, numpy_limit=False)
    reporter.machine(machine)
    probe = ReadBandwidth(profile.bandwidth_bytes, profile.bandwidth_iters)
    b = Bench(profile, threads, probe, np.random.default_rng(SEED), llama_cpp)

    reporter.section("machine limits at the start (each decode case measures its own around it)")
    reporter.result(probe.row(probe.measure(), threads))
    if llama_cpp is None:
        reporter.text(
            f"peer llama.cpp skipped: llama_cpp does not import ({peer_version}); "
            f"install it with `{PEER_INSTALL}`"
        )

    for wt in wtypes:
        path = paths[wt]
        per_token, n_bytes = weight_bytes_per_token(path)
        model = load_model(path)
        peer = None
        try:
            if model.info.n_bytes != n_bytes:  # the two ways of counting must agree
                _log(f"models: model.info.n_bytes {model.info.n_bytes} != file's {n_bytes}")
            if llama_cpp is not None:
                try:
                    peer = Peer(llama_cpp, path, threads)
                except Exception as e:  # e.g. an old llama.cpp that cannot read the file
                    reporter.error(f"llama.cpp load {wt}", f"{type(e).__name__}: {e}")
            lm = Loaded(wt, path, model, peer, per_token, n_bytes)
            reporter.section(
                f"{wt}: {n_bytes / GB:.2f} GB of weights, {per_token / GB:.3f} GB read per "
                f"decoded token; {path.name}"
            )
            for kind, run in CASES.items():
                name = f"{kind} {wt}"
                if name not in selected:
                    continue
                try:
                    for r in run(b, lm):
                        b.results.append(r)
                        reporter.result(r)
                except Exception as e:  # the native code may be mid-change: report, go on
                    reporter.error(name, f"{type(e).__name__}: {e}")
        finally:
            if peer is not None:
                peer.close()
            model.close()
            del model, peer
            gc.collect()

    reporter.section("read bandwidth again, at the end (drift check)")
    reporter.result(attrs.evolve(probe.row(probe.measure(), threads), case="limit read end"))
    probe.close()

    reporter.text("")
    reporter.text(
        "rate = tokens/s (batched: B tokens per step). ratio = rate / limit: prefill's limit "
        "is llama.cpp's rate on the same file and prompt (timed interleaved); decode's is the "
        "bound = read bandwidth (better of before/after the case) / weight bytes per token, "
        "times B for a batch."
    )
    reporter.text("times: prefill per prompt, decode per token, batched per step (median and min).")
    peer_ran = any(r.kernel == "llama.cpp" for r in b.results)
    reporter.targets(targets(b, selected, peer_ran))
    reporter.end()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
