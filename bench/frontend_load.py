"""The load side of ``bench.frontend``: closed-loop HTTP and gRPC callers, in the benchmark's
process or in load processes of their own (``python -m bench.frontend_load``, which
``bench.frontend --load-processes`` starts).

Light on purpose: a load process imports neither torch nor the benchmark's harness (about 3.5 s
a process), so that starting four of them per measurement costs well under a second.

A load process runs ``generate`` and answers its parent over stdin/stdout, one line each way:
it writes ``started`` once its callers run; to ``counts`` it answers its outcomes so far as a
JSON object; to ``stop`` it stops, answers its outcomes, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from PIL import Image

BOXES = [[4.0, 4.0, 20.0, 30.0], [30.0, 8.0, 16.0, 30.0], [10.0, 2.0, 12.0, 12.0]]
MODES = ("http-raw", "http-json", "grpc-unary", "grpc-stream")


def tiny_jpeg() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def http_body(mode: str, image: bytes) -> tuple[str, bytes, str]:
    """The pose request of ``mode`` ("http-raw": the image as the body, the boxes in the query;
    "http-json": both in a JSON body, the image as base64): (path with query, body, type)."""
    if mode == "http-raw":
        query = "boxes=" + json.dumps(BOXES, separators=(",", ":"))
        path = "/v1/pose?" + query.replace("[", "%5B").replace("]", "%5D").replace(",", "%2C")
        return path, image, "image/jpeg"
    body = json.dumps({"image": base64.b64encode(image).decode(), "boxes": BOXES}).encode()
    return "/v1/pose", body, "application/json"


def estimate_request(image: bytes) -> Any:
    """The ``pose.v1.EstimateRequest`` of the gRPC modes: ``image`` and the three boxes."""
    from service.pb.pose.v1 import pose_pb2

    boxes = [pose_pb2.Box(x=b[0], y=b[1], width=b[2], height=b[3]) for b in BOXES]
    return pose_pb2.EstimateRequest(image=image, boxes=boxes)


def http_request(mode: str, port: int, image: bytes) -> bytes:
    path, body, kind = http_body(mode, image)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def http_caller(
    port: int, request: bytes, stop: asyncio.Event, counts: dict[str, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not stop.is_set():
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            outcome = "ok" if status == 200 else f"http {status}"
            counts[outcome] = counts.get(outcome, 0) + 1
    finally:
        writer.close()


async def grpc_unary_caller(
    stub: Any, request: Any, stop: asyncio.Event, counts: dict[str, int]
) -> None:
    while not stop.is_set():
        await stub.Estimate(request, timeout=30)
        counts["ok"] = counts.get("ok", 0) + 1


async def grpc_stream(
    stub: Any, request: Any, window: int, stop: asyncio.Event, counts: dict[str, int]
) -> None:
    import grpc

    call = stub.StreamEstimate()
    slots = asyncio.Semaphore(window)

    async def sender() -> None:
        while not stop.is_set():
            await slots.acquire()
            await call.write(request)
        await call.done_writing()

    task = asyncio.create_task(sender())
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            break
        outcome = response.error.code or "ok"
        counts[outcome] = counts.get(outcome, 0) + 1
        slots.release()
    await task


async def generate(
    http_port: int | None,
    grpc_port: int | None,
    mode: str,
    concurrency: int,
    window: int,
    stop: asyncio.Event,
    counts: dict[str, int],
    started: Callable[[], None] | None = None,
    grpc_channels: int = 1,
) -> None:
    """Closed-loop load from this process until ``stop``: ``concurrency`` HTTP connections, or
    ``concurrency`` gRPC unary callers (or streams of ``window`` frames in flight) spread over
    ``grpc_channels`` channels, each its own connection (so its own front end: SO_REUSEPORT
    spreads connections, not calls). Outcomes are counted in ``counts``; ``started`` is called
    once the callers run."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    image = tiny_jpeg()
    calls: list[Coroutine[Any, Any, None]] = []
    channels: list[Any] = []
    if mode.startswith("http"):
        assert http_port is not None
        request = http_request(mode, http_port, image)
        calls = [http_caller(http_port, request, stop, counts) for _ in range(concurrency)]
    else:
        import grpc

        from service.pb.pose.v1 import pose_pb2_grpc

        # A local subchannel pool: a connection per channel (else channels to one address share
        # one).
        options = [("grpc.use_local_subchannel_pool", 1)]
        address = f"127.0.0.1:{grpc_port}"
        channels = [grpc.aio.insecure_channel(address, options) for _ in range(grpc_channels)]
        stubs = [pose_pb2_grpc.PoseServiceStub(channel) for channel in channels]
        message = estimate_request(image)
        if mode == "grpc-unary":
            calls = [
                grpc_unary_caller(stubs[i % len(stubs)], message, stop, counts)
                for i in range(concurrency)
            ]
        else:
            frames = min(window, concurrency)
            calls = [
                grpc_stream(stubs[i % len(stubs)], message, frames, stop, counts)
                for i in range(max(1, concurrency // window))
            ]
    tasks = [asyncio.create_task(call) for call in calls]
    if started is not None:
        started()
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()


def main(argv: list[str] | None = None) -> int:
    """One load process (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.frontend_load")
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--grpc-port", type=int)
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--grpc-channels", type=int, default=1)
    args = parser.parse_args(argv)

    async def run() -> None:
        counts: dict[str, int] = {}
        stop = asyncio.Event()
        commands = os.fdopen(sys.stdin.fileno(), "rb", buffering=0, closefd=False)

        def answer(text: str) -> None:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

        def command() -> None:
            line = commands.readline().strip()
            if line in (b"stop", b""):  # (b"": the parent is gone)
                stop.set()
                asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
            answer(json.dumps(counts))

        asyncio.get_running_loop().add_reader(sys.stdin.fileno(), command)
        await generate(
            args.http_port, args.grpc_port, args.mode, args.concurrency, args.window, stop,
            counts, started=lambda: answer("started"), grpc_channels=args.grpc_channels,
        )  # fmt: skip

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
