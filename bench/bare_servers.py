"""The baselines of ``bench.frontend``: the same request handled by a bare framework route, with
nothing of the service around it (no engine, no batching, no validation beyond the decode, no
metrics, no logs).

- ``python -m bench.bare_servers http PORT``: one FastAPI route under uvicorn (uvloop +
  httptools), ``POST /v1/pose?boxes=[[x, y, w, h], ...]`` with a raw image body or a JSON body
  (``{"image": base64, "boxes": [...]}``): decodes the image with the service's own decoder and
  answers each box as a person with 17 zero keypoints, as the identity model does.
- ``python -m bench.bare_servers grpc PORT``: a ``grpc.aio`` servicer of ``pose.v1.PoseService``
  doing the same for ``Estimate`` and ``StreamEstimate``.
- ``python -m bench.bare_servers litserve PORT``: the same JSON route served by LitServe, with its
  dynamic batching (``bench.bare_litserve``).
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response

from service.uploads import decode_image

ZERO_KEYPOINTS = [[0.0, 0.0, 0.0]] * 17


def _persons(boxes: list[list[float]]) -> list[dict[str, Any]]:
    return [
        {"bbox": box[:4], "bbox_score": 1.0, "score": 0.0, "keypoints": ZERO_KEYPOINTS}
        for box in boxes
    ]


def http_app() -> Any:
    app = FastAPI()

    @app.post("/v1/pose")
    async def pose(request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            data = json.loads(body)
            image, boxes = base64.b64decode(data["image"]), data.get("boxes") or []
        else:
            image, boxes = body, json.loads(request.query_params.get("boxes", "[]"))
        decoded = decode_image(image, max_pixels=40_000_000)
        answer = {
            "persons": _persons(boxes),
            "image": {"width": int(decoded.shape[2]), "height": int(decoded.shape[1])},
        }
        return Response(json.dumps(answer), media_type="application/json")

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


def grpc_servicer() -> Any:
    """The bare ``pose.v1.PoseService`` servicer (``bench.grpc_app`` calls it in process)."""
    from service.pb.pose.v1 import pose_pb2, pose_pb2_grpc

    def answer(request: Any) -> Any:
        decoded = decode_image(request.image, max_pixels=40_000_000)
        keypoints = [pose_pb2.Keypoint(x=0.0, y=0.0, score=0.0)] * 17
        persons = [
            pose_pb2.Person(box=box, score=0.0, keypoints=keypoints) for box in request.boxes
        ]
        return pose_pb2.EstimateResponse(
            persons=persons,
            frame_id=request.frame_id,
            width=int(decoded.shape[2]),
            height=int(decoded.shape[1]),
        )

    class Servicer(pose_pb2_grpc.PoseServiceServicer):  # type: ignore[misc]
        async def Estimate(self, request: Any, context: Any) -> Any:
            return answer(request)

        async def StreamEstimate(
            self, requests: AsyncIterator[Any], context: Any
        ) -> AsyncIterator[Any]:
            async for request in requests:
                yield answer(request)

    return Servicer()


async def serve_grpc(port: int) -> None:
    import grpc

    from service.pb.pose.v1 import pose_pb2_grpc

    server = grpc.aio.server()
    pose_pb2_grpc.add_PoseServiceServicer_to_server(grpc_servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str]) -> None:
    kind, port = argv[0], int(argv[1])
    from service.serving import run

    if kind == "litserve":
        from bench.bare_litserve import serve

        serve(port)
    elif kind == "http":
        import uvicorn

        config = uvicorn.Config(
            http_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False
        )
        run(uvicorn.Server(config).serve())
    else:
        run(serve_grpc(port))


if __name__ == "__main__":
    main(sys.argv[1:])
