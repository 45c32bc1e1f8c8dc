"""Protocol v1 parsing, server config loading and the rate-limit bucket (no sockets)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import realm
from realm import ProtocolError, kernels
from realm._protocol import (
    MAX_DEPTH,
    MAX_FUNCTION_CHARS,
    MAX_ID_CHARS,
    SAFE_INT,
    Call,
    Cancel,
    ErrorCode,
    ServerMessage,
    call_message,
    cancel_message,
    error_message,
    parse_message,
    read_server_message,
    result_message,
    stream_message,
)
from realm.client import RateLimited, RemoteError, ServerError
from realm.client._errors import BY_CODE, error_from_wire
from realm.server import ConfigError, ServerLimits, config_from_dict, hash_key, load_config, new_key
from realm.server._limits import TokenBucket
from realm.testing import write_test_model

# --- parse_message: what is accepted -----------------------------------------------------------


def test_a_call_with_every_field() -> None:
    msg = parse_message(
        '{"type":"call","id":"r1","function":"generate","params":{"prompt":"Hi"},'
        '"tenant_id":"acme"}'
    )
    assert msg == Call("r1", "generate", {"prompt": "Hi"}, "acme")


@pytest.mark.parametrize("params", ["", ',"params":null', ',"params":{}'])
def test_params_default_to_an_empty_object(params: str) -> None:
    msg = parse_message('{"type":"call","id":7,"function":"system_health"' + params + "}")
    assert msg == Call(7, "system_health", {}, None)


@pytest.mark.parametrize("call_id", [0, SAFE_INT, "x", "é" * MAX_ID_CHARS])
def test_ids_at_the_limits(call_id: Any) -> None:
    assert parse_message(json.dumps({"type": "cancel", "id": call_id})) == Cancel(call_id)


def test_unicode_and_escapes_survive() -> None:
    text = json.dumps({"type": "call", "id": "ü", "function": "f", "params": {"p": "\u2603\n\0"}})
    assert parse_message(text) == Call("ü", "f", {"p": "\u2603\n\0"})


# --- parse_message: what is refused, and how ---------------------------------------------------

DEEP = '{"type":"call","id":"d","function":"f","params":' + '{"a":' * 40 + "1" + "}" * 41
REFUSED = [
    # text that is not a JSON object: no id can be read
    ("", "not valid JSON", None),
    ("{", "not valid JSON", None),
    ("hello", "not valid JSON", None),
    ('{"type":"call"} trailing', "not valid JSON", None),
    ("[1, 2]", "JSON object, not list", None),
    ('"call"', "JSON object, not str", None),
    ("42", "JSON object, not int", None),
    ("null", "JSON object, not NoneType", None),
    ('{"type":"call","id":"n","function":"f","params":{"x":NaN}}', "NaN is not JSON", None),
    ('{"type":"call","id":"n","function":"f","params":{"x":Infinity}}', "Infinity", None),
    ('{"type":"call","id":"n","function":"f","params":{"x":-Infinity}}', "Infinity", None),
    ('{"type":"call","id":"n","function":"f","params":{"x":1e400}}', "out of range", None),
    ('{"type":"call","id":' + "9" * 5000 + "}", "digits", None),
    ('{"type":"call","id":"n","function":"f","params":{"x":-' + "1" * 5000 + "}}", "digits", None),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply", None),
    (DEEP, f"deeper than {MAX_DEPTH}", None),
    # fields
    ('{"id":"a","function":"f"}', "missing field 'type'", "a"),
    ('{"type":"calls","id":"a"}', "field 'type'", "a"),
    ('{"type":5,"id":"a"}', "field 'type'", "a"),
    ('{"type":null,"id":3}', "field 'type'", 3),
    ('{"type":"call","function":"f"}', "missing field 'id'", None),
    ('{"type":"call","id":1.5,"function":"f"}', "field 'id'", None),
    ('{"type":"call","id":true,"function":"f"}', "field 'id'", None),
    ('{"type":"call","id":-1,"function":"f"}', "field 'id'", None),
    ('{"type":"call","id":' + str(SAFE_INT + 1) + ',"function":"f"}', "field 'id'", None),
    ('{"type":"call","id":"","function":"f"}', "field 'id'", None),
    ('{"type":"call","id":"' + "x" * (MAX_ID_CHARS + 1) + '","function":"f"}', "field 'id'", None),
    ('{"type":"call","id":["a"],"function":"f"}', "field 'id'", None),
    ('{"type":"cancel","id":{}}', "field 'id'", None),
    ('{"type":"call","id":"a"}', "missing field 'function'", "a"),
    ('{"type":"call","id":"a","function":7}', "field 'function'", "a"),
    ('{"type":"call","id":"a","function":""}', "field 'function'", "a"),
    ('{"type":"call","id":"a","function":"' + "f" * 129 + '"}', "field 'function'", "a"),
    ('{"type":"call","id":"a","function":"f","params":[1]}', "field 'params'", "a"),
    ('{"type":"call","id":"a","function":"f","params":"x"}', "field 'params'", "a"),
    ('{"type":"call","id":"a","function":"f","tenant_id":5}', "field 'tenant_id'", "a"),
    ('{"type":"call","id":"a","function":"f","extra":1}', "unknown field 'extra'", "a"),
    ('{"type":"cancel","id":"a","function":"f"}', "unknown field 'function'", "a"),
]


@pytest.mark.parametrize(("text", "says", "call_id"), REFUSED, ids=range(len(REFUSED)))
def test_bad_messages_are_refused_with_invalid_request(text: str, says: str, call_id: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(text)
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert says in info.value.message
    assert info.value.call_id == call_id
    assert len(info.value.message) < 400  # a client value is never echoed at length


# --- parse_message never raises anything else --------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["type", "id", "function", "params", "tenant_id", "x"])
            | st.text(max_size=8),
            inner,
            max_size=6,
        )
    ),
    max_leaves=30,
)
#: objects shaped like messages, so the checks past the JSON decoding are reached too
message_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["call", "cancel"]) | json_values,
        "id": st.text(max_size=4) | st.integers() | json_values,
        "function": st.text(max_size=4) | json_values,
        "params": st.dictionaries(st.text(max_size=4), json_values, max_size=3) | json_values,
        "tenant_id": st.text(max_size=4) | json_values,
    },
)


def _parses_or_refuses(text: str) -> None:
    try:
        msg = parse_message(text)
    except ProtocolError as e:
        assert e.code in set(ErrorCode) and e.message
        assert e.call_id is None or isinstance(e.call_id, str | int)
        json.loads(error_message(e.call_id, e.code, e.message))  # always encodable
    else:
        assert isinstance(msg, Call | Cancel)


@settings(max_examples=500)
@given(st.text())
def test_fuzz_arbitrary_text(text: str) -> None:
    _parses_or_refuses(text)


@settings(max_examples=500)
@given(json_values | message_like)
def test_fuzz_arbitrary_json_values(value: Any) -> None:
    _parses_or_refuses(json.dumps(value))


@given(st.binary(max_size=200))
def test_fuzz_bytes_decoded_leniently(data: bytes) -> None:
    _parses_or_refuses(data.decode("utf-8", "surrogateescape"))


# --- building server messages ------------------------------------------------------------------


def test_server_messages_are_compact_json() -> None:
    assert json.loads(stream_message("r", {"token": "é", "index": 0})) == {
        "type": "stream", "id": "r", "data": {"token": "é", "index": 0},
    }  # fmt: skip
    assert "é" in result_message(1, {"text": "é"})  # UTF-8, not \u escapes
    assert json.loads(error_message(None, "INTERNAL", "x"))["id"] is None
    with pytest.raises(ValueError):  # JSON has no NaN: never sent
        result_message(1, {"x": math.nan})
    with pytest.raises(ValueError):  # only the codes of protocol v1
        error_message(1, "SOMETHING_ELSE", "x")


@pytest.mark.parametrize("text", ["\ud800", "a\udfffé", "é\ud83d"])
def test_server_messages_with_lone_surrogates_stay_sendable(text: str) -> None:
    # a client's id like "\ud800" (valid JSON) is echoed back: escaped, never raw
    msg = error_message(text, "INTERNAL", "x")
    msg.encode("utf-8")
    assert json.loads(msg)["id"] == text
    assert json.loads(result_message(1, {"text": text}))["data"]["text"] == text


@given(st.text())
def test_fuzz_server_messages_are_always_utf8(text: str) -> None:
    for msg in (stream_message(text, {"token": text}), error_message(text, "INTERNAL", text)):
        assert json.loads(msg.encode("utf-8"))["id"] == text


# --- one home for codes and messages: the client's and the runtime's -------------------------


ids = st.text(min_size=1, max_size=MAX_ID_CHARS) | st.integers(0, SAFE_INT)
params = st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4)


@given(ids, st.text(min_size=1, max_size=MAX_FUNCTION_CHARS), params)
def test_what_the_client_builds_the_server_reads(call_id: Any, function: str, p: Any) -> None:
    assert parse_message(call_message(call_id, function, p)) == Call(call_id, function, p)
    assert parse_message(call_message(call_id, function, None, tenant_id="t")) == Call(
        call_id, function, {}, "t"
    )
    assert parse_message(cancel_message(call_id)) == Cancel(call_id)


@given(ids, params)
def test_what_the_server_builds_the_client_reads(call_id: Any, data: Any) -> None:
    assert read_server_message(stream_message(call_id, data)) == ServerMessage(
        "stream", call_id, data
    )
    assert read_server_message(result_message(call_id, data)).data == data  # type: ignore[union-attr]
    error = read_server_message(error_message(call_id, "RATE_LIMITED", "slow", retry_after=0.5))
    assert error == ServerMessage(
        "error", call_id, {}, {"code": "RATE_LIMITED", "message": "slow", "retry_after": 0.5}
    )


@pytest.mark.parametrize(
    "text",
    ["", "x", "[]", '{"type":"call","id":1}', '{"type":"result","id":[1]}', "[" * 5000],
)
def test_what_is_not_a_server_message_is_none(text: str) -> None:
    assert read_server_message(text) is None


def test_every_code_has_its_client_error() -> None:
    assert set(BY_CODE) == set(ErrorCode)
    for code, cls in BY_CODE.items():
        e = error_from_wire({"code": str(code), "message": "m"}, "id")
        assert type(e) is cls and e.code == code and e.call_id == "id"
        assert isinstance(e, RemoteError) and isinstance(e, realm.RealmError)
    for bad in ({"code": "NOPE"}, {"code": None}, {"code": ["x"]}, "not an object"):
        assert type(error_from_wire(bad)) is ServerError


@pytest.mark.parametrize(
    ("value", "retry_after"),
    [(1.5, 1.5), (2, 2.0), (0, 0.0), (-1, None), ("1", None), (True, None), (None, None)],
)
def test_rate_limited_reads_retry_after(value: Any, retry_after: float | None) -> None:
    e = error_from_wire({"code": "RATE_LIMITED", "message": "m", "retry_after": value})
    assert isinstance(e, RateLimited) and e.retry_after == retry_after


def test_the_runtime_errors_carry_protocol_codes() -> None:
    errors = [
        v for v in vars(realm).values() if isinstance(v, type) and issubclass(v, realm.RealmError)
    ]
    assert len(errors) > 10
    for cls in errors:
        assert cls.code in set(ErrorCode), cls
    e = ProtocolError("RATE_LIMITED", "slow down", 7, retry_after=0.25)
    assert isinstance(e, realm.RealmError)
    assert (e.code, e.message, e.call_id) == (ErrorCode.RATE_LIMITED, "slow down", 7)
    assert e.retry_after == 0.25
    assert ProtocolError.code == ErrorCode.INVALID_REQUEST  # the class keeps its default
    with pytest.raises(ValueError):
        ProtocolError("NOT_A_CODE", "x")


# --- config ------------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # load_config only checks that the file exists
    path = tmp_path / "realm.toml"
    path.write_text(text, encoding="utf-8")
    return path


DIGEST = hash_key("k1")
GOOD = f"""
[server]
host = "0.0.0.0"
port = 9000
metrics_port = 9100
max_message_bytes = 4096
send_timeout_seconds = 2.5

[models]
tiny = "m.gguf"

[tenants.acme]
api_keys = ["{DIGEST}"]
model = "tiny"
tokens_per_second = 50
calls_per_second = 2.5
max_concurrent_calls = 4
"""


def test_a_good_config_loads(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD))
    assert (cfg.host, cfg.port, cfg.metrics_port) == ("0.0.0.0", 9000, 9100)
    assert cfg.models == {"tiny": str(tmp_path / "m.gguf")}  # relative to the file
    assert cfg.limits == ServerLimits(max_message_bytes=4096, send_timeout_seconds=2.5)
    assert cfg.tenants is not None and not cfg.open
    acme = cfg.tenants["acme"]
    assert acme.api_key_hashes == (DIGEST,) and acme.model == "tiny"
    assert (acme.tokens_per_second, acme.calls_per_second) == (50.0, 2.5)
    assert acme.max_concurrent_calls == 4
    assert cfg.tenant_for_key("k1") == "acme"
    assert cfg.tenant_for_key("k2") is None and cfg.tenant_for_key("") is None
    assert cfg.tenant_for_key(None) is None


def test_a_config_without_tenants_is_open(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, '[models]\ntiny = "m.gguf"\n'))
    assert cfg.open and cfg.tenants is None and cfg.tenant_for_key("k1") is None
    assert (cfg.host, cfg.port, cfg.metrics_port, cfg.limits) == (
        "127.0.0.1", 8080, None, ServerLimits(),
    )  # fmt: skip


def test_the_paging_budget_key(tmp_path: Path) -> None:
    models = '[models]\ntiny = "m.gguf"\n'
    assert load_config(_write(tmp_path, models)).max_resident_bytes is None
    cfg = load_config(_write(tmp_path, "[server]\nmax_resident_bytes = 1073741824\n" + models))
    assert cfg.max_resident_bytes == 1 << 30
    for bad in ("-1", '"1GB"', "1.5", "true"):
        with pytest.raises(ConfigError, match=r"server\.max_resident_bytes"):
            load_config(_write(tmp_path, f"[server]\nmax_resident_bytes = {bad}\n" + models))


def test_the_pack_weights_key(tmp_path: Path) -> None:
    models = '[models]\ntiny = "m.gguf"\n'
    assert load_config(_write(tmp_path, models)).pack_weights is None
    for text, want in (("false", False), ("true", True)):
        cfg = load_config(_write(tmp_path, f"[server]\npack_weights = {text}\n" + models))
        assert cfg.pack_weights is want
    for bad in ("1", '"no"', "0"):
        with pytest.raises(ConfigError, match=r"server\.pack_weights must be true or false"):
            load_config(_write(tmp_path, f"[server]\npack_weights = {bad}\n" + models))


async def test_open_runtime_passes_pack_to_the_models_it_loads(tmp_path: Path) -> None:
    path = write_test_model(tmp_path / "q.gguf", n_layers=1, wtype="Q4_0")
    async with realm.open_runtime(models={"m": path}, pack=False) as rt:
        assert not rt.registry.get("m")._native.packed
    async with realm.open_runtime(models={"m": path}) as rt:
        assert rt.registry.get("m")._native.packed == kernels.pack_preferred()


def _replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


BAD_CONFIGS = [
    ("[other]\nx = 1\n" + GOOD, "other: unknown key"),
    (_replace("port = 9000", "port = 9000\nbogus = 1"), "server.bogus: unknown key"),
    (_replace("port = 9000", 'port = "9000"'), "server.port: must be an integer"),
    (_replace("port = 9000", "port = 70000"), "server.port: must be an integer in 0..65535"),
    (_replace("metrics_port = 9100", "metrics_port = -1"), "server.metrics_port"),
    (_replace('host = "0.0.0.0"', "host = ''"), "server.host: must be a non-empty string"),
    (_replace("max_message_bytes = 4096", "max_message_bytes = 0"), "server.max_message_bytes"),
    (_replace("max_message_bytes = 4096", "max_message_bytes = true"), "server.max_message_bytes"),
    (
        _replace("send_timeout_seconds = 2.5", "send_timeout_seconds = 'x'"),
        "server.send_timeout_seconds: must be a number > 0",
    ),
    (
        _replace("send_timeout_seconds = 2.5", "send_timeout_seconds = -1"),
        "server.send_timeout_seconds",
    ),
    (_replace('tiny = "m.gguf"', 'tiny = "missing.gguf"'), "models.tiny: no such file"),
    (_replace('tiny = "m.gguf"', "tiny = 5"), "models.tiny: must be a non-empty string"),
    (GOOD.replace('[models]\ntiny = "m.gguf"', ""), "models: must be a table"),
    (
        _replace("tokens_per_second = 50", 'tokens_per_second = "fast"'),
        "tenants.acme.tokens_per_second: must be a number > 0, not 'fast'",
    ),
    (_replace("calls_per_second = 2.5", "calls_per_second = 0"), "tenants.acme.calls_per_second"),
    (
        _replace("max_concurrent_calls = 4", "max_concurrent_calls = 0"),
        "tenants.acme.max_concurrent_calls",
    ),
    (_replace('model = "tiny"', 'model = "huge"'), "tenants.acme.model: no model named 'huge'"),
    (_replace('model = "tiny"', 'model = "tiny"\nsecret = 1'), "tenants.acme.secret: unknown key"),
    (_replace(f'api_keys = ["{DIGEST}"]', 'api_keys = ["k1"]'), "tenants.acme.api_keys[0]"),
    (
        _replace(f'api_keys = ["{DIGEST}"]', f'api_keys = ["{DIGEST}", "sha256:{"z" * 64}"]'),
        "tenants.acme.api_keys[1]: not hex",
    ),
    (_replace(f'api_keys = ["{DIGEST}"]', "api_keys = []"), "tenants.acme.api_keys: must be"),
    (
        _replace(f'api_keys = ["{DIGEST}"]', f'api_key_hashes = ["{DIGEST}"]'),
        "tenants.acme.api_key_hashes",
    ),
    (
        _replace("[tenants.acme]", "[tenants.acme]\nguest = 'nope.wasm'"),
        "tenants.acme.guest: no such file",
    ),
]
NOT_TOML = [GOOD + '\n[models]\nother = "m.gguf"\n', "[models\n", 'x = "\\q"']


@pytest.mark.parametrize(("text", "says"), BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
def test_bad_config_names_the_dotted_key(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert str(info.value).startswith(says)  # the key first, as the user wrote it
    assert info.value.code == "INVALID_PARAMS"


@pytest.mark.parametrize("text", NOT_TOML)
def test_a_file_that_is_not_toml(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: not valid TOML"):
        load_config(path)


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_config_from_dict_checks_the_same_way(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    cfg = config_from_dict({"models": {"tiny": "m.gguf"}}, base=tmp_path)
    assert cfg.models == {"tiny": str(tmp_path / "m.gguf")}
    with pytest.raises(ConfigError, match=r"^server: must be a table"):
        config_from_dict({"models": {"tiny": "m.gguf"}, "server": 5}, base=tmp_path)
    with pytest.raises(ConfigError, match=r"^tenants.x: must be a table"):
        config_from_dict({"models": {"tiny": "m.gguf"}, "tenants": {"x": 1}}, base=tmp_path)


def test_new_keys_are_fresh_and_hash_to_their_digest() -> None:
    key, digest = new_key()
    assert key.startswith("rk-") and len(key) > 40
    assert digest == hash_key(key) and digest.startswith("sha256:") and len(digest) == 71
    assert new_key()[0] != key


# --- TokenBucket -------------------------------------------------------------------------------


def _elapse(bucket: TokenBucket, seconds: float) -> None:
    bucket.stamp -= seconds  # as if that much time had passed since the last refill


def test_bucket_takes_up_to_its_burst_then_refuses() -> None:
    b = TokenBucket(rate=2.0, burst=3.0)
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    _elapse(b, 0.5)  # one unit back at 2/s
    assert b.take() and not b.take()


def test_bucket_never_saves_more_than_its_burst() -> None:
    b = TokenBucket(rate=100.0, burst=2.0)
    _elapse(b, 3600)
    assert b.take(2) and not b.take(0.5)


def test_bucket_spend_goes_into_debt_and_says_when_it_is_paid() -> None:
    b = TokenBucket(rate=10.0, burst=5.0)
    b.spend(25)  # a stream already under way is never cut short
    assert b.level == pytest.approx(-20, abs=0.01)
    assert not b.available() and not b.take()
    assert b.seconds_until_available() == pytest.approx(2.0, abs=0.01)
    _elapse(b, 2.1)
    assert b.available() and b.seconds_until_available() == 0.0
