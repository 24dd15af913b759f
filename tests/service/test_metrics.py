"""Metrics (service.metrics): fixed names, a private registry per instance, the engine observer,
and a clean ``promtool check metrics``."""

from __future__ import annotations

import shutil

import pytest
import torch

from model.interfaces import BatchStats, ModelDescription, PoseOptions
from model.keypoints import COCO_KEYPOINT_NAMES, COCO_SKELETON
from service.metrics import Metrics
from tests.service.rest_support import promtool_check

NAMES = (
    "pose_requests_total",
    "pose_request_duration_seconds",
    "pose_queue_wait_seconds",
    "pose_batch_size",
    "pose_inference_seconds",
    "pose_queue_depth",
    "pose_persons_per_image",
    "pose_model_info",
)


class FakeEngine:
    def queue_depth(self) -> int:
        return 3

    def model_info(self) -> ModelDescription:
        return ModelDescription(
            model="distilpose_s",
            weights_sha256="ab" * 32,
            input_size=(192, 256),
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            padding=1.25,
            keypoint_names=COCO_KEYPOINT_NAMES,
            skeleton=COCO_SKELETON,
            has_sigmas=True,
            detector=None,
            detector_weights_sha256=None,
            device="cpu",
            max_crops_per_batch=256,
            defaults=PoseOptions(),
            oks_nms_threshold=0.9,
        )


def filled() -> Metrics:
    metrics = Metrics()
    metrics.bind_engine(FakeEngine())
    metrics.observe_request("http", 200, 0.02)
    metrics.observe_request("grpc", "RESOURCE_EXHAUSTED", 0.001)
    metrics.on_queue_waits([0.004])
    metrics.on_batch(BatchStats(2, 0.03, 5, 0.08, [2, 3]), images=2)
    metrics.on_batch(BatchStats(0, 0.0, 1, 0.01, [1]), images=1)  # caller boxes: no detect
    return metrics


def test_every_fixed_name_is_exposed_with_its_labels() -> None:
    text = filled().render().decode()
    for name in NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert 'pose_requests_total{code="200",transport="http"} 1.0' in text
    assert 'pose_requests_total{code="RESOURCE_EXHAUSTED",transport="grpc"} 1.0' in text
    assert "pose_queue_depth 3.0" in text  # read from the engine at scrape time
    assert 'pose_batch_size_count{stage="detect"} 1.0' in text
    assert 'pose_batch_size_count{stage="pose"} 2.0' in text
    assert 'pose_batch_size_sum{stage="pose"} 6.0' in text
    # the batcher's knob: images per engine batch (2 + 1)
    assert 'pose_batch_size_count{stage="engine"} 2.0' in text
    assert 'pose_batch_size_sum{stage="engine"} 3.0' in text
    assert "pose_persons_per_image_count 3.0" in text
    assert (
        'pose_model_info{detector="",device="cpu",input_size="192x256",model="distilpose_s"' in text
    )
    assert "process_resident_memory_bytes" in text


def test_registries_are_private() -> None:
    one, two = Metrics(), Metrics()
    one.observe_request("http", 200, 0.1)
    assert b'pose_requests_total{code="200"' in one.render()
    assert b'pose_requests_total{code="200"' not in two.render()


def test_model_info_is_absent_before_the_engine_has_a_model() -> None:
    class Cold(FakeEngine):
        def model_info(self) -> ModelDescription:
            raise RuntimeError("not started")

    metrics = Metrics()
    metrics.bind_engine(Cold())
    assert b"pose_model_info{" not in metrics.render()


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool (Debian: prometheus) absent; CI installs it (tests/conftest.py fails a skip)",
)
def test_promtool_finds_nothing_to_complain_about() -> None:
    assert promtool_check(filled().render()) == ""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_gauges_on_cuda() -> None:
    held = torch.ones(1 << 20, device="cuda")  # 4 MiB, so that something is allocated
    text = Metrics().render().decode()
    for name in ("allocated", "reserved", "total"):
        assert f'pose_gpu_memory_{name}_bytes{{device="cuda:0"}}' in text
    assert held.is_cuda
    if shutil.which("promtool"):
        assert promtool_check(text.encode()) == ""


def test_no_gpu_gauges_without_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA in use")
    assert b"pose_gpu_memory" not in Metrics().render()


@pytest.mark.parametrize(
    "amounts",
    [
        [0.0, 0.0005, 0.0004, 0.0006, 5.0, 7.5, 1e9, float("inf"), 0.0025, 0.0025],
        [3.0],
        [],
    ],
)
def test_observing_a_batch_at_once_writes_what_observing_each_would(amounts: list[float]) -> None:
    """``observe_all`` (a batch's queue waits and persons, each bucket written once) exposes the
    same buckets, count and sum as one ``observe`` per value: values on a bound, between
    bounds, past the last and infinite included."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from service.metrics import observe_all

    texts = []
    for at_once in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram(
            "h", "h", buckets=(0.0005, 0.001, 0.0025, 5.0, 10.0), registry=registry
        )
        if at_once:
            observe_all(histogram, amounts)
        else:
            for amount in amounts:
                histogram.observe(amount)
        texts.append(
            [
                line
                for line in generate_latest(registry).decode().splitlines()
                if "created" not in line
            ]
        )
    assert texts[0] == texts[1]
    assert any(line.startswith("h_count") for line in texts[1])
