"""Issue 9's accuracy figures reached through the HTTP API, on the 12 annotated persons of the four
COCO val2017 samples in the team's shared data folder.

Only image 785 may be committed (tests/assets; see ``test_reference_http.py``); the other three
are CC BY-NC(-ND/-SA), so this module reads all four, and their annotations, from the shared folder
at test time: ``$DISTILPOSE_SHARED_DATA`` (not a ``POSE_*`` variable: the service's settings
reject unknown ones), else ``<repo>/../shared/data``. Without that folder (a clone elsewhere, CI)
the module is skipped; a ``DISTILPOSE_SHARED_DATA`` that is set but lacks the samples is an
error. It is also skipped without the converted reference models (``pose-service models fetch``).

The service runs as in ``test_reference_http.py``: a real uvicorn server on a localhost port, the
real engine, ``build_pipeline`` with ``blazepose_full`` and ``ssdlite_person``, the service's
default options (flip test on, padding 1.5, one pass, detector score threshold 0.3). Each image is
posted to ``/v1/pose`` twice: as a JSON body with the ground-truth boxes as caller boxes, and as
multipart with no boxes (the detector finds the persons). Accuracy is pycocotools' keypoint OKS:
each annotated person's best OKS over the predictions of its image, averaged over the persons
with ``num_keypoints > 0``. Issue 9 asks for mean OKS 0.70-0.76 with ground-truth boxes and
0.50-0.60 with the detector's; measured through the pipeline with these defaults: 0.758 and 0.582.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.service.rest_support import LiveServer
from tests.service.test_reference_http import reference_service

SHARED_DATA_ENV = "DISTILPOSE_SHARED_DATA"
DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SAMPLES = "coco_val2017_samples"
ANNOTATIONS = "test_coco.json"
ANNOTATED_PERSONS = 12
# Issue 9's bars are 0.70 (GT boxes) and 0.50 (detector); these sit just under the measured
# defaults (0.758 and 0.582) so a regression of a few points fails, with room for other CPUs,
# torch versions and JPEG decoders.
MEAN_OKS_WITH_GT_BOXES = 0.74
MEAN_OKS_WITH_DETECTOR = 0.55


def shared_samples_dir() -> Path | None:
    """The folder of the COCO samples, or None when the shared data is absent.

    Raises:
        FileNotFoundError: ``$DISTILPOSE_SHARED_DATA`` is set but holds no samples.
    """
    given = os.environ.get(SHARED_DATA_ENV)
    samples = (Path(given) if given else DEFAULT_SHARED_DATA) / SAMPLES
    if (samples / ANNOTATIONS).is_file():
        return samples
    if given:
        raise FileNotFoundError(f"{SHARED_DATA_ENV}={given} has no {SAMPLES}/{ANNOTATIONS}")
    return None


@pytest.fixture(scope="module")
def samples() -> Path:
    """The samples folder; skips the module without the shared data."""
    found = shared_samples_dir()
    if found is None:
        pytest.skip(
            f"shared COCO samples not found at {DEFAULT_SHARED_DATA / SAMPLES} (they may not be "
            f"committed): set {SHARED_DATA_ENV} to the folder holding {SAMPLES}/"
        )
    return found


@pytest.fixture(scope="module")
def coco(samples: Path) -> Any:
    """pycocotools' COCO index of the samples' annotations."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(samples / ANNOTATIONS))


@pytest.fixture(scope="module")
def live(samples: Path) -> Iterator[LiveServer]:
    with reference_service() as server:
        yield server


@pytest.fixture(scope="module")
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=120) as client:
        yield client


def annotated(coco: Any, image_id: int) -> list[dict]:
    """The image's annotations with at least one labelled keypoint, in file order."""
    return [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if a["num_keypoints"] > 0]


def mean_best_oks(coco: Any, persons: dict[int, list[dict]]) -> tuple[float, float, int]:
    """Mean over annotated persons of their best OKS over the image's predictions, and COCO AP.

    Args:
        coco: the ground truth.
        persons: image id -> the ``persons`` of its ``/v1/pose`` answer.

    Returns:
        (mean best OKS, keypoint AP, number of annotated persons).
    """
    from pycocotools.cocoeval import COCOeval

    results = [
        {
            "image_id": image_id,
            "category_id": 1,
            "keypoints": np.ravel(person["keypoints"]).tolist(),
            "score": person["score"],
        }
        for image_id, found in persons.items()
        for person in found
    ]
    if not results:  # loadRes refuses an empty list
        return 0.0, 0.0, sum(len(annotated(coco, i)) for i in coco.getImgIds())
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), "keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    best = []
    for image_id in coco.getImgIds():
        # (detections by score, all the image's annotations in getAnnIds order); [] without any
        ious = evaluator.ious[(image_id, 1)]
        for column, ann in enumerate(coco.loadAnns(coco.getAnnIds(imgIds=image_id))):
            if ann["num_keypoints"] > 0:
                best.append(float(np.max(ious[:, column])) if len(ious) else 0.0)
    return float(np.mean(best)), float(evaluator.stats[0]), len(best)


def image_bytes(samples: Path, coco: Any, image_id: int) -> bytes:
    return (samples / coco.loadImgs(image_id)[0]["file_name"]).read_bytes()


def report(what: str, oks: float, ap: float, n: int, counts: list[int], seconds: float) -> None:
    print(
        f"\n[issue 9 OKS over HTTP] {what}: mean OKS {oks:.4f} over {n} persons, "
        f"keypoint AP {ap:.4f}, persons per image {counts}, 4 requests in {seconds:.1f} s"
    )


def test_mean_oks_with_ground_truth_boxes(http: httpx.Client, samples: Path, coco: Any) -> None:
    """JSON bodies (base64 image) with the annotated persons' boxes as caller boxes."""
    persons: dict[int, list[dict]] = {}
    started = time.perf_counter()
    for image_id in coco.getImgIds():
        boxes = [ann["bbox"] for ann in annotated(coco, image_id)]
        image = base64.b64encode(image_bytes(samples, coco, image_id)).decode()
        answer = http.post("/v1/pose", json={"image": image, "boxes": boxes})
        assert answer.status_code == 200, answer.text
        persons[image_id] = answer.json()["persons"]
        # one person per caller box, in the boxes' order
        returned = [p["bbox"] for p in persons[image_id]]
        assert np.allclose(returned, boxes, atol=1e-3), (returned, boxes)
    seconds = time.perf_counter() - started
    oks, ap, n = mean_best_oks(coco, persons)
    report("ground-truth boxes", oks, ap, n, [len(p) for p in persons.values()], seconds)
    assert n == ANNOTATED_PERSONS
    assert oks >= MEAN_OKS_WITH_GT_BOXES


def test_mean_oks_with_the_detector(http: httpx.Client, samples: Path, coco: Any) -> None:
    """Multipart uploads with no boxes: ssdlite_person finds the persons."""
    persons: dict[int, list[dict]] = {}
    started = time.perf_counter()
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        upload = {"image": (info["file_name"], image_bytes(samples, coco, image_id), "image/jpeg")}
        answer = http.post("/v1/pose", files=upload)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["image"] == {"width": info["width"], "height": info["height"]}
        persons[image_id] = body["persons"]
    seconds = time.perf_counter() - started
    oks, ap, n = mean_best_oks(coco, persons)
    report("ssdlite_person boxes", oks, ap, n, [len(p) for p in persons.values()], seconds)
    assert n == ANNOTATED_PERSONS
    assert oks >= MEAN_OKS_WITH_DETECTOR
