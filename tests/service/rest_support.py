"""Shared by the HTTP tests (no tests here): a real uvicorn server in a thread, a fake pipeline.

``LiveServer`` runs one event loop in a background thread holding the engine and one uvicorn server
per app, each on a free localhost port, so tests talk real HTTP (sync ``httpx.Client`` or
``httpx.AsyncClient`` from the test's own loop) and can still drive the engine's lifecycle through
``call``. ``SlowPipeline`` is the fake: it answers one person per caller box (or one whole-image
person) after an optional hold, for the tests about overload, cancellation, deadlines and drain.
``cpu_pipeline_engine`` is the real thing: the real pipeline on the CPU, uploads decoded as the
server decodes them. ``split_engine`` is the same behind the process boundary of
``--frontends N``: the real engine process (``service.processes.engine_main``), with engine clients
in this process as the front ends, so that a transport's tests can run against both layouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import io
import itertools
import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image

from model.interfaces import BatchStats, ImageResult, ModelDescription, Person, PipelineItem
from service.engine import Engine, EngineConfig, EngineObserver
from service.engine_client import EngineClient
from service.gpu_decode import probe_image
from service.processes import RunPaths, engine_main
from service.settings import Settings
from service.uploads import decode_if_small, decode_image
from tests.service.descriptions import fake_description

START_TIMEOUT_S = 60.0


class LiveServer:
    """An engine and its apps served by uvicorn on localhost ports, in a background thread.

    Args:
        engine: the engine behind the apps.
        make_apps: called in the server thread; returns the apps to serve (one port each).
        start_engine: start the engine before serving (False: the test starts it via ``call``).
    """

    def __init__(
        self,
        engine: Engine | EngineClients,
        make_apps: Callable[[], list[FastAPI]],
        *,
        start_engine: bool = True,
    ) -> None:
        self.engine = engine
        self.make_apps = make_apps
        self.start_engine = start_engine
        self.ports: list[int] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="live-server", daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the first app."""
        return f"http://127.0.0.1:{self.ports[0]}"

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def __enter__(self) -> LiveServer:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError("the server did not start")
        if self._error is not None:
            raise RuntimeError("the server failed to start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT_S)

    def call(self, make: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 60.0) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout)

    def submit(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Start a coroutine on the server's loop; returns its concurrent future."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(make(), self.loop)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.start_engine:
            await self.engine.start()
        servers = []
        for app in self.make_apps():
            config = uvicorn.Config(
                app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="off"
            )
            servers.append(uvicorn.Server(config))
        tasks = [asyncio.create_task(server.serve()) for server in servers]
        while not all(server.started for server in servers):
            if any(task.done() for task in tasks):
                raise RuntimeError("uvicorn stopped during start-up")
            await asyncio.sleep(0.01)
        self.ports = [server.servers[0].sockets[0].getsockname()[1] for server in servers]
        self._ready.set()
        await self._stop.wait()
        await self.engine.stop(grace_s=5.0)
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)


class SlowPipeline:
    """A fake pipeline: one person per caller box (else one whole-image person).

    Args:
        delay_s: seconds each ``run`` takes.
        warmup_gate: when given, ``warmup`` waits for it (to hold the engine in warm-up).
        run_gate: when given, ``run`` waits for it (to hold the worker busy).
        nan: put a NaN into every answer (to test the finite-number guard).
        fail: make every ``run`` raise.
    """

    def __init__(
        self,
        delay_s: float = 0.0,
        *,
        warmup_gate: threading.Event | None = None,
        run_gate: threading.Event | None = None,
        nan: bool = False,
        fail: bool = False,
    ) -> None:
        self.device = torch.device("cpu")
        self.delay_s = delay_s
        self.warmup_gate = warmup_gate
        self.run_gate = run_gate
        self.nan = nan
        self.fail = fail
        self.lock = threading.Lock()
        self.images_run = 0
        self.batches: list[int] = []

    def warmup(self) -> None:
        if self.warmup_gate is not None:
            self.warmup_gate.wait(START_TIMEOUT_S)

    def describe(self) -> ModelDescription:
        return fake_description("fake")

    def run(self, items: list[PipelineItem]) -> tuple[list[ImageResult], BatchStats]:
        with self.lock:
            self.images_run += len(items)
            self.batches.append(len(items))
        if self.run_gate is not None:
            self.run_gate.wait(START_TIMEOUT_S)
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("the fake pipeline failed on purpose")
        results = []
        for item in items:
            _, height, width = item.image.shape
            boxes = item.boxes if item.boxes is not None else torch.tensor([[0, 0, width, height]])
            persons = []
            for box in boxes.tolist():
                x, y, w, h = box[:4]
                score = float("nan") if self.nan else 0.5
                keypoints = [(x + w * k / 17, y + h / 2, score) for k in range(17)]
                persons.append(Person((x, y, w, h), 1.0, 0.5, keypoints))
            results.append(ImageResult(width=width, height=height, persons=persons))
        stats = BatchStats(
            pose_crops=sum(len(r.persons) for r in results),
            pose_seconds=self.delay_s,
            persons_per_image=[len(r.persons) for r in results],
        )
        return results, stats


def cpu_pipeline_engine(
    settings: Settings,
    config: EngineConfig,
    *,
    weights: str,
    model: str | None = None,
    detector: str | None = None,
    detector_weights: str | None = None,
    observer: EngineObserver | None = None,
) -> Engine:
    """An engine over the real pipeline (``build_pipeline`` with these names and files) on the CPU,
    decoding uploads with ``settings``' pixel limit."""
    from model.pipeline import TopDownPipeline, build_pipeline

    def factory(device: str) -> TopDownPipeline:
        return build_pipeline(
            model=model,
            weights=weights,
            detector=detector,
            detector_weights=detector_weights,
            device=device,
        )

    return Engine(
        factory,
        ["cpu"],
        dataclasses.replace(config, limits=settings.request_limits()),
        decoder=lambda data: decode_image(data, max_pixels=settings.max_image_pixels),
        observer=observer,
    )


class EngineClients:
    """Several front ends' engine clients, started and stopped together (``LiveServer``'s
    ``engine``)."""

    def __init__(self, clients: Sequence[EngineClient]) -> None:
        self.clients = list(clients)

    async def start(self) -> None:
        await asyncio.gather(*(client.start() for client in self.clients))

    async def stop(self, grace_s: float | None = None) -> None:
        await asyncio.gather(*(client.stop(grace_s) for client in self.clients))


class SplitEngine:
    """A running engine process (``split_engine``) and how to reach it."""

    def __init__(self, settings: Settings, paths: RunPaths, pid: int) -> None:
        self.settings = settings
        self.paths = paths
        self.pid = pid
        self._indices = itertools.count()

    def client(self, frontends: int = 1) -> EngineClient:
        """A new front end's engine client (not started; each has its own index, so its own
        connection). The engine turns it ready once ``frontends`` front ends said hello."""
        pixels = self.settings.max_image_pixels
        return EngineClient(
            self.paths.engine_address,
            self.settings.engine_config(),
            decoder=functools.partial(decode_image, max_pixels=pixels),
            small_decoder=functools.partial(decode_if_small, max_pixels=pixels),
            probe=functools.partial(probe_image, max_pixels=pixels),
            images_dir=self.paths.images,
            engine_pid=self.pid,
            index=next(self._indices),
            frontends=frontends,
        )


@contextlib.contextmanager
def split_engine(
    settings: Settings, config: EngineConfig, *, weights: str
) -> Iterator[SplitEngine]:
    """What ``cpu_pipeline_engine(settings, config, weights=weights)`` serves, in the engine
    process as ``pose-service serve --frontends N`` runs it (DistilPose on ``weights``, no
    detector, PyTorch on the CPU, ``config``'s batching knobs, no calibration so that it is ready
    at once); front ends connect with ``.client()``. The process is stopped with SIGTERM (a drain)
    at exit.
    """
    settings = settings.model_copy(
        update={
            "weights": weights,
            "detector": "none",
            "device": "cpu",
            "backend": "torch",
            "max_batch_size": config.max_batch_size,
            "max_delay_ms": config.max_delay_ms,
            "calibration_budget_s": 0.0,
        }
    )
    paths = RunPaths.create()
    previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(paths.metrics)  # the engine's metric files
    try:
        process = multiprocessing.get_context("spawn").Process(
            target=engine_main,
            args=(settings, paths.engine_address, os.getpid()),
            name="pose-engine",
            daemon=True,
        )
        process.start()
    finally:
        if previous is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous
    assert process.pid is not None
    try:
        yield SplitEngine(settings, paths, process.pid)
    finally:
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join(10)
        shutil.rmtree(paths.root, ignore_errors=True)


def png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A small RGB PNG with some structure."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A small RGB JPEG."""
    out = io.BytesIO()
    Image.open(io.BytesIO(png(width, height, seed))).save(out, format="JPEG", quality=90)
    return out.getvalue()


def promtool_check(text: bytes) -> str:
    """Output of ``promtool check metrics`` on ``text`` ("" when clean)."""
    promtool = shutil.which("promtool")
    assert promtool is not None
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )
    return (done.stdout + done.stderr).decode().strip() + ("" if done.returncode == 0 else " (rc)")


def finite_numbers(value: Any) -> bool:
    """Whether every number in a JSON value is finite."""
    if isinstance(value, dict):
        return all(finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(finite_numbers(v) for v in value)
    if isinstance(value, float):
        return bool(np.isfinite(value))
    return True


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    """Poll ``check`` until it is true (no timing assertion: a bound to keep tests from hanging)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


def client(base_url: str, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=60.0, **kwargs)


async def metrics_containing(http: httpx.AsyncClient, *needles: str) -> str:
    """``/metrics`` once it shows every needle (requests are counted just after their answer)."""
    text = ""

    async def shown() -> bool:
        nonlocal text
        text = (await http.get("/metrics")).text
        return all(needle in text for needle in needles)

    await wait_until(shown)
    return text
