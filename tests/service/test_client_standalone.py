"""The client stands alone: it imports nothing of the server, and ``pose-client`` runs from a venv
holding only its own runtime dependencies (no torch, no FastAPI, no dev extras) against live
servers over HTTP and gRPC.

The venv is built without the network in a few seconds: ``python -m venv --without-pip``, the
client's dependencies (and theirs, from their metadata) hard-linked file by file from this venv
using each distribution's ``RECORD``, and the project itself as a wheel built here with
``pip wheel --no-deps --no-index --no-build-isolation`` and installed into it with
``pip --python``, which writes the real ``pose-client`` console script.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.service.rpc_harness import png_bytes, serving

ROOT = Path(__file__).resolve().parents[2]
# What the client needs at run time: the wire (grpcio, protobuf, httpx) and the pixels (Pillow;
# numpy for float32 printing). Each must be a runtime dependency of the project too.
CLIENT_REQUIREMENTS = ("grpcio", "protobuf", "httpx", "pillow", "numpy")
SERVER_ONLY = ("torch", "torchvision", "fastapi", "uvicorn", "starlette", "prometheus_client")
CLIENT_MODULES = (
    "service.client",
    "service.client.api",
    "service.client.cli",
    "service.client.draw",
    "service.client.media",
    "service.client.progress",
    "service.client.results",
)


def test_client_imports_nothing_of_the_server() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {CLIENT_MODULES!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
    )
    forbidden = [m for m in loaded if m.split(".")[0] in SERVER_ONLY]
    server = [
        m
        for m in loaded
        if m.startswith("service.") and not m.startswith(("service.client", "service.pb"))
    ]
    assert forbidden == [] and server == []
    assert "model" not in {m.split(".")[0] for m in loaded}


def test_client_requirements_are_runtime_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert {canonicalize_name(r) for r in CLIENT_REQUIREMENTS} <= runtime
    assert project["scripts"]["pose-client"] == "service.client.cli:main"


def _closure(names: tuple[str, ...]) -> list[importlib.metadata.Distribution]:
    """The installed distributions of ``names`` and everything they require (extras left out)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        found[name] = importlib.metadata.distribution(name)
        for text in found[name].requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def _link_distribution(dist: importlib.metadata.Distribution, site: Path) -> None:
    """Every file ``RECORD`` lists under site-packages, hard-linked (copied across devices)."""
    for file in dist.files or ():
        if ".." in file.parts:  # console scripts of the dependencies: not needed
            continue
        source = Path(str(dist.locate_file(file)))
        if not source.is_file():
            continue
        target = site / file
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with only the client's runtime dependencies and the project; its path."""
    work = tmp_path_factory.mktemp("client-venv")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    for dist in _closure(CLIENT_REQUIREMENTS):
        _link_distribution(dist, site)
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("model", "service"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = work / "wheels"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-index", "--no-build-isolation", "-w", wheels, source],
        check=True,
        cwd=work,
    )
    (wheel,) = wheels.glob("*.whl")
    subprocess.run(
        [*pip, "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", wheel],
        check=True,
        cwd=work,
    )
    return venv


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH, no API keys, nothing of this venv."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
    return {k: v for k, v in os.environ.items() if k in keep}


async def _pose_client(venv: Path, *argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        venv / "bin" / "pose-client",
        *argv,
        cwd=venv.parent,
        env=_clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def test_the_venv_has_no_server_dependencies(client_venv: Path) -> None:
    code = (
        "import importlib.util, json\n"
        f"print(json.dumps([m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m)]))"
    )
    python = client_venv / "bin" / "python"
    result = subprocess.run(
        [python, "-c", code], env=_clean_env(), cwd=client_venv.parent, capture_output=True
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_pose_client_runs_alone(client_venv: Path, tmp_path: Path, transport: str) -> None:
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes(20, 16))
    rendered = tmp_path / "drawn"
    async with serving(http=True) as s:
        target = s.target if transport == "grpc" else s.http_url
        code, out, err = await _pose_client(
            client_venv, str(image), "--target", target, "--render", str(rendered)
        )
        info_code, info, _ = await _pose_client(client_venv, "--info", "--target", target)
    assert code == 0, err
    line = json.loads(out)
    assert line["source"] == str(image) and line["image"] == {"width": 20, "height": 16}
    assert len(line["persons"][0]["keypoints"]) == 17
    assert (rendered / "photo.jpg").is_file()
    assert info_code == 0 and json.loads(info)["model"] == "fake"


async def test_pose_client_alone_fails_in_one_line(client_venv: Path, tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes(8, 8))
    code, out, err = await _pose_client(client_venv, str(image), "--target", "http://127.0.0.1:1")
    assert code == 2 and out == ""
    assert err.startswith("pose-client: error: http://127.0.0.1:1: unavailable: ")
    assert len(err.splitlines()) == 1
