"""Runs ``test_helm.py`` in a child pytest (see ``tests/deploy/conftest.py`` for why)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.conftest import CHILD_ENV, HELM_TESTS

ROOT = Path(__file__).resolve().parents[2]


# ~30 s alone on 2 cores (the chart rendered and validated against two Kubernetes versions).
@pytest.mark.timeout(300)
def test_helm_chart_tests_pass_in_their_own_process() -> None:
    env = {**os.environ, CHILD_ENV: "1"}
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HELM_TESTS)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and "error" not in child.stdout.splitlines()[-1]
