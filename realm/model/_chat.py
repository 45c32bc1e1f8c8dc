"""Chat templates: the model's Jinja template (``tokenizer.chat_template``) rendered in a sandbox.

The environment is the one Hugging Face ``transformers`` renders chat templates with, so that a
template written for it gives the same prompt here: an immutable sandbox, ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception(message)``,
``strftime_now(format)`` and a ``tojson`` filter that keeps non-ASCII characters as they are.
Templates come from model files, so rendering is also bounded: string and list repetition and
powers are size-checked, ``range`` is capped by the sandbox and the output length is capped.
"""

from __future__ import annotations

import datetime
import functools
import json
import operator
from collections.abc import Mapping, Sequence
from typing import Any, Final, NoReturn

import jinja2
import jinja2.ext
import jinja2.sandbox

from .._errors import TokenizerError

#: the ChatML template, for models without one of their own (pass it as ``template=``)
CHATML_TEMPLATE: Final = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: longest prompt a template may render
MAX_CHAT_PROMPT_CHARS: Final = 1 << 22  # 4 Mi characters
#: largest string or list a template expression may build by repetition
MAX_TEMPLATE_VALUE_LEN: Final = 1 << 20  # 1 Mi items
#: compiled templates kept (one per distinct template source)
TEMPLATE_CACHE_ENTRIES: Final = 16


class _TemplateException(Exception):
    """Raised by a template's ``raise_exception``."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateException(message)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _ChatEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "*":
            for seq, count in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(count, int)
                if sized and len(seq) * max(count, 0) > MAX_TEMPLATE_VALUE_LEN:
                    raise _TemplateException("repetition too large")
            return operator.mul(left, right)
        if operator_ == "**":
            if isinstance(right, int) and abs(right) > 1024:
                raise _TemplateException("exponent too large")
            return operator.pow(left, right)
        return super().call_binop(context, operator_, left, right)


def _environment() -> jinja2.Environment:
    env = _ChatEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENVIRONMENT: Final = _environment()


@functools.lru_cache(maxsize=TEMPLATE_CACHE_ENTRIES)
def _compile(source: str) -> jinja2.Template:
    return _ENVIRONMENT.from_string(source)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate chat messages: a sequence of mappings, each with a string ``role``."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise TokenizerError(
            f"messages must be a list of {{'role': ..., 'content': ...}} mappings, "
            f"not {type(messages).__name__}"
        )
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(f"messages[{i}] must be a mapping, not {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str):
            raise TokenizerError(f"messages[{i}]['role'] must be a str, not {type(role).__name__}")
        checked.append(dict(message))
    return checked


def render_chat(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    variables: Mapping[str, Any],
    where: str,
) -> str:
    """Render the template ``source``; TokenizerError, naming ``where``, with the reason on failure.

    Args:
        source: the Jinja template text.
        messages: the validated chat messages.
        add_generation_prompt: end with the header of an assistant turn.
        variables: more template variables (``bos_token``, ``eos_token``, ``tools``, ...).
        where: what the template is, for error messages (file and metadata key).
    """
    try:
        template = _compile(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(
            f"{where}: chat template does not compile: {exc.message} (line {exc.lineno})"
        ) from exc
    context = {
        **variables,
        "messages": messages,
        "add_generation_prompt": add_generation_prompt,
    }
    chunks: list[str] = []
    size = 0
    try:
        for chunk in template.generate(context):
            size += len(chunk)
            if size > MAX_CHAT_PROMPT_CHARS:
                raise _TemplateException(f"prompt longer than {MAX_CHAT_PROMPT_CHARS} characters")
            chunks.append(chunk)
    except _TemplateException as exc:
        raise TokenizerError(f"{where}: chat template raised an error: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise TokenizerError(f"{where}: chat template failed: {type(exc).__name__}: {exc}") from exc
    except (
        ArithmeticError,
        LookupError,
        TypeError,
        ValueError,
        AttributeError,
        RecursionError,
    ) as exc:
        raise TokenizerError(f"{where}: chat template failed: {type(exc).__name__}: {exc}") from exc
    return "".join(chunks)
