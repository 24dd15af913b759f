"""The layers import in one direction: ``model`` <- ``service.engine`` <- transports.

Every module of ``model/`` (pipeline, detector, catalogue and the reference models included) and the
engine with what it uses must load without any transport or metrics library: the model knows
nothing of serving, and the engine knows nothing of HTTP or gRPC (its metrics arrive through an
observer). Checked in a fresh interpreter, so that nothing imported by other tests hides a leak.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("fastapi", "starlette", "grpc", "prometheus_client", "uvicorn", "httpx")
ENGINE_SIDE = (
    "service.engine",
    "service.engine_api",
    "service.errors",
    "service.validation",
    "service.uploads",
    "service.gpu_decode",
    "service.batching",
    "service.workers",
)


def model_modules() -> list[str]:
    return sorted(
        f"model.{path.stem}" for path in (ROOT / "model").glob("*.py") if path.stem != "__main__"
    )


def test_model_and_engine_load_no_transport_or_metrics_library() -> None:
    modules = model_modules()
    assert {"model.pipeline", "model.detector", "model.reference", "model.catalogue"} <= set(
        modules
    )
    code = (
        "import importlib, json, sys\n"
        f"for name in {[*modules, *ENGINE_SIDE]!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(out) == []


def test_the_check_sees_a_transport_when_one_is_loaded() -> None:
    """The probe above is not blind: importing a transport module shows up in it."""
    code = (
        "import json, sys, service.rest\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    assert "fastapi" in json.loads(out)
