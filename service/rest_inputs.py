"""The HTTP request side: the three ways an image comes in, parsed into engine requests.

- a raw image body (``Content-Type: image/jpeg|png|webp|bmp|gif|tiff`` or
  ``application/octet-stream``, or none, or the ``application/x-www-form-urlencoded`` that curl's
  ``--data-binary`` sends when the body is an image), options and ``boxes`` (JSON text) as query
  parameters;
- ``multipart/form-data``: an ``image`` file part (several for a batch), ``boxes`` as JSON text, and
  option fields;
- ``application/json``: ``{"image": "<base64>", "boxes": [[x, y, w, h(, score)], ...], "flip_test":
  true, ...}`` (a list of such objects for a batch).

Options given in the body override those in the query, which override the server's defaults. No
boxes, or an empty list, means "find the persons" (the detector, or the whole image without one), as
an empty ``repeated Box`` does over gRPC. The image bytes are decoded later, in the engine's decode
pool (``service.uploads.decode_image``), whose format sniffing decides; the Content-Type only has to
be plausible. The boxes and options are parsed here and validated once, by the engine
(``service.validation``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from model.interfaces import PoseOptions
from service.engine import PoseRequest
from service.errors import ImageError, InvalidRequestError
from service.settings import Settings
from service.uploads import IMAGE_MEDIA_TYPES, SUPPORTED_FORMATS, sniff_format

Precision = Literal["fp32", "bf16", "fp16"]
_M = TypeVar("_M", bound=BaseModel)
# JSON and base64 larger than this are parsed in a thread, so that the event loop stays free.
_PARSE_ON_LOOP_BYTES = 256 * 1024

# Raw-body media types listed in the OpenAPI document.
RAW_MEDIA_TYPES = (
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/bmp",
    "image/gif",
    "image/tiff",
    "application/octet-stream",
)


class PoseOptionsIn(BaseModel):
    """Per-request options; unset ones take the server's defaults."""

    model_config = ConfigDict(extra="forbid")

    flip_test: bool | None = Field(None, description="average with the flipped image (default on)")
    return_sigmas: bool | None = Field(None, description="add per-keypoint sigmas in pixels")
    oks_nms: bool | None = Field(None, description="OKS-NMS over detector persons")
    precision: Precision | None = Field(None, description="compute precision on CUDA")
    swap_flip_scores: bool | None = Field(None, description="corrected flip score merge")


class BatchQuery(PoseOptionsIn):
    """Query parameters of ``/v1/pose/batch``: the options, and what the answer carries."""

    model_info: bool = Field(
        True,
        description="false leaves keypoint_names, skeleton and model out of each answer (they "
        "are in GET /v1/models): lean answers for video and bulk clients",
    )


class PoseQuery(BatchQuery):
    """Query parameters of ``/v1/pose``: the options, and boxes for a raw image body."""

    boxes: str | None = Field(None, description="JSON list of [x, y, w, h(, score)] in pixels")


class RenderQuery(PoseQuery):
    """Query parameters of ``/v1/pose/render``."""

    min_score: float = Field(0.3, ge=-1e6, le=1e6, description="smallest keypoint score drawn")


class PoseJsonIn(PoseOptionsIn):
    """``application/json`` body: the image as base64 (standard or URL-safe; a data URL works).

    Strict types: JSON has booleans, so ``"flip_test": "yes"`` is refused, as gRPC would.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    image: str = Field(..., description="base64 of the encoded image")
    # Any: the engine validates boxes (one pass, the same checks over every transport).
    boxes: list[Any] | None = Field(
        None, description="[[x, y, w, h(, score)], ...] in pixels, score in [0, 1]"
    )


class InputReader:
    """Turns the body and query of a request into ``PoseRequest``s (bytes still encoded).

    Args:
        settings: defaults (flip test, precision), limits (boxes, images per request) and the
            request deadline.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def read_single(self, request: Request, query: PoseQuery) -> PoseRequest:
        """One image: raw body, multipart or JSON."""
        ctype = media_type(request)
        defaults = _given(query)
        if ctype == "application/json":
            body = _model_of(PoseJsonIn, await _json_body(request))
            data = await _b64decode_off_loop(body.image)
            return self.item(data, body.boxes, {**defaults, **_given(body)})
        if ctype == "multipart/form-data":
            async with request.form(max_files=4) as form:
                parts = form.getlist("image")
                if len(parts) != 1:
                    raise InvalidRequestError(
                        "invalid_request", "send exactly one 'image' file part"
                    )
                fields = _form_fields(form, exclude=("image",))
                boxes = _json_text(fields.pop("boxes", None) or query.boxes)
                options = _given(_model_of(PoseOptionsIn, fields))
                return self.item(await _file_bytes(parts[0]), boxes, {**defaults, **options})
        if ctype == "application/x-www-form-urlencoded":
            # curl --data-binary without -H sends this: take the body when it is an image.
            data = await request.body()
            if sniff_format(data) not in SUPPORTED_FORMATS:
                _check_raw_media_type(ctype)
            return self.item(data, _json_text(query.boxes), defaults)
        _check_raw_media_type(ctype)
        return self.item(await request.body(), _json_text(query.boxes), defaults)

    async def read_batch(self, request: Request, query: PoseOptionsIn) -> list[PoseRequest]:
        """Several images: multipart ``image`` parts or a JSON list."""
        ctype = media_type(request)
        defaults = _given(query)
        if ctype == "application/json":
            data = await _json_body(request)
            if not isinstance(data, list) or not data:
                raise InvalidRequestError(
                    "invalid_request", "the body must be a non-empty JSON list"
                )
            self._check_count(len(data))
            bodies = [_model_of(PoseJsonIn, entry) for entry in data]
            return [
                self.item(await _b64decode_off_loop(b.image), b.boxes, {**defaults, **_given(b)})
                for b in bodies
            ]
        if ctype != "multipart/form-data":
            raise InvalidRequestError(
                "unsupported_media_type", "a batch is multipart/form-data or a JSON list"
            )
        async with request.form(max_files=self.settings.max_images_per_request + 1) as form:
            parts = form.getlist("image")
            if not parts:
                raise InvalidRequestError("invalid_request", "send one or more 'image' file parts")
            self._check_count(len(parts))
            fields = _form_fields(form, exclude=("image",))
            boxes = _json_text(fields.pop("boxes", None))
            if boxes is not None and (not isinstance(boxes, list) or len(boxes) != len(parts)):
                raise ImageError("bad_boxes", "boxes must be a JSON list with one entry per image")
            options = {**defaults, **_given(_model_of(PoseOptionsIn, fields))}
            return [
                self.item(await _file_bytes(part), None if boxes is None else boxes[i], options)
                for i, part in enumerate(parts)
            ]

    def item(self, data: bytes, boxes: Any, options: dict[str, Any]) -> PoseRequest:
        """Combine one image, its boxes and its options, with the request deadline."""
        if not data:
            raise ImageError("bad_image", "the image is empty")
        s = self.settings
        return PoseRequest(
            image=data,
            boxes=None if boxes is None or boxes == [] else boxes,
            options=PoseOptions(
                flip_test=_pick(options, "flip_test", s.flip_test),
                return_sigmas=_pick(options, "return_sigmas", False),
                oks_nms=_pick(options, "oks_nms", False),
                precision=_pick(options, "precision", s.precision),
                swap_flip_scores=_pick(options, "swap_flip_scores", False),
            ),
            deadline=time.monotonic() + s.request_timeout_ms / 1000.0,
        )

    def _check_count(self, count: int) -> None:
        limit = self.settings.max_images_per_request
        if count > limit:
            raise InvalidRequestError(
                "too_many_images", f"{count} images; at most {limit} per request"
            )


def openapi_body(*, batch: bool, query: type[BaseModel]) -> dict[str, Any]:
    """The documented ways in (JSON, multipart and, for one image, a raw image body) and the
    query parameters ``query`` parses (``parse_query``)."""
    schema = PoseJsonIn.model_json_schema()
    options = {k: v for k, v in schema["properties"].items() if k not in ("image", "boxes")}
    binary = {"type": "string", "format": "binary"}
    if batch:
        json_schema: dict[str, Any] = {"type": "array", "items": schema, "minItems": 1}
        image: dict[str, Any] = {"type": "array", "items": binary, "minItems": 1}
        boxes_text = "JSON list with one entry (null or a list of boxes) per image"
    else:
        json_schema, image = schema, binary
        boxes_text = "JSON list of [x, y, w, h(, score)] in pixels"
    multipart = {
        "type": "object",
        "properties": {"image": image, "boxes": {"type": "string", "description": boxes_text}}
        | options,
        "required": ["image"],
    }
    content: dict[str, Any] = {
        "application/json": {"schema": json_schema},
        "multipart/form-data": {"schema": multipart},
    }
    if not batch:
        content |= {media: {"schema": binary} for media in RAW_MEDIA_TYPES}
    return {
        "parameters": query_parameters(query),
        "requestBody": {"required": True, "content": content},
    }


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower case ("" when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _check_raw_media_type(ctype: str) -> None:
    if ctype in ("", *IMAGE_MEDIA_TYPES):
        return
    hint = ""
    if ctype == "application/x-www-form-urlencoded":
        hint = " (the body is not an image; curl: --data-binary @photo.jpg)"
    raise InvalidRequestError(
        "unsupported_media_type",
        f"unsupported Content-Type {ctype!r}: send an image (image/jpeg, image/png, image/webp, "
        f"image/bmp, image/gif, image/tiff), multipart/form-data or application/json{hint}",
    )


def _pick(given: dict[str, Any], key: str, default: Any) -> Any:
    value = given.get(key)
    return default if value is None else value


def _given(model: BaseModel) -> dict[str, Any]:
    """The option fields a client actually gave."""
    names = set(PoseOptionsIn.model_fields) & model.model_fields_set
    return {name: getattr(model, name) for name in names}


async def _json_body(request: Request) -> Any:
    body = await request.body()
    if len(body) > _PARSE_ON_LOOP_BYTES:  # a large body parses in a thread, not on the loop
        return await asyncio.to_thread(_parse_json, body, "bad_json", "the body")
    return _parse_json(body, "bad_json", "the body")


def _json_text(text: str | None) -> Any:
    """Boxes sent as JSON text (query parameter or form field)."""
    if text is None or text == "":
        return None
    return _parse_json(text, "bad_boxes", "boxes")


def _parse_json(data: bytes | str, code: str, what: str) -> Any:
    """JSON, or a 400 with ``code``: malformed, too deeply nested (Python's recursion limit, about
    1,000 levels) or a number too large for the parser (over 4,300 digits)."""
    try:
        return json.loads(data)
    except RecursionError as exc:
        raise InvalidRequestError(code, f"{what} is nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(code, f"{what} is not valid JSON: {str(exc)[:200]}") from exc


def parse_query(model: type[_M], request: Request) -> _M:
    """The query parameters as ``model`` (a repeated parameter keeps its last value, as FastAPI
    does), or a 422 whose locations start with ``"query"``.

    Parsed here rather than by a FastAPI ``Query()`` model parameter: FastAPI re-inspects the
    model's annotations on every request, which cost more than the rest of a small request's
    parsing together (issue 16's profile). ``query_parameters`` documents them.
    """
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        raise RequestValidationError(
            [{**error, "loc": ("query", *error["loc"])} for error in errors]
        ) from exc


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """``model``'s fields as OpenAPI query parameters (what FastAPI writes for a ``Query()``
    model), for ``openapi_extra``."""
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    parameters = []
    for name, field in schema["properties"].items():
        parameter = {"name": name, "in": "query", "required": name in required, "schema": field}
        if "description" in field:
            parameter["description"] = field["description"]
        parameters.append(parameter)
    return parameters


def _model_of(model: type[_M], data: Any) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_input=False, include_url=False)) from exc


def _form_fields(form: Any, *, exclude: Sequence[str]) -> dict[str, Any]:
    """Text fields of a form (a repeated field keeps its last value); stray files are refused."""
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in exclude:
            continue
        if isinstance(value, UploadFile):
            raise InvalidRequestError("invalid_request", f"field {key!r} must be text, not a file")
        fields[key] = value
    return fields


async def _file_bytes(part: Any) -> bytes:
    if not isinstance(part, UploadFile):
        raise InvalidRequestError(
            "invalid_request", "'image' must be a file part (curl: -F image=@photo.jpg)"
        )
    return await part.read()


async def _b64decode_off_loop(text: str) -> bytes:
    """``_b64decode``, in a thread when the text is large."""
    if len(text) > _PARSE_ON_LOOP_BYTES:
        return await asyncio.to_thread(_b64decode, text)
    return _b64decode(text)


def _b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, with or without padding, newlines or a data-URL prefix."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = "".join(text.split())
    altchars = b"-_" if ("-" in text or "_" in text) else None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("bad_base64", f"image is not valid base64: {exc}") from exc
