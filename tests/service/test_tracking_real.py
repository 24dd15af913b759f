"""Tracking real poses: pan-and-zoom clips over COCO photos (``bench/video.py`` makes them: a crop
window moving and zooming over the photo, so every person's true box in every frame is known from
the COCO annotation) through the real engine and tracker, BlazePose-full + SSDLite on the CPU.

The full measurement (60 frames over the 5-person COCO photo, which may not be committed, the
slideshow MP4, speed) is ``bench/video.py``, reported in ``BENCHMARKS.md``; this is a short
version of it on the committed photo, with bounds a little above what it measures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.video import (
    PAN_FALLBACK,
    SHARED_SAMPLES,
    SLIDESHOW_PHOTOS,
    cut_scores,
    ground_truth,
    id_switches,
    keypoint_drift,
    load_photo,
    pan_zoom_clip,
    slideshow_clip,
    track_clip,
)
from model.reference import default_cache_dir, reference_models_available
from service.engine import Engine, EngineConfig
from service.settings import Settings
from service.tracking import TrackOptions
from tests.service.rest_support import cpu_pipeline_engine

pytestmark = pytest.mark.timeout(180)  # short clips at CPU speed on a shared machine


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    cache = default_cache_dir()
    if not reference_models_available(cache):
        pytest.skip(f"reference models not in the cache {cache}: run `pose-service models fetch`")
    built = cpu_pipeline_engine(
        Settings(cache_dir=str(cache)),
        EngineConfig(max_batch_size=4, max_delay_ms=2.0, decode_workers=1),
        model="blazepose_full",
        weights=str(cache / "blazepose_full.safetensors"),
        detector="ssdlite_person",
        detector_weights=str(cache / "ssdlite_person.safetensors"),
    )
    await built.start()
    try:
        yield built
    finally:
        await built.stop(0)


async def measure(
    engine: Engine, photo: Path, frames: int, every: int, size: tuple[int, int]
) -> tuple[int, int, int, float, int]:
    """(id switches with every frame detected, with ``every``; detector frames with ``every``;
    mean keypoint distance in px between the two runs; cuts either run saw)."""
    settings = Settings(flip_test=False)
    clip, windows = pan_zoom_clip(load_photo(photo), frames, size)
    truth = ground_truth(photo)
    each = await track_clip(engine, settings, clip, TrackOptions(detect_every=1))
    skipping = await track_clip(engine, settings, clip, TrackOptions(detect_every=every))
    return (
        id_switches(each, windows, truth),
        id_switches(skipping, windows, truth),
        sum(skipping.detector_ran),
        keypoint_drift(skipping, each, windows, truth),
        each.cuts + skipping.cuts,
    )


async def test_a_pan_over_the_committed_photo_keeps_its_id_with_the_detector_on_10_percent(
    engine: Engine,
) -> None:
    switches_each, switches, detected, drift, cuts = await measure(
        engine, PAN_FALLBACK, 20, 10, (320, 224)
    )
    assert (switches_each, switches, cuts) == (0, 0, 0)
    assert detected <= 3  # frames 0 and 10, and at most one the tracker asked for
    assert drift < 4.0  # px at 320x224; measured 1-2


@pytest.mark.parametrize("every", [1, 10])
async def test_no_id_survives_a_cut_of_the_coco_slideshow(engine: Engine, every: int) -> None:
    # The four COCO sample photos one after another: the detector finds persons of a new photo
    # standing where persons of the one before stood (IoU alone carried ids over 2 of 3 cuts).
    photos = [SHARED_SAMPLES / name for name in SLIDESHOW_PHOTOS]
    if not all(p.exists() for p in photos):
        pytest.skip(f"shared COCO samples not found at {SHARED_SAMPLES}")
    clip, which = slideshow_clip([load_photo(p) for p in photos], 8)
    run = await track_clip(
        engine, Settings(flip_test=False), clip, TrackOptions(detect_every=every)
    )
    scores = cut_scores(run, which)
    assert scores["ids_on_two_photos"] == 0, scores
    assert scores["cuts_seen"] == scores["cuts"] == 3, scores
