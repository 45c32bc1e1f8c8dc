"""Log-probabilities on the OpenAI-compatible API (docs/http.md): chat ``logprobs`` /
``top_logprobs`` and completions ``logprobs``, checked against the model's own logits. Every
test runs under ``trio.fail_after(LIMIT)``; each ends with a normal request still served.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openai
import pytest
import trio

import realm
from realm.server import open_server

from ._wire import LIMIT, config, http_exchange
from .test_openai import TENANTS, assert_error, chat_model_path, client, post  # noqa: F401
from .test_openai_choices import assert_still_served

PROMPT = "Once upon"


def log_softmax_of_next(model_path: Path, prompt: str) -> tuple[np.ndarray, list[int]]:
    """The model's log-probabilities of the token after ``prompt`` (as the guest tokenizes it)."""
    model = realm.load_model(model_path)
    try:
        ids = model.tokenizer.encode(prompt, add_special=True)
        x = model.logits(ids)[-1].astype(np.float64)
    finally:
        model.close()
    return x - x.max() - np.log(np.exp(x - x.max()).sum()), ids


async def test_completion_logprobs_match_the_model(model_path: Path) -> None:
    want, _ = log_softmax_of_next(model_path, PROMPT)
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path, tenants=TENANTS)) as server:

            def run() -> None:
                c = client(server)
                r = c.completions.create(
                    model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3
                )
                lp = r.choices[0].logprobs
                assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
                assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
                assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(4)]
                # the first token: greedy picks the model's most likely one, at its logprob
                best = np.argsort(-want)[:3]
                assert lp.token_logprobs[0] == pytest.approx(want[best[0]], abs=2e-3)
                assert sorted(lp.top_logprobs[0].values(), reverse=True) == pytest.approx(
                    list(want[best]), abs=2e-3
                )
                assert all(v <= 0 for v in lp.token_logprobs)  # type: ignore[operator]
                # without logprobs: none
                plain = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
                assert plain.choices[0].logprobs is None
                # streamed: the finish chunk of the choice carries them
                chunks = list(
                    c.completions.create(
                        model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0,
                        stream=True,
                    )
                )  # fmt: skip
                last = chunks[-1].choices[0]
                assert last.finish_reason == "length" and last.logprobs is not None
                assert last.logprobs.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-5)
                assert last.logprobs.top_logprobs == [{}] * 4
                assert all(ch.choices[0].logprobs is None for ch in chunks[:-1])

            await trio.to_thread.run_sync(run)
            await assert_still_served(server.port)


async def test_chat_logprobs(chat_model_path: Path) -> None:  # noqa: F811
    with trio.fail_after(LIMIT):
        async with open_server(config(chat_model_path, tenants=TENANTS)) as server:

            def run() -> None:
                c = client(server)
                r = c.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                    temperature=0, logprobs=True, top_logprobs=2,
                )  # fmt: skip
                lp = r.choices[0].logprobs
                assert lp is not None and lp.content is not None and len(lp.content) == 3
                for entry in lp.content:
                    assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token
                    assert len(entry.top_logprobs) == 2
                    # greedy: the chosen token is the most likely one
                    assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
                    assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
                with pytest.raises(openai.BadRequestError) as bad:
                    c.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": "Hi"}],
                        top_logprobs=2,
                    )  # fmt: skip
                assert bad.value.body["param"] == "top_logprobs"  # type: ignore[index]

            await trio.to_thread.run_sync(run)


async def test_logprobs_bad_values(model_path: Path) -> None:
    cases = [
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "logprobs": "yes"}, "logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ]  # fmt: skip
    with trio.fail_after(LIMIT):
        async with open_server(config(model_path)) as server:
            for path, body, param in cases:
                status, headers, raw = await http_exchange(
                    server.port, post(path, json.dumps(body), key=None)
                )
                assert assert_error(status, headers, raw, 400)["param"] == param, body
            await assert_still_served(server.port, key=None)


async def test_guest_logprobs_turn_speculation_off(model_path: Path) -> None:
    # the guest's contract this API relies on: every step's logits, so no speculation
    params = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": True,
              "top_logprobs": 1, "speculative": {"mode": "lookup"}}  # fmt: skip
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": str(model_path)}) as rt:
            r = await rt.call("t", "generate", params)
            assert "speculative" not in r and len(r["logprobs"]) == 3
            assert all(len(e["top"]) == 1 for e in r["logprobs"])
            plain = await rt.call(
                "t", "generate", {k: v for k, v in params.items() if "log" not in k}
            )
            assert "logprobs" not in plain and plain["text"] == r["text"]
