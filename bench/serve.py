"""End-to-end serving benchmark: a closed-loop load generator against the real service and, in the
same run, against the naive baseline server (``bench.naive_server``).

It starts ``python -m service serve`` (the ``pose-service serve`` command: DistilPose-S with random
weights, no detector, caller boxes) and ``python -m bench.naive_server`` (same pipeline, batch 1, no
engine) as subprocesses, then for every concurrency level sends real JPEGs (``bench/assets``) with
1..4 caller boxes each over

- ``engine-http``: HTTP ``POST /v1/pose`` (multipart: image + boxes), httpx async;
- ``engine-grpc``: gRPC unary ``Estimate``;
- ``engine-stream``: gRPC ``StreamEstimate``, ``ceil(C / window)`` streams of up to ``window``
  frames in flight each (C frames in flight in all);
- ``naive-http``: the naive server, same HTTP body as ``engine-http``;

and reports throughput, p50/p95/p99 latency, refusals (HTTP 429 / RESOURCE_EXHAUSTED, apart from
other errors), process RSS and CPU% (and GPU utilisation/memory on CUDA) sampled during each level,
and per level the engine/naive throughput ratio and engine p99 / naive p50.

``--backends torch openvino`` starts one service per backend (``POSE_BACKEND``) and runs each engine
target on every backend back to back, in the reverse order on odd rounds, so that a change of load
from other jobs hits every backend alike; the idle services stay up (their CPU% is sampled). Rows
carry ``backend``, ``answers`` keeps the model description one answer of each service gave (a
service that does not report the backend it was asked for is an error), and ``backend_comparisons``
gives each backend's ratio to ``torch`` measured beside it, also printed at the end.

    python -m bench.serve                                   # CPU: concurrency 1 4 16 64
    python -m bench.serve --device cuda --concurrency 1 4 16 64 128 256 --duration-s 20
    python -m bench.serve --targets engine-http --backends torch openvino --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import (
    INTERRUPTED_EXIT,
    ResourceSampler,
    add_common_args,
    dump_json_line,
    environment,
    process_tree,
    rows_so_far,
    write_result,
)
from bench.loadgen import (
    Payload,
    Tally,
    build_payloads,
    grpc_stream_level,
    grpc_unary_level,
    http_level,
    level_stats,
)
from bench.servers import Server, batching_stats, engine_server, naive_server, scrape_engine
from model.backends import BACKENDS

ALL_TARGETS = ["engine-http", "engine-grpc", "engine-stream", "naive-http"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--model", default="distilpose_s")
    p.add_argument("--weights", default=None, help="weights file (default: random weights)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--targets", nargs="+", default=ALL_TARGETS, choices=ALL_TARGETS)
    p.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per level")
    p.add_argument(
        "--warmup-s",
        type=float,
        default=2.0,
        help="unmeasured seconds per level; the warm-up also lasts until every client has had "
        "one answer (steady state), at most --max-warmup-s",
    )
    p.add_argument("--max-warmup-s", type=float, default=120.0)
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole matrix")
    p.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=None,
        help="one service per backend (POSE_BACKEND), engine targets interleaved across them; "
        "default: one service, the service's own backend setting",
    )
    p.add_argument("--persons-min", type=int, default=1)
    p.add_argument("--persons-max", type=int, default=4)
    p.add_argument("--no-flip-test", action="store_true", help="default: flip test on (both)")
    p.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="both servers (CUDA)"
    )
    p.add_argument("--window", type=int, default=8, help="StreamEstimate frames in flight")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per-request client timeout")
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--naive-mode", choices=["lock", "threads"], default="lock")
    p.add_argument(
        "--engine-env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra POSE_* settings for the service, e.g. POSE_MAX_BATCH_SIZE=32",
    )
    p.add_argument(
        "--server-env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="environment for both servers (e.g. allocator settings)",
    )
    p.add_argument(
        "--malloc-tuning",
        action="store_true",
        help="both servers keep freed memory in the heap (glibc MALLOC_* settings, see "
        "bench.common.MALLOC_TUNING)",
    )
    p.add_argument("--sample-interval-s", type=float, default=0.25)
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' log files")
    p.add_argument(
        "--no-server-warmup", action="store_true", help="skip the servers' warm-up (smoke runs)"
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Orchestration


async def run_level(
    target: str,
    concurrency: int,
    args: argparse.Namespace,
    payloads: list[Payload],
    servers: dict[str, Server],
    channel: Any,
    sampler_pids: dict[str, int | list[int]],
) -> dict[str, Any]:
    """Warm up, then measure one (target, concurrency) for ``duration_s``."""
    tally = Tally()
    stop = asyncio.Event()
    if target == "naive-http":
        url = f"http://127.0.0.1:{servers['naive'].http_port}/v1/pose"
        load = http_level(url, payloads, concurrency, tally, stop, args.timeout_s)
    elif target == "engine-http":
        url = f"http://127.0.0.1:{servers['engine'].http_port}/v1/pose"
        load = http_level(url, payloads, concurrency, tally, stop, args.timeout_s)
    elif target == "engine-grpc":
        load = grpc_unary_level(channel, payloads, concurrency, tally, stop, args.timeout_s)
    else:
        load = grpc_stream_level(
            channel, payloads, concurrency, args.window, tally, stop, args.timeout_s
        )
    engine_port = servers["engine"].http_port if "engine" in servers else None
    task = asyncio.create_task(load)
    gpu = torch.device(args.device).type == "cuda"
    t_warm = time.perf_counter()
    await asyncio.sleep(args.warmup_s)
    while tally.completed < concurrency and time.perf_counter() - t_warm < args.max_warmup_s:
        await asyncio.sleep(0.05)
    warmup_s = time.perf_counter() - t_warm
    before = await scrape_engine(engine_port) if engine_port else {}
    with ResourceSampler(sampler_pids, gpu=gpu, interval_s=args.sample_interval_s) as sampler:
        tally.measuring = True
        t0 = time.perf_counter()
        await asyncio.sleep(args.duration_s)
        tally.measuring = False
        seconds = time.perf_counter() - t0
    after = await scrape_engine(engine_port) if engine_port else {}
    stop.set()
    t_drain = time.perf_counter()
    await task  # let in-flight requests finish, so the next target starts on an idle server
    drain_s = time.perf_counter() - t_drain
    row = {
        "target": target,
        "transport": "grpc-stream" if target == "engine-stream" else target.split("-")[1],
        "server": target.split("-")[0],
        "concurrency": concurrency,
        "warmup_s": warmup_s,
        **level_stats(tally, seconds),
        "resources": sampler.summary(),
        "loadavg": list(os.getloadavg()),
        "drain_s": drain_s,
    }
    if target.startswith("engine") and before and after:
        row["engine_batching"] = batching_stats(before, after)
    if target == "engine-stream":
        row["streams"] = math.ceil(concurrency / args.window)
        row["window"] = min(args.window, concurrency)
    return row


def schedule(args: argparse.Namespace) -> list[tuple[int, int, str | None, str]]:
    """The levels in run order: (round, concurrency, backend, target).

    Each engine target runs on every ``--backends`` backend back to back (reversed on odd rounds,
    so neither backend always goes first); ``naive-http`` runs once (backend None), as does every
    target without ``--backends``.
    """
    levels = []
    for rnd in range(args.rounds):
        backends = list(args.backends or [None])
        if rnd % 2:
            backends.reverse()
        for concurrency in args.concurrency:
            for target in args.targets:
                for backend in [None] if target == "naive-http" else backends:
                    levels.append((rnd, concurrency, backend, target))
    return levels


def backend_comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round, concurrency and engine target: each backend against ``torch`` measured beside
    it."""
    torch_rows = {
        (r["round"], r["concurrency"], r["target"]): r for r in rows if r.get("backend") == "torch"
    }
    out = []
    for r in rows:
        base = torch_rows.get((r["round"], r["concurrency"], r["target"]))
        if r.get("backend") in (None, "torch") or base is None:
            continue
        out.append(
            {
                "round": r["round"],
                "concurrency": r["concurrency"],
                "target": r["target"],
                "backend": r["backend"],
                "rps": r["throughput_rps"],
                "torch_rps": base["throughput_rps"],
                "throughput_ratio": (
                    r["throughput_rps"] / base["throughput_rps"] if base["throughput_rps"] else None
                ),
                "p50_ms": r["p50_ms"],
                "p99_ms": r["p99_ms"],
                "torch_p50_ms": base["p50_ms"],
                "torch_p99_ms": base["p99_ms"],
            }
        )
    return out


async def answered_model(server: Server, payload: Payload, timeout_s: float) -> dict[str, Any]:
    """The model description in one ``POST /v1/pose`` answer of ``server``."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        r = await client.post(
            f"http://127.0.0.1:{server.http_port}/v1/pose",
            content=payload.multipart_body,
            headers={"content-type": payload.multipart_type},
        )
    r.raise_for_status()
    model = r.json()["model"]
    return {k: model.get(k) for k in ("model", "weights_sha256", "detector", "backend")}


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round and concurrency: each engine target against naive-http measured beside it."""
    out = []
    naive = {(r["round"], r["concurrency"]): r for r in rows if r["target"] == "naive-http"}
    for r in rows:
        base = naive.get((r["round"], r["concurrency"]))
        if r["server"] != "engine" or base is None:
            continue
        out.append(
            {
                "round": r["round"],
                "concurrency": r["concurrency"],
                "target": r["target"],
                **({"backend": r["backend"]} if "backend" in r else {}),
                "engine_rps": r["throughput_rps"],
                "naive_rps": base["throughput_rps"],
                "throughput_ratio": (
                    r["throughput_rps"] / base["throughput_rps"] if base["throughput_rps"] else None
                ),
                "engine_p99_ms": r["p99_ms"],
                "naive_p50_ms": base["p50_ms"],
                "p99_over_naive_p50": r["p99_ms"] / base["p50_ms"] if base["p50_ms"] else None,
            }
        )
    return out


async def _levels(
    args: argparse.Namespace,
    payloads: list[Payload],
    engines: dict[str | None, Server],
    servers: dict[str, Server],
    channels: dict[str | None, Any],
    all_pids: dict[str, int],
    rows: list[dict[str, Any]],
) -> None:
    """Every level of ``schedule``, appending its row to ``rows`` as it ends."""
    for rnd, concurrency, backend, target in schedule(args):
        # The service under load is "engine" in the level's view and in its resource rows;
        # the other services keep their names (idle).
        engine = engines.get(backend)
        view = {"naive": servers["naive"]} if "naive" in servers else {}
        # Each server's whole tree (on CUDA the service runs front ends beside its engine); the
        # load generator alone (its tree holds the servers).
        pids: dict[str, int | list[int]] = {n: process_tree(p) for n, p in all_pids.items()}
        if engine is not None and engine.proc is not None:
            view["engine"] = engine
            pids["engine"] = pids.pop(engine.name)
        pids["loadgen"] = os.getpid()
        row = await run_level(
            target, concurrency, args, payloads, view, channels.get(backend), pids
        )
        row["round"] = rnd
        if backend is not None:
            row["backend"] = backend
        rows.append(row)
        dump_json_line({k: v for k, v in row.items() if k != "resources"})


async def run_async(args: argparse.Namespace) -> Path:
    """Start both servers, run the matrix, stop the servers, write the JSON (the rows measured
    so far, marked ``interrupted``, when SIGINT stops the matrix)."""
    import grpc

    env = environment(args.device)
    payloads = build_payloads(args)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    need_engine = any(t.startswith("engine") for t in args.targets)
    # Keyed by backend (None: one service on its own backend setting).
    engines: dict[str | None, Server] = {}
    if need_engine:
        for backend in args.backends or [None]:
            engines[backend] = engine_server(args, log_dir, backend)
    servers = {s.name: s for s in engines.values()}
    if "naive-http" in args.targets:
        servers["naive"] = naive_server(args, log_dir)
    rows: list[dict[str, Any]] = []
    stopped: dict[str, Any] = {}
    startup: dict[str, float] = {}
    answers: dict[str, dict[str, Any]] = {}
    channels: dict[str | None, Any] = {}
    try:
        # With --backends the services start one at a time: each times its batch cost curve
        # (service.workers.calibrate) while the others are idle, not while they start.
        groups = [[s] for s in servers.values()] if args.backends else [list(servers.values())]
        for group in groups:
            for s in group:
                s.start()
            waits = await asyncio.gather(*(s.wait_ready(args.startup_timeout_s) for s in group))
            startup.update(zip([s.name for s in group], waits, strict=True))
        dump_json_line({"ready_s": startup})
        for backend, s in engines.items():
            answers[s.name] = await answered_model(s, payloads[0], args.timeout_s)
            dump_json_line({"answer": {s.name: answers[s.name]}})
            said = str(answers[s.name]["backend"])
            if backend not in (None, "auto") and not said.startswith(backend):
                raise RuntimeError(f"{s.name} answers with backend {said!r}")
        options = [
            ("grpc.max_send_message_length", 64 * 2**20),
            ("grpc.max_receive_message_length", 64 * 2**20),
        ]
        for backend, s in engines.items():
            channels[backend] = grpc.aio.insecure_channel(
                f"127.0.0.1:{s.grpc_port}", options=options
            )
        all_pids = {name: s.proc.pid for name, s in servers.items() if s.proc is not None}
        with rows_so_far(stopped):
            await _levels(args, payloads, engines, servers, channels, all_pids, rows)
    finally:
        for channel in channels.values():
            await channel.close()
        for s in servers.values():
            s.stop()
    vs_torch = backend_comparisons(rows)
    for c in vs_torch:
        dump_json_line({"vs_torch": c})
    path = write_result(
        "serve",
        args.device,
        args,
        rows,
        out_dir=args.out_dir,
        env=env,
        extra={
            "comparisons": comparisons(rows),
            "backend_comparisons": vs_torch,
            "answers": answers,
            "startup_s": startup,
            "servers": {
                name: {"command": " ".join(s.command), "env": s.env_overrides}
                for name, s in servers.items()
            },
            "payloads": {
                "count": len(payloads),
                "persons": [len(p.boxes) for p in payloads],
                "jpeg_bytes": [len(p.jpeg) for p in payloads],
            },
            "logs": str(log_dir) if args.keep_logs else None,
            **stopped,
        },
    )
    if not args.keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m bench.serve``."""
    args = parse_args(argv)
    path = asyncio.run(run_async(args))
    dump_json_line({"written": str(path)})
    if json.loads(path.read_text()).get("interrupted"):
        sys.exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
    main()
