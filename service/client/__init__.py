"""The pose service's client: a small async API and the ``pose-client`` command.

It stands alone: nothing of the server is imported (no torch, no FastAPI), only the wire contract
(the generated ``service.pb`` stubs), grpcio, httpx, Pillow and numpy, so that it installs and runs
where the server does not. ``tests/service/test_client_standalone.py`` keeps this true.

Modules, by what they are about:
    api        ``connect(target)`` -> ``GrpcPoseClient`` / ``HttpPoseClient`` (``estimate``,
               ``estimate_many``, ``stream``, ``model_info``), ``Options``, ``PoseClientError``
    media      frames from image files, folders, MJPEG, animated images and videos
    results    what the command writes: ``--min-score`` trimming, short floats, COCO results
    draw       results drawn on their frames with Pillow (``--render``)
    progress   the command's progress bar
    cli        the ``pose-client`` command

Example::

    async with connect("localhost:50051") as client:  # or "http://localhost:8000"
        result = await client.estimate(jpeg_bytes)
"""

from service.client.api import (
    GrpcPoseClient,
    HttpPoseClient,
    Options,
    PoseClient,
    PoseClientError,
    connect,
)
from service.client.media import Frame

__all__ = [
    "Frame",
    "GrpcPoseClient",
    "HttpPoseClient",
    "Options",
    "PoseClient",
    "PoseClientError",
    "connect",
]
