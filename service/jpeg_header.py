"""What a JPEG's header says, read from the bytes without Pillow: the frame (size, components) and
the segments that change how the file decodes (EXIF orientation, XMP, Adobe, MPO).

Pillow parses the same segments in Python, which costs more than decoding a small JPEG does
(``service.uploads``); this walk reads a few bytes per segment and stops at the first scan. It
never decides an error: a header it cannot read plainly is left to Pillow, which says what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["JpegHeader", "read_jpeg_header"]

# Frame markers: SOF0 baseline, SOF1 extended sequential, SOF2 progressive (Huffman coded); the
# others are lossless, hierarchical or arithmetic coded.
HUFFMAN_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_OTHER_FRAMES = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_EXIF = b"Exif\x00\x00"
_XMP = b"http://ns.adobe.com/xap/1.0/"
_EXIF_ORIENTATION = 0x0112
# A real header has a dozen segments; past this many the file is left to Pillow.
_MAX_SEGMENTS = 64


@dataclass(frozen=True, slots=True)
class JpegHeader:
    """A JPEG's frame header and the segments before its first scan.

    Attributes:
        marker: the frame marker's second byte (0xC0 baseline, 0xC1, 0xC2 progressive, or one of
            the lossless, hierarchical or arithmetic ones).
        precision: bits per sample.
        width: stored width (before any EXIF orientation).
        height: stored height; 0 when a DNL segment gives it later.
        components: (id, horizontal sampling, vertical sampling) per component.
        orientation: the first EXIF block's orientation; None when there is no EXIF block or it has
            no orientation, 0 when the block cannot be read plainly.
        xmp: an XMP packet is present (Pillow reads an orientation from it too).
        adobe: an Adobe segment is present (it sets the colour transform).
        mpo: an MPF segment is present (several pictures in one file).
    """

    marker: int
    precision: int
    width: int
    height: int
    components: tuple[tuple[int, int, int], ...]
    orientation: int | None
    xmp: bool
    adobe: bool
    mpo: bool


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """Walk a JPEG's segments from SOI to its first scan.

    Returns:
        The header, or None when the bytes are not a plainly readable JPEG header (not a JPEG, cut
        short, a scan or the end before any frame, two frames, too many segments).
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, end = 2, len(data)
    frame: bytes | None = None
    marker_of_frame = 0
    orientation: int | None = None
    exif_seen = xmp = adobe = mpo = False
    for _ in range(_MAX_SEGMENTS):
        if pos + 4 > end or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            pos += 2
            continue
        if marker == 0xDA:  # the first scan: the header is complete
            if frame is None:
                return None
            return _header(marker_of_frame, frame, orientation, xmp, adobe, mpo)
        if marker == 0xD9:
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > end:
            return None
        segment = data[pos + 4 : pos + 2 + length]
        if marker in HUFFMAN_FRAMES or marker in _OTHER_FRAMES:
            if frame is not None:
                return None
            frame, marker_of_frame = segment, marker
        elif marker == 0xE1 and segment.startswith(_EXIF) and not exif_seen:
            exif_seen = True  # Pillow reads the first EXIF block only
            orientation = _exif_orientation(segment[len(_EXIF) :])
        elif marker == 0xE1 and segment.startswith(_XMP):
            xmp = True
        elif marker == 0xE2 and segment.startswith(b"MPF\x00"):
            mpo = True
        elif marker == 0xEE and segment.startswith(b"Adobe"):
            adobe = True
        pos += 2 + length
    return None


def _header(
    marker: int, segment: bytes, orientation: int | None, xmp: bool, adobe: bool, mpo: bool
) -> JpegHeader | None:
    """The frame segment (P, Y, X, Nf, then Nf x (id, sampling, table)) read into a header."""
    if len(segment) < 6:
        return None
    count = segment[5]
    if count == 0 or len(segment) < 6 + 3 * count:
        return None
    components = tuple(
        (segment[at], segment[at + 1] >> 4, segment[at + 1] & 0x0F)
        for at in range(6, 6 + 3 * count, 3)
    )
    return JpegHeader(
        marker=marker,
        precision=segment[0],
        width=(segment[3] << 8) | segment[4],
        height=(segment[1] << 8) | segment[2],
        components=components,
        orientation=orientation,
        xmp=xmp,
        adobe=adobe,
        mpo=mpo,
    )


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag of IFD0 in a TIFF-structured EXIF block: None when absent, 0 when the
    block is not plainly readable (Pillow then decides)."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 0
    order: Literal["little", "big"] = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd < 8 or ifd + 2 > len(tiff):
        return 0
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    if ifd + 2 + 12 * count > len(tiff):
        return 0
    found: int | None = None
    for at in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if int.from_bytes(tiff[at : at + 2], order) != _EXIF_ORIENTATION:
            continue
        kind = int.from_bytes(tiff[at + 2 : at + 4], order)
        values = int.from_bytes(tiff[at + 4 : at + 8], order)
        if found is not None or kind != 3 or values != 1:  # one SHORT, read as Pillow reads it
            return 0
        found = int.from_bytes(tiff[at + 8 : at + 10], order)
    return found
