"""Hypothesis strategies for testing guests and apps that embed Realm.

``params_for(schema)`` draws call parameters that a function's JSON schema accepts (the subset
of JSON Schema guests use: objects with typed properties, ranges, lengths, enums, arrays);
``invalid_params_for(schema)`` draws parameters it rejects, each wrong in one named way.
``protocol_calls`` and ``protocol_messages`` draw protocol v1 client messages, well-formed and
hostile, for testing servers and clients.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from hypothesis import strategies as st

# unbounded integers would make a guest generate for ever: cap what a test asks for
DEFAULT_INT_CAP = 64
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


def _number(schema: Mapping[str, Any], *, integer: bool, cap: int) -> st.SearchStrategy[Any]:
    lo = schema.get("minimum")
    hi = schema.get("maximum")
    xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if integer:
        lo_i = math.ceil(lo) if lo is not None else -cap
        if xlo is not None:
            lo_i = max(lo_i, math.floor(xlo) + 1)
        hi_i = math.floor(hi) if hi is not None else max(lo_i, 0) + cap
        if xhi is not None:
            hi_i = min(hi_i, math.ceil(xhi) - 1)
        return st.integers(lo_i, max(lo_i, min(hi_i, lo_i + cap)))
    lo_f = float(lo) if lo is not None else -1e3
    hi_f = float(hi) if hi is not None else 1e3
    return st.floats(
        min_value=float(xlo) if xlo is not None else lo_f,
        max_value=float(xhi) if xhi is not None else hi_f,
        exclude_min=xlo is not None,
        exclude_max=xhi is not None,
        allow_nan=False,
        allow_infinity=False,
    )


def value_for(schema: Mapping[str, Any], *, cap: int = DEFAULT_INT_CAP) -> st.SearchStrategy[Any]:
    """Values the (sub)schema accepts."""
    if "enum" in schema:
        return st.sampled_from(list(schema["enum"]))
    t = schema.get("type")
    if isinstance(t, list):
        return st.one_of(*(value_for({**schema, "type": one}, cap=cap) for one in t))
    if t == "string":
        lo, hi = schema.get("minLength", 0), min(schema.get("maxLength", 40), 40)
        return st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=lo,
                       max_size=max(lo, hi))  # fmt: skip
    if t == "integer":
        return _number(schema, integer=True, cap=cap)
    if t == "number":
        return _number(schema, integer=False, cap=cap)
    if t == "boolean":
        return st.booleans()
    if t == "null":
        return st.none()
    if t == "array":
        items = schema.get("items", {"type": "string"})
        lo = schema.get("minItems", 0)
        return st.lists(value_for(items, cap=cap), min_size=lo,
                        max_size=max(lo, min(schema.get("maxItems", 4), 4)))  # fmt: skip
    if t == "object":
        return params_for(schema, cap=cap)
    return st.one_of(st.none(), st.booleans(), st.integers(-cap, cap), TEXT)


def params_for(
    schema: Mapping[str, Any],
    *,
    cap: int = DEFAULT_INT_CAP,
    overrides: Mapping[str, st.SearchStrategy[Any]] | None = None,
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects the schema accepts: every required property, any subset of the optional ones.

    ``overrides`` replaces the strategy of named properties (e.g. a small ``max_tokens``).
    """
    props: Mapping[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", ()))
    over = dict(overrides or {})
    fields = {k: over.get(k, value_for(v, cap=cap)) for k, v in props.items()}
    req = {k: s for k, s in fields.items() if k in required}
    opt = {k: s for k, s in fields.items() if k not in required}
    return st.fixed_dictionaries(req, optional=opt)


def invalid_params_for(schema: Mapping[str, Any]) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """(name of what is wrong, params) pairs the schema rejects."""
    props: Mapping[str, Any] = schema.get("properties", {})
    required = list(schema.get("required", ()))
    wrong_type = {
        "string": st.integers(),
        "integer": st.one_of(TEXT, st.booleans(), st.floats(allow_nan=False).filter(
            lambda f: not float(f).is_integer())),
        "number": st.one_of(TEXT, st.booleans()),
        "boolean": st.one_of(st.integers(), TEXT),
        "array": st.one_of(st.integers(), TEXT),
        "object": st.one_of(st.integers(), TEXT),
    }  # fmt: skip
    options: list[st.SearchStrategy[tuple[str, dict[str, Any]]]] = []
    base = params_for(schema)
    for name, sub in props.items():
        t = sub.get("type")
        if isinstance(t, str) and t in wrong_type:
            options.append(
                st.tuples(base, wrong_type[t]).map(lambda bv, n=name: (n, {**bv[0], n: bv[1]}))
            )
    for name in required:
        options.append(base.map(lambda p, n=name: (n, {k: v for k, v in p.items() if k != n})))
    if schema.get("additionalProperties") is False:
        options.append(base.map(lambda p: ("zz_unknown", {**p, "zz_unknown": 1})))
    if not options:
        return st.nothing()
    return st.one_of(options)


# --- protocol v1 messages (docs/protocol.md) -----------------------------------------------------

_IDS = st.one_of(st.text(min_size=1, max_size=12), st.integers(min_value=0, max_value=2**53 - 1))
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False,
                                                                          allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def protocol_calls(
    functions: Mapping[str, Mapping[str, Any]] | None = None,
) -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed ``call`` messages: a function of ``functions`` (name -> params schema, e.g.
    from ``system_metadata``) with params its schema accepts, or a system function."""
    system = st.sampled_from(["system_health", "system_models", "system_metadata"]).map(
        lambda f: (f, st.just({}))
    )
    if functions:
        user = st.sampled_from(sorted(functions)).map(lambda f: (f, params_for(functions[f])))
        pick = st.one_of(system, user)
    else:
        pick = system
    return pick.flatmap(
        lambda fp: st.builds(
            lambda i, params: {"type": "call", "id": i, "function": fp[0], "params": params},
            _IDS,
            fp[1],
        )
    )


def protocol_messages(
    functions: Mapping[str, Mapping[str, Any]] | None = None,
) -> st.SearchStrategy[str]:
    """Text frames a careless or hostile client sends: well-formed calls and cancels, messages
    with missing, wrong or unknown fields, JSON that is not an object, and text that is not
    JSON. A server must answer each (or, for a cancel, ignore it) and keep serving."""
    wrong_field = st.builds(
        lambda base, key, value: {**base, key: value},
        protocol_calls(functions),
        st.sampled_from(["type", "id", "function", "params", "tenant_id", "extra"]),
        _JSON,
    )
    missing = st.builds(
        lambda base, key: {k: v for k, v in base.items() if k != key},
        protocol_calls(functions),
        st.sampled_from(["type", "id", "function"]),
    )
    cancels = st.builds(lambda i: {"type": "cancel", "id": i}, _IDS)
    objects = st.one_of(protocol_calls(functions), wrong_field, missing, cancels)
    return st.one_of(
        objects.map(lambda m: json.dumps(m, ensure_ascii=False)),
        _JSON.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
        TEXT,
    )
