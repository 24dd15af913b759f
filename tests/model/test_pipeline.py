"""``TopDownPipeline`` with tiny fake pose models and detectors: batching, order, options, errors.

The fakes are deterministic per crop (no interaction between the crops of a batch), so a batch must
give exactly the answers of its images run one by one. The real DistilPose-S is exercised in
test_pipeline_golden.py.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from model.interfaces import (
    BatchStats,
    ImageResult,
    PipelineItem,
    PoseModelInfo,
    PoseOptions,
    PoseOutput,
)
from model.pipeline import TopDownPipeline, build_pipeline

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NO_FLIP = PoseOptions(flip_test=False)


class BrightestPixelPose:
    """Every keypoint at the crop's brightest pixel (channel 0), scores from the crop's content.

    Crop pixel u (OpenCV pixel centre) is reported as x = u / W, as the official decode expects.
    """

    def __init__(self, keypoint_names: tuple[str, ...] | None = None, input_size=(48, 64)) -> None:
        kwargs = {} if keypoint_names is None else {"keypoint_names": keypoint_names}
        self.info = PoseModelInfo(
            name="brightest", input_size=input_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs
        )
        self.batch_sizes: list[int] = []
        self.nan = False

    def predict(self, crops: torch.Tensor) -> PoseOutput:
        self.batch_sizes.append(int(crops.shape[0]))
        n, _, h, w = crops.shape
        k = len(self.info.keypoint_names)
        idx = crops[:, 0].flatten(1).argmax(dim=1)  # (n,)
        uv = torch.stack(((idx % w).float() / w, (idx // w).float() / h), dim=-1)  # (n, 2)
        coords = uv[:, None, :].expand(n, k, 2).clone()
        level = crops.mean(dim=(1, 2, 3))  # (n,) content-dependent
        scores = 0.6 + 0.05 * level[:, None] + torch.linspace(-0.1, 0.1, k)[None, :]
        scores[:, 1] += 0.3  # left_eye differs from right_eye: the flip score quirk shows
        sigmas = torch.full((n, k, 2), 0.01)
        if self.nan:
            coords[:, 0] = float("nan")
            scores[:, 0] = float("inf")
            sigmas[:, 0] = float("nan")
        return PoseOutput(coords=coords, scores=scores, sigmas=sigmas)


class FixedDetector:
    """Returns the given (M, 5) boxes for each image, in the given (unsorted) order."""

    name = "fixed"

    def __init__(self, boxes: list[torch.Tensor]) -> None:
        self.boxes = boxes
        self.calls: list[list[tuple[int, ...]]] = []

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls.append([tuple(img.shape) for img in images])
        return [self.boxes[i % len(self.boxes)].clone() for i in range(len(images))]


def noise_image(h: int, w: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200, (3, h, w), generator=gen, dtype=torch.uint8)


def dot_image(h: int, w: int, x: int, y: int) -> torch.Tensor:
    img = torch.zeros((3, h, w), dtype=torch.uint8)
    img[:, y, x] = 255
    return img


def random_boxes(n: int, w: int, h: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand((n, 2), generator=gen) * torch.tensor([w * 1.2, h * 1.2]) - 0.1 * torch.tensor(
        [w, h]
    )
    wh = torch.rand((n, 2), generator=gen) * torch.tensor([w * 0.6, h * 0.6]) + 2.0
    score = torch.rand((n, 1), generator=gen)
    return torch.cat((xy, wh, score), dim=1)


def as_plain(result: ImageResult) -> list:
    return [(p.bbox, p.bbox_score, p.score, p.keypoints, p.sigmas) for p in result.persons]


def test_whole_image_is_one_box_without_detector_or_boxes() -> None:
    pipe = TopDownPipeline(BrightestPixelPose())
    results, stats = pipe.run([PipelineItem(image=dot_image(60, 80, 30, 20))])
    (person,) = results[0].persons
    assert (results[0].width, results[0].height) == (80, 60)
    assert person.bbox == (0.0, 0.0, 80.0, 60.0) and person.bbox_score == 1.0
    assert stats.detect_images == 0 and stats.pose_crops == 1 and stats.persons_per_image == [1]


@pytest.mark.parametrize(
    "box", [[20.0, 10.0, 30.0, 30.0], [-40.0, -30.0, 90.0, 70.0], [25.0, 15.0, 8.0, 9.0]]
)
def test_a_dot_comes_back_where_it_is(box: list[float]) -> None:
    """Box -> crop -> model -> image: the dot's keypoint within half a crop pixel (flip off)."""
    pipe = TopDownPipeline(BrightestPixelPose())
    image = dot_image(60, 80, 31, 22)
    results, _ = pipe.run([PipelineItem(image=image, boxes=torch.tensor([box]), options=NO_FLIP)])
    (person,) = results[0].persons
    w, h = box[2], box[3]
    px_per_crop_px = max(w, h / (64 / 48)) * 1.25 / 48 if w / h > 0.75 else h * 1.25 / 64
    x, y, _ = person.keypoints[0]
    assert abs(x - 31) <= 0.5 * px_per_crop_px + 1e-4 and abs(y - 22) <= 0.5 * px_per_crop_px + 1e-4
    assert person.bbox == tuple(box)


def test_zero_one_fifty_persons_mixed_sizes_batch_equals_single() -> None:
    pose = BrightestPixelPose()
    pipe = TopDownPipeline(pose, max_crops_per_batch=256)
    items = [
        PipelineItem(image=noise_image(100, 120, 0), boxes=torch.zeros((0, 4))),
        PipelineItem(image=noise_image(50, 70, 1), boxes=random_boxes(1, 70, 50, 1)),
        PipelineItem(image=noise_image(300, 200, 2), boxes=random_boxes(50, 200, 300, 2)),
        PipelineItem(image=noise_image(33, 17, 3), boxes=None),
    ]
    results, stats = pipe.run(items)
    assert [len(r.persons) for r in results] == [0, 1, 50, 1]
    assert stats.persons_per_image == [0, 1, 50, 1] and stats.pose_crops == 52
    assert [(r.width, r.height) for r in results] == [(120, 100), (70, 50), (200, 300), (17, 33)]
    for item, batched in zip(items, results, strict=True):
        (single,), _ = pipe.run([item])
        assert as_plain(single) == as_plain(batched)
    big = results[2].persons
    assert [p.bbox for p in big] == [tuple(b[:4]) for b in items[2].boxes.tolist()]  # caller order
    assert [p.bbox_score for p in big] == items[2].boxes[:, 4].tolist()
    for person in big:
        values = [*person.bbox, person.bbox_score, person.score]
        values += [v for kp in person.keypoints for v in kp]
        assert all(type(v) is float and math.isfinite(v) for v in values)
        assert len(person.keypoints) == 17 and person.sigmas is None


def test_caller_boxes_keep_their_order() -> None:
    pipe = TopDownPipeline(BrightestPixelPose())
    image = noise_image(120, 160, 4)
    boxes = random_boxes(7, 160, 120, 4)
    forward, _ = pipe.run([PipelineItem(image=image, boxes=boxes)])
    backward, _ = pipe.run([PipelineItem(image=image, boxes=boxes.flip(0))])
    assert as_plain(forward[0]) == as_plain(backward[0])[::-1]


def test_four_column_boxes_score_one() -> None:
    pipe = TopDownPipeline(BrightestPixelPose())
    results, _ = pipe.run(
        [PipelineItem(image=noise_image(40, 40, 5), boxes=torch.tensor([[1.0, 2, 3, 4]]))]
    )
    assert results[0].persons[0].bbox_score == 1.0


def test_chunking_and_option_groups_do_not_change_answers() -> None:
    images = [noise_image(64, 48 + 8 * i, 10 + i) for i in range(4)]
    options = [
        PoseOptions(),
        NO_FLIP,
        PoseOptions(swap_flip_scores=True),
        PoseOptions(return_sigmas=True, precision="bf16"),  # CPU: bf16 runs as fp32
    ]
    items = [
        PipelineItem(image=img, boxes=random_boxes(3, img.shape[2], 64, i), options=opt)
        for i, (img, opt) in enumerate(zip(images, options, strict=True))
    ]
    small_pose = BrightestPixelPose()
    small = TopDownPipeline(small_pose, max_crops_per_batch=3)
    big = TopDownPipeline(BrightestPixelPose(), max_crops_per_batch=1000)
    a, _ = small.run(items)
    b, _ = big.run(items)
    assert [as_plain(r) for r in a] == [as_plain(r) for r in b]
    assert max(small_pose.batch_sizes) <= 3
    for item, result in zip(items, a, strict=True):
        (alone,), _ = big.run([item])
        assert as_plain(alone) == as_plain(result)
    # The score quirk vs the corrected merge, item by item in one batch. The fake scores keypoint k
    # s_k = base + linspace(-0.1, 0.1, 17)[k] (+ 0.3 for k = 1), base from the crop's content. The
    # quirk averages k with the mirrored crop's k: s_1 - s_2 = 0.3 - 0.0125 on both passes. The
    # corrected merge averages k with the mirror's twin: (s_1 + s'_2) - (s_2 + s'_1) = 0.
    for person in a[0].persons:
        assert person.keypoints[1][2] - person.keypoints[2][2] == pytest.approx(0.2875, abs=1e-5)
    for person in a[2].persons:
        assert person.keypoints[1][2] - person.keypoints[2][2] == pytest.approx(0.0, abs=1e-5)
    assert a[3].persons[0].sigmas is not None and a[0].persons[0].sigmas is None


def test_flip_score_quirk_versus_corrected_merge() -> None:
    pipe = TopDownPipeline(BrightestPixelPose())
    image, boxes = noise_image(64, 48, 20), torch.tensor([[4.0, 4.0, 40.0, 50.0]])
    (quirk,), _ = pipe.run([PipelineItem(image=image, boxes=boxes)])
    (fixed,), _ = pipe.run(
        [PipelineItem(image=image, boxes=boxes, options=PoseOptions(swap_flip_scores=True))]
    )
    q = [kp[2] for kp in quirk.persons[0].keypoints]
    f = [kp[2] for kp in fixed.persons[0].keypoints]
    assert q[0] == pytest.approx(f[0])  # the nose has no twin
    assert q[1] != pytest.approx(f[1])  # left eye: averaged with the flipped left eye (quirk)


def test_sigmas_are_in_pixels() -> None:
    pipe = TopDownPipeline(BrightestPixelPose())
    box = torch.tensor([[10.0, 10.0, 30.0, 80.0]])  # tall: crop 60 x 80 px before padding
    options = PoseOptions(return_sigmas=True)
    (result,), _ = pipe.run(
        [PipelineItem(image=noise_image(100, 100, 6), boxes=box, options=options)]
    )
    sx, sy = result.persons[0].sigmas[0]
    assert sx == pytest.approx(0.01 * 60 * 1.25) and sy == pytest.approx(0.01 * 80 * 1.25)


@pytest.mark.parametrize(
    ("boxes", "message"),
    [
        (torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 0.0, 5.0]]), "box 1"),
        (torch.tensor([[0.0, 0.0, 10.0, -1.0]]), "box 0"),
        (torch.tensor([[float("nan"), 0.0, 10.0, 10.0]]), "box 0"),
        (torch.tensor([[0.0, 0.0, float("inf"), 10.0]]), "box 0"),
        (torch.tensor([[0.0, 0.0, 10.0, 10.0, float("nan")]]), "box 0"),
        (torch.tensor([0.0, 0.0, 10.0, 10.0]), "(M, 4) or (M, 5)"),
        (torch.zeros((2, 3)), "(M, 4) or (M, 5)"),
    ],
)
def test_degenerate_boxes_are_refused_before_any_work(boxes: torch.Tensor, message: str) -> None:
    pose = BrightestPixelPose()
    pipe = TopDownPipeline(pose)
    items = [
        PipelineItem(image=noise_image(20, 20, 0)),
        PipelineItem(image=noise_image(20, 20, 1), boxes=boxes),
    ]
    with pytest.raises(ValueError, match="item 1") as err:
        pipe.run(items)
    assert message in str(err.value)
    assert pose.batch_sizes == []


@pytest.mark.parametrize(
    "image",
    [
        torch.zeros((3, 10, 10)),
        torch.zeros((1, 10, 10), dtype=torch.uint8),
        torch.zeros((3, 0, 4), dtype=torch.uint8),
    ],
)
def test_bad_images_are_refused(image: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="item 0"):
        TopDownPipeline(BrightestPixelPose()).run([PipelineItem(image=image)])


def test_non_finite_model_outputs_become_zero() -> None:
    pose = BrightestPixelPose()
    pose.nan = True
    pipe = TopDownPipeline(pose)
    options = PoseOptions(return_sigmas=True)
    (result,), _ = pipe.run(
        [
            PipelineItem(
                image=noise_image(30, 30, 7),
                boxes=torch.tensor([[0.0, 0, 20, 20]]),
                options=options,
            )
        ]
    )
    person = result.persons[0]
    values = (
        [v for kp in person.keypoints for v in kp]
        + [v for s in person.sigmas for v in s]
        + [person.score]
    )
    assert all(math.isfinite(v) for v in values)
    assert person.keypoints[0][2] == 0.0 and person.sigmas[0] == (0.0, 0.0)


def test_broken_detector_boxes_still_give_finite_numbers() -> None:
    boxes = torch.tensor([[float("nan"), 1.0, 10.0, 10.0, 0.5], [5.0, 5.0, 0.0, 0.0, float("inf")]])
    pipe = TopDownPipeline(BrightestPixelPose(), detector=FixedDetector([boxes]))
    (result,), _ = pipe.run([PipelineItem(image=noise_image(30, 40, 9))])
    assert len(result.persons) == 2
    for p in result.persons:
        values = [*p.bbox, p.bbox_score, p.score, *(v for kp in p.keypoints for v in kp)]
        assert all(math.isfinite(v) for v in values)


def test_detector_persons_sorted_and_oks_nms() -> None:
    image = dot_image(200, 200, 100, 100)
    boxes = torch.tensor(
        [
            [10.0, 10.0, 40.0, 40.0, 0.3],  # elsewhere: kept
            [70.0, 60.0, 60.0, 80.0, 0.6],  # around the dot
            [71.0, 61.0, 60.0, 80.0, 0.9],  # the same person, better score
        ]
    )
    detector = FixedDetector([boxes])
    pipe = TopDownPipeline(BrightestPixelPose(), detector=detector)
    items = [
        PipelineItem(image=image, options=NO_FLIP),
        PipelineItem(image=noise_image(50, 60, 8), boxes=torch.tensor([[1.0, 1, 20, 20]])),
        PipelineItem(image=image, options=PoseOptions(flip_test=False, oks_nms=True)),
    ]
    results, stats = pipe.run(items)
    assert detector.calls == [[(3, 200, 200), (3, 200, 200)]]  # only images without boxes
    assert stats.detect_images == 2 and stats.persons_per_image == [3, 1, 2]
    plain = results[0].persons
    assert [p.score for p in plain] == sorted((p.score for p in plain), reverse=True)
    assert plain[0].bbox_score == pytest.approx(0.9)
    assert [p.bbox for p in results[2].persons] == [plain[0].bbox, plain[2].bbox]  # duplicate gone


def test_generic_keypoints_and_input_size() -> None:
    names = ("head", "left_hand", "right_hand")
    pipe = TopDownPipeline(BrightestPixelPose(names, input_size=(32, 32)))
    (result,), _ = pipe.run(
        [PipelineItem(image=dot_image(50, 50, 20, 30), boxes=torch.tensor([[0.0, 0, 50, 50]]))]
    )
    assert len(result.persons[0].keypoints) == 3
    with pytest.raises(ValueError, match="OKS-NMS"):
        pipe.run([PipelineItem(image=dot_image(50, 50, 2, 3), options=PoseOptions(oks_nms=True))])


def test_describe_is_json_and_warmup_runs_every_stage() -> None:
    detector = FixedDetector([torch.tensor([[1.0, 1.0, 20.0, 30.0, 0.8]])])
    pose = BrightestPixelPose()
    pipe = TopDownPipeline(pose, detector=detector)
    pipe.warmup()
    assert detector.calls and pose.batch_sizes
    info = json.loads(json.dumps(pipe.describe().to_dict()))
    assert info["model"] == "brightest" and info["detector"] == "fixed" and info["device"] == "cpu"
    assert info["input_size"] == [48, 64] and len(info["keypoint_names"]) == 17
    assert info["defaults"]["flip_test"] is True
    assert TopDownPipeline(pose).describe().detector is None
    results, stats = pipe.run([])
    assert results == [] and stats == BatchStats(
        detect_images=0, detect_seconds=0.0, pose_crops=0, pose_seconds=0.0, persons_per_image=[]
    )


def test_build_pipeline_names_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyError, match="unknown pose model"):
        build_pipeline(model="openpose", weights=None, detector=None, detector_weights=None)
    with pytest.raises(ValueError, match="model name or a weight file"):
        build_pipeline(model=None, weights=None, detector=None, detector_weights=None)
    with pytest.raises(KeyError, match="unknown detector"):
        build_pipeline(model="distilpose_s", weights=None, detector="yolo", detector_weights=None)
    with pytest.raises(ValueError, match="cache directory"):
        build_pipeline(
            model="blazepose_full", weights="/tmp/other.bin", detector=None, detector_weights=None
        )
    with pytest.raises(ValueError, match="not a setting of the ssdlite_person detector"):
        build_pipeline(
            model="distilpose_s",
            weights=None,
            detector="ssdlite_person",
            detector_weights=None,
            detector_settings={"max_size": 640},
        )


def test_build_pipeline_random_distilpose_none_detector() -> None:
    pipe = build_pipeline(
        model="distilpose_s",
        weights=None,
        detector="none",
        detector_weights=None,
        max_crops_per_batch=8,
    )
    assert pipe.detector is None and pipe.max_crops_per_batch == 8
    assert pipe.describe().model == "distilpose_s" and pipe.describe().weights_sha256 is None


def test_a_model_without_sigmas_answers_none_never_zeros() -> None:
    pose = BrightestPixelPose()
    pose.info = dataclasses.replace(pose.info, has_sigmas=False)
    image = torch.zeros((3, 64, 48), dtype=torch.uint8)
    item = PipelineItem(
        image=image,
        boxes=torch.tensor([[4.0, 4.0, 40.0, 56.0]]),
        options=PoseOptions(return_sigmas=True),
    )
    (result,), _ = TopDownPipeline(pose).run([item])
    assert result.persons[0].sigmas is None
    assert TopDownPipeline(pose).describe().has_sigmas is False


def test_dedup_and_min_person_score_drop_detector_persons_only() -> None:
    """The reference recipe (``ModelSpec.dedup_oks``, ``min_person_score``): one person per body,
    none where no keypoint scores above 0.2; caller boxes always come back, one per box."""
    image = dot_image(200, 200, 100, 100)
    boxes = torch.tensor(
        [
            [10.0, 10.0, 40.0, 40.0, 0.3],  # elsewhere: kept
            [70.0, 60.0, 60.0, 80.0, 0.6],  # around the dot
            [71.0, 61.0, 60.0, 80.0, 0.9],  # the same person, better score: OKS > 0.8
            [150.0, 150.0, 30.0, 30.0, 0.0],  # box score 0: instance score 0, dropped
        ]
    )
    pipe = TopDownPipeline(
        BrightestPixelPose(), detector=FixedDetector([boxes]), dedup_oks=0.8, min_person_score=0.0
    )
    (found,), _ = pipe.run([PipelineItem(image=image, options=NO_FLIP)])
    assert [p.bbox_score for p in found.persons] == pytest.approx([0.9, 0.3])
    (given,), _ = pipe.run([PipelineItem(image=image, boxes=boxes, options=NO_FLIP)])
    assert len(given.persons) == 4


def test_keypoints_outside_the_image_score_zero_where_the_model_says_so() -> None:
    """``PoseModelInfo.zero_out_of_frame``: a keypoint decoded outside the image scores 0."""
    image = dot_image(60, 80, 30, 20)
    box = torch.tensor([[-60.0, -40.0, 70.0, 60.0]])  # the crop's brightest pixel: (0, 0) corner
    pose = BrightestPixelPose()
    pose.predict = lambda crops: PoseOutput(  # type: ignore[method-assign]
        coords=torch.tensor([[[0.1, 0.1], [0.9, 0.9]]]).expand(crops.shape[0], 2, 2),
        scores=torch.ones(crops.shape[0], 2),
    )
    names = ("nose", "left_eye")
    pose.info = dataclasses.replace(pose.info, keypoint_names=names, skeleton=())
    item = PipelineItem(image=image, boxes=box, options=NO_FLIP)
    (kept,), _ = TopDownPipeline(pose).run([item])
    assert [kp[2] for kp in kept.persons[0].keypoints] == [1.0, 1.0]
    pose.info = dataclasses.replace(pose.info, zero_out_of_frame=True)
    (zeroed,), _ = TopDownPipeline(pose).run([item])
    (x0, y0, s0), (x1, y1, s1) = zeroed.persons[0].keypoints
    assert x0 < 0 and y0 < 0 and s0 == 0.0  # outside
    assert 0 <= x1 < 80 and 0 <= y1 < 60 and s1 == 1.0  # inside
