"""``PersonDetector``: weights from local files (torchvision's format) and from torchvision's cache,
clear errors, person filtering, batches of mixed sizes. No network: downloads are simulated."""

from __future__ import annotations

import os
import pickle
import re
import urllib.error
from pathlib import Path

import pytest
import torch
from torchvision.models import detection
from torchvision.ops.misc import FrozenBatchNorm2d

from model.detector import DETECTORS, DetectorWeightsError, PersonDetector
from model.interfaces import Detector, PipelineItem
from model.pipeline import build_pipeline

SSD = "ssdlite320_mobilenet_v3_large"


def fresh_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    builder = DETECTORS[name][0]
    return builder(weights=None, weights_backbone=None, num_classes=91).state_dict()


@pytest.fixture(scope="module")
def ssd_state() -> dict[str, torch.Tensor]:
    return fresh_state_dict(SSD)


@pytest.fixture(scope="module")
def ssd_file(tmp_path_factory: pytest.TempPathFactory, ssd_state: dict[str, torch.Tensor]) -> Path:
    """A freshly initialised SSDlite whose person logits are raised, so it finds "persons"."""
    state = {k: v.clone() for k, v in ssd_state.items()}
    for key, value in state.items():
        if re.fullmatch(r"head\.classification_head\.module_list\.\d+\.1\.bias", key):
            value.view(-1, 91)[:, 1] += 6.0  # (anchors, classes): class 1 wins everywhere
    path = tmp_path_factory.mktemp("det") / "ssdlite.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def ssd_detector(ssd_file: Path) -> PersonDetector:
    return PersonDetector(SSD, ssd_file, score_threshold=0.5, max_persons=7, min_box_size=2.0)


def images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, 256, (3, 120, 160), generator=gen, dtype=torch.uint8),
        torch.randint(0, 256, (3, 200, 90), generator=gen, dtype=torch.uint8),
        torch.randint(0, 256, (3, 37, 301), generator=gen, dtype=torch.uint8),
    ]


def test_local_file_loads_strictly_and_detects_on_mixed_sizes(
    ssd_file: Path, ssd_detector: PersonDetector
) -> None:
    det = ssd_detector
    assert isinstance(det, Detector) and det.name == SSD and det.weights_sha256 is not None
    saved = torch.load(ssd_file, weights_only=True)
    loaded = det.net.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    batch = images()
    out = det(batch)
    assert len(out) == 3
    for img, boxes in zip(batch, out, strict=True):
        h, w = img.shape[1:]
        assert boxes.dtype == torch.float32 and boxes.shape[1] == 5 and 0 < boxes.shape[0] <= 7
        assert (boxes[:, 4] > 0.5).all() and (boxes[:-1, 4] >= boxes[1:, 4]).all()
        assert (boxes[:, 2:4] >= 2.0).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= w + 1e-3).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= h + 1e-3).all()
    (alone,) = det(batch[2:])
    torch.testing.assert_close(alone, out[2], atol=1e-3, rtol=1e-4)
    assert det([]) == []


def test_settings_filter_persons(ssd_file: Path, ssd_detector: PersonDetector) -> None:
    det, image = ssd_detector, images()[:1]
    assert det(image)[0].shape[0] == 7
    det.max_persons = 2
    assert det(image)[0].shape[0] == 2
    det.score_threshold = 0.9999
    assert det(image)[0].shape == (0, 5)
    det.score_threshold, det.min_box_size = 0.5, 1e6
    assert det(image)[0].shape == (0, 5)
    det.min_box_size, det.max_persons = 2.0, 7
    small = PersonDetector(SSD, ssd_file, max_persons=1, min_size=160)
    assert small.net.transform.fixed_size == (160, 160)
    assert small(images()[:1])[0].shape[0] == 1
    with pytest.raises(ValueError, match="max_persons"):
        PersonDetector(SSD, ssd_file, max_persons=0)


def test_frozen_batchnorm_models_accept_a_fresh_state_dict(tmp_path: Path) -> None:
    """fcos/mobilenet use FrozenBatchNorm2d like torchvision's pretrained builds; a fresh file (with
    num_batches_tracked) still loads strictly, and the network runs at a small input size."""
    name = "fcos_resnet50_fpn"
    path = tmp_path / "fcos.pth"
    torch.save(fresh_state_dict(name), path)
    det = PersonDetector(name, str(path), min_size=64, max_size=96, score_threshold=0.0)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in det.net.backbone.body.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in det.net.backbone.body.modules())
    out = det(images()[:2])
    assert [o.shape[1] for o in out] == [5, 5]


def test_unknown_name() -> None:
    with pytest.raises(KeyError, match="unknown detector 'yolo'"):
        PersonDetector("yolo")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        PersonDetector(SSD, tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(DetectorWeightsError, match="cannot read"):
        PersonDetector(SSD, garbage)
    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(DetectorWeightsError, match="expected a state_dict"):
        PersonDetector(SSD, not_dict)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_hostile_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pth"
    with hostile.open("wb") as f:
        pickle.dump({"x": _Payload(marker)}, f, protocol=2)
    with pytest.raises(DetectorWeightsError, match="cannot read"):
        PersonDetector(SSD, hostile)
    assert not marker.exists()


def test_wrong_keys_and_shapes_are_named(
    tmp_path: Path, ssd_state: dict[str, torch.Tensor]
) -> None:
    state = dict(ssd_state)
    missing = sorted(state)[3]
    state.pop(missing)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "keys.pth"
    torch.save(state, path)
    with pytest.raises(DetectorWeightsError, match="does not fit") as err:
        PersonDetector(SSD, path)
    assert missing in str(err.value) and "extra.weight" in str(err.value)

    state = dict(ssd_state)
    key = "head.regression_head.module_list.0.1.weight"
    state[key] = torch.zeros(3, 3, 1, 1)
    torch.save(state, path)
    with pytest.raises(DetectorWeightsError, match="size mismatch") as err:
        PersonDetector(SSD, path)
    assert key in str(err.value)


def test_another_models_file_is_refused(tmp_path: Path, ssd_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "ssd_for_fcos.pth"
    torch.save(ssd_state, path)
    with pytest.raises(DetectorWeightsError, match="does not fit fcos_resnet50_fpn"):
        PersonDetector("fcos_resnet50_fpn", path)


def test_enum_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ssd_state: dict[str, torch.Tensor]
) -> None:
    with pytest.raises(DetectorWeightsError, match=r"unknown weights 'COCO_V9'.*DEFAULT"):
        PersonDetector(SSD, "COCO_V9")
    with pytest.raises(DetectorWeightsError, match="not for ssdlite320"):
        PersonDetector(SSD, "FCOS_ResNet50_FPN_Weights.COCO_V1")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(DetectorWeightsError, match="not in torchvision's cache") as err:
        PersonDetector(SSD, "DEFAULT")
    assert str(tmp_path / "hub" / "checkpoints") in str(err.value) and "no network" in str(
        err.value
    )

    # the same name served from the cache, without any download
    url = detection.SSDLite320_MobileNet_V3_Large_Weights.DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in ssd_state.items()}
    torch.save(state, cached)
    det = PersonDetector(SSD, "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1")
    assert torch.equal(
        det.net.state_dict()["head.regression_head.module_list.0.1.bias"],
        torch.load(cached)["head.regression_head.module_list.0.1.bias"],
    )


def test_build_pipeline_with_a_torchvision_detector(ssd_file: Path) -> None:
    pipe = build_pipeline(
        model="distilpose_s",
        weights=None,
        detector=SSD,
        detector_weights=str(ssd_file),
        detector_settings={"max_persons": 2, "score_threshold": 0.5},
    )
    assert pipe.detector is not None and pipe.detector.max_persons == 2
    assert pipe.describe().detector == SSD
    (result,), stats = pipe.run([PipelineItem(image=images()[0])])
    assert stats.detect_images == 1 and len(result.persons) <= 2
    assert [p.score for p in result.persons] == sorted(
        (p.score for p in result.persons), reverse=True
    )
