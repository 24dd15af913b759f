"""Every shell example of README.md runs as printed and answers what it should.

The examples are the lines of the README's fenced ``bash`` blocks (a line ending in ``\\``, ``|``
or ``&&`` goes on to the next; ``#`` lines are comments). Each runs as a newcomer would run it after
the set-up: ``bash`` in a scratch folder that stands for the repository root (a ``.venv`` link to
this checkout's, copies of the repository files an example names, such as ``proto/``), with ``PATH``
without ``.venv/bin`` (the set-up does not put it there), no ``POSE_*`` or ``GRPC_*`` variables, and
the input files the examples name made there from the committed ``tests/assets/000000000785.jpg``:
``*.jpg`` copies, folders (``photos/``) holding a copy and a subfolder with another, videos
(``*.mjpeg``, ``*.mp4``) of three frames of it.

The server is the README's own first ``pose-service serve`` example, started as printed (so on the
documented ports, 8000 and 50051, which must be free) and stopped with SIGTERM after the last
example; its exit status must be 0 and its every stderr line JSON. Without curl, or with either
port taken, the examples skip (which ``tests/conftest.py`` turns into a failure under CI=true).
Each example must exit 0 and its answer must have the shape the README promises (JSON with
persons, the boxes given, a PNG, one JSON line per image or frame, ...): an example of a kind this
file has no check for fails.

An example that is not to run here (the set-up and the test suite themselves; a GPU, Docker, a
Kubernetes cluster) carries the HTML comment
``<!-- not run by tests/deploy/test_readme.py: why -->`` on the line before its block; it is not
run, and ``test_marked_not_run`` lists it, by line and command, with the README's reason.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PHOTO = ROOT / "tests" / "assets" / "000000000785.jpg"
PORTS = {"HTTP": 8000, "gRPC": 50051}  # the documented defaults the examples name
VIDEO_FRAMES = 3
START_TIMEOUT_S = 120.0
EXAMPLE_TIMEOUT_S = 120.0

# The first example also waits for the server: model load and warm-up take ~15 s on 2 cores, more
# on a loaded machine; the examples themselves take a few seconds each.
pytestmark = pytest.mark.timeout(240)

_FENCE = re.compile(r"^(?P<indent>[ ]*)```bash\n(?P<body>.*?)^(?P=indent)```$", re.M | re.S)
_NOT_RUN = re.compile(r"<!-- not run by tests/deploy/test_readme\.py: (?P<why>.+?) -->$")
_OUTPUT_FLAGS = ("-o", "--output", "--render")


@dataclass(frozen=True)
class Example:
    """One command of a ``bash`` block, as printed (continuation lines included)."""

    line: int  # its first line in README.md
    text: str
    not_run: str | None  # the README's reason when its block is marked

    @property
    def words(self) -> list[str]:
        """Its words as bash splits them, with ``; | ( ) &&`` as words of their own."""
        lexer = shlex.shlex(self.text.replace("\\\n", " "), posix=True, punctuation_chars=";|()&")
        lexer.whitespace_split = True
        return list(lexer)

    @property
    def program(self) -> str:
        """The program whose answer is checked: the last one of a pipeline."""
        words = self.words
        if "|" in words:
            words = words[len(words) - words[::-1].index("|") :]
        return " ".join(Path(word).name for word in words[:3])

    def id(self) -> str:
        return f"README:{self.line} {self.text.splitlines()[0][:70]}"


def readme_examples(text: str) -> list[Example]:
    examples = []
    for block in _FENCE.finditer(text):
        before = text[: block.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marked = _NOT_RUN.search(before)
        first = text.count("\n", 0, block.start("body")) + 1
        command: list[str] = []
        start = first
        for offset, line in enumerate(block.group("body").splitlines()):
            if not command and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if not command:
                start = first + offset
            command.append(line)
            if not line.rstrip().endswith(("\\", "|", "&&")):
                text_ = "\n".join(command)
                examples.append(Example(start, text_, marked["why"] if marked else None))
                command = []
    return examples


EXAMPLES = readme_examples(README.read_text())
RUN = [e for e in EXAMPLES if e.not_run is None]
SERVERS = [e for e in RUN if e.words[:2] == [".venv/bin/pose-service", "serve"]]
CHECKED = [e for e in RUN if e not in SERVERS]


# --------------------------------------------------------------------------------------------------
# The scratch repository root: .venv, repository files and input files the examples name
# --------------------------------------------------------------------------------------------------


def newcomer_env() -> dict[str, str]:
    """The environment after the set-up: no .venv/bin on PATH, no settings of ours or gRPC's."""
    venv_bins = {str(ROOT / ".venv" / "bin"), str(Path(sys.executable).parent)}
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("POSE_", "GRPC_", "DISTILPOSE_")) and key != "VIRTUAL_ENV"
    }
    path = env.get("PATH", os.defpath).split(os.pathsep)
    env["PATH"] = os.pathsep.join(p for p in path if p.rstrip("/") not in venv_bins)
    return env


def named_paths(example: Example) -> tuple[set[str], set[str]]:
    """(input files and folders the example reads, repository paths it names)."""
    inputs, repository = set(), set()
    words = example.words
    for index, word in enumerate(words):
        if index and words[index - 1] in _OUTPUT_FLAGS:
            continue  # written by the example
        name = word.rpartition("@")[2]  # curl's @photo.jpg, image=@a.jpg
        if re.fullmatch(r"[\w./-]+\.(jpe?g|png|mjpe?g|mp4)", name):
            inputs.add(name)
        elif re.fullmatch(r"\w[\w-]*/", word):
            inputs.add(word)  # a folder of images
        elif re.fullmatch(r"\w[\w-]*/[\w./-]*", word) and (ROOT / word).exists():
            repository.add(word)  # proto/pose/v1/pose.proto
    return inputs, repository


def make_input(path: Path) -> None:
    """An input file or folder the examples name, made from the committed photo."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if path.name.endswith("/") or not suffix:  # a folder: one photo, and one in a subfolder
        (path / "more").mkdir(parents=True, exist_ok=True)
        shutil.copy(PHOTO, path / PHOTO.name)
        shutil.copy(PHOTO, path / "more" / PHOTO.name)
    elif suffix in (".jpg", ".jpeg"):
        shutil.copy(PHOTO, path)
    elif suffix == ".png":
        Image.open(PHOTO).save(path)
    elif suffix in (".mjpeg", ".mjpg"):
        path.write_bytes(PHOTO.read_bytes() * VIDEO_FRAMES)
    elif suffix == ".mp4":
        write_mp4(path)
    else:
        raise AssertionError(f"no way to make {path.name} for the README's examples: add one")


def write_mp4(path: Path) -> None:
    import av
    import numpy as np

    picture = np.asarray(Image.open(PHOTO).convert("RGB"))
    picture = picture[: picture.shape[0] // 2 * 2, : picture.shape[1] // 2 * 2]  # even sizes
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.height, video.width = picture.shape[:2]
        video.pix_fmt = "yuv420p"
        for _ in range(VIDEO_FRAMES):
            for packet in video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    (root / ".venv").symlink_to(ROOT / ".venv", target_is_directory=True)
    for example in RUN:
        inputs, repository = named_paths(example)
        for name in repository:
            copy = root / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, copy, dirs_exist_ok=True)
            else:
                shutil.copy(ROOT / name, copy)
        for name in inputs:
            if not (root / name).exists():
                make_input(root / name)
    return root


# --------------------------------------------------------------------------------------------------
# The server: the README's `pose-service serve`, as printed
# --------------------------------------------------------------------------------------------------


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[None]:
    assert len(SERVERS) == 1, f"one `.venv/bin/pose-service serve` example to run: {SERVERS}"
    env = newcomer_env()
    if shutil.which("curl", path=env["PATH"]) is None:
        pytest.skip("curl is not installed (the README's HTTP examples use it)")
    for name, port in PORTS.items():
        if port_in_use(port):
            pytest.skip(f"port {port} is in use: the README's {name} examples name it")
    log = workdir / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["bash", "-c", "exec " + SERVERS[0].text],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    try:
        wait_ready(process, log)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
    lines = log.read_text().splitlines()
    assert status == 0, f"the server exited with {status}:\n{tail(log)}"
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            pytest.fail(f"the server logged a line that is not JSON: {line!r}")


def wait_ready(process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    url = f"http://127.0.0.1:{PORTS['HTTP']}/readyz"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{tail(log)}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the server was not ready within {START_TIMEOUT_S:.0f} s:\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------------------------------
# The examples
# --------------------------------------------------------------------------------------------------


def test_the_readme_has_its_examples() -> None:
    programs = {e.program.split()[0] for e in CHECKED}
    assert {"curl", "grpcurl", "pose-client"} <= programs, programs
    assert len(SERVERS) == 1 and len(CHECKED) >= 20, [e.id() for e in RUN]


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.not_run], ids=Example.id)
def test_marked_not_run(example: Example) -> None:
    """Listed by name, with the README's reason; nothing runnable hides behind an empty one."""
    assert example.not_run and example.not_run.strip()


@pytest.mark.parametrize("example", CHECKED, ids=Example.id)
def test_example_runs_as_printed(example: Example, server: None, workdir: Path) -> None:
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", example.text],
        cwd=workdir,
        env=newcomer_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=EXAMPLE_TIMEOUT_S,
    )
    out = done.stdout.decode(errors="replace")
    said = f"exit status {done.returncode}\n--- stdout:\n{out[-2000:]}\n--- stderr:\n"
    said += done.stderr.decode(errors="replace")[-3000:]
    assert done.returncode == 0, said
    program = example.program.split()[0]
    checks = {
        "curl": check_curl,
        "grpcurl": check_grpcurl,
        "pose-client": check_pose_client,
        "python": check_protoc,
    }
    assert program in checks, f"no check for {program} examples: add one to {__file__}"
    checks[program](example, out, workdir)


# --------------------------------------------------------------------------------------------------
# What each kind of example must answer
# --------------------------------------------------------------------------------------------------


def documents(text: str) -> tuple[list[Any], str]:
    """The JSON documents at the start of ``text``, one after the other, and what follows."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text) or text[at] not in "[{":
            return found, text[at:]
        value, at = decoder.raw_decode(text, at)
        found.append(value)


def check_persons(answer: Any, count: int | None = None) -> None:
    """One image's answer: no error, persons with 17 keypoints each (``count`` of them)."""
    assert isinstance(answer, dict) and "error" not in answer, answer
    persons = answer["persons"]
    assert persons if count is None else len(persons) == count, answer
    for person in persons:
        assert len(person["keypoints"]) == 17, person


def output_of(example: Example, stdout: str, workdir: Path) -> bytes:
    """What the example wrote: the ``-o``/``--output`` file, else its standard output."""
    words = example.words
    for flag in ("-o", "--output"):
        if flag in words:
            path = workdir / words[words.index(flag) + 1]
            assert path.is_file(), f"{path.name} was not written"
            return path.read_bytes()
    return stdout.encode()


def check_curl(example: Example, stdout: str, workdir: Path) -> None:
    paths = re.findall(rf"localhost:{PORTS['HTTP']}(/[\w/]*)", example.text)
    if paths == ["/v1/pose/render"]:
        image = output_of(example, stdout, workdir)
        jpeg = "image/jpeg" in example.text
        assert image.startswith(b"\xff\xd8" if jpeg else b"\x89PNG\r\n\x1a\n"), image[:16]
        assert Image.open(io.BytesIO(image)).size == Image.open(PHOTO).size
        return
    answers, rest = documents(stdout)
    for path in paths:
        if path == "/metrics":
            continue  # not JSON: the exposition text follows the JSON answers, in ``rest``
        assert answers, f"no answer for {path}: {stdout[:500]!r}"
        answer = answers.pop(0)
        if path in ("/pose", "/v1/pose"):
            boxes = re.search(r"boxes=(\[\[[^']*?\]\])", example.text)
            given = json.loads(boxes[1]) if boxes else None
            check_persons(answer, None if given is None else len(given))
            for person, box in zip(answer["persons"], given or [], strict=False):
                assert person["bbox"] == pytest.approx(box[:4]), (person["bbox"], box)
        elif path == "/v1/pose/batch":
            assert len(answer["results"]) == example.text.count("image=@"), answer
            for result in answer["results"]:
                check_persons(result)
        elif path == "/v1/models":
            assert answer["model"]["model"] and answer["model"]["keypoint_names"], answer
        elif path == "/readyz":
            assert answer == {"status": "ready"}
        else:
            raise AssertionError(f"no check for {path}: add one")
    assert not answers, f"answers left over: {answers}"
    if "/metrics" in paths:
        assert "# TYPE pose_requests_total counter" in rest, rest[:500]
    else:
        assert not rest.strip(), rest[:500]


def check_grpcurl(example: Example, stdout: str, workdir: Path) -> None:
    method = example.words[-1]
    if method == "list":
        assert "pose.v1.PoseService" in stdout.split(), stdout
        return
    (answer,), rest = documents(stdout)
    assert not rest.strip(), rest
    if method.endswith("Health/Check"):
        assert answer == {"status": "SERVING"}, answer
    elif method.endswith("/GetModelInfo"):
        assert answer["model"] and len(answer["keypoint_names"]) == 17, answer
    elif method.endswith("/Estimate"):
        frame = re.search(r'"frame_id": ?"(\w+)"', example.text)
        if frame:
            assert answer["frame_id"] == frame[1], answer
        check_persons(answer)
    else:
        raise AssertionError(f"no check for grpcurl's {method}: add one")


def check_pose_client(example: Example, stdout: str, workdir: Path) -> None:
    words = example.words
    if "--info" in words:
        (answer,), _ = documents(stdout)
        assert answer["model"], answer
        return
    source = next(w for w in words[1:] if not w.startswith("-"))
    if source.endswith("/"):
        images = 2 if {"-r", "--recursive"} & set(words) else 1
    elif Path(source).suffix in (".mjpeg", ".mjpg", ".mp4"):
        images = VIDEO_FRAMES
    else:
        images = 1
    output = output_of(example, stdout, workdir).decode()
    if "--format" in words and words[words.index("--format") + 1] == "coco":
        results = json.loads(output)
        assert results, "no COCO results"
        for result in results:
            assert result["image_id"] == int(PHOTO.stem), result  # from the file name
            assert result["category_id"] == 1 and len(result["keypoints"]) == 51, result
        return
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert len(lines) == images, lines
    for line in lines:
        check_persons(line)
    if "--render" in words:
        drawn = sorted((workdir / words[words.index("--render") + 1]).iterdir())
        assert len(drawn) == images, drawn
        assert all(p.read_bytes()[:2] == b"\xff\xd8" for p in drawn), drawn


def check_protoc(example: Example, stdout: str, workdir: Path) -> None:
    assert "grpc_tools.protoc" in example.words, example.text
    proto = next(w for w in example.words if w.endswith(".proto"))
    stem = Path(proto).with_suffix("")
    out = workdir / "service" / "pb" / stem.relative_to("proto")
    for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"):
        made = out.parent / (out.name + suffix)
        assert made.is_file() and made.stat().st_size > 0, made
