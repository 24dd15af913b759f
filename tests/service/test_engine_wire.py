"""What crosses between a front end and the engine process (service.engine_wire): an INFER as
plain tuples, and the parsed boxes as float32 bytes, come back unchanged."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from model.interfaces import ImageResult, Person, PoseOptions
from service.engine_wire import (
    ImageRef,
    InferMessage,
    ResultMessage,
    boxes_from_wire,
    boxes_to_wire,
    dumps,
    loads,
)
from service.validation import RequestLimits, parse_boxes


@pytest.mark.parametrize(
    "message",
    [
        InferMessage(0, ImageRef("inline", (3, 48, 64)), None, PoseOptions(), None, "", False),
        InferMessage(
            2**40,
            ImageRef("file", (3, 480, 640), "/dev/shm/pose-x/img-1-7"),
            boxes_to_wire(parse_boxes([[1, 2, 3, 4], [5.5, 6, 7, 8, 0.25]], RequestLimits())),
            PoseOptions(
                flip_test=False,
                return_sigmas=True,
                oks_nms=True,
                precision="bf16",
                swap_flip_scores=True,
            ),
            12345.678,
            "key:0123456789abcdef",
            True,
        ),
        InferMessage(3, ImageRef("encoded"), None, PoseOptions(precision="fp16"), 1.5, "s", False),
    ],
    ids=["defaults", "every-field-set", "encoded"],
)
def test_an_infer_crosses_as_plain_tuples_and_comes_back_equal(message: InferMessage) -> None:
    body = message.to_wire()
    data = dumps([(b"infer", body, None)])
    for name in ("InferMessage", "ImageRef", "PoseOptions"):
        assert name.encode() not in data  # no class is named in the pickle
    ((_, received, _),) = loads(data)
    again = InferMessage.from_wire(received)
    assert again == message
    assert dataclasses.asdict(again.options) == dataclasses.asdict(message.options)
    assert isinstance(again.image, ImageRef)


def test_jobs_asking_the_same_options_share_one_instance() -> None:
    options = PoseOptions(flip_test=False, precision="bf16")
    first, second = (
        InferMessage.from_wire(
            pickle.loads(
                pickle.dumps(
                    InferMessage(i, ImageRef("encoded"), None, options, None, "", False).to_wire()
                )
            )
        )
        for i in range(2)
    )
    assert first.options == options and first.options is second.options


def test_boxes_cross_as_float32_rows() -> None:
    boxes = parse_boxes([[1, 2, 3, 4], [0.1, 1e7, 2.5, 3.25, 0.5]], RequestLimits())
    back = boxes_from_wire(boxes_to_wire(boxes))
    assert back is not None and back.dtype == torch.float32 and back.shape == (2, 5)
    assert torch.equal(back, boxes)
    back[0, 0] = 99.0  # its own memory, writable
    assert boxes_from_wire(None) is None and boxes_to_wire(None) is None
    none = boxes_from_wire(boxes_to_wire(parse_boxes([], RequestLimits())))
    assert none is not None and none.shape == (0, 5)  # "no boxes" stays "no persons", not "detect"
    with pytest.raises(ValueError, match="whole"):
        boxes_from_wire(b"\x00" * 21)


@pytest.mark.parametrize("sigmas", [False, True])
def test_a_result_crosses_as_plain_tuples_and_comes_back_equal(sigmas: bool) -> None:
    persons = [
        Person(
            bbox=(1.0 + i, 2.0, 30.5, 40.25),
            bbox_score=0.5 + i / 10,
            score=0.25 * i,
            keypoints=[(float(k), k / 2, k / 17) for k in range(17)],
            sigmas=[(0.5, float(k)) for k in range(17)] if sigmas else None,
        )
        for i in range(3)
    ]
    message = ResultMessage(7, ImageResult(640, 480, persons), {"queue": 1.5, "total": 3.0})
    data = dumps([(b"result", message.to_wire(), None)])
    for name in ("ResultMessage", "ImageResult", "Person"):
        assert name.encode() not in data
    ((_, received, _),) = loads(data)
    again = ResultMessage.from_wire(received)
    assert again == message
    assert all(isinstance(p, Person) for p in again.result.persons)
    empty = ResultMessage(8, ImageResult(1, 1, []), {})
    assert ResultMessage.from_wire(loads(dumps(empty.to_wire()))) == empty
