"""Containment benchmarks: a bystander tenant's tokens while another tenant attacks.

    python -m benchmarks.containment [--quick] [--json] [--threads N] [--only SUBSTRING]

One ``realm.open_runtime`` on the built-in model serves a bystander tenant (the default guest)
and one attacking tenant per case, each an inline WAT guest that loops on the worst thing guest
ABI v1 lets it do, in as many calls at once as its tenant may run (``max_concurrent_calls``,
2). The bystander streams ``generate`` calls (greedy, ``max_tokens`` 48, ``--quick`` 24); each
call's token events are timed where a reader receives them.

For every case the bystander runs idle (no attack) and under the attack, interleaved in the
same run (idle, attack, idle, attack ...), ``reps`` calls each. A row gives, under attack, the
median of the calls' worst gaps between two tokens; its limit is the same figure measured idle
in the same run, and the ratio is attack / idle. The note gives tokens/s under attack and idle
(tokens after the first over the time after the first) and the attack's own progress.

Cases (attacks):
    spin          wasm that never calls the host (the epoch deadline is the only brake)
    matmul 2048   ``matmul_f32`` of 2048 x 2048 weights by a batch of 2048, in a loop (the
                  product that held every forward step for 7-13 s before the pool's gate)
    matmul 4096   4096^3, the largest product the default 256 MiB of guest memory holds
    attention     ``attention_f32`` with the most work per query the ABI allows (32 heads of
                  128 over 8192 positions: 2^18 scores) for 2048 queries, in a loop
    tokenize      ``tokenize`` of 1 MiB of text (the most one call takes), in a loop
    decode        ``decode`` of 2^20 ids (the most one call takes), in a loop
    embed         ``embed`` of a whole context, in a loop
    prefill       ``forward`` of a whole context then a rewind, in a loop
    emit          ``emit`` of 64 KiB chunks (the most one chunk may be), in a loop, to a
                  caller that reads them

Target: under every attack, the bystander's worst gap between tokens < 3x its idle value.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any, Final

import attrs
import trio

import realm
from realm import kernels
from realm.sandbox import COMPUTE

from ._common import Limit, Reporter, Result, Target, Timing, argument_parser, describe_machine

SUITE: Final = "containment"
BYSTANDER: Final = "bystander"
PROMPT: Final = "Once upon a time"
RATIO_MAX: Final = 3.0  # the target: worst gap under attack / idle
ATTACK_SETTLE_SECONDS: Final = 0.3  # the attack runs this long before the bystander starts
PAGE: Final = 65536


@attrs.frozen
class Profile:
    max_tokens: int
    reps: int


FULL: Final = Profile(max_tokens=48, reps=5)
QUICK: Final = Profile(max_tokens=24, reps=3)


# --- the attacking guests ---------------------------------------------------------------------

_IMPORTS = {
    "matmul_f32": "(param i32 i32 i32 i32 i32 i32) (result i32)",
    "attention_f32": "(param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)",
    "tokenize": "(param i32 i32 i32 i32 i32 i32 i32) (result i32)",
    "decode": "(param i32 i32 i32 i32 i32 i32) (result i32)",
    "embed": "(param i32 i32 i32 i32 i32 i32) (result i32)",
    "session_open": "(param i32 i32 i32) (result i32)",
    "session_rewind": "(param i32 i32) (result i32)",
    "forward": "(param i32 i32 i32 i32 i32 i32) (result i32)",
    "emit": "(param i32 i32) (result i32)",
}
META: Final = 0x100
HEAP: Final = 0x10000  # buffers start here


def _guest(body: str, pages: int, setup: str = "") -> bytes:
    """A guest exporting ``attack``: ``setup`` once, then ``body`` (an i32 status) in a loop
    until it is not 0 (ECANCELLED when the call is cancelled)."""
    meta = '{"name": "attacker", "version": "1", "functions": [{"name": "attack"}]}'
    escaped = meta.replace('"', '\\"')
    imports = "\n".join(
        f'  (import "realm" "{n}" (func ${n} {sig}))' for n, sig in _IMPORTS.items()
    )
    return f"""(module
{imports}
  (memory (export "memory") {pages})
  (data (i32.const {META}) "{escaped}")
  (func (export "realm_abi_version") (result i32) (i32.const 1))
  (func (export "realm_alloc") (param i32) (result i32) (i32.const 0x8000))
  (func (export "realm_free") (param i32 i32))
  (func (export "realm_metadata_ptr") (result i32) (i32.const {META}))
  (func (export "realm_metadata_len") (result i32) (i32.const {len(meta)}))
  (func (export "realm_fn_attack") (param $p i32) (param $n i32) (result i32)
    (local $i i32) (local $s i32)
    {setup}
    (block $done (loop $again
      (local.set $s {body})
      (br_if $done (i32.ne (local.get $s) (i32.const 0)))
      (br $again)))
    (local.get $s))
)""".encode()


def _fill_ids(at: int, n: int, modulo: int, first: int = 3) -> str:
    """Wasm that writes ``n`` i32 ids ``first + i % modulo`` at ``at``."""
    return f"""(local.set $i (i32.const 0))
    (block $filled (loop $fill
      (br_if $filled (i32.ge_u (local.get $i) (i32.const {n})))
      (i32.store (i32.add (i32.const {at}) (i32.shl (local.get $i) (i32.const 2)))
                 (i32.add (i32.const {first}) (i32.rem_u (local.get $i) (i32.const {modulo}))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $fill)))"""


def _fill_text(at: int, n: int) -> str:
    """Wasm that writes ``n`` bytes of words ('a'..'y' runs, a space every 6th byte)."""
    return f"""(local.set $i (i32.const 0))
    (block $filled (loop $fill
      (br_if $filled (i32.ge_u (local.get $i) (i32.const {n})))
      (i32.store8 (i32.add (i32.const {at}) (local.get $i))
        (select (i32.const 32) (i32.add (i32.const 97) (i32.rem_u (local.get $i) (i32.const 25)))
                (i32.eqz (i32.rem_u (local.get $i) (i32.const 6)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $fill)))"""


def _matmul(n: int) -> bytes:
    w, x, y = HEAP, HEAP + 4 * n * n, HEAP + 8 * n * n
    pages = (HEAP + 12 * n * n) // PAGE + 1
    body = (
        f"(call $matmul_f32 (i32.const {y}) (i32.const {w}) (i32.const {x}) "
        f"(i32.const {n}) (i32.const {n}) (i32.const {n}))"
    )
    return _guest(body, pages)


def _attention() -> bytes:
    n_q, n_kv, heads, kv_heads, d = 2048, 8192, 32, 4, 128  # 2^18 scores a query: the most
    q = HEAP
    k = q + 4 * n_q * heads * d
    v = k + 4 * n_kv * kv_heads * d
    pos = v + 4 * n_kv * kv_heads * d
    out = pos + 4 * n_q
    pages = (out + 4 * n_q * heads * d) // PAGE + 1
    setup = _fill_ids(pos, n_q, 1, first=n_kv - 1)  # every query sees every position
    body = (f"(call $attention_f32 (i32.const {out}) (i32.const {q}) (i32.const {k}) "
            f"(i32.const {v}) (i32.const {pos}) (i32.const {n_q}) (i32.const {n_kv}) "
            f"(i32.const {heads}) (i32.const {kv_heads}) (i32.const {d}))")  # fmt: skip
    return _guest(body, pages, setup)


def _tokenize() -> bytes:
    n = 1 << 20
    out = HEAP + n
    body = (f"(call $tokenize (i32.const 0) (i32.const 0) (i32.const {HEAP}) (i32.const {n}) "
            f"(i32.const 0) (i32.const {out}) (i32.const 0))")  # fmt: skip
    # a count >= 0 is success: the loop goes on while the import does not fail
    body = f"(select (i32.const 0) (local.tee $s {body}) (i32.ge_s (local.get $s) (i32.const 0)))"
    return _guest(body, (out + PAGE) // PAGE + 1, _fill_text(HEAP, n))


def _decode(vocab: int) -> bytes:
    n = 1 << 20
    out = HEAP + 4 * n
    body = (f"(call $decode (i32.const 0) (i32.const 0) (i32.const {HEAP}) (i32.const {n}) "
            f"(i32.const {out}) (i32.const 0))")  # fmt: skip
    body = f"(select (i32.const 0) (local.tee $s {body}) (i32.ge_s (local.get $s) (i32.const 0)))"
    return _guest(body, (out + PAGE) // PAGE + 1, _fill_ids(HEAP, n, vocab - 3))


def _embed(vocab: int, ctx: int, n_embd: int) -> bytes:
    out = HEAP + 4 * ctx
    body = (f"(call $embed (i32.const 0) (i32.const 0) (i32.const {HEAP}) (i32.const {ctx}) "
            f"(i32.const {out}) (i32.const {n_embd}))")  # fmt: skip
    body = f"(select (i32.const 0) (local.tee $s {body}) (i32.ge_s (local.get $s) (i32.const 0)))"
    return _guest(body, (out + 4 * n_embd) // PAGE + 2, _fill_ids(HEAP, ctx, vocab - 3))


def _prefill(vocab: int, ctx: int) -> bytes:
    setup = _fill_ids(HEAP, ctx, vocab - 3) + (
        "\n    (local.set $i (call $session_open (i32.const 0) (i32.const 0) (i32.const 0)))"
    )
    forward = (
        f"(call $forward (local.get $i) (i32.const {HEAP}) (i32.const {ctx}) (i32.const 0) "
        "(i32.const 0) (i32.const 0))"
    )
    body = (
        f"(if (result i32) (i32.eqz (local.tee $s {forward})) "
        "(then (drop (call $session_rewind (local.get $i) (i32.const 0))) (i32.const 0)) "
        "(else (local.get $s)))"
    )
    return _guest(body, (HEAP + 4 * ctx) // PAGE + 2, setup)


def _emit() -> bytes:
    n = 64 << 10
    body = f"(call $emit (i32.const {HEAP}) (i32.const {n}))"
    return _guest(body, (HEAP + n) // PAGE + 2, _fill_text(HEAP, n))


def _spin() -> bytes:
    return _guest("(i32.const 0)", 2)


def attacks(info: Any) -> dict[str, bytes]:
    vocab, ctx, n_embd = info.vocab_size, info.context_length, info.n_embd
    return {
        "spin": _spin(),
        "matmul 2048": _matmul(2048),
        "matmul 4096": _matmul(4096),
        "attention": _attention(),
        "tokenize": _tokenize(),
        "decode": _decode(vocab),
        "embed": _embed(vocab, ctx, n_embd),
        "prefill": _prefill(vocab, ctx),
        "emit": _emit(),
    }


# --- measurements -------------------------------------------------------------------------------


@attrs.frozen
class Run:
    """One bystander call: when each token arrived."""

    arrivals: tuple[float, ...]

    @property
    def worst_gap(self) -> float:
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        return max(gaps) if gaps else math.nan

    @property
    def rate(self) -> float:
        n = len(self.arrivals)
        span = self.arrivals[-1] - self.arrivals[0] if n > 1 else 0.0
        return (n - 1) / span if span > 0 else math.nan


async def bystander(rt: realm.actors.Runtime, max_tokens: int) -> Run:
    params = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    arrivals: list[float] = []
    async with rt.stream(BYSTANDER, "generate", params) as events:
        async for ev in events:
            if ev.kind == "token":
                arrivals.append(time.perf_counter())
    return Run(tuple(arrivals))


async def attacked(
    rt: realm.actors.Runtime, name: str, max_tokens: int
) -> tuple[Run, int, list[str]]:
    """A bystander call while ``name``'s tenant attacks in two calls; the attack's chunk count
    (events, for emit) and how its calls ended."""
    outcomes: list[str] = []
    emitted = 0

    def count(_ev: Any) -> None:
        nonlocal emitted
        emitted += 1

    async def attack() -> None:
        try:
            await rt.call(name, "attack", {}, on_event=count)
            outcomes.append("returned")
        except realm.RealmError as e:
            outcomes.append(type(e).__name__)

    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(attack)
        await trio.sleep(ATTACK_SETTLE_SECONDS)
        run = await bystander(rt, max_tokens)
        nursery.cancel_scope.cancel()
    return run, emitted, outcomes


def _median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def _timing(xs: Sequence[float]) -> Timing:
    xs = [x for x in xs if not math.isnan(x)] or [math.nan]
    return Timing(statistics.median(xs), min(xs), len(xs), 1)


async def run_cases(
    reporter: Reporter, profile: Profile, threads: int, selected: list[str]
) -> list[Target]:
    model = realm.load_model(realm.default_model_path())
    guests = attacks(model.info)
    tenants: dict[str, Any] = {BYSTANDER: {}}
    tenants |= {name: {"guest": guests[name]} for name in selected}
    targets: list[Target] = []
    async with realm.open_runtime(models={"tiny": model}, tenants=tenants) as rt:
        for _ in range(2):  # warm-up: the instances, the caches
            await bystander(rt, profile.max_tokens)
        reporter.section(
            "bystander's worst gap between tokens under attack (limit: idle, same run)"
        )
        for name in selected:
            idle: list[Run] = []
            under: list[Run] = []
            chunks: list[int] = []
            ends: list[str] = []
            steps_before = COMPUTE.statistics()
            for _ in range(profile.reps):  # interleaved: drift hits both alike
                idle.append(await bystander(rt, profile.max_tokens))
                run, emitted, outcomes = await attacked(rt, name, profile.max_tokens)
                under.append(run)
                chunks.append(emitted)
                ends += outcomes
            gate = COMPUTE.statistics()
            idle_gap = _median([r.worst_gap for r in idle])
            gap_timing = _timing([r.worst_gap for r in under])
            ratio = gap_timing.median / idle_gap if idle_gap > 0 else math.nan
            rate, idle_rate = _median([r.rate for r in under]), _median([r.rate for r in idle])
            step_waits = gate.step_wait_seconds - steps_before.step_wait_seconds
            steps = gate.steps - steps_before.steps
            note = (
                f"tok/s {rate:.0f} under attack, {idle_rate:.0f} idle ({rate / idle_rate:.2f}x); "
                f"steps waited {1e3 * step_waits / max(steps, 1):.2f} ms on average for a guest "
                f"chunk (max {1e3 * gate.step_wait_max_seconds:.1f} ms so far)"
                + (f"; {_median(chunks):.0f} chunks emitted per attack" if name == "emit" else "")
                + (f"; attack calls ended: {sorted(set(ends))}" if ends else "")
            )
            reporter.result(
                Result(
                    case=name,
                    kernel=name,
                    shape=f"{profile.max_tokens} tokens",
                    wtype="-",
                    batch=1,
                    threads=threads,
                    timing=gap_timing,
                    limit=Limit(
                        "idle worst gap", "idle", idle_gap, "s", tuple(r.worst_gap for r in idle)
                    ),
                    ratio=ratio,
                    note=note,
                    extra={
                        "tokens_per_second": rate,
                        "idle_tokens_per_second": idle_rate,
                        "worst_gaps": [r.worst_gap for r in under],
                        "idle_worst_gaps": [r.worst_gap for r in idle],
                    },
                )
            )
            targets.append(Target(f"{name}: bystander's worst gap / idle", ratio, "<=", RATIO_MAX))
    model.close()
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(SUITE, __doc__.splitlines()[0] if __doc__ else SUITE)
    args = parser.parse_args(argv)
    threads = kernels.set_threads(args.threads)
    profile = QUICK if args.quick else FULL
    info = realm.load_model(realm.default_model_path()).info
    names = list(attacks(info))
    selected = [n for n in names if args.only is None or args.only in n]
    if not selected:
        parser.error(f"no case name contains {args.only!r}; names: {', '.join(names)}")
    reporter = Reporter(json_lines=args.json)
    settings = {
        "quick": args.quick,
        "only": args.only,
        "model": f"the built-in model ({info.name}, {info.n_params} parameters)",
        "bystander": f"generate {PROMPT!r}, greedy, max_tokens {profile.max_tokens}",
        "reps": f"{profile.reps} idle and {profile.reps} attacked calls per case, interleaved",
        "attack": "2 calls at once (the tenant's max_concurrent_calls), default limits",
    }
    reporter.machine(describe_machine(SUITE, threads, settings, numpy_limit=False))
    targets = trio.run(run_cases, reporter, profile, threads, selected)
    reporter.text("")
    reporter.text(
        "rows: median over the calls of the bystander's worst gap between two tokens while "
        "the attack runs; limit: the same figure with no attack, measured in the same run; "
        "ratio: attack / idle."
    )
    reporter.targets(targets)
    reporter.end()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
