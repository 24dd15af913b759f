"""What crosses between a front end and the engine process (service.engine_wire): an INFER as
plain tuples, and the parsed boxes as float32 bytes, come back unchanged."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from model.interfaces import PoseOptions
from service.engine_wire import (
    ImageRef,
    InferMessage,
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
    with pytest.raises(ValueError, match="whole"):
        boxes_from_wire(b"\x00" * 21)
