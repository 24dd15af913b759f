"""What the HTTP app itself costs per pose request, without sockets: ``service.rest.create_app``
over the identity engine, called through ASGI by ``--concurrency`` callers in one process (the
engine's worker thread included), against the bare FastAPI route of ``bench.bare_servers``
driven the same way.

``bench.frontend`` measures whole servers, where uvicorn's parsing and the socket calls are the
same for both and the load generator shares the cores: its ratios move by 10 % between runs on
2 cores. This leaves those out, so that one change to the app can be measured to a few per cent:
rounds alternate between the targets and the median is kept. The request is ``bench.frontend``'s
HTTP raw one (a 64x48 JPEG, three boxes in the query); CPU is the process's (``/proc``, all its
threads) per answered request. ``--modes raw json`` sends the image as the body (boxes in the
query) or as base64 in a JSON body, as ``bench.frontend``'s ``http-raw`` and ``http-json`` do.

    python -m bench.http_app
    python -m bench.http_app --targets service service-quiet --rounds 5 --requests 30000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

from bench.bare_servers import http_app
from bench.common import REPO_ROOT, alternating_medians, environment, write_result
from bench.frontend_load import http_body, tiny_jpeg
from service import serving
from service.json_logs import JsonLogFormatter
from service.metrics import Metrics
from service.model_choice import choose_model
from service.rest import create_app
from service.settings import Settings

# service: the defaults (access log on); service-quiet: access log off; bare: bench.bare_servers.
TARGETS = ("service", "service-quiet", "bare")
MODES = ("raw", "json")


def _request(mode: str, client_port: int) -> tuple[dict[str, Any], bytes]:
    path, body, kind = http_body(f"http-{mode}", tiny_jpeg())
    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", kind.encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", client_port),
        "server": ("127.0.0.1", 8000),
    }
    return scope, body


async def _call(app: Any, scope: dict[str, Any], body: bytes) -> int:
    """One request through ``app``: the body at once, then a receive that waits (as a client
    that stays connected); the answer's status."""
    sent = False
    connected = asyncio.get_running_loop().create_future()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    try:
        await app(dict(scope), receive, send)
    finally:
        connected.cancel()
    return status


async def _measure(target: str, mode: str, concurrency: int, requests: int) -> dict[str, Any]:
    settings = Settings(
        model="identity", device="cpu", max_queue_size=1024, access_log=target == "service"
    )
    metrics = Metrics()
    choice = choose_model(settings)
    engine = serving.build_engine(settings, serving.pipeline_factory(choice, settings), metrics)
    await engine.start()
    app = http_app() if target == "bare" else create_app(engine, settings, metrics=metrics)
    try:
        per_caller = max(1, requests // concurrency)
        statuses: dict[int, int] = {}

        async def caller(index: int, count: int) -> None:
            scope, body = _request(mode, 40000 + index)
            for _ in range(count):
                status = await _call(app, scope, body)
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(caller(i, min(per_caller, 200)) for i in range(concurrency)))
        statuses.clear()  # (warm-up)
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller(i, per_caller) for i in range(concurrency)))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await engine.stop()
    answered = per_caller * concurrency
    if statuses != {200: answered}:
        raise RuntimeError(f"{target}: not every answer was 200: {statuses}")
    return {
        "cpu_ms_per_request": cpu / answered * 1000.0,
        "requests_per_s": answered / seconds,
        "concurrency": concurrency,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_app", description=__doc__)
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["raw"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20000, help="per round and target")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    env = environment("cpu")
    # The access log goes where the service's does, through its formatter, to /dev/null.
    with open("/dev/null", "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(JsonLogFormatter())
        root = logging.getLogger()
        saved = root.handlers, root.level
        root.handlers, root.level = [handler], logging.INFO
        try:
            cases = [(t, m) for m in args.modes for t in args.targets]
            rows = alternating_medians(
                cases,
                lambda t, m: serving.run(_measure(t, m, args.concurrency, args.requests)),
                args.rounds,
            )
        finally:
            root.handlers, root.level = saved
    path = write_result("http_app", "cpu", args, rows, out_dir=args.out_dir, env=env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
