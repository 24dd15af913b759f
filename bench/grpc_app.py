"""What the gRPC servicer itself costs per pose call or stream frame, without sockets:
``service.rpc.PoseServicer`` over the identity engine, called in one process, against the bare
servicer of ``bench.bare_servers`` called the same way; the gRPC twin of ``bench.http_app``.

``bench.frontend`` measures whole servers, where grpc's C core, HTTP/2 and the socket calls are
the same for both targets and the load generator shares the cores (its ratios move by 10 %
between runs on 2 cores). Here each call gets its request parsed from the wire bytes and its
answer serialised, as grpc does, and nothing else of grpc runs. Targets:

- ``service``: the servicer over the engine as ``serve`` builds it (batch queue, worker thread,
  metrics);
- ``service-inline``: the same servicer over an engine that does the same work on the event loop,
  with no queue and no thread: the request's checks (``service.validation``), the decode, the
  identity pipeline on the one image. What ``service`` costs beyond it is the batching engine's
  (admission, the hand-offs to and from its worker, batch bookkeeping); what it costs beyond
  ``bare`` is the servicer's (parsing, options, the stream's window, the answer);
- ``bare``: ``bench.bare_servers``' servicer (decode, answer; nothing else).

``unary``: ``--concurrency`` callers of ``Estimate`` in a loop. ``stream``: one
``StreamEstimate`` kept ``--window`` frames full, each answer read and then a loop iteration
given up (where grpc waits for the write's completion). The request is ``bench.frontend``'s (a
64x48 JPEG, three boxes). Rounds alternate between the targets; the median of the process's CPU
per call (``time.process_time``, every thread) is kept.

    python -m bench.grpc_app
    python -m bench.grpc_app --modes stream --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

from bench.bare_servers import grpc_servicer
from bench.common import REPO_ROOT, alternating_medians, environment, write_result
from bench.frontend_load import BOXES, estimate_request, tiny_jpeg
from model.interfaces import PipelineItem
from service import serving
from service.engine_api import PoseRequest, PoseResponse
from service.metrics import Metrics
from service.model_choice import choose_model
from service.pb.pose.v1 import pose_pb2
from service.rpc import PoseServicer
from service.settings import Settings
from service.uploads import decode_image
from service.validation import check_boxes_in_image, check_image, check_options, parse_boxes

TARGETS = ("service", "service-inline", "bare")
MODES = ("unary", "stream")


class _Context:
    """What the servicer asks of ``grpc.aio.ServicerContext`` on these calls."""

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: Any, details: str) -> NoReturn:
        raise RuntimeError(f"aborted: {code} {details}")


class InlineEngine:
    """The engine's work for one image, on the event loop: no queue, no worker thread."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._limits = settings.request_limits()
        self._pipeline = serving.pipeline_factory(choose_model(settings), settings)("cpu")

    async def infer(self, request: PoseRequest) -> PoseResponse:
        t0 = time.monotonic()
        boxes = None if request.boxes is None else parse_boxes(request.boxes, self._limits)
        check_options(request.options)
        assert isinstance(request.image, bytes)
        image = decode_image(request.image, max_pixels=self._settings.max_image_pixels)
        check_image(image)
        if boxes is not None:
            check_boxes_in_image(boxes, int(image.shape[2]), int(image.shape[1]))
        (result,), _ = self._pipeline.run([PipelineItem(image, boxes, request.options)])
        return PoseResponse(result=result, timing_ms={"total": (time.monotonic() - t0) * 1e3})


async def _unary(servicer: Any, data: bytes, calls: int) -> None:
    context = _Context()
    for _ in range(calls):
        answer = await servicer.Estimate(pose_pb2.EstimateRequest.FromString(data), context)
        if answer.error.code or len(answer.persons) != len(BOXES):
            raise RuntimeError(f"a wrong answer: {answer}")
        answer.SerializeToString()


async def _stream(servicer: Any, data: bytes, frames: int, window: int) -> None:
    slots = asyncio.Semaphore(window)

    async def requests() -> AsyncIterator[Any]:
        for _ in range(frames):
            await slots.acquire()
            yield pose_pb2.EstimateRequest.FromString(data)

    answered = 0
    async for answer in servicer.StreamEstimate(requests(), _Context()):
        if answer.error.code or len(answer.persons) != len(BOXES):
            raise RuntimeError(f"a wrong answer: {answer}")
        answer.SerializeToString()
        answered += 1
        slots.release()
        await asyncio.sleep(0)  # (grpc completes the write on a later loop iteration)
    if answered != frames:
        raise RuntimeError(f"{answered} answers to {frames} frames")


async def _measure(
    target: str, mode: str, concurrency: int, window: int, requests: int
) -> dict[str, Any]:
    settings = Settings(model="identity", device="cpu", max_queue_size=1024)
    metrics = Metrics()
    engine = None
    if target == "bare":
        servicer = grpc_servicer()
    elif target == "service-inline":
        servicer = PoseServicer(InlineEngine(settings), settings, metrics)  # type: ignore[arg-type]
    else:
        choice = choose_model(settings)
        engine = serving.build_engine(settings, serving.pipeline_factory(choice, settings), metrics)
        await engine.start()
        servicer = PoseServicer(engine, settings, metrics)
    data = bytes(estimate_request(tiny_jpeg()).SerializeToString())

    async def load(count: int) -> None:
        if mode == "unary":
            per_caller = max(1, count // concurrency)
            await asyncio.gather(*(_unary(servicer, data, per_caller) for _ in range(concurrency)))
        else:
            await _stream(servicer, data, count, window)

    try:
        await load(min(requests, 2000))  # (warm-up)
        answered = requests if mode == "stream" else max(1, requests // concurrency) * concurrency
        t0, cpu0 = time.perf_counter(), time.process_time()
        await load(requests)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        if engine is not None:
            await engine.stop()
    return {
        "cpu_ms_per_request": cpu / answered * 1000.0,
        "requests_per_s": answered / seconds,
        "concurrency": window if mode == "stream" else concurrency,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_app", description=__doc__)
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--concurrency", type=int, default=16, help="unary callers")
    parser.add_argument("--window", type=int, default=16, help="frames in flight on the stream")
    parser.add_argument("--requests", type=int, default=16000, help="per round and target")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    env = environment("cpu")
    cases = [(t, m) for m in args.modes for t in args.targets]
    rows = alternating_medians(
        cases,
        lambda t, m: serving.run(_measure(t, m, args.concurrency, args.window, args.requests)),
        args.rounds,
    )
    path = write_result("grpc_app", "cpu", args, rows, out_dir=args.out_dir, env=env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
