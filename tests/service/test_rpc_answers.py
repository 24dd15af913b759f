"""An engine answer as protobuf (service.rpc.response_to_proto, which writes the persons as wire
bytes with numpy) is the message that building every field with protobuf's own classes gives."""

from __future__ import annotations

import math
from typing import Any

import pytest

from model.interfaces import ImageResult, Person
from service.engine import PoseResponse
from service.pb.pose.v1 import pose_pb2
from service.rpc import response_to_proto
from service.tracking import TrackedFrame


def reference(
    response: PoseResponse, frame_id: str, index: int, tracked: TrackedFrame | None
) -> Any:
    """Field by field, with the generated classes: the obvious way, slow."""
    persons = []
    for i, p in enumerate(response.result.persons):
        keypoints = [
            pose_pb2.Keypoint(
                x=x,
                y=y,
                score=score,
                sigma_x=None if p.sigmas is None else p.sigmas[k][0],
                sigma_y=None if p.sigmas is None else p.sigmas[k][1],
            )
            for k, (x, y, score) in enumerate(p.keypoints)
        ]
        box = pose_pb2.Box(x=p.bbox[0], y=p.bbox[1], width=p.bbox[2], height=p.bbox[3])
        box.score = p.bbox_score
        persons.append(
            pose_pb2.Person(
                box=box,
                score=p.score,
                keypoints=keypoints,
                track_id=None if tracked is None else tracked.track_ids[i],
            )
        )
    return pose_pb2.EstimateResponse(
        frame_id=frame_id,
        persons=persons,
        width=response.result.width,
        height=response.result.height,
        timing_ms=response.timing_ms,
        index=index,
        detector_ran=tracked is not None and tracked.detector_ran,
    )


def person(i: int, keypoints: int = 17, sigmas: bool = False) -> Person:
    return Person(
        bbox=(1.5 * i, -2.0, 1e7, 0.1 + i),
        bbox_score=0.0 if i == 0 else 1 / (i + 2),
        score=-0.0 if i == 1 else 0.3 * i,
        keypoints=[(k * 3.7 - i, 1e-9 * k, 1.5 - k / 7) for k in range(keypoints)],
        sigmas=[(0.1 * k, 2.0**k) for k in range(keypoints)] if sigmas else None,
    )


CASES = {
    "none": [],
    "one": [person(0)],
    "three": [person(i) for i in range(3)],
    "sigmas": [person(i, sigmas=True) for i in range(4)],
    "mixed-sigmas": [person(0), person(1, sigmas=True)],
    "five-keypoints": [person(i, keypoints=5) for i in range(2)],
    "huge": [Person((3.5e38, 1e39, math.inf, 4.0), 0.5, 1e300, [(1e39, -1e39, 0.5)] * 17)],
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("tracked", [False, True])
def test_the_answer_is_the_one_protobuf_builds(name: str, tracked: bool) -> None:
    persons = CASES[name]
    response = PoseResponse(
        result=ImageResult(width=640, height=480, persons=persons),
        timing_ms={"queue": 0.25, "decode": 1.0, "detect": 0.0, "pose": 3.5, "total": 5.125},
    )
    frame = (
        TrackedFrame(response, [0, 2**40 + 7, 127, 128][: len(persons)], True) if tracked else None
    )
    fast = response_to_proto(response, "frame-é", 2**33 if tracked else 0, frame)
    slow = reference(response, "frame-é", 2**33 if tracked else 0, frame)
    assert fast == slow
    assert fast.SerializeToString(deterministic=True) == slow.SerializeToString(deterministic=True)
    for message in fast.persons:
        assert message.box.HasField("score")
        assert message.HasField("track_id") == tracked
