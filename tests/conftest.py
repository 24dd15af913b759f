"""Session fixtures for every test area: official-layout checkpoints with recipe weights."""

from __future__ import annotations

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
