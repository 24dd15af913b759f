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

from model.pipeline import _ieee_fp32_on_cuda


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """fp32 is IEEE fp32 on CUDA (convolutions and matmuls) inside the block: switched by the
    pipeline's own ``_ieee_fp32_on_cuda``, restored through the API it used."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    new_api = conv is not None and hasattr(conv, "fp32_precision")
    if new_api:
        saved = (conv.fp32_precision, matmul.fp32_precision)
    else:  # torch without the fp32_precision API
        saved = (matmul.allow_tf32, cudnn.allow_tf32)
    _ieee_fp32_on_cuda()
    try:
        yield
    finally:
        if new_api:
            conv.fp32_precision, matmul.fp32_precision = saved
        else:
            matmul.allow_tf32, cudnn.allow_tf32 = saved
