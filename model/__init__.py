"""DistilPose pose estimation in plain PyTorch: models, weight files, top-down geometry.

``create_model`` is the one entry point that joins an architecture (``model.distilpose``) with a
weight file and its metadata (``model.weights``)::

    from model import create_model
    net = create_model("distilpose_s", weights="distilpose_s.pth")  # or None for random init
    out = net.predict(crops)  # (N, 3, 256, 192) normalised RGB -> PoseOutput

It lives here rather than in ``model/distilpose.py`` because ``model.weights`` needs the
architecture to validate files strictly, and the architecture must not depend on file handling.
``model.weights`` is imported when ``create_model`` runs, not with the package, so that
``python -m model.weights`` (the converter CLI) does not import that module twice.

Importing the package imports no PyTorch: ``model.distilpose`` (and torch) load on first use of
its names here, so that a process that only reads the catalogue or the interfaces (the service's
supervising parent, the CLI's parser) does not spend 2 s and hundreds of MB on torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from model.distilpose import VARIANTS, DistilPose, DistilPoseConfig, DistilPoseOutput

__all__ = ["VARIANTS", "DistilPose", "DistilPoseConfig", "DistilPoseOutput", "create_model"]
_FROM_DISTILPOSE = frozenset(__all__) - {"create_model"}


def __getattr__(name: str) -> Any:
    """``VARIANTS`` and the classes, from ``model.distilpose`` when first asked for."""
    if name in _FROM_DISTILPOSE:
        from model import distilpose

        return getattr(distilpose, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")


def create_model(
    name: str | None,
    weights: Path | str | None = None,
    device: str | torch.device = "cpu",
) -> DistilPose:
    """Build a DistilPose student in eval mode, optionally loading a weight file strictly.

    Args:
        name: "distilpose_s" or "distilpose_l"; None infers it from ``weights``.
        weights: official checkpoint (``.pth``) or ``.safetensors``; None keeps a random init.
        device: where to put the model.

    Raises:
        KeyError: unknown name.
        ValueError: ``name`` and ``weights`` both None.
        model.weights.WeightsError: the file is unsafe, unreadable, of another variant, or its
            keys do not match.
    """
    import torch

    from model.distilpose import VARIANTS, DistilPose
    from model.weights import KNOWN_WEIGHTS, load_state_dict, sha256_file

    if name is not None and name not in VARIANTS:
        raise KeyError(f"unknown model {name!r}; choose one of {sorted(VARIANTS)}")
    state_dict = None
    if weights is not None:
        state_dict, name = load_state_dict(weights, variant=name)
    if name is None:
        raise ValueError("create_model needs a model name or a weight file to infer it from")
    config, info = VARIANTS[name], KNOWN_WEIGHTS[name].info
    if state_dict is None:
        net = DistilPose(config, info)
        net.init_weights()
    else:
        # Build without storage and adopt the loaded tensors: no random init, no copy.
        with torch.device("meta"):
            net = DistilPose(config, info)
        net.load_state_dict(state_dict, strict=True, assign=True)
        net.weights_sha256 = sha256_file(weights)  # type: ignore[arg-type]
    return net.to(device).eval()
