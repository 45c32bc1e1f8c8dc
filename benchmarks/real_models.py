"""The real-model suite: published GGUF files against llama.cpp and a float64 forward pass.

    python -m benchmarks.real_models [--quick] [--json] [--threads N] [--only NAME]

Files: the real models of ``realm.testing.real_models`` (the ``[real]`` extra; a model whose
package is missing is reported and skipped). Peer: llama.cpp through llama-cpp-python (the
``[bench]`` extra), same file, same threads; without it only Realm's side runs.

For each model, in one run:
    load      opening the model and its tokenizer (``realm.load_model`` + ``.tokenizer``)
              against ``llama_cpp.Llama`` on the same file; best of 3 (the file is in the page
              cache after the first). Target: <= 1.5x llama.cpp.
    tokens    ids of ``real_model_cases.TOKENIZE_STRINGS`` (plain, and with add_special +
              parse_special) equal to llama.cpp's: count of strings that agree.
    greedy    argmax continuations of ``GREEDY_PROMPTS`` (both free-running): the length of the
              common prefix, out of ``GREEDY_TOKENS``.
    logits    every position of the 64-token logits prompt: rel-RMS (RMS of the difference over
              RMS of the reference, whole vocabulary) and argmax agreement of Realm against
              llama.cpp, and of each against the float64 forward pass of
              ``tests/model/model_reference.py`` on the same quantized weights (``--quick``
              skips the float64 pass).
    prefill   the 64-token prompt into a fresh context, tokens/s, both engines interleaved.
    decode    32 single-token steps after the prompt, tokens/s, both engines interleaved.

The ratio column is Realm / llama.cpp (rates: higher is better; load: lower is better).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import realm
from realm import kernels
from realm.testing import real_model_cases as cases
from realm.testing.real_models import REAL_MODELS, RealModelUnavailable, real_model_path

from ._common import Budget, Reporter, Target, argument_parser, describe_machine
from .models import Peer, import_peer, time_samples

SUITE = "real_models"
DECODE_STEPS = 32
ROOT = Path(__file__).resolve().parent.parent


def _reference_module() -> Any:
    """tests/model/model_reference.py: the float64 forward pass the tests specify against."""
    spec = importlib.util.spec_from_file_location(
        "realm_model_reference", ROOT / "tests" / "model" / "model_reference.py"
    )
    if spec is None or spec.loader is None:
        raise ImportError("tests/model/model_reference.py not found")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_rms(got: np.ndarray, want: np.ndarray) -> float:
    want = want.astype(np.float64)
    return float(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2)))


def argmax_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _realm_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    with model.open_session(capacity=len(prompt) + n) as s:
        logits = s.extend(prompt, logits="last")
        for _ in range(n):
            out.append(int(np.argmax(logits)))
            if len(out) < n:
                logits = s.extend([out[-1]], logits="last")
    return out


def _peer_greedy(llm: Any, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        ptr = llm._ctx.get_logits_ith(-1)
        logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))
        out.append(int(np.argmax(logits)))
        if len(out) < n:
            llm.eval([out[-1]])
    return out


def _time_load(fn: Any, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        obj = fn()
        best = min(best, time.perf_counter() - t0)
        del obj
    return best


def run_model(
    name: str, reporter: Reporter, llama_cpp: Any, threads: int, quick: bool
) -> list[Target]:
    spec = REAL_MODELS[name]
    reporter.section(f"{name}: {spec.description} ({spec.arch})")
    try:
        path = real_model_path(name)
    except RealModelUnavailable as e:
        reporter.error(name, str(e))
        return []
    targets: list[Target] = []

    def realm_open() -> Any:
        m = realm.load_model(path)
        _ = m.tokenizer
        return m

    ours_load = _time_load(realm_open)
    model = realm_open()
    tok = model.tokenizer
    peer: Peer | None = None
    peer_load = None
    if llama_cpp is not None:
        peer_load = _time_load(lambda: Peer(llama_cpp, path, threads).close())
        peer = Peer(llama_cpp, path, threads)
    line = f"load: realm {ours_load:.3f} s"
    if peer_load is not None:
        line += f", llama.cpp {peer_load:.3f} s, ratio {ours_load / peer_load:.2f}x"
        targets.append(Target(f"{name} load / llama.cpp", ours_load / peer_load, "<=", 1.5))
    reporter.text(line)

    if peer is not None:
        llm = peer.llm
        agree = 0
        for s in cases.TOKENIZE_STRINGS:
            plain = llm.tokenize(s.encode(), add_bos=False, special=False)
            special = llm.tokenize(s.encode(), add_bos=True, special=True)
            agree += int(
                tok.encode(s) == plain
                and tok.encode(s, add_special=True, parse_special=True) == special
            )
        n = len(cases.TOKENIZE_STRINGS)
        reporter.text(f"tokens: {agree}/{n} strings give llama.cpp's ids")
        targets.append(Target(f"{name} tokens agree", agree / n, ">=", 1.0))
        prefixes = []
        for prompt_text in cases.GREEDY_PROMPTS:
            prompt = tok.encode(prompt_text, add_special=True)
            ours = _realm_greedy(model, prompt, cases.GREEDY_TOKENS)
            theirs = _peer_greedy(llm, prompt, cases.GREEDY_TOKENS)
            prefixes.append(_common_prefix(ours, theirs))
            reporter.text(f"greedy {prompt_text!r}: {tok.decode(ours)!r}")
        reporter.text(
            f"greedy: common prefix with llama.cpp {prefixes} of {cases.GREEDY_TOKENS} tokens"
        )

    ids = tok.encode(cases.LOGITS_TEXT, add_special=True)[: cases.LOGITS_TOKENS]
    ours_logits = model.logits(ids)
    theirs_logits = None
    if peer is not None:
        llm_all = llama_cpp.Llama(
            model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=threads,
            verbose=False,
        )  # fmt: skip
        llm_all.eval(ids)
        theirs_logits = np.array(llm_all.scores[: len(ids)], dtype=np.float32)
        llm_all.close()
        r = rel_rms(ours_logits, theirs_logits)
        a = argmax_agreement(ours_logits, theirs_logits)
        reporter.text(f"logits vs llama.cpp: rel-RMS {r:.4f}, argmax agreement {a:.3f}")
        targets.append(Target(f"{name} argmax agreement with llama.cpp", a, ">=", 0.95))
    if not quick:
        try:
            ref = _reference_module().reference_logits(path, ids)
        except Exception as e:  # an architecture the reference does not implement
            reporter.error(f"{name} float64", f"{type(e).__name__}: {e}")
        else:
            line = (
                f"logits vs float64: realm rel-RMS {rel_rms(ours_logits, ref):.4f}, "
                f"argmax {argmax_agreement(ours_logits, ref):.3f}"
            )
            if theirs_logits is not None:
                line += (
                    f"; llama.cpp rel-RMS {rel_rms(theirs_logits, ref):.4f}, "
                    f"argmax {argmax_agreement(theirs_logits, ref):.3f}"
                )
            reporter.text(line)

    budget = Budget(warmup=1, min_reps=3 if quick else 5, max_reps=20, seconds=2.0 if quick else 5)

    def realm_prefill() -> float:
        with model.open_session(capacity=len(ids)) as s:
            t0 = time.perf_counter()
            s.extend(ids, logits="last")
            return time.perf_counter() - t0

    def realm_decode() -> float:
        with model.open_session(capacity=len(ids) + DECODE_STEPS) as s:
            s.extend(ids, logits="none")
            t0 = time.perf_counter()
            for i in range(DECODE_STEPS):
                s.extend([ids[i % len(ids)]], logits="last")
            return time.perf_counter() - t0

    fns_prefill = [realm_prefill]
    fns_decode = [realm_decode]
    if peer is not None:
        p = peer

        def peer_prefill() -> float:
            p.rewind(0)
            t0 = time.perf_counter()
            p.eval(ids)
            return time.perf_counter() - t0

        def peer_decode() -> float:
            p.rewind(0)
            p.eval(ids)
            t0 = time.perf_counter()
            for i in range(DECODE_STEPS):
                p.eval([ids[i % len(ids)]])
            return time.perf_counter() - t0

        fns_prefill.append(peer_prefill)
        fns_decode.append(peer_decode)
    for case, fns, units in (
        ("prefill", fns_prefill, [len(ids)] * 2),
        ("decode", fns_decode, [DECODE_STEPS] * 2),
    ):
        timings = time_samples(fns, budget, units[: len(fns)])
        rates = [1.0 / t.median for t in timings]
        line = f"{case}: realm {rates[0]:.1f} tok/s"
        if len(rates) > 1:
            line += f", llama.cpp {rates[1]:.1f} tok/s, ratio {rates[0] / rates[1]:.2f}x"
            targets.append(Target(f"{name} {case} / llama.cpp", rates[0] / rates[1], ">=", 1.0))
        reporter.text(line)
    if peer is not None:
        peer.close()
    model.close()
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    p = argument_parser(SUITE, __doc__.splitlines()[0])
    args = p.parse_args(argv)
    if args.threads:
        kernels.set_threads(args.threads)
    threads = kernels.threads()
    llama_cpp, peer_version = import_peer()
    reporter = Reporter(json_lines=args.json)
    reporter.machine(
        describe_machine(
            SUITE, threads, {"quick": args.quick, "llama.cpp": peer_version}, numpy_limit=False
        )
    )
    targets: list[Target] = []
    for name in REAL_MODELS:
        if args.only and args.only not in name:
            continue
        try:
            targets += run_model(name, reporter, llama_cpp, threads, args.quick)
        except Exception as e:  # one model failing must not hide the others' figures
            reporter.error(name, f"{type(e).__name__}: {e}")
    reporter.targets(targets)
    reporter.end()
    return 0


if __name__ == "__main__":
    sys.exit(main())
