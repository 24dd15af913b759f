"""Fixtures of the service tests: the engine fakes' event-loop error guard and engine factory,
and the garbage collector left as each test found it."""

import gc
from collections.abc import Iterator

import pytest

from tests.service.engine_fakes import loop_errors_fixture, make_engine_fixture

__all__ = ["loop_errors_fixture", "make_engine_fixture"]


@pytest.fixture(autouse=True)
def _unfrozen_heap() -> Iterator[None]:
    """A test that serves in this process (``serve``, ``run_servers``) freezes the heap once
    ready, as the service does; the rest of the suite keeps collecting it."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()
