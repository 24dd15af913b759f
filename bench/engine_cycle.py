"""What the engine process costs per job and per cycle: its CPU time (all its threads, from
``/proc``) when one client sends bursts of k INFERs over its socket and waits for the k answers
before the next burst.

The engine process is the service's own (``service.processes.engine_main`` on the identity
model, spawned as the supervising parent spawns it); the client speaks ``service.engine_wire`` as
a front end does (a 64x48 image inline, three caller boxes). Each burst is one cycle of the
engine: a wake on the socket, the jobs admitted, its worker woken, one batch (k <= max batch
size), the answers sent. Over several k the CPU per burst is a straight line, ``fixed + k *
per_job``, fitted here: ``fixed`` is what a cycle costs whatever it carries (the thread wake-ups
and hand-offs), ``per_job`` what each job adds. ``bench.frontend``'s engine share per request is
this line divided by the jobs a cycle carries under its load, which is why it falls with load;
``jobs_per_s`` at the largest k is what one engine core takes when bursts are full.

``--eager`` marks the jobs eager, as stream frames are: a batch is due at once instead of after
``max_delay_ms``, which a lone unary job waits for.

    python -m bench.engine_cycle --bursts 1 2 4 8 16 --jobs 6000
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import uvloop

from bench.common import REPO_ROOT, cpu_seconds, environment, write_result
from bench.frontend_load import BOXES
from model.interfaces import PoseOptions
from service.engine_wire import (
    ERROR,
    HELLO,
    INFER,
    RESULT,
    STATE,
    Channel,
    ImageRef,
    InferMessage,
    Message,
    boxes_to_wire,
    connect,
    inline_payload,
)
from service.processes import RunPaths, engine_main
from service.settings import Settings

IMAGE_SHAPE = (3, 48, 64)  # (C, H, W): the image bench.frontend sends, decoded
STARTUP_TIMEOUT_S = 120.0


class Client:
    """A front end's side of the engine socket, reduced to bursts of INFERs."""

    def __init__(self, eager: bool) -> None:
        self._eager = eager
        self._channel: Channel | None = None
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._ready = asyncio.Event()
        self._rid = 0
        image = torch.zeros(IMAGE_SHAPE, dtype=torch.uint8)
        self._payload = inline_payload(image)
        self._ref = ImageRef("inline", IMAGE_SHAPE)
        boxes = torch.tensor([[*box, 1.0] for box in BOXES], dtype=torch.float32)
        self._boxes = boxes_to_wire(boxes)
        self._options = PoseOptions()

    async def connect(self, path: str) -> None:
        """Connect (retrying while the engine process starts), say HELLO, wait until ready."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                self._channel = await connect(path, self._received)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        self._channel.put(HELLO, 0)
        await asyncio.wait_for(self._ready.wait(), STARTUP_TIMEOUT_S)

    def _received(self, channel: Channel, messages: list[Message]) -> None:
        for kind, body, _ in messages:
            if kind == STATE:
                if body.ready:
                    self._ready.set()
            elif kind == RESULT:
                self._waiting.pop(body[0]).set_result(kind)
            elif kind == ERROR:
                self._waiting.pop(body.request_id).set_exception(
                    RuntimeError(f"{body.code}: {body.message}")
                )

    async def burst(self, k: int) -> None:
        """Send ``k`` INFERs (one frame: queued in one event-loop iteration), await the answers."""
        assert self._channel is not None
        loop = asyncio.get_running_loop()
        answers = []
        deadline = time.monotonic() + 30.0
        for _ in range(k):
            self._rid += 1
            answer = loop.create_future()
            self._waiting[self._rid] = answer
            answers.append(answer)
            message = InferMessage(
                self._rid, self._ref, self._boxes, self._options, deadline, "bench", self._eager
            )
            self._channel.put(INFER, message.to_wire(), self._payload)
        await asyncio.gather(*answers)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = a + b x`` over ``(x, y)`` points; (a, b). A single x: (0, mean y / x),
    as nothing tells the fixed part from the rest."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    if len(set(xs)) < 2:
        return 0.0, statistics.fmean(ys) / xs[0]
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


async def measure(
    path: str, engine_pid: int, bursts: list[int], jobs: int, rounds: int, eager: bool
) -> list[dict[str, Any]]:
    client = Client(eager)
    await client.connect(path)
    rows = []
    try:
        for k in bursts:
            await client.burst(k)  # (the first batch of a size primes the engine's cost curve)
        for _ in range(rounds):
            for k in bursts:
                cycles = max(1, jobs // k)
                cpu0, t0 = cpu_seconds([engine_pid]), time.monotonic()
                for _ in range(cycles):
                    await client.burst(k)
                cpu1, t1 = cpu_seconds([engine_pid]), time.monotonic()
                row = {
                    "burst": k,
                    "eager": eager,
                    "cycles": cycles,
                    "engine_us_per_job": 1e6 * (cpu1 - cpu0) / (cycles * k),
                    "engine_us_per_cycle": 1e6 * (cpu1 - cpu0) / cycles,
                    "jobs_per_s": cycles * k / (t1 - t0),
                }
                rows.append(row)
                print(
                    f"burst {k:3d}{' eager' if eager else ''}: engine "
                    f"{row['engine_us_per_job']:6.1f} us per job, "
                    f"{row['engine_us_per_cycle']:7.1f} us per cycle, "
                    f"{row['jobs_per_s']:7,.0f} jobs/s",
                    flush=True,
                )
    finally:
        client.close()
    return rows


def run_engine(
    settings: Settings, bursts: list[int], jobs: int, rounds: int, eager: bool
) -> list[dict[str, Any]]:
    """Spawn the engine process, measure, stop it; the rows."""
    paths = RunPaths.create()  # the run folder the service makes: socket, metrics, images
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=engine_main, args=(settings, paths.engine_address, os.getpid())
    )
    # The child's metrics go to files, as the service's (its environment is copied at start).
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(paths.metrics)
    try:
        process.start()
    finally:
        if before is None:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = before
    try:
        assert process.pid is not None
        return uvloop.run(measure(paths.engine_address, process.pid, bursts, jobs, rounds, eager))
    finally:
        process.terminate()  # SIGTERM: the engine drains (nothing is in flight) and exits
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join(10)
        shutil.rmtree(paths.root, ignore_errors=True)


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fitted line per eagerness: fixed us per cycle, us per job."""
    out = []
    for eager in sorted({r["eager"] for r in rows}):
        points = [(r["burst"], r["engine_us_per_cycle"]) for r in rows if r["eager"] == eager]
        fixed, per_job = fit_line(points)
        out.append({"eager": eager, "fixed_us_per_cycle": fixed, "us_per_job": per_job})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine_cycle", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--bursts", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--jobs", type=int, default=6000, help="jobs per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--eager", choices=("no", "yes", "both"), default="both", help="mark jobs eager"
    )
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    env = environment("cpu")
    settings = Settings(
        model="identity",
        device="cpu",
        max_batch_size=args.max_batch_size,
        max_queue_size=max(1024, max(args.bursts)),
        log_level="warning",
    )
    rows: list[dict[str, Any]] = []
    for eager in {"no": [False], "yes": [True], "both": [False, True]}[args.eager]:
        rows += run_engine(settings, args.bursts, args.jobs, args.rounds, eager)
    fits = summary(rows)
    for fit in fits:
        print(
            f"{'eager' if fit['eager'] else 'unary'}: {fit['fixed_us_per_cycle']:.0f} us per "
            f"cycle + {fit['us_per_job']:.1f} us per job",
            flush=True,
        )
    path = write_result(
        "engine_cycle", "cpu", args, rows, out_dir=args.out_dir, env=env, extra={"fit": fits}
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
