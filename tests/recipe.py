"""The golden weight recipe ``crc32-v1`` and official-layout checkpoints built from it.

Every state_dict entry is drawn from a CPU generator seeded with the CRC-32 of its key, so S and L
weights are defined without any weight file (tests/golden/README.md, section 2).
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from model.distilpose import VARIANTS, DistilPose
from model.weights import KNOWN_WEIGHTS

RECIPE = "crc32-v1"


def recipe_tensor(key: str, built: torch.Tensor) -> torch.Tensor:
    """The recipe value of one entry, given its name and the freshly built tensor (for shape)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    s = tuple(built.shape)
    if key.endswith("num_batches_tracked") or key.endswith("pos_embedding"):
        v = built.detach().clone()  # 0 / the sine table
    elif key.endswith("running_mean"):
        v = 0.1 * torch.randn(s, generator=g)
    elif key.endswith("running_var"):
        v = 0.5 + torch.rand(s, generator=g)
    elif len(s) == 4:
        v = torch.randn(s, generator=g) * math.sqrt(2.0 / (s[1] * s[2] * s[3]))
    elif len(s) == 2:
        v = torch.randn(s, generator=g) / math.sqrt(s[1])
    elif key.endswith("keypoint_token"):
        v = 0.5 * torch.randn(s, generator=g)
    elif key.endswith(".weight") and len(s) == 1:
        v = 1.0 + 0.1 * torch.randn(s, generator=g)
    elif key.endswith(".bias"):
        v = 0.05 * torch.randn(s, generator=g)
    else:
        raise KeyError(f"no recipe rule for {key!r}")
    return v.to(built.dtype)


def recipe_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Recipe weights for every entry of ``model.state_dict()``, in the model's key order."""
    return OrderedDict((key, recipe_tensor(key, t.cpu())) for key, t in model.state_dict().items())


def sha256_sorted_concat(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 of every tensor's raw little-endian bytes, concatenated in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_official_checkpoint(variant: str, path: Path | str) -> Path:
    """Save recipe weights for ``variant`` in the official mmcv layout ``{"meta", "state_dict"}``.

    Keys are ``backbone.*`` and ``keypoint_head.tokenhead.*`` in the official state_dict order.
    """
    model = DistilPose(VARIANTS[variant], KNOWN_WEIGHTS[variant].info)
    state_dict = recipe_state_dict(model)
    path = Path(path)
    meta = {"mmcv_version": "1.7.2", "epoch": 0, "iter": 0, "recipe": RECIPE, "variant": variant}
    torch.save({"meta": meta, "state_dict": state_dict}, path)
    return path
