"""Smoke runs of every benchmark script on the CPU with tiny settings, so the harness cannot rot.

Nothing here asserts on timing: each script must run end to end and write a well-formed result
file (schema, environment, command line, one row per configuration).
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import (
    batch_queue,
    cpu_quota,
    decode,
    engine_cycle,
    frontend,
    frontend_load,
    gc_pause,
    grpc_app,
    http_app,
    ipc,
    model,
    pipeline,
    report,
    serve,
)
from bench.common import (
    ResourceSampler,
    percentile,
    person_boxes,
    process_tree,
    summarize_ms,
    synthetic_jpeg,
)

# Tiny settings: one or two configurations each, one timed repeat, short serving levels (1.5 s:
# long enough for answers to complete inside the window on 2 loaded cores, ~0.75 s each there).
MODEL_FLAGS = (
    "--models distilpose_s --batch-sizes 1 2 --flip both --precisions fp32 bf16 "
    "--warmup 0 --repeats 1"
)
DECODE_FLAGS = "--images 2 --width 64 --height 48 --workers 1 2 --repeats 1 --warmup 0"
PIPELINE_FLAGS = (
    "--persons 1 2 --images-per-call 1 --flip on --detectors "
    "ssdlite320_mobilenet_v3_large --detector-images-per-call 1 --width 96 --height "
    "72 --reallike-persons 2 --warmup 0 --repeats 1 --min-repeats 1"
)
SERVE_FLAGS = (
    "--concurrency 2 --duration-s 1.5 --warmup-s 0.3 --persons-max 2 --window 2 --no-server-warmup"
)


def _argv(out_dir: Path, flags: str) -> list[str]:
    return [*flags.split(), "--out-dir", str(out_dir)]


def _load_one(out_dir: Path, part: str) -> dict[str, Any]:
    files = sorted(out_dir.glob(f"{part}-cpu-*.json"))
    assert len(files) == 1, files
    doc = json.loads(files[0].read_text())
    assert doc["schema"] == 1
    assert doc["part"] == part
    env = doc["env"]
    for key in ("device", "torch", "torchvision", "cpu_model", "cpu_count", "command"):
        assert env[key] not in (None, ""), key
    assert env["device"] == "cpu"
    assert isinstance(doc["results"], list) and doc["results"]
    _assert_finite(doc)
    assert report.render(files[0]).startswith(f"### {part}")
    return doc


def _assert_finite(value: Any) -> None:
    if isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, dict):
        for v in value.values():
            _assert_finite(v)
    elif isinstance(value, list):
        for v in value:
            _assert_finite(v)


def test_statistics_helpers() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    stats = summarize_ms([0.001, 0.002, 0.003])
    assert stats["median_ms"] == pytest.approx(2.0) and stats["n"] == 3
    boxes = person_boxes(640, 480, 4, seed=0, anchor=(10.0, 20.0, 100.0, 200.0))
    assert boxes.shape == (4, 5)
    assert boxes[0, :4].tolist() == pytest.approx([10.0, 20.0, 100.0, 200.0])
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 640).all())
    assert synthetic_jpeg(32, 24, seed=1)[:2] == b"\xff\xd8"


def test_resources_of_a_process_tree_count_its_children() -> None:
    """A service with front ends is a tree (supervisor, engine, front ends): sampled as its tree,
    the busy child's CPU counts; sampled as the supervisor's pid alone, it would not."""
    spin = "import time\nend = time.monotonic() + 20\nwhile time.monotonic() < end: pass"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while len(tree := process_tree(parent.pid)) < 2:
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.05)
        with ResourceSampler({"tree": tree, "alone": parent.pid}, gpu=False, interval_s=0.1) as s:
            time.sleep(1.0)
        summary = s.summary()
    finally:
        for pid in reversed(process_tree(parent.pid)):
            subprocess.run(["kill", str(pid)], check=False)
        parent.wait()
    assert summary["tree"]["cpu_pct_mean"] > 30, summary  # a spinning core, on 2 busy cores
    assert summary["alone"]["cpu_pct_mean"] < 10, summary
    assert summary["tree"]["rss_mib_max"] > summary["alone"]["rss_mib_max"]


def test_engine_vs_naive_comparison_pairs_rows() -> None:
    rows = [
        {
            "round": 0,
            "concurrency": 4,
            "target": "naive-http",
            "server": "naive",
            "throughput_rps": 10.0,
            "p50_ms": 100.0,
            "p99_ms": 300.0,
        },
        {
            "round": 0,
            "concurrency": 4,
            "target": "engine-http",
            "server": "engine",
            "throughput_rps": 25.0,
            "p50_ms": 80.0,
            "p99_ms": 150.0,
        },
    ]
    (comp,) = serve.comparisons(rows)
    assert comp["throughput_ratio"] == pytest.approx(2.5)
    assert comp["p99_over_naive_p50"] == pytest.approx(1.5)


def test_model_bench_smoke(tmp_path: Path) -> None:
    args = model.parse_args(_argv(tmp_path, MODEL_FLAGS))
    model.run(args)
    doc = _load_one(tmp_path, "model")
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {(r["batch"], r["flip"]) for r in ok} == {(1, False), (2, False), (1, True), (2, True)}
    assert all(r["crops_per_s"] > 0 and r["forward_batch"] >= r["batch"] for r in ok)
    assert doc["skipped"] and doc["skipped"][0]["precision"] == "bf16"  # CPU runs fp32 only


def test_decode_bench_smoke(tmp_path: Path) -> None:
    args = decode.parse_args(_argv(tmp_path, DECODE_FLAGS))
    decode.run(args)
    doc = _load_one(tmp_path, "decode")
    decoders = {r["decoder"] for r in doc["results"]}
    assert {"pil", "torchvision_cpu"} <= decoders
    assert all(r["images_per_s"] > 0 for r in doc["results"])


def test_ipc_bench_smoke(tmp_path: Path) -> None:
    assert ipc.main(["--messages", "200", "--inflight", "1", "4", "--rounds", "1", "--out-dir",
                     str(tmp_path)]) == 0  # fmt: skip
    doc = _load_one(tmp_path, "ipc")
    socket = [r for r in doc["results"] if r["transport"] == "socket"]
    assert [r["inflight"] for r in socket] == [1, 4]
    assert all(r["messages"] == 200 and r["client_us"] >= 0 for r in socket)


def test_engine_cycle_bench_smoke(tmp_path: Path) -> None:
    # The service's own engine process on the identity model, driven over its socket.
    argv = ["--bursts", "1", "4", "--jobs", "40", "--rounds", "1", "--out-dir", str(tmp_path)]
    assert engine_cycle.main(argv) == 0
    doc = _load_one(tmp_path, "engine_cycle")
    rows = doc["results"]
    expected = [(1, False), (4, False), (1, True), (4, True)]
    assert [(r["burst"], r["eager"]) for r in rows] == expected
    assert all(r["cycles"] == 40 // r["burst"] and r["jobs_per_s"] > 0 for r in rows)
    assert [f["eager"] for f in doc["fit"]] == [False, True]
    assert "fixed us per cycle" in report.render(next(tmp_path.glob("engine_cycle-cpu-*.json")))


def test_batch_queue_bench_smoke(tmp_path: Path) -> None:
    argv = ["--cases", "8:1:4", "20:20:8", "--rounds", "5", "--out-dir", str(tmp_path)]
    assert batch_queue.main(argv) == 0
    doc = _load_one(tmp_path, "batch_queue")
    assert [(r["queued"], r["sources"], r["batch"]) for r in doc["results"]] == [
        (8, 1, 4),
        (20, 20, 8),
    ]
    assert all(r["rounds"] == 5 and r["us_per_batch_median"] > 0 for r in doc["results"])
    assert "us per batch (median)" in report.render(next(tmp_path.glob("batch_queue-cpu-*.json")))
    with pytest.raises(SystemExit):
        batch_queue.main(["--cases", "8:0:4"])


def test_frontend_bench_passes_service_args(tmp_path: Path) -> None:
    # The real command on the identity model, with one more flag; a flag the command does not
    # know would stop it before it is ready (and the bench with it).
    argv = ["--targets", "service-1", "--modes", "http-raw", "--concurrency", "1",
            "--duration-s", "0.5", "--warmup-s", "0.2", "--service-args=--no-access-log",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert frontend.main(argv) == 0
    doc = _load_one(tmp_path, "frontend")
    assert doc["args"]["service_args"] == "--no-access-log"
    (row,) = doc["results"]
    assert row["target"] == "service-1" and row["answered"] > 0 and not row["not_ok"]
    with pytest.raises(RuntimeError, match="exited"):
        frontend.start_target("service-1", tmp_path, service_args=["--no-such-flag"])


# LitServe starts three processes (API server, worker, its queues' manager): about 5 s here.
@pytest.mark.timeout(120)
def test_frontend_bench_runs_litserve_and_leaves_no_process(tmp_path: Path) -> None:
    # LitServe is a dev extra, so a default run includes it; its API server and worker outlive
    # a SIGTERM to their parent, and once did into the next target's run.
    assert "litserve" in frontend.default_targets()
    target = frontend.start_target("litserve", tmp_path)
    tree = target.tree_pids()
    try:
        assert len(tree) >= 3 and target.modes == ("http-json",)
        row = asyncio.run(frontend.run_level(target, "http-json", 2, 0.5, 0.3, 1))
    finally:
        target.stop()
    assert row["answered"] > 0 and not row["not_ok"], row
    assert row["processes"] == len(tree) and row["server_cpu_ms_per_request"] > 0
    assert not [pid for pid in tree if frontend._alive(pid)]


def test_the_model_report_keeps_one_row_per_backend() -> None:
    # (Rows of a --backends run once collapsed into one, the last backend's.)
    def row(backend: str, crops: float) -> dict[str, Any]:
        return {"model": "distilpose_s", "backend": backend, "mode": "eager", "precision": "fp32",
                "flip": False, "batch": 1, "status": "ok", "crops_per_s": crops,
                "median_ms": 1000.0 / crops}  # fmt: skip

    text = report.model_tables({"results": [row("torch", 30.0), row("openvino", 50.0)]})
    lines = [line for line in text.splitlines() if line.startswith("| distilpose_s")]
    assert [line.split(" | ")[1] for line in lines] == ["torch", "openvino"]
    assert "30.0" in lines[0] and "50.0" in lines[1]


def test_frontend_load_refuses_an_unknown_mode() -> None:
    # ("grpc" once ran streams silently: any mode that was not HTTP or "grpc-unary" did.)
    stop = asyncio.Event()
    stop.set()  # (a mode that were accepted would return at once, not hang)
    with pytest.raises(ValueError, match="unknown mode 'grpc'"):
        asyncio.run(frontend_load.generate(None, 1, "grpc", 1, 1, stop, {}))
    with pytest.raises(SystemExit):
        frontend_load.main(["--grpc-port", "1", "--mode", "grpc", "--concurrency", "1"])


def test_fit_line() -> None:
    assert engine_cycle.fit_line([(1, 300.0), (2, 340.0), (4, 420.0)]) == pytest.approx((260, 40))
    assert engine_cycle.fit_line([(4, 400.0), (4, 420.0)]) == (0.0, 102.5)  # one x: no fixed part


# 16 s alone on 2 cores (three detectors built and timed): double the default for a loaded machine.
@pytest.mark.timeout(120)
def test_pipeline_bench_smoke(tmp_path: Path) -> None:
    args = pipeline.parse_args(_argv(tmp_path, PIPELINE_FLAGS))
    pipeline.run(args)
    doc = _load_one(tmp_path, "pipeline")
    sections = {r["section"] for r in doc["results"]}
    assert "caller_boxes" in sections
    cb = [r for r in doc["results"] if r["section"] == "caller_boxes"]
    assert len(cb) == 2 and all(r["images_per_s"] > 0 for r in cb)
    assert not doc["skipped"], doc["skipped"]
    assert {"detector_only", "detector_pipeline_raw", "detector_pipeline_reallike"} <= sections


# 18-30 s on 2 cores (two server subprocesses start, four targets run): twice the default.
@pytest.mark.timeout(120)
async def test_serve_bench_smoke(tmp_path: Path) -> None:
    args = serve.parse_args(_argv(tmp_path, SERVE_FLAGS))
    await serve.run_async(args)
    doc = _load_one(tmp_path, "serve")
    targets = {r["target"] for r in doc["results"]}
    assert targets == set(serve.ALL_TARGETS)
    for row in doc["results"]:
        assert row["errors"] == 0, row["error_samples"]
        # Two clients never fill the queue, and every target answers within the measured time.
        assert row["refused"] == 0 and row["ok"] > 0, row
        assert row["throughput_rps"] == pytest.approx(row["ok"] / row["measured_s"])
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert "engine" in row["resources"] and "naive" in row["resources"]
    assert {c["target"] for c in doc["comparisons"]} == {
        "engine-http",
        "engine-grpc",
        "engine-stream",
    }


@pytest.mark.parametrize(
    ("bench", "argv", "modes", "targets"),
    [
        (
            http_app,
            ["--modes", "raw", "json"],
            ("raw", "json"),
            ("service", "service-quiet", "bare"),
        ),
        # (grpc_app checks each call's answer itself: three persons, no error.)
        (grpc_app, ["--window", "4"], ("unary", "stream"), ("service", "service-inline", "bare")),
    ],
    ids=["http_app", "grpc_app"],
)
def test_app_bench_smoke(
    tmp_path: Path, bench: Any, argv: list[str], modes: tuple[str, ...], targets: tuple[str, ...]
) -> None:
    part = bench.__name__.rsplit(".", 1)[1]
    base = ["--requests", "64", "--rounds", "1", "--concurrency", "4", "--out-dir", str(tmp_path)]
    assert bench.main([*base, *argv]) == 0
    doc = _load_one(tmp_path, part)
    assert [(r["target"], r["mode"]) for r in doc["results"]] == [
        (target, mode) for mode in modes for target in targets
    ]
    assert all(r["cpu_ms_per_request_median"] > 0 for r in doc["results"])
    assert "ratio to bare" in report.render(next(tmp_path.glob(f"{part}-cpu-*.json")))


@pytest.mark.skipif(
    cpu_quota.cpu_hierarchy() is None, reason="needs a writable cgroup v1 cpu hierarchy"
)
def test_cpu_quota_bench_smoke(tmp_path: Path) -> None:
    # Each case in its own child process in its own cgroup, limited to 1 CPU by the kernel.
    argv = ["--model", "identity", "--seconds", "0.3", "--rounds", "1", "--out-dir", str(tmp_path)]
    assert cpu_quota.main(argv) == 0
    rows = _load_one(tmp_path, "cpu_quota")["results"]
    assert [r["case"] for r in rows] == ["torch-default", "fitted"]
    assert all(r["quota_cpus"] == 1.0 and r["images_per_s_median"] > 0 for r in rows)
    assert rows[1]["threads"] == 1  # the limit, as the service sets it
    assert rows[0]["threads"] == rows[0]["default_threads"]
    assert "throttled s" in report.render(next(tmp_path.glob("cpu_quota-cpu-*.json")))
    hierarchy = cpu_quota.cpu_hierarchy()
    assert hierarchy is not None and not list(hierarchy.glob("bench-cpu-quota-*"))  # none left


def test_gc_pause_bench_smoke(tmp_path: Path) -> None:
    assert gc_pause.main(["--models", "identity", "--out-dir", str(tmp_path)]) == 0
    (row,) = _load_one(tmp_path, "gc_pause")["results"]
    assert row["objects_frozen"] > 0 and len(row["full_collection_ms_frozen"]) == 3
    assert "after freezing" in report.render(next(tmp_path.glob("gc_pause-cpu-*.json")))
