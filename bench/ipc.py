"""What a message between a front end and the engine process costs: CPU per round trip over the
service's own transport (``service.engine_wire``: a Unix socket read and written by asyncio), and,
where pyzmq is installed, over a ZeroMQ DEALER/ROUTER pair run the way the service ran it before
(the socket's descriptor watched on the event loop, drained at once, bursts coalesced per
event-loop iteration, no high-water mark).

A client process sends INFER-sized messages (a 100-character body and a 9 KB inline image) and a
server process echoes each one back, closed loop with ``--inflight`` messages in flight (1: every
message alone, as from a front end whose loop wakes per gRPC call; 8: bursts). The figure is the
CPU time of each process (all its threads, from ``/proc``) per round trip.

    python -m bench.ipc --messages 20000 --inflight 1 8
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import uvloop

from bench.common import REPO_ROOT, cpu_seconds, environment, write_result
from service.engine_wire import Channel, connect, dumps, listen, loads

KIND = b"infer"
BODY = (0, "x" * 100)
PAYLOAD_BYTES = 9216  # a 64x48 RGB image inline


# --------------------------------------------------------------------------------------------------
# The service's transport
# --------------------------------------------------------------------------------------------------


def socket_server(path: str, ready: Event) -> None:
    async def main() -> None:
        def echo(channel: Channel, messages: list[Any]) -> None:
            for kind, body, payload in messages:
                channel.put(kind, body, payload)

        await listen(path, echo)
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


async def socket_client(path: str, messages: int, inflight: int) -> None:
    done = asyncio.Event()
    received = 0

    def on(channel: Channel, burst: list[Any]) -> None:
        nonlocal received
        for _ in burst:
            received += 1
            if received >= messages:
                done.set()
            elif received + inflight <= messages:
                channel.put(KIND, BODY, bytearray(PAYLOAD_BYTES))

    channel = await connect(path, on)
    for _ in range(inflight):
        channel.put(KIND, BODY, bytearray(PAYLOAD_BYTES))
    await done.wait()
    channel.close()


# --------------------------------------------------------------------------------------------------
# ZeroMQ, as the service used it before
# --------------------------------------------------------------------------------------------------


class ZmqChannel:
    """A pyzmq socket on the event loop: its descriptor watched, drained at once; sends queued
    during one loop iteration leave as one message (the service's channel before 2026-12-05)."""

    def __init__(self, socket: Any, routed: bool, on: Callable[[Any, list[Any]], None]) -> None:
        import zmq

        self._zmq = zmq
        self._socket, self._routed, self._on = socket, routed, on
        self._queued: dict[Any, list[Any]] = {}
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(socket.fileno(), self._drain)
        self._loop.call_soon(self._drain)

    def put(self, peer: Any, message: Any) -> None:
        self._queued.setdefault(peer, []).append(message)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        queued, self._queued = self._queued, {}
        for peer, messages in queued.items():
            body = dumps(messages)
            self._socket.send_multipart([peer, body] if self._routed else [body], self._zmq.NOBLOCK)
        if self._readable():
            self._loop.call_soon(self._drain)

    def _readable(self) -> bool:
        return bool(int(self._socket.get(self._zmq.EVENTS)) & int(self._zmq.POLLIN))

    def _drain(self) -> None:
        while self._readable():
            try:
                frames = self._socket.recv_multipart(self._zmq.NOBLOCK)
            except self._zmq.Again:
                return
            peer = frames[0] if self._routed else None
            self._on(peer, loads(frames[-1]))


def _zmq_socket(kind: int) -> Any:
    import zmq

    socket: Any = zmq.Context.instance().socket(kind)
    for option in (zmq.SNDHWM, zmq.RCVHWM, zmq.LINGER):
        socket.setsockopt(option, 0)
    return socket


def zmq_server(path: str, ready: Event) -> None:
    import zmq

    async def main() -> None:
        socket = _zmq_socket(zmq.ROUTER)
        socket.bind(f"ipc://{path}")
        channel: ZmqChannel | None = None

        def echo(peer: Any, messages: list[Any]) -> None:
            assert channel is not None
            for message in messages:
                channel.put(peer, message)

        channel = ZmqChannel(socket, True, echo)
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


async def zmq_client(path: str, messages: int, inflight: int) -> None:
    import zmq

    socket = _zmq_socket(zmq.DEALER)
    socket.connect(f"ipc://{path}")
    done = asyncio.Event()
    received = 0
    channel: ZmqChannel | None = None

    def on(peer: Any, burst: list[Any]) -> None:
        nonlocal received
        assert channel is not None
        for _ in burst:
            received += 1
            if received >= messages:
                done.set()
            elif received + inflight <= messages:
                channel.put(None, (KIND, BODY, bytearray(PAYLOAD_BYTES)))

    channel = ZmqChannel(socket, False, on)
    await asyncio.sleep(0.2)  # connected
    for _ in range(inflight):
        channel.put(None, (KIND, BODY, bytearray(PAYLOAD_BYTES)))
    await done.wait()
    asyncio.get_running_loop().remove_reader(socket.fileno())
    socket.close(linger=0)


# --------------------------------------------------------------------------------------------------


TRANSPORTS = {"socket": (socket_server, socket_client), "zmq": (zmq_server, zmq_client)}


def measure(transport: str, messages: int, inflight: int) -> dict[str, Any]:
    serve, client = TRANSPORTS[transport]
    with tempfile.TemporaryDirectory(prefix="bench-ipc-") as folder:
        path = str(Path(folder) / "engine.sock")
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        server = context.Process(target=serve, args=(path, ready), daemon=True)
        server.start()
        try:
            if not ready.wait(60):
                raise RuntimeError(f"the {transport} server did not start")
            assert server.pid is not None
            ours0, theirs0 = cpu_seconds([os.getpid()]), cpu_seconds([server.pid])
            t0 = time.monotonic()
            uvloop.run(client(path, messages, inflight))
            ours1, theirs1 = cpu_seconds([os.getpid()]), cpu_seconds([server.pid])
            t1 = time.monotonic()
        finally:
            server.kill()
            server.join(10)
    return {
        "transport": transport,
        "inflight": inflight,
        "messages": messages,
        "client_us": 1e6 * (ours1 - ours0) / messages,
        "server_us": 1e6 * (theirs1 - theirs0) / messages,
        "round_trips_per_s": messages / (t1 - t0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ipc", description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--inflight", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    env = environment("cpu")
    transports = ["socket"]
    try:
        import zmq  # noqa: F401
    except ImportError:
        print("pyzmq is not installed: the service's transport only", file=sys.stderr)
    else:
        transports.append("zmq")
    rows = []
    for _ in range(args.rounds):
        for inflight in args.inflight:
            for transport in transports:
                row = measure(transport, args.messages, inflight)
                rows.append(row)
                print(
                    f"{transport:6s} {inflight:3d} in flight: client {row['client_us']:6.1f} us, "
                    f"server {row['server_us']:6.1f} us per round trip, "
                    f"{row['round_trips_per_s']:,.0f}/s",
                    flush=True,
                )
    path = write_result("ipc", "cpu", args, rows, out_dir=args.out_dir, env=env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
