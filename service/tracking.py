"""Video tracking, per stream: stable person ids, the detector only when needed, and smoothing.

One ``Tracker`` per tracked stream (a gRPC ``StreamEstimate`` whose first frame sets ``track``, or
one ``POST /v1/pose/video``); both transports use this module, so a stream tracks the same way
over either. The tracker submits ordinary ``PoseRequest``s to the engine, with boxes (tracked from
the previous frame) or without (the detector runs), so a tracked stream's frames batch with other
streams' frames and with unary requests like any others.

What it does, and from whom the idea comes:

- **Ids** (Ultralytics ``track``, ByteTrack): persons of a frame the detector ran on are matched to
  the stream's live tracks by the best one-to-one assignment (scipy's ``linear_sum_assignment``)
  over the larger of the keypoints' OKS (COCO sigmas; the track's keypoints moved on by its
  velocity) and the boxes' IoU. A track whose last tracked pose broke from its motion altogether
  (agreement below 0.2) keeps its last good pose and matches by pose alone (OKS, where the poses
  agree at all): another person may stand in the same box, not in the same pose. A pair below
  ``match_threshold`` is no match. An unmatched person gets a new id (ids count up from 1 and are
  never reused within a stream); a track unseen for more than ``max_unseen_frames`` frames is
  retired.
- **Scene cuts** (an edited video, a slideshow): on a new scene the detector finds persons
  standing where the old ones stood, and IoU would keep their ids. A cut is a frame on which no
  track goes on (no person matched to a track whose pose agrees with the track's) while something
  else is there: on a tracked frame, a pose that broke from its track; on a detector frame,
  persons found where tracks seen on one of the last two frames were expected (the frame after a
  tracked frame lost them is the detector's). A cut ends every track (the cut frame's persons get
  new ids; on a tracked frame it answers none, and the detector runs next). One track breaking
  while others go on is no cut (an occlusion, the pose model's error), nor is a frame where the
  detector finds nobody. The one signal is the tracks' own: the tracker never sees pixels (a
  frame may reach the engine still encoded).
- **Detector skipping** (rtmlib's ``PoseTracker``, MediaPipe's tracking region): with
  ``detect_every`` N > 1 the box of a person in frame t is the detector's last box of it (over
  the whole person: a side on the image's edge reaches over the joints placed beyond it) carried
  by the scale and shift that take the keypoints found in that box onto frame t-1's, moved on one
  frame at the track's velocity and growth, and clipped to the image as the detector's boxes are
  (``Tracker._box_around``). The motion is measured from the detector's frame, never frame to
  frame (keypoints lean towards the box they were found in; frame-to-frame motion feeds a box's
  error into the next), over joints inside the image only (a pose model guesses those outside),
  and is the motion all tracks share (a pan, a zoom) unless a track's own differs from it by more
  than its noise (``Tracker._motions``). The detector runs on every N-th frame, and on the next
  frame whenever a tracked person scores below ``min_track_score`` (lost: left out), lands where
  its motion did not predict (median OKS term of its joints in view below ``min_track_oks``: a
  cut, an occlusion) or two tracks collapse onto one person; not for a person leaving the view
  across an image edge (nothing there to find) nor, unless its pose broke, on the first frame
  after the detector found it (a fresh look finds the same box: a poor pose there is the pose
  model's limit). Such a frame needs the previous frame's answer, so a stream with N > 1 runs its
  frames one at a time (and marks them ``eager``: the batcher does not hold them waiting for a
  batch); with N <= 1 frames run concurrently and only the matching is done in frame order.
- **Smoothing** (MediaPipe Pose, Casiez et al. "1 Euro Filter", CHI 2012): a One Euro filter per
  keypoint coordinate per track, timed by the frame's ``timestamp_ms`` when given, else by its
  index over ``fps``. The filter's output is what is answered; tracking and matching use the raw
  keypoints, so smoothing adds no lag to the boxes.

Persons of a tracked frame come in track-id order. Transports map ``TrackedFrame`` to their wire
format; nothing here knows HTTP or gRPC.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from model.interfaces import ImageResult, Person
from service.engine_api import EngineHandle, PoseRequest, PoseResponse
from service.errors import InvalidRequestError, NotReadyError
from service.track_math import (
    BROKEN_OKS,
    KEYPOINT_MIN_SCORE,
    OneEuroFilter,
    ScaleShift,
    Track,
    associate,
    fit_scale_shift,
    in_view,
    iou,
    joints_in_both,
    match,
    oks,
    pose_agreement,
    similarity,
)

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = [
    "MAX_DETECT_EVERY",
    "OneEuroFilter",
    "Smoothing",
    "TrackOptions",
    "TrackedFrame",
    "Tracker",
    "TrackerConfig",
    "iou",
    "match",
    "oks",
    "similarity",
    "start_tracker",
]

MAX_DETECT_EVERY = 1000
# Two persons of one tracked frame this alike (OKS) are one person: the official OKS-NMS threshold.
DUPLICATE_OKS = 0.9
# Most a tracked box's width or height may change from one frame to the next (x or /): a box
# feeds the keypoints that make the next box, so an unbounded loop could grow or shrink it away.
_MAX_SIZE_STEP = 1.15
# A track follows its own keypoints' motion rather than the one all tracks share when the two
# move its anchor box's corners apart by more than this many standard errors of its own fit, and
# by more than this share of the box's size: a pose model's keypoints lean towards the box they
# were found in (most on a person it places poorly), a bias no fit error shows.
_OWN_MOTION_SIGMAS = 3.0
_OWN_MOTION_SHARE = 0.05
# A tracked person with less of its whole box (``whole_box``, carried on) in view than this,
# moving out, is leaving the view: a poor pose then means it left, and the detector has nothing
# to find.
_LEAVING_IN_VIEW = 0.9


@dataclass(frozen=True)
class Smoothing:
    """One Euro filter parameters (pixels and seconds).

    Attributes:
        min_cutoff: Cutoff frequency at rest, Hz: lower is smoother and lags more.
        beta: How fast the cutoff rises with speed (per px/s): higher lags less in motion.
        d_cutoff: Cutoff frequency of the speed estimate, Hz.
        fps: Frame rate that times frames without a timestamp.
    """

    min_cutoff: float = 1.0
    beta: float = 0.01
    d_cutoff: float = 1.0
    fps: float = 30.0

    def __post_init__(self) -> None:
        for name, value, low in (
            ("min_cutoff", self.min_cutoff, 0.0),
            ("d_cutoff", self.d_cutoff, 0.0),
            ("fps", self.fps, 0.0),
        ):
            if not math.isfinite(value) or value <= low or value > 1e6:
                raise InvalidRequestError(
                    "bad_options", f"smoothing.{name} must be in (0, 1e6], got {value:g}"
                )
        if not math.isfinite(self.beta) or not 0.0 <= self.beta <= 1e6:
            raise InvalidRequestError(
                "bad_options", f"smoothing.beta must be in [0, 1e6], got {self.beta:g}"
            )


@dataclass(frozen=True)
class TrackOptions:
    """What one stream asks for (set by its first frame).

    Attributes:
        detect_every: Run the detector on every N-th frame; 0 and 1: every frame.
        smoothing: One Euro parameters, or None for raw keypoints.
    """

    detect_every: int = 1
    smoothing: Smoothing | None = None

    def __post_init__(self) -> None:
        if isinstance(self.detect_every, bool) or not 0 <= self.detect_every <= MAX_DETECT_EVERY:
            raise InvalidRequestError(
                "bad_options",
                f"detect_every must be in [0, {MAX_DETECT_EVERY}], got {self.detect_every}",
            )


@dataclass(frozen=True)
class TrackerConfig:
    """The server's tracking knobs (``service.settings.Settings.tracker_config``).

    Attributes:
        max_unseen_frames: A track unseen for more frames than this is retired (its id is never
            given again).
        min_track_score: A person on tracked boxes scoring below this (mean of its keypoint
            scores above 0.2) is lost: left out, and the detector runs on the next frame.
        match_threshold: Least similarity (max of OKS and IoU) of a track and a person to match.
        min_track_oks: A person on tracked boxes whose keypoints agree less than this (the
            median of their OKS terms, joints in view) with where the track's motion put them is
            kept, and the detector runs next frame.
        min_box_size_px: A tracked box smaller than this (after clipping to the image) is lost.
    """

    max_unseen_frames: int = 30
    min_track_score: float = 0.3
    match_threshold: float = 0.3
    min_track_oks: float = 0.5
    min_box_size_px: float = 2.0

    @classmethod
    def from_settings(cls, settings: Settings) -> TrackerConfig:
        """The knobs ``settings`` sets (the others keep their defaults)."""
        return cls(
            max_unseen_frames=settings.track_max_unseen_frames,
            min_track_score=settings.track_min_score,
            min_box_size_px=settings.min_box_size_px,
        )


@dataclass
class TrackedFrame:
    """One answered frame of a tracked stream.

    ``response.result.persons`` are in track-id order, keypoints smoothed when asked;
    ``track_ids[i]`` is the id of person i.
    """

    response: PoseResponse
    track_ids: list[int]
    detector_ran: bool


def _keypoints(person: Person) -> np.ndarray:
    return np.asarray(person.keypoints, dtype=np.float64).reshape(-1, 3)


def _quality(person: Person) -> float:
    """Mean of the keypoint scores above 0.2 (the pipeline's rescoring), 0 when none is."""
    scores = _keypoints(person)[:, 2]
    good = scores[scores > KEYPOINT_MIN_SCORE]
    return float(good.mean()) if good.size else 0.0


class Tracker:
    """The tracking state of one stream, and the order its frames run in.

    Args:
        infer: ``Engine.infer`` (or anything with its signature).
        options: What the stream asked for.
        config: The server's knobs.
        has_detector: Whether the engine's pipeline has a detector (else a frame without boxes is
            one whole-image person, and ``detector_ran`` is always false).

    ``submit`` is called once per frame, in frame order; it returns at once with a task, and the
    tasks settle in frame order. A frame that fails (bad image, queue full, deadline) leaves the
    state as it was; its task raises the engine's error.
    """

    def __init__(
        self,
        infer: Callable[[PoseRequest], Awaitable[PoseResponse]],
        options: TrackOptions,
        config: TrackerConfig,
        *,
        has_detector: bool,
    ) -> None:
        self._infer = infer
        self.options = options
        self.config = config
        self._has_detector = has_detector
        self._tracks: list[Track] = []
        self._next_id = 1
        self._frames = 0  # frames submitted
        self._since_detect = 0  # tracked frames since the detector last ran
        self._force_detect = True
        self._size: tuple[int, int] | None = None  # (width, height) of the last answered frame
        self._previous_done: asyncio.Event | None = None  # set when the previous frame settled
        self.detector_frames = 0  # frames the detector ran on (for tests and benchmarks)
        self.cuts = 0  # scene cuts seen (for tests and benchmarks)

    @property
    def sequential(self) -> bool:
        """Whether a frame's request needs the previous frame's answer (``detect_every`` > 1)."""
        return self.options.detect_every > 1

    def submit(
        self, request: PoseRequest, *, index: int | None = None, timestamp_ms: float | None = None
    ) -> asyncio.Task[TrackedFrame]:
        """Queue one frame; call in frame order.

        Args:
            request: The frame (image, options, deadline); its ``boxes``, when given, are used
                as they are (caller boxes: the detector does not run).
            index: The frame's position in the stream (times smoothing without a timestamp);
                by default the count of frames submitted.
            timestamp_ms: When the frame was taken (drives smoothing).
        """
        frame = self._frames if index is None else index
        self._frames += 1
        previous, done = self._previous_done, asyncio.Event()
        self._previous_done = done
        task = asyncio.ensure_future(self._run(request, frame, timestamp_ms, previous))
        # Set however the task ends, even cancelled before it started: the next frame goes on.
        task.add_done_callback(lambda _: done.set())
        return task

    async def _run(
        self,
        request: PoseRequest,
        frame: int,
        timestamp_ms: float | None,
        previous: asyncio.Event | None,
    ) -> TrackedFrame:
        request = replace(request, eager=True)
        caller_boxes = request.boxes is not None
        if not self.sequential or caller_boxes:
            # Nothing of the request depends on the state: run it now, match in order after.
            response = await self._infer(request)
            if previous is not None:
                await previous.wait()
            return self._update(response, frame, timestamp_ms, detected=not caller_boxes)
        if previous is not None:
            await previous.wait()
        boxes = self._tracked_boxes()
        if boxes is None:
            response = await self._infer(request)
        else:
            try:
                response = await self._infer(replace(request, boxes=boxes))
            except InvalidRequestError as exc:
                if exc.code != "bad_boxes":
                    raise
                # The frame is not the size of the last one: find the persons afresh.
                boxes = None
                response = await self._infer(request)
        return self._update(
            response, frame, timestamp_ms, detected=boxes is None, tracked=boxes is not None
        )

    def _tracked_boxes(self) -> list[list[float]] | None:
        """This frame's boxes from the last frame's keypoints, or None when the detector should
        run (every N-th frame, nothing to track, or a track lost last frame)."""
        due = self._since_detect + 1 >= self.options.detect_every
        live = [t for t in self._tracks if t.unseen == 0]
        if self._force_detect or due or not live or self._size is None:
            return None
        boxes = []
        for track in live:
            box = self._box_around(track)
            boxes.append([*box, min(1.0, max(0.0, track.box_score))])
        return boxes

    def _box_around(self, track: Track) -> tuple[float, float, float, float]:
        """Track ``track``'s box in the next frame.

        Its anchor box (the detector's, over the whole person: ``whole_box``) carried by its
        motion since (``_motions``), so that the box keeps the detector's own margins around the
        person and follows the body rather than the hull of joints that jitter from frame to
        frame; then moved on one frame at the track's velocity and growth, and clipped to the
        image as the detector's boxes are. A track whose whole box is then less than
        ``_LEAVING_IN_VIEW`` in view, moving out across the edge that cuts it, is ``leaving``.
        """
        assert self._size is not None and track.anchor is not None
        width, height = self._size
        if track.motion is None:  # no joint in view in both: carry the last box
            x, y, w, h = track.box
            corners = np.array([x, y, x + w, y + h])
        else:
            corners = track.motion.apply(track.anchor.corners)
        centre = (corners[:2] + corners[2:]) / 2 + track.velocity
        last = np.asarray(track.box[2:])
        size = np.clip(
            (corners[2:] - corners[:2]) * track.growth, last / _MAX_SIZE_STEP, last * _MAX_SIZE_STEP
        )
        x1, y1 = np.maximum(centre - size / 2, 0.0).tolist()
        x2, y2 = np.minimum(centre + size / 2, [width, height]).tolist()
        in_view = max(0.0, x2 - x1) * max(0.0, y2 - y1) / max(float(np.prod(size)), 1e-9)
        cut_low = centre - size / 2 < 0  # (2,) the left, top edge cuts it
        cut_high = centre + size / 2 > [width, height]  # the right, bottom edge
        outward = (cut_low & (track.velocity < 0)) | (cut_high & (track.velocity > 0))
        track.leaving = in_view < _LEAVING_IN_VIEW and bool(outward.any())
        smallest = self.config.min_box_size_px
        # A box shrunk below the smallest size by the clipping is kept at that size, inside the
        # image: its person is then judged by its score (and lost when it left the view).
        x2, y2 = max(x2, min(x1 + smallest, width)), max(y2, min(y1 + smallest, height))
        x1, y1 = min(x1, x2 - smallest), min(y1, y2 - smallest)
        return (x1, y1, x2 - x1, y2 - y1)

    def _motions(self, sightings: list[tuple[Track, np.ndarray]]) -> list[ScaleShift | None]:
        """Each sighted track's motion from its anchor to its new (K, 3) keypoints.

        Its own keypoints' (``fit_scale_shift`` over the joints in view in both), unless that
        cannot be told apart from the motion shared by all the tracks anchored on the same
        frame (one fit over all their joints): then the shared one, which many more joints fix.
        A pan or a zoom moves every person alike, and a person the pose model places poorly (cut
        by the image edge, half hidden) then moves with the others instead of with its own
        noise; a person who moves on its own differs from the shared motion by more than its
        noise, and keeps its own.
        """
        assert self._size is not None
        pairs = [
            joints_in_both(track.anchor.keypoints, keypoints, self._size)
            if track.anchor is not None
            else (np.zeros((0, 2)), np.zeros((0, 2)))
            for track, keypoints in sightings
        ]
        spans = [track.since_anchor + track.unseen + 1 for track, _ in sightings]
        shared = {
            span: fit_scale_shift(
                np.concatenate([a for (a, _), s in zip(pairs, spans, strict=True) if s == span]),
                np.concatenate([b for (_, b), s in zip(pairs, spans, strict=True) if s == span]),
            )
            for span in set(spans)
        }
        motions: list[ScaleShift | None] = []
        for (track, _), (a, b), span in zip(sightings, pairs, spans, strict=True):
            own, common = fit_scale_shift(a, b), shared[span]
            if own is None or common is None or track.anchor is None:
                motions.append(own or common)
                continue
            corners = track.anchor.corners
            apart = float(np.abs(own.apply(corners) - common.apply(corners)).max())
            noise = _OWN_MOTION_SIGMAS * own.uncertainty(corners.reshape(2, 2))
            bias = _OWN_MOTION_SHARE * float((corners[2:] - corners[:2]).max())
            motions.append(own if apart > max(noise, bias) else common)
        return motions

    def _update(
        self,
        response: PoseResponse,
        frame: int,
        timestamp_ms: float | None,
        *,
        detected: bool,
        tracked: bool = False,
    ) -> TrackedFrame:
        """Match this frame's persons to the tracks (in frame order), and answer with ids."""
        result = response.result
        self._size = (result.width, result.height)
        persons = list(result.persons)
        live = [t for t in self._tracks if t.unseen == 0]
        if tracked:
            tracks = live
            pairs, broken, lost, cut = self._match_tracked(persons, live)
        else:
            tracks = [t for t in self._tracks if t.unseen <= self.config.max_unseen_frames]
            pairs, cut = self._match_found(persons, tracks)
            broken, lost = set(), False
        if cut:  # a new scene: every track ends (its id is never given again)
            self._tracks, tracks, pairs, broken = [], [], [], set()
            self.cuts += 1
        seen: dict[int, int] = {}  # person index -> its track's position in self._tracks
        for person_index, track_index in pairs:
            track = tracks[track_index]
            seen[person_index] = self._tracks.index(track)
        for person_index in range(len(persons)):
            if person_index in seen or tracked:
                continue
            person = persons[person_index]
            self._tracks.append(
                Track(self._next_id, _keypoints(person), person.bbox, person.bbox_score, unseen=1)
            )
            self._next_id += 1
            seen[person_index] = len(self._tracks) - 1
        t = (timestamp_ms / 1000.0) if timestamp_ms is not None else None
        answered: list[tuple[int, Person]] = []
        sighted = [i for i in seen if i not in broken]
        motions = self._motions([(self._tracks[seen[i]], _keypoints(persons[i])) for i in sighted])
        for person_index, motion in zip(sighted, motions, strict=True):
            person = persons[person_index]
            self._tracks[seen[person_index]].sighted(
                _keypoints(person), person.bbox, motion, self._size, boxed=not tracked
            )
        for person_index, position in seen.items():
            track = self._tracks[position]
            person = persons[person_index]
            refound = track.unseen > 0
            track.broken = person_index in broken
            track.unseen = -1
            if not tracked:
                track.box_score = person.bbox_score
            answered.append((track.id, self._smooth(track, person, frame, t, refound)))
        for track in self._tracks:
            track.unseen += 1  # the seen ones back to 0
        self._tracks = [t for t in self._tracks if t.unseen <= self.config.max_unseen_frames]
        live_after = [t for t in self._tracks if t.unseen == 0]
        # A person the tracked boxes lost, or every track gone: the detector looks next frame.
        self._force_detect = lost or (bool(live) and not live_after)
        ran = detected and self._has_detector
        if detected:
            self._since_detect = 0
            self.detector_frames += int(ran)
        else:
            self._since_detect += 1
        answered.sort(key=lambda pair: pair[0])
        out = ImageResult(
            width=result.width, height=result.height, persons=[p for _, p in answered]
        )
        return TrackedFrame(
            response=replace(response, result=out),
            track_ids=[track_id for track_id, _ in answered],
            detector_ran=ran,
        )

    def _match_tracked(
        self, persons: list[Person], live: list[Track]
    ) -> tuple[list[tuple[int, int]], set[int], bool, bool]:
        """Which persons of a frame run on tracked boxes stay with their tracks.

        Person i stands in track i's box; one scoring too low, or a second copy of a person
        another track holds, is lost, and the detector looks again next frame.

        Returns:
            (person, track) index pairs; the persons answered whose track keeps its last good
            pose (their pose broke); whether the detector should run next frame; whether this
            frame is a cut (some pose broke, and no track goes on).
        """
        assert self._size is not None
        pairs: list[tuple[int, int]] = []
        order = sorted(range(len(persons)), key=lambda i: -persons[i].score)
        kept: list[int] = []
        broken: set[int] = set()  # answered, but their track keeps its last good pose
        lost = False
        for i in order:
            track, person = live[i], persons[i]
            bad = _quality(person) < self.config.min_track_score
            if not bad and kept:
                same = similarity(
                    _keypoints(person)[None],
                    np.asarray([person.bbox]),
                    np.stack([_keypoints(persons[j]) for j in kept]),
                    np.asarray([persons[j].bbox for j in kept]),
                )
                bad = bool((same >= DUPLICATE_OKS).any())
            # Where its motion did not predict it: a cut, an occlusion, the pose model lost.
            # Nothing says so with no joint in view in both (None), nor for a track seen once
            # (no motion to predict with).
            agreement = pose_agreement(
                in_view(track.predicted(), *self._size),
                np.asarray(track.box),
                in_view(_keypoints(person), *self._size),
                np.asarray(person.bbox),
            )
            if agreement is None or track.sightings < 2:
                agreement = 1.0
            astray = agreement < self.config.min_track_oks
            broke = agreement < BROKEN_OKS
            # No detector run for a person leaving the view (nothing is there to find), nor for
            # one on the first frame after the detector found it, unless its pose broke
            # altogether: its box is then the detector's own moved on one frame, a fresh look
            # would find the same box, and a poor pose in it is the pose model's limit (a person
            # it barely sees), not the tracker's.
            excused = track.leaving or (track.since_anchor == 0 and not broke)
            if bad or (astray and track.leaving):
                lost = lost or not excused
                continue
            kept.append(i)
            pairs.append((i, i))
            if astray:  # kept, and the detector checks next frame
                lost = lost or not excused
                if broke:
                    broken.add(i)
        # A cut: no track goes on, and a pose that broke from its track shows another scene.
        cut = bool(broken) and all(i in broken for i, _ in pairs)
        return pairs, broken, lost, cut

    def _match_found(
        self, persons: list[Person], tracks: list[Track]
    ) -> tuple[list[tuple[int, int]], bool]:
        """Which persons of a frame the detector (or the caller) boxed continue which tracks
        (``associate``, over the tracks moved on to this frame).

        Returns:
            (person, track) index pairs, and whether this frame is a cut: persons found where
            tracks seen on one of the last two frames were (the frame after a tracked frame lost
            them is the detector's), and not one pair whose poses agree.
        """
        assert self._size is not None
        frames = [t.unseen + 1 for t in tracks]
        k = len(persons[0].keypoints) if persons else len(tracks[0].keypoints) if tracks else 0
        predicted = [t.predicted(n) for t, n in zip(tracks, frames, strict=True)]
        shifted = [
            (*(t.box[:2] + t.velocity * n), *t.box[2:]) for t, n in zip(tracks, frames, strict=True)
        ]
        found = [_keypoints(p) for p in persons]
        pairs, agree = associate(
            np.stack(predicted) if predicted else np.zeros((0, k, 3)),
            np.asarray(shifted).reshape(-1, 4),
            np.stack(found) if found else np.zeros((0, k, 3)),
            np.asarray([p.bbox for p in persons]).reshape(-1, 4),
            np.asarray([t.broken for t in tracks], dtype=bool),
            self.config.match_threshold,
            self._size,
        )
        recent = any(t.unseen <= 1 for t in tracks)
        cut = recent and bool(persons) and not any(agree)
        return [(col, row) for row, col in pairs], cut

    def _smooth(
        self, track: Track, person: Person, frame: int, t: float | None, refound: bool
    ) -> Person:
        """The person with its keypoints through the track's One Euro filter (when asked)."""
        params = self.options.smoothing
        if params is None:
            return person
        if track.smoother is None or refound:
            track.smoother = OneEuroFilter(params)
        when = t if t is not None else frame / params.fps
        raw = _keypoints(person)
        xy = track.smoother(raw[:, :2], when)
        keypoints = [
            (float(x), float(y), float(s))
            for (x, y), s in zip(xy.tolist(), raw[:, 2].tolist(), strict=True)
        ]
        return replace(person, keypoints=keypoints)


def start_tracker(engine: EngineHandle, options: TrackOptions, settings: Settings) -> Tracker:
    """A tracker for one new stream over ``engine``, with the server's knobs."""
    try:
        has_detector = engine.model_info().detector is not None
    except NotReadyError:  # its frames will be refused the same way
        has_detector = False
    return Tracker(
        engine.infer, options, TrackerConfig.from_settings(settings), has_detector=has_detector
    )
