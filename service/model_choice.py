"""Which pose model and detector ``pose-service serve`` runs: the settings read against the model
catalogue (``model.catalogue``) and the reference-model cache, with a clear ``SetupError`` when
nothing servable was asked for. Called by the composition root (``service.__main__``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from model.catalogue import CATALOGUE, DEFAULT_DETECTOR, DEFAULT_POSE_MODEL, names, spec_of
from service.settings import Settings

__all__ = ["DETECTOR_SETTINGS", "ModelChoice", "SetupError", "choose_model"]

logger = logging.getLogger("service")

_FETCH_HINT = "run `pose-service models fetch` once (it caches the reference models)"
# Settings field -> the detector setting it sets (``model.catalogue.DETECTOR_SETTINGS``); which
# detector accepts which is the catalogue's ``ModelSpec.detector_settings``.
DETECTOR_SETTINGS = {
    "detector_score_threshold": "score_threshold",
    "detector_nms_iou": "nms_iou",
    "detector_max_persons": "max_persons",
    "detector_min_box_size_px": "min_box_size",
    "detector_min_size_px": "min_size",
    "detector_max_size_px": "max_size",
}


class SetupError(Exception):
    """The settings cannot be served; the message says what to do."""


@dataclass(frozen=True)
class ModelChoice:
    """What ``build_pipeline`` is called with, and how to describe it in the logs."""

    model: str | None
    weights: str | None
    detector: str | None
    detector_weights: str | None
    summary: str
    # build_pipeline's detector_settings: only the keys that are set, under the detector's names.
    detector_settings: Mapping[str, Any] = dataclass_field(default_factory=dict)


def choose_model(settings: Settings) -> ModelChoice:
    """Decide the pose model and detector from the settings, the catalogue and the cache.

    Raises:
        SetupError: nothing servable was asked for, or a file or the cache is missing.
    """
    spec = CATALOGUE.get(settings.model) if settings.model is not None else None
    if spec is not None and spec.role == "pose" and spec.weights == "none":
        return _choose_no_network(settings, spec.name)
    paths = _cached(settings.cache_path())
    if settings.detector == "auto":
        detector = DEFAULT_DETECTOR if DEFAULT_DETECTOR in paths else None
    else:
        detector = None if settings.detector == "none" else settings.detector
    detector_weights = settings.detector_weights
    if detector is not None:
        try:
            det_spec = spec_of(detector, "detector")
        except KeyError as exc:
            raise SetupError(f"--detector {detector}: {exc.args[0]}") from exc
        if det_spec.weights == "cache" and detector_weights is None:
            if detector not in paths:
                raise SetupError(f"the {detector} detector is not cached: {_FETCH_HINT}")
            detector_weights = str(paths[detector])
        # A torchvision detector named without weights gets its published COCO weights (from
        # torchvision's cache, downloaded where a network exists), never a silent random init.
        if detector_weights is None:
            detector_weights = det_spec.default_weights
        is_file = detector_weights is not None and not _is_weights_name(detector_weights, det_spec)
        if is_file and not Path(str(detector_weights)).expanduser().is_file():
            raise SetupError(f"--detector-weights: no such file: {detector_weights}")
    if settings.weights is not None and not Path(settings.weights).expanduser().is_file():
        raise SetupError(f"--weights: no such file: {settings.weights}")

    model, weights = settings.model, settings.weights
    if model is None and weights is None:
        model = DEFAULT_POSE_MODEL
    if model is not None and model not in names("pose"):
        raise SetupError(f"--model {model}: unknown model (known: {', '.join(names('pose'))})")
    spec = CATALOGUE[model] if model is not None else None
    if weights is not None:
        summary = f"{model or 'DistilPose (variant from the checkpoint)'} from {weights}"
    elif spec is not None and spec.weights == "cache":
        if model not in paths:
            raise SetupError(
                "no model to serve: pass --weights PATH (a DistilPose checkpoint), or "
                f"{_FETCH_HINT} and start again to serve the reference model {model}"
            )
        weights = str(paths[model])
        summary = f"reference model {model} from {weights}"
    elif spec is not None and spec.weights_required:
        if not settings.allow_random_weights:
            raise SetupError(
                f"--model {model} needs --weights PATH (an official DistilPose checkpoint); "
                "add --allow-random-weights for a smoke run with random weights"
            )
        summary = f"{model} with RANDOM weights (smoke run: the poses are meaningless)"
    else:
        summary = f"{model}"
    detector_settings = _detector_settings(settings, detector)
    summary += f"; detector {detector or 'none (caller boxes, else the whole image)'}"
    if detector_settings:
        summary += " with " + ", ".join(f"{k}={v}" for k, v in detector_settings.items())
    return ModelChoice(model, weights, detector, detector_weights, summary, detector_settings)


def _choose_no_network(settings: Settings, model: str) -> ModelChoice:
    """A model without a network (``identity``): no weights, no detector (SetupError if named)."""
    if settings.weights is not None:
        raise SetupError(f"--model {model} has no weights: drop --weights {settings.weights}")
    if settings.detector not in ("auto", "none"):
        raise SetupError(
            f"--model {model} answers the caller's boxes and runs no detector: drop --detector "
            f"{settings.detector} (or pass --detector none)"
        )
    _detector_settings(settings, None)  # warns that any detector settings are ignored
    summary = f"{model} (no network: caller boxes come back with zero keypoints); detector none"
    return ModelChoice(model, None, None, None, summary)


def _is_weights_name(weights: str, spec: Any) -> bool:
    """Whether a torchvision detector's ``weights`` is a weights enum name ("DEFAULT",
    "COCO_V1", "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1") rather than a file."""
    if spec.weights != "torchvision" or Path(weights).expanduser().exists():
        return False
    return all(part.isidentifier() for part in weights.split("."))


def _detector_settings(settings: Settings, detector: str | None) -> dict[str, Any]:
    """The detector settings that are set, under the detector's keyword names.

    Raises:
        SetupError: a setting the chosen detector does not have (the catalogue says which).
    """
    given = {
        name: getattr(settings, name)
        for name in DETECTOR_SETTINGS
        if getattr(settings, name) is not None
    }
    if detector is None:
        if given:
            logger.warning("no person detector runs: ignoring %s", ", ".join(sorted(given)))
        return {}
    spec = spec_of(detector, "detector")
    accepted = spec.detector_settings
    unsupported = [name for name in given if DETECTOR_SETTINGS[name] not in accepted]
    if unsupported:
        flags = ", ".join(
            f"--{name.replace('_', '-')} / POSE_{name.upper()}" for name in unsupported
        )
        raise SetupError(
            f"{flags}: not a setting of the {detector} detector (its input: {spec.input_spec}; "
            f"it accepts {', '.join(accepted)})"
        )
    return {DETECTOR_SETTINGS[name]: value for name, value in given.items()}


def _cached(cache_dir: Path) -> dict[str, Path]:
    """The cached reference models by name ({} when not cached)."""
    from model.reference import fetch_reference_models, reference_models_available

    if not reference_models_available(cache_dir):
        return {}
    return dict(fetch_reference_models(cache_dir))  # cached: no download
