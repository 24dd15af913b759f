"""Session fixtures for every test area: official-layout checkpoints with recipe weights."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.recipe import write_official_checkpoint


@pytest.fixture(scope="session")
def distilpose_s_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DistilPose-S recipe weights (crc32-v1) as an mmcv-layout ``.pth``, built once per session."""
    return write_official_checkpoint("distilpose_s", tmp_path_factory.mktemp("weights") / "s.pth")


@pytest.fixture(scope="session")
def distilpose_l_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DistilPose-L recipe weights (crc32-v1) as an mmcv-layout ``.pth``, built once per session."""
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
