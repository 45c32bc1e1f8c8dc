"""The public names of ``realm`` and ``realm.kernels``."""

from __future__ import annotations

import enum

import pytest

import realm
from realm import kernels

REALM_ERRORS = (
    "RealmError",
    "KernelError",
    "ModelError",
    "TokenizerError",
    "KVMemoryExhausted",
    "InvalidParams",
    "UnknownFunction",
    "CallCancelled",
    "GuestError",
    "GuestTrap",
    "GuestABIError",
    "GuestRefusedParams",
    "GuestLimitReached",
    "TenantUnavailable",
    "Overloaded",
    "ProtocolError",
)
#: GGML's type ids
GGML_TYPE_IDS = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20, "IQ4_XS": 23,
    "BF16": 30,
}  # fmt: skip
REALM_FUNCTIONS = ("load_model", "load_tokenizer", "open_runtime", "default_model_path")
KERNEL_CLASSES = (
    "Matrix", "Packed", "LayerWeights", "TransformerSpec", "SeqStep", "NativeTransformer",
    "LoraPair", "NativeAdapter", "CudaDevice", "CudaTransformer", "CudaUnavailable", "DeviceArray",
    "DeviceKV",
)  # fmt: skip
MODEL_NAMES = (
    "Model",
    "ModelInfo",
    "Session",
    "LayerPager",
    "PagingBudget",
    "PagerStatistics",
    "ModelRegistry",
    "load_model",
    "content_hash",
    "default_model_path",
)
KERNEL_FUNCTIONS = (
    "pack",
    "pack_preferred",
    "quantize",
    "dequantize",
    "matmul",
    "matmul_path",
    "rmsnorm",
    "rope",
    "softmax",
    "swiglu",
    "geglu",
    "softcap",
    "add",
    "get_rows",
    "attention",
    "read_bandwidth",
    "set_threads",
    "threads",
    "detected_isa",
    "active_isa",
    "set_isa",
    "use_isa",
    "cuda_available",
    "cuda_device",
    "cuda_status",
    "parse_device",
    "to_device",
)


@pytest.mark.parametrize("name", REALM_ERRORS)
def test_realm_errors(name: str) -> None:
    error = getattr(realm, name)
    assert issubclass(error, realm.RealmError)
    assert error.__module__.startswith("realm")


def test_kernel_error_is_a_value_error() -> None:
    assert issubclass(realm.KernelError, ValueError)
    error = realm.KernelError("bad x", kernel="matmul")
    assert str(error) == "matmul: bad x"
    assert error.kernel == "matmul"
    assert error.status is None


@pytest.mark.parametrize("name", KERNEL_FUNCTIONS)
def test_kernel_functions(name: str) -> None:
    function = getattr(kernels, name)
    assert callable(function)
    assert function.__doc__


@pytest.mark.parametrize(
    ("name", "members"),
    [
        ("WeightType", GGML_TYPE_IDS),
        ("Isa", {"SCALAR": 0, "AVX2": 1, "AVX512": 2}),
        ("RopeMode", {"NORMAL": 0, "NEOX": 2}),
        ("Activation", {"SILU": 0, "GELU": 1}),
    ],
)
def test_kernel_enums(name: str, members: dict[str, int]) -> None:
    enum_type = getattr(kernels, name)
    assert issubclass(enum_type, enum.IntEnum)
    assert {m.name: int(m) for m in enum_type} == members


def test_max_head_dim() -> None:
    assert kernels.MAX_HEAD_DIM == 256


def test_no_private_names_leak() -> None:
    public = {n for n in dir(kernels) if not n.startswith("_")}
    expected = {
        *KERNEL_FUNCTIONS, *KERNEL_CLASSES, "WeightType", "Isa", "RopeMode", "Activation",
        "MAX_HEAD_DIM", "LORA_ROLES", "PACKABLE",
    }  # fmt: skip
    assert public == expected


@pytest.mark.parametrize("name", REALM_FUNCTIONS)
def test_realm_functions(name: str) -> None:
    assert callable(getattr(realm, name))


@pytest.mark.parametrize("name", KERNEL_CLASSES)
def test_kernel_classes(name: str) -> None:
    assert isinstance(getattr(kernels, name), type)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_names(name: str) -> None:
    import realm.model

    assert getattr(realm.model, name) is not None


SANDBOX_NAMES = (
    "ABI_VERSION",
    "HOST_IMPORTS",
    "Status",
    "render_abi_markdown",
    "CallContext",
    "GuestLimits",
    "TenantState",
    "GuestModule",
    "SandboxEngine",
    "GuestInstance",
    "default_guest_path",
)
GUEST_ERRORS = (
    "GuestError",
    "GuestTrap",
    "GuestABIError",
    "InvalidParams",
    "UnknownFunction",
    "CallCancelled",
)


@pytest.mark.parametrize("name", SANDBOX_NAMES)
def test_sandbox_names(name: str) -> None:
    import realm.sandbox

    assert getattr(realm.sandbox, name) is not None


@pytest.mark.parametrize("name", GUEST_ERRORS)
def test_guest_errors_map_to_protocol_codes(name: str) -> None:
    error = getattr(realm, name)
    assert issubclass(error, realm.RealmError)
    assert error.code in {"GUEST_TRAP", "INVALID_PARAMS", "UNKNOWN_FUNCTION", "CANCELLED"}


#: the protocol code of each error: what a server sends for it
ERROR_CODES = {
    "InvalidParams": "INVALID_PARAMS",
    "UnknownFunction": "UNKNOWN_FUNCTION",
    "CallCancelled": "CANCELLED",
    "GuestError": "GUEST_TRAP",
    "GuestTrap": "GUEST_TRAP",
    "GuestRefusedParams": "INVALID_PARAMS",
    "GuestLimitReached": "OVERLOADED",
    "TenantUnavailable": "TENANT_UNAVAILABLE",
    "Overloaded": "OVERLOADED",
    "KVMemoryExhausted": "OVERLOADED",
    "ProtocolError": "INVALID_REQUEST",  # each instance carries its own code
}


@pytest.mark.parametrize(("name", "code"), ERROR_CODES.items())
def test_error_codes(name: str, code: str) -> None:
    assert getattr(realm, name).code == code


SERVER_NAMES = (
    *("ServerConfig", "ServerLimits", "TenantSpec", "ConfigError", "load_config"),
    *("config_from_dict", "hash_key", "new_key", "Server", "open_server", "serve"),
)
CLIENT_NAMES = (
    *("connect", "AsyncClient", "Client", "CallStream", "Event", "RemoteError"),
    *("ConnectionLost", "RateLimited", "Unauthorized", "CallTimeout", "ServerError"),
    "InvalidRequest",
    "KeyRefused",
)


@pytest.mark.parametrize("name", SERVER_NAMES)
def test_server_names(name: str) -> None:
    import realm.server

    assert getattr(realm.server, name) is not None


@pytest.mark.parametrize("name", CLIENT_NAMES)
def test_client_names(name: str) -> None:
    import realm.client

    assert getattr(realm.client, name) is not None


def test_remote_errors_are_realm_errors() -> None:
    import realm.client as rc

    assert issubclass(rc.RemoteOverloaded, realm.Overloaded)
    assert issubclass(rc.RemoteInvalidParams, realm.InvalidParams)
    assert rc.RateLimited.code == "RATE_LIMITED"
    assert issubclass(rc.KeyRefused, rc.Unauthorized)
    assert issubclass(rc.KeyRefused, rc.ConnectionLost)
