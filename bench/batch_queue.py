"""What forming one batch costs the engine's queue (``service.batching.BatchQueue.next_batch``),
by jobs queued, sources and batch size: the worker's time with the queue's lock held.

The queue is kept full (``queued`` jobs from ``sources`` sources, round-robin, three caller
boxes each): each round takes one batch of up to ``batch`` jobs, fairly over the sources, and
admits as many new jobs, so every batch is formed from the same backlog. A deep queue of many
sources is what a GPU machine sees with many clients and front ends; with one source the
fairness order is trivial but the queue is still long.

    python -m bench.batch_queue
    python -m bench.batch_queue --cases 48:64:16 1024:1024:128 --rounds 300
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import REPO_ROOT, environment, write_result
from model.interfaces import PipelineItem
from service.batching import BatchQueue, Job, JobState

DEFAULT_CASES = ["48:1:16", "48:64:16", "240:256:16", "512:512:64", "1024:1024:128"]


def measure(queued: int, sources: int, batch: int, rounds: int) -> dict[str, Any]:
    """Microseconds per ``next_batch`` over ``rounds`` batches (median and mean)."""
    queue = BatchQueue(
        max_batch_size=batch, max_delay_s=0.0, max_queue_size=queued * 2, on_depth=lambda d: None
    )
    loop = asyncio.new_event_loop()
    image = torch.zeros((3, 4, 4), dtype=torch.uint8)
    boxes = torch.ones((3, 5))
    made = 0

    def admit() -> None:
        nonlocal made
        job = Job(
            item=PipelineItem(image=image, boxes=boxes),
            future=loop.create_future(),
            loop=loop,
            deadline=None,
            t_submit=time.monotonic(),
            state=JobState.QUEUED,
            source=f"source-{made % sources}",
        )
        made += 1
        assert queue.admit(job) is None

    for _ in range(queued):
        admit()
    times = []
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            taken = queue.next_batch(None)
            times.append(time.perf_counter() - t0)
            assert taken is not None
            jobs, _ = taken
            queue.finished(jobs)
            for _ in jobs:
                admit()
    finally:
        loop.close()
    return {
        "queued": queued,
        "sources": sources,
        "batch": batch,
        "rounds": rounds,
        "us_per_batch_median": statistics.median(times) * 1e6,
        "us_per_batch_mean": statistics.fmean(times) * 1e6,
    }


def _case(text: str) -> tuple[int, int, int]:
    queued, sources, batch = (int(part) for part in text.split(":"))
    if min(queued, sources, batch) < 1:
        raise argparse.ArgumentTypeError(f"{text}: queued:sources:batch, each at least 1")
    return queued, sources, batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_queue", description=__doc__)
    parser.add_argument(
        "--cases", nargs="+", type=_case, default=[_case(c) for c in DEFAULT_CASES],
        help="queued:sources:batch",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    env = environment("cpu")
    rows = []
    for queued, sources, batch in args.cases:
        row = measure(queued, sources, batch, args.rounds)
        rows.append(row)
        print(
            f"{queued:5d} queued, {sources:5d} sources, batches of {batch:3d}: "
            f"{row['us_per_batch_median']:8.1f} us per batch (median)",
            flush=True,
        )
    path = write_result("batch_queue", "cpu", args, rows, out_dir=args.out_dir, env=env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
