"""Shared test configuration: a deterministic Hypothesis profile and kernel-state fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from realm import kernels

# Derandomized (seeded from each test's source), no example database, no deadline: the
# kernel tests must give the same verdict on every run and never assert on timing.
settings.register_profile(
    "realm",
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("realm")

#: every instruction-set level this CPU can run, SCALAR (the reference) first
AVAILABLE_ISAS = [level for level in kernels.Isa if level <= kernels.detected_isa()]
#: the SIMD levels this CPU can run, compared against SCALAR
SIMD_ISAS = [level for level in AVAILABLE_ISAS if level != kernels.Isa.SCALAR]


def _skip_unless_available(level: kernels.Isa) -> None:
    """A level this CPU cannot run is reported as skipped, with the reason, never left out."""
    if level > kernels.detected_isa():
        pytest.skip(f"this CPU cannot run {level.name} (best level: {kernels.detected_isa().name})")


@pytest.fixture(params=list(kernels.Isa), ids=lambda level: level.name)
def isa(request: pytest.FixtureRequest) -> Iterator[kernels.Isa]:
    """Run the test once at each ISA level (restored afterwards); skipped where unavailable."""
    _skip_unless_available(request.param)
    with kernels.use_isa(request.param):
        yield request.param


@pytest.fixture(
    params=[level for level in kernels.Isa if level != kernels.Isa.SCALAR],
    ids=lambda level: level.name,
)
def simd_isa(request: pytest.FixtureRequest) -> kernels.Isa:
    """Each SIMD level (not activated: the test switches between it and SCALAR); skipped where
    this CPU cannot run it."""
    _skip_unless_available(request.param)
    return request.param


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Let a test resize the native thread pool; put the original size back afterwards."""
    before = kernels.threads()
    try:
        yield
    finally:
        kernels.set_threads(before)
