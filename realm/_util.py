"""Small helpers shared across layers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def single_error() -> Iterator[None]:
    """Re-raise a group holding exactly one exception as that exception.

    Our context managers run a nursery around the caller's block, so under Trio's strict
    exception groups an error from the block (``except realm.Overloaded``) would reach the
    caller wrapped in a group. Groups of several errors pass through as they are.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        e: BaseException = group
        while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
            e = e.exceptions[0]
        if e is group:
            raise
        raise e from None
