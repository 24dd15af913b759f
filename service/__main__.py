"""The composition root and the ``pose-service`` command.

``pose-service serve`` reads the settings (flags > ``POSE_*`` environment > defaults; unknown flags
and variables are errors), chooses the model, and runs on ONE event loop: the engine (one pipeline
worker per device), the FastAPI app under ``uvicorn.Server`` and the gRPC server. Readiness turns
green (``/readyz`` 200, gRPC health SERVING) only after every pipeline is built and warmed up.
SIGTERM or SIGINT drains: readiness goes 503 and gRPC health NOT_SERVING at once, admitted work
finishes within ``drain_grace_s`` (new work gets 503 / UNAVAILABLE), then both servers stop. A
second signal skips the wait.

Which model is served (always logged, and shown by ``GET /v1/models``):

- ``--weights PATH``: DistilPose from that checkpoint (``--model`` inferred from it when not given);
- ``--model blazepose_full`` or neither flag: the reference model from the cache that
  ``pose-service models fetch`` fills (BlazePose-full, with the SSDLite person detector when
  ``--detector auto``); without a cache the command says how to get one;
- ``--model distilpose_s|distilpose_l`` without weights: random weights, only with
  ``--allow-random-weights`` (smoke runs; the poses are meaningless);
- ``--model identity``: no network (``model.identity``: caller boxes come back with zero
  keypoints), to measure the serving path; no weights, no detector (naming one is an error).

``pose-service models fetch`` downloads and converts the reference models into ``cache_dir``;
``pose-service export`` writes one model as checked ONNX (``model.export``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import logging
import os
import signal
import socket
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import uvicorn
from pydantic import ValidationError

from model.pipeline import build_pipeline
from service.engine import Engine, Pipeline
from service.gpu_decode import probe_image
from service.metrics import Metrics
from service.model_choice import DETECTOR_SETTINGS, ModelChoice, SetupError, choose_model
from service.rest import create_app
from service.rest_middleware import JsonLogFormatter
from service.settings import Settings, UnknownSettingError
from service.uploads import decode_image

__all__ = ["DETECTOR_SETTINGS", "ModelChoice", "SetupError", "choose_model", "main", "serve"]

logger = logging.getLogger("service")


def _build_pipeline(choice: ModelChoice, settings: Settings, device: str) -> Pipeline:
    """One pipeline for ``device`` (called in the engine's worker thread)."""
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


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: this module drains first, then stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn logs a failure to bind, then raises SystemExit out of this task, which would end
        # the event loop with the gRPC server still up; ``serve`` below stops both instead.
        with contextlib.suppress(SystemExit):
            await super().serve(sockets)


async def serve(
    settings: Settings,
    *,
    pipeline_factory: Callable[[str], Pipeline] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run the service until SIGTERM/SIGINT (or ``stop``); returns the exit code.

    Args:
        settings: everything.
        pipeline_factory: device -> pipeline (tests); the chosen model's ``build_pipeline``
            when None.
        stop: set it to drain and stop, as a signal does.
    """
    if pipeline_factory is None:
        choice = choose_model(settings)
        logger.info("serving %s", choice.summary)
        pipeline_factory = partial(_build_pipeline, choice, settings)
    metrics = Metrics()
    config = settings.engine_config()
    engine = Engine(
        pipeline_factory,
        settings.devices(),
        config,
        decoder=partial(decode_image, max_pixels=settings.max_image_pixels),
        probe=partial(probe_image, max_pixels=settings.max_image_pixels),
        observer=metrics,
    )
    app = create_app(engine, settings, metrics=metrics)
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
        )
    )
    # Imported here, not at the top: grpc's C core reads GRPC_VERBOSITY when grpc is first
    # imported, and ``main`` sets it first (see ``_quiet_grpc_core``).
    from service.rpc import create_grpc_server

    grpc_server = create_grpc_server(engine, settings, metrics=metrics)
    if stop is None:
        stop = asyncio.Event()
    force = _install_signal_handlers(stop)

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
    http_task = asyncio.create_task(http.serve())
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
        await asyncio.wait({stop_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
    elif start_task.done():
        logger.error("the model failed to load", exc_info=start_task.exception())
        code = 1
    else:
        start_task.cancel()
        await asyncio.gather(start_task, return_exceptions=True)

    logger.info("draining", extra={"grace_s": 0.0 if force.is_set() else settings.drain_grace_s})
    await grpc_server.set_serving(False)
    drain = asyncio.create_task(engine.stop(settings.drain_grace_s))
    forced = asyncio.create_task(force.wait())
    await asyncio.wait({drain, forced}, return_when=asyncio.FIRST_COMPLETED)
    forced.cancel()
    if not drain.done():
        await engine.stop(0)  # a second signal: fail what is left at once
        await asyncio.gather(drain, return_exceptions=True)
    http.should_exit = True
    http.force_exit = force.is_set()
    await asyncio.gather(http_task, return_exceptions=True)
    await grpc_server.stop(0 if force.is_set() else 5.0)
    stop_task.cancel()
    logger.info("stopped")
    return code


def _install_signal_handlers(stop: asyncio.Event) -> asyncio.Event:
    """SIGTERM/SIGINT set ``stop``; a second one sets the returned "force" event."""
    force = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            force.set()
        logger.info("signal %s received", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
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


def configure_logging(level: str) -> None:
    """One JSON object per line on stderr, for this service, uvicorn and Python warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)  # warnings.warn (torch's, say) as "py.warnings" records


def _quiet_grpc_core() -> None:
    """Silence the log of grpc's C core unless asked for: it writes plain-text lines to stderr
    (a port in use, say), which would break "one JSON object per line". What matters of it the
    service logs itself, as JSON. Effective only before grpc is first imported; an explicit
    ``GRPC_VERBOSITY`` (``debug`` to see gRPC's own log) is kept."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def build_parser() -> argparse.ArgumentParser:
    """``pose-service serve [--every-setting ...]``, ``pose-service models fetch`` and
    ``pose-service export``."""
    parser = argparse.ArgumentParser(
        prog="pose-service", description="DistilPose pose estimation over HTTP and gRPC."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser(
        "serve",
        help="run the HTTP and gRPC servers",
        description="Every flag is also a POSE_* environment variable (e.g. --max-batch-size is "
        "POSE_MAX_BATCH_SIZE); flags win.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    for name, field in Settings.model_fields.items():
        _add_setting_flag(serve_cmd, name, field.annotation, field.description or "")
    models = commands.add_parser("models", help="manage the cached reference models")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    fetch = models_commands.add_parser(
        "fetch", help="download and convert the reference models", allow_abbrev=False
    )
    fetch.add_argument(
        "--cache-dir", default=argparse.SUPPRESS, help="cache folder [POSE_CACHE_DIR]"
    )
    fetch.add_argument("--force", action="store_true", help="download and convert again")
    _add_export_command(commands)
    return parser


def _add_export_command(commands: Any) -> None:
    """``pose-service export``: one catalogue model to ONNX, checked (``model.export``)."""
    from model.export import OPSET, exportable

    export = commands.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch), checked against PyTorch",
        description="Writes the network as ONNX with a dynamic batch dimension, checks it against "
        "PyTorch under ONNX Runtime (tolerances in model/export.py) and records the source "
        "weights' sha256 and the graph's sha256 in its metadata. DistilPose needs --weights; "
        "blazepose_full and ssdlite_person come from the cache (`pose-service models fetch`). "
        "Prints one JSON object.",
        allow_abbrev=False,
    )
    export.add_argument(
        "--model",
        choices=exportable(),
        default=None,
        help="the model (default: the DistilPose variant of --weights)",
    )
    export.add_argument("--weights", default=None, help="DistilPose weights (.pth, .safetensors)")
    export.add_argument("--output", default=None, help="ONNX file to write (default: MODEL.onnx)")
    export.add_argument(
        "--cache-dir", default=argparse.SUPPRESS, help="cache folder [POSE_CACHE_DIR]"
    )
    export.add_argument("--opset", type=int, default=OPSET, metavar="N", help="ONNX opset (17+)")


def _export(args: argparse.Namespace, settings: Settings) -> int:
    """``pose-service export``: write, check and describe one ONNX file."""
    import json

    from model.export import export_model

    if args.model is None and args.weights is None:
        sys.stderr.write("pose-service export: give --model, --weights or both\n")
        return 2
    try:
        result = export_model(
            args.model,
            args.weights,
            args.output,
            cache_dir=settings.cache_path(),
            opset=args.opset,
        )
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        logger.error("export failed: %s", exc)
        return 1
    summary = {
        "model": result.model,
        "path": str(result.path),
        "file_sha256": result.file_sha256,
        "graph_sha256": result.graph_sha256,
        "source_weights_sha256": result.source_weights_sha256,
        "max_abs_diff_vs_torch": result.max_abs_diff,
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _add_setting_flag(
    parser: argparse.ArgumentParser, name: str, annotation: Any, help_text: str
) -> None:
    flag = "--" + name.replace("_", "-")
    env = f"POSE_{name.upper()}"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if isinstance(annotation, types.UnionType) and len(args) == 1 else annotation
    if base is bool:
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, help=f"{help_text} [{env}]"
        )
    elif typing.get_origin(base) is typing.Literal:
        parser.add_argument(flag, choices=typing.get_args(base), help=f"{help_text} [{env}]")
    elif base in (int, float):
        parser.add_argument(flag, type=base, metavar="N", help=f"{help_text} [{env}]")
    else:  # str, str | None, list[str] (comma-separated)
        parser.add_argument(flag, help=f"{help_text} [{env}]")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the flags given (flags override the environment)."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with a "did you mean" for each unknown flag (difflib, as the
    settings do for unknown ``POSE_*`` variables).

    Raises:
        SystemExit: 2, after the command's usage and the error on stderr.
    """
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = _command_parser(parser, args)
        known = [flag for action in command._actions for flag in action.option_strings]
        command.error(
            "unrecognized arguments: " + " ".join(_did_you_mean(arg, known) for arg in unknown)
        )
    return args


def _command_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The (sub)command parser that parsed ``args`` (``pose-service models fetch``: fetch's)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(str(getattr(args, action.dest, "")))
            if chosen is not None:
                return _command_parser(chosen, args)
    return parser


def _did_you_mean(arg: str, known: Sequence[str]) -> str:
    """``arg``, followed by the closest known flag when it is a flag with one."""
    if not arg.startswith("-"):
        return arg
    close = difflib.get_close_matches(arg.partition("=")[0], known, n=1)
    return f"{arg} (did you mean {close[0]}?)" if close else arg


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pose-service``; returns the exit code."""
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        if args.command == "serve":
            settings = settings_from_args(args)
        else:
            cache = getattr(args, "cache_dir", None)
            settings = Settings(cache_dir=cache) if cache else Settings()
    except (ValidationError, UnknownSettingError) as exc:
        parser.error(str(exc))
    configure_logging(settings.log_level)
    if args.command == "models":
        from model.reference import fetch_reference_models

        paths = fetch_reference_models(settings.cache_path(), force=args.force)
        for name, path in paths.items():
            sys.stdout.write(f"{name}: {path}\n")
        return 0
    if args.command == "export":
        return _export(args, settings)
    logger.info("settings", extra={"settings": settings.public_dict()})
    _quiet_grpc_core()
    try:
        return asyncio.run(serve(settings))
    except SetupError as exc:
        logger.error("cannot serve: %s", exc)
        return 2
    except Exception:
        logger.exception("the service failed")  # as JSON, not as a bare traceback
        return 1


if __name__ == "__main__":
    sys.exit(main())
