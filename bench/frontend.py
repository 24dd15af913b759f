"""What one request costs the serving path: ``pose-service serve --model identity`` with 1 and 2
front ends against a bare FastAPI route and a bare ``grpc.aio`` servicer (``bench.bare_servers``),
and LitServe batching the same route (JSON only; the target runs where ``litserve`` is installed,
as the dev extras install it).

The identity model computes nothing (caller boxes back as persons), so every CPU second the
server spends is plumbing: HTTP or gRPC parsing, decoding a 64x48 JPEG, validation, IPC to the
engine process, batching, serialisation, metrics, the access log. The figure is **server CPU per
answered request**, summed over the server's whole process tree and read from ``/proc`` (so it
does not depend on how fast the load generator is), plus the engine process's own share and
requests/s (which do depend on it: the load generator shares the machine). Each target's start-up
is recorded too: seconds from the command to ready, and the memory (RSS, PSS) of each process.

The load generator is lean on purpose: HTTP requests are pre-built bytes written on keep-alive
asyncio streams, gRPC goes through ``grpc.aio`` (unary calls; a stream keeps ``--window`` frames in
flight). Closed loop, ``--concurrency`` callers, by default from this one process over one gRPC
channel: one connection, so one front end of a multi-front-end service takes every gRPC call.
``--load-processes P`` splits the callers over P processes (``bench.frontend_load``; several
clients: one Python process caps near 3,000 gRPC calls/s a core, far below a GPU machine's front
ends) and ``--grpc-channels K`` opens K channels in each, each its own connection, which
SO_REUSEPORT spreads over the front ends. On this project's 2-core machine the defaults (1 and 1)
keep the load generator off the server's cores; the GPU check uses 4 and 4.

``--models identity distilpose_s --weights W --precision bf16`` runs the service targets once per
model (the baselines once): on a GPU, the identity model shows the plumbing's ceiling and a real
model where the device stops requests/s from growing with front ends (``bench/gpu_check.sh``).

    python -m bench.frontend --duration-s 6 --concurrency 1 16 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    INTERRUPTED_EXIT,
    REPO_ROOT,
    cpu_seconds,
    environment,
    process_tree,
    rows_so_far,
    write_result,
)
from bench.frontend_load import MODES, generate
from bench.servers import free_port

TARGETS = ("service-1", "service-2", "bare-fastapi", "bare-grpc", "litserve")  # service-N: N >= 1


def default_targets() -> list[str]:
    """Every target, LitServe only where it is installed (a dev extra)."""
    installed = importlib.util.find_spec("litserve") is not None
    return [t for t in TARGETS if t != "litserve" or installed]


def target_name(value: str) -> str:
    """argparse type: a known target or ``service-N``."""
    if value in TARGETS or (value.startswith("service-") and value[8:].isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"{value}: one of {', '.join(TARGETS)} or service-N")


# --------------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    process: subprocess.Popen[bytes]
    http_port: int | None
    grpc_port: int | None
    log: Path
    engine_pid: int | None = None
    modes: tuple[str, ...] = field(default=MODES)
    ready_path: str = "/readyz"
    ready_s: float = 0.0  # from the command's start to ready (every front end, for the service)

    def tree_pids(self) -> list[int]:
        """The server process and all its descendants, now."""
        return process_tree(self.process.pid)

    def start_up(self) -> dict[str, Any]:
        """Time to ready, and the memory of each process of the tree now: RSS, and PSS (shared
        pages such as torch's libraries split between the processes that map them), in MB."""
        processes = []
        for pid in self.tree_pids():
            try:
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            except OSError:
                continue
            kb = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:]}
            processes.append({"pid": pid, "rss_mb": kb["Rss"] / 1024, "pss_mb": kb["Pss"] / 1024})
        return {
            "target": self.name,
            "ready_s": self.ready_s,
            "pss_mb": sum(p["pss_mb"] for p in processes),
            "processes": processes,
        }

    def stop(self) -> None:
        """SIGTERM, then whatever of the tree outlived its root (LitServe's API server and
        worker do) is terminated too: nothing of a target survives into the next one's run."""
        tree = self.tree_pids()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        survivors = [pid for pid in tree if pid != self.process.pid and _alive(pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in survivors:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while survivors and time.monotonic() < deadline:
                time.sleep(0.05)
                survivors = [pid for pid in survivors if _alive(pid)]
            if not survivors:
                return


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (not a zombie: a reaped-later child counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_target(
    name: str,
    log_dir: Path,
    device: str = "cpu",
    service_args: Sequence[str] = (),
    model_args: Sequence[str] = ("--model", "identity"),
) -> Target:
    """Start one target and wait until it is ready. A service target serves the model of
    ``model_args`` (``pose-service serve`` flags: ``--model``, and ``--weights``/``--precision``
    for a real one); ``service_args`` come last, so they win."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSE_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log = log_dir / f"{name}-{len(list(log_dir.glob(f'{name}*.log')))}.log"
    http_port: int | None = free_port()
    grpc_port: int | None = free_port()
    modes: tuple[str, ...]
    if name.startswith("service-"):
        command = [
            sys.executable, "-m", "service", "serve", *model_args,
            "--frontends", name.split("-")[1], "--host", "127.0.0.1",
            "--http-port", str(http_port), "--grpc-port", str(grpc_port),
            "--max-queue-size", "1024", "--device", device, *service_args,
        ]  # fmt: skip
        modes = MODES
    elif name == "bare-fastapi":
        command = [sys.executable, "-m", "bench.bare_servers", "http", str(http_port)]
        grpc_port, modes = None, ("http-raw", "http-json")
    elif name == "bare-grpc":
        command = [sys.executable, "-m", "bench.bare_servers", "grpc", str(grpc_port)]
        http_port, modes = None, ("grpc-unary", "grpc-stream")
    elif name == "litserve":
        command = [sys.executable, "-m", "bench.bare_servers", "litserve", str(http_port)]
        grpc_port, modes = None, ("http-json",)
    else:
        raise ValueError(f"unknown target {name}")
    t0 = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    ready_path = "/health" if name == "litserve" else "/readyz"
    target = Target(name, process, http_port, grpc_port, log, modes=modes, ready_path=ready_path)
    _wait_ready(target)
    target.ready_s = time.monotonic() - t0
    if name.startswith("service-") and name != "service-1":
        time.sleep(1.0)  # both front ends listening (ready means all are)
        for line in log.read_text().splitlines():
            if '"processes started"' in line:
                target.engine_pid = json.loads(line)["engine_pid"]
    return target


def _wait_ready(target: Target, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if target.process.poll() is not None:
            raise RuntimeError(f"{target.name} exited:\n{target.log.read_text()[-3000:]}")
        try:
            if target.http_port is not None:
                url = f"http://127.0.0.1:{target.http_port}{target.ready_path}"
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            else:
                import grpc

                with grpc.insecure_channel(f"127.0.0.1:{target.grpc_port}") as channel:
                    grpc.channel_ready_future(channel).result(timeout=2)
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{target.name} not ready:\n{target.log.read_text()[-3000:]}")


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------


class LoadProcesses:
    """``processes`` load processes (``python -m bench.frontend_load``) sharing ``concurrency``
    (as evenly as they can; never more processes than callers): several clients, each with its
    own connections and, for gRPC, its own channels, so that SO_REUSEPORT spreads them over the
    front ends, and so that one Python process does not cap the requests/s a many-core machine
    can serve."""

    def __init__(
        self,
        target: Target,
        mode: str,
        concurrency: int,
        window: int,
        processes: int,
        grpc_channels: int = 1,
    ) -> None:
        count = max(1, min(processes, concurrency))
        shares = [concurrency // count + (i < concurrency % count) for i in range(count)]
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        self._processes: list[subprocess.Popen[bytes]] = []
        for share in shares:
            command = [
                sys.executable, "-m", "bench.frontend_load", "--mode", mode,
                "--concurrency", str(share), "--window", str(window),
                "--grpc-channels", str(grpc_channels),
            ]  # fmt: skip
            if target.http_port is not None:
                command += ["--http-port", str(target.http_port)]
            if target.grpc_port is not None:
                command += ["--grpc-port", str(target.grpc_port)]
            self._processes.append(
                subprocess.Popen(
                    command, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
                )
            )
        for process in self._processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != b"started":
                self.stop()
                raise RuntimeError("a load process exited before it started")

    def _ask(self, command: bytes) -> dict[str, int]:
        """Send ``command`` to every process; their counts, summed (of those still answering)."""
        for process in self._processes:
            assert process.stdin is not None
            try:
                process.stdin.write(command + b"\n")
                process.stdin.flush()
            except OSError:
                pass  # (exited already)
        total: dict[str, int] = {}
        for process in self._processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            for key, value in (json.loads(line) if line else {}).items():
                total[key] = total.get(key, 0) + value
        return total

    def counts(self) -> dict[str, int]:
        """Every process's outcomes so far, summed."""
        return self._ask(b"counts")

    def stop(self) -> dict[str, int]:
        """Stop every process; their outcomes, summed."""
        total = self._ask(b"stop")
        for process in self._processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return total


async def run_level(
    target: Target,
    mode: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    window: int,
    load_processes: int = 1,
    grpc_channels: int = 1,
) -> dict[str, Any]:
    """One measurement: load for ``warmup_s``, then ``duration_s`` counted (``load_processes``
    and ``grpc_channels``: see ``LoadProcesses`` and ``generate``)."""
    counts: dict[str, int] = {}
    stop = asyncio.Event()
    loaders: LoadProcesses | None = None
    load: asyncio.Task[None] | None = None
    if load_processes > 1:
        loaders = LoadProcesses(target, mode, concurrency, window, load_processes, grpc_channels)
    else:
        args = (target.http_port, target.grpc_port, mode, concurrency, window, stop, counts)
        load = asyncio.create_task(generate(*args, grpc_channels=grpc_channels))

    def snapshot() -> dict[str, int]:
        return loaders.counts() if loaders is not None else dict(counts)

    await asyncio.sleep(warmup_s)
    pids = target.tree_pids()
    ok0, cpu0, sys0 = (
        snapshot().get("ok", 0),
        cpu_seconds(pids),
        cpu_seconds(pids, system_only=True),
    )
    engine0 = cpu_seconds([target.engine_pid]) if target.engine_pid else 0.0
    t0 = time.monotonic()
    await asyncio.sleep(duration_s)
    cpu1, sys1 = cpu_seconds(pids), cpu_seconds(pids, system_only=True)
    ok1 = snapshot().get("ok", 0)
    engine1 = cpu_seconds([target.engine_pid]) if target.engine_pid else 0.0
    seconds = time.monotonic() - t0
    if loaders is not None:
        counts = loaders.stop()
    else:
        stop.set()
        assert load is not None
        await load
    answered = ok1 - ok0
    return {
        "target": target.name,
        "mode": mode,
        "concurrency": concurrency,
        "load_processes": max(1, min(load_processes, concurrency)),
        "grpc_channels": grpc_channels if mode.startswith("grpc") else None,
        "answered": answered,
        "requests_per_s": answered / seconds,
        "server_cpu_ms_per_request": 1000.0 * (cpu1 - cpu0) / answered if answered else None,
        "kernel_share": (sys1 - sys0) / (cpu1 - cpu0) if cpu1 > cpu0 else None,
        "engine_cpu_ms_per_request": (
            1000.0 * (engine1 - engine0) / answered if answered and target.engine_pid else None
        ),
        "processes": len(pids),
        "not_ok": {k: v for k, v in counts.items() if k != "ok"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--targets",
        nargs="+",
        default=default_targets(),
        type=target_name,
        help="default: all (litserve where it is installed)",
    )
    parser.add_argument("--device", default="cpu", help="the service's device (POSE_DEVICE)")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["identity"],
        help="the service targets run once per model (the baselines once): identity measures "
        "the plumbing, a real model (e.g. distilpose_s, with --weights) the device's limit too",
    )
    parser.add_argument("--weights", help="the weights of the real models (pose-service serve)")
    parser.add_argument("--precision", help="their precision, e.g. bf16 (pose-service serve)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--window", type=int, default=16, help="frames in flight per stream")
    parser.add_argument(
        "--load-processes",
        type=int,
        default=1,
        help="load-generator processes sharing the concurrency (each its own client: its own "
        "connections and gRPC channels); more than 1 where cores are to spare",
    )
    parser.add_argument(
        "--grpc-channels",
        type=int,
        default=1,
        help="gRPC channels per load process, each its own connection (so its own front end)",
    )
    parser.add_argument(
        "--service-args",
        default="",
        help="more `pose-service serve` flags for the service targets, one string, given with "
        "'=' (e.g. --service-args=--no-access-log)",
    )
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    service_args = shlex.split(args.service_args)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-frontend-"))
    env = environment(args.device)
    rows: list[dict[str, Any]] = []
    start_up: list[dict[str, Any]] = []
    stopped: dict[str, Any] = {}
    runs = [
        (name, model)
        for model in args.models
        for name in args.targets
        if name.startswith("service-") or model == args.models[0]
    ]
    with rows_so_far(stopped):
        for name, model in runs:
            service = name.startswith("service-")
            model_args = ["--model", model]
            if model != "identity":
                model_args += ["--weights", args.weights] if args.weights else []
                model_args += ["--precision", args.precision] if args.precision else []
            target = start_target(name, log_dir, args.device, service_args, model_args)
            start_up.append({**target.start_up(), "model": model if service else None})
            print(json.dumps(start_up[-1]), flush=True)
            try:
                for mode in [m for m in args.modes if m in target.modes]:
                    for concurrency in args.concurrency:
                        row = asyncio.run(
                            run_level(
                                target,
                                mode,
                                concurrency,
                                args.duration_s,
                                args.warmup_s,
                                args.window,
                                args.load_processes,
                                args.grpc_channels,
                            )
                        )
                        rows.append({**row, "model": model if service else None})
                        print(json.dumps(rows[-1]), flush=True)
            finally:
                target.stop()
    path = write_result(
        "frontend",
        args.device,
        args,
        rows,
        out_dir=args.out_dir,
        env=env,
        extra={"start_up": start_up, **stopped},
    )
    print(f"wrote {path}", flush=True)
    return INTERRUPTED_EXIT if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
