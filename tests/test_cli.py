"""The ``realm`` command line: each subcommand on a tiny model, and bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import realm
from realm.cli import SAMPLING_FLAGS, build_parser, main
from realm.sandbox import (
    CallContext,
    GuestInstance,
    SandboxEngine,
    TenantState,
    default_guest_path,
)
from realm.sandbox._context import direct_forward
from realm.testing import write_test_model

ARGMAX_PROMPTS = ("The", "If the", "A list is")
ARGMAX_STEPS = 32

# the SDK header's own minimal example: a tenant's runtime in a few lines of C
ECHO_GUEST = r"""
#include "realm_guest.h"
static const rg_param echo_params[] = {
    {.name = "text", .type = RG_P_STRING, .required = 1, .description = "what to echo"},
};
static int echo(rg_call *c) {
    int n;
    const char *s = rg_param_str(c, "text", &n);
    realm_emit(s, n);
    rg_buf out = rg_buf_in(c->arena);
    rg_buf_fmt(&out, "{\"text\":%.*q}", n, s);
    return rg_result(c, &out);
}
static const rg_function fn_echo = {"echo", "Echo the text back.", 1, echo_params,
                                    RG_COUNT(echo_params), echo};
static const rg_function *const fns[] = {&fn_echo};
static const rg_module mod = {"echo-guest", "1", "An example.", fns, RG_COUNT(fns)};
RG_MODULE(mod)
RG_EXPORT_FUNCTION(echo, mod, fn_echo)
"""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("cli") / "tiny.gguf")


def test_generate_streams_and_reports(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["generate", "--model", str(model_path), "-n", "5", "--temperature", "0", "Hi"]) == 0
    )
    out, err = capsys.readouterr()
    assert "5 completion tokens" in err and "[length" in err
    assert out.strip()


def test_tokenize_json(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "--model", str(model_path), "--json", "hello world"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["tokens"] == realm.load_tokenizer(model_path).encode("hello world")


def test_info(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(model_path)]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "llama"


def test_missing_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(tmp_path / "nope.gguf")]) == 2
    assert "no such model file" in capsys.readouterr().err


def test_guest_build_makes_a_runnable_guest(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "echo.c"
    src.write_text(ECHO_GUEST)
    rc = main(["guest", "build", str(src), "-o", str(tmp_path / "echo.wasm")])
    err = capsys.readouterr().err
    assert rc == 0, err
    with SandboxEngine() as engine:
        inst = GuestInstance(engine, engine.compile(tmp_path / "echo.wasm"), TenantState("t", {}))
        chunks: list[str] = []
        res = inst.call("echo", {"text": "héllo"}, CallContext(on_emit=chunks.append))
        assert res == {"text": "héllo"} and chunks == ["héllo"]
        with pytest.raises(realm.InvalidParams, match="text"):
            inst.call("echo", {})


def test_guest_build_reports_compiler_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "broken.c"
    src.write_text("int main( {\n")
    assert main(["guest", "build", str(src)]) == 1
    assert "broken.c" in capsys.readouterr().err


# --- temperature 0 is the argmax (llama.cpp's defaults: no repeat penalty unless asked) ------


def argmax_path(model: realm.model.Model, prompt: str, n: int) -> list[int]:
    """Greedy ids by recomputing ``model.logits`` over the whole sequence at every step."""
    ids = model.tokenizer.encode(prompt, add_special=True)
    out: list[int] = []
    for _ in range(n):
        t = int(np.argmax(model.logits(ids + out)[-1]))
        out.append(t)
        if model.tokenizer.is_eog(t):
            break
    return out


def guest_generate(
    model: realm.model.Model, prompt: str, params: dict[str, Any]
) -> tuple[dict[str, Any], list[int]]:
    """The default guest's generate on ``model``: its result and the ids it sampled, read off
    the tokens it forwards (all but the last sampled one, which is never forwarded)."""
    fed: list[int] = []

    def forward(m: realm.model.Model, work: Sequence[tuple[Any, np.ndarray, str]]) -> list[Any]:
        for _, tokens, _ in work:
            fed.extend(int(t) for t in tokens)
        return direct_forward(m, work)

    with SandboxEngine() as engine:
        tenant = TenantState("t", {"m": model}, forward=forward)
        try:
            guest = GuestInstance(engine, engine.compile(default_guest_path()), tenant)
            result = guest.call("generate", {"prompt": prompt, **params})
        finally:
            tenant.close()
    n_prompt = len(model.tokenizer.encode(prompt, add_special=True))
    return result, fed[n_prompt:]


@pytest.mark.parametrize("which", ["built-in", "test model"])
def test_temperature_0_is_the_argmax_at_every_step(which: str, model_path: Path) -> None:
    model = realm.load_model(realm.default_model_path() if which == "built-in" else model_path)
    penalised_differs = False
    for prompt in ARGMAX_PROMPTS:
        want = argmax_path(model, prompt, ARGMAX_STEPS)
        result, got = guest_generate(model, prompt, {"max_tokens": ARGMAX_STEPS, "temperature": 0})
        assert result["usage"]["completion_tokens"] == len(want), prompt
        assert got == want[: len(want) - 1], prompt  # the last sampled id is not forwarded
        text_ids = [t for t in want if not model.tokenizer.is_eog(t)]
        assert result["text"] in (
            model.tokenizer.decode(text_ids),
            model.tokenizer.decode(text_ids, strip_prefix_space=False),
        ), prompt
        _, penalised = guest_generate(
            model, prompt, {"max_tokens": ARGMAX_STEPS, "temperature": 0, "repeat_penalty": 1.1}
        )
        penalised_differs |= penalised != got
    if which == "built-in":  # the small model loops, so the old default (1.1) left the argmax
        assert penalised_differs


def test_generate_temperature_0_prints_the_argmax_text(capsys: pytest.CaptureFixture[str]) -> None:
    model = realm.load_model(realm.default_model_path())
    want = [t for t in argmax_path(model, "A list is", 24) if not model.tokenizer.is_eog(t)]
    assert len(want) == 24  # the small model loops rather than stop here
    assert main(["generate", "-n", "24", "--temperature", "0", "A list is"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip("\n") in (
        model.tokenizer.decode(want),
        model.tokenizer.decode(want, strip_prefix_space=False),
    )


# --- sampling flags ------------------------------------------------------------------------------


def test_sampling_flags_reach_the_guest_only_when_given() -> None:
    from realm.cli import _sampling_params

    parser = build_parser()
    assert _sampling_params(parser.parse_args(["generate", "x"])) == {}
    args = parser.parse_args(
        ["generate", "--temperature", "0.5", "--top-k", "7", "--top-p", "0.9", "--min-p", "0.1",
         "--repeat-penalty", "1.3", "--seed", "4", "x"]
    )  # fmt: skip
    assert _sampling_params(args) == {
        "temperature": 0.5, "top_k": 7, "top_p": 0.9, "min_p": 0.1, "repeat_penalty": 1.3,
        "seed": 4,
    }  # fmt: skip
    chat = parser.parse_args(["chat", "--top-k", "3", "--repeat-penalty", "1.0"])
    assert _sampling_params(chat) == {"top_k": 3, "repeat_penalty": 1.0}


def test_sampling_flag_help_gives_the_guests_defaults() -> None:
    with SandboxEngine() as engine:
        inst = GuestInstance(engine, engine.compile(default_guest_path()), TenantState("t", {}))
        props = next(f for f in inst.functions() if f["name"] == "generate")["params"]
    for flag, param, _, help_ in SAMPLING_FLAGS:
        default = props["properties"][param].get("default")
        if default is not None:
            assert f"(default {default:g}" in help_, (flag, default)


def test_sampling_flags_change_the_text(capsys: pytest.CaptureFixture[str]) -> None:
    def text(*flags: str) -> str:  # on the built-in model
        assert main(["generate", "-n", "20", *flags, "If the"]) == 0
        return capsys.readouterr().out

    greedy = text("--temperature", "0")
    assert text("--temperature", "1.5", "--top-k", "1", "--seed", "3") == greedy  # top-k 1
    assert text("--temperature", "1.5", "--min-p", "1", "--seed", "3") == greedy  # only the max
    hot = [text("--temperature", "2", "--top-k", "0", "--top-p", "1", "--min-p", "0",
                "--seed", str(seed)) for seed in (1, 2, 1)]  # fmt: skip
    assert hot[0] == hot[2] != hot[1] and greedy not in hot
    assert text("--temperature", "0", "--repeat-penalty", "1.1") != greedy


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--top-k", "x"], "argument --top-k: invalid int value: 'x'"),
        (["--top-p", "nan"], "argument --top-p: not a finite number: 'nan'"),
        (["--temperature", "warm"], "argument --temperature: not a number: 'warm'"),
        (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    ],
)
def test_malformed_flag_values_are_argparse_errors(
    model_path: Path, flags: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["generate", "--model", str(model_path), *flags, "Hi"],
                    ["chat", "--model", str(model_path), *flags]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"error: {needle}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--top-p", "1.5"], "top_p: 1.5 is greater than the maximum of 1"),
        (["--min-p", "-0.1"], "min_p: -0.1 is less than the minimum of 0"),
        (["--repeat-penalty", "0"], "repeat_penalty: 0.0 is less than or equal to the minimum"),
        (["--temperature", "-1"], "temperature: -1.0 is less than the minimum of 0"),
        (["--top-k", "-2"], "top_k: -2 is less than the minimum of 0"),
    ],
)
def test_out_of_range_values_are_the_guests_invalid_params(
    model_path: Path, flags: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--model", str(model_path), *flags, "Hi"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("realm generate:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_ctrl_c_cancels_generation_cleanly(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "long.gguf", context_length=4096)
    proc = subprocess.Popen(
        [sys.executable, "-m", "realm.cli", "generate", "--model", str(path), "-n", "4000",
         "--temperature", "0", "Hi"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        proc.stdout.read(1)  # the reply has started streaming
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    text = err.decode()
    assert proc.returncode == 130, text
    assert "[cancelled;" in text and "Traceback" not in text


# --- tokenize: byte pieces as <0xNN> --------------------------------------------------------------


def test_tokenize_shows_byte_tokens_as_hex(capsys: pytest.CaptureFixture[str]) -> None:
    text = "日本 🙂 café"
    assert main(["tokenize", text]) == 0  # the built-in model: SentencePiece, byte fallback
    out = capsys.readouterr().out
    assert "\ufffd" not in out
    for b in "日🙂".encode():
        assert f"<0x{b:02X}>" in out
    assert "'<s>'" not in out
    assert main(["tokenize", "--json", "--add-special", text]) == 0
    got = json.loads(capsys.readouterr().out)
    tok = realm.load_tokenizer(realm.default_model_path())
    assert got["tokens"] == tok.encode(text, add_special=True)
    assert got["pieces"][0] == "<s>" and len(got["pieces"]) == got["count"]
    assert not any("\ufffd" in p for p in got["pieces"])
    assert "<0xF0>" in got["pieces"] and " caf" in "".join(got["pieces"])


def _byte_level_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the character that stands for each byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def test_tokenize_shows_partial_characters_as_hex(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A byte-level BPE vocabulary: a token may hold part of a character (here the first two
    bytes of 日, 0xE6 0x97; "a" and the first byte of é), shown byte by byte; the rest as
    text."""
    chars = _byte_level_chars()
    path = tmp_path / "bpe.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list([*chars, chars[0xE6] + chars[0x97], "a" + chars[0xC3], "<|endoftext|>"])
    w.add_token_types([1] * 258 + [3])
    w.add_token_merges([f"{chars[0xE6]} {chars[0x97]}", f"a {chars[0xC3]}"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(258)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    assert main(["tokenize", "--model", str(path), "--json", "日 aé"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["tokens"] == [256, 0xA5, 0x20, 257, 0xA9]
    assert got["pieces"] == ["<0xE6><0x97>", "<0xA5>", " ", "a<0xC3>", "<0xA9>"]
    assert main(["tokenize", "--model", str(path), "日 aé"]) == 0
    out = capsys.readouterr().out
    assert "\ufffd" not in out and "256 '<0xE6><0x97>'" in out and "257 'a<0xC3>'" in out
