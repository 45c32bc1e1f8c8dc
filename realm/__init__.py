"""Realm: a multi-tenant LLM inference runtime for Trio.

Tenants run as WebAssembly guests supervised by Trio actors; the heavy math runs in a native
kernel library (``realm.kernels``) on weights shared by every tenant.
"""

from ._errors import KernelError as KernelError
from ._errors import ModelError as ModelError
from ._errors import RealmError as RealmError
from ._errors import TokenizerError as TokenizerError

__version__ = "0.1.0"
from ._errors import CallCancelled as CallCancelled
from ._errors import DeadlineExceeded as DeadlineExceeded
from ._errors import GuestABIError as GuestABIError
from ._errors import GuestError as GuestError
from ._errors import GuestLimitReached as GuestLimitReached
from ._errors import GuestRefusedParams as GuestRefusedParams
from ._errors import GuestTrap as GuestTrap
from ._errors import InvalidParams as InvalidParams
from ._errors import KVMemoryExhausted as KVMemoryExhausted
from ._errors import Overloaded as Overloaded
from ._errors import ProtocolError as ProtocolError
from ._errors import TenantUnavailable as TenantUnavailable
from ._errors import UnknownFunction as UnknownFunction
from .actors import open_runtime as open_runtime
from .model import default_model_path as default_model_path
from .model import load_model as load_model
from .model import load_tokenizer as load_tokenizer
