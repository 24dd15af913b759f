"""A front-end process's engine: the engine's async interface over IPC to the engine process.

``EngineClient`` is what the transports of a front end hold instead of an ``Engine``
(``service.engine_api.EngineHandle``: ``ready``, ``draining``, ``model_info``, ``infer``,
``infer_many``; ``start`` and ``stop`` for the composition root). Per request it does the work
that scales with front ends: every check of the request (the engine's own functions and
limits, ``service.validation``; the cheap ones before any decoding is spent, the boxes against
the image once it is decoded; the engine trusts them, ``PoseRequest.checked``), decoding in its
own thread pool, and writing the pixels to shared memory
(``service.engine_wire``). The engine process then admits, batches and answers.

Guarantees kept across the boundary:

- exactly one answer per call: a RESULT or an ERROR resolves the call's future once; a caller
  that goes away (its task cancelled) sends CANCEL, and the engine drops the job before compute;
- deadlines: the engine enforces them; a timer here answers ``DeadlineExceededError`` one second
  past the deadline even if the engine said nothing (it always does: this is a backstop);
- the engine process gone (watched through a pidfd and the connection closing, not a timeout):
  every call in flight and every new one is answered 503 (``NotReadyError``) at once; this front
  end gone: the engine sees its connection close and drops its jobs;
- bounded: at most ``max_queue_size`` calls of this front end in flight (decoding or at the
  engine), beyond that ``QueueFullError`` at once; decoding is bounded by the pool's threads;
- overload refused before any work is spent on it, as in one process: the engine sends, with
  its answers and its heartbeat, what admission by time reads (``LOAD``:
  ``service.batching.AdmissionFigures``), and a request that the engine's own rule
  (``service.batching.refusal_s``) says would be late is refused here before it is decoded.
  Between two LOADs the expected wait is kept up to date with what is known here: plus the work
  this front end has sent since (the engine's own estimate drops only as batches finish, and
  their answers bring a new LOAD). What other front ends sent is not known until the next LOAD;
  the engine still decides for every request it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from model.interfaces import ModelDescription
from service.batching import AdmissionFigures, refusal_s, work_of
from service.engine_api import EngineConfig, PoseRequest, PoseResponse, infer_all
from service.engine_wire import (
    CANCEL,
    ERROR,
    HELLO,
    INFER,
    INLINE_LIMIT_BYTES,
    LOAD,
    RESULT,
    STATE,
    Channel,
    EngineState,
    ErrorMessage,
    ImageFiles,
    ImageRef,
    InferMessage,
    Message,
    ResultMessage,
    boxes_to_wire,
    connect,
    inline_payload,
)
from service.errors import (
    DeadlineExceededError,
    EngineStoppedError,
    NotReadyError,
    QueueFullError,
    error_from_wire,
)
from service.gpu_decode import ImageHeader
from service.validation import check_boxes_in_image, check_image, check_options, parse_boxes

logger = logging.getLogger(__name__)

# A call with a deadline is answered at most this long after it, whatever the engine does.
_DEADLINE_BACKSTOP_S = 1.0
_RETRY_AFTER_BUSY_S = 1.0
_CONNECT_RETRY_S = 0.05


class EngineGoneError(RuntimeError):
    """The engine process exited (``start`` raises it; calls get ``NotReadyError``)."""


class EngineClient:
    """The engine process, as one front end sees it.

    Args:
        address: The engine's Unix socket (in the run folder).
        config: The engine's knobs (the request limits and ``max_queue_size`` are used here).
        decoder: Encoded bytes -> (3, H, W) uint8 RGB tensor, run in this front end's pool.
        small_decoder: Encoded bytes -> the image if it is small, else None
            (``service.uploads.decode_if_small``), run on the event loop: handing a thumbnail to
            a pool thread costs more than decoding it.
        probe: Encoded bytes -> header, for JPEGs the engine decodes on its GPU.
        images_dir: Shared-memory folder for decoded images (the run folder's).
        engine_pid: The engine process, watched through a pidfd; None watches nothing.
        index: This front end's index (0 .. frontends - 1).
        frontends: How many front ends the service runs: this one turns ready once the engine
            is and every front end has been listening (once; a restarted front end later does
            not turn the others unready).
    """

    def __init__(
        self,
        address: str,
        config: EngineConfig,
        *,
        decoder: Callable[[bytes], torch.Tensor],
        small_decoder: Callable[[bytes], torch.Tensor | None] | None = None,
        probe: Callable[[bytes], ImageHeader],
        images_dir: Path,
        engine_pid: int | None,
        index: int,
        frontends: int,
    ) -> None:
        self._address = address
        self._config = config
        self._decoder = decoder
        self._small_decoder = small_decoder
        self._probe = probe
        self._files = ImageFiles(images_dir)
        self._engine_pid = engine_pid
        self._index = index
        self._frontends = frontends
        self._all_listening = False
        self._channel: Channel | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=config.decode_workers, thread_name_prefix="pose-decode"
        )
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[ResultMessage]] = {}
        self._calls = 0  # calls in flight: decoding or at the engine
        self._idle = asyncio.Event()
        self._idle.set()
        self._state: EngineState | None = None
        # The engine's last admission figures, and the wait (seconds) of the work sent since.
        self._load: AdmissionFigures | None = None
        self._sent_s = 0.0
        self._state_changed = asyncio.Event()
        self._pidfd: int | None = None
        self._gone = False
        self._stopping = False

    @property
    def ready(self) -> bool:
        state = self._state
        return (
            state is not None
            and state.ready
            and self._all_listening
            and not (self._stopping or self._gone)
        )

    @property
    def draining(self) -> bool:
        state = self._state
        return self._stopping or self._gone or (state is not None and state.draining)

    def model_info(self) -> ModelDescription:
        """The engine's model.

        Raises:
            NotReadyError: The engine has not built it yet (or is gone).
        """
        if self._state is None or self._state.model is None or self._gone:
            raise NotReadyError("the engine is not ready")
        return self._state.model

    async def start(self) -> None:
        """Connect and wait until the engine is ready.

        Raises:
            EngineGoneError: The engine process exited first (e.g. its model failed to load).
        """
        self._watch_engine()
        while self._channel is None:
            if self._gone:
                raise EngineGoneError("the engine process exited before it was ready")
            try:
                self._channel = await connect(self._address, self._received, self._lost)
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(_CONNECT_RETRY_S)  # the engine is still loading its model
        self._channel.put(HELLO, self._index)
        while not self.ready:
            if self._gone:
                raise EngineGoneError("the engine process exited before it was ready")
            self._state_changed.clear()
            await self._state_changed.wait()

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new calls, let those in flight finish within ``grace_s``, fail the rest with
        ``EngineStoppedError``, then close. Idempotent."""
        self._stopping = True
        grace = self._config.drain_grace_s if grace_s is None else grace_s
        if self._calls:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace)
        self._fail_pending(lambda: EngineStoppedError("the server is shutting down"))
        self._unwatch_engine()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def infer_many(
        self,
        requests: Sequence[PoseRequest],
        *,
        abandoned: Callable[[], Awaitable[Any]] | None = None,
    ) -> list[PoseResponse]:
        """Several images at once (``service.engine_api.infer_all``)."""
        return await infer_all(self.infer, requests, abandoned)

    async def infer(self, request: PoseRequest) -> PoseResponse:
        """One image through the engine process (the errors of ``Engine.infer``)."""
        if not self.ready:
            raise NotReadyError("draining" if self.draining else "the engine is not ready")
        t_submit = time.monotonic()
        if request.deadline is not None and request.deadline <= t_submit:
            raise DeadlineExceededError("the deadline passed before the request was queued")
        if self._calls >= self._config.max_queue_size:
            raise QueueFullError(
                f"overloaded: {self._calls} requests of this front end in flight",
                retry_after_s=_RETRY_AFTER_BUSY_S,
            )
        # The engine's own checks, before any decoding is spent (it does not repeat them).
        boxes = None if request.boxes is None else parse_boxes(request.boxes, self._config.limits)
        check_options(request.options)
        load = self._load
        if load is not None:  # admission by time, before any decoding is spent
            wait = load.wait_s + self._sent_s
            max_wait_s = self._config.max_queue_wait_s
            retry = refusal_s(t_submit, request.deadline, wait, load.batch_s, max_wait_s)
            if retry is not None:
                raise QueueFullError(
                    f"overloaded: about {wait:.2f} s of work ahead at the engine; this one "
                    "would not be answered in time",
                    retry_after_s=retry,
                )
            self._sent_s += work_of(boxes, load.boxless_crops) * load.s_per_crop
        self._calls += 1
        self._idle.clear()
        path = ""
        try:
            ref, payload, image, decode_s = await self._prepare(request, boxes)
            path = ref.path
            return await self._call(request, boxes, ref, payload, image, decode_s, t_submit)
        finally:
            if path:
                self._files.remove(path)
            self._calls -= 1
            if not self._calls:
                self._idle.set()

    async def _prepare(
        self, request: PoseRequest, boxes: torch.Tensor | None
    ) -> tuple[ImageRef, bytes | bytearray | None, torch.Tensor | None, float]:
        """Decode (in the pool), check the image and the ``boxes`` against it, and place it: in
        the message, in shared memory, or encoded for the engine's GPU decoder (which checks
        the boxes once it has decoded it)."""
        image = request.image
        loop = asyncio.get_running_loop()
        on_device = (
            self._state is not None
            and self._state.decodes_on_device
            and not request.return_image
            and not isinstance(image, torch.Tensor)
        )
        t0 = time.monotonic()
        if isinstance(image, bytes | bytearray | memoryview):
            data = bytes(image)
            if (
                on_device
                and (await loop.run_in_executor(self._pool, self._probe, data)).device_decodable
            ):
                return ImageRef("encoded"), data, None, time.monotonic() - t0
            small = self._small_decoder(data) if self._small_decoder is not None else None
            if small is None:
                small = await loop.run_in_executor(self._pool, self._decoder, data)
            image = small
        elif not isinstance(image, torch.Tensor):
            raise TypeError(f"image must be bytes or a tensor, got {type(image).__name__}")
        assert isinstance(image, torch.Tensor)
        check_image(image)
        if boxes is not None:
            check_boxes_in_image(boxes, int(image.shape[2]), int(image.shape[1]))
        image = image.cpu()
        shape = tuple(int(v) for v in image.shape)
        if image.nbytes <= INLINE_LIMIT_BYTES:
            payload = inline_payload(image)
            return ImageRef("inline", shape), payload, image, time.monotonic() - t0
        try:
            path = await loop.run_in_executor(self._pool, self._files.write, image)
        except OSError as exc:  # /dev/shm full (a container's is 64 MiB) or gone: a copy
            logger.warning("shared memory refused an image (%s): sending it inline", exc)
            payload = inline_payload(image)
            return ImageRef("inline", shape), payload, image, time.monotonic() - t0
        return ImageRef("file", shape, path), None, image, time.monotonic() - t0

    async def _call(
        self,
        request: PoseRequest,
        boxes: torch.Tensor | None,
        ref: ImageRef,
        payload: bytes | bytearray | None,
        image: torch.Tensor | None,
        decode_s: float,
        t_submit: float,
    ) -> PoseResponse:
        """Send one INFER and wait for its one answer."""
        if self._gone or self._channel is None:
            raise NotReadyError("the engine process stopped")
        rid = next(self._ids)
        message = InferMessage(
            rid,
            ref,
            boxes_to_wire(boxes),
            request.options,
            request.deadline,
            request.source,
            request.eager,
        )
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[ResultMessage] = loop.create_future()
        self._pending[rid] = answer
        backstop = None
        if request.deadline is not None:
            backstop = loop.call_at(
                loop.time() + request.deadline - time.monotonic() + _DEADLINE_BACKSTOP_S,
                self._settle_error,
                rid,
                DeadlineExceededError("the deadline passed before the answer"),
            )
        self._channel.put(INFER, message.to_wire(), payload)
        try:
            result = await answer
        except asyncio.CancelledError:
            # (Cancelling this task cancelled ``answer`` too: "done" means answered only when
            # not cancelled.)
            answered = answer.done() and not answer.cancelled()
            if not answered and self._channel is not None and not self._gone:
                self._channel.put(CANCEL, rid)
            raise
        finally:
            self._pending.pop(rid, None)
            if backstop is not None:
                backstop.cancel()
        timing = dict(result.timing_ms)
        timing["decode"] = timing.get("decode", 0.0) + decode_s * 1000.0
        timing["total"] = (time.monotonic() - t_submit) * 1000.0
        return PoseResponse(
            result=result.result,
            timing_ms=timing,
            image=image if request.return_image else None,
        )

    def _received(self, channel: Channel, messages: list[Message]) -> None:
        """Answers and state from the engine (one burst)."""
        for kind, message, _ in messages:
            if kind == RESULT:
                future = self._pending.get(message[0])  # (the request id of to_wire's tuple)
                if future is not None and not future.done():
                    future.set_result(ResultMessage.from_wire(message))
            elif kind == ERROR:
                error: ErrorMessage = message
                self._settle_error(
                    error.request_id,
                    error_from_wire(error.code, error.message, error.retry_after_s),
                )
            elif kind == LOAD:
                self._load = AdmissionFigures(*message)
                self._sent_s = 0.0
            elif kind == STATE:
                state: EngineState = message
                self._state = state
                self._all_listening = self._all_listening or state.frontends >= self._frontends
                self._state_changed.set()

    def _lost(self, channel: Channel) -> None:
        """The engine closed the connection: it is gone (or going; the pidfd says so too)."""
        self._engine_gone()

    def _settle_error(self, rid: int, error: BaseException) -> None:
        future = self._pending.get(rid)
        if future is not None and not future.done():
            future.set_exception(error)

    def _fail_pending(self, error: Callable[[], BaseException]) -> None:
        """Fail every call waiting for the engine, each with its own error."""
        for rid in list(self._pending):
            self._settle_error(rid, error())

    def _watch_engine(self) -> None:
        """Learn of the engine process's exit at once (a pidfd turns readable)."""
        if self._engine_pid is None:
            return
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(self._engine_pid)
        except ProcessLookupError:
            self._engine_gone()
            return
        loop.add_reader(self._pidfd, self._engine_gone)

    def _unwatch_engine(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _engine_gone(self) -> None:
        if self._gone:
            return
        self._gone = True
        if not self._stopping:
            logger.error("the engine process exited: answering 503 to everything")
        self._fail_pending(lambda: NotReadyError("the engine process stopped"))
        self._state_changed.set()
        with contextlib.suppress(Exception):
            if self._pidfd is not None:
                asyncio.get_running_loop().remove_reader(self._pidfd)
