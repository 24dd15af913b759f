"""Hostile and careless clients against the real composition root (``service.__main__.serve``: the
uvicorn and grpc.aio servers with their connection bounds) over a fake pipeline.

Each class of input from the hardening issue gets a clear 4xx (or is served) while the server stays
healthy: bounded error answers, bounded parsing (nesting, huge numbers), no Host-derived redirect,
the same types on both transports, a client that goes away counted as 499 (not 500), slow bodies
timed out, idle connections closed and connections bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from service import __main__ as cli
from service.pb.pose.v1 import pose_pb2, pose_pb2_grpc
from service.settings import Settings
from tests.service.rest_support import SlowPipeline, png, wait_until

IMAGE = png(64, 48)
B64 = base64.b64encode(IMAGE).decode()


@dataclass
class Running:
    http_port: int
    grpc_port: int
    pipeline: SlowPipeline

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@contextlib.asynccontextmanager
async def running(caplog: pytest.LogCaptureFixture, **overrides: object) -> AsyncIterator[Running]:
    """``serve()`` on free ports until the block ends (then a drain, as SIGTERM does)."""
    pipeline = SlowPipeline()
    settings = Settings(host="127.0.0.1", http_port=0, grpc_port=0, drain_grace_s=5, **overrides)
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="service")
    task = asyncio.create_task(cli.serve(settings, pipeline_factory=lambda d: pipeline, stop=stop))

    def listening() -> logging.LogRecord | None:
        return next((r for r in caplog.records if r.getMessage() == "listening"), None)

    async def ready() -> bool:
        record = listening()
        if record is None:
            return False
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"http://127.0.0.1:{record.http_port}/readyz")  # type: ignore[attr-defined]
        return answer.status_code == 200

    try:
        await wait_until(ready)
        record = listening()
        assert record is not None
        yield Running(record.http_port, record.grpc_port, pipeline)  # type: ignore[attr-defined]
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0


async def metrics_text(url: str) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{url}/metrics")).text


async def test_error_answers_and_parsing_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    async with running(caplog) as s, httpx.AsyncClient(base_url=s.url, timeout=30) as http:
        # A 2 MB flat list where boxes belong: one short error, at once, the loop free meanwhile.
        flat = json.dumps({"image": B64, "boxes": [1] * 1_000_000})
        t0 = time.monotonic()
        post = asyncio.create_task(
            http.post("/v1/pose", content=flat, headers={"content-type": "application/json"})
        )
        live = await http.get("/livez")
        answer = await post
        assert live.status_code == 200
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_boxes"
        assert len(answer.content) < 1000
        assert time.monotonic() - t0 < 10
        # Many unknown fields: a bounded 422 (the first few, and a count).
        junk = {"image": B64, **{f"x{i}": i for i in range(20_000)}}
        answer = await http.post("/v1/pose", json=junk)
        assert answer.status_code == 422 and len(answer.content) < 5_000
        assert "more" in answer.json()["error"]["message"]

        # Deep nesting: the body, a batch, the boxes query parameter and the form field.
        deep = "[" * 100_000 + "]" * 100_000
        deep_query = "[" * 5_000 + "]" * 5_000  # a URL has less room; still past the limit
        for kwargs in (
            {"content": deep, "headers": {"content-type": "application/json"}},
            {"content": IMAGE, "params": {"boxes": deep_query}},
            {"files": {"image": ("a.png", IMAGE)}, "data": {"boxes": deep}},
        ):
            answer = await http.post("/v1/pose", **kwargs)  # type: ignore[arg-type]
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["code"] in ("bad_json", "bad_boxes")
        answer = await http.post(
            "/v1/pose/batch", content=deep, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_json"

        # A 400-digit integer in boxes (multipart and query), on /v1/pose and /render.
        huge = "[[1, 2, 1" + "0" * 400 + ", 9]]"
        for path in ("/v1/pose", "/v1/pose/render"):
            for kwargs in (
                {"files": {"image": ("a.png", IMAGE)}, "data": {"boxes": huge}},
                {"content": IMAGE, "params": {"boxes": huge}},
            ):
                answer = await http.post(path, **kwargs)  # type: ignore[arg-type]
                assert answer.status_code == 400, (path, answer.text)
                assert answer.json()["error"]["code"] == "bad_boxes"

        # Strings and wrong types: refused in JSON (booleans are booleans) as over gRPC.
        answer = await http.post("/v1/pose", json={"image": B64, "flip_test": "yes"})
        assert answer.status_code == 422
        answer = await http.post("/v1/pose", json={"image": B64, "boxes": [["10", 0, 9, 9]]})
        assert answer.status_code == 400
        assert s.pipeline.images_run == 0  # nothing above reached the pipeline
        assert (await http.get("/livez")).status_code == 200

    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "Traceback" not in text and not text


async def test_no_redirect_built_from_the_host_header(caplog: pytest.LogCaptureFixture) -> None:
    async with running(caplog) as s, httpx.AsyncClient(base_url=s.url) as http:
        answer = await http.post(
            "/v1/pose/", content=IMAGE, headers={"host": "evil.example"}, follow_redirects=False
        )
        assert answer.status_code == 404 and "location" not in answer.headers
        assert (await http.post("/v1/pose", content=IMAGE)).status_code == 200


async def raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP connection on the test's event loop (the server shares that loop)."""
    return await asyncio.open_connection("127.0.0.1", port)


async def test_a_client_that_goes_away_is_499_not_500(caplog: pytest.LogCaptureFixture) -> None:
    async with running(caplog) as s:
        for _ in range(5):  # mid-body: a Content-Length that never arrives
            _, writer = await raw(s.http_port)
            writer.write(
                b"POST /v1/pose HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n" + IMAGE[:100]
            )
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()

        async def counted() -> bool:
            return 'pose_requests_total{code="499",transport="http"} 5.0' in await metrics_text(
                s.url
            )

        await wait_until(counted)
        text = await metrics_text(s.url)
        assert 'code="500"' not in text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_websocket_upgrade_is_answered_as_plain_http(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The API has no WebSocket. With a WebSocket library installed (the dev extras bring one)
    # uvicorn would otherwise hand the upgrade to it, past the app's middleware (a 403 from
    # Starlette, no request id, no access line), unlike a deployment without one.
    async with running(caplog) as s:
        reader, writer = await raw(s.http_port)
        writer.write(
            b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 200"), head[:80]
        assert b"x-request-id" in head.lower()  # through the app's middleware, as any request


async def test_slow_bodies_time_out_and_idle_connections_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(caplog, http_body_timeout_s=1.0, http_keepalive_timeout_s=1) as s:
        # Slowloris on the body: a byte every 0.2 s, never the whole of it.
        reader, writer = await raw(s.http_port)
        writer.write(
            b"POST /v1/pose HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        t0 = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(OSError):
                for _ in range(50):
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(0.2)

        trickling = asyncio.create_task(trickle())
        reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 8)
        elapsed = time.monotonic() - t0
        trickling.cancel()
        writer.close()
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        assert elapsed < 5
        # An idle keep-alive connection is closed by the server.
        reader, writer = await raw(s.http_port)
        writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), 5)  # EOF: closed after the keep-alive timeout
        assert rest.endswith(b'{"status":"ok"}') and time.monotonic() - t0 < 4
        writer.close()


async def test_connections_and_heads_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    async with running(caplog, http_max_connections=3, http_max_header_bytes=2048) as s:
        # A request head over the limit is refused (not buffered).
        reader, writer = await raw(s.http_port)
        writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(4096), 5)
        assert reply.startswith(b"HTTP/1.1 431"), reply[:80]
        writer.close()
        # Idle connections hold slots; past the bound a request is refused at once (503).
        idle = [await raw(s.http_port) for _ in range(4)]
        try:
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient(base_url=s.url, timeout=10) as http:
                answer = await http.get("/livez")
            assert answer.status_code == 503
        finally:
            for _, idle_writer in idle:
                idle_writer.close()

        async def recovered() -> bool:
            async with httpx.AsyncClient(base_url=s.url, timeout=10) as http:
                return (await http.get("/livez")).status_code == 200

        await wait_until(recovered)


async def test_grpc_connection_settings_are_applied(caplog: pytest.LogCaptureFixture) -> None:
    async with running(caplog, grpc_max_concurrent_streams=1) as s:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}")
        stub = pose_pb2_grpc.PoseServiceStub(channel)
        try:
            # With one stream per connection, two calls on one channel still both complete
            # (the second waits for the first's stream): the limit queues, it does not fail.
            answers = await asyncio.gather(
                stub.Estimate(pose_pb2.EstimateRequest(image=IMAGE), timeout=20),
                stub.Estimate(pose_pb2.EstimateRequest(image=IMAGE), timeout=20),
            )
            assert all(len(a.persons) == 1 for a in answers)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Estimate(pose_pb2.EstimateRequest(image=IMAGE, precision=99))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await channel.close()
