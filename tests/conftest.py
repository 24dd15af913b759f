"""Session fixtures for every test area (official-layout checkpoints with recipe weights), and the
CI skip guard.

The guard: under ``CI=true`` (set by ``.ci/run``) a test may skip only for a reason listed in
``CI_ALLOWED_SKIPS`` (no CUDA device, and the team's shared data that a clone does not have). Any
other skip (a missing tool such as grpcurl or promtool, an optional package such as PyAV or
``grpc_tools``, the reference models not fetched) is turned into a failure that says why: CI
installs all of them, so a skip there would hide a test that never ran. Off CI such skips stay
skips. The terminal summary lists every skip with its reason and whether CI accepts it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

ON_CI = os.environ.get("CI") == "true"
# Skip-reason prefixes CI accepts, and why. Everything else CI installs (``.ci/run``).
CI_ALLOWED_SKIPS = (
    ("needs CUDA", "CI has no GPU"),
    ("CUDA in use", "only on a GPU machine"),
    ("shared COCO samples not found", "../shared beside the checkout is the team's, not CI's"),
)


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The reason of a skip report, without pytest's "Skipped: " prefix."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def allowed_on_ci(reason: str) -> str | None:
    """Why CI may skip a test for ``reason``, or None when it may not."""
    return next((why for prefix, why in CI_ALLOWED_SKIPS if reason.startswith(prefix)), None)


def _fail_forbidden_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if ON_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        if allowed_on_ci(reason) is None:
            report.outcome = "failed"
            report.longrepr = (
                f"skipped under CI=true, where only {[p for p, _ in CI_ALLOWED_SKIPS]} may skip "
                f"(CI installs every tool and package the tests use): {reason}"
            )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A skip in setup or call (``skipif``, ``pytest.skip``, ``importorskip``) fails on CI unless
    its reason is allowed."""
    report = yield
    _fail_forbidden_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A module skipped at import (module-level ``importorskip``) fails collection on CI."""
    report = yield
    _fail_forbidden_skip(report)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """List what skipped and why, and whether CI accepts that reason."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    if not skipped:
        return
    terminalreporter.section("skips (CI accepts only CUDA and shared-data skips)")
    for report in skipped:
        reason = skip_reason(report)
        why = allowed_on_ci(reason)
        verdict = "FAILS on CI" if why is None else f"allowed on CI ({why})"
        terminalreporter.line(f"{report.nodeid or report.fspath}: {verdict}: {reason}")


@pytest.fixture(scope="session")
def distilpose_s_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DistilPose-S recipe weights (crc32-v1) as an mmcv-layout ``.pth``, built once per session."""
    from tests.recipe import write_official_checkpoint  # torch: not for the guard's own tests

    return write_official_checkpoint("distilpose_s", tmp_path_factory.mktemp("weights") / "s.pth")


@pytest.fixture(scope="session")
def distilpose_l_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DistilPose-L recipe weights (crc32-v1) as an mmcv-layout ``.pth``, built once per session."""
    from tests.recipe import write_official_checkpoint

    return write_official_checkpoint("distilpose_l", tmp_path_factory.mktemp("weights") / "l.pth")


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Undo ``configure_logging`` (called by CLI tests): its handler holds pytest's captured stderr,
    which is closed after the test, so later log records would fail to write."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
