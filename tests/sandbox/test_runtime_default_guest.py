"""The default guest on the real host: a tiny GGUF model, real tokenizer, real forward pass."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

import realm
from realm.sandbox import (
    CallContext,
    GuestInstance,
    SandboxEngine,
    TenantState,
    default_guest_path,
)
from realm.testing import write_test_model


@pytest.fixture(scope="module")
def engine() -> Iterator[SandboxEngine]:
    with SandboxEngine() as eng:
        yield eng


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> realm.model.Model:
    path = write_test_model(tmp_path_factory.mktemp("m") / "tiny.gguf", n_layers=2)
    return realm.load_model(path)


@pytest.fixture
def guest(engine: SandboxEngine, model: realm.model.Model) -> Iterator[GuestInstance]:
    tenant = TenantState("alice", {"tiny": model})
    inst = GuestInstance(engine, engine.compile(default_guest_path()), tenant)
    yield inst
    tenant.close()


def _greedy(model: realm.model.Model, prompt: str, n: int) -> list[int]:
    ids = model.tokenizer.encode(prompt, True)
    out: list[int] = []
    with model.open_session() as s:
        logits = s.extend(ids)
        for _ in range(n):
            assert logits is not None
            t = int(np.argmax(logits))
            if t in model.tokenizer.eog_ids:
                break
            out.append(t)
            logits = s.extend([t])
    return out


def test_generate_greedy_is_the_models_argmax_path(
    guest: GuestInstance, model: realm.model.Model
) -> None:
    chunks: list[str] = []
    res = guest.call(
        "generate",
        {"prompt": "The history of", "max_tokens": 12, "temperature": 0, "repeat_penalty": 1.0},
        CallContext(on_emit=lambda t: chunks.append(t) is None),
    )
    want = _greedy(model, "The history of", 12)
    assert res["text"] == model.tokenizer.decode(want, strip_prefix_space=False) or res[
        "text"
    ] == model.tokenizer.decode(want)
    assert "".join(chunks) == res["text"]
    assert res["usage"]["prompt_tokens"] == len(model.tokenizer.encode("The history of", True))
    assert res["finish_reason"] in ("length", "stop")
    assert guest.tenant.sessions == {}  # generate closes its session


def test_same_seed_same_text(guest: GuestInstance) -> None:
    params = {"prompt": "Once", "max_tokens": 10, "temperature": 1.0, "seed": 7}
    assert guest.call("generate", params)["text"] == guest.call("generate", params)["text"]


def test_metadata_and_tokenize(guest: GuestInstance, model: realm.model.Model) -> None:
    names = {f["name"] for f in guest.functions()}
    assert {"generate", "chat", "tokenize", "count_tokens", "embed"} <= names
    res = guest.call("tokenize", {"text": "hello world"})
    assert res["tokens"] == model.tokenizer.encode("hello world")
    assert guest.call("count_tokens", {"text": "hello world"})["count"] == len(res["tokens"])


def test_bad_params_never_reach_the_guest(guest: GuestInstance) -> None:
    with pytest.raises(realm.InvalidParams, match="max_tokens"):
        guest.call("generate", {"prompt": "x", "max_tokens": -1})
    with pytest.raises(realm.InvalidParams, match="prompt"):
        guest.call("generate", {"max_tokens": 3})
    with pytest.raises(realm.UnknownFunction):
        guest.call("__init__", {})
    assert guest.call("count_tokens", {"text": "still fine"})["count"] > 0


def test_cancel_mid_stream_frees_the_session(guest: GuestInstance) -> None:
    ctx = CallContext()
    seen: list[str] = []

    def on_emit(text: str) -> bool:
        seen.append(text)
        if len(seen) == 3:
            ctx.cancel.set()
        return True

    ctx.on_emit = on_emit
    res = guest.call("generate", {"prompt": "a", "max_tokens": 50, "temperature": 0}, ctx)
    assert res["finish_reason"] == "cancelled"  # the partial result is delivered as such
    assert res["text"] == "".join(seen) and 3 <= len(seen) <= 4
    assert guest.tenant.sessions == {}  # the guest closed it on its way out
    assert guest.call("count_tokens", {"text": "next call"})["count"] > 0


def test_prompt_longer_than_the_context_is_refused(guest: GuestInstance) -> None:
    with pytest.raises(realm.GuestError, match="context"):
        guest.call("generate", {"prompt": "word " * 2000, "max_tokens": 4})


def test_two_tenants_in_parallel(engine: SandboxEngine, model: realm.model.Model) -> None:
    module = engine.compile(default_guest_path())
    results: dict[str, list[str]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            inst = GuestInstance(engine, module, TenantState(name, {"tiny": model}))
            for _ in range(5):
                p = {"prompt": f"tenant {name}", "max_tokens": 6, "temperature": 0}
                results[name].append(inst.call("generate", p)["text"])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert all(len(set(v)) == 1 and len(v) == 5 for v in results.values())


def test_embed_is_the_models_embedding(guest: GuestInstance, model: realm.model.Model) -> None:
    res = guest.call("embed", {"text": "a sentence to embed"})
    want = model.embed(model.tokenizer.encode("a sentence to embed"))
    assert res["dim"] == model.info.n_embd and res["pooling"] == "mean"
    np.testing.assert_allclose(np.array(res["embedding"]), want, atol=2e-6)
