"""The built-in default model (``realm/model/default``, trained by ``scripts/train_tiny.py``).

It loads from the package with no network; its metadata matches the training report
(``realm-tiny.json``); Realm's held-out perplexity, over the same windows as the trainer's,
equals the trainer's within 1%; Realm tokenizes as SentencePiece did at training time; greedy
generation gives English words, and through the default guest it can end with ``</s>`` (the
trainer ends every document with it); and llama.cpp (when installed) tokenizes the same and
gives the same logits.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

import realm
from realm.model import _default

REPORT_PATH = _default.DEFAULT_MODEL_DIR / "realm-tiny.json"
MAX_FILE_BYTES = 30 << 20  # 30 MiB: the model ships in the wheel
PPL_RTOL = 0.01  # Realm's held-out perplexity against the trainer's (torch float32)
LLAMA_CPP_RTOL = 2e-3  # logits, as tests/model/test_llama_cpp.py allows for F16 weights
MIN_ASCII = 0.95  # of the generated characters
MIN_KNOWN_WORDS = 0.8  # of the generated words, found in the held-out text's words
PROMPTS = ("The", "Return the", "If the", "This module provides")
GENERATED_TOKENS = 32
GUEST_MAX_TOKENS = 200  # per generate call through the default guest
GUEST_LIMIT = 60  # seconds, the whole runtime test
TEXTS = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x + 1  # one more\n",
    "  two leading spaces, trailing tab\t",
    "Ünïcödé: naïve café, Ελληνικά, 日本語, emoji 🙂",
    "1234567890 3.14159 0xFF 1e-10",
    "\n\n\n",
)


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return json.loads(REPORT_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model() -> realm.model.Model:
    return realm.load_model(realm.default_model_path())


@pytest.fixture(scope="module")
def heldout(report: dict[str, Any]) -> list[str]:
    spec = report["heldout"]
    path = _default.DEFAULT_MODEL_DIR / spec["file"]
    with open(path, encoding="utf-8", newline="") as f:
        return f.read().split(spec["document_separator"])


def test_path_is_package_data(report: dict[str, Any]) -> None:
    path = realm.default_model_path()
    assert path == realm.model.default_model_path()
    assert path.parent == Path(realm.__file__).parent / "model" / "default"
    assert path.name == report["file"]
    assert path.stat().st_size == report["file_bytes"] <= MAX_FILE_BYTES


def test_missing_file_is_a_model_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_default, "DEFAULT_MODEL_DIR", tmp_path)
    with pytest.raises(realm.ModelError, match="default model is missing"):
        realm.default_model_path()


def test_info_matches_the_training_report(model: realm.model.Model, report: dict[str, Any]) -> None:
    hp = report["hyperparameters"]
    info = model.info
    assert (info.arch, info.name, info.file_type, info.rope_mode) == (
        "llama", "realm-tiny", "F16", "normal",
    )  # fmt: skip
    assert info.n_layers == hp["n_layers"]
    assert info.n_embd == hp["n_embd"]
    assert info.n_heads == hp["n_heads"]
    assert info.n_kv_heads == hp["n_kv_heads"]
    assert info.head_dim == info.n_rot == hp["head_dim"]
    assert info.n_ff == hp["n_ff"]
    assert info.vocab_size == hp["vocab_size"] == report["tokenizer"]["vocab_size"]
    assert info.context_length == hp["context"]
    assert info.rope_base == hp["rope_base"]
    assert info.rms_eps == pytest.approx(hp["rms_eps"])
    assert info.n_params == report["n_params"]
    tok = model.tokenizer
    spec = report["tokenizer"]
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (spec["bos_id"], spec["eos_id"], True)
    assert tok.is_eog(spec["eos_id"])


def test_tokenizer_gives_sentencepiece_ids(
    model: realm.model.Model, report: dict[str, Any]
) -> None:
    samples = report["tokenizer"]["samples"]
    assert len(samples) >= 5
    for sample in samples:
        assert model.tokenizer.encode(sample["text"]) == sample["ids"], sample["text"]
        assert model.tokenizer.decode(sample["ids"]) == sample["text"]


def test_heldout_perplexity_matches_the_trainer(
    model: realm.model.Model, report: dict[str, Any], heldout: list[str]
) -> None:
    spec = report["heldout"]
    context = report["hyperparameters"]["context"]
    assert len(heldout) == len(report["corpus"]["heldout_documents"])
    tok = model.tokenizer
    # the trainer's stream: each document as bos + its ids + eos
    ids = [t for doc in heldout for t in [*tok.encode(doc, add_special=True), tok.eos_id]]
    assert len(ids) == spec["tokens"]  # the trainer's SentencePiece ids, token for token
    total, scored = 0.0, 0
    for start in range(0, len(ids), context):  # the trainer's windows: each a fresh context
        window = ids[start : start + context]
        if len(window) < 2:
            continue
        logits = model.logits(window)[:-1].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        total += float((log_z - logits[np.arange(len(window) - 1), window[1:]]).sum())
        scored += len(window) - 1
    assert scored == spec["scored_tokens"]
    ppl = math.exp(total / scored)
    assert ppl == pytest.approx(spec["perplexity"], rel=PPL_RTOL)


def greedy(model: realm.model.Model, prompt: str, n: int) -> list[int]:
    tok = model.tokenizer
    out: list[int] = []
    with model.open_session() as s:
        logits = s.extend(tok.encode(prompt, add_special=True))
        for _ in range(n):
            assert logits is not None
            next_id = int(np.argmax(logits))
            if tok.is_eog(next_id):
                break
            out.append(next_id)
            logits = s.extend([next_id])
    return out


def test_greedy_generation_is_english_words(model: realm.model.Model, heldout: list[str]) -> None:
    known = {w.lower() for doc in heldout for w in re.findall(r"[A-Za-z]+", doc)}
    text = " ".join(model.tokenizer.decode(greedy(model, p, GENERATED_TOKENS)) for p in PROMPTS)
    assert sum(c.isascii() for c in text) >= MIN_ASCII * len(text), text
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    assert len(words) >= 4 * len(PROMPTS), text
    assert len(set(words)) >= 10, text  # not one word over and over
    assert sum(w in known for w in words) >= MIN_KNOWN_WORDS * len(words), text


def test_greedy_generation_matches_the_trainer(
    model: realm.model.Model, report: dict[str, Any]
) -> None:
    """Realm's greedy continuations are torch's (recorded by the trainer), except where the
    F16 KV cache tips a near tie: most prompts agree on their first tokens."""
    agree = 0
    for sample in report["samples"]:
        ours = greedy(model, sample["prompt"], 16)
        agree += ours == sample["greedy_ids"][:16]
    assert agree >= len(report["samples"]) - 1


async def test_generation_through_the_default_guest_can_stop() -> None:
    """The trainer ends every document with ``</s>``, so the model learned to end a text:
    greedy generation through the default guest with repeat penalty 1.1 (plain greedy loops)
    stops before ``max_tokens`` on some prompts. (The 1,200-step model trained without
    ``</s>`` ran every call to ``max_tokens``.)"""
    results = []
    with trio.fail_after(GUEST_LIMIT):
        async with realm.open_runtime(models={"d": realm.default_model_path()}) as rt:
            for prompt in PROMPTS:
                params = {"prompt": prompt, "max_tokens": GUEST_MAX_TOKENS, "temperature": 0,
                          "repeat_penalty": 1.1}  # fmt: skip
                results.append(await rt.call("t", "generate", params))
    stopped = [r for r in results if r["finish_reason"] == "stop"]
    assert stopped, results
    for r in stopped:
        assert r["usage"]["completion_tokens"] < GUEST_MAX_TOKENS, r
        assert re.search(r"[A-Za-z]+ [A-Za-z]+", r["text"]), r  # words, not only a newline


def test_llama_cpp_agrees(model: realm.model.Model, heldout: list[str]) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    path = realm.default_model_path()
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False
    )
    tok = model.tokenizer
    for text in (*TEXTS, heldout[0][:2000], heldout[-1][-2000:]):
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        assert tok.encode(text, add_special=True) == theirs, text[:60]
    ids = tok.encode(heldout[1], add_special=True)[:200]
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    ours = model.logits(ids)
    assert float(np.abs(ours - theirs).max() / np.abs(theirs).max()) < LLAMA_CPP_RTOL
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.99
