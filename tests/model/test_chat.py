"""Chat templates: the llama-2, llama-3, ChatML and Zephyr families, and templates that fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tokenizer_fixtures as fx

from realm import TokenizerError
from realm.model._chat import CHATML_TEMPLATE
from realm.model._tokenizer import Tokenizer

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
# Zephyr's template is written over several lines: trim_blocks/lstrip_blocks matter here
ZEPHYR_TEMPLATE = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Is the light on?"},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": " Why? "},
]


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("spm") / "llama2.gguf"
    return fx.trained_spm(path, chat_template=LLAMA2_TEMPLATE)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("bpe") / "llama3.gguf"
    return fx.trained_bpe(path, chat_template=LLAMA3_TEMPLATE)


def test_llama2(spm: Tokenizer) -> None:
    assert spm.chat_template == LLAMA2_TEMPLATE
    assert spm.apply_chat_template(CONVERSATION) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nIs the light on? [/INST] Yes. </s>"
        "<s>[INST] Why? [/INST]"
    )


def test_llama3(bpe: Tokenizer) -> None:
    assert bpe.apply_chat_template(CONVERSATION) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nIs the light on?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nYes.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert bpe.apply_chat_template(CONVERSATION[:2], add_generation_prompt=False).endswith(
        "Is the light on?<|eot_id|>"
    )


def test_chatml(bpe: Tokenizer) -> None:
    prompt = bpe.apply_chat_template(CONVERSATION[:2], template=CHATML_TEMPLATE)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nIs the light on?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = bpe.encode(prompt, parse_special=True)
    assert ids.count(bpe.text_to_token("<|im_start|>")) == 3
    assert ids.count(bpe.text_to_token("<|im_end|>")) == 2
    assert bpe.decode(ids, render_special=True) == prompt


def test_zephyr(spm: Tokenizer) -> None:
    assert spm.apply_chat_template(CONVERSATION[:2], template=ZEPHYR_TEMPLATE) == (
        "<|system|>\nBe brief.</s>\n<|user|>\nIs the light on?</s>\n<|assistant|>\n"
    )


def test_extra_variables_and_tojson(bpe: Tokenizer) -> None:
    template = "{{ tools | tojson }}|{{ messages[0]['content'] }}|{{ bos_token }}"
    tools = [{"name": "café", "args": {"n": 1}}]
    prompt = bpe.apply_chat_template(CONVERSATION[:1], template=template, tools=tools)
    assert prompt == '[{"name": "café", "args": {"n": 1}}]|Be brief.|<|begin_of_text|>'


def test_role_alternation_error(spm: Tokenizer) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TokenizerError, match="roles must alternate") as info:
        spm.apply_chat_template(messages)
    assert "tokenizer.chat_template" in str(info.value) and spm.path in str(info.value)


def test_no_template(tmp_path: Path) -> None:
    tok = fx.trained_spm(tmp_path / "v.gguf")
    with pytest.raises(TokenizerError, match="no chat template") as info:
        tok.apply_chat_template(CONVERSATION)
    assert info.value.field == "tokenizer.chat_template"
    assert tok.apply_chat_template(CONVERSATION[1:2], template=CHATML_TEMPLATE).startswith(
        "<|im_start|>user\n"
    )


FAILING = {
    "syntax": ("{% for m in messages %}", "does not compile"),
    "unknown filter": ("{{ messages | nosuchfilter }}", "does not compile"),
    "sandbox": ("{{ ''.__class__.__mro__ }}", "SecurityError"),
    "mutation": ("{{ messages.append(1) }}", "SecurityError"),
    "undefined call": ("{{ nothing() }}", "UndefinedError"),
    "type error": ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    "division": ("{{ 1 // 0 }}", "ZeroDivisionError"),
    "repetition": ("{{ 'x' * 10000000000 }}", "repetition too large"),
    "power": ("{{ 10 ** 100000 }}", "exponent too large"),
    "range": ("{% for i in range(10 ** 9) %}{% endfor %}", "Range too big"),
    "long output": ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "longer than"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
}


@pytest.mark.parametrize(("template", "reason"), FAILING.values(), ids=FAILING.keys())
def test_failing_templates(bpe: Tokenizer, template: str, reason: str) -> None:
    with pytest.raises(TokenizerError, match=reason):
        bpe.apply_chat_template(CONVERSATION, template=template)


BAD_MESSAGES = {
    "not a list": ("hello", "messages must be a list"),
    "mapping": ({"role": "user"}, "messages must be a list"),
    "not mappings": (["hello"], r"messages\[0\] must be a mapping"),
    "no role": ([{"content": "x"}], r"messages\[0\]\['role'\] must be a str"),
    "role not str": ([{"role": 1, "content": "x"}], r"\['role'\] must be a str"),
}


@pytest.mark.parametrize(("messages", "reason"), BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_bad_messages(bpe: Tokenizer, messages: Any, reason: str) -> None:
    with pytest.raises(TokenizerError, match=reason):
        bpe.apply_chat_template(messages)


def test_bad_arguments(bpe: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="add_generation_prompt must be a bool"):
        bpe.apply_chat_template(CONVERSATION, add_generation_prompt="yes")  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="template must be a str"):
        bpe.apply_chat_template(CONVERSATION, template=5)  # type: ignore[arg-type]
