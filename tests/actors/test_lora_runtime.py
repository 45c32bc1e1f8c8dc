"""Per-tenant LoRA adapters through the runtime: spec, rt.add_adapter, the default guest's
``adapter`` parameter, adapter names as model names, isolation in shared batches, config.

Every test runs under an absolute time limit (``trio.fail_after``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio

import realm
from realm.model import save_adapter
from realm.server._config import ConfigError, config_from_dict
from realm.testing import write_test_model

LIMIT = 60  # seconds, every test
GEN = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0}


def _pairs(model: realm.model.Model, seed: int, std: float = 0.5) -> dict[str, tuple]:
    s = model.spec
    qd = s.n_heads * s.head_dim
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(s.n_layers):
        for name, n_out, n_in in (("attn_q", qd, s.n_embd), ("attn_v", s.kv_dim, s.n_embd),
                                  ("ffn_down", s.n_embd, s.n_ff)):  # fmt: skip
            out[f"blk.{layer}.{name}.weight"] = (
                rng.normal(0, std, (8, n_in)),
                rng.normal(0, std, (n_out, 8)),
            )
    out["output.weight"] = (rng.normal(0, std, (8, s.n_embd)), rng.normal(0, std, (s.n_vocab, 8)))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lora_rt")
    path = write_test_model(d / "tiny.gguf", n_layers=2)
    m = realm.load_model(path)
    return {
        "model": path,
        "other": write_test_model(d / "tiny2.gguf", n_layers=2, seed=1),
        "x": save_adapter(d / "x.gguf", _pairs(m, 1), arch="llama", alpha=8),
        "y": save_adapter(d / "y.gguf", _pairs(m, 2), arch="llama", alpha=8, wtype="Q8_0"),
    }


def _tenants(files: dict[str, Path]) -> dict[str, dict]:
    return {
        "alice": {"adapters": {"pirate": str(files["x"])}},
        "bob": {"adapters": {"formal": {"path": files["y"], "scale": 0.8}}},
        "carol": {},
    }


async def test_adapters_per_tenant_in_shared_batches(files: dict[str, Path]) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": files["model"]},
                                      tenants=_tenants(files)) as rt:  # fmt: skip
            base = await rt.call("carol", "generate", GEN)
            solo = {
                "alice": await rt.call("alice", "generate", GEN | {"adapter": "pirate"}),
                "bob": await rt.call("bob", "generate", GEN | {"adapter": "formal"}),
                "carol": base,
            }
            assert solo["alice"]["text"] != base["text"] != solo["bob"]["text"]
            assert solo["alice"]["text"] != solo["bob"]["text"]
            # the same calls at once: their steps share batches, each keeps its own text
            together: dict[str, str] = {}

            async def run(tenant: str, params: dict) -> None:
                together[tenant] = (await rt.call(tenant, "generate", params))["text"]

            steps_before = rt.statistics().batcher.steps
            async with trio.open_nursery() as n:
                n.start_soon(run, "alice", GEN | {"adapter": "pirate"})
                n.start_soon(run, "bob", GEN | {"adapter": "formal"})
                n.start_soon(run, "carol", GEN)
            assert together == {t: r["text"] for t, r in solo.items()}
            stats = rt.statistics()
            assert stats.batcher.max_batch_size >= 2 and stats.batcher.steps > steps_before
            # an adapter's name is also a model name for its tenant (the HTTP model field)
            alias = await rt.call("alice", "generate", GEN | {"model": "pirate"})
            assert alias["text"] == solo["alice"]["text"]
            assert (await rt.call("alice", "generate", GEN | {"model": "tiny"}))["text"] == (
                base["text"]
            )
            st = rt.tenant_statistics("alice")
            assert st.adapters == 1 and st.adapter_bytes > 0
            assert rt.tenant_statistics("carol").adapters == 0


async def test_a_tenant_cannot_name_another_tenants_adapter(files: dict[str, Path]) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": files["model"]},
                                      tenants=_tenants(files)) as rt:  # fmt: skip
            for params in (GEN | {"adapter": "pirate"}, GEN | {"adapter": "nope"}):
                with pytest.raises(realm.InvalidParams, match="no adapter"):
                    await rt.call("bob", "generate", params)
            with pytest.raises(realm.InvalidParams, match="no model 'pirate'"):
                await rt.call("bob", "generate", GEN | {"model": "pirate"})
            with pytest.raises(realm.InvalidParams, match="no adapter"):
                await rt.call("carol", "chat", {"message": "hi", "adapter": "formal",
                                                "max_tokens": 2})  # fmt: skip
            with pytest.raises(realm.InvalidParams, match="no adapter"):
                await rt.call("alice", "generate", GEN | {"adapter": "tiny"})  # a model's name


async def test_add_and_remove_adapters_at_run_time(files: dict[str, Path]) -> None:
    with trio.fail_after(LIMIT):
        async with realm.open_runtime(models={"tiny": files["model"], "other": files["other"]},
                                      tenants=_tenants(files)) as rt:  # fmt: skip
            with pytest.raises(realm.InvalidParams, match="no adapter"):
                await rt.call("carol", "generate", GEN | {"adapter": "mine"})
            await rt.add_adapter("carol", "mine", files["x"], model="tiny")  # not carol's default
            assert rt.adapters("carol")["mine"]["model"] == "tiny"
            mine = await rt.call("carol", "generate", GEN | {"adapter": "mine"})
            base = await rt.call("carol", "generate", GEN | {"model": "tiny"})
            assert mine["text"] != base["text"]
            alias = await rt.call("carol", "generate", GEN | {"model": "mine"})
            assert alias["text"] == mine["text"]
            with pytest.raises(realm.InvalidParams, match='adapts model "tiny", not "other"'):
                await rt.call("carol", "generate", GEN | {"adapter": "mine", "model": "other"})
            rt.remove_adapter("carol", "mine")
            with pytest.raises(realm.InvalidParams, match="no adapter"):
                await rt.call("carol", "generate", GEN | {"adapter": "mine"})
            with pytest.raises(realm.InvalidParams, match="has no adapter"):
                rt.remove_adapter("carol", "mine")
            # what a careless operator passes
            bad = [
                (("dave", "a", files["x"]), {}, "unknown tenant"),
                (("carol", "tiny", files["x"]), {}, "a model's"),
                (("carol", "", files["x"]), {}, "1 to 128 characters"),
                (("carol", "a", files["model"]), {}, "not an adapter file"),
                (("carol", "a", "/nonexistent.gguf"), {}, "no such adapter file"),
                (("carol", "a", files["x"]), {"scale": float("nan")}, "scale"),
                (("carol", "a", files["x"]), {"model": "nope"}, "unknown model"),
            ]
            for args, kw, message in bad:
                with pytest.raises(realm.TenantUnavailable, match=message):
                    await rt.add_adapter(*args, **kw)
            assert "a" not in rt.adapters("carol")


async def test_bad_adapter_specs_fail_the_open(files: dict[str, Path], tmp_path: Path) -> None:
    other = write_test_model(tmp_path / "wide.gguf", n_layers=2, n_embd=96, n_heads=4)
    cases = [
        ({"adapters": {"x": "/nonexistent.gguf"}}, "no such adapter file"),
        ({"adapters": {"x": {"path": str(files["x"]), "rank": 2}}}, "unknown adapter key"),
        ({"adapters": {"x": {"scale": 2}}}, "needs a 'path'"),
        ({"adapters": {"x": 3}}, "a path or a table"),
        ({"adapters": ["x"]}, "must map names"),
        ({"adapters": {"x": {"path": str(files["x"]), "model": "wide"}}}, r"must be \(rank, 96\)"),
        ({"adapters": {"x": str(files["x"]), "y": str(files["y"])}, "max_adapter_bytes": 1000},
         "max_adapter_bytes"),
    ]  # fmt: skip
    for spec, message in cases:
        with trio.fail_after(LIMIT), pytest.raises(realm.TenantUnavailable, match=message):
            async with realm.open_runtime(models={"tiny": files["model"], "wide": other},
                                          tenants={"t": spec}):  # fmt: skip
                pass


def test_config_file_adapters(files: dict[str, Path], tmp_path: Path) -> None:
    key = "sha256:" + "ab" * 32

    def doc(adapters: object) -> dict:
        return {"models": {"tiny": str(files["model"])},
                "tenants": {"alice": {"api_keys": [key], "adapters": adapters}}}  # fmt: skip

    cfg = config_from_dict(doc({"pirate": str(files["x"]),
                                "formal": {"path": str(files["y"]), "scale": 0.5,
                                           "model": "tiny"}}), base=tmp_path)  # fmt: skip
    spec = cfg.tenants["alice"].runtime_spec()  # type: ignore[index]
    assert set(spec.adapters) == {"pirate", "formal"}
    assert spec.adapters["formal"].scale == 0.5
    for adapters, message in (
        ({"p": "missing.gguf"}, "no such file"),
        ({"tiny": str(files["x"])}, "a model's"),
        ({"p": {"path": str(files["x"]), "model": "nope"}}, "no model named"),
        ({"p": {"path": str(files["x"]), "scale": "high"}}, "scale"),
        ({"p": {"scale": 1}}, "'path'"),
        ("x.gguf", "must be a table"),
    ):
        with pytest.raises(ConfigError, match=message):
            config_from_dict(doc(adapters), base=tmp_path)


async def test_http_model_field_names_a_tenants_adapter(files: dict[str, Path]) -> None:
    """The OpenAI-compatible front end: a tenant's adapter is one of its models."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from server._wire import config, get, http_exchange

    from realm.actors import AdapterSpec
    from realm.server import TenantSpec, hash_key, open_server

    tenants = {
        "acme": TenantSpec("acme", api_key_hashes=(hash_key("sk-acme"),),
                           adapters={"pirate": AdapterSpec(path=str(files["x"]))}),
        "other": TenantSpec("other", api_key_hashes=(hash_key("sk-other"),)),
    }  # fmt: skip

    def post(body: dict, key: str) -> bytes:
        data = json.dumps(body).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(data)}\r\n"
                f"Authorization: Bearer {key}\r\n\r\n")  # fmt: skip
        return head.encode() + data

    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    with trio.fail_after(LIMIT):
        async with open_server(config(files["model"], tenants=tenants)) as server:
            texts = {}
            for model in ("tiny", "pirate"):
                status, _, raw = await http_exchange(
                    server.port, post(body | {"model": model}, "sk-acme")
                )
                assert status == 200, raw
                reply = json.loads(raw)
                assert reply["model"] == model
                texts[model] = reply["choices"][0]["text"]
            assert texts["tiny"] != texts["pirate"]
            status, _, raw = await http_exchange(
                server.port, get("/v1/models", "Authorization: Bearer sk-acme")
            )
            assert {m["id"] for m in json.loads(raw)["data"]} == {"tiny", "pirate"}
            status, _, raw = await http_exchange(
                server.port, get("/v1/models", "Authorization: Bearer sk-other")
            )
            assert {m["id"] for m in json.loads(raw)["data"]} == {"tiny"}
            # another tenant cannot name it
            status, _, raw = await http_exchange(
                server.port, post(body | {"model": "pirate"}, "sk-other")
            )
            assert status == 404 and json.loads(raw)["error"]["param"] == "model", raw
