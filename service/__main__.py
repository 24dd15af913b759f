"""The composition root and the ``pose-service`` command.

``pose-service serve`` reads the settings (flags > ``POSE_*`` environment > defaults; unknown flags
and variables are errors), chooses the model, and runs on ONE event loop (uvloop): the engine (one
pipeline worker per device), the FastAPI app under ``uvicorn.Server`` and the gRPC server
(``service.serving``). Readiness turns green (``/readyz`` 200, gRPC health SERVING) only after every
pipeline is built and warmed up. SIGTERM or SIGINT drains: readiness goes 503 and gRPC health
NOT_SERVING at once, admitted work finishes within ``drain_grace_s`` (new work gets 503 /
UNAVAILABLE), then both servers stop. A second signal skips the wait. With ``--frontends N`` > 1
it runs as a parent of one engine process and N front-end processes instead
(``service.processes``).

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
import difflib
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from service.json_logs import JsonLogFormatter
from service.model_choice import DETECTOR_SETTINGS, ModelChoice, SetupError, choose_model
from service.settings import Settings, UnknownSettingError

if TYPE_CHECKING:
    from service.engine import Pipeline

__all__ = ["DETECTOR_SETTINGS", "ModelChoice", "SetupError", "choose_model", "main", "serve"]

logger = logging.getLogger("service")


async def serve(
    settings: Settings,
    *,
    pipeline_factory: Callable[[str], Pipeline] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run the service in this one process until SIGTERM/SIGINT (or ``stop``); returns the exit
    code.

    Args:
        settings: everything.
        pipeline_factory: device -> pipeline (tests); the chosen model's ``build_pipeline``
            when None.
        stop: set it to drain and stop, as a signal does.
    """
    from service import serving
    from service.metrics import Metrics

    serving.fit_torch_threads()
    if pipeline_factory is None:
        choice = choose_model(settings)
        logger.info("serving %s", choice.summary)
        pipeline_factory = serving.pipeline_factory(choice, settings)
    metrics = Metrics()
    engine = serving.build_engine(settings, pipeline_factory, metrics)
    return await serving.run_servers(settings, engine, metrics, stop=stop)


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
    # Not ``model.export`` itself: its networks import torchvision, which would cost every
    # command (``serve`` included: the supervising parent) about 2 s of start-up and 160 MB.
    from model.catalogue import exportable

    export = commands.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch), checked against PyTorch",
        description="Writes the network as ONNX with a dynamic batch dimension, checks it against "
        "PyTorch under ONNX Runtime (tolerances in model/export.py) and records the source "
        "weights' sha256 and the graph's sha256 in its metadata. DistilPose needs --weights; "
        "blazepose_full, blazepose_detector (its pose detector) and ssdlite_person come from the "
        "cache (`pose-service models fetch`). "
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
    export.add_argument(
        "--opset",
        type=int,
        default=None,
        metavar="N",
        help="ONNX opset, 17+ (default: the exporter's)",
    )


def _export(args: argparse.Namespace, settings: Settings) -> int:
    """``pose-service export``: write, check and describe one ONNX file."""
    import json

    from model.export import OPSET, export_model

    if args.model is None and args.weights is None:
        sys.stderr.write("pose-service export: give --model, --weights or both\n")
        return 2
    try:
        result = export_model(
            args.model,
            args.weights,
            args.output,
            cache_dir=settings.cache_path(),
            opset=OPSET if args.opset is None else args.opset,
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
        if settings.frontend_count() > 1:
            from service.processes import supervise

            return supervise(settings)
        from service import serving

        return serving.run(serve(settings))
    except SetupError as exc:
        logger.error("cannot serve: %s", exc)
        return 2
    except Exception:
        logger.exception("the service failed")  # as JSON, not as a bare traceback
        return 1


if __name__ == "__main__":
    sys.exit(main())
