"""The identity model: no network and no compute, a baseline for the serving path alone.

Triton ships identity models so that perf_analyzer can measure a deployment without a model in
the way; ``pose-service serve --model identity`` does the same here. Each image is answered with the
caller's boxes as persons, in order (17 keypoints at (0, 0) with score 0, person score 0, the box's
own score), or with no persons when it has no boxes. What a load test then measures is everything
but the model: transport, parsing, decoding, admission, batching, serialisation.

Why a pipeline and not only a ``PoseModel`` returning zeros: behind ``TopDownPipeline`` such a model
still pays for the per-box work around it (pad the images into one batch, warp a crop per box,
normalise, mirror for the flip test, decode the keypoints back), which a "no compute" baseline would
count as plumbing, and it answers an image without boxes with one whole-image person. Measured on
the 2-core development CPU (one torch thread, 16 images of 640x480 with 3 boxes each, flip test on):
13 ms per person with a 256x192 crop, 0.24 ms even with a 1x1 crop, against 0.03 ms per person
(0.1 ms per image, the checks of each item) for ``IdentityPipeline``, which keeps what every
pipeline does (the same checks of each item, the same ``describe()``) and answers from the boxes.
``IdentityPoseModel`` is what the catalogue builds (every pose entry builds a ``PoseModel``);
``model.pipeline.build_pipeline`` serves it with an ``IdentityPipeline`` because the catalogue says
it has no weights (``weights="none"``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from model.interfaces import (
    BatchStats,
    ImageResult,
    Person,
    PipelineItem,
    PoseModel,
    PoseModelInfo,
    PoseOutput,
)
from model.pipeline import TopDownPipeline

NAME = "identity"


class IdentityPoseModel:
    """A ``PoseModel`` that looks at nothing: a 1x1 "crop", zeros out."""

    backend = "none"  # what ``describe()`` reports: no network runs

    def __init__(self) -> None:
        self.info = PoseModelInfo(
            name=NAME,
            input_size=(1, 1),
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            padding=1.0,
            has_sigmas=False,
        )

    def predict(self, crops: torch.Tensor) -> PoseOutput:
        """(N, 3, H, W) crops -> coords (N, K, 2) and scores (N, K), all zeros, on their device."""
        n, k = crops.shape[0], len(self.info.keypoint_names)
        return PoseOutput(coords=crops.new_zeros((n, k, 2)), scores=crops.new_zeros((n, k)))


def build(weights: str | None, device: str | torch.device) -> IdentityPoseModel:
    """The catalogue's builder.

    Raises:
        ValueError: weights given (the identity model has none).
    """
    if weights is not None:
        raise ValueError(f"the {NAME} model has no weights (got {weights})")
    return IdentityPoseModel()


class IdentityPipeline(TopDownPipeline):
    """Answers every image with its caller boxes as persons, computing nothing (module docstring).

    Args:
        pose_model: the catalogue's ``IdentityPoseModel`` (its ``info`` names and shapes the
            answers; ``predict`` is never called).
        device: reported by ``describe()``; nothing is copied there.
        max_crops_per_batch: reported by ``describe()``.
    """

    def __init__(
        self,
        pose_model: PoseModel,
        device: str | torch.device = "cpu",
        max_crops_per_batch: int = 256,
    ) -> None:
        super().__init__(pose_model, None, device=device, max_crops_per_batch=max_crops_per_batch)

    def run(self, items: Sequence[PipelineItem]) -> tuple[list[ImageResult], BatchStats]:
        """One ``ImageResult`` per item: its caller boxes as persons, none without boxes.

        ``BatchStats.pose_crops`` counts the persons answered (no crop is made), so that the
        engine's batch metrics still show the batches it formed.

        Raises:
            ValueError: a malformed item, as ``TopDownPipeline.run`` raises it.
        """
        start = time.perf_counter()
        plans = [self._validate(i, item) for i, item in enumerate(items)]
        k = len(self.info.keypoint_names)
        results = []
        for plan in plans:
            rows = [] if plan.boxes is None else plan.boxes.tolist()  # (M, 5) x, y, w, h, score
            with_sigmas = plan.options.return_sigmas
            persons = [
                Person(
                    bbox=(row[0], row[1], row[2], row[3]),
                    bbox_score=row[4],
                    score=0.0,
                    keypoints=[(0.0, 0.0, 0.0)] * k,
                    sigmas=[(0.0, 0.0)] * k if with_sigmas else None,
                )
                for row in rows
            ]
            results.append(ImageResult(width=plan.width, height=plan.height, persons=persons))
        persons_per_image = [len(r.persons) for r in results]
        stats = BatchStats(
            pose_crops=sum(persons_per_image),
            pose_seconds=time.perf_counter() - start,
            persons_per_image=persons_per_image,
        )
        return results, stats

    def warmup(self) -> None:
        """One tiny item (there is nothing to warm)."""
        image = torch.zeros((3, 2, 2), dtype=torch.uint8)
        self.run([PipelineItem(image=image, boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]]))])
