"""The two servers ``bench.serve`` drives, as subprocesses: the real service
(``python -m service serve``, configured through its ``POSE_*`` settings) and the naive baseline
(``bench.naive_server``); plus a scrape of the service's Prometheus batch metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import MALLOC_TUNING, REPO_ROOT

# Series read from the service's /metrics around each load level (sums and counts of histograms).
ENGINE_SERIES = (
    'pose_batch_size_sum{stage="pose"}',
    'pose_batch_size_count{stage="pose"}',
    "pose_persons_per_image_count",
    "pose_queue_wait_seconds_sum",
    "pose_queue_wait_seconds_count",
    'pose_inference_seconds_sum{stage="pose"}',
)


def free_port() -> int:
    """A currently free localhost TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server subprocess and how to reach it."""

    name: str
    command: list[str]
    env_overrides: dict[str, str]
    http_port: int
    grpc_port: int | None
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Launch the subprocess (stdout/stderr to the log file)."""
        env = {**os.environ, **self.env_overrides}
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def log_tail(self, n: int = 3000) -> str:
        """The end of the server's log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def wait_ready(self, timeout_s: float) -> float:
        """Poll ``GET /readyz`` until 200; returns the seconds it took."""
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.get(f"http://127.0.0.1:{self.http_port}/readyz")
                    if r.status_code == 200:
                        return time.monotonic() - t0
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"{self.name} not ready in {timeout_s}s:\n{self.log_tail()}")
                await asyncio.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM (the service drains), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def shared_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment both servers get: ``--malloc-tuning`` and ``--server-env``."""
    env = dict(MALLOC_TUNING) if args.malloc_tuning else {}
    for kv in args.server_env:
        key, _, value = kv.partition("=")
        env[key] = value
    return env


def engine_server(args: argparse.Namespace, log_dir: Path, backend: str | None = None) -> Server:
    """``python -m service serve`` configured by ``POSE_*`` settings (the documented interface);
    with ``backend``, on that backend (``POSE_BACKEND``, over any ``--engine-env``), named
    ``engine-<backend>``."""
    http_port, grpc_port = free_port(), free_port()
    env = {
        **shared_env(args),
        "POSE_MODEL": args.model,
        "POSE_DETECTOR": "none",
        "POSE_DEVICE": args.device,
        "POSE_HOST": "127.0.0.1",
        "POSE_HTTP_PORT": str(http_port),
        "POSE_GRPC_PORT": str(grpc_port),
        "POSE_FLIP_TEST": "false" if args.no_flip_test else "true",
        "POSE_PRECISION": args.precision,
        "POSE_STREAM_WINDOW": str(args.window),
        "POSE_LOG_LEVEL": "warning",
        "POSE_MAX_QUEUE_SIZE": str(max(128, 2 * max(args.concurrency))),
        "POSE_REQUEST_TIMEOUT_MS": str(int(args.timeout_s * 1000)),
    }
    if args.weights:
        env["POSE_WEIGHTS"] = args.weights
    else:
        env["POSE_ALLOW_RANDOM_WEIGHTS"] = "true"
    for kv in args.engine_env:
        key, _, value = kv.partition("=")
        env[key] = value
    if args.no_server_warmup:
        env["POSE_WARMUP"] = "false"
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    name = "engine"
    if backend is not None:
        env["POSE_BACKEND"] = backend
        name = f"engine-{backend}"
    command = [sys.executable, "-m", "service", "serve"]
    return Server(name, command, env, http_port, grpc_port, log_dir / f"{name}.log")


def naive_server(args: argparse.Namespace, log_dir: Path) -> Server:
    """``python -m bench.naive_server`` with the same model, device and flip setting."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "bench.naive_server",
        "--model",
        args.model,
        "--device",
        args.device,
        "--port",
        str(port),
        "--mode",
        args.naive_mode,
        "--precision",
        args.precision,
    ]
    if args.weights:
        command += ["--weights", args.weights]
    if args.no_flip_test:
        command.append("--no-flip-test")
    if args.no_server_warmup:
        command.append("--no-warmup")
    if args.threads:
        command += ["--threads", str(args.threads)]
    return Server("naive", command, shared_env(args), port, None, log_dir / "naive.log")


async def scrape_engine(port: int) -> dict[str, float]:
    """The ``ENGINE_SERIES`` values from the service's ``GET /metrics`` ({} if unreachable)."""
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in ENGINE_SERIES:
            values[name] = float(value)
    return values


def batching_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the engine did between two scrapes: batches, images and crops per batch, queue wait."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ENGINE_SERIES}
    batches = d['pose_batch_size_count{stage="pose"}']
    waits = d["pose_queue_wait_seconds_count"]
    return {
        "batches": batches,
        "images_per_batch": d["pose_persons_per_image_count"] / batches if batches else 0.0,
        "crops_per_batch": d['pose_batch_size_sum{stage="pose"}'] / batches if batches else 0.0,
        "queue_wait_ms_mean": 1000.0 * d["pose_queue_wait_seconds_sum"] / waits if waits else 0.0,
        "pose_compute_s": d['pose_inference_seconds_sum{stage="pose"}'],
    }
