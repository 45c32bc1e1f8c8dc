"""The ``realm`` command line: each subcommand on a tiny model, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import realm
from realm.cli import main
from realm.sandbox import CallContext, GuestInstance, SandboxEngine, TenantState
from realm.testing import write_test_model

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
