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
  ``--allow-random-weights`` (smoke runs; the poses are meaningless).

``pose-service models fetch`` downloads and converts the reference models into ``cache_dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import signal
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from functools import partial
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from service.engine import Engine, EngineConfig, Pipeline
from service.images import decode_image, probe_image
from service.metrics import Metrics
from service.rest import create_app
from service.rest_middleware import JsonLogFormatter
from service.settings import Settings, UnknownSettingError

logger = logging.getLogger("service")

DISTILPOSE_MODELS = ("distilpose_s", "distilpose_l")
REFERENCE_MODEL = "blazepose_full"
REFERENCE_DETECTOR = "ssdlite_person"
_FETCH_HINT = "run `pose-service models fetch` once (it caches the reference models)"
# Settings field -> keyword of PersonDetector (model.detector) and load_detector (model.reference).
DETECTOR_SETTINGS = {
    "detector_score_threshold": "score_threshold",
    "detector_nms_iou": "nms_iou",
    "detector_max_persons": "max_persons",
    "detector_min_box_size_px": "min_box_size",
    "detector_min_size_px": "min_size",
    "detector_max_size_px": "max_size",
}
# The input resize: torchvision detectors only, and only min_size for torchvision's SSDlite (its
# input is square min_size x min_size).
_RESIZE_SETTINGS = ("detector_min_size_px", "detector_max_size_px")
_TORCHVISION_SSD = "ssdlite320_mobilenet_v3_large"


class SetupError(Exception):
    """The settings cannot be served; the message says what to do."""


@dataclass(frozen=True)
class ModelChoice:
    """What ``build_pipeline`` is called with, and how to describe it in the logs."""

    model: str | None
    weights: str | None
    detector: str | None
    detector_weights: str | None
    summary: str
    # build_pipeline's detector_settings: only the keys that are set, under the detector's names.
    detector_settings: Mapping[str, Any] = dataclass_field(default_factory=dict)


def choose_model(settings: Settings) -> ModelChoice:
    """Decide the pose model and detector from the settings and the reference-model cache.

    Raises:
        SetupError: nothing servable was asked for, or a file or the cache is missing.
    """
    paths = _reference_paths(settings.cache_path())
    if settings.detector == "auto":
        detector = REFERENCE_DETECTOR if REFERENCE_DETECTOR in paths else None
    else:
        detector = None if settings.detector == "none" else settings.detector
    detector_weights = settings.detector_weights
    if detector == REFERENCE_DETECTOR and detector_weights is None:
        if REFERENCE_DETECTOR not in paths:
            raise SetupError(f"the {REFERENCE_DETECTOR} detector is not cached: {_FETCH_HINT}")
        detector_weights = str(paths[REFERENCE_DETECTOR])
    if detector not in (None, REFERENCE_DETECTOR) and detector_weights is None:
        # A torchvision detector named without weights gets its published COCO weights (from
        # torchvision's cache, downloaded where a network exists), never a silent random init.
        detector_weights = "DEFAULT"
    if settings.weights is not None and not Path(settings.weights).expanduser().is_file():
        raise SetupError(f"--weights: no such file: {settings.weights}")
    # Torchvision detectors also take a weights enum name ("DEFAULT", "COCO_V1") instead of a file.
    weights_file = detector_weights is not None and not detector_weights.isidentifier()
    if weights_file and not Path(str(detector_weights)).expanduser().is_file():
        raise SetupError(f"--detector-weights: no such file: {detector_weights}")

    model, weights = settings.model, settings.weights
    if weights is not None:
        summary = f"{model or 'DistilPose (variant from the checkpoint)'} from {weights}"
    elif model in DISTILPOSE_MODELS:
        if not settings.allow_random_weights:
            raise SetupError(
                f"--model {model} needs --weights PATH (an official DistilPose checkpoint); "
                "add --allow-random-weights for a smoke run with random weights"
            )
        summary = f"{model} with RANDOM weights (smoke run: the poses are meaningless)"
    elif model in (None, REFERENCE_MODEL):
        if REFERENCE_MODEL not in paths:
            raise SetupError(
                "no model to serve: pass --weights PATH (a DistilPose checkpoint), or "
                f"{_FETCH_HINT} and start again to serve the reference model {REFERENCE_MODEL}"
            )
        model, weights = REFERENCE_MODEL, str(paths[REFERENCE_MODEL])
        summary = f"reference model {REFERENCE_MODEL} from {weights}"
    else:
        known = ", ".join((*DISTILPOSE_MODELS, REFERENCE_MODEL))
        raise SetupError(f"--model {model}: unknown model (known: {known})")
    detector_settings = _detector_settings(settings, detector)
    summary += f"; detector {detector or 'none (caller boxes, else the whole image)'}"
    if detector_settings:
        summary += " with " + ", ".join(f"{k}={v}" for k, v in detector_settings.items())
    return ModelChoice(model, weights, detector, detector_weights, summary, detector_settings)


def _detector_settings(settings: Settings, detector: str | None) -> dict[str, Any]:
    """The detector settings that are set, under the detector's keyword names.

    Raises:
        SetupError: an input-resize setting the chosen detector does not have.
    """
    given = {
        name: getattr(settings, name)
        for name in DETECTOR_SETTINGS
        if getattr(settings, name) is not None
    }
    if detector is None:
        if given:
            logger.warning("no person detector runs: ignoring %s", ", ".join(sorted(given)))
        return {}
    if detector == REFERENCE_DETECTOR:
        unsupported = [name for name in _RESIZE_SETTINGS if name in given]
        why = f"{REFERENCE_DETECTOR} has a fixed 300x300 input"
    elif detector == _TORCHVISION_SSD:
        unsupported = ["detector_max_size_px"] if "detector_max_size_px" in given else []
        why = f"{_TORCHVISION_SSD}'s input is square: set its side with --detector-min-size-px"
    else:
        unsupported = []
    if unsupported:
        flags = ", ".join(
            f"--{name.replace('_', '-')} / POSE_{name.upper()}" for name in unsupported
        )
        raise SetupError(
            f"{flags}: not a setting of the {detector} detector ({why}); the input resize "
            "applies to the torchvision detectors"
        )
    return {DETECTOR_SETTINGS[name]: value for name, value in given.items()}


def _reference_paths(cache_dir: Path) -> dict[str, Path]:
    """The cached reference models by name ({} when not cached or not installed)."""
    try:
        from model.reference import fetch_reference_models, reference_models_available
    except ImportError:
        return {}
    if not reference_models_available(cache_dir):
        return {}
    return dict(fetch_reference_models(cache_dir))  # cached: no download


def _build_pipeline(choice: ModelChoice, settings: Settings, device: str) -> Pipeline:
    """One pipeline for ``device`` (called in the engine's worker thread)."""
    from model.pipeline import build_pipeline

    return build_pipeline(
        model=choice.model,
        weights=choice.weights,
        detector=choice.detector,
        detector_weights=choice.detector_weights,
        device=device,
        max_crops_per_batch=settings.max_crops_per_batch,
        detector_settings=choice.detector_settings,
    )


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: this module drains first, then stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
    config = EngineConfig(
        max_batch_size=settings.max_batch_size,
        max_delay_ms=settings.max_delay_ms,
        max_queue_size=settings.max_queue_size,
        decode_workers=settings.decode_workers,
        warmup=settings.warmup,
        drain_grace_s=settings.drain_grace_s,
        gpu_decode=settings.gpu_decode,
    )
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
        )
    )
    grpc_server = _grpc_server(engine, settings, metrics)
    if stop is None:
        stop = asyncio.Event()
    force = _install_signal_handlers(stop)

    try:
        await grpc_server.start()
    except Exception:
        logger.exception(
            "the gRPC server failed to start on %s:%s", settings.host, settings.grpc_port
        )
        return 1
    http_task = asyncio.create_task(http.serve())
    while not http.started:
        if http_task.done():
            await grpc_server.stop(0)
            logger.error(
                "the HTTP server failed to start on %s:%s", settings.host, settings.http_port
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
        grpc_server.set_serving(True)
        logger.info("ready", extra={"model": engine.model_info()})
        await asyncio.wait({stop_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
    elif start_task.done():
        logger.error("the model failed to load", exc_info=start_task.exception())
        code = 1
    else:
        start_task.cancel()
        await asyncio.gather(start_task, return_exceptions=True)

    logger.info("draining", extra={"grace_s": 0.0 if force.is_set() else settings.drain_grace_s})
    grpc_server.set_serving(False)
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


def _grpc_server(engine: Engine, settings: Settings, metrics: Metrics) -> Any:
    """The gRPC server over ``engine`` (with the shared metrics when its factory takes them)."""
    from service.rpc import create_grpc_server

    if "metrics" in inspect.signature(create_grpc_server).parameters:
        return create_grpc_server(engine, settings, metrics=metrics)  # type: ignore[call-arg]
    return create_grpc_server(engine, settings)


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


def configure_logging(level: str) -> None:
    """One JSON object per line on stderr, for this service and for uvicorn."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def build_parser() -> argparse.ArgumentParser:
    """``pose-service serve [--every-setting ...]`` and ``pose-service models fetch``."""
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
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pose-service``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
    logger.info("settings", extra={"settings": settings.public_dict()})
    try:
        return asyncio.run(serve(settings))
    except SetupError as exc:
        logger.error("cannot serve: %s", exc)
        sys.stderr.write(f"pose-service: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
