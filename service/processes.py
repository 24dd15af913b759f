"""Several processes: one parent, one engine process, N front-end processes (``--frontends N``).

The layout of vLLM V1 (API-server processes in front of one engine core; here over a Unix
socket, ``service.engine_wire``): the front ends own everything per request (HTTP and gRPC
parsing, validation, decoding, serialisation) and scale with cores; the engine process owns the
batcher and the devices, so one batch holds the requests of every front end.

- **Parent** (``supervise``): reserves the ports (SO_REUSEPORT), makes the private run folder
  (mode 0700, on ``/dev/shm`` where it exists: the IPC socket, the decoded images, the metrics
  files), starts the engine process, then the front ends, and watches them. A front end that
  dies is started again (at most ``_MAX_RESTARTS`` in ``_RESTART_WINDOW_S``; beyond that the
  service stops, exit 1). If the engine process dies, the front ends have already answered
  503 to everything in flight (they watch it through a pidfd); the parent then stops them and
  exits 1, for the orchestrator to restart the whole service (reloading the model is the
  engine's start-up anyway). SIGTERM/SIGINT drain in order: the front ends first (readiness
  503, their admitted requests answered), then the engine; a second signal is passed on and
  skips the waits. It imports neither torch nor the web stack (the children import what they
  run, in ``engine_main`` and ``frontend_main``): it starts them 0.2 s after the command, not
  2.5 s, and holds about 40 MB instead of 570.
- **Engine process** (``engine_main``): ``serving.build_engine`` behind
  ``service.engine_server.EngineServer``.
- **Front end** (``frontend_main``): ``serving.run_servers`` over
  ``service.engine_client.EngineClient``, HTTP and gRPC bound with SO_REUSEPORT on the shared
  ports; ready only once the engine is.

Children ignore SIGINT (a terminal's Ctrl-C reaches the parent, which orders the drain) and
stop on their own if the parent disappears (pidfd), so nothing outlives the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from multiprocessing.process import BaseProcess
from pathlib import Path

from service.settings import Settings

logger = logging.getLogger("service")

_MAX_RESTARTS = 5
_RESTART_WINDOW_S = 60.0
_STOP_MARGIN_S = 10.0  # beyond drain_grace_s, before a child is killed


@dataclass(frozen=True)
class RunPaths:
    """The service's private run folder."""

    root: Path

    @property
    def engine_address(self) -> str:
        return str(self.root / "engine.sock")

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @classmethod
    def create(cls) -> RunPaths:
        shm = Path("/dev/shm")
        base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
        root = Path(tempfile.mkdtemp(prefix="pose-service-", dir=base))  # mode 0700
        paths = cls(root)
        paths.images.mkdir()
        paths.metrics.mkdir()
        return paths


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT (not listening): front-end
    processes each bind one to the same port and the kernel spreads connections over them.

    Raises:
        OSError: The port is taken by a socket without SO_REUSEPORT, or by another user.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def supervise(settings: Settings) -> int:
    """Run the service as a parent of one engine process and ``frontend_count()`` front ends;
    returns the exit code (0 after a drain, 1 if the engine process died or a front end kept
    dying)."""
    count = settings.frontend_count()
    try:
        # Held (bound, not listening) for the service's life: the port stays ours, and port 0
        # becomes one port that every front end binds.
        http_hold = reuse_port_socket(settings.host, settings.http_port)
        grpc_hold = reuse_port_socket(settings.host, settings.grpc_port)
    except OSError as exc:
        logger.error("cannot bind %s: %s", settings.host, exc)
        return 1
    ports = (http_hold.getsockname()[1], grpc_hold.getsockname()[1])
    paths = RunPaths.create()
    # Read by prometheus_client when each child imports it.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(paths.metrics)
    supervisor = _Supervisor(settings, paths, ports, count)
    try:
        return supervisor.run()
    finally:
        http_hold.close()
        grpc_hold.close()
        shutil.rmtree(paths.root, ignore_errors=True)


class _Supervisor:
    def __init__(
        self, settings: Settings, paths: RunPaths, ports: tuple[int, int], count: int
    ) -> None:
        self._settings = settings
        self._paths = paths
        self._ports = ports
        self._count = count
        self._context = multiprocessing.get_context("spawn")
        self._engine: BaseProcess | None = None
        self._frontends: dict[int, BaseProcess] = {}
        self._restarts: list[float] = []
        self._signals = 0

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        engine = self._context.Process(
            target=engine_main,
            args=(self._settings, self._paths.engine_address, os.getpid()),
            name="engine",
            daemon=False,
        )
        engine.start()
        self._engine = engine
        for index in range(self._count):
            self._start_frontend(index)
        logger.info(
            "processes started",
            extra={
                "engine_pid": engine.pid,
                "frontend_pids": [p.pid for p in self._frontends.values()],
                "http_port": self._ports[0],
                "grpc_port": self._ports[1],
                "run_dir": str(self._paths.root),
            },
        )
        code = self._watch()
        self._stop_all()
        return code

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals += 1
        logger.info("signal %s received", signal.Signals(signum).name)
        if self._signals > 1:  # a second one: pass it on, the children skip their waits
            for process in [*self._frontends.values(), self._engine]:
                if process is not None and process.pid is not None and process.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGTERM)

    def _start_frontend(self, index: int) -> None:
        assert self._engine is not None
        process = self._context.Process(
            target=frontend_main,
            args=(
                self._settings,
                index,
                self._paths,
                self._engine.pid,
                os.getpid(),
                self._ports,
            ),
            name=f"frontend-{index}",
            daemon=False,
        )
        process.start()
        self._frontends[index] = process

    def _watch(self) -> int:
        """Until a signal (0) or the engine's death or too many front-end restarts (1)."""
        assert self._engine is not None
        while not self._signals:
            sentinels = [self._engine.sentinel] + [p.sentinel for p in self._frontends.values()]
            multiprocessing.connection.wait(sentinels, timeout=0.2)
            if not self._engine.is_alive():
                logger.error(
                    "the engine process exited (code %s): stopping the service",
                    self._engine.exitcode,
                )
                return 1
            for index, process in list(self._frontends.items()):
                if process.is_alive():
                    continue
                _mark_dead(process)
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW_S]
                if len(self._restarts) >= _MAX_RESTARTS:
                    logger.error(
                        "front ends died %d times in %.0f s: stopping the service",
                        len(self._restarts) + 1,
                        _RESTART_WINDOW_S,
                    )
                    return 1
                self._restarts.append(now)
                logger.warning(
                    "front end %d exited (code %s): starting it again", index, process.exitcode
                )
                self._start_frontend(index)
        return 0

    def _stop_all(self) -> None:
        """Front ends first (they answer what they admitted), then the engine."""
        grace = self._settings.drain_grace_s + _STOP_MARGIN_S
        _terminate(list(self._frontends.values()), grace)
        if self._engine is not None:
            _terminate([self._engine], grace)
        for process in self._frontends.values():
            _mark_dead(process)
        logger.info("stopped")


def _terminate(processes: list[BaseProcess], timeout_s: float) -> None:
    """SIGTERM each living process, wait up to ``timeout_s`` for all, then SIGKILL."""
    for process in processes:
        if process.is_alive() and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            logger.error("%s did not stop in time: killing it", process.name)
            process.kill()
            process.join(5.0)


def _mark_dead(process: BaseProcess) -> None:
    """Drop a dead process's live gauges from the metrics files."""
    from prometheus_client import multiprocess

    if process.pid is not None:
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(process.pid)


# Children.


def _child_setup(settings: Settings) -> None:
    """Logging as the parent's, and SIGINT left to the parent."""
    from service.__main__ import _quiet_grpc_core, configure_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(settings.log_level)
    _quiet_grpc_core()


def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Set ``stop`` when the parent process exits (it was killed: nobody would stop us)."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        stop.set()
        return

    def gone() -> None:
        loop.remove_reader(fd)
        logger.error("the parent process exited: stopping")
        stop.set()

    loop.add_reader(fd, gone)


def engine_main(settings: Settings, address: str, parent_pid: int) -> None:
    """The engine process: exits 0 after a drain, 1 if the model failed, 2 on a setup error."""
    _child_setup(settings)
    from service import serving

    sys.exit(serving.run(_run_engine(settings, address, parent_pid)))


async def _run_engine(settings: Settings, address: str, parent_pid: int) -> int:
    from service import serving
    from service.engine_server import EngineServer
    from service.metrics import Metrics
    from service.model_choice import SetupError, choose_model

    try:
        choice = choose_model(settings)
    except SetupError as exc:
        logger.error("cannot serve: %s", exc)
        return 2
    logger.info("serving %s", choice.summary)
    serving.fit_torch_threads()
    metrics = Metrics(multiprocess=True)
    engine = serving.build_engine(settings, serving.pipeline_factory(choice, settings), metrics)
    server = EngineServer(engine, address)
    await server.bind()
    stop = asyncio.Event()
    # A second SIGTERM (the parent passing on a second signal) skips the grace period.
    force = serving.install_signal_handlers(stop, (signal.SIGTERM,))
    _watch_parent(parent_pid, stop)
    serving_task = asyncio.create_task(server.run())
    start = asyncio.create_task(engine.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if start.done() and start.exception() is None:
        metrics.publish_model(engine.model_info())
        server.publish_state()
        logger.info("engine ready", extra={"model": engine.model_info().to_dict()})
        serving.freeze_startup_heap()
        await stopped
    elif start.done():
        logger.error("the model failed to load", exc_info=start.exception())
        code = 1
    else:
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
    # (The heartbeat tells the front ends it is draining; they have drained already.)
    await serving.drain(engine, settings.drain_grace_s, force)
    await server.close()
    serving_task.cancel()
    await asyncio.gather(serving_task, return_exceptions=True)
    return code


def frontend_main(
    settings: Settings,
    index: int,
    paths: RunPaths,
    engine_pid: int,
    parent_pid: int,
    ports: tuple[int, int],
) -> None:
    """One front-end process (exit code as ``serving.run_servers``)."""
    _child_setup(settings)
    from service import serving

    sys.exit(serving.run(_run_frontend(settings, index, paths, engine_pid, parent_pid, ports)))


async def _run_frontend(
    settings: Settings,
    index: int,
    paths: RunPaths,
    engine_pid: int,
    parent_pid: int,
    ports: tuple[int, int],
) -> int:
    from service import serving
    from service.engine_client import EngineClient
    from service.gpu_decode import probe_image
    from service.metrics import Metrics
    from service.uploads import decode_if_small, decode_image

    settings = settings.model_copy(update={"http_port": ports[0], "grpc_port": ports[1]})
    client = EngineClient(
        paths.engine_address,
        settings.engine_config(),
        decoder=partial(decode_image, max_pixels=settings.max_image_pixels),
        small_decoder=partial(decode_if_small, max_pixels=settings.max_image_pixels),
        probe=partial(probe_image, max_pixels=settings.max_image_pixels),
        images_dir=paths.images,
        engine_pid=engine_pid,
        index=index,
        frontends=settings.frontend_count(),
    )
    try:
        http_socket: socket.socket = reuse_port_socket(settings.host, ports[0])
    except OSError as exc:
        logger.error("front end %d cannot bind HTTP port %d: %s", index, ports[0], exc)
        return 1
    stop = asyncio.Event()
    _watch_parent(parent_pid, stop)
    return await serving.run_servers(
        settings,
        client,
        Metrics(multiprocess=True),
        stop=stop,
        http_socket=http_socket,
        served_by=f"frontend-{index}",
        signals=(signal.SIGTERM,),
    )
