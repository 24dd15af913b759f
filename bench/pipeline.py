"""Pipeline benchmark: images/s and latency of ``TopDownPipeline.run`` (crop -> pose -> un-crop).

Sections (each row of the JSON says which):

- ``caller_boxes``: 1, 4, 16 real-like caller boxes per image, at several images per call;
- ``detector_only``: each detector alone on a batch of images (random weights: torchvision
  detectors built with ``weights=None``; cost does not depend on the values, but random weights
  emit many low-quality boxes, which inflates NMS and post-processing, so we record box counts);
- ``detector_pipeline_raw``: the full pipeline with that detector, persons = whatever the random
  detector returned (capped by the pipeline's own limits);
- ``detector_pipeline_reallike``: the detector network still runs (its cost), but its boxes are
  replaced by ``--reallike-persons`` real-like ones, so the pose stage sees a realistic load.

JPEG decoding is measured by ``bench.decode``.

    python -m bench.pipeline                    # CPU
    python -m bench.pipeline --device cuda --images-per-call 1 8 32 128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torchvision.io import decode_jpeg

from bench.common import (
    add_common_args,
    apply_threads,
    dump_json_line,
    environment,
    load_images,
    person_boxes,
    summarize_ms,
    synchronize,
    time_repeats,
    write_result,
)
from model.interfaces import Detector, PipelineItem, PoseOptions

DEFAULT_DETECTORS = [
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
    "ssdlite_person",  # the reference detector (model/reference.py), when cached
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--model", default="distilpose_s")
    p.add_argument("--persons", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--images-per-call", type=int, nargs="+", default=None, help="CPU: 1 4 16")
    p.add_argument(
        "--max-persons-per-call",
        type=int,
        default=None,
        help="skip caller-box configurations with more persons per call (CPU: keeps runs short)",
    )
    p.add_argument("--flip", choices=["off", "on", "both"], default="on")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument(
        "--detectors",
        nargs="*",
        default=None,
        help="detector names (default: the torchvision ones + ssdlite_person when cached); "
        "pass none to skip",
    )
    p.add_argument("--detector-images-per-call", type=int, nargs="+", default=None)
    p.add_argument("--reallike-persons", type=int, default=3)
    p.add_argument(
        "--detector-precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="autocast around the detector (CUDA only; the issue's reference is fp16)",
    )
    p.add_argument(
        "--detector-score-threshold",
        type=float,
        default=None,
        help="detector score threshold (default: the service's)",
    )
    p.add_argument(
        "--images-on",
        choices=["host", "device"],
        default="host",
        help="where the decoded images start (host: as the service hands them over)",
    )
    p.add_argument("--width", type=int, default=640, help="synthetic image size for detectors")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--max-crops-per-batch", type=int, default=256)
    p.add_argument("--cache-dir", default="~/.cache/distilpose-service")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-repeats", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=10.0)
    return p.parse_args(argv)


class RealLikeBoxes:
    """Runs a real detector (for its cost) and returns fixed real-like boxes instead of its output.

    Args:
        inner: the detector whose network cost is measured.
        boxes: per image index modulo len, (M, 5) boxes to return.
    """

    def __init__(self, inner: Detector, boxes: list[torch.Tensor]) -> None:
        self.inner = inner
        self.name = f"{inner.name}+reallike"
        self.boxes = boxes
        self.raw_counts: list[int] = []

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Detector forward, then replace its boxes: list of (M, 5) float32."""
        raw = self.inner(images)
        self.raw_counts.extend(int(r.shape[0]) for r in raw)
        return [self.boxes[i % len(self.boxes)].to(r.device) for i, r in enumerate(raw)]


class AutocastDetector:
    """Runs a detector under CUDA autocast (``--detector-precision``)."""

    def __init__(self, inner: Detector, dtype: torch.dtype) -> None:
        self.inner = inner
        self.name = inner.name
        self.dtype = dtype

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """The inner detector's boxes, (M, 5) float32 per image."""
        with torch.autocast("cuda", dtype=self.dtype):
            return [b.float() for b in self.inner(images)]


def decoded_images(args: argparse.Namespace, device: torch.device) -> list[Any]:
    """The committed real photos and two synthetic ``width x height`` ones, decoded (3, H, W)."""
    out = []
    for img in load_images(synthetic=2, size=(args.width, args.height)):
        tensor = decode_jpeg(torch.frombuffer(bytearray(img.data), dtype=torch.uint8))
        out.append((img, tensor.to(device) if args.images_on == "device" else tensor))
    return out


def _time(
    fn: Any, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Any], list[float]]:
    samples = time_repeats(
        fn,
        device=device,
        warmup=args.warmup,
        repeats=args.repeats,
        max_seconds=args.max_seconds,
        min_repeats=args.min_repeats,
    )
    return summarize_ms(samples), samples


def caller_box_rows(
    pipeline: Any,
    images: list[Any],
    args: argparse.Namespace,
    device: torch.device,
    skipped: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Rows of the ``caller_boxes`` section (configurations over the cap go to ``skipped``)."""
    rows = []
    flips = {"off": [False], "on": [True], "both": [False, True]}[args.flip]
    per_call = args.images_per_call or ([1, 4, 16] if device.type == "cpu" else [1, 8, 32, 128])
    for flip in flips:
        options = PoseOptions(flip_test=flip, precision=args.precision)
        for persons in args.persons:
            for n_images in per_call:
                cap = args.max_persons_per_call
                if cap is not None and persons * n_images > cap:
                    skipped.append(
                        {
                            "section": "caller_boxes",
                            "persons_per_image": persons,
                            "images_per_call": n_images,
                            "flip": flip,
                            "reason": f"over --max-persons-per-call {cap}",
                        }
                    )
                    continue
                items = []
                for i in range(n_images):
                    meta, tensor = images[i % len(images)]
                    boxes = person_boxes(
                        meta.width, meta.height, persons, seed=i, anchor=meta.person_box
                    )
                    items.append(PipelineItem(image=tensor, boxes=boxes, options=options))
                last: dict[str, Any] = {}

                def call(items: list[PipelineItem] = items, last: dict[str, Any] = last) -> None:
                    _, stats = pipeline.run(items)
                    last["stats"] = stats

                stats, _ = _time(call, args, device)
                bstats = last["stats"]
                row = {
                    "section": "caller_boxes",
                    "persons_per_image": persons,
                    "images_per_call": n_images,
                    "flip": flip,
                    "precision": args.precision,
                    **stats,
                    "images_per_s": n_images / (stats["median_ms"] / 1000.0),
                    "crops_per_s": n_images * persons / (stats["median_ms"] / 1000.0),
                    "last_pose_seconds": bstats.pose_seconds,
                    "last_pose_crops": bstats.pose_crops,
                }
                rows.append(row)
                dump_json_line(row)
    return rows


def detector_rows(
    name: str, images: list[Any], args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    """Rows of the three detector sections for one detector."""
    from model.pipeline import TopDownPipeline, build_pipeline

    settings = {}
    if args.detector_score_threshold is not None:
        settings["score_threshold"] = args.detector_score_threshold
    t0 = time.perf_counter()
    pipeline = build_pipeline(
        model=args.model,
        weights=None,
        detector=name,
        detector_weights=None,
        device=str(device),
        max_crops_per_batch=args.max_crops_per_batch,
        detector_settings=settings,
    )
    build_s = time.perf_counter() - t0
    detector = pipeline.detector
    if detector is None:
        raise RuntimeError(f"build_pipeline gave no detector for {name!r}")
    if device.type == "cuda" and args.detector_precision != "fp32":
        dtype = torch.float16 if args.detector_precision == "fp16" else torch.bfloat16
        detector = pipeline.detector = AutocastDetector(detector, dtype)
    options = PoseOptions(flip_test=args.flip != "off", precision=args.precision)
    per_call = args.detector_images_per_call or ([1, 4] if device.type == "cpu" else [1, 8, 32])
    # The synthetic width x height images are last in `images`: the reference size for detectors.
    sized = [t for meta, t in images if meta.name.startswith("synthetic")] or [images[0][1]]
    reallike = [
        person_boxes(args.width, args.height, args.reallike_persons, seed=i) for i in range(4)
    ]
    wrapped = RealLikeBoxes(detector, reallike)
    reallike_pipeline = TopDownPipeline(
        pipeline.pose_model,
        detector=wrapped,
        device=str(device),
        max_crops_per_batch=args.max_crops_per_batch,
    )
    rows = []
    for n_images in per_call:
        batch = [sized[i % len(sized)] for i in range(n_images)]
        items = [PipelineItem(image=t, boxes=None, options=options) for t in batch]
        counts: list[int] = []

        def det_call(batch: list[torch.Tensor] = batch, counts: list[int] = counts) -> None:
            out = detector(batch)
            counts[:] = [int(b.shape[0]) for b in out]

        persons: list[int] = []

        def pipe_call(
            items: list[PipelineItem] = items, persons: list[int] = persons, p: Any = pipeline
        ) -> None:
            results, _ = p.run(items)
            persons[:] = [len(r.persons) for r in results]

        for section, fn in (
            ("detector_only", det_call),
            ("detector_pipeline_raw", pipe_call),
            ("detector_pipeline_reallike", lambda items=items: reallike_pipeline.run(items)),
        ):
            try:
                stats, _ = _time(fn, args, device)
            except Exception as exc:  # record and go on with the next detector
                rows.append(
                    {
                        "section": section,
                        "detector": name,
                        "images_per_call": n_images,
                        "status": "error",
                        "error": f"{type(exc).__name__}: {exc}"[:500],
                    }
                )
                continue
            row: dict[str, Any] = {
                "section": section,
                "detector": name,
                "images_per_call": n_images,
                "image_size": [args.width, args.height],
                "flip": options.flip_test,
                "precision": args.precision,
                "detector_precision": args.detector_precision,
                "build_s": build_s,
                "status": "ok",
                **stats,
                "images_per_s": n_images / (stats["median_ms"] / 1000.0),
            }
            if section == "detector_only":
                row["boxes_per_image"] = counts
            elif section == "detector_pipeline_raw":
                row["persons_per_image"] = persons
            else:
                row["persons_per_image"] = [args.reallike_persons] * n_images
            rows.append(row)
            dump_json_line(row)
    synchronize(device)
    return rows


def available_detectors(args: argparse.Namespace) -> tuple[list[str], list[dict[str, str]]]:
    """The detectors to measure and the ones skipped (with why)."""
    skipped = []
    names = DEFAULT_DETECTORS if args.detectors is None else args.detectors
    names = [n for n in names if n.lower() != "none"]
    out = []
    for name in names:
        if name == "ssdlite_person":
            try:
                from model.reference import reference_models_available

                ok = reference_models_available(Path(args.cache_dir).expanduser())
            except ImportError:
                ok = False
            if not ok:
                skipped.append({"detector": name, "reason": "reference models not cached"})
                continue
        out.append(name)
    return out, skipped


def run(args: argparse.Namespace) -> Path:
    """Measure and write the JSON result file; returns its path."""
    from model.pipeline import build_pipeline

    apply_threads(args.threads)
    device = torch.device(args.device)
    env = environment(args.device)
    images = decoded_images(args, device)
    pipeline = build_pipeline(
        model=args.model,
        weights=None,
        detector=None,
        detector_weights=None,
        device=str(device),
        max_crops_per_batch=args.max_crops_per_batch,
    )
    pipeline.warmup()
    skipped: list[dict[str, Any]] = []
    rows = caller_box_rows(pipeline, images, args, device, skipped)
    names, det_skipped = available_detectors(args)
    skipped += det_skipped
    for name in names:
        try:
            rows += detector_rows(name, images, args, device)
        except Exception as exc:  # one broken detector must not lose the rest
            skipped.append({"detector": name, "reason": f"{type(exc).__name__}: {exc}"[:500]})
    return write_result(
        "pipeline",
        args.device,
        args,
        rows,
        out_dir=args.out_dir,
        env=env,
        extra={"skipped": skipped, "weights": "random pose and detector weights"},
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m bench.pipeline``."""
    dump_json_line({"written": str(run(parse_args(argv)))})


if __name__ == "__main__":
    main()
