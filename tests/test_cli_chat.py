"""``realm chat``: piped turns on a test model with a chat template, flags, and the errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import realm
from realm.model._chat import CHATML_TEMPLATE
from realm.sandbox import GuestInstance, SandboxEngine, TenantState, default_guest_path
from realm.testing import models as test_models
from realm.testing import write_test_model

TURN_TIMEOUT = 120  # seconds for a whole chat process
REPLY_TOKENS = 8
SAMPLING = ["--temperature", "0", "-n", str(REPLY_TOKENS)]


class _TemplateWriter(test_models.GGUFWriter):
    """The test model's writer, adding a ChatML template to the file's metadata."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_chat_template(CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def chat_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_models, "GGUFWriter", _TemplateWriter)
        path = write_test_model(tmp_path_factory.mktemp("chat") / "chat.gguf")
    assert realm.load_tokenizer(path).chat_template == CHATML_TEMPLATE
    return path


def reply(path: Path, messages: list[dict[str, str]]) -> str:
    """The default guest's greedy reply to the whole conversation, in a fresh instance."""
    model = realm.load_model(path)
    with SandboxEngine() as engine:
        tenant = TenantState("t", {"m": model})
        try:
            guest = GuestInstance(engine, engine.compile(default_guest_path()), tenant)
            params = {"messages": messages, "temperature": 0, "max_tokens": REPLY_TOKENS}
            return str(guest.call("chat", params)["text"])
        finally:
            tenant.close()


def chat(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "realm.cli", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TURN_TIMEOUT,
        check=False,
    )


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_two_turns_keep_the_conversation(chat_model_path: Path) -> None:
    proc = chat("--model", str(chat_model_path), *SAMPLING, stdin="Hello there\nHow are you?\n")
    assert proc.returncode == 0, proc.stderr
    first = reply(chat_model_path, [user("Hello there")])
    second = reply(
        chat_model_path,
        [user("Hello there"), {"role": "assistant", "content": first}, user("How are you?")],
    )
    assert first and second
    assert second != reply(chat_model_path, [user("How are you?")])  # the history matters
    assert proc.stdout == f"{first}\n{second}\n"
    assert "Traceback" not in proc.stderr


def test_system_message_blank_lines_and_exit(chat_model_path: Path) -> None:
    system = {"role": "system", "content": "Answer in French."}
    proc = chat(
        "--model", str(chat_model_path), "--system", system["content"], *SAMPLING,
        stdin="\n  \nHello there\n/exit\nnot read\n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    want = reply(chat_model_path, [system, user("Hello there")])
    assert want != reply(chat_model_path, [user("Hello there")])  # the system message matters
    assert proc.stdout == f"{want}\n"


def test_last_line_without_a_newline_is_a_turn(chat_model_path: Path) -> None:
    proc = chat("--model", str(chat_model_path), *SAMPLING, stdin="Hello there")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reply(chat_model_path, [user("Hello there")]) + "\n"


def test_sampling_flags_reach_the_chat(chat_model_path: Path) -> None:
    greedy = chat("--model", str(chat_model_path), *SAMPLING, stdin="Hello there\n")
    top1 = chat(
        "--model", str(chat_model_path), "--temperature", "1.5", "--top-k", "1", "--seed", "5",
        "-n", str(REPLY_TOKENS), stdin="Hello there\n",
    )  # fmt: skip
    hot = chat(
        "--model", str(chat_model_path), "--temperature", "3", "--top-k", "0", "--top-p", "1",
        "--min-p", "0", "--seed", "5", "-n", str(REPLY_TOKENS), stdin="Hello there\n",
    )  # fmt: skip
    assert greedy.returncode == top1.returncode == hot.returncode == 0
    assert top1.stdout == greedy.stdout != hot.stdout


@pytest.mark.parametrize("which", ["test model", "built-in"])
def test_a_model_without_a_chat_template_is_a_clear_error(which: str, tmp_path: Path) -> None:
    args = (
        ["--model", str(write_test_model(tmp_path / "plain.gguf"))] if which != "built-in" else []
    )
    proc = chat(*args, stdin="Hello\n")
    assert proc.returncode == 1
    assert "has no chat template" in proc.stderr and "realm generate" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_an_out_of_range_flag_is_the_guests_invalid_params(chat_model_path: Path) -> None:
    proc = chat("--model", str(chat_model_path), "--top-p", "3", stdin="Hello there\n")
    assert proc.returncode == 1 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("realm chat:")]
    assert errors == ["realm chat: chat: top_p: 3.0 is greater than the maximum of 1"]


def test_a_refused_turn_is_reported_and_the_chat_goes_on(chat_model_path: Path) -> None:
    too_long = "word " * 2000  # the test model's context is 256 tokens
    proc = chat("--model", str(chat_model_path), *SAMPLING, stdin=f"{too_long}\nHello there\n")
    assert proc.returncode == 1  # a turn failed
    assert "context" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == reply(chat_model_path, [user("Hello there")]) + "\n"
