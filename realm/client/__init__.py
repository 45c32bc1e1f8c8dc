"""Python client of Realm's WebSocket protocol v1 (docs/protocol.md).

Async (Trio)::

    async with realm.client.connect("ws://127.0.0.1:8080", api_key=KEY) as c:
        r = await c.call("generate", {"prompt": "Hi", "max_tokens": 16})
        async with c.stream("generate", {"prompt": "Hi"}) as events:
            async for ev in events: ...

Sync::

    with realm.client.Client("ws://127.0.0.1:8080") as c:
        for ev in c.stream("generate", {"prompt": "Hi"}): ...
"""

from ._client import AsyncClient as AsyncClient
from ._client import CallStream as CallStream
from ._client import Client as Client
from ._client import Event as Event
from ._client import connect as connect
from ._errors import CallTimeout as CallTimeout
from ._errors import ConnectionLost as ConnectionLost
from ._errors import InvalidRequest as InvalidRequest
from ._errors import KeyRefused as KeyRefused
from ._errors import RateLimited as RateLimited
from ._errors import RemoteCancelled as RemoteCancelled
from ._errors import RemoteError as RemoteError
from ._errors import RemoteGuestTrap as RemoteGuestTrap
from ._errors import RemoteInvalidParams as RemoteInvalidParams
from ._errors import RemoteOverloaded as RemoteOverloaded
from ._errors import RemoteTenantUnavailable as RemoteTenantUnavailable
from ._errors import RemoteUnknownFunction as RemoteUnknownFunction
from ._errors import ServerError as ServerError
from ._errors import Unauthorized as Unauthorized
