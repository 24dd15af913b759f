"""The engine process's side of the front-end/engine split: every front end's jobs into one
``Engine``, so that one batch holds requests from several front ends.

``EngineServer`` owns the ZeroMQ ROUTER socket (``service.engine_wire``). Each INFER becomes one
``Engine.infer`` call in its own task, answered with one RESULT or one ERROR; a CANCEL (the
front end's caller went away) cancels that task, which drops the job before compute exactly as
a disconnect does in one process. The engine's state (ready, draining, model) goes to every
front end that said HELLO, when it changes and every ``STATE_INTERVAL_S`` as a heartbeat.
Validation, admission by time, deadlines and the bound on decoded bytes all stay in the engine:
a front end cannot tell the difference, and neither can its clients.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import zmq
import zmq.asyncio

from service.engine import Engine, PoseRequest
from service.engine_wire import (
    CANCEL,
    ERROR,
    HELLO,
    INFER,
    RESULT,
    STATE,
    STATE_INTERVAL_S,
    EngineState,
    ErrorMessage,
    InferMessage,
    Outbox,
    ResultMessage,
    loads,
    read_image,
)
from service.errors import NotReadyError, error_to_wire

logger = logging.getLogger(__name__)


class EngineServer:
    """Serve ``engine`` to the front ends on ``address`` (``ipc://...``).

    Args:
        engine: The one engine of the machine (started and stopped by the caller).
        address: Where the ROUTER socket binds.
    """

    def __init__(self, engine: Engine, address: str) -> None:
        self._engine = engine
        self._address = address
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        # Admission bounds what is in flight; a front end's answers are never dropped for a
        # high-water mark.
        self._socket.setsockopt(zmq.SNDHWM, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._outbox = Outbox(self._socket, routed=True)
        self._peers: set[bytes] = set()
        self._frontends: set[int] = set()  # indices of the front ends that said HELLO
        self._tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self._last_state: EngineState | None = None

    def bind(self) -> None:
        """Bind the socket (front ends may connect before or after)."""
        self._socket.bind(self._address)

    async def run(self) -> None:
        """Receive and dispatch until cancelled."""
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            while True:
                peer, body = await self._socket.recv_multipart(copy=True)
                try:
                    for kind, message, payload in loads(body):
                        self._dispatch(peer, kind, message, payload)
                except Exception:
                    logger.exception("a malformed message from a front end was dropped")
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    async def close(self) -> None:
        """Answer every job still running (as the engine settles it), then close the socket."""
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self.publish_state()
        self._outbox.flush()
        self._socket.close(linger=0)
        self._context.term()

    def state(self) -> EngineState:
        """The engine's state as front ends see it."""
        engine = self._engine
        try:
            model = engine.model_info()
        except NotReadyError:
            model = None
        return EngineState(
            ready=engine.ready,
            draining=engine.draining,
            model=model,
            decodes_on_device=engine.decodes_on_device,
            frontends=len(self._frontends),
        )

    def publish_state(self, *, force: bool = False) -> None:
        """Send the state to every front end (when it changed, or ``force``)."""
        state = self.state()
        if not force and state == self._last_state:
            return
        self._last_state = state
        for peer in self._peers:
            self._outbox.put(peer, STATE, state)

    def _dispatch(self, peer: bytes, kind: bytes, message: Any, payload: bytes | None) -> None:
        if kind == INFER:
            key = (peer, message.request_id)
            self._tasks[key] = asyncio.create_task(self._infer(peer, message, payload))
        elif kind == CANCEL:
            task = self._tasks.get((peer, message))
            if task is not None:
                task.cancel()
        elif kind == HELLO:
            self._peers.add(peer)
            self._frontends.add(message)
            self.publish_state(force=True)
        else:
            logger.warning("unknown message kind %r from a front end", kind)

    async def _infer(self, peer: bytes, message: InferMessage, payload: bytes | None) -> None:
        """One job: exactly one RESULT or ERROR, unless the front end cancelled it."""
        rid = message.request_id
        try:
            request = PoseRequest(
                image=read_image(message.image, payload),
                boxes=message.boxes,
                options=message.options,
                deadline=message.deadline,
                source=message.source,
                eager=message.eager,
            )
            response = await self._engine.infer(request)
        except asyncio.CancelledError:
            return  # the front end's caller went away: nobody reads an answer
        except Exception as exc:
            code, text, retry = error_to_wire(exc)
            if code == "internal":
                logger.error("a job failed: %s", text, exc_info=exc)
            self._outbox.put(peer, ERROR, ErrorMessage(rid, code, text, retry))
        else:
            self._outbox.put(peer, RESULT, ResultMessage(rid, response.result, response.timing_ms))
        finally:
            self._tasks.pop((peer, rid), None)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(STATE_INTERVAL_S)
            self.publish_state(force=True)
