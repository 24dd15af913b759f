"""The ``pose-service`` command: settings from flags and ``POSE_*``, model choice, ``models fetch``,
and ``serve`` (one event loop; readiness and gRPC health through warm-up and drain)."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import types
import weakref
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import service.__main__ as cli
from service import serving
from service.settings import Settings, UnknownSettingError
from tests.service.rest_support import SlowPipeline, png, wait_until


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith("POSE_"):
            monkeypatch.delenv(key)


def parse(*argv: str) -> Settings:
    return cli.settings_from_args(cli.build_parser().parse_args(["serve", *argv]))


def test_every_setting_is_a_flag_and_flags_parse_to_settings() -> None:
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text
        assert f"POSE_{name.upper()}" in help_text
    settings = parse(
        "--weights",
        "w.pth",
        "--detector",
        "none",
        "--device",
        "cuda:0,cuda:1",
        "--http-port",
        "9000",
        "--max-delay-ms",
        "5.5",
        "--no-flip-test",
        "--precision",
        "bf16",
        "--api-keys",
        "k1,k2",
    )
    assert settings.weights == "w.pth" and settings.detector == "none"
    assert settings.devices() == ["cuda:0", "cuda:1"]
    assert settings.http_port == 9000 and settings.max_delay_ms == 5.5
    assert settings.flip_test is False and settings.precision == "bf16"
    assert settings.api_keys == ["k1", "k2"]
    assert "k1" not in repr(settings) and "k1" not in str(settings.public_dict())
    assert parse() == Settings()


def test_environment_and_flag_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSE_MAX_BATCH_SIZE", "5")
    monkeypatch.setenv("POSE_FLIP_TEST", "false")
    monkeypatch.setenv("POSE_API_KEYS", "a, b")
    assert parse().max_batch_size == 5 and parse().flip_test is False
    assert parse().api_keys == ["a", "b"]
    assert parse("--max-batch-size", "7").max_batch_size == 7  # flags win


def test_unknown_environment_variables_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSE_MAX_BATCH", "5")
    with pytest.raises(UnknownSettingError, match="did you mean POSE_MAX_BATCH_SIZE"):
        Settings()
    with pytest.raises(SystemExit) as info:
        cli.main(["serve"])
    assert info.value.code == 2


def test_kubernetes_service_link_variables_are_tolerated(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("POSE_SERVICE_HOST", "POSE_SERVICE_PORT", "POSE_PORT", "POSE_PORT_8000_TCP_ADDR"):
        monkeypatch.setenv(key, "10.0.0.1")
    assert Settings().http_port == 8000


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--max-batch", "3"],  # abbreviations are not accepted
        ["serve", "--no-such-flag"],
        ["serve", "--device", "gpu"],
        ["serve", "--http-port", "70000"],
        ["serve", "--precision", "fp8"],
        ["serve", "--max-queue-size", "0"],
        ["serve", "--detector-score-threshold", "1.5"],
        ["serve", "--detector-nms-iou", "-0.1"],
        ["serve", "--detector-max-persons", "0"],
        ["serve", "--detector-min-box-size-px", "inf"],
        ["serve", "--detector-min-size-px", "800", "--detector-max-size-px", "600"],
        ["frobnicate"],
    ],
)
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def fake_reference(monkeypatch: pytest.MonkeyPatch, cache: Path, available: bool) -> list[Path]:
    """Replace model.reference with a stub whose cache is (or is not) complete."""
    calls: list[Path] = []
    paths = {n: cache / f"{n}.safetensors" for n in ("blazepose_full", "ssdlite_person")}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")

    def fetch(cache_dir: Path, *, force: bool = False) -> dict[str, Path]:
        calls.append(Path(cache_dir))
        return paths

    stub = types.ModuleType("model.reference")
    stub.reference_models_available = lambda cache_dir: available  # type: ignore[attr-defined]
    stub.fetch_reference_models = fetch  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "model.reference", stub)
    return calls


def test_model_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    weights = tmp_path / "s.pth"
    weights.write_bytes(b"x")
    fake_reference(monkeypatch, tmp_path / "cache", available=False)
    base = {"cache_dir": str(tmp_path / "cache")}
    with pytest.raises(cli.SetupError, match="pose-service models fetch"):
        cli.choose_model(Settings(**base))
    with pytest.raises(cli.SetupError, match="--allow-random-weights"):
        cli.choose_model(Settings(model="distilpose_s", **base))
    random = cli.choose_model(Settings(model="distilpose_s", allow_random_weights=True, **base))
    assert random.weights is None and "RANDOM" in random.summary and random.detector is None
    with pytest.raises(cli.SetupError, match="no such file"):
        cli.choose_model(Settings(weights=str(tmp_path / "missing.pth"), **base))
    with pytest.raises(cli.SetupError, match="ssdlite_person"):
        cli.choose_model(Settings(weights=str(weights), detector="ssdlite_person", **base))
    with pytest.raises(cli.SetupError, match="unknown model"):
        cli.choose_model(Settings(model="resnet", **base))
    given = cli.choose_model(Settings(weights=str(weights), **base))
    assert (given.model, given.weights, given.detector) == (None, str(weights), None)
    torchvision = Settings(
        weights=str(weights),
        detector="fasterrcnn_resnet50_fpn_v2",
        detector_weights="DEFAULT",
        **base,
    )
    assert cli.choose_model(torchvision).detector_weights == "DEFAULT"  # an enum name, not a file
    unnamed = torchvision.model_copy(update={"detector_weights": None})
    assert cli.choose_model(unnamed).detector_weights == "DEFAULT"  # published weights, not random
    with pytest.raises(cli.SetupError, match="detector-weights"):
        cli.choose_model(torchvision.model_copy(update={"detector_weights": "/no/such.pth"}))
    # A qualified torchvision weights name is a name, not a missing file.
    qualified = "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1"
    ssd = torchvision.model_copy(
        update={"detector": "ssdlite320_mobilenet_v3_large", "detector_weights": qualified}
    )
    assert cli.choose_model(ssd).detector_weights == qualified
    with pytest.raises(cli.SetupError, match="unknown detector 'yolo'"):
        cli.choose_model(torchvision.model_copy(update={"detector": "yolo"}))

    fake_reference(monkeypatch, tmp_path / "cache", available=True)
    default = cli.choose_model(Settings(**base))
    assert default.model == "blazepose_full" and default.detector == "ssdlite_person"
    assert default.weights is not None and default.weights.endswith("blazepose_full.safetensors")
    assert default.detector_weights is not None
    distil = cli.choose_model(Settings(weights=str(weights), **base))
    assert distil.model is None and distil.detector == "ssdlite_person"  # auto: best available
    plain = cli.choose_model(Settings(weights=str(weights), detector="none", **base))
    assert plain.detector is None


def test_models_fetch_calls_the_reference_module(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = fake_reference(monkeypatch, tmp_path / "c", available=False)
    assert cli.main(["models", "fetch", "--cache-dir", str(tmp_path / "c")]) == 0
    assert calls == [tmp_path / "c"]
    assert "blazepose_full:" in capsys.readouterr().out


DETECTOR_FLAGS = (
    "--detector-score-threshold",
    "0.25",
    "--detector-nms-iou",
    "0.4",
    "--detector-max-persons",
    "5",
    "--detector-min-box-size-px",
    "2.5",
    "--detector-min-size-px",
    "320",
    "--detector-max-size-px",
    "480",
)
DETECTOR_KWARGS = {
    "score_threshold": 0.25,
    "nms_iou": 0.4,
    "max_persons": 5,
    "min_box_size": 2.5,
    "min_size": 320,
    "max_size": 480,
}


def test_detector_settings_parse_from_flags_and_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    default = parse()
    assert all(getattr(default, name) is None for name in cli.DETECTOR_SETTINGS)
    given = parse(*DETECTOR_FLAGS)
    assert (given.detector_score_threshold, given.detector_nms_iou) == (0.25, 0.4)
    assert (given.detector_max_persons, given.detector_min_box_size_px) == (5, 2.5)
    assert (given.detector_min_size_px, given.detector_max_size_px) == (320, 480)
    monkeypatch.setenv("POSE_DETECTOR_SCORE_THRESHOLD", "0.6")
    monkeypatch.setenv("POSE_DETECTOR_MIN_SIZE_PX", "512")
    monkeypatch.setenv("POSE_DETECTOR_NMS_IOU", "")  # empty: unset
    from_env = parse()
    assert (from_env.detector_score_threshold, from_env.detector_min_size_px) == (0.6, 512)
    assert from_env.detector_nms_iou is None
    assert parse("--detector-score-threshold", "0.1").detector_score_threshold == 0.1  # flags win


def test_detector_setting_names_are_the_detectors_keywords() -> None:
    """The mapping follows the real signatures; the resize is torchvision's alone."""
    import inspect

    from model.detector import PersonDetector
    from model.reference import load_detector

    torchvision = set(inspect.signature(PersonDetector).parameters)
    reference = set(inspect.signature(load_detector).parameters)
    assert set(cli.DETECTOR_SETTINGS.values()) <= torchvision
    resize = {"min_size", "max_size"}
    assert set(cli.DETECTOR_SETTINGS.values()) - resize <= reference
    assert not resize & reference


def test_detector_settings_reach_build_pipeline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(serving, "build_pipeline", lambda **kw: calls.append(kw))
    fake_reference(monkeypatch, tmp_path / "cache", available=True)
    base: dict[str, object] = {"cache_dir": str(tmp_path / "cache"), "model": "distilpose_s"}
    base["allow_random_weights"] = True

    def built(*argv: str, **settings: object) -> object:
        config = parse(*argv).model_copy(update={**base, **settings})
        serving.pipeline_factory(cli.choose_model(config), config)("cpu")
        return calls[-1]["detector_settings"]

    tv = "fasterrcnn_mobilenet_v3_large_fpn"
    assert built(*DETECTOR_FLAGS, detector=tv) == DETECTOR_KWARGS
    assert built("--detector-max-persons", "3", detector=tv) == {"max_persons": 3}  # only those set
    assert built(detector=tv) == {}
    assert calls[-1]["detector"] == tv and calls[-1]["detector_weights"] == "DEFAULT"
    # The reference detector takes the same settings, less the input resize.
    reference = built(*DETECTOR_FLAGS[:8], detector="ssdlite_person")
    assert reference == {
        k: v for k, v in DETECTOR_KWARGS.items() if k not in ("min_size", "max_size")
    }
    assert calls[-1]["detector"] == "ssdlite_person"
    # torchvision's SSDlite has a square input: min_size sets its side, max_size has no meaning.
    ssd = "ssdlite320_mobilenet_v3_large"
    assert built("--detector-min-size-px", "256", detector=ssd) == {"min_size": 256}
    # No detector runs: the settings are dropped with a warning, not an error.
    caplog.set_level(logging.WARNING, logger="service")
    assert built("--detector-score-threshold", "0.3", detector="none") == {}
    assert "ignoring detector_score_threshold" in caplog.text


@pytest.mark.parametrize(
    ("detector", "flags", "named"),
    [
        ("ssdlite_person", ("--detector-min-size-px", "320"), "--detector-min-size-px"),
        ("ssdlite_person", ("--detector-max-size-px", "640"), "POSE_DETECTOR_MAX_SIZE_PX"),
        ("auto", ("--detector-min-size-px", "320"), "fixed 300x300"),  # auto: ssdlite_person
        ("ssdlite320_mobilenet_v3_large", ("--detector-max-size-px", "640"), "square"),
    ],
)
async def test_resize_settings_a_detector_lacks_stop_the_start(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    detector: str,
    flags: tuple[str, ...],
    named: str,
) -> None:
    """A clear SetupError from choose_model, before any server or worker starts."""
    fake_reference(monkeypatch, tmp_path / "cache", available=True)
    settings = parse("--detector", detector, "--cache-dir", str(tmp_path / "cache"), *flags)
    with pytest.raises(cli.SetupError, match="not a setting of the") as info:
        cli.choose_model(settings)
    assert named in str(info.value)

    with pytest.raises(cli.SetupError):
        await cli.serve(settings)


def test_detector_settings_reach_a_torchvision_detector(tmp_path: Path) -> None:
    """End to end: flags -> choose_model -> _build_pipeline -> PersonDetector over a local file."""
    import torch
    from torchvision.models import detection

    torch.manual_seed(0)
    net = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    torch.save(net.state_dict(), tmp_path / "frcnn.pth")
    settings = parse(
        "--model",
        "distilpose_s",
        "--allow-random-weights",
        "--detector",
        "fasterrcnn_mobilenet_v3_large_fpn",
        "--detector-weights",
        str(tmp_path / "frcnn.pth"),
        "--cache-dir",
        str(tmp_path / "no-cache"),
        *DETECTOR_FLAGS,
    )
    choice = cli.choose_model(settings)
    assert "min_size=320" in choice.summary
    pipeline = serving.pipeline_factory(choice, settings)("cpu")
    det = pipeline.detector  # type: ignore[attr-defined]
    assert (det.score_threshold, det.nms_iou, det.max_persons) == (0.25, 0.4, 5)
    assert det.min_box_size == 2.5
    assert (det.net.roi_heads.score_thresh, det.net.roi_heads.nms_thresh) == (0.25, 0.4)
    assert (det.net.transform.min_size, det.net.transform.max_size) == ((320,), 480)


async def test_serve_runs_http_and_grpc_on_one_loop_and_drains(
    caplog: pytest.LogCaptureFixture,
) -> None:
    warm = threading.Event()
    hold = threading.Event()
    pipeline = SlowPipeline(warmup_gate=warm, run_gate=hold)
    settings = Settings(host="127.0.0.1", http_port=0, grpc_port=0, drain_grace_s=30)
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="service")
    task = asyncio.create_task(cli.serve(settings, pipeline_factory=lambda d: pipeline, stop=stop))

    def listening() -> logging.LogRecord | None:
        return next((r for r in caplog.records if r.getMessage() == "listening"), None)

    async def bound() -> bool:
        return listening() is not None

    await wait_until(bound)
    record = listening()
    http_port, grpc_port = record.http_port, record.grpc_port  # type: ignore[union-attr]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING

    async def grpc_status() -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=""))).status

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as http:
        assert (await http.get("/livez")).status_code == 200
        assert (await http.get("/readyz")).status_code == 503  # warming up
        assert await grpc_status() != serving
        warm.set()

        async def ready() -> bool:
            return (await http.get("/readyz")).status_code == 200

        await wait_until(ready)
        assert await grpc_status() == serving
        assert gc.get_freeze_count() > 0  # the start-up heap, out of the collector's walks

        headers = {"content-type": "image/png"}
        in_flight = asyncio.create_task(http.post("/pose", content=png(), headers=headers))

        async def running() -> bool:
            return pipeline.images_run == 1

        await wait_until(running)
        stop.set()  # what SIGTERM does

        async def draining() -> bool:
            return (await http.get("/readyz")).status_code == 503

        await wait_until(draining)
        assert await grpc_status() != serving
        assert (await http.post("/pose", content=png(), headers=headers)).status_code == 503
        hold.set()
        answer = await in_flight
        assert answer.status_code == 200
    assert await asyncio.wait_for(task, 60) == 0
    await channel.close()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.index("ready") < messages.index("draining") < messages.index("stopped")


def test_logs_are_one_json_object_per_line() -> None:
    import json

    from service.json_logs import JsonLogFormatter

    record = logging.LogRecord("service.access", logging.INFO, __file__, 1, "request", None, None)
    record.request_id = "r1"
    record.status = 200
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = JsonLogFormatter().format(record)
    assert "\n" not in line  # the traceback is escaped inside the one line
    entry = json.loads(line)
    assert entry["msg"] == "request" and entry["level"] == "info"
    assert entry["logger"] == "service.access" and entry["ts"].endswith("Z")
    assert entry["request_id"] == "r1" and entry["status"] == 200
    assert "ValueError: boom" in entry["exc"]


# A real server subprocess (imports, weights, warm-up, drain): 6-37 s measured on 2 loaded cores,
# so twice the default timeout.
@pytest.mark.timeout(120)
def test_pose_service_serve_end_to_end_with_sigterm(
    distilpose_s_checkpoint: Path, tmp_path: Path
) -> None:
    """The real command in a subprocess: JSON logs, the served model, a pose, SIGTERM drains."""
    import json
    import os
    import signal
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("POSE_")}
    env["POSE_CACHE_DIR"] = str(tmp_path / "empty-cache")
    argv = [sys.executable, "-m", "service", "serve", "--weights", str(distilpose_s_checkpoint)]
    argv += ["--detector", "none", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0"]
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []
    listening = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            entry = json.loads(line)  # every line is one JSON object
            lines.append(entry)
            if entry["msg"] == "listening":
                listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert listening.wait(120), lines
        port = next(e["http_port"] for e in lines if e["msg"] == "listening")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            for _ in range(600):
                if http.get("/readyz").status_code == 200:
                    break
                threading.Event().wait(0.2)
            model = http.get("/v1/models").json()["model"]
            assert "distilpose_s" in json.dumps(model) and model["detector"] is None
            answer = http.post("/pose", content=png(), headers={"content-type": "image/png"})
            assert answer.status_code == 200 and len(answer.json()["persons"]) == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    reader.join(30)
    messages = [e["msg"] for e in lines]
    assert "serving %s" not in messages and any(m.startswith("serving ") for m in messages)
    assert messages.index("ready") < messages.index("draining") < messages.index("stopped")
    assert any(e["msg"] == "request" and e.get("path") == "/pose" for e in lines)


def test_the_startup_heap_is_frozen_without_its_garbage() -> None:
    """``freeze_startup_heap`` collects first: garbage of start-up is freed, not kept for good."""

    class Node:
        pass

    garbage = Node()
    garbage.self = garbage  # type: ignore[attr-defined]  # a cycle: only the collector frees it
    gone = weakref.ref(garbage)
    del garbage
    try:
        serving.freeze_startup_heap()
        assert gone() is None
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
