"""The default guest (guest/default_guest.c) under wasmtime, against a fake host written here.

The fake host defines every `realm` import of the ABI table in Python around a toy model:
byte-level tokens (byte b is id b + 4; 1 is BOS "<s>", 2 is EOS "</s>", the only
end-of-generation id), and by default a "successor" model whose logits favour the token after
the last one (and EOS after "!"), over a fixed noise floor. Tests may swap in other logits.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import wasmtime

from realm.sandbox._abi import ABI_VERSION, FUNCTION_PREFIX, HOST_IMPORTS, Status

ROOT = Path(__file__).resolve().parents[2]

BOS, EOS = 1, 2
N_SPECIAL = 4
SPECIALS = {"<s>": BOS, "</s>": EOS}


def tid(ch: str) -> int:
    """The id of a one-byte character."""
    (b,) = ch.encode()
    return b + N_SPECIAL


def encode(text: str, *, bos: bool = False, parse_special: bool = False) -> list[int]:
    ids = [BOS] if bos else []
    i = 0
    while i < len(text):
        if parse_special:
            hit = next((s for s in SPECIALS if text.startswith(s, i)), None)
            if hit:
                ids.append(SPECIALS[hit])
                i += len(hit)
                continue
        ids += [b + N_SPECIAL for b in text[i].encode()]
        i += 1
    return ids


def render_chat(messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    out = "<s>" + "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
    return out + ("<|assistant|>" if add_generation_prompt else "")


LogitsFn = Callable[[list[int]], np.ndarray]


def successor_logits(vocab: int, peak: float = 5.0) -> LogitsFn:
    noise = np.random.default_rng(0).uniform(0.0, 2.0, vocab).astype(np.float32)

    def fn(tokens: list[int]) -> np.ndarray:
        out = noise.copy()
        last = tokens[-1]
        out[EOS if last == tid("!") else (last + 1) % vocab] = peak
        return out

    return fn


def fixed_logits(vocab: int, values: dict[str, float], floor: float = -40.0) -> LogitsFn:
    base = np.full(vocab, floor, dtype=np.float32)
    for ch, v in values.items():
        base[tid(ch)] = v
    return lambda tokens: base


_VT = {"i32": wasmtime.ValType.i32(), "i64": wasmtime.ValType.i64()}


class FakeHost:
    """One guest instance in its own store, with the `realm` imports implemented in Python."""

    def __init__(
        self,
        engine: wasmtime.Engine,
        module: wasmtime.Module,
        *,
        vocab: int = 260,
        context: int = 256,
        logits: LogitsFn | None = None,
    ) -> None:
        self.vocab, self.context = vocab, context
        self.logits_fn = logits or successor_logits(vocab)
        self.store = wasmtime.Store(engine)
        linker = wasmtime.Linker(engine)
        for imp in HOST_IMPORTS:
            ty = wasmtime.FuncType([_VT[t] for _, t in imp.params], [_VT[imp.result]])
            linker.define_func("realm", imp.name, ty, self._guard(imp.name))
        self.instance = linker.instantiate(self.store, module)
        self.exports = self.instance.exports(self.store)
        self.memory: wasmtime.Memory = self.exports["memory"]  # type: ignore[assignment]
        self.sessions: dict[int, dict[str, Any]] = {}
        self.next_session = 7
        self.opened: list[int] = []
        self.capacities: list[int] = []
        self.closed: list[int] = []
        self.kept: list[int] = []
        self.forwards: list[tuple[int, int, int]] = []  # (session, n_tokens, mode)
        self.rewinds: list[tuple[int, int]] = []
        self.templates: list[list[dict[str, str]]] = []
        self.logs: list[tuple[int, str]] = []
        self.cancel_on_emit: int | None = None  # emit number (1-based) that returns ECANCELLED
        self.cancel_on_forward: int | None = None  # forward number that returns ECANCELLED
        self.cancelled = False
        # like realm.sandbox today, session_close fails with ECANCELLED once a call is cancelled
        self.close_when_cancelled = False
        self.reset_call()

    # --- plumbing -------------------------------------------------------------------------

    def _guard(self, name: str) -> Callable[..., int]:
        impl = getattr(self, f"_{name}")

        def f(*args: int) -> int:
            allowed = ("result", "log", "clock_ms", "session_keep") + (
                ("session_close",) if self.close_when_cancelled else ()
            )
            if self.cancelled and name not in allowed:
                return int(Status.ECANCELLED)
            try:
                return int(impl(*args))
            except Exception as e:  # a bug in the fake: make it visible, never raise into wasm
                self.errors.append(f"{name}: {e!r}")
                return int(Status.EINTERNAL)

        return f

    def read(self, ptr: int, n: int) -> bytes:
        return bytes(self.memory.read(self.store, ptr, ptr + n)) if n else b""

    def write(self, ptr: int, data: bytes) -> None:
        if data:
            self.memory.write(self.store, data, ptr)

    def out(self, data: bytes, ptr: int, cap: int) -> int:
        self.write(ptr, data[:cap])
        return len(data)

    def reset_call(self) -> None:
        self.result: dict[str, Any] | None = None
        self.result_raw: bytes | None = None
        self.chunks: list[str] = []
        self.rejected: list[str] = []
        self.errors: list[str] = []
        self.cancelled = False
        self.n_emits = 0
        self.n_forwards = 0
        self.t0 = time.monotonic()

    def call_raw(self, function: str, data: bytes) -> int:
        self.reset_call()
        ptr = self.exports["realm_alloc"](self.store, len(data))  # type: ignore[operator]
        assert ptr > 0
        self.write(ptr, data)
        status = self.exports[FUNCTION_PREFIX + function](self.store, ptr, len(data))  # type: ignore[operator]
        self.exports["realm_free"](self.store, ptr, len(data))  # type: ignore[operator]
        assert not self.errors, self.errors
        return status

    def call(self, function: str, params: dict[str, Any]) -> dict[str, Any]:
        status = self.call_raw(function, json.dumps(params).encode())
        assert self.result is not None
        assert status == 0, (status, self.result)
        return self.result

    def metadata(self) -> dict[str, Any]:
        ptr = self.exports["realm_metadata_ptr"](self.store)  # type: ignore[operator]
        n = self.exports["realm_metadata_len"](self.store)  # type: ignore[operator]
        return json.loads(self.read(ptr, n))

    # --- the imports (names and parameter order from the ABI table) ------------------------

    def _log(self, level: int, ptr: int, n: int) -> int:
        self.logs.append((level, self.read(ptr, n).decode()))
        return 0

    def _clock_ms(self) -> int:
        return int((time.monotonic() - self.t0) * 1000)

    def _random(self, ptr: int, n: int) -> int:
        self.write(ptr, np.random.default_rng().bytes(n))
        return 0

    def _model_ok(self, mp: int, ml: int) -> bool:
        return self.read(mp, ml).decode() in ("", "fake")

    def _model_info(self, mp: int, ml: int, out: int, cap: int) -> int:
        if not self._model_ok(mp, ml):
            return int(Status.ENOENT)
        info = {"arch": "fake", "vocab_size": self.vocab, "context_length": self.context,
                "bos_id": BOS, "eos_id": EOS, "eog_ids": [EOS], "model": "fake"}  # fmt: skip
        return self.out(json.dumps(info).encode(), out, cap)

    def _tokenize(self, mp: int, ml: int, tp: int, tl: int, flags: int, out: int, cap: int) -> int:
        if not self._model_ok(mp, ml):
            return int(Status.ENOENT)
        text = self.read(tp, tl).decode()
        ids = encode(text, bos=bool(flags & 1), parse_special=bool(flags & 2))
        self.write(out, np.asarray(ids[:cap], dtype="<i4").tobytes())
        return len(ids)

    def _decode(self, *args: int) -> int:
        return int(Status.ENOTSUP)

    def _chat_template(self, mp: int, ml: int, msp: int, msl: int, add: int, out: int, cap: int):
        messages = json.loads(self.read(msp, msl))
        self.templates.append(messages)
        return self.out(render_chat(messages, bool(add)).encode(), out, cap)

    def _session_open(self, mp: int, ml: int, capacity: int) -> int:
        if not self._model_ok(mp, ml):
            return int(Status.ENOENT)
        h = self.next_session
        self.next_session += 1
        self.sessions[h] = {
            "tokens": [],
            "capacity": capacity or self.context,
            "pending": b"",
            "decoder": codecs.getincrementaldecoder("utf-8")("replace"),
        }
        self.opened.append(h)
        self.capacities.append(capacity)
        return h

    def _session_close(self, h: int) -> int:
        s = self.sessions.pop(h, None)
        if s is None:
            return int(Status.ENOENT)
        self.closed.append(h)
        self.closed_tokens = s["tokens"]
        return 0

    def _session_keep(self, h: int) -> int:
        if h not in self.sessions:
            return int(Status.ENOENT)
        self.kept.append(h)
        return 0

    def _session_rewind(self, h: int, pos: int) -> int:
        s = self.sessions.get(h)
        if s is None:
            return int(Status.ENOENT)
        if not 0 <= pos <= len(s["tokens"]):
            return int(Status.EINVAL)
        self.rewinds.append((h, pos))
        del s["tokens"][pos:]
        return pos

    def _session_pos(self, h: int) -> int:
        s = self.sessions.get(h)
        return int(Status.ENOENT) if s is None else len(s["tokens"])

    def _forward(self, h: int, tp: int, n: int, lp: int, cap: int, mode: int) -> int:
        s = self.sessions.get(h)
        if s is None:
            return int(Status.ENOENT)
        if n <= 0 or mode not in (0, 1, 2):
            return int(Status.EINVAL)
        need = {0: 0, 1: self.vocab, 2: n * self.vocab}[mode]
        if cap < need:
            return int(Status.EINVAL)
        if len(s["tokens"]) + n > s["capacity"]:
            return int(Status.ELIMIT)
        tokens = np.frombuffer(self.read(tp, 4 * n), dtype="<i4").tolist()
        assert all(0 <= t < self.vocab for t in tokens), tokens
        s["tokens"] += tokens
        self.forwards.append((h, n, mode))
        self.n_forwards += 1
        if self.cancel_on_forward is not None and self.n_forwards >= self.cancel_on_forward:
            self.cancelled = True
            return int(Status.ECANCELLED)
        if mode == 1:
            logits = np.asarray(self.logits_fn(s["tokens"]), dtype="<f4")
            self.write(lp, logits.tobytes())
        elif mode == 2:
            rows = [self.logits_fn(s["tokens"][: len(s["tokens"]) - n + i + 1]) for i in range(n)]
            self.write(lp, np.asarray(rows, dtype="<f4").tobytes())
        return need

    def _detokenize(self, h: int, token: int, out: int, cap: int) -> int:
        s = self.sessions.get(h)
        if s is None:
            return int(Status.ENOENT)
        if token >= 0:
            raw = bytes([token - N_SPECIAL]) if token >= N_SPECIAL and token < 260 else b""
            s["pending"] += s["decoder"].decode(raw).encode()
        elif token == -2:
            s["pending"] += s["decoder"].decode(b"", final=True).encode()
            s["decoder"].reset()
        elif token != -1:
            return int(Status.EINVAL)
        take, s["pending"] = s["pending"][:cap], s["pending"][cap:]
        while s["pending"] and take and (s["pending"][0] & 0xC0) == 0x80:
            s["pending"] = take[-1:] + s["pending"]
            take = take[:-1]
        self.write(out, take)
        return len(take)

    def _emit(self, ptr: int, n: int) -> int:
        text = self.read(ptr, n).decode("utf-8")  # strict: the guest must send UTF-8
        self.n_emits += 1
        if self.cancel_on_emit is not None and self.n_emits >= self.cancel_on_emit:
            self.rejected.append(text)
            self.cancelled = True
            return int(Status.ECANCELLED)
        self.chunks.append(text)
        return 0

    def _result(self, ptr: int, n: int) -> int:
        self.result_raw = self.read(ptr, n)
        self.result = json.loads(self.result_raw.decode("utf-8"))
        assert isinstance(self.result, dict)
        return 0

    def _embed(self, mp: int, ml: int, tp: int, n: int, out: int, cap: int) -> int:
        """A toy embedding: dim 4, [n, first id, last id, sum of ids]."""
        if not self._model_ok(mp, ml):
            return int(Status.ENOENT)
        if cap < 4:
            return 4
        ids = np.frombuffer(self.read(tp, 4 * n), dtype="<i4")
        vec = np.array([n, ids[0], ids[-1], ids.sum()], dtype="<f4")
        self.write(out, vec.tobytes())
        return 4

    def _matmul_f32(self, *args: int) -> int:
        return int(Status.ENOTSUP)

    def _attention_f32(self, *args: int) -> int:
        return int(Status.ENOTSUP)

    def _pager_hint(self, *args: int) -> int:
        return int(Status.ENOTSUP)


# --- fixtures ------------------------------------------------------------------------------


def load_build_module() -> Any:
    spec = importlib.util.spec_from_file_location("realm_guest_build", ROOT / "guest" / "build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def wasm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = load_build_module().build
    return build(ROOT / "guest" / "default_guest.c", tmp_path_factory.mktemp("guest") / "g.wasm")


@pytest.fixture(scope="module")
def engine() -> wasmtime.Engine:
    return wasmtime.Engine()


@pytest.fixture(scope="module")
def module(engine: wasmtime.Engine, wasm_path: Path) -> wasmtime.Module:
    return wasmtime.Module.from_file(engine, str(wasm_path))


@pytest.fixture
def make_host(engine: wasmtime.Engine, module: wasmtime.Module) -> Callable[..., FakeHost]:
    return lambda **kw: FakeHost(engine, module, **kw)


@pytest.fixture
def host(make_host: Callable[..., FakeHost]) -> FakeHost:
    return make_host()


# --- the module's shape ------------------------------------------------------------------------


def test_imports_and_exports_match_the_abi_table(module: wasmtime.Module) -> None:
    table = {imp.name: imp for imp in HOST_IMPORTS}
    for imp in module.imports:
        assert imp.module == "realm"
        assert imp.name in table, imp.name
        want = table[imp.name]
        ty = imp.type
        assert isinstance(ty, wasmtime.FuncType)
        assert [str(p) for p in ty.params] == [t for _, t in want.params], imp.name
        assert [str(r) for r in ty.results] == [want.result], imp.name
    exports = {e.name: e.type for e in module.exports}
    assert isinstance(exports["memory"], wasmtime.MemoryType)
    sigs = {
        "realm_abi_version": ([], ["i32"]),
        "realm_alloc": (["i32"], ["i32"]),
        "realm_free": (["i32", "i32"], []),
        "realm_metadata_ptr": ([], ["i32"]),
        "realm_metadata_len": ([], ["i32"]),
    }
    for fn in ("generate", "chat", "tokenize", "count_tokens", "embed"):
        sigs[FUNCTION_PREFIX + fn] = (["i32", "i32"], ["i32"])
    for name, (params, results) in sigs.items():
        ty = exports[name]
        assert isinstance(ty, wasmtime.FuncType), name
        assert ([str(p) for p in ty.params], [str(r) for r in ty.results]) == (params, results)


def test_shipped_default_wasm_matches_its_source(
    engine: wasmtime.Engine, module: wasmtime.Module, host: FakeHost
) -> None:
    """realm/sandbox/guests/default.wasm (a build artifact) is not older than default_guest.c:
    same metadata, imports and exports as a fresh build (bytes differ across zig versions)."""
    shipped = ROOT / "realm" / "sandbox" / "guests" / "default.wasm"
    if not shipped.exists():
        pytest.skip("realm/sandbox/guests/default.wasm is not built (python guest/build.py)")
    old = wasmtime.Module.from_file(engine, str(shipped))
    hint = "stale: rebuild it with python guest/build.py"
    assert FakeHost(engine, old).metadata() == host.metadata(), hint
    assert sorted(i.name for i in old.imports) == sorted(i.name for i in module.imports), hint
    assert sorted(e.name for e in old.exports) == sorted(e.name for e in module.exports), hint


def test_abi_version(host: FakeHost) -> None:
    assert host.exports["realm_abi_version"](host.store) == ABI_VERSION == 1  # type: ignore[operator]


def test_metadata_has_valid_schemas(host: FakeHost) -> None:
    meta = host.metadata()
    assert meta["name"] == "realm-default" and meta["version"] == "1"
    fns = {f["name"]: f for f in meta["functions"]}
    assert set(fns) == {"generate", "chat", "tokenize", "count_tokens", "embed"}
    assert fns["generate"]["streams"] and fns["chat"]["streams"]
    assert not fns["tokenize"]["streams"]
    for f in fns.values():
        assert f["description"]
        schema = f["params"]
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        for prop in schema["properties"].values():  # every default satisfies its schema
            if "default" in prop:
                jsonschema.validate(prop["default"], prop)
    gen = fns["generate"]["params"]
    assert gen["required"] == ["prompt"]
    props = gen["properties"]
    assert props["max_tokens"] == {
        "type": "integer",
        "minimum": 1,
        "default": 128,
        "description": props["max_tokens"]["description"],
    }
    assert props["temperature"]["default"] == 0.8 and props["temperature"]["minimum"] == 0
    assert props["top_k"]["default"] == 40
    assert props["top_p"]["exclusiveMinimum"] == 0 and props["top_p"]["maximum"] == 1
    assert props["min_p"]["default"] == 0.05
    assert props["repeat_penalty"]["default"] == 1.0  # llama.cpp's default: off
    assert props["stop"]["type"] == "array" and props["stop"]["items"]["type"] == "string"
    assert props["stop_token_ids"]["items"]["type"] == "integer"
    assert "seed" in props and "model" in props
    chat = fns["chat"]["params"]["properties"]
    assert chat["conversation"]["default"] == "default"
    assert chat["messages"]["type"] == "array"
    assert "mean" in fns["embed"]["description"].lower()
    v = jsonschema.Draft202012Validator(gen)
    assert v.is_valid({"prompt": "x", "top_p": 1, "stop": ["a"], "seed": 3})
    assert not v.is_valid({"prompt": "x", "top_p": 0})
    assert not v.is_valid({"prompt": "x", "extra": 1})


# --- generate ------------------------------------------------------------------------------------


def test_generate_greedy_is_the_successor_sequence(host: FakeHost) -> None:
    r = host.call("generate", {"prompt": "a", "max_tokens": 6, "temperature": 0})
    assert r["text"] == "bcdefg"
    assert r["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    assert set(r["timings"]) == {"prompt_ms", "generation_ms"}
    assert "".join(host.chunks) == r["text"]
    assert host.chunks == list("bcdefg")  # one chunk per token
    # one prefill call with the last logits, then one forward per token but the last
    (h,) = host.opened
    assert host.forwards == [(h, 2, 1)] + [(h, 1, 1)] * 5
    assert host.closed == [h] and not host.sessions


def test_generate_session_capacity_fits_the_request(host: FakeHost) -> None:
    host.call("generate", {"prompt": "abc", "max_tokens": 5, "temperature": 0})
    assert host.capacities == [4 + 5]  # prompt + max_tokens, well under the context
    r = host.call("generate", {"prompt": "x" * 200, "max_tokens": 500, "temperature": 0})
    assert r["finish_reason"] == "length"
    # 201 prompt tokens in a context of 256: 55 more positions, so 56 sampled tokens
    assert r["usage"]["completion_tokens"] == 256 - 201 + 1
    assert host.capacities[-1] == 256  # capped at the context


def test_generate_eog_stops(host: FakeHost) -> None:
    r = host.call("generate", {"prompt": "hi ", "max_tokens": 10, "temperature": 0})
    assert r["text"] == "!"  # then EOS, whose text is not output
    assert r["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == 2


def test_generate_stop_strings_cut_and_are_never_emitted(host: FakeHost) -> None:
    r = host.call("generate", {"prompt": "a", "max_tokens": 20, "temperature": 0, "stop": ["def"]})
    assert r["text"] == "bc" and r["finish_reason"] == "stop"
    assert host.chunks == ["b", "c"]
    assert r["usage"]["completion_tokens"] == 5  # b c d e f
    # the earliest of several matches wins
    r = host.call("generate", {"prompt": "a", "max_tokens": 20, "temperature": 0,
                               "stop": ["fgh", "de", "zz"]})  # fmt: skip
    assert r["text"] == "bc" and "".join(host.chunks) == "bc"


def test_generate_held_back_text_is_released(host: FakeHost) -> None:
    # "bd" could start at "b" until "c" arrives: held, then released with it
    r = host.call("generate", {"prompt": "a", "max_tokens": 5, "temperature": 0, "stop": ["bd"]})
    assert r["text"] == "bcdef" and r["finish_reason"] == "length"
    assert host.chunks == ["bc", "d", "e", "f"]
    # held text at the end of the sequence is flushed, not lost
    r = host.call("generate", {"prompt": "a", "max_tokens": 3, "temperature": 0, "stop": ["dx"]})
    assert r["text"] == "bcd" and "".join(host.chunks) == "bcd"
    assert host.chunks == ["b", "c", "d"]


def test_generate_stop_token_ids(host: FakeHost) -> None:
    r = host.call("generate", {"prompt": "a", "max_tokens": 20, "temperature": 0,
                               "stop_token_ids": [tid("e")]})  # fmt: skip
    assert r["text"] == "bcd" and r["finish_reason"] == "stop"


def test_generate_seed_reproducible(host: FakeHost) -> None:
    params = {"prompt": "a", "max_tokens": 24, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
              "min_p": 0.0}  # fmt: skip
    a = host.call("generate", {**params, "seed": 1})
    chunks_a = list(host.chunks)
    b = host.call("generate", {**params, "seed": 1})
    assert a["text"] == b["text"] and chunks_a == host.chunks
    c = host.call("generate", {**params, "seed": 2})
    assert c["text"] != a["text"]
    assert "".join(host.chunks) == c["text"]  # streamed == result, even with odd bytes


@pytest.mark.parametrize("close_when_cancelled", [True, False])
def test_generate_cancel_from_emit(host: FakeHost, close_when_cancelled: bool) -> None:
    host.close_when_cancelled = close_when_cancelled
    host.cancel_on_emit = 3
    r = host.call("generate", {"prompt": "a", "max_tokens": 20, "temperature": 0})
    assert r["finish_reason"] == "cancelled"
    assert r["text"] == "bc" == "".join(host.chunks)  # what the caller was given
    assert host.n_emits == 3  # stopped at once
    assert len(host.forwards) == 3  # prefill + 2 steps
    if close_when_cancelled:
        assert host.closed == host.opened and not host.sessions
    else:  # the close failed: the guest closes the session at the start of its next call
        assert host.closed == [] and len(host.sessions) == 1
        host.cancel_on_emit = None
        host.call("count_tokens", {"text": "a"})  # no session work: nothing happens yet
        assert len(host.sessions) == 1
        host.call("generate", {"prompt": "a", "max_tokens": 1})
        assert host.closed == host.opened and not host.sessions


def test_cancelled_calls_do_not_leak_sessions(host: FakeHost) -> None:
    for _ in range(10):
        host.cancel_on_emit = 1
        assert host.call("generate", {"prompt": "a", "max_tokens": 5})["finish_reason"] == (
            "cancelled"
        )
        assert len(host.sessions) == 1  # only the last call's, the earlier ones were closed
    host.cancel_on_emit = None
    host.call("generate", {"prompt": "a", "max_tokens": 1})
    assert not host.sessions


def test_generate_cancel_from_forward(host: FakeHost) -> None:
    host.close_when_cancelled = True
    host.cancel_on_forward = 4
    r = host.call("generate", {"prompt": "a", "max_tokens": 20, "temperature": 0})
    assert r["finish_reason"] == "cancelled"
    assert r["text"] == "".join(host.chunks) == "bcd"
    assert len(host.forwards) == 4
    assert not host.sessions
    host.cancel_on_forward = 1  # cancelled during the prefill
    r = host.call("generate", {"prompt": "a", "max_tokens": 20, "temperature": 0})
    assert r["finish_reason"] == "cancelled" and r["text"] == ""
    assert r["usage"]["completion_tokens"] == 0 and not host.sessions


def test_generate_prompt_longer_than_context(make_host: Callable[..., FakeHost]) -> None:
    host = make_host(context=32)
    status = host.call_raw("generate", json.dumps({"prompt": "y" * 40}).encode())
    assert status == Status.EINVAL  # the caller's params: INVALID_PARAMS on the protocol
    assert host.result is not None
    assert "41 tokens" in host.result["error"] and "context of 32" in host.result["error"]
    assert not host.opened


def test_generate_unknown_model(host: FakeHost) -> None:
    status = host.call_raw("generate", json.dumps({"prompt": "a", "model": "nope"}).encode())
    assert status == Status.EINVAL
    assert host.result == {"error": 'generate: model: no model "nope" on this host'}


def test_generate_long_prompt_is_prefilled_in_chunks(make_host: Callable[..., FakeHost]) -> None:
    host = make_host(context=2048)
    r = host.call("generate", {"prompt": "x" * 1200, "max_tokens": 2, "temperature": 0})
    assert r["usage"]["prompt_tokens"] == 1201
    h = host.opened[0]
    assert host.forwards[:3] == [(h, 512, 0), (h, 512, 0), (h, 177, 1)]


def test_generate_streams_multibyte_text_whole(make_host: Callable[..., FakeHost]) -> None:
    # "é" is two byte-tokens: the detokenizer holds the first byte; the text stays valid UTF-8
    seq = [tid("a"), 0xC3 + N_SPECIAL, 0xA9 + N_SPECIAL, tid("z"), EOS]

    def nxt(tokens: list[int]) -> np.ndarray:
        out = np.zeros(260, dtype=np.float32)
        last = tokens[-1]
        out[seq[seq.index(last) + 1] if last in seq[:-1] else EOS] = 10
        return out

    host = make_host(logits=nxt)
    r = host.call("generate", {"prompt": "a", "max_tokens": 10, "temperature": 0,
                               "stop": ["éz!"]})  # fmt: skip
    assert r["text"] == "éz" and r["finish_reason"] == "stop"
    assert "".join(host.chunks) == "éz"


# --- sampling ----------------------------------------------------------------------------------


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                    min_p: float) -> np.ndarray:  # fmt: skip
    """llama.cpp's chain: top-k, top-p, min-p (at temperature 1), then temperature."""
    order = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    if 0 < top_k < len(order):
        order = order[:top_k]
    p = np.exp(logits[order] - logits[order[0]])
    p /= p.sum()
    if top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        order = order[:keep]
    if min_p > 0:
        order = [i for i, q in zip(order, p, strict=False) if q >= min_p * p[0]]
    out = np.zeros(len(logits))
    w = np.exp((logits[order] - logits[order[0]]) / temperature)
    out[order] = w / w.sum()
    return out


LETTERS = {"a": 0.0, "b": 1.0, "c": 2.0, "d": 3.0, "e": 3.5}


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [
        (1.0, 0, 1.0, 0.0),
        (1.0, 2, 1.0, 0.0),
        (0.5, 0, 1.0, 0.0),
        (1.0, 0, 0.8, 0.0),
        (1.0, 0, 1.0, 0.2),
        (2.0, 4, 0.9, 0.05),
        (0.7, 0, 0.9, 0.1),
    ],
)
def test_sampling_distribution(
    make_host: Callable[..., FakeHost], temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    host = make_host(logits=fixed_logits(260, LETTERS), context=4096)
    n = 3000
    r = host.call("generate", {"prompt": "x", "max_tokens": n, "temperature": temperature,
                               "top_k": top_k, "top_p": top_p, "min_p": min_p,
                               "repeat_penalty": 1.0, "seed": 7})  # fmt: skip
    text = r["text"]
    assert len(text) == n
    logits = fixed_logits(260, LETTERS)([0]).astype(np.float64)
    probs = reference_probs(logits, temperature, top_k, top_p, min_p)
    counts = Counter(text)
    for ch in set(counts) | set(LETTERS):
        p = probs[tid(ch)]
        got = counts.get(ch, 0)
        if p == 0:
            assert got == 0, (ch, got)
        else:
            sd = (n * p * (1 - p)) ** 0.5
            assert abs(got - n * p) <= 5 * sd + 1, (ch, got, n * p)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [(1.0, 0, 0.9, 0.0), (0.8, 0, 0.95, 0.02), (1.5, 300, 0.8, 0.0), (1.0, 0, 1.0, 0.05)],
)
def test_sampling_on_a_large_vocabulary(
    make_host: Callable[..., FakeHost], temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    vocab, n = 4000, 3000
    logits = np.random.default_rng(1).normal(0.0, 2.0, vocab).astype(np.float32)
    logits[EOS] = -50.0  # no early end
    host = make_host(vocab=vocab, context=8192, logits=lambda tokens: logits)
    r = host.call("generate", {"prompt": "x", "max_tokens": n, "temperature": temperature,
                               "top_k": top_k, "top_p": top_p, "min_p": min_p,
                               "repeat_penalty": 1.0, "seed": 11})  # fmt: skip
    assert r["usage"]["completion_tokens"] == n
    sampled = host.closed_tokens[2:]  # after BOS and "x"; the last token is not forwarded
    assert len(sampled) == n - 1
    probs = reference_probs(logits.astype(np.float64), temperature, top_k, top_p, min_p)
    allowed = set(np.flatnonzero(probs).tolist())
    assert set(sampled) <= allowed  # never a token the filters remove
    counts = Counter(sampled)
    top = np.argsort(-probs)[:8]
    for t in top.tolist():  # the most likely tokens at their expected rates
        p = probs[t]
        sd = ((n - 1) * p * (1 - p)) ** 0.5
        assert abs(counts.get(t, 0) - (n - 1) * p) <= 5 * sd + 1, (t, counts.get(t, 0), p)


def reference_penalised_greedy(logits: dict[int, float], prompt: list[int], n: int, rp: float,
                               presence: float, freq: float) -> list[int]:  # fmt: skip
    seq = list(prompt)
    out = []
    for _ in range(n):
        window = seq[-64:]
        cur = dict(logits)
        for t, count in Counter(window).items():
            if t not in cur:
                continue
            v = cur[t]
            v = v * rp if v <= 0 else v / rp
            cur[t] = v - count * freq - presence
        best = max(cur, key=lambda t: (cur[t], -t))
        out.append(best)
        seq.append(best)
    return out


@pytest.mark.parametrize(
    ("values", "rp", "presence", "freq"),
    [
        ({"a": 4.0, "b": 3.9}, 2.0, 0.0, 0.0),
        ({"a": -1.0, "b": -1.5}, 2.0, 0.0, 0.0),
        ({"a": 4.0, "b": 3.9, "c": 3.0}, 1.0, 0.0, 0.5),
        ({"a": 4.0, "b": 3.9, "c": 3.0}, 1.0, 0.3, 0.0),
        ({"a": 1.0, "b": 0.9, "c": -0.5}, 1.3, 0.2, 0.1),
    ],
)
def test_penalties_match_reference(
    make_host: Callable[..., FakeHost],
    values: dict[str, float],
    rp: float,
    presence: float,
    freq: float,
) -> None:
    host = make_host(logits=fixed_logits(260, values, floor=-60.0), context=512)
    n = 80  # longer than the 64-token window
    r = host.call("generate", {"prompt": "xy", "max_tokens": n, "temperature": 0,
                               "repeat_penalty": rp, "presence_penalty": presence,
                               "frequency_penalty": freq})  # fmt: skip
    base = {t: -60.0 for t in range(260)}
    base.update({tid(ch): v for ch, v in values.items()})
    want = reference_penalised_greedy(base, encode("xy", bos=True), n, rp, presence, freq)
    assert r["text"] == bytes(t - N_SPECIAL for t in want).decode()


def test_sampling_with_a_32k_vocabulary(make_host: Callable[..., FakeHost]) -> None:
    host = make_host(vocab=32000, logits=successor_logits(32000, peak=3.0))
    for params in ({"top_k": 0, "top_p": 0.95, "min_p": 0.0}, {}):
        r = host.call("generate", {"prompt": "a", "max_tokens": 16, "temperature": 1.0,
                                   "seed": 3, **params})  # fmt: skip
        assert r["usage"]["completion_tokens"] >= 1
        assert "".join(host.chunks) == r["text"]


# --- tokenize / count_tokens / embed ----------------------------------------------------------


def test_tokenize_and_count(host: FakeHost) -> None:
    r = host.call("tokenize", {"text": "hé"})
    assert r == {"tokens": encode("hé"), "count": 3}
    r = host.call("tokenize", {"text": "hi", "add_special": True})
    assert r["tokens"] == [BOS, tid("h"), tid("i")]
    r = host.call("tokenize", {"text": "<s>x", "parse_special": True})
    assert r["tokens"] == [BOS, tid("x")]
    assert host.call("count_tokens", {"text": "hello"}) == {"count": 5}
    assert host.call("count_tokens", {"text": ""}) == {"count": 0}
    assert host.call("count_tokens", {"text": "a", "add_special": True}) == {"count": 2}


def test_json_string_escapes(host: FakeHost) -> None:
    # \uXXXX escapes (with a surrogate pair), a lone surrogate, and the short escapes
    raw = b'{"text": "\\u00e9\\ud83d\\ude00\\ud800|\\n\\t\\"\\\\\\/"}'
    assert host.call_raw("tokenize", raw) == 0
    assert host.result is not None
    assert host.result["tokens"] == encode('é😀\ufffd|\n\t"\\/')


def test_embed_asks_the_size_then_fills_the_vector(host: FakeHost) -> None:
    assert host.call_raw("embed", json.dumps({"text": "abc"}).encode()) == 0
    ids = encode("abc", bos=False, parse_special=False)
    assert host.result == {
        "embedding": [float(len(ids)), float(ids[0]), float(ids[-1]), float(sum(ids))],
        "dim": 4,
        "pooling": "mean",
        "normalized": True,
        "usage": {"prompt_tokens": len(ids)},
    }


# --- bad params ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "raw", "needle"),
    [
        ("generate", b"{bad", "invalid JSON at byte 1"),
        ("generate", b"", "invalid JSON"),
        ("generate", b'{"prompt": "a",}', "invalid JSON"),
        ("generate", b'{"prompt": "a"} x', "trailing characters"),
        ("generate", b'{"prompt": "a\x01"}', "control character"),
        ("generate", b"[]", "params must be a JSON object"),
        ("generate", b"{}", "missing required parameter 'prompt'"),
        ("generate", b'{"prompt": 5}', "'prompt' must be a string"),
        ("generate", b'{"prompt": "a", "max_tokens": 0}', "'max_tokens' must be >= 1"),
        ("generate", b'{"prompt": "a", "max_tokens": 1.5}', "'max_tokens' must be an integer"),
        ("generate", b'{"prompt": "a", "temperature": -1}', "'temperature' must be >= 0"),
        ("generate", b'{"prompt": "a", "top_p": 0}', "'top_p' must be > 0"),
        ("generate", b'{"prompt": "a", "top_p": 1.5}', "'top_p' must be <= 1"),
        ("generate", b'{"prompt": "a", "repeat_penalty": 0}', "'repeat_penalty' must be > 0"),
        ("generate", b'{"prompt": "a", "stop": "x"}', "'stop' must be an array of strings"),
        ("generate", b'{"prompt": "a", "stop": [1]}', "'stop'[0] must be a string"),
        ("generate", b'{"prompt": "a", "stop": [""]}', "'stop'[0] must be at least 1"),
        ("generate", b'{"prompt": "a", "stop_token_ids": ["x"]}', "'stop_token_ids'[0] must"),
        ("generate", b'{"prompt": "a", "seed": null}', "'seed' must be an integer"),
        ("generate", b'{"prompt": "a", "bogus": 1}', 'unknown parameter "bogus"'),
        ("generate", b'{"prompt": "a", "prompt": "b"}', "duplicate parameter 'prompt'"),
        ("generate", b'{"prompt": 1e999}', "number out of range"),
        ("generate", b'{"prompt": "a", "top_k": NaN}', "invalid JSON"),
        ("generate", b"[" * 100 + b"]" * 100, "nested too deeply"),
        ("chat", b'{"messages": [{"role": "user"}]}', "'messages'[0].content must be a string"),
        ("chat", b'{"messages": 3}', "'messages' must be an array"),
        ("chat", b'{"messages": []}', "'messages' is empty"),
        ("chat", b"{}", "send 'message'"),
        ("tokenize", b'{"text": "a", "add_special": 1}', "'add_special' must be a boolean"),
    ],
)
def test_bad_params(host: FakeHost, function: str, raw: bytes, needle: str) -> None:
    status = host.call_raw(function, raw)
    assert status == Status.EINVAL
    assert host.result is not None and needle in host.result["error"], host.result
    assert not host.opened and not host.forwards


# --- chat ------------------------------------------------------------------------------------


def test_chat_keeps_history_and_reuses_the_prefix(host: FakeHost) -> None:
    r1 = host.call("chat", {"message": "hi", "max_tokens": 4, "temperature": 0})
    assert r1["text"] == "?@AB"  # after "<|assistant|>" the successor of ">" is "?"
    assert r1["finish_reason"] == "length" and r1["conversation"] == "default"
    assert r1["messages"] == 2
    assert "".join(host.chunks) == r1["text"]
    # the template writes "<s>" and the tokenizer adds a BOS: the guest drops the double
    p1 = encode(render_chat([{"role": "user", "content": "hi"}], True), bos=True,
                parse_special=True)[1:]  # fmt: skip
    assert r1["usage"]["prompt_tokens"] == len(p1) and r1["usage"]["cached_tokens"] == 0
    (h,) = host.opened
    assert host.forwards[0] == (h, len(p1), 1)
    assert host.sessions[h]["tokens"] == p1 + encode("?@A")  # the last token is not forwarded

    host.forwards.clear()
    r2 = host.call("chat", {"message": "yo", "max_tokens": 3, "temperature": 0})
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "?@AB"},
               {"role": "user", "content": "yo"}]  # fmt: skip
    assert host.templates[-1] == history
    p2 = encode(render_chat(history, True), bos=True, parse_special=True)[1:]
    cached = len(p1) + 3
    assert p2[:cached] == host.sessions[h]["tokens"][:cached]
    assert r2["usage"] == {"prompt_tokens": len(p2), "completion_tokens": 3,
                           "total_tokens": len(p2) + 3, "cached_tokens": cached}  # fmt: skip
    assert host.forwards[0] == (h, len(p2) - cached, 1)  # only the new part
    assert host.opened == [h] and not host.closed and not host.rewinds
    assert r2["messages"] == 4 and r2["text"] == "?@A"

    # `messages` replaces the history; the session rewinds to the common prefix
    new = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "?@AB"},
           {"role": "user", "content": "other"}]  # fmt: skip
    host.forwards.clear()
    r3 = host.call("chat", {"messages": new, "max_tokens": 2, "temperature": 0})
    p3 = encode(render_chat(new, True), bos=True, parse_special=True)[1:]
    common = next(i for i, (a, b) in enumerate(zip(p2, p3, strict=False)) if a != b)
    assert host.rewinds == [(h, common)]
    assert r3["usage"]["cached_tokens"] == common
    assert host.forwards[0] == (h, len(p3) - common, 1)
    assert host.sessions[h]["tokens"][: len(p3)] == p3
    assert r3["messages"] == 4


def test_chat_conversations_are_separate_and_reset(host: FakeHost) -> None:
    host.call("chat", {"message": "hi", "max_tokens": 2, "temperature": 0})
    r = host.call("chat", {"message": "hi", "max_tokens": 2, "temperature": 0,
                           "conversation": "other"})  # fmt: skip
    assert r["conversation"] == "other" and r["messages"] == 2
    assert len(host.opened) == 2 and len(host.sessions) == 2
    r = host.call("chat", {"reset": True})
    assert r == {"conversation": "default", "reset": True, "messages": 0}
    assert host.closed == [host.opened[0]]
    r = host.call("chat", {"message": "yo", "max_tokens": 2, "temperature": 0})
    assert r["messages"] == 2 and r["usage"]["cached_tokens"] == 0
    assert host.templates[-1] == [{"role": "user", "content": "yo"}]
    r = host.call("chat", {"message": "hey", "reset": True, "conversation": "other",
                           "max_tokens": 2, "temperature": 0})  # fmt: skip
    assert r["messages"] == 2


def test_chat_cancel_leaves_history(host: FakeHost) -> None:
    host.call("chat", {"message": "hi", "max_tokens": 3, "temperature": 0})
    host.cancel_on_emit = 2
    r = host.call("chat", {"message": "yo", "max_tokens": 5, "temperature": 0})
    assert r["finish_reason"] == "cancelled" and r["messages"] == 2
    host.cancel_on_emit = None
    r = host.call("chat", {"message": "again", "max_tokens": 2, "temperature": 0})
    assert host.templates[-1] == [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "?@A"},
                                  {"role": "user", "content": "again"}]  # fmt: skip
    (h,) = host.opened
    p = encode(render_chat(host.templates[-1], True), bos=True, parse_special=True)[1:]
    assert host.sessions[h]["tokens"][: len(p)] == p  # the cache is consistent again


def test_chat_session_lost_on_the_host_is_reopened(host: FakeHost) -> None:
    host.call("chat", {"message": "hi", "max_tokens": 2, "temperature": 0})
    host.sessions.clear()  # e.g. the host closed it
    r = host.call("chat", {"message": "yo", "max_tokens": 2, "temperature": 0})
    assert r["usage"]["cached_tokens"] == 0 and len(host.opened) == 2


def test_chat_drops_old_messages_past_the_context(make_host: Callable[..., FakeHost]) -> None:
    host = make_host(context=96)
    msgs = [{"role": "system", "content": "S"}]
    msgs += [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 30}]
    msgs += [{"role": "user", "content": "q"}]
    r = host.call("chat", {"messages": msgs, "max_tokens": 4, "temperature": 0})
    assert r["dropped_messages"] >= 1
    sent = host.templates[-1]
    assert sent[0] == msgs[0] and sent[-1] == msgs[-1]
    status = host.call_raw("chat", json.dumps({"message": "z" * 200, "reset": True}).encode())
    assert status == Status.EINVAL and "longer than the model's context" in host.result["error"]  # type: ignore[index]


# --- the allocator -------------------------------------------------------------------------------


def test_alloc_free(host: FakeHost) -> None:
    alloc, free = host.exports["realm_alloc"], host.exports["realm_free"]
    p = alloc(host.store, 100)  # type: ignore[operator]
    assert p > 0 and p % 8 == 0
    free(host.store, p, 100)  # type: ignore[operator]
    assert alloc(host.store, 100) == p  # type: ignore[operator]  # reused
    free(host.store, p, 100)  # type: ignore[operator]
    free(host.store, p, 100)  # type: ignore[operator]  # a double free is ignored
    free(host.store, 12345, 1)  # type: ignore[operator]  # so is a pointer it never gave
    assert alloc(host.store, 0) > 0  # type: ignore[operator]
    big = alloc(host.store, 8 << 20)  # type: ignore[operator]  # grows the memory
    assert big > 0 and big + (8 << 20) <= host.memory.data_len(host.store)


def test_memory_is_stable_across_calls(host: FakeHost) -> None:
    def cycle() -> None:
        host.call("generate", {"prompt": "a" * 50, "max_tokens": 8, "stop": ["zz"]})
        host.call("chat", {"message": "hello", "max_tokens": 4, "reset": True})
        host.call("tokenize", {"text": "x" * 300})

    for _ in range(3):
        cycle()
    size = host.memory.data_len(host.store)
    for _ in range(30):
        cycle()
    assert host.memory.data_len(host.store) == size


# --- the SDK for tenants' own guests ----------------------------------------------------------

ECHO_GUEST = r"""
#include "realm_guest.h"
static const rg_param echo_params[] = {
    {.name = "text", .type = RG_P_STRING, .required = 1, .description = "what to echo"},
    {.name = "times", .type = RG_P_INT, .def = "1", .minimum = "1", .maximum = "3"},
};
static int echo(rg_call *c) {
    int n;
    const char *s = rg_param_str(c, "text", &n);
    int times = (int)rg_param_int(c, "times");
    for (int i = 0; i < times; i++)
        if (realm_emit(s, n) < 0) return rg_fail(c, REALM_ECANCELLED, "cancelled");
    rg_buf out = rg_buf_in(c->arena);
    rg_buf_fmt(&out, "{\"text\":%.*q,\"times\":%d,\"pi\":%g}", n, s, times, 3.25);
    return rg_result(c, &out);
}
static const rg_function fn_echo = {"echo", "Echo the text back.", 1, echo_params,
                                    RG_COUNT(echo_params), echo};
static const rg_function *const fns[] = {&fn_echo};
static const rg_module mod = {"echo-guest", "1", "An example.", fns, RG_COUNT(fns)};
RG_MODULE(mod)
RG_EXPORT_FUNCTION(echo, mod, fn_echo)
"""


def test_sdk_example_guest(tmp_path: Path, engine: wasmtime.Engine) -> None:
    src = tmp_path / "echo.c"
    src.write_text(ECHO_GUEST)
    wasm = load_build_module().build(src, tmp_path / "echo.wasm", opt="-Os")
    host = FakeHost(engine, wasmtime.Module.from_file(engine, str(wasm)))
    meta = host.metadata()
    (fn,) = meta["functions"]
    assert fn["name"] == "echo" and fn["params"]["required"] == ["text"]
    assert fn["params"]["properties"]["times"] == {"type": "integer", "minimum": 1,
                                                   "maximum": 3, "default": 1}  # fmt: skip
    assert host.call("echo", {"text": "hé\n", "times": 2}) == {
        "text": "hé\n", "times": 2, "pi": 3.25}  # fmt: skip
    assert host.chunks == ["hé\n", "hé\n"]
    assert host.call_raw("echo", b'{"text": "x", "times": 4}') == Status.EINVAL
    assert host.result == {"error": "echo: params: 'times' must be <= 3 (got 4)"}


def test_build_errors_carry_the_compiler_output(tmp_path: Path) -> None:
    mod = load_build_module()
    src = tmp_path / "bad.c"
    src.write_text("int f(void) { return undefined_thing; }\n")
    with pytest.raises(mod.GuestBuildError, match="undefined_thing"):
        mod.build(src, tmp_path / "bad.wasm")
    assert not (tmp_path / "bad.wasm").exists()
    with pytest.raises(mod.GuestBuildError, match="does not exist"):
        mod.build(tmp_path / "missing.c", tmp_path / "m.wasm")


PROBE_GUEST = r"""
#include "realm_guest.h"
static const rg_param probe_params[] = {{.name = "v", .type = RG_P_JSON, .schema = "{}"}};
static int probe(rg_call *c) {
    const rg_json *v = rg_json_get(c->params, "v");
    union { double d; uint64_t u; } bits;
    bits.d = v->num;
    rg_buf out = rg_buf_in(c->arena);
    rg_buf_fmt(&out, "{\"type\":%d,\"bits\":\"%llx\",\"is_int\":%d,\"i\":\"%lld\",\"len\":%d}",
               v->type, (unsigned long long)bits.u, v->is_int, (long long)v->i, v->len);
    return rg_result(c, &out);
}
static const rg_function fn_probe = {"probe", "JSON reader probe", 0, probe_params, 1, probe};
static const rg_function *const fns[] = {&fn_probe};
static const rg_module mod = {"probe", "1", 0, fns, 1};
RG_MODULE(mod)
RG_EXPORT_FUNCTION(probe, mod, fn_probe)
"""


@pytest.fixture(scope="module")
def probe_module(
    engine: wasmtime.Engine, tmp_path_factory: pytest.TempPathFactory
) -> wasmtime.Module:
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.c").write_text(PROBE_GUEST)
    wasm = load_build_module().build(d / "probe.c", d / "probe.wasm")
    return wasmtime.Module.from_file(engine, str(wasm))


@pytest.mark.parametrize(
    "text",
    ["0", "-0", "7", "-42", "0.95", "0.05", "1.1", "3.14159265358979", "1e-5", "2.5E+3",
     "-1.25e-7", "123456789012345678901234", "9223372036854775807", "-9223372036854775808",
     "9223372036854775808", "1e300", "4.9e-300", "0.000000000000000000000000001",
     "1.5e308"],
)  # fmt: skip
def test_json_numbers(engine: wasmtime.Engine, probe_module: wasmtime.Module, text: str) -> None:
    host = FakeHost(engine, probe_module)
    assert host.call_raw("probe", b'{"v": ' + text.encode() + b"}") == 0
    r = host.result
    assert r is not None and r["type"] == 2  # RG_JNUM
    (got,) = struct.unpack("<d", int(r["bits"], 16).to_bytes(8, "little"))
    want = float(text)
    assert got == pytest.approx(want, rel=4e-16, abs=0), (got, want)
    is_int = all(ch in "-0123456789" for ch in text) and -(2**63) <= int(text) < 2**63
    assert bool(r["is_int"]) == is_int
    if is_int:
        assert int(r["i"]) == int(text)


@pytest.mark.parametrize(
    ("raw", "length"),
    [(b'"\\u00e9"', 2), (b'"\\ud83d\\ude00"', 4), (b'"a\\u0000b"', 3), (b'"\\udc00x"', 4),
     (b'"\xc3\xa9"', 2)],
)  # fmt: skip
def test_json_strings(
    engine: wasmtime.Engine, probe_module: wasmtime.Module, raw: bytes, length: int
) -> None:
    host = FakeHost(engine, probe_module)
    assert host.call_raw("probe", b'{"v": ' + raw + b"}") == 0
    assert host.result is not None and host.result["type"] == 3  # RG_JSTR
    assert host.result["len"] == length
