"""A guest's metadata and the JSON schemas of its functions' params, checked and made safe.

A guest writes the schemas its callers' params are validated against, so a schema is guest
input: it is checked when the instance loads, and whatever it asks of the host must cost at
most linear time in the params. ``pattern`` (a regex) is the hole: Python's ``re`` backtracks
(``^(a+)+$`` spins for seconds holding the GIL). So:

- every ``pattern`` is parsed at load time and refused (GuestABIError) when it holds what
  makes backtracking blow up: a repeat inside a repeat, an alternation inside a repeat,
  backreferences, lookarounds, conditionals, counted repeats over ``MAX_REPEAT_COUNT``;
- what passes is matched with the ``regex`` engine, which releases the GIL while it matches,
  under a time limit linear in the string's length (``PATTERN_SECONDS_*``), past which the
  call fails with GUEST_TRAP naming the pattern;
- ``patternProperties`` is refused (jsonschema matches it with ``re`` in several places).
"""

from __future__ import annotations

import functools
import json
import re
import re._constants as sre_constants
import re._parser as sre_parse
from collections.abc import Iterator
from typing import Any, Final

import jsonschema
import regex

from .._errors import GuestABIError, GuestError

MAX_METADATA_BYTES: Final = 1 << 20
MAX_PATTERN_CHARS: Final = 1000
MAX_REPEAT_COUNT: Final = 1000  # {m,n} with n above this is refused
PATTERN_SECONDS_BASE: Final = 0.05  # a pattern match may take this long ...
PATTERN_SECONDS_PER_CHAR: Final = 1e-6  # ... plus this per character of the string
MAX_FUNCTION_NAME_CHARS: Final = 128

_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT}
_REFUSED = {
    sre_constants.GROUPREF: "a backreference",
    sre_constants.GROUPREF_EXISTS: "a conditional",
    sre_constants.ASSERT: "a lookaround",
    sre_constants.ASSERT_NOT: "a lookaround",
}


def _walk(items: Any, in_repeat: bool) -> Iterator[str]:
    """Why a parsed pattern may backtrack super-linearly (nothing: it may not)."""
    for op, arg in items:
        if op in _REFUSED:
            yield _REFUSED[op]
        elif op in _REPEATS:
            _lo, hi, sub = arg
            if hi != sre_constants.MAXREPEAT and hi > MAX_REPEAT_COUNT:
                yield f"a counted repeat over {MAX_REPEAT_COUNT}"
            many = hi == sre_constants.MAXREPEAT or hi > 1
            if many and in_repeat:
                yield "a repeat inside a repeat"
            yield from _walk(sub, in_repeat or many)
        elif op == sre_constants.BRANCH:
            if in_repeat:
                yield "an alternation inside a repeat"
            for alt in arg[1]:
                yield from _walk(alt, in_repeat)
        elif op == sre_constants.SUBPATTERN:
            yield from _walk(arg[-1], in_repeat)
        elif op == sre_constants.ATOMIC_GROUP:
            yield from _walk(arg, in_repeat)


def check_pattern(pattern: Any) -> str | None:
    """Why ``pattern`` is refused as a guest's schema regex (None: it is accepted)."""
    if not isinstance(pattern, str):
        return "it is not a string"
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"it is longer than {MAX_PATTERN_CHARS} characters"
    try:
        parsed = sre_parse.parse(pattern)
        regex.compile(pattern)
    except (re.error, regex.error, RecursionError, OverflowError) as e:
        return f"it does not compile: {e}"
    for why in _walk(parsed, False):
        return f"it holds {why} (super-linear backtracking)"
    return None


def _schema_problems(schema: Any, where: str, depth: int = 0) -> Iterator[str]:
    if depth > 64:
        yield f"{where}: nested too deeply"
        return
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "pattern":
                why = check_pattern(value)
                if why:
                    yield f"{where}.pattern {str(value)[:80]!r}: {why}"
            elif key == "patternProperties" and isinstance(value, dict):
                yield f"{where}.patternProperties is not supported (use properties)"
            else:
                yield from _schema_problems(value, f"{where}.{key}", depth + 1)
    elif isinstance(schema, list):
        for i, item in enumerate(schema):
            yield from _schema_problems(item, f"{where}[{i}]", depth + 1)


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Any:
    return regex.compile(pattern)


def safe_search(pattern: str, text: str) -> bool:
    """``re.search`` semantics, in the ``regex`` engine, off the GIL, under a time limit."""
    limit = PATTERN_SECONDS_BASE + PATTERN_SECONDS_PER_CHAR * len(text)
    try:
        return _compiled(pattern).search(text, timeout=limit, concurrent=True) is not None
    except TimeoutError:
        raise GuestError(
            f"the guest's schema pattern {pattern[:80]!r} took over {limit:.3g} s on a string "
            f"of {len(text)} characters"
        ) from None


def _pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not safe_search(patrn, instance):
        yield jsonschema.ValidationError(f"{instance[:80]!r} does not match {patrn!r}")


ParamsValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, validators={"pattern": _pattern}
)


def read_metadata(raw: bytes, exports: list[str], label: str) -> dict[str, Any]:
    """Parse and check a guest's metadata JSON (GuestABIError naming what is wrong)."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise GuestABIError(f"{label}: unreadable metadata: {e!r}") from e
    fns = meta.get("functions") if isinstance(meta, dict) else None
    if not isinstance(fns, list) or not all(
        isinstance(f, dict) and isinstance(f.get("name"), str) for f in fns
    ):
        raise GuestABIError(f"{label}: metadata needs a 'functions' list")
    known = set(exports)
    for f in fns:
        name = f["name"]
        if name not in known:
            raise GuestABIError(
                f"{label}: metadata names {name[:MAX_FUNCTION_NAME_CHARS]!r} but the module "
                f"does not export realm_fn_{name[:MAX_FUNCTION_NAME_CHARS]}"
            )
        schema = f.get("params", {"type": "object"})
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as e:
            raise GuestABIError(f"{label}: bad schema for {name!r}: {e.message}") from e
        except RecursionError:
            raise GuestABIError(f"{label}: schema of {name!r} is nested too deeply") from None
        for problem in _schema_problems(schema, "params"):
            raise GuestABIError(f"{label}: schema of {name!r}: {problem}")
    return meta


def validators(meta: dict[str, Any], label: str) -> dict[str, Any]:
    """A params validator per function, each tried once on ``{}`` (a schema that cannot even
    be applied is refused now, not at the first call)."""
    out = {}
    for f in meta["functions"]:
        v = ParamsValidator(f.get("params", {"type": "object"}))
        try:
            list(v.iter_errors({}))
        except Exception as e:
            raise GuestABIError(f"{label}: schema of {f['name']!r} is unusable: {e}") from e
        out[f["name"]] = v
    return out
