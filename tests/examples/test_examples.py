"""The examples: keyword_guard.c on a tiny model, embed_sandbox.py end to end, and the
realm.testing helpers (plain functions and the pytest plugin's fixtures)."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest

import realm
from realm.sandbox import CallContext, GuestInstance, GuestLimits, SandboxEngine
from realm.sandbox._build import build
from realm.testing import write_test_model
from realm.testing.fixtures import guest_instance, tiny_model

# pytest reads pytest_plugins in test modules (only non-root conftest files may not use it)
pytest_plugins = ["realm.testing.pytest_plugin"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PROMPT = "The history of"


@pytest.fixture(scope="module")
def keyword_guard_wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guests") / "keyword_guard.wasm"
    return build(EXAMPLES / "guests" / "keyword_guard.c", out)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> realm.model.Model:
    return realm.load_model(write_test_model(tmp_path_factory.mktemp("m") / "tiny.gguf"))


@pytest.fixture
def guard(
    realm_sandbox_engine: SandboxEngine, model: realm.model.Model, keyword_guard_wasm: Path
) -> Iterator[GuestInstance]:
    inst = guest_instance(realm_sandbox_engine, model, keyword_guard_wasm, tenant="bob")
    yield inst
    inst.tenant.close()


def streamed(guest: GuestInstance, function: str, params: dict[str, Any]) -> tuple[dict, list]:
    chunks: list[str] = []
    res = guest.call(function, params, CallContext(on_emit=lambda t: chunks.append(t) is None))
    return res, chunks


def greedy(model: realm.model.Model, prompt: str, n: int, banned: set[int]) -> list[int]:
    """The model's argmax path, never picking a banned id (what the guard should produce)."""
    ids = model.tokenizer.encode(prompt, True)
    out: list[int] = []
    with model.open_session() as s:
        logits = s.extend(ids)
        for _ in range(n):
            assert logits is not None
            masked = np.array(logits, dtype=np.float32)
            masked[list(banned)] = -np.inf
            t = int(np.argmax(masked))
            if t in model.tokenizer.eog_ids:
                break
            out.append(t)
            logits = s.extend([t])
    return out


def tokens_containing(model: realm.model.Model, word: str) -> set[int]:
    """Every token id whose text contains word (ASCII case-insensitive), per the tokenizer."""
    tok, w = model.tokenizer, word.lower()
    return {i for i in range(tok.vocab_size) if w in tok.decode([i]).lower()}


# --- keyword_guard.c --------------------------------------------------------------------------


def test_metadata(guard: GuestInstance) -> None:
    fns = {f["name"]: f for f in guard.functions()}
    assert set(fns) == {"answer", "word_count"}
    assert fns["answer"]["streams"] and not fns["word_count"]["streams"]
    props = fns["answer"]["params"]["properties"]
    assert props["max_tokens"] | {"description": ""} == {
        "type": "integer", "minimum": 1, "maximum": 256, "default": 32, "description": ""
    }  # fmt: skip
    assert props["blocked"]["default"] == [] and fns["answer"]["params"]["required"] == ["prompt"]


def test_prompt_with_a_blocked_word_is_refused(guard: GuestInstance) -> None:
    with pytest.raises(
        realm.GuestError, match='refused: the prompt contains the blocked word "secret"'
    ):
        guard.call("answer", {"prompt": "Tell me the SeCrEt plan", "blocked": ["nope", "secret"]})
    assert guard.tenant.sessions == {}  # refused before any session was opened
    assert guard.call("answer", {"prompt": "Tell me the plan", "blocked": ["secret"],
                                 "max_tokens": 2})["usage"]["completion_tokens"] == 2  # fmt: skip


def test_answer_is_the_greedy_path_streamed(guard: GuestInstance, model: realm.model.Model) -> None:
    res, chunks = streamed(guard, "answer", {"prompt": PROMPT, "max_tokens": 12})
    assert res["tokens"] == greedy(model, PROMPT, 12, set())
    assert res["banned_tokens"] == []
    assert "".join(chunks) == res["text"] and len(chunks) >= 2
    assert res["text"] == model.tokenizer.decode(res["tokens"])
    n_prompt = len(model.tokenizer.encode(PROMPT, True))
    assert res["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12,
                            "total_tokens": n_prompt + 12}  # fmt: skip
    assert res["finish_reason"] == "length"
    assert guard.tenant.sessions == {}  # the guest closed its session


def test_blocked_tokens_are_never_generated(guard: GuestInstance, model: realm.model.Model) -> None:
    tok = model.tokenizer
    first = guard.call("answer", {"prompt": PROMPT, "max_tokens": 16})
    # a word the model wants to say: a generated token's letters, absent from the prompt
    word = next(
        w
        for w in (tok.decode([t]).strip() for t in first["tokens"])
        if len(w) >= 2 and w.isascii() and w.isalpha() and w.lower() not in PROMPT.lower()
    )
    bad = tokens_containing(model, word)
    assert bad & set(first["tokens"])

    res, chunks = streamed(
        guard, "answer", {"prompt": PROMPT, "max_tokens": 16, "blocked": [word.upper()]}
    )
    assert res["banned_tokens"] and set(res["banned_tokens"]) <= bad  # found lazily, all right
    assert not bad & set(res["tokens"])
    assert res["tokens"] == greedy(model, PROMPT, 16, bad)  # the best token left at every step
    assert "".join(chunks) == res["text"] == tok.decode(res["tokens"])
    assert guard.tenant.sessions == {}


def test_cancel_returns_what_was_streamed(guard: GuestInstance) -> None:
    ctx = CallContext()
    seen: list[str] = []

    def on_emit(text: str) -> bool:
        seen.append(text)
        if len(seen) == 2:
            ctx.cancel.set()
        return True

    ctx.on_emit = on_emit
    res = guard.call("answer", {"prompt": PROMPT, "max_tokens": 50}, ctx)
    assert res["finish_reason"] == "cancelled"
    assert res["text"] == "".join(seen) and len(seen) == 2
    assert guard.tenant.sessions == {}  # closed even though the call was cancelled
    assert guard.call("word_count", {"text": "still works"})["words"] == 2


def test_word_count(guard: GuestInstance) -> None:
    text = "  héllo  wörld\nfoo\tbarbaz "
    assert guard.call("word_count", {"text": text}) == {
        "words": 4, "characters": len(text), "longest_word": "barbaz"
    }  # fmt: skip
    assert guard.call("word_count", {"text": "ab cd"})["longest_word"] == "ab"  # first of ties
    assert guard.call("word_count", {"text": ""}) == {
        "words": 0, "characters": 0, "longest_word": ""
    }  # fmt: skip


@pytest.mark.parametrize(
    ("function", "params", "names"),
    [
        ("answer", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("answer", {"prompt": "x", "max_tokens": 257}, "max_tokens"),
        ("answer", {"prompt": "x", "max_tokens": "3"}, "max_tokens"),
        ("answer", {"prompt": "x", "blocked": "secret"}, "blocked"),
        ("answer", {"prompt": "x", "blocked": [""]}, "blocked"),
        ("answer", {"prompt": "x", "blocked": [3]}, "blocked"),
        ("answer", {"max_tokens": 3}, "prompt"),
        ("answer", {"prompt": ""}, "prompt"),
        ("answer", {"prompt": "x", "temperature": 0.5}, "temperature"),
        ("word_count", {}, "text"),
        ("word_count", {"text": 5}, "text"),
    ],
)
def test_invalid_params(guard: GuestInstance, function: str, params: dict, names: str) -> None:
    with pytest.raises(realm.InvalidParams, match=names):
        guard.call(function, params)


def test_a_missing_model_is_a_guest_error(guard: GuestInstance) -> None:
    with pytest.raises(realm.GuestError, match="no model"):
        guard.call("answer", {"prompt": "x", "model": "other"})


# --- examples/embed_sandbox.py ----------------------------------------------------------------


def test_embed_sandbox_script_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed_sandbox.py"), "-n", "8"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = proc.stdout
    assert "tenant alice: realm-default" in out and "tenant bob: keyword-guard" in out
    assert 'refused: the prompt contains the blocked word "SECRET"' in out
    assert "'words': 9" in out and "invalid params are refused" in out


# --- realm.testing.fixtures and the pytest plugin ----------------------------------------------


def test_plugin_fixtures(realm_guest: GuestInstance, realm_tiny_model: realm.model.Model) -> None:
    res = realm_guest.call("count_tokens", {"text": "hello world"})
    assert res["count"] == len(realm_tiny_model.tokenizer.encode("hello world"))
    assert realm_guest.tenant.name == "test" and realm_guest.metadata["name"] == "realm-default"
    assert realm_guest.tenant.models == {"tiny": realm_tiny_model}
    text = realm_guest.call("generate", {"prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert text["usage"]["completion_tokens"] <= 3


def test_tiny_model_in_a_temporary_directory_goes_with_the_model() -> None:
    m = tiny_model(n_layers=1, context_length=64)
    path = Path(m.path)
    assert path.is_file() and m.info.n_layers == 1 and m.info.context_length == 64
    del m
    gc.collect()
    assert not path.parent.exists()


def test_guest_instance_takes_modules_bytes_and_limits(
    realm_sandbox_engine: SandboxEngine, model: realm.model.Model, keyword_guard_wasm: Path
) -> None:
    module = realm_sandbox_engine.compile(keyword_guard_wasm)
    limits = GuestLimits(max_sessions=1)
    for wasm in (module, keyword_guard_wasm.read_bytes(), str(keyword_guard_wasm)):
        inst = guest_instance(realm_sandbox_engine, model, wasm, tenant="t", limits=limits)
        assert inst.module is module  # compiled once, cached by content
        assert inst.tenant.limits is limits and inst.tenant.default_model == "tiny"
        assert inst.call("word_count", {"text": "a b"})["words"] == 2


def test_server_client_example_runs(tmp_path: Path) -> None:
    model = write_test_model(tmp_path / "tiny.gguf")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "server_client.py"), "--model", str(model)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = proc.stdout
    assert "server on ws://127.0.0.1:" in out
    assert "generate" in out.split("functions:")[1].splitlines()[0]
    assert "[length: 40 tokens" in out or "[stop:" in out
    assert "'The function' -> " in out and "'A module' -> " in out
    assert "typed error: INVALID_PARAMS: generate: max_tokens" in out


async def test_the_realm_server_fixture_serves(realm_server: Any) -> None:
    import trio

    import realm.client

    with trio.fail_after(30):
        async with realm.client.connect(realm_server.url) as c:
            assert (await c.health())["status"] == "ok"
            r = await c.call("generate", {"prompt": "Hi", "max_tokens": 3, "temperature": 0})
            assert r["usage"]["completion_tokens"] == 3


async def test_the_example_config_serves_its_tenants() -> None:
    import trio

    import realm.client
    from realm.server import load_config, open_server

    config = load_config(EXAMPLES / "realm.toml")
    assert config.models["tiny"] == str(realm.default_model_path())
    assert set(config.tenants or {}) == {"acme", "beta"}
    assert config.tenants["acme"].weight == 2.0  # type: ignore[index]
    config = attrs.evolve(config, port=0, metrics_port=None)
    with trio.fail_after(60):
        async with open_server(config) as server:
            async with realm.client.connect(server.url, api_key="demo-acme-key") as c:
                assert (await c.metadata())["tenant"] == "acme"
                r = await c.call("generate", {"prompt": "A list is", "max_tokens": 4})
                assert r["usage"]["completion_tokens"] == 4
            async with realm.client.connect(server.url, api_key="demo-beta-key") as c:
                assert (await c.metadata())["tenant"] == "beta"
            async with realm.client.connect(server.url, api_key="wrong", retries=0) as c:
                with pytest.raises(realm.client.ConnectionLost, match="1008"):
                    await c.health()
