"""TF32 off for a CUDA test's block, and back as it was after.

A CUDA pipeline (``model.pipeline``) turns TF32 off process-wide through torch's
``fp32_precision`` flags. From then on, *reading* the legacy ``torch.backends.cudnn.allow_tf32``
raises a RuntimeError ("cuDNN conv and cuDNN RNN have different TF32 flags ... mix of the legacy
and new APIs", torch 2.11 and 2.14 alike), so a test that saved the legacy flags failed whenever
it ran after one that had built a CUDA pipeline. ``tf32_off`` saves and restores through the same
API the pipeline uses, and the legacy flags only on a torch without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """fp32 is IEEE fp32 on CUDA (convolutions and matmuls) inside the block."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):
        saved = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision = "ieee"
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
    else:  # torch without the fp32_precision API
        legacy = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy
