"""Decoding of uploads (service.uploads): odd but valid images work, bad ones are
refused with the right code, and a decompression bomb is refused from its header alone."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service import uploads
from service.errors import ImageError
from service.uploads import (
    SMALL_IMAGE_BYTES,
    SMALL_IMAGE_PIXELS,
    decode_if_small,
    decode_image,
    sniff_format,
)

MAX = 40_000_000
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def gradient(width: int = 40, height: int = 30) -> Image.Image:
    """An RGB image whose red grows left to right and green top to bottom."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 60)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A hand-built PNG (for 16-bit RGB, or headers claiming huge sizes)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_accepted_format_decodes_to_rgb_uint8(fmt: str) -> None:
    data = encode(gradient(), fmt)
    image = decode_image(data, max_pixels=MAX)
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    assert image.is_contiguous()
    if fmt in ("PNG", "BMP", "TIFF"):  # lossless: pixels exact
        assert torch.equal(image, torch.from_numpy(np.array(gradient())).permute(2, 0, 1))


def test_exif_orientation_is_applied() -> None:
    # A 40x30 landscape image tagged "rotate 90 CW" (orientation 6) comes out 30x40 portrait.
    source = gradient(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_image(encode(source, "JPEG", exif=exif, quality=95), max_pixels=MAX)
    assert image.shape == (3, 40, 30)
    # Rotated 90 clockwise: the old left column (red 0) is now the top row.
    top, bottom = image[0, 0].float().mean(), image[0, -1].float().mean()
    assert top < bottom


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("1", "PNG"),
        ("P", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("I", "TIFF"),
        ("F", "TIFF"),
        ("YCbCr", "JPEG"),
    ],
)
def test_modes_become_rgb(mode: str, fmt: str) -> None:
    if mode == "I":
        source = Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.int32), "I")
    elif mode == "F":
        source = Image.fromarray(np.linspace(0, 1, 1200, dtype=np.float32).reshape(30, 40), "F")
    else:
        source = gradient().convert(mode)
    image = decode_image(encode(source, fmt), max_pixels=MAX)
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8
    if mode in ("L", "CMYK", "I", "F"):
        assert int(image.max()) > 100  # not a black image from clipping or inversion


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    values = (np.arange(1200).reshape(30, 40) * 54).astype(np.uint16)  # up to 64746
    image = decode_image(encode(Image.fromarray(values), "PNG"), max_pixels=MAX)
    expected = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    assert torch.equal(image[0], torch.from_numpy(expected))
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert int(image.max()) > 250  # clipping would have made almost everything 255


def test_sixteen_bit_rgb_png() -> None:
    # 2x1 pixels: white and mid grey, 16 bits per channel (filter byte 0 per row).
    row = b"\x00" + struct.pack(">6H", 65535, 65535, 65535, 32896, 32896, 32896)
    image = decode_image(png_bytes(2, 1, 16, 2, row), max_pixels=MAX)
    assert image.shape == (3, 1, 2)
    assert image[:, 0, 0].tolist() == [255, 255, 255]
    assert abs(int(image[0, 0, 1]) - 128) <= 1


def test_alpha_is_composited_over_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent, dark colour
    rgba.putpixel((0, 0), (10, 20, 30, 255))  # one opaque pixel
    image = decode_image(encode(rgba, "PNG"), max_pixels=MAX)
    assert image[:, 1, 1].tolist() == [255, 255, 255]
    assert image[:, 0, 0].tolist() == [10, 20, 30]


def test_palette_with_transparency() -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    data = encode(pal, "PNG", transparency=0)
    image = decode_image(data, max_pixels=MAX)
    assert image[:, 0, 0].tolist() == [255, 255, 255]
    assert image[:, 1, 1].tolist() == [200, 0, 0]


def test_progressive_jpeg_and_one_pixel_and_extreme_aspect() -> None:
    progressive = encode(gradient(64, 48), "JPEG", progressive=True, quality=90)
    assert decode_image(progressive, max_pixels=MAX).shape == (3, 48, 64)
    one = encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")
    assert decode_image(one, max_pixels=MAX).tolist() == [[[1]], [[2]], [[3]]]
    assert decode_image(encode(gradient(4000, 2), "PNG"), max_pixels=MAX).shape == (3, 2, 4000)
    assert decode_image(encode(gradient(1, 3000), "PNG"), max_pixels=MAX).shape == (3, 3000, 1)


def test_animated_gif_gives_the_first_frame() -> None:
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    image = decode_image(out.getvalue(), max_pixels=MAX)
    assert image.shape == (3, 6, 8)
    assert image[:, 3, 3].tolist() == [255, 0, 0]


def test_decompression_bomb_is_refused_from_the_header() -> None:
    # A PNG header claiming 100000 x 100000 pixels with almost no data: refused before decoding.
    bomb = png_bytes(100_000, 100_000, 8, 2, b"\x00" * 16)
    with pytest.raises(ImageError) as info:
        decode_image(bomb, max_pixels=MAX)
    assert info.value.code == "too_many_pixels" and info.value.status.http == 413
    # A real image just over a small limit.
    with pytest.raises(ImageError) as info:
        decode_image(encode(gradient(40, 30), "PNG"), max_pixels=40 * 30 - 1)
    assert info.value.code == "too_many_pixels"


@pytest.mark.parametrize(
    ("data", "code", "status"),
    [
        (b"", "bad_image", 400),
        (b"\x00\x01\x02\x03 definitely not an image \xff\xfe", "bad_image", 400),
        (b"\xff\xd8\xff\xe0 truncated jpeg", "bad_image", 400),
        (
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
            "unsupported_media_type",
            415,
        ),
        (b"hello, I am plain text\n", "unsupported_media_type", 415),
        (b'{"image": "abc"}', "unsupported_media_type", 415),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "unsupported_media_type", 415),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "unsupported_media_type", 415),
    ],
)
def test_bad_uploads_get_their_code(data: bytes, code: str, status: int) -> None:
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels=MAX)
    assert (info.value.code, info.value.status.http) == (code, status)


def test_truncated_png_is_bad_image() -> None:
    data = encode(gradient(), "PNG")
    with pytest.raises(ImageError) as info:
        decode_image(data[: len(data) // 2], max_pixels=MAX)
    assert info.value.code == "bad_image"


def test_sniff_format_ignores_nothing_but_magic() -> None:
    assert sniff_format(encode(gradient(), "PNG")) == "png"
    assert sniff_format(encode(gradient(), "JPEG")) == "jpeg"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_format(b"\x01\x02\x03") is None


def _png(width: int, height: int, noise: bool = True) -> bytes:
    rng = np.random.default_rng(0)
    pixels = (
        rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        if noise
        else np.zeros((height, width, 3), dtype=np.uint8)
    )
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def test_decode_if_small_decodes_thumbnails_and_leaves_the_rest() -> None:
    thumb = _png(64, 48)
    assert torch.equal(
        decode_if_small(thumb, max_pixels=10**8), decode_image(thumb, max_pixels=10**8)
    )
    # Few bytes, many pixels (a flat image compresses well): its header sends it elsewhere.
    flat = _png(2000, 2000, noise=False)
    assert len(flat) <= SMALL_IMAGE_BYTES and SMALL_IMAGE_PIXELS < 2000 * 2000
    assert decode_if_small(flat, max_pixels=10**8) is None
    # A large file is not even opened.
    assert decode_if_small(_png(300, 300), max_pixels=10**8) is None
    # Over a limit below the small size: None here, refused by the real decode with that limit.
    assert decode_if_small(thumb, max_pixels=1000) is None
    with pytest.raises(ImageError) as refused:
        decode_image(thumb, max_pixels=1000)
    assert refused.value.code == "too_many_pixels"
    # A small file that is broken is refused here, as the pool would.
    with pytest.raises(ImageError) as broken:
        decode_if_small(thumb[:100], max_pixels=10**8)
    assert broken.value.code == "bad_image"


# Plain JPEGs are decoded by simplejpeg (service.uploads._decode_plain_jpeg), everything else by
# Pillow: the two ways must give the same answer for every file, pixel for pixel, error for error.
def _pillow_way(data: bytes, max_pixels: int, monkeypatch: pytest.MonkeyPatch) -> object:
    with monkeypatch.context() as patch:
        patch.setattr(uploads, "_decode_plain_jpeg", lambda data, max_pixels: None)
        return _outcome(data, max_pixels)


def _outcome(data: bytes, max_pixels: int) -> object:
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageError as exc:
        return exc.code


def _jpeg_variants() -> dict[str, tuple[bytes, bool]]:
    """name -> (file, whether it is plain); from the committed COCO photo."""
    photo = Image.open(ASSETS / "000000000785.jpg").convert("RGB").resize((160, 107))
    variants = {
        f"subsampling{sub}-{'progressive' if progressive else 'baseline'}": (
            encode(photo, "JPEG", subsampling=sub, progressive=progressive, quality=90),
            True,
        )
        for sub in (0, 1, 2)
        for progressive in (False, True)
    }
    variants["gray"] = (encode(photo.convert("L"), "JPEG"), True)
    variants["cmyk"] = (encode(photo.convert("CMYK"), "JPEG"), False)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        plain = orientation == 1
        variants[f"exif{orientation}"] = (encode(photo, "JPEG", exif=exif.tobytes()), plain)
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
        b'22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    variants["xmp-orientation"] = (encode(photo, "JPEG", xmp=xmp), False)
    variants["coco-785"] = ((ASSETS / "000000000785.jpg").read_bytes(), True)
    return variants


def test_plain_jpegs_decode_as_pillow_decodes_them(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    for name, (data, plain) in _jpeg_variants().items():
        cut = data[: len(data) // 2]
        forms = {
            "whole": data,
            "cut": cut,
            "cut-with-eoi": cut + b"\xff\xd9",
            "trailing-data": data + b"junk",
        }
        for k in range(12):  # corrupted bytes: libjpeg errors, or warns and decodes
            flipped = bytearray(data)
            for at in rng.integers(2, len(data) - 2, size=int(rng.choice([1, 3, 20]))):
                flipped[at] = int(rng.integers(0, 256))
            forms[f"flipped{k}"] = bytes(flipped)
        for form, blob in forms.items():
            for max_pixels in (10**8, 1000):
                expected = _pillow_way(blob, max_pixels, monkeypatch)
                got = _outcome(blob, max_pixels)
                where = f"{name} {form} max_pixels={max_pixels}"
                if isinstance(expected, str):
                    assert got == expected, where
                else:
                    assert isinstance(got, torch.Tensor), where
                    assert isinstance(expected, torch.Tensor)
                    assert got.is_contiguous() and torch.equal(got, expected), where
        assert (uploads._decode_plain_jpeg(data, 10**8) is not None) == plain, name
    # libjpeg's warnings about corrupt data never reach the process's stderr (JSON logs only).
    assert capfd.readouterr().err == ""
