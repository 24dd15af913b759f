"""What crosses between a front end and the engine process (service.engine_wire): an INFER as
plain tuples, and the parsed boxes as float32 bytes, come back unchanged; the channel's frames
arrive whole, in order, once."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from model.interfaces import ImageResult, Person, PoseOptions
from service.engine_wire import (
    Channel,
    ImageRef,
    InferMessage,
    Message,
    ResultMessage,
    boxes_from_wire,
    boxes_to_wire,
    connect,
    dumps,
    listen,
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


async def test_a_channel_delivers_bursts_in_order_whole_and_once(tmp_path: Path) -> None:
    """Real Unix sockets: a burst of 40 messages (payloads up to 1 MB, so frames arrive in many
    reads) goes out as one frame and arrives as one list, in order and intact; a second burst
    is a second list; an answer comes back the same way; closing one end tells the other."""
    received: list[list[Message]] = []
    answers: list[list[Message]] = []
    lost: list[Channel] = []
    arrived = asyncio.Event()

    def on_server(channel: Channel, messages: list[Message]) -> None:
        received.append(messages)
        if len(received) == 2:
            channel.put(b"result", ("done", len(messages)))
            arrived.set()

    path = str(tmp_path / "engine.sock")
    server = await listen(path, on_server, lost.append)
    client = await connect(path, lambda _, messages: answers.append(messages))
    rng = np.random.default_rng(0)
    sizes = [int(n) for n in rng.integers(0, 1 << 20, size=40)]
    sent = [(b"infer", (i, "x" * i), rng.bytes(n)) for i, n in enumerate(sizes)]
    for kind, body, payload in sent:
        client.put(kind, body, bytearray(payload))
    await asyncio.sleep(0)  # the first burst leaves
    client.put(b"cancel", 7)
    await asyncio.wait_for(arrived.wait(), 30)
    assert [[(k, b, bytes(p)) for k, b, p in received[0]]] == [sent]
    assert received[1] == [(b"cancel", 7, None)]
    while not answers:
        await asyncio.sleep(0.01)
    assert answers == [[(b"result", ("done", 1), None)]]
    client.close()
    while not lost:
        await asyncio.sleep(0.01)
    server.close()


def test_a_frame_split_anywhere_is_read_whole() -> None:
    """``data_received`` gets a stream cut at arbitrary points (a length split across reads,
    several frames in one read): every message arrives once, in order."""
    got: list[Message] = []
    channel = Channel(lambda _, messages: got.extend(messages))
    frames = b""
    expected = []
    for i in range(20):
        messages = [(b"infer", (i, j), bytes(range(i % 7))) for j in range(i % 3 + 1)]
        expected += messages
        body = dumps(messages)
        frames += struct.pack("<I", len(body)) + body
    rng = np.random.default_rng(1)
    cuts = sorted({int(c) for c in rng.integers(1, len(frames), size=60)})
    for start, end in zip([0, *cuts], [*cuts, len(frames)], strict=True):
        channel.data_received(frames[start:end])
    assert got == expected
