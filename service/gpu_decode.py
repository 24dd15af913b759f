"""JPEG decoding on a worker's device: the header probe and the batched decoder.

``probe_image`` reads only the header, with ``service.uploads.decode_image``'s checks and errors,
and says whether a worker's device may decode the file instead (``EngineConfig.gpu_decode``): a
baseline or progressive, 8-bit YCbCr or grayscale JPEG with no EXIF rotation, which ``decode_jpegs``
(torchvision's batched nvJPEG on CUDA) turns into what ``decode_image`` gives, to the decoders'
rounding. Everything else (CMYK, rotated, other formats) stays with ``decode_image``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from service.jpeg_header import read_jpeg_header
from service.uploads import open_header

# EXIF tag of the orientation (1 = upright; 2..8 = flips and rotations).
EXIF_ORIENTATION = 0x0112
# Frame markers a device decoder takes: SOF0 baseline and SOF2 progressive, Huffman coded.
_DEVICE_FRAME_MARKERS = frozenset({0xC0, 0xC2})
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
    image, fmt = open_header(data, max_pixels)
    with image:
        orientation = _orientation(image)
        decodable = (
            fmt == "jpeg"
            and image.format == "JPEG"  # not MPO (several pictures in one file)
            and orientation in (None, 1)
            and data.endswith(b"\xff\xd9")  # complete: nvJPEG need not notice a truncated file
            and _frame_marker(data) in _DEVICE_FRAME_MARKERS
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
    # Imported here, not with the module: front-end processes import this module (to probe
    # headers) and never decode on a device, and importing torchvision (with its models and
    # torch._dynamo) costs a process about 2 s of start-up and 160 MB of memory.
    from torchvision.io import ImageReadMode, decode_jpeg

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


def _frame_marker(data: bytes) -> int | None:
    """The JPEG's frame marker (``service.jpeg_header``), None when its header is not plain."""
    header = read_jpeg_header(data)
    return None if header is None else header.marker


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
