"""The actor runtime: tenant actors, the batch scheduler, and ``open_runtime``."""

from ._actor import EmitWindow as EmitWindow
from ._actor import Event as Event
from ._actor import TenantActor as TenantActor
from ._actor import TenantStatistics as TenantStatistics
from ._batcher import Batcher as Batcher
from ._batcher import BatcherStatistics as BatcherStatistics
from ._runtime import CallEvents as CallEvents
from ._runtime import Runtime as Runtime
from ._runtime import RuntimeLimits as RuntimeLimits
from ._runtime import RuntimeStatistics as RuntimeStatistics
from ._runtime import open_runtime as open_runtime
from ._spec import AdapterSpec as AdapterSpec
from ._spec import TenantSpec as TenantSpec
