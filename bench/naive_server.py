"""The naive baseline server: the same pipeline behind one FastAPI route, each request run alone at
batch 1, no engine (no queue, no dynamic batching, no decode pool).

It is what a first attempt looks like, and what ``bench.serve`` compares the engine against in the
same run. It accepts the same request forms as the service's ``POST /v1/pose`` (raw image body with
``?boxes=<json>``, multipart ``image`` + ``boxes``, or JSON with a base64 ``image``) and answers a
similar JSON body, so the load generator sends the same bytes to both.

    python -m bench.naive_server --model distilpose_s --device cpu --port 8100
"""

from __future__ import annotations

import argparse
import base64
import json
import threading
from collections.abc import Callable
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from bench.common import apply_threads
from model.interfaces import ImageResult, ModelDescription, PipelineItem, PoseOptions, Precision

MAX_PIXELS = 40_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__)
    p.add_argument("--model", default="distilpose_s")
    p.add_argument("--weights", default=None, help="weights file (default: random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument(
        "--mode",
        choices=["lock", "threads"],
        default="lock",
        help="lock: one request at a time in the model (each alone at batch 1); threads: "
        "FastAPI's thread pool runs batch-1 requests concurrently",
    )
    p.add_argument("--no-flip-test", action="store_true", help="default: flip test on")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up batch")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    return p.parse_args(argv)


def _decoder() -> Callable[[bytes], torch.Tensor]:
    """The service's upload decoder when present (same work as the engine), else torchvision's."""
    try:
        from service.uploads import decode_image

        return lambda data: decode_image(data, max_pixels=MAX_PIXELS)
    except ImportError:
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as tv_decode

        return lambda data: tv_decode(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
        )


def _boxes(value: Any) -> torch.Tensor | None:
    """JSON boxes (text or list) -> (M, 4|5) float32, or None."""
    if value is None or value == "":
        return None
    rows = json.loads(value) if isinstance(value, str | bytes) else value
    if not rows:
        return None
    return torch.tensor(rows, dtype=torch.float32)


def result_json(result: ImageResult, describe: ModelDescription) -> dict[str, Any]:
    """The service-like response body for one image."""
    return {
        "persons": [
            {
                "bbox": list(p.bbox),
                "bbox_score": p.bbox_score,
                "score": p.score,
                "keypoints": [list(k) for k in p.keypoints],
            }
            for p in result.persons
        ],
        "image": {"width": result.width, "height": result.height},
        "model": {"name": describe.model, "device": describe.device},
    }


def create_app(
    pipeline: Any, *, mode: str = "lock", flip_test: bool = True, precision: Precision = "fp32"
) -> FastAPI:
    """One route, ``POST /v1/pose`` (alias ``/pose``), plus ``/readyz``.

    Args:
        pipeline: a ``TopDownPipeline`` (``.run``, ``.describe``), already warmed up.
        mode: "lock" serialises model calls; "threads" lets the thread pool run them concurrently.
        flip_test: the default option, as in the service.
        precision: the default precision, as in the service (honoured on CUDA only).
    """
    app = FastAPI(title="naive pose server (benchmark baseline)")
    decode = _decoder()
    lock = threading.Lock() if mode == "lock" else None
    describe = pipeline.describe()
    options = PoseOptions(flip_test=flip_test, precision=precision)

    def infer(data: bytes, boxes: torch.Tensor | None) -> dict[str, Any]:
        image = decode(data)  # (3, H, W) uint8
        item = PipelineItem(image=image, boxes=boxes, options=options)
        if lock is None:
            results, _ = pipeline.run([item])
        else:
            with lock:
                results, _ = pipeline.run([item])
        return result_json(results[0], describe)

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/pose")
    @app.post("/pose")
    async def pose(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form["image"]
            data = await upload.read() if hasattr(upload, "read") else str(upload).encode()
            boxes = _boxes(form.get("boxes"))
        elif ctype.startswith("application/json"):
            body = await request.json()
            data = base64.b64decode(body["image"])
            boxes = _boxes(body.get("boxes"))
        else:
            data = await request.body()
            boxes = _boxes(request.query_params.get("boxes"))
        return JSONResponse(await run_in_threadpool(infer, data, boxes))

    return app


def main(argv: list[str] | None = None) -> None:
    """Entry point: build the pipeline, warm it up, serve with uvicorn."""
    import uvicorn

    from model.pipeline import build_pipeline

    args = parse_args(argv)
    apply_threads(args.threads)
    pipeline = build_pipeline(
        model=args.model,
        weights=args.weights,
        detector=None,
        detector_weights=None,
        device=args.device,
    )
    if not args.no_warmup:
        pipeline.warmup()
    app = create_app(
        pipeline, mode=args.mode, flip_test=not args.no_flip_test, precision=args.precision
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
