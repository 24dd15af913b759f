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

``probe_image`` reads only the header, with the same checks and errors, and says whether a worker's
device may decode the file instead (``EngineConfig.gpu_decode``): a baseline or progressive, 8-bit
YCbCr or grayscale JPEG with no EXIF rotation, which ``decode_jpegs`` (torchvision's batched nvJPEG
on CUDA) turns into what ``decode_image`` gives, to the decoders' rounding. Everything else (CMYK,
rotated, other formats) stays with ``decode_image``.

``validate_boxes`` checks caller boxes ``[x, y, w, h(, score)]`` in pixels: finite, positive size,
coordinates within +-``MAX_BOX_COORD`` (so the crop geometry cannot overflow float32), at most
``max_boxes``; a 4-value box gets score 1.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

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
    image, fmt = _open_header(data, max_pixels)
    with image:
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


def _open_header(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Sniff the format and read the header lazily (no pixel decoded), enforcing the pixel limit.

    Returns:
        The lazily opened image (the caller closes it) and its ``SUPPORTED_FORMATS`` key.

    Raises:
        ImageError: as ``decode_image`` does, for everything a header can tell.
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
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise ImageError("bad_image", f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            "too_many_pixels",
            f"the image has {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            413,
        )
    return image, fmt


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


# --- JPEG decoding on a worker's device ----------------------------------------------------------

# EXIF tag of the orientation (1 = upright; 2..8 = flips and rotations).
EXIF_ORIENTATION = 0x0112
# Frame markers a device decoder takes: SOF0 baseline and SOF2 progressive, Huffman coded.
_DEVICE_FRAME_MARKERS = frozenset({0xFFC0, 0xFFC2})
# Luma sampling factors (h, v) of the chroma subsamplings nvJPEG decodes (4:4:4, 4:2:2, 4:4:0,
# 4:2:0, 4:1:1, 4:1:0) with both chroma components at (1, 1).
_DEVICE_LUMA_SAMPLING = frozenset({(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (4, 2)})
# Component ids "R", "G", "B": libjpeg reads such a 3-component JPEG as RGB, not YCbCr.
_RGB_COMPONENT_IDS = (0x52, 0x47, 0x42)


@dataclass(frozen=True)
class ImageHeader:
    """What an upload's header says, read without decoding a pixel (``probe_image``).

    Attributes:
        format: a key of ``SUPPORTED_FORMATS``.
        width: stored width in pixels (before the EXIF orientation is applied).
        height: stored height in pixels.
        mode: Pillow's mode of the stored data ("RGB" for a 3-component JPEG, "L", "CMYK", "P",
            ...).
        orientation: the EXIF orientation (1..8), None when absent, 0 when the EXIF block cannot
            be read.
        device_decodable: a JPEG that a worker's device decoder (``decode_jpegs``) decodes to
            what ``decode_image`` gives: baseline or progressive Huffman, 8-bit, YCbCr with a
            subsampling nvJPEG knows or grayscale, orientation 1 or absent, and ending with the
            EOI marker. Everything else (CMYK/YCCK, RGB-coded, arithmetic, lossless, rotated,
            truncated or with trailing data, MPO, other formats) is decoded on the CPU by
            ``decode_image``.
    """

    format: str
    width: int
    height: int
    mode: str
    orientation: int | None
    device_decodable: bool


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG queued encoded, for its worker to decode on the worker's device.

    Attributes:
        data: the file as a 1-D uint8 CPU tensor (what ``decode_jpegs`` takes).
        raw: the same bytes (for ``decode_image`` when the device decoder refuses the file).
        width: width from the header; the decoded image must have it.
        height: height from the header.
    """

    data: torch.Tensor
    raw: bytes
    width: int
    height: int

    @classmethod
    def from_upload(cls, raw: bytes, header: ImageHeader) -> EncodedJpeg:
        """Wrap ``raw`` (one copy, into the tensor) with the size ``probe_image`` read."""
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # (N,) bytes
        return cls(data=data, raw=raw, width=header.width, height=header.height)


def probe_image(data: bytes, *, max_pixels: int) -> ImageHeader:
    """Read an upload's header (no pixel decoded) and say whether a device may decode it.

    The checks are ``decode_image``'s header checks: same errors, same codes, so an upload refused
    here would have been refused by ``decode_image`` too, before any pixel was decoded.

    Args:
        data: the encoded file.
        max_pixels: largest width x height accepted.

    Returns:
        The header; ``device_decodable`` says whether ``decode_jpegs`` may decode it.

    Raises:
        ImageError: "bad_image", "unsupported_media_type" or "too_many_pixels", as
            ``decode_image``.
    """
    image, fmt = _open_header(data, max_pixels)
    with image:
        orientation = _orientation(image)
        decodable = (
            fmt == "jpeg"
            and image.format == "JPEG"  # not MPO (several pictures in one file)
            and orientation in (None, 1)
            and data.endswith(b"\xff\xd9")  # complete: nvJPEG need not notice a truncated file
            and _jpeg_frame_marker(data) in _DEVICE_FRAME_MARKERS
            and _device_colour_model(image)
        )
        return ImageHeader(
            format=fmt,
            width=image.size[0],
            height=image.size[1],
            mode=image.mode,
            orientation=orientation,
            device_decodable=decodable,
        )


def decode_jpegs(datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEGs to RGB in one batched call: nvJPEG on a CUDA device, libjpeg-turbo on the CPU.

    ``torchvision.io.decode_jpeg`` with a device is the one GPU JPEG decoder that torchvision 0.26
    and 0.29 both have (0.29 deprecates all of ``torchvision.io``'s decoding in favour of
    TorchCodec and says so with a ``DeprecationWarning``, which Python does not show by default).
    On CUDA it decodes on a stream of its own and makes the current stream wait for it, so the
    images are ready for whatever the caller's stream runs next. torchvision keeps one
    process-wide nvJPEG decoder, guarded by a lock, and rebuilds it whenever the device changes:
    call it for one CUDA device per process.

    Args:
        datas: JPEG files as 1-D uint8 CPU tensors (``EncodedJpeg.data``); qualify them with
            ``probe_image`` first (it neither applies EXIF orientation nor converts CMYK).
        device: where to decode; a CUDA device should carry its index.

    Returns:
        One (3, H, W) uint8 RGB tensor on ``device`` per file, in order.

    Raises:
        RuntimeError: a file could not be decoded (torchvision's error); the call is all or
            nothing, so a failing batch says nothing about which file failed.
    """
    if not datas:
        return []
    decoded = decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)
    return list(decoded)


def sample_jpeg(width: int = 64, height: int = 48) -> bytes:
    """A small baseline 4:2:0 JPEG (a colour gradient) for warming a device decoder up."""
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :]  # (1, W)
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]  # (H, 1)
    rgb = np.stack(
        np.broadcast_arrays(ramp + 0 * rows, rows + 0 * ramp, 255 - (ramp + rows) / 2), -1
    )  # (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag; None when absent, 0 when the EXIF block cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data"
            value = image.getexif().get(EXIF_ORIENTATION)
    except Exception:
        return 0
    if value is None:
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else 0


def _jpeg_frame_marker(data: bytes) -> int | None:
    """The first SOFn marker of a JPEG (0xFFC0..0xFFCF but DHT, JPG, DAC), walking the segments
    from SOI; None when the data ends or scanning starts first."""
    pos, end = 2, len(data)  # after SOI
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            pos += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return 0xFF00 | marker
        if marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return None
        pos += 2 + length
    return None


def _device_colour_model(image: Image.Image) -> bool:
    """Grayscale, or YCbCr with a subsampling nvJPEG knows (Pillow's JPEG header fields)."""
    if image.mode == "L":
        return True
    if image.mode != "RGB" or image.info.get("adobe_transform") == 0:
        return False  # CMYK/YCCK, or RGB-coded (Adobe transform 0)
    layers = getattr(image, "layer", [])  # [(component id, h sampling, v sampling, table), ...]
    if len(layers) != 3 or tuple(c[0] for c in layers) == _RGB_COMPONENT_IDS:
        return False
    luma, chroma = layers[0], layers[1:]
    return (luma[1], luma[2]) in _DEVICE_LUMA_SAMPLING and all(
        (c[1], c[2]) == (1, 1) for c in chroma
    )


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
