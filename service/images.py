"""Decode and validate uploaded images and caller boxes; shared by the HTTP and gRPC transports.

``decode_image`` turns the bytes of an upload into a (3, H, W) uint8 RGB tensor, or raises
``ImageError`` with a machine-readable code and the HTTP status it maps to:

- The format is sniffed from the magic bytes; the declared Content-Type is never trusted. JPEG, PNG,
  WebP, BMP, GIF and TIFF are accepted; SVG, text, PDF, HEIF/AVIF and friends get 415.
- The pixel limit is checked from the header *before* any pixel is decoded (Pillow's ``Image.open``
  only reads the header), so a decompression bomb costs a few bytes of parsing, never gigabytes.
- The EXIF orientation is applied (a phone photo comes out upright, as a viewer shows it).
- Every mode becomes RGB: palette, grayscale and CMYK through Pillow; 16-bit and 32-bit grayscale
  are scaled down to 8 bits (not clipped); an alpha channel is composited over white, which is what
  a person sees in a viewer and keeps arbitrary colours of fully transparent pixels out of the
  crops.
- Animated GIF/WebP and multi-page TIFF: the first frame. ICC profiles are not applied.

``validate_boxes`` checks caller boxes ``[x, y, w, h(, score)]`` in pixels: finite, positive size,
coordinates within +-``MAX_BOX_COORD`` (so the crop geometry cannot overflow float32), at most
``max_boxes``; a 4-value box gets score 1.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

# Format name -> Pillow plugin name; the only formats ``decode_image`` hands to Pillow.
SUPPORTED_FORMATS: dict[str, str] = {
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "bmp": "BMP",
    "gif": "GIF",
    "tiff": "TIFF",
}

# Content-Type values accepted for a raw image body (the bytes are still sniffed).
IMAGE_MEDIA_TYPES: frozenset[str] = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
        "image/gif",
        "image/tiff",
        "image/tif",
        "application/octet-stream",
    }
)

# A box coordinate or size beyond this many pixels is refused: far past any image the pixel limit
# allows, and small enough that the affine crop maths stays finite in float32.
MAX_BOX_COORD = 1e7


class ImageError(ValueError):
    """An upload or its boxes cannot be used.

    Attributes:
        code: machine-readable reason: "bad_image", "bad_base64", "too_many_pixels",
            "unsupported_media_type" or "bad_boxes".
        message: what went wrong, for a person.
        status: the HTTP status it maps to (400, 413 or 415); gRPC maps every one to
            INVALID_ARGUMENT.
    """

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def sniff_format(data: bytes) -> str | None:
    """Name the image format from its magic bytes.

    Returns:
        A key of ``SUPPORTED_FORMATS``, "unsupported" for a recognised format or text that is not
        accepted (SVG, XML, HTML, JSON, PDF, HEIF/AVIF, ...), or None when the bytes mean nothing.
    """
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[4:8] == b"ftyp" or head.startswith(
        (b"%PDF", b"\x00\x00\x01\x00", b"8BPS", b"\xff\x0a")
    ):
        return "unsupported"  # ISO media (HEIF/AVIF/MP4), PDF, ICO, PSD, JPEG XL
    if _looks_like_text(head):
        return "unsupported"  # SVG, HTML, XML, JSON, base64 sent as a raw body, ...
    return None


def _looks_like_text(head: bytes) -> bool:
    """Whether the first bytes are printable text (optionally after a UTF-8 BOM)."""
    head = head.removeprefix(b"\xef\xbb\xbf")
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A cut multi-byte character at the end is still text.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def decode_image(data: bytes, *, max_pixels: int) -> torch.Tensor:
    """Decode an uploaded image into RGB.

    Args:
        data: the encoded file.
        max_pixels: largest width x height accepted, checked from the header before decoding.

    Returns:
        (3, H, W) uint8 RGB tensor (contiguous, on the CPU).

    Raises:
        ImageError: "bad_image" (400) for empty, corrupt or truncated data; "unsupported_media_type"
            (415) for a format that is not an accepted raster image; "too_many_pixels" (413) past
            ``max_pixels``.
    """
    if not data:
        raise ImageError("bad_image", "the image is empty")
    fmt = sniff_format(data)
    if fmt == "unsupported":
        raise ImageError(
            "unsupported_media_type",
            "not a supported image; send JPEG, PNG, WebP, BMP, GIF or TIFF",
            415,
        )
    if fmt is None:
        raise ImageError("bad_image", "the data is not a recognisable image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[SUPPORTED_FORMATS[fmt]])
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", f"the image is too large: {exc}", 413) from exc
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...)
        raise ImageError("bad_image", f"cannot read the {fmt} header: {exc}") from exc
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError("bad_image", f"the image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageError(
                "too_many_pixels",
                f"the image has {width}x{height} = {width * height} pixels; the limit is "
                f"{max_pixels}",
                413,
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data", palette notes
                image.seek(0)  # first frame of an animation or the first page of a TIFF
                image.load()
                rgb = _to_rgb(_apply_orientation(image))
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError("bad_image", f"cannot decode the {fmt} image: {exc}") from exc
    array = np.array(rgb, dtype=np.uint8, copy=True)  # (H, W, 3)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError("bad_image", f"decoded to an unexpected shape {array.shape}")
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip by the EXIF orientation tag; a malformed EXIF block leaves the image as it is."""
    try:
        transposed = ImageOps.exif_transpose(image)
    except Exception:
        return image
    return transposed if transposed is not None else image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (alpha composited over white, high bit depths scaled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _wide_gray_to_rgb(image)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grayscale -> 8-bit RGB.

    Integer data is taken as 16-bit (0..65535 -> 0..255), which is what PNG and TIFF carry; float
    data as [0, 1] when it fits there, else as 0..255. Values outside are clipped.
    """
    values = np.asarray(image)
    if values.dtype.kind == "f":
        finite = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(finite.max()) if finite.size else 0.0
        scaled = finite * 255.0 if top <= 1.0 else finite
    else:
        scaled = values.astype(np.float64) / 257.0
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)  # (H, W)
    return Image.fromarray(np.stack([gray, gray, gray], axis=-1), mode="RGB")


def validate_boxes(
    boxes: Any,
    *,
    max_boxes: int,
    image_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Check caller boxes and return them as a tensor.

    Args:
        boxes: a sequence of ``[x, y, w, h]`` or ``[x, y, w, h, score]`` in pixels (JSON lists or
            protobuf-built lists), or an (M, 4) / (M, 5) tensor or array.
        max_boxes: most boxes accepted.
        image_size: (W, H) when known; every box must then overlap the image.

    Returns:
        (M, 5) float32 [x, y, w, h, score]; a box without a score gets 1.0.

    Raises:
        ImageError: "bad_boxes" (400) with the index of the first bad box.
    """
    if isinstance(boxes, torch.Tensor | np.ndarray):
        boxes = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes)
        if boxes.ndim != 2:
            raise ImageError("bad_boxes", f"boxes must be a 2-D array, got shape {boxes.shape}")
        boxes = boxes.tolist()
    if not isinstance(boxes, Sequence) or isinstance(boxes, str | bytes):
        raise ImageError("bad_boxes", "boxes must be a list of [x, y, w, h] or [x, y, w, h, score]")
    if len(boxes) > max_boxes:
        raise ImageError("bad_boxes", f"{len(boxes)} boxes given; at most {max_boxes} are allowed")
    rows: list[list[float]] = []
    for index, box in enumerate(boxes):
        rows.append(_check_box(index, box, image_size))
    if not rows:
        return torch.zeros((0, 5), dtype=torch.float32)
    return torch.tensor(rows, dtype=torch.float32)


def _check_box(index: int, box: Any, image_size: tuple[int, int] | None) -> list[float]:
    """One box -> [x, y, w, h, score] floats, or ImageError naming ``index``."""
    where = f"box {index}"
    if not isinstance(box, Sequence) or isinstance(box, str | bytes) or len(box) not in (4, 5):
        raise ImageError("bad_boxes", f"{where}: expected [x, y, w, h] or [x, y, w, h, score]")
    values: list[float] = []
    for value in box:
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise ImageError("bad_boxes", f"{where}: {value!r} is not a number")
        number = float(value)
        if not math.isfinite(number):
            raise ImageError("bad_boxes", f"{where}: values must be finite, got {number}")
        if abs(number) > MAX_BOX_COORD:
            raise ImageError("bad_boxes", f"{where}: {number} is out of range (|v| <= 1e7)")
        values.append(number)
    x, y, w, h = values[:4]
    # Checked as float32, the dtype the pipeline computes in (5e-324 > 0 is 0 there).
    if np.float32(w) <= 0 or np.float32(h) <= 0:
        raise ImageError("bad_boxes", f"{where}: width and height must be > 0, got {w} x {h}")
    if image_size is not None:
        width, height = image_size
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            raise ImageError(
                "bad_boxes",
                f"{where}: [{x}, {y}, {w}, {h}] lies outside the {width}x{height} image",
            )
    score = values[4] if len(values) == 5 else 1.0
    return [x, y, w, h, score]
