"""The engine over the real CPU pipeline: batched answers under concurrency equal batch-1 answers.

DistilPose-S with the recipe weights (``distilpose_s_checkpoint``), no detector, caller boxes (one
or two per image) and images of different sizes, half of them sent as PNG bytes through the real
decoder. Batches are forced to fill (a very long ``max_delay_ms`` and 16 images for batches of 8),
so the test is about equality, never timing.

Tolerance: batching changes only the order of float32 reductions (more crops per matmul and
convolution), so coordinates must agree to 1e-3 pixels and scores and box scores to 1e-4 (on the
CPU they were bit-identical when measured). On CUDA, cuDNN may pick other kernels for other batch
sizes: 1e-2 pixels and 1e-3 there (not yet run on a GPU).
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from model import create_model
from model.interfaces import BatchStats, ImageResult, PipelineItem, PoseOptions
from model.pipeline import TopDownPipeline
from service.engine import Engine, EngineConfig, NoopObserver, PoseRequest
from service.uploads import decode_image

# device -> (coordinate tolerance in pixels, score tolerance)
TOLERANCE = {"cpu": (1e-3, 1e-4), "cuda": (1e-2, 1e-3)}
IMAGES = 16
BATCH = 8


class BatchSizes(NoopObserver):
    def __init__(self) -> None:
        self.images: list[int] = []
        self.crops: list[int] = []

    def on_batch(self, stats: BatchStats, images: int) -> None:
        self.images.append(images)
        self.crops.append(stats.pose_crops)


def make_inputs(count: int) -> list[tuple[torch.Tensor, torch.Tensor, PoseOptions]]:
    """Seeded images (3, H, W) uint8 of varied sizes, each with 1-2 boxes (M, 5) and options."""
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(count):
        height = int(torch.randint(96, 200, (1,), generator=gen))
        width = int(torch.randint(80, 220, (1,), generator=gen))
        image = torch.randint(0, 256, (3, height, width), generator=gen, dtype=torch.uint8)
        boxes = []
        for _ in range(1 + i % 2):
            x = float(torch.randint(0, width // 2, (1,), generator=gen))
            y = float(torch.randint(0, height // 2, (1,), generator=gen))
            w = float(torch.randint(16, width - int(x) + 1, (1,), generator=gen))
            h = float(torch.randint(16, height - int(y) + 1, (1,), generator=gen))
            boxes.append([x, y, w, h, 0.5 + 0.5 * float(torch.rand(1, generator=gen))])
        options = PoseOptions(flip_test=i % 4 != 3)  # a mix, so options groups occur in a batch
        inputs.append((image, torch.tensor(boxes, dtype=torch.float32), options))
    return inputs


def png_bytes(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_same(
    batched: ImageResult, single: ImageResult, xy_atol: float, score_atol: float
) -> None:
    assert (batched.width, batched.height) == (single.width, single.height)
    assert len(batched.persons) == len(single.persons)
    for got, want in zip(batched.persons, single.persons, strict=True):
        assert got.bbox == pytest.approx(want.bbox, abs=xy_atol)
        assert got.bbox_score == pytest.approx(want.bbox_score, abs=score_atol)
        assert got.score == pytest.approx(want.score, abs=score_atol)
        got_kpts = torch.tensor(got.keypoints)  # (K, 3) x, y, score
        want_kpts = torch.tensor(want.keypoints)
        torch.testing.assert_close(got_kpts[:, :2], want_kpts[:, :2], atol=xy_atol, rtol=0)
        torch.testing.assert_close(got_kpts[:, 2], want_kpts[:, 2], atol=score_atol, rtol=0)


# 10-37 s on 2 loaded cores (the real DistilPose-S over many concurrent and single images): twice
# the default, so that a busy machine does not time it out.
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ],
)
async def test_concurrent_batched_answers_equal_single_image_answers(
    distilpose_s_checkpoint: Path, device: str
) -> None:
    torch.manual_seed(0)

    def factory(device: str) -> TopDownPipeline:
        net = create_model("distilpose_s", weights=distilpose_s_checkpoint, device=device)
        return TopDownPipeline(net, detector=None, device=device)

    inputs = make_inputs(IMAGES)
    reference = factory(device)
    with torch.inference_mode():
        singles = [
            reference.run([PipelineItem(image=img, boxes=boxes, options=opts)])[0][0]
            for img, boxes, opts in inputs
        ]

    observer = BatchSizes()
    engine = Engine(
        factory,
        [device],
        EngineConfig(
            max_batch_size=BATCH,
            max_delay_ms=600_000.0,
            max_queue_size=IMAGES,
            calibration_budget_s=0,  # batches of BATCH, not of the size the CPU prefers
        ),
        decoder=lambda data: decode_image(data, max_pixels=10_000_000),
        observer=observer,
    )
    await engine.start()
    try:
        requests = [
            PoseRequest(image=png_bytes(img) if i % 2 else img, boxes=boxes, options=opts)
            for i, (img, boxes, opts) in enumerate(inputs)
        ]
        responses = await asyncio.gather(*(engine.infer(r) for r in requests))
    finally:
        await engine.stop()

    assert observer.images == [BATCH] * (IMAGES // BATCH)
    assert sum(observer.crops) == sum(len(boxes) for _, boxes, _ in inputs)
    for response, single in zip(responses, singles, strict=True):
        assert_same(response.result, single, *TOLERANCE[device])
        assert set(response.timing_ms) == {"queue", "decode", "detect", "pose", "total"}
