"""What crosses between a front-end process and the engine process (``service.engine_client``
and ``service.engine_server``): the messages, and decoded images through shared memory.

Transport: one ZeroMQ ROUTER socket in the engine process, one DEALER per front end, over an
``ipc://`` path in the service's private run folder (mode 0700). A message is a
``(kind, body, payload)`` triple: the kind (``INFER``, ``CANCEL``, ``HELLO`` from a front end;
``RESULT``, ``ERROR``, ``STATE`` from the engine), its body, and for ``INFER`` optionally the
image's bytes. ``Channel`` runs a socket on the event loop: a burst in is handled as one list,
and every message for one peer queued during one event-loop iteration goes out as ONE ZeroMQ
message (a pickled list), so that under load a send syscall and a wake-up of the other side are
paid per burst, not per request. Pickle is safe here: both ends
are this service's own processes, started by one parent, on a socket only its user can open;
nothing a client sent is ever unpickled (bodies hold parsed fields; image bytes are bytes).

Images: a decoded (3, H, W) uint8 image over ``INLINE_LIMIT_BYTES`` is written once to a file in
the run folder's shared-memory directory (tmpfs, ``/dev/shm``) and mapped by the engine with
``torch.from_file`` (no copy, no pickle); a small one rides in the message (a copy is cheaper
than a file). The front end that wrote a file unlinks it once the answer is in (the engine's
mapping outlives the unlink); the parent removes the folder at exit, so a front end that dies
leaks nothing past the service. Encoded JPEGs bound for the engine's GPU decoder travel as the
upload's bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import operator
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import zmq

from model.interfaces import ImageResult, ModelDescription, Person, PoseOptions

logger = logging.getLogger(__name__)

# Message kinds.
HELLO = b"hello"  # front end -> engine: front end N is listening (the engine answers STATE)
INFER = b"infer"  # front end -> engine: InferMessage [+ image bytes]
CANCEL = b"cancel"  # front end -> engine: request id; the caller went away
RESULT = b"result"  # engine -> front end: ResultMessage
ERROR = b"error"  # engine -> front end: ErrorMessage
STATE = b"state"  # engine -> front end: EngineState, on change and as a heartbeat

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

# A decoded image up to this size is sent in the message; a larger one through shared memory.
INLINE_LIMIT_BYTES = 256 * 1024
# How often the engine repeats its state to every front end (a heartbeat).
STATE_INTERVAL_S = 1.0


class ImageRef(NamedTuple):
    """Where an INFER's image is.

    Attributes:
        kind: ``"inline"`` (decoded pixels in the message's third frame), ``"file"`` (decoded
            pixels in ``path``) or ``"encoded"`` (the upload's bytes in the third frame, for the
            engine's device decoder).
        shape: (3, H, W) of decoded pixels; () for encoded bytes.
        path: the shared-memory file of ``"file"``.
    """

    kind: str
    shape: tuple[int, ...] = ()
    path: str = ""


class InferMessage(NamedTuple):
    """One job, as ``service.engine_api.PoseRequest`` less the image's pixels, checked by the
    front end (``PoseRequest.checked``).

    It crosses as plain tuples (``to_wire``/``from_wire``): a class in a pickle is looked up by
    name on each side, once per message and class, which cost more than the rest of a job's
    message (7 against 2 us each way for a burst of one job).

    Attributes:
        boxes: ``parse_boxes``'s (M, 5) float32 rows as bytes (``boxes_to_wire``), or None.
    """

    request_id: int
    image: ImageRef
    boxes: bytes | None
    options: PoseOptions
    deadline: float | None  # time.monotonic(): one clock for every process of the machine
    source: str
    eager: bool

    def to_wire(self) -> tuple[Any, ...]:
        """Plain tuples, strings, numbers and bytes only (the options as their field values)."""
        values = _option_values(self.options)
        image = tuple(self.image)
        return (self.request_id, image, self.boxes, values, self.deadline, self.source, self.eager)

    @classmethod
    def from_wire(cls, body: tuple[Any, ...]) -> InferMessage:
        """The message of ``to_wire``'s tuple.

        Raises:
            ValueError, TypeError: A malformed tuple (a bug in the front end).
        """
        rid, image, boxes, values, deadline, source, eager = body
        options = _OPTIONS.get(values)
        if options is None:
            options = PoseOptions(*values)
            if len(_OPTIONS) < _OPTIONS_KEPT:
                _OPTIONS[values] = options
        return cls(rid, ImageRef(*image), boxes, options, deadline, source, eager)


# PoseOptions' field values in the order of its fields (``PoseOptions(*values)`` rebuilds it).
_option_values = operator.attrgetter(*(f.name for f in dataclasses.fields(PoseOptions)))
# Person's field values in the order of its fields (``Person(*values)`` rebuilds it).
_person_values = operator.attrgetter(*(f.name for f in dataclasses.fields(Person)))
# The options of the jobs seen, by their field values: a service sees a handful of combinations
# (PoseOptions is frozen, so one instance serves every job that asks the same).
_OPTIONS: dict[tuple[Any, ...], PoseOptions] = {}
_OPTIONS_KEPT = 64


class ResultMessage(NamedTuple):
    """One job's answer. It crosses as plain tuples, as ``InferMessage`` does (each person as
    its field values)."""

    request_id: int
    result: ImageResult
    timing_ms: dict[str, float]

    def to_wire(self) -> tuple[Any, ...]:
        result = self.result
        persons = [_person_values(person) for person in result.persons]
        return (self.request_id, result.width, result.height, persons, self.timing_ms)

    @classmethod
    def from_wire(cls, body: tuple[Any, ...]) -> ResultMessage:
        """The message of ``to_wire``'s tuple.

        Raises:
            ValueError, TypeError: A malformed tuple (a bug in the engine).
        """
        rid, width, height, persons, timing = body
        result = ImageResult(width, height, [Person(*values) for values in persons])
        return cls(rid, result, timing)


@dataclass(frozen=True)
class ErrorMessage:
    """An ``EngineError`` as ``service.errors.error_to_wire`` describes it."""

    request_id: int
    code: str
    message: str
    retry_after_s: float | None


@dataclass(frozen=True)
class EngineState:
    """What a front end needs to know of the engine between requests.

    Attributes:
        ready: Started, warmed up, not draining.
        draining: Stopping: new work is refused.
        model: The served model, once the pipelines are built.
        decodes_on_device: The engine decodes qualifying JPEGs on its GPU (send them encoded).
        frontends: How many front ends (distinct indices) have said HELLO, i.e. are listening:
            a front end turns ready only once every one has, so that the service is ready
            only when all of it is.
    """

    ready: bool
    draining: bool
    model: ModelDescription | None
    decodes_on_device: bool
    frontends: int = 0


Message = tuple[bytes, Any, bytes | bytearray | None]  # (kind, body, payload)


def dumps(body: object) -> bytes:
    return pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)


def loads(frame: bytes | memoryview) -> Any:
    return pickle.loads(frame)


class Channel:
    """One ZeroMQ socket on the event loop: bursts in, coalesced messages out.

    pyzmq's asyncio sockets are not used: they cost a future and a poll per receive. Instead the
    socket's notification descriptor is watched with ``loop.add_reader`` and every message
    waiting is read at once (``on_messages(peer, messages)``, once per ZeroMQ message, i.e. per
    burst the other side sent); sends go out non-blocking. ZeroMQ's descriptor is
    edge-triggered, and a send may consume its edge, so the socket's ``EVENTS`` are looked at
    again after every send.

    ``put`` coalesces: every message for one peer queued during one event-loop iteration leaves
    as ONE ZeroMQ message (a pickled list), so that under load a send and a wake-up of the other
    side are paid per burst, not per request.

    Args:
        socket: A ROUTER (``routed``: frames are [peer, body]) or a DEALER socket ([body]) of a
            plain (not asyncio) context, with no send high-water mark, so a send never waits:
            what is in flight is bounded by the engine's admission, not by the socket.
        routed: Whether the socket is a ROUTER.
        on_messages: Called on the event loop with the sender (None on a DEALER) and the list
            of ``(kind, body, payload)`` of one received message. Its exceptions are logged and
            the rest of the burst is still read.
    """

    def __init__(
        self,
        socket: zmq.Socket[bytes],
        *,
        routed: bool,
        on_messages: Callable[[bytes | None, list[Message]], None],
    ) -> None:
        self._socket = socket
        self._routed = routed
        self._on_messages = on_messages
        self._queued: dict[bytes | None, list[Message]] = {}
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = socket.fileno()  # the notification descriptor (ZMQ_FD)
        self._loop.add_reader(self._fd, self._drain)
        self._loop.call_soon(self._drain)  # anything that came before the reader

    def put(
        self, peer: bytes | None, kind: bytes, body: Any, payload: bytes | bytearray | None = None
    ) -> None:
        """Queue one message; it leaves at the end of this event-loop iteration."""
        self._queued.setdefault(peer, []).append((kind, body, payload))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send everything queued, one ZeroMQ message per peer (a peer gone meanwhile loses its
        answers: a ROUTER drops them)."""
        self._scheduled = False
        if self._fd is None:
            self._queued.clear()
            return
        queued, self._queued = self._queued, {}
        for peer, messages in queued.items():
            body = dumps(messages)
            frames = [peer, body] if peer is not None else [body]
            try:
                self._socket.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                logger.warning("%d messages were not sent: %s", len(messages), exc)
        if self._readable():
            self._loop.call_soon(self._drain)

    def close(self) -> None:
        """Send what is queued, stop reading and close the socket."""
        if self._fd is None:
            return
        self.flush()
        self._loop.remove_reader(self._fd)
        self._fd = None
        self._socket.close(linger=0)

    def _readable(self) -> bool:
        # Plain ints: pyzmq's getsockopt wraps EVENTS in an enum, a third of this call's cost.
        return bool(cast(int, self._socket.get(_EVENTS)) & _POLLIN)

    def _drain(self) -> None:
        socket = self._socket
        while self._fd is not None and self._readable():
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if self._routed:
                    peer, body = frames
                    self._on_messages(peer, loads(body))
                else:
                    (body,) = frames
                    self._on_messages(None, loads(body))
            except Exception:
                logger.exception("a message from another process was dropped")


class ImageFiles:
    """Decoded images written to shared memory by one front-end process.

    Args:
        folder: The run folder's shared-memory directory (created by the parent).
    """

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._prefix = f"img-{os.getpid()}-"
        self._counter = itertools.count()

    def write(self, image: torch.Tensor) -> str:
        """Write a (3, H, W) uint8 CPU image; returns its path (unlink it with ``remove``).

        Raises:
            OSError: The shared-memory folder is full or gone.
        """
        path = self._folder / f"{self._prefix}{next(self._counter)}"
        data = image.contiguous().numpy().data.cast("B")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return str(path)

    @staticmethod
    def remove(path: str) -> None:
        """Unlink a written image (an engine still mapping it keeps its pages until done)."""
        Path(path).unlink(missing_ok=True)


def boxes_to_wire(boxes: torch.Tensor | None) -> bytes | None:
    """``parse_boxes``'s (M, 5) float32 CPU tensor as bytes (None stays None)."""
    return None if boxes is None else boxes.numpy().tobytes()


def boxes_from_wire(data: bytes | None) -> torch.Tensor | None:
    """The (M, 5) float32 tensor of ``boxes_to_wire``.

    Raises:
        ValueError: Not a whole number of rows (a bug in the front end, not a client's error).
    """
    if data is None:
        return None
    if len(data) % (5 * 4):
        raise ValueError(f"{len(data)} bytes of boxes are not whole (M, 5) float32 rows")
    return torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(-1, 5).copy())


def inline_payload(image: torch.Tensor) -> bytearray:
    """A decoded CPU image's pixels for an ``"inline"`` INFER: a bytearray, so that the engine
    can read them in place (``read_image``)."""
    return bytearray(image.contiguous().numpy().data)


def read_image(ref: ImageRef, payload: bytes | bytearray | None) -> torch.Tensor | bytes:
    """The engine's side: the (3, H, W) uint8 image of an INFER (mapped from shared memory, not
    copied), or the encoded bytes for its device decoder.

    Raises:
        ValueError: A malformed reference (a bug in the front end, not a client's error).
        OSError: The shared-memory file is gone.
    """
    if ref.kind == "encoded":
        if payload is None:
            raise ValueError("an encoded image without its bytes")
        return bytes(payload)  # (bytes already: no copy)
    if len(ref.shape) != 3 or ref.shape[0] != 3:
        raise ValueError(f"a decoded image must be (3, H, W), got {ref.shape}")
    size = ref.shape[0] * ref.shape[1] * ref.shape[2]
    if ref.kind == "inline":
        if payload is None or len(payload) != size:
            raise ValueError("an inline image's bytes do not match its shape")
        # A front end sends a bytearray (``inline_payload``), which unpickles writable: the
        # tensor is a view of it. Read-only bytes are copied (by numpy: torch.frombuffer and
        # view cost twice as much on the engine's event loop).
        pixels = np.frombuffer(payload, dtype=np.uint8).reshape(ref.shape)
        return torch.from_numpy(pixels if isinstance(payload, bytearray) else pixels.copy())
    if ref.kind == "file":
        # MAP_PRIVATE: the pages are the front end's, read in place.
        flat = torch.from_file(ref.path, shared=False, size=size, dtype=torch.uint8)
        return flat.view(ref.shape)
    raise ValueError(f"unknown image kind {ref.kind!r}")
