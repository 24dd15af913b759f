"""The load generator of ``bench.serve``: prepared requests (real JPEGs + caller boxes) and
closed-loop clients over HTTP (httpx async), gRPC unary and gRPC ``StreamEstimate``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.common import load_images, percentile, person_boxes


@dataclass
class Payload:
    """One prepared request: the same image and boxes for every transport."""

    jpeg: bytes
    boxes: list[list[float]]  # [x, y, w, h, score] per person
    multipart_body: bytes = b""
    multipart_type: str = ""
    grpc_request: Any = None


def build_payloads(args: argparse.Namespace) -> list[Payload]:
    """Real JPEGs with ``persons_min..persons_max`` real-like caller boxes each, cycled."""
    from service.pb.pose.v1 import pose_pb2

    images = load_images()
    payloads = []
    counts = list(range(args.persons_min, args.persons_max + 1))
    for i, n in enumerate(counts * max(1, len(images))):
        img = images[i % len(images)]
        boxes = person_boxes(img.width, img.height, n, seed=i, anchor=img.person_box).tolist()
        boundary = f"benchboundary{i:04d}"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                f'filename="{img.name}"\r\nContent-Type: image/jpeg\r\n\r\n'
            ).encode()
            + img.data
            + (
                f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="boxes"\r\n\r\n'
                f"{_json_boxes(boxes)}\r\n--{boundary}--\r\n"
            ).encode()
        )
        request = pose_pb2.EstimateRequest(
            image=img.data,
            boxes=[
                pose_pb2.Box(x=b[0], y=b[1], width=b[2], height=b[3], score=b[4]) for b in boxes
            ],
        )
        payloads.append(
            Payload(img.data, boxes, body, f"multipart/form-data; boundary={boundary}", request)
        )
    return payloads


def _json_boxes(boxes: list[list[float]]) -> str:
    return "[" + ",".join("[" + ",".join(f"{v:.2f}" for v in b) + "]" for b in boxes) + "]"


@dataclass
class Tally:
    """Outcomes of one load level."""

    latencies_s: list[float] = field(default_factory=list)
    refused: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    measuring: bool = False
    completed: int = 0  # every answer, measured or not (tells when the warm-up is done)

    def record(self, latency_s: float, outcome: str, detail: str = "") -> None:
        """Count one completed request (only while measuring)."""
        self.completed += 1
        if not self.measuring:
            return
        if outcome == "ok":
            self.latencies_s.append(latency_s)
        elif outcome == "refused":
            self.refused += 1
        else:
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(detail[:300])


def _cycle(payloads: list[Payload], start: int) -> Iterator[Payload]:
    i = start
    while True:
        yield payloads[i % len(payloads)]
        i += 1


async def http_level(
    url: str,
    payloads: list[Payload],
    concurrency: int,
    tally: Tally,
    stop: asyncio.Event,
    timeout_s: float,
) -> None:
    """``concurrency`` closed-loop HTTP clients until ``stop`` is set."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:

        async def worker(i: int) -> None:
            for p in _cycle(payloads, i):
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        url, content=p.multipart_body, headers={"content-type": p.multipart_type}
                    )
                except httpx.HTTPError as exc:
                    tally.record(time.perf_counter() - t0, "error", repr(exc))
                    continue
                dt = time.perf_counter() - t0
                if r.status_code == 200:
                    tally.record(dt, "ok")
                elif r.status_code == 429:
                    tally.record(dt, "refused")
                else:
                    tally.record(dt, "error", f"{r.status_code} {r.text[:200]}")

        await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def grpc_unary_level(
    channel: Any,
    payloads: list[Payload],
    concurrency: int,
    tally: Tally,
    stop: asyncio.Event,
    timeout_s: float,
) -> None:
    """``concurrency`` closed-loop unary ``Estimate`` callers on one channel."""
    import grpc

    from service.pb.pose.v1 import pose_pb2_grpc

    stub = pose_pb2_grpc.PoseServiceStub(channel)

    async def worker(i: int) -> None:
        for p in _cycle(payloads, i):
            if stop.is_set():
                return
            t0 = time.perf_counter()
            try:
                await stub.Estimate(p.grpc_request, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                dt = time.perf_counter() - t0
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    tally.record(dt, "refused")
                else:
                    tally.record(dt, "error", f"{exc.code().name} {exc.details()}")
                continue
            tally.record(time.perf_counter() - t0, "ok")

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def grpc_stream_level(
    channel: Any,
    payloads: list[Payload],
    concurrency: int,
    window: int,
    tally: Tally,
    stop: asyncio.Event,
    timeout_s: float,
) -> None:
    """``ceil(concurrency / window)`` ``StreamEstimate`` streams, each keeping up to ``window``
    frames in flight (``concurrency`` in all); per-frame latency is send -> its response."""
    import grpc

    from service.pb.pose.v1 import pose_pb2_grpc

    stub = pose_pb2_grpc.PoseServiceStub(channel)
    n_streams = math.ceil(concurrency / window)
    per_stream = [min(window, concurrency - s * window) for s in range(n_streams)]

    async def one_stream(s: int, in_flight: int) -> None:
        call = stub.StreamEstimate(timeout=None)
        slots = asyncio.Semaphore(in_flight)
        sent: deque[float] = deque()

        async def sender() -> None:
            for p in _cycle(payloads, s * window):
                await slots.acquire()
                if stop.is_set():
                    break
                sent.append(time.perf_counter())
                await call.write(p.grpc_request)
            await call.done_writing()

        send_task = asyncio.create_task(sender())
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    break
                dt = time.perf_counter() - sent.popleft()
                if resp.HasField("error") and resp.error.code:
                    outcome = "refused" if resp.error.code == "queue_full" else "error"
                    tally.record(dt, outcome, f"{resp.error.code} {resp.error.message}")
                else:
                    tally.record(dt, "ok")
                slots.release()
        except grpc.aio.AioRpcError as exc:
            tally.record(0.0, "error", f"stream {exc.code().name} {exc.details()}")
        finally:
            slots.release()
            send_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await send_task

    await asyncio.gather(*(one_stream(s, n) for s, n in enumerate(per_stream)))


def level_stats(tally: Tally, seconds: float) -> dict[str, Any]:
    """Throughput and latency percentiles of one level."""
    ms = [s * 1000.0 for s in tally.latencies_s]
    return {
        "ok": len(ms),
        "refused": tally.refused,
        "errors": tally.errors,
        "error_samples": tally.error_samples,
        "measured_s": seconds,
        "throughput_rps": len(ms) / seconds if seconds > 0 else 0.0,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms) if ms else 0.0,
        "max_ms": max(ms) if ms else 0.0,
    }
