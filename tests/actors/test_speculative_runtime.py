"""Speculative decoding in the default guest, on the real runtime (batcher, sandbox, models).

Greedy: the same text, finish reason and token count with and without speculation, on many
prompts (Hypothesis), alone and batched with other tenants. Sampled: the tokens follow the
model's own sampling distribution (a chi-square goodness-of-fit test against the exact
distribution of the first tokens, computed from the model's logits).
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import realm
from realm.model._chat import CHATML_TEMPLATE
from realm.sandbox import CallContext, GuestInstance, SandboxEngine, TenantState, default_guest_path
from realm.testing import models as test_models
from realm.testing import write_test_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sandbox"))
from wat_guests import Probe

LIMIT = 120  # seconds, every runtime test
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it", "def", "x", "="]


class _TemplateWriter(test_models.GGUFWriter):
    """The test models' writer, adding a ChatML template (for ``chat``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_chat_template(CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("spec")
    kw: dict[str, Any] = {"n_layers": 2, "n_embd": 64, "n_ff": 128, "context_length": 256}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_models, "GGUFWriter", _TemplateWriter)
        target = write_test_model(d / "target.gguf", wtype="F16", **kw)
    return {
        "target": target,
        "q4": write_test_model(d / "q4.gguf", wtype="Q4_0", **kw),  # the target, quantized
        "other": write_test_model(d / "other.gguf", wtype="Q8_0", seed=7, **kw),  # same vocab
        "alien": write_test_model(d / "alien.gguf", vocab_size=600, **kw),  # another vocab
    }


@pytest.fixture(scope="module")
def models(paths: dict[str, Path]) -> dict[str, realm.model.Model]:
    return {name: realm.load_model(p) for name, p in paths.items()}


def _prompts() -> st.SearchStrategy[str]:
    words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8)
    return st.builds(lambda w, r: " ".join(w * r), words, st.integers(1, 3))


def _specs() -> st.SearchStrategy[dict[str, Any]]:
    lookup = st.fixed_dictionaries(
        {"mode": st.just("lookup")},
        optional={"k": st.integers(1, 16), "ngram_max": st.integers(1, 4)},
    )
    draft = st.fixed_dictionaries(
        {"mode": st.just("draft"), "draft_model": st.sampled_from(["q4", "other", "target"])},
        optional={"k": st.integers(1, 8), "p_min": st.sampled_from([0.0, 0.3, 0.9])},
    )
    return st.one_of(lookup, draft)


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["text"] == b["text"]
    assert a["finish_reason"] == b["finish_reason"]
    assert a["usage"] == b["usage"]


async def test_greedy_output_identical_with_and_without_speculation(
    models: dict[str, realm.model.Model],
) -> None:
    async with realm.open_runtime(models=models) as rt:

        @settings(
            max_examples=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(
            prompt=_prompts(),
            spec=_specs(),
            max_tokens=st.integers(1, 40),
            fn=st.sampled_from(["generate", "chat"]),
            penalty=st.sampled_from([1.0, 1.3]),
            stop=st.sampled_from([None, ["the"], ["at"]]),
        )
        def check(
            prompt: str,
            spec: dict[str, Any],
            max_tokens: int,
            fn: str,
            penalty: float,
            stop: list[str] | None,
        ) -> None:
            p: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0, "model": "target"}
            p |= {"repeat_penalty": penalty} | ({"stop": stop} if stop else {})
            if fn == "chat":
                p |= {"message": prompt, "reset": True, "conversation": "c"}
            else:
                p["prompt"] = prompt
            plain = trio.from_thread.run(rt.call, "alice", fn, p)
            fast = trio.from_thread.run(rt.call, "alice", fn, {**p, "speculative": spec})
            _same(plain, fast)
            s = fast["speculative"]
            assert s["mode"] == spec["mode"] and 0 <= s["accepted"] <= s["drafted"]
            assert s["steps"] <= fast["usage"]["completion_tokens"]

        with trio.fail_after(LIMIT):
            await trio.to_thread.run_sync(check)


async def test_chat_turns_reuse_the_cache_after_speculation(
    models: dict[str, realm.model.Model],
) -> None:
    """A conversation's KV cache after speculative turns (rewound to what was accepted) holds
    what the guest believes: later turns give the same replies as without speculation."""
    turns = ["the cat sat on the mat", "and the dog?", "the cat sat on the mat again"]
    spec = {"mode": "lookup", "k": 5}
    async with realm.open_runtime(models=models) as rt:
        base = {"max_tokens": 24, "temperature": 0, "model": "target"}
        with trio.fail_after(LIMIT):
            for turn in turns:
                plain = await rt.call(
                    "alice", "chat", {**base, "message": turn, "conversation": "p"}
                )
                fast = await rt.call(
                    "alice",
                    "chat",
                    {**base, "message": turn, "conversation": "s", "speculative": spec},
                )
                _same(plain, fast)
                assert fast["usage"]["cached_tokens"] == plain["usage"]["cached_tokens"]


async def test_greedy_identity_while_batched_with_other_tenants(
    models: dict[str, realm.model.Model],
) -> None:
    """Verify steps share batches with other tenants' decode steps and stay exact. Prompts are
    short (at most 8 tokens: never chunked, never on the GEMM kernels) so that the reference,
    computed alone, has the same prefill."""
    prompts = ["a cat sat", "the dog ran to", "x = x", "on a mat", "def it", "and the"]
    async with realm.open_runtime(models=models) as rt:
        base = {"max_tokens": 32, "temperature": 0, "model": "target"}
        want = {p: await rt.call("solo", "generate", {**base, "prompt": p}) for p in prompts}
        done = trio.Event()
        got: dict[tuple[str, str], dict[str, Any]] = {}

        async def load(name: str) -> None:
            while not done.is_set():
                await rt.call(name, "generate", {**base, "prompt": "cat", "temperature": 1.0})

        async def speculate(mode: dict[str, Any]) -> None:
            for p in prompts:
                r = await rt.call(
                    f"spec-{mode['mode']}", "generate", {**base, "prompt": p, "speculative": mode}
                )
                got[(mode["mode"], p)] = r

        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(load, f"load{i}")
                async with trio.open_nursery() as inner:
                    inner.start_soon(speculate, {"mode": "lookup", "k": 6})
                    inner.start_soon(speculate, {"mode": "draft", "draft_model": "q4"})
                done.set()
        for (_, p), r in got.items():
            _same(want[p], r)
        assert len(got) == 2 * len(prompts)
        assert rt.statistics().batcher.max_batch_size > 1


async def test_streamed_tokens_add_up_to_the_result(models: dict[str, realm.model.Model]) -> None:
    """Several tokens accepted in one verify step still stream one event per token chunk, in
    order, and the chunks add up to the result's text."""
    params = {
        "prompt": "the cat sat on the mat the cat sat on the mat the cat",
        "max_tokens": 48,
        "temperature": 0,
        "model": "target",
        "speculative": {"mode": "lookup"},
    }
    async with realm.open_runtime(models=models) as rt:
        with trio.fail_after(LIMIT):
            chunks: list[str] = []
            result: dict[str, Any] = {}
            async with rt.stream("alice", "generate", params) as events:
                async for ev in events:
                    if ev.kind == "token":
                        assert ev.data["index"] == len(chunks)
                        chunks.append(ev.data["token"])
                    else:
                        result = ev.data
            assert result["text"] == "".join(chunks)
            assert result["speculative"]["steps"] <= result["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    "spec", [{"mode": "lookup"}, {"mode": "draft", "draft_model": "q4", "p_min": 0.0}]
)
def test_cancel_mid_stream_frees_both_sessions(guest: GuestInstance, spec: dict[str, Any]) -> None:
    ctx = CallContext()
    seen: list[str] = []

    def on_emit(text: str) -> bool:
        seen.append(text)
        if len(seen) == 3:
            ctx.cancel.set()
        return True

    ctx.on_emit = on_emit
    params = {"prompt": "a b a b a b", "max_tokens": 200, "temperature": 0, "model": "target"}
    res = guest.call("generate", {**params, "speculative": spec}, ctx)
    assert res["finish_reason"] == "cancelled"
    assert res["text"] == "".join(seen)
    assert guest.tenant.sessions == {}  # the target's and the draft's
    assert guest.call("count_tokens", {"text": "next call", "model": "target"})["count"] > 0


# --- sampled: the distribution is the model's ------------------------------------------------

TOP_K = 3  # few outcomes per position: a small table for the chi-square test
N_TOKENS = 2  # the first two sampled tokens: the second one goes through the acceptance rule
N_SAMPLES = 400  # about 4 s per case
CHI2_Z = 3.719  # one-sided normal quantile of p = 1e-4: the test's false-alarm rate


def _exact_distribution(model: realm.model.Model, prompt_ids: list[int]) -> dict[str, float]:
    """P(text of the first N_TOKENS sampled tokens) at temperature 1, top-k TOP_K (no top-p,
    min-p or penalties), from the model's own logits; generation ends early on EOG."""
    tok = model.tokenizer
    out: Counter[str] = Counter()

    def walk(ctx: list[int], gen: list[int], p: float) -> None:
        if len(gen) == N_TOKENS:
            out[tok.decode(gen)] += p
            return
        logits = model.logits(ctx)[-1].astype(np.float64)
        top = np.argsort(-logits, kind="stable")[:TOP_K]
        w = np.exp(logits[top] - logits[top].max())
        w /= w.sum()
        for t, q in zip(top.tolist(), w.tolist(), strict=True):
            if t in tok.eog_ids:
                out[tok.decode(gen)] += p * q
            else:
                walk([*ctx, t], [*gen, t], p * q)

    walk(prompt_ids, [], 1.0)
    return dict(out)


def _chi_square_ok(counts: Counter[str], probs: dict[str, float], n: int) -> tuple[bool, str]:
    """Pearson's chi-square against the exact probabilities, cells of expected count < 5
    pooled; the critical value is Wilson-Hilferty's at p = 1e-4."""
    assert set(counts) <= set(probs), f"outcomes the model cannot give: {set(counts) - set(probs)}"
    cells, pool_o, pool_e = [], 0.0, 0.0
    for key, p in probs.items():
        e, o = p * n, counts.get(key, 0)
        if e < 5:
            pool_o, pool_e = pool_o + o, pool_e + e
        else:
            cells.append((o, e))
    if pool_e > 0:
        cells.append((pool_o, pool_e))
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    crit = df * (1 - 2 / (9 * df) + CHI2_Z * math.sqrt(2 / (9 * df))) ** 3
    return chi2 < crit, f"chi2 {chi2:.1f} with {df} degrees of freedom, critical {crit:.1f}"


@pytest.fixture(scope="module")
def lookup_prompt(models: dict[str, realm.model.Model]) -> str:
    """A prompt "A B C A" whose prompt-lookup draft (B, after the repeated A) is among the
    target's TOP_K most likely next tokens, as likely as can be found: with random weights, a
    draft copied from the prompt is otherwise almost never accepted."""
    m = models["target"]
    tok = m.tokenizer
    words = [
        i
        for i in range(m.info.vocab_size)
        if tok.token_text(i).startswith("\u2581") and tok.token_text(i)[1:].isalpha()
    ]
    best: tuple[float, str] = (0.0, "")
    for a in words[:4]:
        for c in words[4:8]:
            texts = [" ".join(tok.token_text(x)[1:] for x in (a, b, c, a)) for b in words]
            sessions = [m.open_session() for _ in texts]
            out = m.step(
                [(s, tok.encode(t, True), "last") for s, t in zip(sessions, texts, strict=True)]
            )
            for s in sessions:
                s.close()
            for b, text, lg in zip(words, texts, out, strict=True):
                assert lg is not None
                top = np.argsort(-lg, kind="stable")[:TOP_K]
                if b in (a, c) or b not in top:
                    continue
                w = np.exp(lg[top] - lg[top].max())
                p = float(w[list(top).index(b)] / w.sum())
                best = max(best, (p, text))
    assert best[0] > 0.1, "no usable prompt for the lookup case"
    return best[1]


@pytest.fixture(scope="module")
def guest(models: dict[str, realm.model.Model]) -> Iterator[GuestInstance]:
    with SandboxEngine() as engine:
        tenant = TenantState("sampler", dict(models))
        yield GuestInstance(engine, engine.compile(default_guest_path()), tenant)
        tenant.close()


@pytest.mark.parametrize(
    "spec",
    [
        {"mode": "lookup", "k": 4, "ngram_max": 2},  # drafts B C A at the first token
        {"mode": "draft", "draft_model": "q4", "k": 3, "p_min": 0.0},  # the quantized copy
        # ... stopping at unsure drafts (random weights: top probabilities ~0.015-0.025)
        {"mode": "draft", "draft_model": "q4", "k": 3, "p_min": 0.018},
    ],
)
def test_sampled_tokens_follow_the_models_distribution(
    guest: GuestInstance,
    models: dict[str, realm.model.Model],
    lookup_prompt: str,
    spec: dict[str, Any],
) -> None:
    target = models["target"]
    prompt = lookup_prompt
    probs = _exact_distribution(target, target.tokenizer.encode(prompt, True))
    params: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": N_TOKENS,
        "temperature": 1.0,
        "top_k": TOP_K,
        "top_p": 1.0,
        "min_p": 0.0,
        "model": "target",
        "speculative": spec,
    }
    counts: Counter[str] = Counter()
    drafted = accepted = 0
    for seed in range(N_SAMPLES):
        r = guest.call("generate", {**params, "seed": seed}, CallContext())
        counts[r["text"]] += 1
        drafted += r["speculative"]["drafted"]
        accepted += r["speculative"]["accepted"]
    ok, how = _chi_square_ok(counts, probs, N_SAMPLES)
    assert ok, how
    assert 0 < accepted < drafted, (accepted, drafted)  # both branches of the rule ran


# --- the host's side: forward mode 3 (verify) and model_info --------------------------------


def test_forward_verify_mode_at_the_import(models: dict[str, realm.model.Model]) -> None:
    target = models["target"]
    vocab = target.info.vocab_size
    ids = [1, 476, 535, 299, 538, 430, 12, 13, 14]
    with SandboxEngine() as engine:
        tenant = TenantState("probe", {"target": target, "q4": models["q4"]})
        probe = Probe(engine, tenant)
        h = probe("session_open", 0, 0, 64)
        tp, _ = probe.put(np.asarray(ids + [5] * 20, "<i4"))
        lp = probe.buffer(4 * vocab * 20)
        assert probe("forward", h, tp, 4, 0, 0, 0) == 0
        assert probe("forward", h, tp + 16, 5, lp, 5 * vocab, 3) == 5 * vocab
        with target.open_session() as s:  # one token at a time: the same bits
            s.extend(ids[:4], logits="none")
            want = np.stack([s.extend([t]) for t in ids[4:]])  # type: ignore[arg-type]
        assert np.array_equal(probe.f32s(lp, 5 * vocab).reshape(5, vocab), want)
        ELIMIT, EINVAL = int(realm.sandbox.Status.ELIMIT), int(realm.sandbox.Status.EINVAL)
        assert probe("forward", h, tp, 18, lp, 18 * vocab, 3) == ELIMIT  # k + 1 <= 17
        assert probe("forward", h, tp, 2, lp, 2 * vocab - 1, 3) == EINVAL  # buffer too small
        assert probe("forward", h, tp, 2, lp, 2 * vocab, 4) == EINVAL  # no such mode
        assert probe("session_pos", h) == 9, "refused steps change nothing"
        infos = []
        for name in ("target", "q4"):
            mp, ml = probe.put(name)
            out = probe.buffer(8192)
            n = probe("model_info", mp, ml, out, 8192)
            infos.append(json.loads(probe.read(out, n)))
        assert infos[0]["max_verify_tokens"] == 17
        assert infos[0]["vocab_hash"] == infos[1]["vocab_hash"]
        tenant.close()


# --- bad settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"mode": "draft", "draft_model": "alien"}, "different vocabulary"),
        ({"mode": "draft", "draft_model": "nope"}, "no model"),
        ({"mode": "draft"}, "needs the name of a loaded model"),
        ({"mode": "lookup", "draft_model": "q4"}, "is for mode"),
        ({"mode": "lookup", "p_min": 0.5}, "is for mode"),
        ({"mode": "draft", "draft_model": "q4", "p_min": 1.5}, "p_min"),
        ({"mode": "lookup", "k": 0}, "k"),
        ({"mode": "lookup", "k": 17}, "k"),
        ({"mode": "lookup", "ngram_min": 3, "ngram_max": 2}, "ngram_min"),
        ({"mode": "fast"}, "mode"),
        ({"k": 4}, "mode"),
        ({"mode": "lookup", "extra": 1}, "extra"),
        ("lookup", "speculative"),
    ],
)
async def test_bad_speculative_settings_are_invalid_params(
    models: dict[str, realm.model.Model], spec: Any, match: str
) -> None:
    async with realm.open_runtime(models=models) as rt:
        with trio.fail_after(LIMIT), pytest.raises(realm.InvalidParams, match=match):
            await rt.call(
                "alice", "generate", {"prompt": "x", "model": "target", "speculative": spec}
            )
        ok = await rt.call("alice", "generate", {"prompt": "x", "model": "target", "max_tokens": 2})
        assert ok["finish_reason"] in ("stop", "length")
