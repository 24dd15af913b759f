"""Decode uploaded images, shared by every transport.

``decode_image`` turns the bytes of an upload into a (3, H, W) uint8 RGB tensor, or raises
``ImageError`` (``service.errors.InvalidRequestError``) with a machine-readable code:

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
- A plain JPEG is decoded by simplejpeg, everything else by Pillow (``_decode_plain_jpeg``); the
  pixels, and the errors, are the same either way.

Header probing and batched decoding on a worker's device live in ``service.gpu_decode``; the
request's boxes and options are validated once, with the engine's rules (``service.validation``).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps

from service.errors import ImageError
from service.jpeg_header import HUFFMAN_FRAMES, read_jpeg_header

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
    plain = _decode_plain_jpeg(data, max_pixels)
    if plain is not None:
        return plain
    image, fmt = open_header(data, max_pixels)
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
    pixels = np.asarray(rgb)  # read-only
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageError("bad_image", f"decoded to an unexpected shape {pixels.shape}")
    return _planes(pixels)


def _planes(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) RGB pixels as a contiguous (3, H, W) uint8 tensor of their own.

    numpy makes the copy: torch's permuted ``contiguous()`` is a strided copy on its intra-op
    threads, measured at 1.5-8 ms for a 640x425 photo on this 2-core server (8 ms when the cores
    are busy) against numpy's 0.4-0.6 ms, and 30 against 15 us for a thumbnail.
    """
    return torch.from_numpy(np.array(pixels.transpose(2, 0, 1), order="C", copy=True))


# A file this small whose header says this few pixels decodes in about a millisecond on a server
# core: less than handing it to a pool thread costs (``decode_if_small``).
SMALL_IMAGE_BYTES = 64 * 1024
SMALL_IMAGE_PIXELS = 100_000


def decode_if_small(data: bytes, *, max_pixels: int) -> torch.Tensor | None:
    """``decode_image(data)`` if the image is small (a thumbnail, a video frame at low
    resolution), for the caller to decode on its own thread; None if it is not (read from the
    header alone, so a large image costs nothing here).

    Raises:
        ImageError: As ``decode_image``, for a small file that cannot be decoded.
    """
    if len(data) > SMALL_IMAGE_BYTES:
        return None
    try:
        return decode_image(data, max_pixels=min(SMALL_IMAGE_PIXELS, max_pixels))
    except ImageError as exc:
        if exc.code == "too_many_pixels":
            return None  # not small: decoded elsewhere, under the real limit
        raise


def open_header(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
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
        )
    if fmt is None:
        raise ImageError("bad_image", "the data is not a recognisable image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the bomb warning (the limit is ours), corrupt EXIF
            image = Image.open(io.BytesIO(data), formats=[SUPPORTED_FORMATS[fmt]])
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", f"the image is too large: {exc}") from exc
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...)
        raise ImageError("bad_image", f"cannot read the {fmt} header: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise ImageError("bad_image", f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        image.close()
        raise _too_many_pixels(width, height, max_pixels)
    return image, fmt


def _too_many_pixels(width: int, height: int, max_pixels: int) -> ImageError:
    return ImageError(
        "too_many_pixels",
        f"the image has {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
    )


def _decode_plain_jpeg(data: bytes, max_pixels: int) -> torch.Tensor | None:
    """A plain JPEG decoded by simplejpeg; None for anything else, which Pillow decodes.

    Both decode with libjpeg-turbo's defaults (accurate DCT, smooth upsampling) and give the same
    pixels (``tests/service/test_images.py`` compares them), but Pillow parses the header and
    feeds its decoder in Python: 175 against 37 us for a 64x48 thumbnail on this server's core.
    Plain means: complete (ends with EOI), Huffman coded, 8-bit, grayscale or three components,
    and nothing Pillow would act on (an EXIF or XMP orientation, an Adobe colour transform, several
    pictures). simplejpeg's strict mode refuses a file libjpeg only warns about (corrupt data it
    would decode anyway, without printing): that file, and every other it refuses, goes the Pillow
    way, which decodes what it can and says what is wrong, as before.

    Raises:
        ImageError: "too_many_pixels", read from the header before any pixel is decoded.
    """
    if not data.endswith(b"\xff\xd9"):
        return None  # not a JPEG, or cut short, or with data after it
    header = read_jpeg_header(data)
    if (
        header is None
        or header.marker not in HUFFMAN_FRAMES
        or header.precision != 8
        or len(header.components) not in (1, 3)
        or header.orientation not in (None, 1)
        or header.xmp
        or header.adobe
        or header.mpo
        or header.width == 0
        or header.height == 0
    ):
        return None
    if header.width * header.height > max_pixels:
        raise _too_many_pixels(header.width, header.height, max_pixels)
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True
        )  # (H, W, 3)
    except ValueError:
        return None
    if pixels.shape != (header.height, header.width, 3):
        return None
    return _planes(pixels)


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
