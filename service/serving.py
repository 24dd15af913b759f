"""Running the servers of one process: the pieces the composition roots share.

``pose-service serve`` runs either everything in one process (``service.__main__.serve``) or
a parent, one engine process and several front-end processes (``service.processes``). Both
build the engine the same way (``build_engine``) and run HTTP and gRPC over an engine handle
the same way (``run_servers``: start, ready after warm-up, drain on SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol

import torch
import uvicorn

from model.interfaces import ModelDescription
from model.pipeline import build_pipeline
from service.cpu_quota import usable_cpus
from service.engine import Engine, EngineObserver, Pipeline
from service.engine_api import EngineHandle
from service.gpu_decode import probe_image
from service.metrics import Metrics
from service.model_choice import ModelChoice
from service.rest import create_app
from service.settings import Settings
from service.uploads import decode_if_small, decode_image

logger = logging.getLogger("service")


class ServedEngine(EngineHandle, Protocol):
    """An engine handle the composition root also starts and stops."""

    async def start(self) -> None: ...

    async def stop(self, grace_s: float | None = None) -> None: ...

    def model_info(self) -> ModelDescription: ...


def pipeline_factory(choice: ModelChoice, settings: Settings) -> Callable[[str], Pipeline]:
    """device -> the chosen model's pipeline (called in the engine's worker thread)."""
    return partial(_build_pipeline, choice, settings)


def _build_pipeline(choice: ModelChoice, settings: Settings, device: str) -> Pipeline:
    return build_pipeline(
        model=choice.model,
        weights=choice.weights,
        detector=choice.detector,
        detector_weights=choice.detector_weights,
        device=device,
        max_crops_per_batch=settings.max_crops_per_batch,
        detector_settings=choice.detector_settings,
        backend=settings.backend,
        cache_dir=settings.cache_path(),
    )


def fit_torch_threads() -> None:
    """Cap PyTorch's intra-op threads at the CPUs this process may use (``usable_cpus``).

    PyTorch starts one thread per core it sees, container limit or not: a pod limited to 4 CPUs
    on a 64-core node would run its CPU model on 64 threads and be throttled by the kernel for
    most of each scheduling period. ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``), when set, is
    the operator's choice and is left alone. Called where the model runs (the one process, or the
    engine process) before it is built.
    """
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return
    cpus = usable_cpus()
    threads = torch.get_num_threads()
    if threads > cpus:
        logger.info(
            "PyTorch threads: %d, the CPUs this process may use (its cgroup's limit, its "
            "affinity), not the %d it would start",
            cpus,
            threads,
        )
        torch.set_num_threads(cpus)


def build_engine(
    settings: Settings, factory: Callable[[str], Pipeline], observer: EngineObserver
) -> Engine:
    """The engine of these settings (not started)."""
    return Engine(
        factory,
        settings.devices(),
        settings.engine_config(),
        decoder=partial(decode_image, max_pixels=settings.max_image_pixels),
        small_decoder=partial(decode_if_small, max_pixels=settings.max_image_pixels),
        probe=partial(probe_image, max_pixels=settings.max_image_pixels),
        observer=observer,
    )


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: ``run_servers`` drains first, then stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn logs a failure to bind, then raises SystemExit out of this task, which would end
        # the event loop with the gRPC server still up; ``run_servers`` stops both instead.
        with contextlib.suppress(SystemExit):
            await super().serve(sockets)


def freeze_startup_heap() -> None:
    """Take what start-up made (modules, the model, the app) out of the garbage collector's
    walks, once the process is ready.

    A full collection walks every tracked object, with the event loop stopped: in a serving
    process with DistilPose-S that is about 410,000 objects and 120-180 ms during which every
    request waits (``python -m bench.gc_pause``). Frozen, they are never walked again; what
    requests make is collected as before. Garbage is collected first, so that none of it is kept
    for good. (vLLM freezes its start-up heap the same way.)
    """
    gc.collect()
    gc.freeze()


async def run_servers(
    settings: Settings,
    engine: ServedEngine,
    metrics: Metrics,
    *,
    stop: asyncio.Event | None = None,
    http_socket: socket.socket | None = None,
    served_by: str | None = None,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> int:
    """Serve HTTP and gRPC over ``engine`` until a signal (or ``stop``); returns the exit code.

    Readiness (``/readyz``, gRPC health) turns green once ``engine.start()`` returns. The first
    signal drains: readiness 503 and NOT_SERVING at once, admitted work finishes within
    ``drain_grace_s``, then both servers stop; a second one skips the wait.

    Args:
        settings: everything.
        engine: the engine (in-process) or an engine client (a front end).
        metrics: this process's metrics.
        stop: set it to drain and stop, as a signal does.
        http_socket: a bound SO_REUSEPORT socket for HTTP (front ends); else uvicorn binds
            ``host:http_port`` itself. gRPC then binds with SO_REUSEPORT too.
        served_by: this front end's name (the ``x-served-by`` header), if several.
        signals: the signals that drain.
    """
    app = create_app(engine, settings, metrics=metrics, served_by=served_by)
    http = _Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            # Connection bounds: beyond http_max_connections uvicorn answers 503 at once; an
            # idle keep-alive connection is closed; a request head over the limit is refused.
            limit_concurrency=settings.http_max_connections,
            timeout_keep_alive=settings.http_keepalive_timeout_s,
            h11_max_incomplete_event_size=settings.http_max_header_bytes,
            # No WebSockets: the API has none, and uvicorn would otherwise take an upgrade
            # request through whichever WebSocket library happens to be installed.
            ws="none",
        )
    )
    # Imported here, not at the top: grpc's C core reads GRPC_VERBOSITY when grpc is first
    # imported, and ``service.__main__.main`` sets it first.
    from service.rpc import create_grpc_server

    grpc_server = create_grpc_server(
        engine, settings, metrics=metrics, reuse_port=http_socket is not None
    )
    if stop is None:
        stop = asyncio.Event()
    force = install_signal_handlers(stop, signals)

    try:
        await grpc_server.start()
    except Exception:
        # grpc says only "Failed to bind"; the reason (its C core's log) is silenced.
        reason = _bind_problem(settings.host, settings.grpc_port)
        logger.exception(
            "the gRPC server failed to start on %s:%s: %s",
            settings.host,
            settings.grpc_port,
            reason or "see the exception (GRPC_VERBOSITY=debug shows gRPC's own log)",
        )
        return 1
    http_task = asyncio.create_task(http.serve([http_socket] if http_socket else None))
    while not http.started:
        if http_task.done():
            await grpc_server.stop(0)
            logger.error(
                "the HTTP server failed to start on %s:%s: %s",
                settings.host,
                settings.http_port,
                _bind_problem(settings.host, settings.http_port) or "see uvicorn's error above",
            )
            return 1
        await asyncio.sleep(0.01)
    http_port = http.servers[0].sockets[0].getsockname()[1]
    logger.info("listening", extra={"http_port": http_port, "grpc_port": grpc_server.port})

    code = 0
    start_task = asyncio.create_task(engine.start())
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({start_task, stop_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
    if start_task.done() and start_task.exception() is None:
        await grpc_server.set_serving(True)
        logger.info("ready", extra={"model": engine.model_info().to_dict()})
        freeze_startup_heap()
        await asyncio.wait({stop_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
    elif start_task.done():
        logger.error("the model failed to load", exc_info=start_task.exception())
        code = 1
    else:
        start_task.cancel()
        await asyncio.gather(start_task, return_exceptions=True)

    logger.info("draining", extra={"grace_s": 0.0 if force.is_set() else settings.drain_grace_s})
    await grpc_server.set_serving(False)
    await drain(engine, settings.drain_grace_s, force)
    http.should_exit = True
    http.force_exit = force.is_set()
    await asyncio.gather(http_task, return_exceptions=True)
    await grpc_server.stop(0 if force.is_set() else 5.0)
    stop_task.cancel()
    logger.info("stopped")
    return code


async def drain(engine: ServedEngine, grace_s: float, force: asyncio.Event) -> None:
    """``engine.stop(grace_s)``, cut short (what is left fails at once) when ``force`` is set."""
    stopping = asyncio.create_task(engine.stop(grace_s))
    forced = asyncio.create_task(force.wait())
    await asyncio.wait({stopping, forced}, return_when=asyncio.FIRST_COMPLETED)
    forced.cancel()
    if not stopping.done():
        await engine.stop(0)  # a second signal: fail what is left at once
    await asyncio.gather(stopping, forced, return_exceptions=True)


def install_signal_handlers(
    stop: asyncio.Event, signals: Sequence[signal.Signals]
) -> asyncio.Event:
    """``signals`` set ``stop``; a second one sets the returned "force" event."""
    force = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            force.set()
        logger.info("signal %s received", signal.Signals(signum).name)
        stop.set()

    for signum in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, on_signal, signum)
    return force


def _bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now ("Address already in use", ...), or None."""
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        return str(exc)
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As grpc binds: a port in TIME_WAIT is free, one that something listens on is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (cheaper per request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Any) -> Any:
    """``asyncio.run(main)`` on ``new_event_loop()``."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
