"""The CI skip guard of ``tests/conftest.py``, run on a throwaway test file in a child pytest.

Under ``CI=true`` a skip for a missing tool or package (``skipif``, ``pytest.skip`` in a fixture,
``importorskip`` in a test or at module level) must fail, while a CUDA skip and the shared-data
skip stay skips; without ``CI`` every one of them is a plain skip. The terminal summary lists
each skip with its reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SAMPLE = """
import pytest

@pytest.mark.skipif(True, reason="grpcurl is not installed")
def test_tool():
    pass

@pytest.fixture
def shared():
    pytest.skip("shared COCO samples not found at /nowhere")

def test_shared(shared):
    pass

@pytest.mark.skipif(True, reason="needs CUDA")
def test_cuda():
    pass

def test_package():
    pytest.importorskip("no_such_package_for_the_ci_guard")

@pytest.mark.xfail(reason="expected", run=False)
def test_xfail():
    pass
"""

MODULE_SKIP = (
    'import pytest\n\npytest.importorskip("no_such_package_either")\n\n\ndef test_x():\n    pass\n'
)


def run_pytest(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    """pytest on the two sample files with only the guard's conftest loaded as a plugin."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "test_module.py").write_text(MODULE_SKIP)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider"),
            *("-q", "-rN", "--continue-on-collection-errors", f"--rootdir={tmp_path}"),
            *("test_sample.py", "test_module.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


def test_off_ci_every_skip_is_a_skip_and_is_listed(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, ci=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 skipped, 1 xfailed in" in done.stdout, done.stdout
    summary = done.stdout.split("skips (CI accepts only CUDA and shared-data skips)")[1]
    assert "test_sample.py::test_tool: FAILS on CI: grpcurl is not installed" in summary
    assert "test_sample.py::test_package: FAILS on CI: could not import" in summary
    assert "test_module.py: FAILS on CI: could not import 'no_such_package_either'" in summary
    assert "test_sample.py::test_cuda: allowed on CI (CI has no GPU): needs CUDA" in summary
    assert (
        "test_sample.py::test_shared: allowed on CI (../shared beside the checkout is the "
        "team's, not CI's): shared COCO samples" in summary
    )


def test_on_ci_only_cuda_and_shared_data_may_skip(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, ci=True)
    assert done.returncode == 1, done.stdout + done.stderr
    # test_package fails in its call; test_tool's skipif and the module's import are errors.
    assert "1 failed, 2 skipped, 1 xfailed, 2 errors in" in done.stdout, done.stdout
    out = done.stdout
    assert "ERROR at setup of test_tool" in out and "ERROR collecting test_module.py" in out
    assert out.count("skipped under CI=true") == 3
    for reason in ("grpcurl is not installed", "no_such_package_for", "no_such_package_either"):
        assert reason in out, reason
