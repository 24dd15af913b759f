"""Fixtures of the service tests: the engine fakes' event-loop error guard and engine factory."""

from tests.service.engine_fakes import loop_errors_fixture, make_engine_fixture

__all__ = ["loop_errors_fixture", "make_engine_fixture"]
