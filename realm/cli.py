"""The ``realm`` command line (one entry point, subcommands)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ._errors import RealmError


def _cmd_guest_build(args: argparse.Namespace) -> int:
    from .sandbox._build import GUEST_DIR, GuestBuildError, build

    out = Path(args.output) if args.output else Path(args.source).with_suffix(".wasm")
    try:
        build(Path(args.source), out, include=GUEST_DIR, opt=args.opt)
    except GuestBuildError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{out}: {out.stat().st_size} bytes (SDK: {GUEST_DIR / 'realm_guest.h'})")
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from .model import load_tokenizer

    tok = load_tokenizer(args.model)
    ids = tok.encode(args.text, args.add_special)
    if args.json:
        print(json.dumps({"tokens": ids, "count": len(ids)}))
    else:
        for i in ids:
            print(i, repr(tok.token_to_piece(i).decode("utf-8", "replace")))
        print(f"{len(ids)} tokens", file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .model import load_model

    info = load_model(args.model).info.as_dict()
    print(json.dumps(info, indent=2))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """Embedded generation: the default guest in the sandbox, on this process's model."""
    from .model import load_model
    from .sandbox import CallContext, GuestInstance, SandboxEngine, TenantState, default_guest_path

    print(f"loading {args.model} ...", file=sys.stderr)
    model = load_model(args.model)
    params: dict[str, object] = {"prompt": args.prompt, "max_tokens": args.n}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if args.seed is not None:
        params["seed"] = args.seed
    with SandboxEngine() as engine:
        tenant = TenantState("cli", {"default": model})
        guest = GuestInstance(engine, engine.compile(default_guest_path()), tenant)

        def show(text: str) -> bool:
            sys.stdout.write(text)
            sys.stdout.flush()
            return True

        try:
            result = guest.call("generate", params, CallContext(on_emit=show))
        finally:
            tenant.close()
    usage = result.get("usage", {})
    print(
        f"\n[{result.get('finish_reason')}; {usage.get('prompt_tokens')} prompt + "
        f"{usage.get('completion_tokens')} completion tokens]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="realm", description="Realm: a multi-tenant LLM inference runtime for Trio."
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt (embedded, no server)")
    g.add_argument("prompt")
    g.add_argument("--model", required=True, help="GGUF model file")
    g.add_argument("-n", type=int, default=64, help="max tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--seed", type=int, default=None, help="same seed, same text")
    g.set_defaults(func=_cmd_generate)

    t = sub.add_parser("tokenize", help="show the token ids of a text")
    t.add_argument("text")
    t.add_argument("--model", required=True, help="GGUF file (a vocab-only file works)")
    t.add_argument("--add-special", action="store_true", help="add BOS/EOS as the model does")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.set_defaults(func=_cmd_tokenize)

    i = sub.add_parser("info", help="describe a model file")
    i.add_argument("--model", required=True)
    i.set_defaults(func=_cmd_info)

    guest = sub.add_parser("guest", help="guest modules (WebAssembly tenant runtimes)")
    gsub = guest.add_subparsers(dest="guest_command", required=True)
    b = gsub.add_parser("build", help="compile a C guest (using realm_guest.h) to wasm32")
    b.add_argument("source")
    b.add_argument("-o", "--output", default=None, help="output .wasm (default: beside source)")
    b.add_argument("--opt", default="-O2", help="optimisation flag (default -O2)")
    b.set_defaults(func=_cmd_guest_build)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RealmError as e:
        print(f"realm: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
