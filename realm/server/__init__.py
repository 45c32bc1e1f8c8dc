"""Realm's WebSocket server (protocol v1, docs/protocol.md) in front of the actor runtime."""

from ._config import ConfigError as ConfigError
from ._config import ServerConfig as ServerConfig
from ._config import ServerLimits as ServerLimits
from ._config import TenantSpec as TenantSpec
from ._config import config_from_dict as config_from_dict
from ._config import hash_key as hash_key
from ._config import load_config as load_config
from ._config import new_key as new_key
from ._server import Server as Server
from ._server import open_server as open_server
from ._server import serve as serve
