"""Any params a function's schema accepts run to completion; any it rejects get InvalidParams
naming what is wrong (the default guest on a tiny model, strategies from realm.testing)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import realm
from realm.sandbox import GuestInstance, SandboxEngine, TenantState, default_guest_path
from realm.testing import write_test_model
from realm.testing.strategies import invalid_params_for, params_for

FUNCTIONS = ("generate", "tokenize", "count_tokens", "chat", "embed")
SMALL = {"max_tokens": st.integers(1, 6)}  # keep generation short


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestInstance]:
    model = realm.load_model(write_test_model(tmp_path_factory.mktemp("h") / "tiny.gguf"))
    with SandboxEngine() as engine:
        tenant = TenantState("hyp", {"tiny": model})
        yield GuestInstance(engine, engine.compile(default_guest_path()), tenant)
        tenant.close()


def _schema(guest: GuestInstance, name: str) -> dict[str, Any]:
    return next(f["params"] for f in guest.functions() if f["name"] == name)


@pytest.mark.parametrize("function", FUNCTIONS)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_accepted_params_run_to_completion(guest: GuestInstance, function: str, data: Any) -> None:
    params = data.draw(params_for(_schema(guest, function), overrides=SMALL))
    if "model" in params:
        params["model"] = "tiny"  # the one model this host serves
    spec = params.get("speculative")
    if isinstance(spec, dict) and "draft_model" in spec:
        spec["draft_model"] = "tiny"  # a draft model must be loaded: the model is its own
    try:
        result = guest.call(function, params)
    except realm.GuestError as e:
        # a function may refuse what the schema cannot express: say why, and stay usable
        # (speculative: a draft mode without a draft model, ngram_min > ngram_max)
        refusable = ("context", "speculative")
        if params.get("adapter"):  # this tenant has no adapters: any name is refused by name
            refusable += ("adapter",)
        assert function in ("chat", "embed") or any(w in str(e) for w in refusable), e
        assert not guest.broken
        return
    assert isinstance(result, dict)
    if function == "generate":
        assert result["finish_reason"] in ("stop", "length")
        assert result["usage"]["completion_tokens"] <= params.get("max_tokens", 128)


@pytest.mark.parametrize("function", FUNCTIONS)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_rejected_params_get_invalid_params(guest: GuestInstance, function: str, data: Any) -> None:
    what, params = data.draw(invalid_params_for(_schema(guest, function)))
    with pytest.raises(realm.InvalidParams) as info:
        guest.call(function, params)
    assert what in str(info.value) or "required" in str(info.value)
    assert not guest.broken
