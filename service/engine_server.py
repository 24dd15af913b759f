"""The engine process's side of the front-end/engine split: every front end's jobs into one
``Engine``, so that one batch holds requests from several front ends.

``EngineServer`` listens on the engine's Unix socket (``service.engine_wire.listen``: one
``Channel`` per front end). A burst of
INFERs (what one front end sent in one event-loop iteration) is admitted in one go: each becomes
one ``Engine.submit`` (no task per job; the workers are woken once for the burst), and each
job's future, when it settles, queues one RESULT or one ERROR, coalesced per front end. A CANCEL
(the front end's caller went away) cancels that future, which drops the job before compute
exactly as a disconnect does in one process; so does the front end's connection closing (the
process died) for every job of that front end. The engine's state (ready, draining, model) goes to
every front end that said HELLO, when it changes and every ``STATE_INTERVAL_S`` as a heartbeat.
Every frame to a front end (its answers of one loop iteration, the heartbeat) is led by one
LOAD: what admission by time reads as it leaves (``service.batching.AdmissionFigures``), by
which the front end refuses a request that would be late before decoding it (the engine still
decides for what it is sent).
The front ends check each request with the engine's own functions and limits
(``service.validation``) and send the parsed boxes; the engine trusts those checks
(``PoseRequest.checked``) instead of repeating them, and checks against the image only what it
decodes itself (JPEGs for its GPU). Admission by time, deadlines and the bound on decoded bytes
stay in the engine: a front end cannot tell the difference, and neither can its clients.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

from service.engine import Engine, PoseRequest, PoseResponse
from service.engine_wire import (
    CANCEL,
    ERROR,
    HELLO,
    INFER,
    LOAD,
    RESULT,
    STATE,
    STATE_INTERVAL_S,
    Channel,
    EngineState,
    ErrorMessage,
    InferMessage,
    Message,
    ResultMessage,
    boxes_from_wire,
    listen,
    read_image,
)
from service.errors import NotReadyError, error_to_wire

logger = logging.getLogger(__name__)


class EngineServer:
    """Serve ``engine`` to the front ends on the Unix socket ``path``.

    Args:
        engine: The one engine of the machine (started and stopped by the caller).
        path: Where the socket listens (in the run folder).
    """

    def __init__(self, engine: Engine, path: str) -> None:
        self._engine = engine
        self._path = path
        self._server: asyncio.Server | None = None
        self._peers: set[Channel] = set()  # the front ends that said HELLO
        self._frontends: set[int] = set()  # their indices
        self._jobs: dict[tuple[Channel, int], asyncio.Future[PoseResponse]] = {}
        self._last_state: EngineState | None = None

    async def bind(self) -> None:
        """Listen, on the running event loop (front ends retry until it does)."""
        self._server = await listen(self._path, self._received, self._lost, self._load)

    async def run(self) -> None:
        """Send the state every ``STATE_INTERVAL_S`` until cancelled (messages are handled as
        they come, from ``bind`` on)."""
        try:
            while True:
                await asyncio.sleep(STATE_INTERVAL_S)
                self.publish_state(force=True)  # the heartbeat
        finally:
            for peer in self._peers:
                peer.flush()

    async def close(self) -> None:
        """Answer every job still running (as the engine settles it), then close the socket."""
        if self._jobs:
            await asyncio.wait(list(self._jobs.values()))
        self.publish_state()
        if self._server is not None:
            self._server.close()
        for peer in list(self._peers):
            peer.close()

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
            peer.put(STATE, state)

    def _received(self, peer: Channel, messages: list[Message]) -> None:
        """One burst from one front end."""
        for kind, message, payload in messages:
            try:
                if kind == INFER:
                    self._submit(peer, message, payload)
                elif kind == CANCEL:
                    future = self._jobs.get((peer, message))
                    if future is not None:
                        future.cancel()
                elif kind == HELLO:
                    self._peers.add(peer)
                    self._frontends.add(message)
                    self.publish_state(force=True)
                else:
                    logger.warning("unknown message kind %r from a front end", kind)
            except Exception:
                logger.exception("a malformed message from a front end was dropped")

    def _lost(self, peer: Channel) -> None:
        """A front end's connection closed (it exited): nobody reads its answers, so its jobs
        are dropped (before compute, unless already running)."""
        self._peers.discard(peer)
        for key, future in list(self._jobs.items()):
            if key[0] is peer:
                future.cancel()

    def _submit(
        self, peer: Channel, body: tuple[Any, ...], payload: bytes | bytearray | None
    ) -> None:
        """One job (``InferMessage.to_wire``): exactly one RESULT or ERROR, unless the front end
        cancels it."""
        message = InferMessage.from_wire(body)
        try:
            request = PoseRequest(
                image=read_image(message.image, payload),
                boxes=boxes_from_wire(message.boxes),
                options=message.options,
                deadline=message.deadline,
                source=message.source,
                eager=message.eager,
                checked=True,  # by the front end, with the engine's own functions and limits
            )
            future = self._engine.submit(request)
        except Exception as exc:
            self._answer_error(peer, message.request_id, exc)
            return
        key = (peer, message.request_id)
        self._jobs[key] = future
        future.add_done_callback(partial(self._answered, key))

    def _load(self) -> Message | None:
        """The LOAD that leads each frame to a front end: what admission by time reads now, so
        that the front end can refuse before decoding a request that would be late
        (``EngineClient.infer``)."""
        figures = self._engine.admission_figures()
        return None if figures is None else (LOAD, tuple(figures), None)

    def _answered(self, key: tuple[Channel, int], future: asyncio.Future[PoseResponse]) -> None:
        self._jobs.pop(key, None)
        if future.cancelled():
            return  # the front end's caller went away: nobody reads an answer
        peer, rid = key
        exc = future.exception()
        if exc is not None:
            self._answer_error(peer, rid, exc)
            return
        response = future.result()
        message = ResultMessage(rid, response.result, response.timing_ms)
        peer.put(RESULT, message.to_wire())

    def _answer_error(self, peer: Channel, rid: int, exc: BaseException) -> None:
        code, text, retry = error_to_wire(exc)
        if code == "internal":
            logger.error("a job failed: %s", text, exc_info=exc)
        peer.put(ERROR, ErrorMessage(rid, code, text, retry))
