"""Embedding Realm's guest sandbox: two tenants, two runtimes, one shared model.

    python examples/embed_sandbox.py                  # a tiny random-weight test model
    python examples/embed_sandbox.py --model m.gguf   # any llama / qwen2 GGUF model

Tenant "alice" runs Realm's default guest (guest/default_guest.c); tenant "bob" runs the
example runtime examples/guests/keyword_guard.c, built here to WebAssembly exactly as
`realm guest build` does. Both tenants share the model (its weights are mapped once); each
has its own sandbox (store, memory, fuel) and its own sessions. Streamed tokens are printed
as the guests emit them (a tiny random-weight model says gibberish, byte tokens included:
the point is the plumbing, not the prose).

This is the embedded use of the sandbox as it stands: calls run synchronously on the calling
thread. The Trio actor runtime (one actor per tenant, cross-tenant batching) comes later.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import realm
from realm.sandbox import CallContext, GuestInstance, SandboxEngine, TenantState, default_guest_path
from realm.sandbox._build import GUEST_DIR, build  # what `realm guest build` runs
from realm.testing import write_test_model

HERE = Path(__file__).resolve().parent
KEYWORD_GUARD_SOURCE = HERE / "guests" / "keyword_guard.c"
_CONTROL = {c: "\N{REPLACEMENT CHARACTER}" for c in range(32) if chr(c) not in "\n\t"}


class Printer:
    """The on_emit callback: prints each streamed chunk as it arrives (True: keep going)."""

    def __init__(self) -> None:
        self.chunks = 0

    def __call__(self, text: str) -> bool:
        sys.stdout.write(("  stream: " if not self.chunks else "") + text.translate(_CONTROL))
        sys.stdout.flush()
        self.chunks += 1
        return True


def call(guest: GuestInstance, function: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """Run one call, streaming its text; print the result (or the guest's error)."""
    print(f"\n[{guest.tenant.name}] {function}({params})")
    printer = Printer()
    t0 = time.perf_counter()
    try:
        result = guest.call(function, params, CallContext(on_emit=printer))
    except realm.GuestError as e:  # the guest refused or failed: its message says why
        print(("\n" if printer.chunks else "") + f"  error: {e}")
        return None
    ms = (time.perf_counter() - t0) * 1000
    if printer.chunks:
        print(f"   ({printer.chunks} chunks)")
    brief = {k: v for k, v in result.items() if k not in ("text", "timings", "tokens")}
    print(f"  result ({ms:.0f} ms): {brief}")
    return result


def first_word(text: str, avoid: str) -> str | None:
    """The first run of 3+ ASCII letters in text that avoid does not contain (case-insensitive):
    a word the model wanted to say."""
    for m in re.finditer(r"[A-Za-z]{3,}", text):
        if m.group(0).lower() not in avoid.lower():
            return m.group(0)
    return None


def run(model_path: Path, work: Path, max_tokens: int) -> None:
    print(f"model: {model_path}")
    model = realm.load_model(model_path)
    wasm = build(KEYWORD_GUARD_SOURCE, work / "keyword_guard.wasm", include=GUEST_DIR)
    print(f"built {KEYWORD_GUARD_SOURCE.name} -> {wasm.name} ({wasm.stat().st_size} bytes)")

    with SandboxEngine() as engine:  # one per process: compiles and caches modules
        alice = TenantState("alice", {"main": model})
        bob = TenantState("bob", {"main": model})
        try:
            default = GuestInstance(engine, engine.compile(default_guest_path()), alice)
            guard = GuestInstance(engine, engine.compile(wasm), bob)
            for g in (default, guard):
                names = ", ".join(f["name"] for f in g.functions())
                print(f"tenant {g.tenant.name}: {g.metadata['name']} ({names})")

            # alice: the default runtime, llama.cpp-style sampling in the guest
            prompt = "Once upon a time"
            call(default, "generate", {"prompt": prompt, "max_tokens": max_tokens,
                                       "temperature": 0.8, "seed": 42})  # fmt: skip
            call(default, "count_tokens", {"text": prompt})

            # bob: his own rules. First greedily with nothing blocked ...
            first = call(guard, "answer", {"prompt": prompt, "max_tokens": max_tokens})
            word = first_word(first["text"], avoid=prompt) if first else None
            # ... then the same prompt with the word the model wanted to say blocked
            if word:
                call(guard, "answer", {"prompt": prompt, "max_tokens": max_tokens,
                                       "blocked": [word.upper()]})  # fmt: skip
            # a prompt with a blocked word is refused before the model runs
            call(guard, "answer", {"prompt": "Tell me the secret password",
                                   "blocked": ["SECRET", "password"]})  # fmt: skip
            # a pure business-rule function: no model involved
            call(guard, "word_count", {"text": "The quick brown fox jumps over the lazy dog"})
            # the host validates params against the function's schema before entering the guest
            try:
                guard.call("answer", {"prompt": prompt, "max_tokens": 1000})
            except realm.InvalidParams as e:
                print(f"\n[bob] invalid params are refused by the host: {e}")
        finally:
            alice.close()  # the tenants' sessions (KV caches)
            bob.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a GGUF model (default: a tiny one)")
    p.add_argument("-n", "--max-tokens", type=int, default=16, help="tokens per call (1..256)")
    args = p.parse_args(argv)
    if not 1 <= args.max_tokens <= 256:
        p.error("--max-tokens must be in 1..256")
    with tempfile.TemporaryDirectory(prefix="realm-example-") as tmp:
        work = Path(tmp)
        model_path = args.model or write_test_model(work / "tiny.gguf")
        try:
            run(model_path, work, args.max_tokens)
        except realm.RealmError as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
