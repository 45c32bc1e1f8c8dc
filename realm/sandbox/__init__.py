"""The guest sandbox: wasmtime engine, guest ABI v1, host imports, per-tenant instances."""

from ._abi import ABI_VERSION as ABI_VERSION
from ._abi import HOST_IMPORTS as HOST_IMPORTS
from ._abi import Status as Status
from ._abi import render_markdown as render_abi_markdown  # noqa: F401  (public name)
from ._compute import COMPUTE as COMPUTE
from ._compute import ComputeGate as ComputeGate
from ._compute import ComputeStatistics as ComputeStatistics
from ._context import CallContext as CallContext
from ._context import GuestLimits as GuestLimits
from ._context import TenantState as TenantState
from ._engine import GuestModule as GuestModule
from ._engine import SandboxEngine as SandboxEngine
from ._guests import default_guest_path as default_guest_path
from ._instance import GuestInstance as GuestInstance
