"""What crosses between a front-end process and the engine process (``service.engine_client``
and ``service.engine_server``): the messages, and decoded images through shared memory.

Transport: a Unix stream socket in the service's private run folder (mode 0700), which the
engine process listens on (``listen``) and each front end connects to (``connect``): one
connection per front end, read and written by asyncio on each side's event loop. A message is a
``(kind, body, payload)`` triple: the kind (``INFER``, ``CANCEL``, ``HELLO`` from a front end;
``RESULT``, ``ERROR``, ``STATE``, ``LOAD`` from the engine), its body, and for ``INFER``
optionally the image's bytes. ``Channel`` is one end of a connection: a burst in is handled as
one list, and every message queued during one event-loop iteration goes out as ONE frame (a
length and a pickled list), so that under load a send syscall and a wake-up of the other side
are paid per burst, not per request. Pickle is safe here: both ends are this service's own
processes, started by one parent, on a socket only its user can open; nothing a client sent is
ever unpickled (bodies hold parsed fields; image bytes are bytes).

Not ZeroMQ (which this transport replaced): its I/O thread puts two thread hand-offs on every
message each way. A message to the engine and its answer cost 30 + 30 us of CPU (front end +
engine) over this socket against 87-95 + 91-98 us over a ZeroMQ DEALER/ROUTER pair, one message
in flight, and 8 + 8 against 19 + 18 with eight (``python -m bench.ipc``; BENCHMARKS.md).

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
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import torch

from model.interfaces import ImageResult, ModelDescription, Person, PoseOptions

logger = logging.getLogger(__name__)

# Message kinds.
HELLO = b"hello"  # front end -> engine: front end N is listening (the engine answers STATE)
INFER = b"infer"  # front end -> engine: InferMessage [+ image bytes]
CANCEL = b"cancel"  # front end -> engine: request id; the caller went away
RESULT = b"result"  # engine -> front end: ResultMessage
ERROR = b"error"  # engine -> front end: ErrorMessage
STATE = b"state"  # engine -> front end: EngineState, on change and as a heartbeat
LOAD = b"load"  # engine -> front end: (wait, batch) seconds of admission by time, with answers

# A frame: its length (4 bytes, little-endian), then a pickled list of messages.
_LENGTH = struct.Struct("<I")

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


class Channel(asyncio.Protocol):
    """One end of a front end <-> engine connection, on the event loop: bursts in, coalesced
    messages out.

    ``put`` coalesces: every message queued during one event-loop iteration leaves as ONE frame
    (a pickled list), so that under load a send and a wake-up of the other side are paid per
    burst, not per request. Writes never wait (asyncio buffers what the socket does not take at
    once): what is in flight is bounded by the engine's admission, not by the socket.

    Args:
        on_messages: Called on the event loop with this channel and the list of
            ``(kind, body, payload)`` of one received frame (what the other side sent in one
            event-loop iteration). Its exceptions are logged and the next frame is still read.
        on_lost: Called once when the connection closes (the other process exited or closed
            it), unless ``close`` closed it.
        header: Called as each frame leaves: a message to lead it (None: none this time). The
            engine's figures for admission by time ride so with every frame of answers.
    """

    def __init__(
        self,
        on_messages: Callable[[Channel, list[Message]], None],
        on_lost: Callable[[Channel], None] | None = None,
        header: Callable[[], Message | None] | None = None,
    ) -> None:
        self._on_messages = on_messages
        self._on_lost = on_lost
        self._header = header
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._queued: list[Message] = []
        self._scheduled = False
        self._closing = False

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, start)
            end = start + _LENGTH.size + length
            if len(buffer) < end:
                break
            try:
                # (Released at once: the buffer cannot be resized while a view of it is held.)
                with memoryview(buffer)[start + _LENGTH.size : end] as frame:
                    messages = loads(frame)
                self._on_messages(self, messages)
            except Exception:
                logger.exception("a message from another process was dropped")
            start = end
        if start:
            del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._queued.clear()
        if not self._closing and self._on_lost is not None:
            self._on_lost(self)

    # --- sending

    def put(self, kind: bytes, body: Any, payload: bytes | bytearray | None = None) -> None:
        """Queue one message; it leaves at the end of this event-loop iteration (dropped if the
        connection is gone)."""
        self._queued.append((kind, body, payload))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send everything queued, as one frame."""
        self._scheduled = False
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        if self._transport is None:
            return  # the other side is gone: nobody reads these
        if self._header is not None and (head := self._header()) is not None:
            queued.insert(0, head)
        body = dumps(queued)
        self._transport.writelines((_LENGTH.pack(len(body)), body))

    def close(self) -> None:
        """Send what is queued and close (``on_lost`` is not called)."""
        if self._closing:
            return
        self.flush()
        self._closing = True
        if self._transport is not None:
            self._transport.close()


async def listen(
    path: str,
    on_messages: Callable[[Channel, list[Message]], None],
    on_lost: Callable[[Channel], None] | None = None,
    header: Callable[[], Message | None] | None = None,
) -> asyncio.Server:
    """Listen on the Unix socket ``path``: a ``Channel`` per connection (the engine's side;
    ``header``: see ``Channel``)."""
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: Channel(on_messages, on_lost, header), path)


async def connect(
    path: str,
    on_messages: Callable[[Channel, list[Message]], None],
    on_lost: Callable[[Channel], None] | None = None,
) -> Channel:
    """Connect to the Unix socket ``path`` (a front end's side).

    Raises:
        OSError: Nothing listens there (yet): ``FileNotFoundError``, ``ConnectionRefusedError``.
    """
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_unix_connection(lambda: Channel(on_messages, on_lost), path)
    return channel


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
