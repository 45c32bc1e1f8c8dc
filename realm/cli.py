"""The ``realm`` command line (one entry point, subcommands)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ._errors import CallCancelled, InvalidParams, RealmError
from ._util import single_error

if TYPE_CHECKING:
    from .model import Model, Tokenizer
    from .sandbox import GuestInstance


def _model_path(arg: str | None) -> str:
    """The model a command runs on: ``--model``, else the built-in default model."""
    if arg:
        return arg
    from .model import default_model_path

    return str(default_model_path())


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


def _show_piece(tok: Tokenizer, token_id: int) -> str:
    """A token's piece for display: its text, with byte tokens and every byte that is not
    UTF-8 text on its own (part of a character) written ``<0xNN>``, never U+FFFD."""
    from .model._tokenizer import TokenType

    piece = tok.token_to_piece(token_id, render_special=True)
    if tok.token_type(token_id) == TokenType.BYTE:  # SentencePiece byte fallback: <0x0A> ...
        return "".join(f"<0x{b:02X}>" for b in piece)
    out: list[str] = []
    i = 0
    while i < len(piece):
        for n in range(1, 5):  # the shortest prefix that is a whole character
            try:
                out.append(piece[i : i + n].decode("utf-8"))
            except UnicodeDecodeError:
                continue
            i += n
            break
        else:
            out.append(f"<0x{piece[i]:02X}>")
            i += 1
    return "".join(out)


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from .model import load_tokenizer

    tok = load_tokenizer(_model_path(args.model))
    ids = tok.encode(args.text, args.add_special)
    pieces = [_show_piece(tok, i) for i in ids]
    if args.json:
        print(json.dumps({"tokens": ids, "pieces": pieces, "count": len(ids)}, ensure_ascii=False))
    else:
        for i, piece in zip(ids, pieces, strict=True):
            print(i, repr(piece))
        print(f"{len(ids)} tokens", file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .model import load_model

    path = _model_path(args.model)
    info = load_model(path).info.as_dict()
    print(json.dumps({"path": path, **info}, indent=2))
    return 0


def _number(text: str) -> float:
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


# the sampling flags of generate and chat: (flag, the guest's param, argparse type, help); the
# defaults in the help are the default guest's (a test checks them against its metadata)
SAMPLING_FLAGS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("--temperature", "temperature", _number, "0: greedy, the argmax at every step (default 0.8)"),
    ("--top-k", "top_k", int, "sample among the k most likely tokens; 0 disables (default 40)"),
    ("--top-p", "top_p", _number, "nucleus sampling, in (0, 1]; 1 disables (default 0.95)"),
    ("--min-p", "min_p", _number, "in [0, 1]; 0 disables (default 0.05)"),
    (
        "--repeat-penalty",
        "repeat_penalty",
        _number,
        "over the last 64 tokens, > 0; 1 disables (default 1, as llama.cpp)",
    ),
    ("--seed", "seed", int, "same seed, same text (default: a fresh seed per call)"),
)


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Add the sampling flags; the default guest's own defaults apply to those not given."""
    for flag, param, kind, help_ in SAMPLING_FLAGS:
        p.add_argument(flag, dest=param, type=kind, default=None, help=help_)


def _sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    """The guest params for the sampling flags given (the others stay the guest's defaults)."""
    return {
        param: getattr(args, param)
        for _, param, _, _ in SAMPLING_FLAGS
        if getattr(args, param) is not None
    }


@contextlib.contextmanager
def _default_guest(model: Model) -> Iterator[GuestInstance]:
    """The default guest in the sandbox over ``model``, with no server: a tenant's call path."""
    from .sandbox import GuestInstance, SandboxEngine, TenantState, default_guest_path

    with SandboxEngine() as engine:
        tenant = TenantState("cli", {"default": model})
        try:
            yield GuestInstance(engine, engine.compile(default_guest_path()), tenant)
        finally:
            tenant.close()


def _stream_call(guest: GuestInstance, function: str, params: dict[str, Any]) -> dict[str, Any]:
    """Call ``function``, streaming its text to stdout. Ctrl-C cancels the call (the guest ends
    it, and the result says ``cancelled``) instead of interrupting a host import."""
    from .sandbox import CallContext

    def show(text: str) -> bool:
        sys.stdout.write(text)
        sys.stdout.flush()
        return True

    ctx = CallContext(on_emit=show)
    if threading.current_thread() is not threading.main_thread():
        return guest.call(function, params, ctx)
    previous = signal.signal(signal.SIGINT, lambda _sig, _frame: ctx.cancel.set())
    try:
        return guest.call(function, params, ctx)
    except CallCancelled:
        if not ctx.cancel.is_set():  # the deadline, not Ctrl-C
            raise
        return {"finish_reason": "cancelled"}
    finally:
        signal.signal(signal.SIGINT, previous)


def _cmd_generate(args: argparse.Namespace) -> int:
    """Embedded generation: the default guest in the sandbox, on this process's model."""
    from .model import load_model

    path = _model_path(args.model)
    print(f"loading {path} ...", file=sys.stderr)
    model = load_model(path)
    params: dict[str, Any] = {"prompt": args.prompt, "max_tokens": args.n}
    params |= _sampling_params(args)
    with _default_guest(model) as guest:
        try:
            result = _stream_call(guest, "generate", params)
        except InvalidParams as e:  # the guest's schema or the guest itself refused a value
            print(f"realm generate: {e}", file=sys.stderr)
            return 1
    usage = result.get("usage", {})
    print(
        f"\n[{result.get('finish_reason')}; {usage.get('prompt_tokens')} prompt + "
        f"{usage.get('completion_tokens')} completion tokens]",
        file=sys.stderr,
    )
    return 130 if result.get("finish_reason") == "cancelled" else 0


def _read_turn(interactive: bool) -> str | None:
    """The next user line (without its line ending), or None at the end of the input."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def _cmd_chat(args: argparse.Namespace) -> int:
    """Chat on the terminal: the default guest's ``chat`` with the model's own chat template;
    the guest keeps the conversation (history and KV cache) across turns."""
    from .model import load_model

    path = _model_path(args.model)
    interactive = sys.stdin.isatty()
    print(f"loading {path} ...", file=sys.stderr)
    model = load_model(path)
    if model.tokenizer.chat_template is None:
        print(
            f"realm chat: {path} has no chat template (tokenizer.chat_template); "
            "use realm generate",
            file=sys.stderr,
        )
        return 1
    sampling: dict[str, Any] = {"max_tokens": args.n, **_sampling_params(args)}
    status = 0
    with _default_guest(model) as guest:
        try:  # a fresh conversation; the host checks the flags' values against the schema
            guest.call("chat", {"reset": True, **sampling})
        except InvalidParams as e:
            print(f"realm chat: {e}", file=sys.stderr)
            return 1
        if interactive:
            print("Ctrl-C stops a reply; /exit or Ctrl-D ends the chat.", file=sys.stderr)
        held = 0  # messages the guest's history holds
        while (line := _read_turn(interactive)) is not None:
            if line.strip() == "/exit":
                break
            if not line.strip():
                continue
            params = dict(sampling)
            if held == 0 and args.system is not None:
                params["messages"] = [
                    {"role": "system", "content": args.system},
                    {"role": "user", "content": line},
                ]
            else:
                params["message"] = line
            try:
                result = _stream_call(guest, "chat", params)
            except InvalidParams as e:  # this turn (e.g. a message longer than the context)
                print(f"realm chat: {e}", file=sys.stderr)
                status = 1
                continue
            print(flush=True)
            held = int(result.get("messages", held))
            finish = result.get("finish_reason")
            if finish == "cancelled":
                print("[cancelled: the reply is not kept]", file=sys.stderr)
            elif finish == "length":
                print(f"[the reply reached -n {args.n} tokens]", file=sys.stderr)
            if result.get("dropped_messages"):
                print(
                    f"[{result['dropped_messages']} oldest messages no longer fit the "
                    "context: left out]",
                    file=sys.stderr,
                )
    return status


def _server_config(args: argparse.Namespace) -> Any:
    from .server import ServerConfig, load_config

    if args.config:
        if args.model:
            raise SystemExit("realm serve: give --model or --config, not both")
        config = load_config(args.config)
        changes: dict[str, Any] = {}
        if args.host is not None:
            changes["host"] = args.host
        if args.port is not None:
            changes["port"] = args.port
        if args.metrics_port is not None:
            changes["metrics_port"] = args.metrics_port
        return attrs.evolve(config, **changes)
    path = _model_path(args.model)
    return ServerConfig(
        models={Path(path).stem: path},
        host=args.host or "127.0.0.1",
        port=8080 if args.port is None else args.port,
        metrics_port=args.metrics_port,
    )


def _port(text: str) -> int:
    """argparse type of ``--port`` / ``--metrics-port``: checked as the config's keys are."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..65535, not {text!r}")
    return value


def _cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from .server import serve

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = _server_config(args)
    for name, path in config.models.items():
        print(f"loading model {name} from {path} ...", file=sys.stderr)
    try:
        with single_error():
            trio.run(serve, config)
    except OSError as e:  # the port is taken, or the address is not this machine's
        print(
            f"realm serve: cannot serve on {config.host} port {config.port}"
            f"{'' if config.metrics_port is None else f' (metrics {config.metrics_port})'}: "
            f"{e.strerror or e}",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_call(args: argparse.Namespace) -> int:
    import trio

    from .client import connect

    try:
        params = json.loads(args.params)
    except ValueError as e:
        print(f"realm call: PARAMS is not JSON: {e}", file=sys.stderr)
        return 2
    if not isinstance(params, dict):
        print("realm call: PARAMS must be a JSON object", file=sys.stderr)
        return 2
    key = args.api_key or os.environ.get("REALM_API_KEY")

    async def run() -> dict[str, Any]:
        async with (
            connect(args.url, api_key=key, retries=0) as client,
            client.stream(args.function, params) as events,
        ):
            async for ev in events:
                if ev.kind == "result":
                    return ev.data
                if not args.json:
                    sys.stdout.write(str(ev.data.get("token", "")))
                    sys.stdout.flush()  # a reader that went away: BrokenPipeError, the call ends
        raise RealmError("the call ended without a result")

    try:
        with single_error():
            result = trio.run(run)
        if "text" in result and not args.json:  # the text has streamed: the rest to stderr
            print(flush=True)
            print(json.dumps({k: v for k, v in result.items() if k != "text"}), file=sys.stderr)
        else:
            print(json.dumps(result, indent=2), flush=True)
    except BrokenPipeError:
        # stdout's reader stopped reading (`realm call ... | head`): end quietly, and keep
        # Python from failing again when it flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .model import load_model

    if args.config:
        from .server import load_config

        models = load_config(args.config).models
    else:
        path = _model_path(args.model)
        models = {Path(path).stem: path}
    for name, path in models.items():
        info = load_model(path).info
        print(
            f"{name}: {path}\n  {info.arch}, {info.n_layers} layers, n_embd {info.n_embd}, "
            f"{info.n_params / 1e6:.1f}M params, {info.file_type}, vocab {info.vocab_size}, "
            f"context {info.context_length}"
        )
    return 0


def _cmd_key(args: argparse.Namespace) -> int:
    from .server import hash_key, new_key

    if args.key:
        print(hash_key(args.key))
        return 0
    key, digest = new_key()
    print(f"key:    {key}\ndigest: {digest}   (put the digest in the config's api_keys)")
    return 0


BENCH_SUITES = (
    "kernels",
    "models",
    "sandbox",
    "batching",
    "server",
    "http",
    "balancer",
    "paging",
    "containment",
    "real_models",
    "lora",
    "speculative",
    "cuda",
)


def _cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__init__.py").is_file():
        print(
            "realm bench: the benchmark suites live in the source checkout (benchmarks/), "
            "which this installation does not have",
            file=sys.stderr,
        )
        return 2
    # cuda needs a GPU: it runs only when named
    suites = args.suites or [s for s in BENCH_SUITES if s != "cuda"]
    for suite in suites:  # all checked before any runs
        if not (root / "benchmarks" / f"{suite}.py").is_file():
            print(
                f"realm bench: no suite {suite!r} (have: {', '.join(BENCH_SUITES)})",
                file=sys.stderr,
            )
            return 2
    status = 0
    for suite in suites:
        cmd = [sys.executable, "-m", f"benchmarks.{suite}", *args.args]
        print(f"== {suite}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        status = subprocess.call(cmd, cwd=root) or status
    return status


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="realm", description="Realm: a multi-tenant LLM inference runtime for Trio."
    )
    p.add_argument("--version", action="version", version=f"realm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt (embedded, no server)")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="GGUF model file (default: the built-in model)")
    g.add_argument("-n", type=int, default=64, help="max tokens to generate (default 64)")
    _add_sampling_flags(g)
    g.set_defaults(func=_cmd_generate)

    ch = sub.add_parser(
        "chat",
        help="chat on the terminal with the model's chat template (embedded, no server)",
        description="Chat with a model that has a chat template: each line read from stdin is "
        "a user message, the reply streams to stdout; the conversation is kept across turns. "
        "Ends at EOF or /exit; Ctrl-C stops a reply. Works with piped input.",
    )
    ch.add_argument("--model", default=None, help="GGUF model file (default: the built-in model)")
    ch.add_argument("--system", default=None, help="a system message that starts the chat")
    ch.add_argument("-n", type=int, default=256, help="max tokens per reply (default 256)")
    _add_sampling_flags(ch)
    ch.set_defaults(func=_cmd_chat)

    t = sub.add_parser("tokenize", help="show the token ids of a text")
    t.add_argument("text")
    t.add_argument(
        "--model", default=None, help="GGUF file, a vocab-only one works (default: built-in)"
    )
    t.add_argument("--add-special", action="store_true", help="add BOS/EOS as the model does")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.set_defaults(func=_cmd_tokenize)

    i = sub.add_parser("info", help="describe a model file (JSON)")
    i.add_argument("--model", default=None, help="GGUF file (default: the built-in model)")
    i.set_defaults(func=_cmd_info)

    s = sub.add_parser(
        "serve",
        help="run the WebSocket server (protocol v1, docs/protocol.md)",
        description="Serve models over WebSocket. With no --config: one model (the built-in "
        "default without --model) and one open local tenant, no API keys. With --config "
        "realm.toml: models, tenants with API keys, and limits (docs/server.md). "
        "SIGTERM/Ctrl-C shut down gracefully.",
    )
    s.add_argument("--model", default=None, help="GGUF model file (default: the built-in model)")
    s.add_argument("--config", default=None, help="TOML config: models, tenants, limits")
    s.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=None, help="port (default 8080; 0: any free)")
    s.add_argument("--metrics-port", type=_port, default=None, help="Prometheus /metrics port")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_cmd_serve)

    c = sub.add_parser(
        "call",
        help="call a function on a server and stream its tokens",
        description="Call FUNCTION on the server at URL with PARAMS (a JSON object); tokens "
        "stream to stdout, the rest of the result follows as JSON on stderr. The API key "
        "comes from --api-key or $REALM_API_KEY.",
    )
    c.add_argument("url", help="ws://host:port")
    c.add_argument("function", help="e.g. generate, chat, system_metadata")
    c.add_argument("params", nargs="?", default="{}", help="JSON object (default {})")
    c.add_argument("--api-key", default=None)
    c.add_argument("--json", action="store_true", help="print the whole result as JSON")
    c.set_defaults(func=_cmd_call)

    m = sub.add_parser("models", help="list the models a config (or --model) serves")
    m.add_argument("--model", default=None)
    m.add_argument("--config", default=None)
    m.set_defaults(func=_cmd_models)

    k = sub.add_parser("key", help="make an API key and its digest for a config")
    k.add_argument("key", nargs="?", default=None, help="print the digest of this key instead")
    k.set_defaults(func=_cmd_key)

    bn = sub.add_parser(
        "bench",
        help="run the benchmark suites (source checkout)",
        description="Run benchmark suites (default: all) from benchmarks/; arguments after "
        "-- go to each suite (e.g. realm bench kernels -- --quick).",
    )
    bn.add_argument("suites", nargs="*", help=f"any of: {', '.join(BENCH_SUITES)}")
    bn.add_argument("args", nargs=argparse.REMAINDER, default=[])
    bn.set_defaults(func=_cmd_bench)

    guest = sub.add_parser("guest", help="guest modules (WebAssembly tenant runtimes)")
    gsub = guest.add_subparsers(dest="guest_command", required=True)
    b = gsub.add_parser("build", help="compile a C guest (using realm_guest.h) to wasm32")
    b.add_argument("source")
    b.add_argument("-o", "--output", default=None, help="output .wasm (default: beside source)")
    b.add_argument("--opt", default="-O2", help="optimisation flag (default -O2)")
    b.set_defaults(func=_cmd_guest_build)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if argv[:1] == ["bench"] and "--" in argv:
        # argparse drops a "--" and reads what follows as more suite names
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if passthrough:
        args.args = [*args.args, *passthrough]
    try:
        return int(args.func(args))
    except RealmError as e:
        print(f"realm: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
