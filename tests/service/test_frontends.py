"""``pose-service serve --frontends N``: the real command, as a subprocess, on the identity model.

The same transport checks run against one process (``--frontends 1``) and against a parent, an
engine process and two front ends (``--frontends 2``): HTTP raw/JSON/multipart/batch/render,
the 4xx errors, gRPC unary and a tracked stream, and ``/metrics`` through promtool. With two
front ends: one batch holds requests of both (proved by the engine's own batch histogram), a
cancelled or expired request never reaches compute, the decoded images in shared memory are
cleaned up, and the process kill tests: a killed front end is started again, a killed engine
gives 503 at once and the service exits 1, SIGTERM drains and exits 0.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from model.reference import default_cache_dir, reference_models_available
from service.pb.pose.v1 import pose_pb2, pose_pb2_grpc
from tests.service.rest_support import jpeg, png, promtool_check

ASSETS = Path(__file__).resolve().parents[1] / "assets"
START_TIMEOUT_S = 90.0
BOXES = [[5.0, 6.0, 10.0, 20.0], [1.0, 2.0, 3.0, 4.0, 0.25]]


class Service:
    """``pose-service serve --model identity`` in a subprocess, on free ports."""

    def __init__(self, tmp: Path, frontends: int, *flags: str) -> None:
        self.log = tmp / f"serve-{frontends}.log"
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("POSE_")}
        command = [
            sys.executable,
            "-m",
            "service",
            "serve",
            "--model",
            "identity",
            "--frontends",
            str(frontends),
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--drain-grace-s",
            "10",
            *flags,
        ]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.started = self._wait_for("http_port")
        self.http = f"http://127.0.0.1:{self.started['http_port']}"
        self.grpc = f"127.0.0.1:{self.started['grpc_port']}"
        self._wait_ready()

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"msg": line, "not_json": True})
        return out

    def _wait_for(self, key: str) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for entry in self.lines():
                if key in entry:
                    return entry
            if self.process.poll() is not None:
                pytest.fail(f"the service exited with {self.process.returncode}:\n{self.tail()}")
            time.sleep(0.1)
        pytest.fail(f"no {key!r} in the log within {START_TIMEOUT_S:.0f} s:\n{self.tail()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the service exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.http + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"not ready within {START_TIMEOUT_S:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            pytest.fail(f"the service did not stop on SIGTERM:\n{self.tail()}")

    def metric(self, name: str) -> float:
        """One sample's value from ``/metrics`` (0 when absent)."""
        for line in httpx.get(self.http + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def engine_batches(self) -> tuple[float, float]:
        """(batches run, images in them) so far, from the engine's histogram."""
        return (
            self.metric('pose_batch_size_count{stage="engine"}'),
            self.metric('pose_batch_size_sum{stage="engine"}'),
        )


def _persons(body: dict[str, Any]) -> list[tuple[list[float], float]]:
    return [([round(v, 3) for v in p["bbox"]], round(p["bbox_score"], 3)) for p in body["persons"]]


EXPECTED = [([5.0, 6.0, 10.0, 20.0], 1.0), ([1.0, 2.0, 3.0, 4.0], 0.25)]


@pytest.fixture(scope="module", params=[1, 2], ids=["1-frontend", "2-frontends"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    served = Service(
        tmp_path_factory.mktemp("frontends"),
        request.param,
        "--max-batch-size",
        "8",
        "--max-delay-ms",
        "300",
    )
    served.frontends = request.param  # type: ignore[attr-defined]
    yield served
    code = served.stop()
    assert code == 0, served.tail()
    assert not [e for e in served.lines() if e.get("not_json")], "every log line is JSON"


# --------------------------------------------------------------------------------------------------
# The same transport checks, one process and two front ends
# --------------------------------------------------------------------------------------------------


def test_http_raw_json_and_multipart_agree(service: Service) -> None:
    image = jpeg(64, 48)
    boxes = json.dumps(BOXES)
    with httpx.Client(base_url=service.http, timeout=30) as client:
        raw = client.post(
            "/v1/pose",
            params={"boxes": boxes},
            content=image,
            headers={"content-type": "image/jpeg"},
        )
        as_json = client.post(
            "/v1/pose", json={"image": base64.b64encode(image).decode(), "boxes": BOXES}
        )
        multipart = client.post(
            "/v1/pose", files={"image": ("a.jpg", image, "image/jpeg")}, data={"boxes": boxes}
        )
    for answer in (raw, as_json, multipart):
        assert answer.status_code == 200, answer.text
        assert _persons(answer.json()) == EXPECTED
        assert answer.json()["image"] == {"width": 64, "height": 48}


def test_a_large_image_crosses_as_shared_memory(service: Service) -> None:
    # 900 x 700 x 3 bytes decoded: over the inline limit, so it goes through /dev/shm.
    with httpx.Client(base_url=service.http, timeout=30) as client:
        answer = client.post(
            "/v1/pose",
            params={"boxes": json.dumps([[800, 600, 50, 60]])},
            content=png(900, 700),
            headers={"content-type": "image/png"},
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["image"]["width"] == 900 and _persons(answer.json()) == [
        ([800, 600, 50, 60], 1.0)
    ]


def test_batch_and_render_routes(service: Service) -> None:
    with httpx.Client(base_url=service.http, timeout=30) as client:
        batch = client.post(
            "/v1/pose/batch",
            files=[
                ("image", ("a.png", png(40, 30), "image/png")),
                ("image", ("b.jpg", jpeg(), "image/jpeg")),
            ],
        )
        render = client.post(
            "/v1/pose/render",
            params={"boxes": json.dumps(BOXES)},
            content=png(64, 48),
            headers={"content-type": "image/png", "accept": "image/png"},
        )
    assert batch.status_code == 200, batch.text
    assert [r["image"]["width"] for r in batch.json()["results"]] == [40, 64]
    assert render.status_code == 200 and render.content[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("params", "content", "status", "code"),
    [
        ({"boxes": '[["1", 2, 3, 4]]'}, jpeg(), 400, "bad_boxes"),
        ({"boxes": "[[500, 500, 10, 10]]"}, jpeg(), 400, "bad_boxes"),  # outside the 64x48 image
        ({}, jpeg()[:200], 400, "bad_image"),  # truncated
        ({}, b"not an image at all", 415, "unsupported_media_type"),
    ],
    ids=["string-in-box", "box-outside", "truncated", "garbage"],
)
def test_bad_requests_are_4xx(
    service: Service, params: dict[str, str], content: bytes, status: int, code: str
) -> None:
    answer = httpx.post(
        service.http + "/v1/pose",
        params=params,
        content=content,
        headers={"content-type": "image/jpeg"},
        timeout=30,
    )
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code


def test_grpc_unary_and_a_tracked_stream(service: Service) -> None:
    boxes = [
        pose_pb2.Box(x=5, y=6, width=10, height=20),
        pose_pb2.Box(x=1, y=2, width=3, height=4, score=0.25),
    ]
    with grpc.insecure_channel(service.grpc) as channel:
        stub = pose_pb2_grpc.PoseServiceStub(channel)
        reply = stub.Estimate(pose_pb2.EstimateRequest(image=jpeg(), boxes=boxes), timeout=30)
        assert [(p.box.x, p.box.width) for p in reply.persons] == [(5, 10), (1, 3)]
        frames = [
            pose_pb2.EstimateRequest(
                image=jpeg(seed=i), boxes=boxes[:1], frame_id=str(i), track=True
            )
            for i in range(4)
        ]
        answers = list(stub.StreamEstimate(iter(frames), timeout=60))
    assert [a.frame_id for a in answers] == ["0", "1", "2", "3"]
    ids = {a.persons[0].track_id for a in answers}
    assert len(ids) == 1 and ids != {0}, ids


def test_metrics_are_one_clean_exposition(service: Service) -> None:
    httpx.post(
        service.http + "/v1/pose",
        params={"boxes": "[[1, 1, 5, 5]]"},
        content=jpeg(),
        headers={"content-type": "image/jpeg"},
        timeout=30,
    )
    text = httpx.get(service.http + "/metrics", timeout=10).content
    assert promtool_check(text) == ""
    body = text.decode()
    for name in (
        "pose_requests_total",
        "pose_queue_depth",
        "pose_batch_size_bucket",
        "pose_model_info",
    ):
        assert name in body, name
    assert 'model="identity"' in body
    assert service.metric('pose_requests_total{code="200",transport="http"}') >= 1


# --------------------------------------------------------------------------------------------------
# Two front ends, one engine
# --------------------------------------------------------------------------------------------------


# The module's two-front-end service (the same instance as the parametrised tests').
TWO = pytest.mark.parametrize("service", [2], indirect=True, ids=["2-frontends"])


def _clients_on_each_frontend(service: Service, count: int) -> list[httpx.Client]:
    """Keep-alive clients, ``count`` answered by each front end (the kernel picks per
    connection; new connections until both are covered)."""
    by_frontend: dict[str, list[httpx.Client]] = {}
    spare = []
    for _ in range(200):
        client = httpx.Client(
            base_url=service.http, timeout=30, limits=httpx.Limits(max_connections=1)
        )
        served_by = client.get("/livez").headers["x-served-by"]
        group = by_frontend.setdefault(served_by, [])
        (group if len(group) < count else spare).append(client)
        if len(by_frontend) == 2 and all(len(g) == count for g in by_frontend.values()):
            break
    for client in spare:
        client.close()
    assert sorted(by_frontend) == ["frontend-0", "frontend-1"], sorted(by_frontend)
    return [c for group in by_frontend.values() for c in group]


@TWO
def test_one_batch_holds_requests_of_both_frontends(service: Service) -> None:
    clients = _clients_on_each_frontend(service, 4)
    before = _engine_batch_histogram(service)
    barrier = threading.Barrier(len(clients))

    def send(client: httpx.Client) -> tuple[int, str]:
        barrier.wait()
        answer = client.post(
            "/v1/pose",
            params={"boxes": "[[1, 1, 5, 5]]"},
            content=jpeg(),
            headers={"content-type": "image/jpeg"},
        )
        return answer.status_code, answer.headers["x-served-by"]

    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        answers = list(pool.map(send, clients))
    for client in clients:
        client.close()
    assert [code for code, _ in answers] == [200] * 8
    assert sorted({by for _, by in answers}) == ["frontend-0", "frontend-1"]
    after = _engine_batch_histogram(service)
    assert after["sum"] - before["sum"] == 8  # images
    # 4 requests per front end: a new batch of more than 4 images held requests of both.
    new_batches = after["+Inf"] - before["+Inf"]
    new_small_batches = after["4.0"] - before["4.0"]
    assert new_batches > new_small_batches, (before, after)


def _engine_batch_histogram(service: Service) -> dict[str, float]:
    """The engine stage of ``pose_batch_size``: cumulative bucket counts by ``le``, and sum."""
    out = {}
    for line in httpx.get(service.http + "/metrics", timeout=10).text.splitlines():
        if 'stage="engine"' not in line:
            continue
        if line.startswith("pose_batch_size_bucket"):
            out[line.split('le="')[1].split('"')[0]] = float(line.split()[-1])
        elif line.startswith("pose_batch_size_sum"):
            out["sum"] = float(line.split()[-1])
    return out


def test_cancelled_and_expired_requests_never_reach_compute(tmp_path: Path) -> None:
    """The reference model (BlazePose + SSDLite, ~0.1 s an image on this CPU) one image per batch:
    while a first request runs, a second one is cancelled by its client and a third one's
    deadline passes; neither reaches the pipeline (the engine counts the images it ran)."""
    cache = default_cache_dir()
    if not reference_models_available(cache):
        pytest.skip(f"reference models not in the cache {cache}: run `pose-service models fetch`")
    service = Service(
        tmp_path, 2, "--model", "blazepose_full", "--backend", "torch", "--max-batch-size", "1"
    )
    try:
        photo = (ASSETS / "000000000785.jpg").read_bytes()
        request = pose_pb2.EstimateRequest(image=photo)
        with grpc.insecure_channel(service.grpc) as channel:
            stub = pose_pb2_grpc.PoseServiceStub(channel)
            stub.Estimate(request, timeout=60)  # the engine measures its rate
            _, images = service.engine_batches()
            first = stub.Estimate.future(request, timeout=60)
            time.sleep(0.02)
            cancelled = stub.Estimate.future(request, timeout=60)
            time.sleep(0.02)
            cancelled.cancel()
            # Refused at once (it cannot be answered in time) or expired in the queue.
            with pytest.raises(grpc.RpcError) as expired:
                stub.Estimate(request, timeout=0.05)
            assert expired.value.code() in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            assert len(first.result().persons) >= 1
        time.sleep(1.0)  # anything still queued would have run by now
        assert service.engine_batches()[1] - images == 1, service.tail()
    finally:
        assert service.stop() == 0, service.tail()


@TWO
def test_frontends_load_no_torchvision_and_the_parent_no_torch(service: Service) -> None:
    """A front end decodes on the CPU and never on a device: it imports no torchvision, which
    would cost about 2 s of its start-up (a restart included) and 160 MB. The parent only
    supervises: it imports no torch at all (about 2.5 s before it could start the children,
    and 570 MB of RSS)."""
    pids = _pids(service)
    frontends = [Path(f"/proc/{pid}/maps") for pid in pids["frontend_pids"]]
    parent = Path(f"/proc/{service.process.pid}/maps")
    if not parent.exists():
        pytest.skip("no /proc: cannot see what a process has mapped")
    for path in frontends:
        mapped = path.read_text()
        assert "/torch/lib/" in mapped  # (the probe sees libraries: torch itself is mapped)
        assert "/torchvision/" not in mapped, path
    mapped = parent.read_text()
    assert "/torch/" not in mapped and "/torchvision/" not in mapped
    assert "/grpc/" not in mapped  # nor a transport: it serves nothing itself


@TWO
def test_decoded_images_leave_no_files(service: Service) -> None:
    run_dir = Path(next(e["run_dir"] for e in service.lines() if "run_dir" in e))
    with httpx.Client(base_url=service.http, timeout=30) as client:
        for seed in range(3):
            answer = client.post(
                "/v1/pose", content=png(700, 500, seed), headers={"content-type": "image/png"}
            )
            assert answer.status_code == 200
    assert run_dir.is_dir() and list((run_dir / "images").iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Killing processes
# --------------------------------------------------------------------------------------------------


def _pids(service: Service) -> dict[str, Any]:
    return next(e for e in service.lines() if e.get("msg") == "processes started")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_killed_frontend_is_restarted_and_sigterm_drains(tmp_path: Path) -> None:
    service = Service(tmp_path, 2, "--max-delay-ms", "300")
    try:
        started = _pids(service)
        victim = started["frontend_pids"][0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + START_TIMEOUT_S
        seen: set[str] = set()
        while seen != {"frontend-0", "frontend-1"}:
            assert time.monotonic() < deadline, service.tail()
            try:  # a fresh connection each time: the kernel spreads them over the listeners
                answer = httpx.post(
                    service.http + "/v1/pose",
                    content=jpeg(),
                    headers={"content-type": "image/jpeg"},
                    timeout=30,
                )
            except httpx.TransportError:
                continue
            if answer.status_code == 200:
                seen.add(answer.headers["x-served-by"])
            else:  # the restarted front end answers 503 until the engine says ready to it
                assert answer.status_code == 503, answer.text
        assert any("starting it again" in e.get("msg", "") for e in service.lines())

        # SIGTERM with a request in flight (held 300 ms for a batch): answered, then exit 0.
        result: dict[str, int] = {}

        def slow() -> None:
            result["status"] = httpx.post(
                service.http + "/v1/pose",
                content=jpeg(),
                headers={"content-type": "image/jpeg"},
                timeout=30,
            ).status_code

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.1)
        assert service.stop() == 0, service.tail()
        thread.join(30)
        assert result.get("status") == 200, service.tail()
        children = [started["engine_pid"], *started["frontend_pids"]]
        assert not [pid for pid in children if _alive(pid)]
    finally:
        service.stop()


def test_the_jobs_of_a_killed_frontend_never_reach_compute(tmp_path: Path) -> None:
    """Requests held in the engine's queue (``max_delay_ms`` 2 s, batches of 8) when their front
    ends die: the engine sees the connections close and drops their jobs, as it drops a
    cancelled one; nothing of them runs (the engine counts the images it ran)."""
    service = Service(tmp_path, 2, "--max-delay-ms", "2000", "--max-batch-size", "8")
    try:
        started = _pids(service)
        _, images = service.engine_batches()

        def held() -> None:
            with contextlib.suppress(httpx.TransportError):  # its front end dies
                httpx.post(
                    service.http + "/v1/pose",
                    content=jpeg(),
                    headers={"content-type": "image/jpeg"},
                    timeout=30,
                )

        threads = [threading.Thread(target=held) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # queued in the engine, held for the batch to fill
        for pid in started["frontend_pids"]:
            os.kill(pid, signal.SIGKILL)
        for thread in threads:
            thread.join(30)
        time.sleep(2.5)  # past max_delay_ms: anything still queued would have run by now
        service._wait_ready()  # (the parent restarted both front ends)
        assert service.engine_batches()[1] == images, service.tail()
        assert service.metric("pose_queue_depth") == 0
    finally:
        service.stop()


def test_a_killed_engine_gives_503_at_once_and_the_service_exits_1(tmp_path: Path) -> None:
    service = Service(tmp_path, 2, "--max-delay-ms", "2000", "--max-batch-size", "8")
    try:
        started = _pids(service)
        result: dict[str, Any] = {}

        def waiting() -> None:  # held by max_delay_ms when the engine dies
            answer = httpx.post(
                service.http + "/v1/pose",
                content=jpeg(),
                headers={"content-type": "image/jpeg"},
                timeout=30,
            )
            result["answer"] = (
                answer.status_code,
                answer.json()["error"]["code"] if answer.status_code != 200 else "",
            )

        thread = threading.Thread(target=waiting)
        thread.start()
        time.sleep(0.5)
        os.kill(started["engine_pid"], signal.SIGKILL)
        thread.join(30)
        assert result.get("answer") == (503, "unavailable"), (result, service.tail())
        assert service.process.wait(60) == 1, service.tail()
        assert any("engine process exited" in e.get("msg", "") for e in service.lines())
        assert not [pid for pid in started["frontend_pids"] if _alive(pid)]
    finally:
        service.stop()
