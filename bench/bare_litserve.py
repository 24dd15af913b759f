"""The LitServe baseline of ``bench.frontend`` (``python -m bench.bare_servers litserve PORT``).

``POST /v1/pose`` with a JSON body (``{"image": base64, "boxes": [...]}``; a JSON body only:
LitServe hands its workers the parsed body, not the request), answered as ``bench.bare_servers``'
routes answer it: the image decoded with the service's own decoder, each box a person with 17 zero
keypoints. LitServe (``litserve``, a dev extra) batches with its dynamic batcher (16 requests,
2 ms: the service's defaults) and runs on its own processes: one API server (uvicorn) and one
inference worker, over its queues. It is what a user would otherwise reach for to batch a model
behind HTTP. The API class lives at module level: LitServe pickles it into its worker process.
"""

from __future__ import annotations

import base64
from typing import Any

import litserve

from bench.bare_servers import _persons
from service.uploads import decode_image

MAX_BATCH_SIZE = 16
BATCH_TIMEOUT_S = 0.002


class PoseAPI(litserve.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        pass

    # (No annotations on ``request`` and on ``encode_response``'s return: LitServe reads them as
    # the route's request and response types, and the defaults are the JSON body as it came.)
    def decode_request(self, request):
        return base64.b64decode(request["image"]), request.get("boxes") or []

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs

    def predict(self, inputs: list[tuple[bytes, list[list[float]]]]) -> list[dict[str, Any]]:
        answers = []
        for image, boxes in inputs:
            decoded = decode_image(image, max_pixels=40_000_000)
            size = {"width": int(decoded.shape[2]), "height": int(decoded.shape[1])}
            answers.append({"persons": _persons(boxes), "image": size})
        return answers

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output):
        return output


def serve(port: int) -> None:
    """Serve on 127.0.0.1:``port`` until signalled (``GET /health`` answers once ready)."""
    api = PoseAPI(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/v1/pose")
    server = litserve.LitServer(api, accelerator="cpu", devices=1)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)
