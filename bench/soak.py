"""Overload soak: the real ``pose-service serve`` under more load than it can serve.

1. Capacity: a closed loop at ``--concurrency`` clients for ``--capacity-s`` seconds measures the
   answered requests per second.
2. Soak: an open loop of arrivals at ``--factor`` x that capacity for ``--duration-s`` seconds, each
   request with the server's own deadline (``request_timeout_ms``). Every request is counted by its
   outcome: 200, 429 (with its Retry-After), 504, other; a refusal's latency is recorded apart.
3. The server's RSS is sampled throughout (``/proc``; with ``--frontends N`` > 1, summed over its
   processes).

The properties asserted by admission-by-time (``service.batching``): admitted == answered 200 (no
504), every refusal a 429 with Retry-After, refusals immediate, RSS bounded. The run exits non-zero
when one does not hold.

    .venv/bin/python -m bench.soak --weights tests-s.pth --duration-s 60 --factor 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    ResourceSampler,
    environment,
    load_images,
    percentile,
    process_tree,
    write_result,
)
from bench.servers import Server, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="DistilPose weights (default: the reference models)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients of the capacity run")
    parser.add_argument("--capacity-s", type=float, default=20.0)
    parser.add_argument("--factor", type=float, default=3.0, help="soak arrivals x capacity")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--timeout-ms", type=int, default=2000, help="the server's deadline")
    parser.add_argument("--boxes", type=int, default=3, help="caller boxes per request")
    parser.add_argument(
        "--frontends", type=int, default=1, help="front-end processes (1: one process)"
    )
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    return parser.parse_args(argv)


def _server(args: argparse.Namespace, log_dir: Path) -> Server:
    http_port, grpc_port = free_port(), free_port()
    env = {
        "POSE_HOST": "127.0.0.1",
        "POSE_HTTP_PORT": str(http_port),
        "POSE_GRPC_PORT": str(grpc_port),
        "POSE_REQUEST_TIMEOUT_MS": str(args.timeout_ms),
        "POSE_LOG_LEVEL": "warning",
        "POSE_FLIP_TEST": "false",
        "POSE_FRONTENDS": str(args.frontends),
    }
    if args.weights:
        env |= {"POSE_WEIGHTS": args.weights, "POSE_DETECTOR": "none"}
    command = [sys.executable, "-m", "service", "serve"]
    return Server("engine", command, env, http_port, grpc_port, log_dir / "soak-engine.log")


async def _capacity(
    url: str, body: bytes, params: dict[str, str], args: argparse.Namespace
) -> float:
    done = 0
    stop = time.monotonic() + args.capacity_s

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < stop:
            answer = await http.post("/v1/pose", content=body, params=params)
            if answer.status_code == 200:
                done += 1

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
        return done / (time.monotonic() - t0)


async def _soak(
    url: str, body: bytes, params: dict[str, str], rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    answered_ms: list[float] = []
    refused_ms: list[float] = []
    retry_after: list[float] = []
    missing_retry = 0
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)

    async def one(http: httpx.AsyncClient) -> None:
        nonlocal missing_retry
        t0 = time.monotonic()
        try:
            answer = await http.post("/v1/pose", content=body, params=params)
            key = str(answer.status_code)
        except httpx.HTTPError as exc:
            key = type(exc).__name__
            answer = None
        ms = (time.monotonic() - t0) * 1000.0
        outcomes[key] = outcomes.get(key, 0) + 1
        if key == "200":
            answered_ms.append(ms)
        elif key == "429" and answer is not None:
            refused_ms.append(ms)
            if "retry-after" in answer.headers:
                retry_after.append(float(answer.headers["retry-after"]))
            else:
                missing_retry += 1

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        tasks: list[asyncio.Task[None]] = []
        t0 = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - t0 < args.duration_s:
            due = int((now - t0) * rate)
            while sent < due:
                tasks.append(asyncio.create_task(one(http)))
                sent += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
    return {
        "sent": sent,
        "outcomes": outcomes,
        "answered_p50_ms": percentile(answered_ms, 50) if answered_ms else None,
        "answered_p99_ms": percentile(answered_ms, 99) if answered_ms else None,
        "answered_max_ms": max(answered_ms, default=None),
        "refused_p50_ms": percentile(refused_ms, 50) if refused_ms else None,
        "refused_p99_ms": percentile(refused_ms, 99) if refused_ms else None,
        "retry_after_s_range": [min(retry_after, default=0), max(retry_after, default=0)],
        "refusals_without_retry_after": missing_retry,
    }


async def run_async(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment("cpu")
    server = _server(args, Path(tempfile.mkdtemp(prefix="soak-")))
    image = load_images(0)[0]
    x, y, w, h = image.person_box
    boxes = [[x + 5.0 * i, y, w, h] for i in range(args.boxes)]
    params = {"boxes": json.dumps(boxes)}
    server.start()
    try:
        await server.wait_ready(300)
        url = f"http://127.0.0.1:{server.http_port}"
        assert server.proc is not None
        capacity = await _capacity(url, image.data, params, args)
        # Every process of the service (with front ends: the parent, engine and front ends).
        service = process_tree(server.proc.pid)
        with ResourceSampler({"service": service}, gpu=False) as sampler:
            soak = await _soak(url, image.data, params, capacity * args.factor, args)
        rss = [s["service"]["rss_mib"] for s in sampler.samples if s.get("service")]
    finally:
        server.stop()
    result = {
        "capacity_rps": capacity,
        "arrival_rps": capacity * args.factor,
        **soak,
        "rss_mib_start": rss[0] if rss else None,
        "rss_mib_max": max(rss) if rss else None,
    }
    outcomes = soak["outcomes"]
    result["holds"] = {
        "no_504": "504" not in outcomes,
        "only_200_and_429": set(outcomes) <= {"200", "429"},
        "every_refusal_has_retry_after": soak["refusals_without_retry_after"] == 0,
    }
    write_result("soak", "cpu", args, [result], out_dir=out, env=env)
    return result


def main(argv: list[str] | None = None) -> int:
    result = asyncio.run(run_async(parse_args(argv)))
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return 0 if all(result["holds"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
