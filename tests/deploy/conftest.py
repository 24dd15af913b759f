"""The Helm tests run in a pytest process of their own.

``helm_python`` loads Helm's Go library (``libhelm_c.so``) into the process, and with it Go's
runtime and its signal handlers; a later test of the same process that uses sockets, threads and
subprocesses was seen to die with SIGSEGV there (gdb: Go's runtime, main thread). So the main run
does not collect ``test_helm.py``; ``test_helm_in_its_own_process.py`` runs it in a child pytest
and fails with the child's output when it fails.
"""

from __future__ import annotations

import os
from pathlib import Path

HELM_TESTS = Path(__file__).with_name("test_helm.py")
CHILD_ENV = "POSE_TESTS_HELM_CHILD"


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    if collection_path == HELM_TESTS and os.environ.get(CHILD_ENV) != "1":
        return True
    return None
