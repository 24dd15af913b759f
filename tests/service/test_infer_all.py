"""``service.engine_api.infer_all``: answers in order or the first error, and a caller that goes
away noticed by a watcher started only once the answers take ``WATCH_ABANDONED_AFTER_S``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.engine_api import WATCH_ABANDONED_AFTER_S, PoseRequest, infer_all
from service.errors import ClientClosedError, QueueFullError


class Calls:
    """An ``infer`` whose answers the test settles by hand."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[Any]] = []

    async def __call__(self, request: PoseRequest) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return await future


def request() -> PoseRequest:
    return PoseRequest(image=b"")


async def submitted(calls: Calls, count: int) -> None:
    """Until ``count`` calls have started (a few loop turns)."""
    for _ in range(100):
        if len(calls.futures) == count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{len(calls.futures)} calls started, not {count}")


async def test_a_fast_answer_starts_no_watcher() -> None:
    calls = Calls()
    started = []

    async def gone() -> None:
        started.append(True)
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(infer_all(calls, [request()], abandoned=gone))
    await submitted(calls, 1)
    calls.futures[0].set_result("answer")
    assert await task == ["answer"]
    await asyncio.sleep(WATCH_ABANDONED_AFTER_S * 2)
    assert started == []


async def test_a_caller_that_goes_away_is_noticed_and_its_job_cancelled() -> None:
    calls = Calls()
    disconnected = asyncio.Event()

    async def gone() -> None:
        await disconnected.wait()

    task = asyncio.ensure_future(infer_all(calls, [request()], abandoned=gone))
    await asyncio.sleep(WATCH_ABANDONED_AFTER_S * 2)  # the watcher is running by now
    disconnected.set()
    with pytest.raises(ClientClosedError):
        await task
    assert calls.futures[0].cancelled()


async def test_a_cancelled_caller_stays_cancelled() -> None:
    calls = Calls()

    async def gone() -> None:
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(infer_all(calls, [request()], abandoned=gone))
    await asyncio.sleep(WATCH_ABANDONED_AFTER_S * 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls.futures[0].cancelled()


async def test_several_jobs_answer_in_order_or_fail_with_the_first_error() -> None:
    calls = Calls()
    task = asyncio.ensure_future(infer_all(calls, [request(), request(), request()]))
    await submitted(calls, 3)
    calls.futures[2].set_result("c")
    calls.futures[0].set_result("a")
    calls.futures[1].set_result("b")
    assert await task == ["a", "b", "c"]

    calls = Calls()
    task = asyncio.ensure_future(infer_all(calls, [request(), request()]))
    await submitted(calls, 2)
    calls.futures[1].set_exception(QueueFullError("full", retry_after_s=1.0))
    with pytest.raises(QueueFullError):
        await task
    assert calls.futures[0].cancelled()  # the other job is dropped
