"""``tests.model.tf32.tf32_off`` after a CUDA pipeline has set torch's fp32_precision flags (the
CUDA tests' order in one process; checked on any build: the flags exist without CUDA)."""

from __future__ import annotations

import pytest
import torch

from model.pipeline import _ieee_fp32_on_cuda
from tests.model.tf32 import tf32_off

NEW_API = hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


@pytest.mark.skipif(not NEW_API, reason="a torch without the fp32_precision flags")
def test_tf32_off_works_after_a_cuda_pipeline_turned_tf32_off() -> None:
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    try:
        _ieee_fp32_on_cuda()  # what building a CUDA pipeline does first
        # why the tests no longer read the legacy flags: torch refuses from here on
        with pytest.raises(RuntimeError, match="TF32"):
            _ = torch.backends.cudnn.allow_tf32
        conv.fp32_precision = matmul.fp32_precision = "tf32"
        with tf32_off():
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
