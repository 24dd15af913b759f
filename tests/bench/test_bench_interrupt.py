"""A benchmark stopped by SIGINT (``bench/gpu_check.sh``'s time box, or Ctrl-C) writes the rows it
measured so far, marked ``interrupted``, and exits 130: a step cut short on a lent GPU still brings
back its numbers. Each script runs as a real process and gets the signal as ``timeout`` sends it,
to its whole process group (the servers it started too), after its first row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.common import REPO_ROOT

WAIT_S = 90


def interrupt_after_first_row(argv: list[str], row_key: str, out_dir: Path) -> dict:
    """Run ``python -m argv``, SIGINT its process group once a progress line holds ``row_key``,
    and return its result file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSE_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", *argv, "--out-dir", str(out_dir)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group, as under timeout
    )
    try:
        deadline = time.monotonic() + WAIT_S
        assert proc.stdout is not None
        for line in proc.stdout:
            if f'"{row_key}"' in line:
                break
            assert time.monotonic() < deadline, "no row in time"
        else:
            pytest.fail(f"{argv[0]} ended before its first row (exit {proc.wait()})")
        os.killpg(proc.pid, signal.SIGINT)
        proc.stdout.read()
        assert proc.wait(WAIT_S) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    (path,) = out_dir.glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["interrupted"] is True
    return doc


def test_model_bench_writes_its_rows_when_interrupted(tmp_path: Path) -> None:
    sizes = ["1", "2", "4", "8", "16", "32", "64"]
    argv = ["bench.model", "--device", "cpu", "--models", "distilpose_s", "--batch-sizes", *sizes]
    argv += ["--precisions", "fp32", "--warmup", "0", "--repeats", "3", "--min-repeats", "1"]
    doc = interrupt_after_first_row(argv, "crops_per_s", tmp_path)
    assert 1 <= len(doc["results"]) < len(sizes)
    assert all(row["crops_per_s"] > 0 for row in doc["results"])


@pytest.mark.timeout(180)  # a service and a bare server start (10-30 s on 2 loaded cores)
def test_serve_bench_writes_its_rows_when_interrupted(tmp_path: Path) -> None:
    argv = ["bench.serve", "--device", "cpu", "--model", "identity", "--targets", "engine-http"]
    argv += ["naive-http", "--concurrency", "1", "2", "4", "8", "--duration-s", "2"]
    argv += ["--warmup-s", "0.2", "--persons-max", "1", "--no-server-warmup"]
    doc = interrupt_after_first_row(argv, "throughput_rps", tmp_path)
    assert 1 <= len(doc["results"]) < 8
    assert all(row["ok"] > 0 and row["errors"] == 0 for row in doc["results"])


@pytest.mark.timeout(180)
def test_frontend_bench_writes_its_rows_when_interrupted(tmp_path: Path) -> None:
    argv = ["bench.frontend", "--targets", "bare-fastapi", "bare-grpc", "--modes", "http-raw"]
    argv += ["grpc-unary", "--concurrency", "1", "2", "--duration-s", "1.5", "--warmup-s", "0.2"]
    doc = interrupt_after_first_row(argv, "requests_per_s", tmp_path)
    assert 1 <= len(doc["results"]) < 4
    assert all(row["requests_per_s"] > 0 for row in doc["results"])
