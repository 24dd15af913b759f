"""Issues 9 and 15: the reference pair's accuracy through the HTTP API, on the team's shared photos:
the 12 annotated persons of four COCO val2017 samples, three OCHuman samples and three portraits.

Only image 785 may be committed (tests/assets; see ``test_reference_http.py``); the others are
CC BY-NC(-ND/-SA) or research-only, so this module reads them, and their annotations, from the
shared folder at test time: ``$DISTILPOSE_SHARED_DATA`` (not a ``POSE_*`` variable: the service's
settings reject unknown ones), else ``<repo>/../shared/data``. Without that folder (a clone
elsewhere, CI) the module is skipped; a ``DISTILPOSE_SHARED_DATA`` that is set but lacks the samples
is an error. It is also skipped without the converted reference models (``pose-service models
fetch``).

The service runs as in ``test_reference_http.py``: a real uvicorn server on a localhost port, the
real engine, ``build_pipeline`` with ``blazepose_full`` and ``ssdlite_person`` and the catalogue's
recipe for them (SSDLite on the whole image and 2 x 2 tiles, person de-duplication at OKS 0.8, no
person where no keypoint scores above 0.2, each box's crop placed by BlazePose's pose detector:
``model.pose_detector.BodyRois``), the service's default options (flip test on, one pass, detector
score threshold 0.3). Each COCO image is posted to ``/v1/pose`` twice: as a
JSON body with the ground-truth boxes as caller boxes, and as multipart with no boxes (the detector
finds the persons). Accuracy is pycocotools' keypoint OKS: each annotated person's best OKS over the
predictions of its image, averaged over the persons with ``num_keypoints > 0``.

The same pair in-process through each CPU backend (``model.backends``: OpenVINO, ONNX Runtime, with
the landmark model, SSDLite and the pose detector's network exported) keeps the mean OKS of the COCO
samples within 0.005 of PyTorch's, with ground-truth boxes and with the detector's.

Measured with these defaults (torch backend): mean OKS 0.791 with ground-truth boxes, 0.758 with
the detector's (before the pose detector placed the crops: 0.758 and 0.747; 0.582 with the
detector before issue 15's tiles). Issue 15's targets, all met: >= 0.65 with the detector, >= 0.77
with ground-truth boxes, every annotated person of COCO 197388 and OCHuman 003896 found (lowest
best OKS 0.345 and 0.359), no two answered persons of one image with OKS > 0.8 (largest 0.319),
hips on the Grace Hopper and astronaut portraits scoring < 0.3 (0.0: the pose detector's
body-centred crop puts them below the picture; a box-centred crop drew them inside it at 0.94-0.98).
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

from tests.model.test_backends import OKS_TOL, onnx_cache
from tests.model.test_reference import coco_oks
from tests.service.rest_support import LiveServer
from tests.service.test_reference_http import reference_service

SHARED_DATA_ENV = "DISTILPOSE_SHARED_DATA"
DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SAMPLES = "coco_val2017_samples"
ANNOTATIONS = "test_coco.json"
ANNOTATED_PERSONS = 12
# Issue 9's bar with GT boxes is 0.70, issue 15's 0.77 (measured 0.791: room for other CPUs, torch
# versions and JPEG decoders). With the detector, issue 15's 0.65 (measured 0.758).
MEAN_OKS_WITH_GT_BOXES = 0.77
MEAN_OKS_WITH_DETECTOR = 0.65
FOUND_OKS = 0.3  # an annotated person is found when some answered person has OKS above this
DUPLICATE_OKS = 0.8  # no two answered persons of one image are this alike
ABSENT_SCORE = 0.3  # a keypoint outside the picture (the portraits' hips) scores below this
OCHUMAN = "ochuman_samples"
OCHUMAN_ANNOTATIONS = "test_ochuman.json"
PORTRAITS = ("matplotlib_grace_hopper.jpg", "skimage_astronaut.png", "skimage_camera.png")
HIPS = (11, 12)  # COCO left_hip, right_hip


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
        f"\n[issues 9, 15 OKS over HTTP] {what}: mean OKS {oks:.4f} over {n} persons, "
        f"keypoint AP {ap:.4f}, persons per image {counts}, 4 requests in {seconds:.1f} s"
    )


def gt_box_answers(http: httpx.Client, samples: Path, coco: Any) -> dict[int, list[dict]]:
    """Each COCO sample posted as a JSON body with its annotated persons' boxes."""
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
    return persons


@pytest.fixture(scope="module")
def gt_answers(http: httpx.Client, samples: Path, coco: Any) -> dict[int, list[dict]]:
    return gt_box_answers(http, samples, coco)


def test_mean_oks_with_ground_truth_boxes(coco: Any, gt_answers: dict[int, list[dict]]) -> None:
    """JSON bodies (base64 image) with the annotated persons' boxes as caller boxes."""
    assert mean_best_oks(coco, gt_answers)[0] >= MEAN_OKS_WITH_GT_BOXES


def detect(http: httpx.Client, path: Path, size: tuple[int, int] | None = None) -> list[dict]:
    """The persons ``/v1/pose`` answers for a multipart upload of ``path`` with no boxes."""
    kind = "image/png" if path.suffix == ".png" else "image/jpeg"
    answer = http.post("/v1/pose", files={"image": (path.name, path.read_bytes(), kind)})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    if size is not None:
        assert body["image"] == {"width": size[0], "height": size[1]}
    return list(body["persons"])


@pytest.fixture(scope="module")
def detector_answers(http: httpx.Client, samples: Path, coco: Any) -> dict[int, list[dict]]:
    """Each COCO sample posted as multipart with no boxes: ssdlite_person finds the persons."""
    persons: dict[int, list[dict]] = {}
    started = time.perf_counter()
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        size = (info["width"], info["height"])
        persons[image_id] = detect(http, samples / info["file_name"], size)
    seconds = time.perf_counter() - started
    oks, ap, n = mean_best_oks(coco, persons)
    report("ssdlite_person boxes", oks, ap, n, [len(p) for p in persons.values()], seconds)
    return persons


def test_mean_oks_with_the_detector(coco: Any, detector_answers: dict[int, list[dict]]) -> None:
    oks, _, n = mean_best_oks(coco, detector_answers)
    assert n == ANNOTATED_PERSONS
    assert oks >= MEAN_OKS_WITH_DETECTOR


@pytest.fixture(scope="module")
def ochuman(samples: Path) -> tuple[Path, Any]:
    """The OCHuman samples' folder and pycocotools index (skips where they are absent)."""
    from pycocotools.coco import COCO

    folder = samples.parent / OCHUMAN
    if not (folder / OCHUMAN_ANNOTATIONS).is_file():
        pytest.skip(f"no {OCHUMAN}/{OCHUMAN_ANNOTATIONS} beside {samples}")
    with contextlib.redirect_stdout(io.StringIO()):
        return folder, COCO(str(folder / OCHUMAN_ANNOTATIONS))


@pytest.fixture(scope="module")
def ochuman_answers(http: httpx.Client, ochuman: tuple[Path, Any]) -> dict[int, list[dict]]:
    folder, index = ochuman
    return {
        image_id: detect(http, folder / index.loadImgs(image_id)[0]["file_name"])
        for image_id in index.getImgIds()
    }


def best_oks(annotation: dict, persons: list[dict]) -> float:
    """The annotated person's best OKS over the answered persons (0 when none)."""
    return max((coco_oks(p["keypoints"], annotation) for p in persons), default=0.0)


@pytest.mark.parametrize(
    ("dataset", "file_name"), [("coco", "000000197388.jpg"), ("ochuman", "003896.jpg")]
)
def test_every_annotated_person_is_found(
    dataset: str,
    file_name: str,
    coco: Any,
    detector_answers: dict[int, list[dict]],
    ochuman: tuple[Path, Any],
    ochuman_answers: dict[int, list[dict]],
) -> None:
    """Issue 15: COCO 197388's three central skiers and OCHuman 003896's pair were missed."""
    index, answers = (
        (coco, detector_answers) if dataset == "coco" else (ochuman[1], ochuman_answers)
    )
    (image_id,) = [i for i in index.getImgIds() if index.loadImgs(i)[0]["file_name"] == file_name]
    found = [best_oks(a, answers[image_id]) for a in annotated(index, image_id)]
    print(f"\n[issue 15] {file_name}: best OKS per annotated person {np.round(found, 3).tolist()}")
    assert min(found) > FOUND_OKS, found


def pair_oks(first: dict, second: dict) -> float:
    """COCO OKS of two answered persons, each taken in turn as the annotation (its box's area)."""

    def as_annotation(person: dict) -> dict:
        x, y, w, h = person["bbox"]
        points = [[px, py, 2] for px, py, _ in person["keypoints"]]
        return {
            "keypoints": np.ravel(points).tolist(),
            "num_keypoints": 17,
            "area": w * h,
            "bbox": [x, y, w, h],
            "iscrowd": 0,
            "category_id": 1,
        }

    return max(
        coco_oks(second["keypoints"], as_annotation(first)),
        coco_oks(first["keypoints"], as_annotation(second)),
    )


def test_no_person_is_answered_twice(
    http: httpx.Client,
    samples: Path,
    detector_answers: dict[int, list[dict]],
    ochuman_answers: dict[int, list[dict]],
) -> None:
    """Issue 15: OCHuman 003799 had two skeletons on one player (a duplicate box)."""
    answers = list(detector_answers.values()) + list(ochuman_answers.values())
    answers += [detect(http, samples.parent / name) for name in PORTRAITS]
    worst = max(
        (
            pair_oks(a, b)
            for persons in answers
            for i, a in enumerate(persons)
            for b in persons[i + 1 :]
        ),
        default=0.0,
    )
    print(f"\n[issue 15] largest OKS between two answered persons of one image: {worst:.3f}")
    assert worst <= DUPLICATE_OKS


def test_portraits_answer_one_person(http: httpx.Client, samples: Path) -> None:
    """One person each (the tiles alone answer 1, 3 and 2: a tile's box around a shoulder or a
    tripod is dropped because BlazePose scores no keypoint above 0.2 there)."""
    counts = [len(detect(http, samples.parent / name)) for name in PORTRAITS]
    assert counts == [1, 1, 1]


@pytest.mark.parametrize("name", PORTRAITS[:2])
def test_hips_outside_the_picture_score_low(http: httpx.Client, samples: Path, name: str) -> None:
    """Issue 15: the pose detector's body-centred crop puts the hips below the picture."""
    persons = detect(http, samples.parent / name)
    assert persons
    hips = [persons[0]["keypoints"][k][2] for k in HIPS]
    assert max(hips) < ABSENT_SCORE, hips


# ------------------------------------------------------------------------- per backend, in-process


@pytest.fixture(scope="module")
def backend_answers(
    samples: Path, coco: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[dict[int, list[dict]], dict[int, list[dict]]]]:
    """backend -> (answers with ground-truth boxes, answers with the detector's), in-process
    (``build_pipeline`` with the catalogue's recipe, the default options)."""
    import torch
    from PIL import Image

    from model.interfaces import PipelineItem, PoseOptions
    from model.pipeline import build_pipeline
    from model.reference import default_cache_dir, reference_models_available

    cache = default_cache_dir()
    if not reference_models_available(cache):
        pytest.skip(f"reference models not in the cache {cache}: run `pose-service models fetch`")
    ids = coco.getImgIds()
    images = {}
    for i in ids:
        rgb = Image.open(samples / coco.loadImgs(i)[0]["file_name"]).convert("RGB")
        images[i] = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()
    boxes = {i: torch.tensor([a["bbox"] for a in annotated(coco, i)]) for i in ids}
    out = {}
    for backend in ("torch", "openvino", "onnxruntime"):
        pipeline = build_pipeline(
            model="blazepose_full",
            weights=str(cache / "blazepose_full.safetensors"),
            detector="ssdlite_person",
            detector_weights=str(cache / "ssdlite_person.safetensors"),
            backend=backend,
            cache_dir=onnx_cache(tmp_path_factory),
        )
        answers: tuple[dict[int, list[dict]], dict[int, list[dict]]] = ({}, {})
        for i in ids:
            for found, given in zip(answers, (boxes[i], None), strict=True):
                (result,), _ = pipeline.run([PipelineItem(images[i], given, PoseOptions())])
                found[i] = [
                    {"keypoints": [list(k) for k in p.keypoints], "score": p.score}
                    for p in result.persons
                ]
        out[backend] = answers
    return out


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_each_backend_keeps_the_mean_oks(
    backend: str,
    coco: Any,
    backend_answers: dict[str, tuple[dict[int, list[dict]], dict[int, list[dict]]]],
) -> None:
    """Mean OKS through the backend within 0.005 of PyTorch's, with both kinds of boxes."""
    for kind, want, got in zip(
        ("ground-truth boxes", "ssdlite_person boxes"),
        backend_answers["torch"],
        backend_answers[backend],
        strict=True,
    ):
        oks_torch, oks_backend = mean_best_oks(coco, want)[0], mean_best_oks(coco, got)[0]
        print(f"\n[{backend}] {kind}: mean OKS {oks_backend:.4f} (torch {oks_torch:.4f})")
        assert abs(oks_backend - oks_torch) <= OKS_TOL, (kind, oks_torch, oks_backend)
