"""What a compressed frame says about itself: its own dimensions, read from the codestream header.

Rows and Columns in the DICOM header are a claim; the decoder believes the codestream.  A 1.7 KB
JPEG 2000 under a 512 x 512 header can hold a 16000 x 16000 image, and decoding it costs gigabytes.
So before anything is decoded, the header of frame 0's codestream is parsed (a few bytes of its
first fragments, never a decode):

* JPEG 2000 / HTJ2K: the SIZ marker segment (image and component grid, number of components).
* JPEG (baseline, extended, lossless): the first SOFn marker segment (lines, samples per line,
  number of components).
* JPEG-LS: the SOF55 marker segment (same layout as SOFn).
* RLE Lossless: the 64-byte RLE header (number of segments and their offsets).  RLE carries no
  dimensions; the number of segments must be Samples per Pixel x bytes per sample, and each segment
  must be long enough to fill Rows x Columns bytes at RLE's best ratio (128 bytes from 2).

:func:`frame_header` returns what the codestream says (None for native, uncompressed data or a
syntax we do not inspect); :class:`CodestreamError` says the header is missing or malformed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, RLELossless

#: The codestream header must lie within this many bytes of the frame's start (JPEG APPn segments
#: before SOF are at most 64 KiB each; a real file has a few).
HEADER_SEARCH_BYTES = 1024 * 1024

_ITEM = 0xFFFEE000
_SEQ_END = 0xFFFEE0DD


class CodestreamError(ValueError):
    """Frame 0's codestream header is missing, truncated or malformed."""


@dataclass(frozen=True)
class FrameHeader:
    """What frame 0's codestream declares about itself."""

    kind: str          # "JPEG 2000", "JPEG", "JPEG-LS" or "RLE"
    rows: int | None   # None for RLE (it carries no dimensions)
    columns: int | None
    components: int
    precision: int | None = None  # bits per sample, where the codestream says
    #: RLE only: byte length of each segment.
    segment_lengths: tuple[int, ...] = ()


def _syntax(ds: Dataset) -> str | None:
    meta = getattr(ds, "file_meta", None)
    uid = None if meta is None else meta.get("TransferSyntaxUID")
    return None if uid is None else str(uid)


def _fragments(data: bytes) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) of each item of encapsulated pixel data, the Basic Offset Table first."""
    view = memoryview(data)
    i = 0
    while i + 8 <= len(view):
        group, elem, length = struct.unpack_from("<HHL", view, i)
        tag = group << 16 | elem
        if tag == _SEQ_END:
            return
        if tag != _ITEM:
            raise CodestreamError(f"encapsulated pixel data: expected an item tag at byte {i}, found {tag:08X}")
        if length == 0xFFFFFFFF or i + 8 + length > len(view):
            raise CodestreamError(f"encapsulated pixel data: item at byte {i} runs past the end of the data")
        yield i + 8, length
        i += 8 + length


def first_frame_prefix(data: bytes, limit: int = HEADER_SEARCH_BYTES) -> tuple[bytes, int]:
    """Up to ``limit`` bytes from the start of frame 0 (fragments joined) and the first fragment's length."""
    items = _fragments(data)
    try:
        next(items)  # Basic Offset Table (frame 0 always starts at the first fragment)
    except StopIteration:
        raise CodestreamError("encapsulated pixel data holds no items") from None
    parts: list[bytes] = []
    first_len, have = -1, 0
    for offset, length in items:
        if first_len < 0:
            first_len = length
        take = min(length, limit - have)
        parts.append(bytes(data[offset:offset + take]))
        have += take
        if have >= limit:
            break
    if first_len < 0:
        raise CodestreamError("encapsulated pixel data holds no fragment")
    return b"".join(parts), first_len


def _jpeg_sof(buf: bytes, kind: str, wanted: set[int]) -> FrameHeader:
    """Walk JPEG marker segments from SOI to the first frame header in ``wanted``."""
    if buf[:2] != b"\xff\xd8":
        raise CodestreamError(f"{kind} codestream does not start with SOI")
    i = 2
    while True:
        while i < len(buf) and buf[i] != 0xFF:
            i += 1  # tolerate fill bytes between segments
        while i < len(buf) and buf[i] == 0xFF:
            i += 1
        if i >= len(buf):
            raise CodestreamError(f"no {kind} frame header (SOF) in the first {len(buf)} bytes of the codestream")
        marker = buf[i]
        i += 1
        if marker in (0x01, *range(0xD0, 0xD8)):
            continue  # markers without a length
        if marker == 0xD9 or marker == 0xDA:
            raise CodestreamError(f"{kind} codestream reaches {'EOI' if marker == 0xD9 else 'SOS'} before a frame header")
        if i + 2 > len(buf):
            raise CodestreamError(f"{kind} codestream truncated in a marker segment")
        length = struct.unpack_from(">H", buf, i)[0]
        if length < 2:
            raise CodestreamError(f"{kind} marker segment FF{marker:02X} has length {length}")
        if marker in wanted:
            if length < 8 or i + 8 > len(buf):
                raise CodestreamError(f"{kind} frame header (FF{marker:02X}) truncated")
            precision, lines, samples, components = struct.unpack_from(">BHHB", buf, i + 2)
            if lines == 0:
                raise CodestreamError(f"{kind} frame header gives 0 lines (height set later by DNL): not supported")
            return FrameHeader(kind, lines, samples, components, precision)
        i += length


#: SOF0-SOF15 except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _j2k_siz(buf: bytes) -> FrameHeader:
    start = buf.find(b"\xff\x4f\xff\x51")  # SOC then SIZ; a JP2 wrapper (seen in the wild) is skipped over
    if start < 0:
        raise CodestreamError(f"no JPEG 2000 SIZ marker in the first {len(buf)} bytes of the codestream")
    i = start + 4
    if i + 38 > len(buf):
        raise CodestreamError("JPEG 2000 SIZ marker segment truncated")
    (lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz, _xt, _yt, _xto, _yto, csiz) = struct.unpack_from(">HHLLLLLLLLH", buf, i)
    if xsiz <= xosiz or ysiz <= yosiz or csiz == 0 or lsiz != 38 + 3 * csiz:
        raise CodestreamError(f"JPEG 2000 SIZ marker is malformed (Xsiz {xsiz}, XOsiz {xosiz}, Ysiz {ysiz}, "
                              f"YOsiz {yosiz}, Csiz {csiz}, Lsiz {lsiz})")
    if i + 38 + 3 > len(buf):
        raise CodestreamError("JPEG 2000 SIZ marker segment truncated")
    precision = (buf[i + 38] & 0x7F) + 1
    return FrameHeader("JPEG 2000", ysiz - yosiz, xsiz - xosiz, csiz, precision)


def _rle_header(buf: bytes, first_len: int) -> FrameHeader:
    if first_len < 64 or len(buf) < 64:
        raise CodestreamError(f"RLE frame is {first_len} bytes, shorter than its 64-byte header")
    count, *offsets = struct.unpack_from("<16L", buf, 0)
    if not 1 <= count <= 15:
        raise CodestreamError(f"RLE header declares {count} segments (1 to 15 allowed)")
    used = offsets[:count]
    if used[0] != 64 or any(b <= a for a, b in zip(used, used[1:])) or used[-1] >= first_len:
        raise CodestreamError(f"RLE segment offsets {used} are not increasing within the {first_len}-byte frame")
    ends = used[1:] + [first_len]
    return FrameHeader("RLE", None, None, count, None, tuple(e - s for s, e in zip(used, ends)))


def frame_header(ds: Dataset) -> FrameHeader | None:
    """What frame 0's codestream declares, or None when ``ds`` is not compressed in a syntax inspected here.

    Raises :class:`CodestreamError` when the codestream's header cannot be found or parsed.
    """
    syntax = _syntax(ds)
    if syntax not in JPEG2000TransferSyntaxes and syntax not in JPEGTransferSyntaxes \
            and syntax not in JPEGLSTransferSyntaxes and syntax != RLELossless:
        return None
    data = ds.get("PixelData")
    if not isinstance(data, (bytes, bytearray)):
        raise CodestreamError("no encapsulated pixel data")
    buf, first_len = first_frame_prefix(data)
    if syntax in JPEG2000TransferSyntaxes:
        return _j2k_siz(buf)
    if syntax in JPEGLSTransferSyntaxes:
        return _jpeg_sof(buf, "JPEG-LS", {0xF7})
    if syntax in JPEGTransferSyntaxes:
        return _jpeg_sof(buf, "JPEG", _SOF_MARKERS)
    return _rle_header(buf, first_len)


#: RLE's best ratio: a two-byte replicate run yields 128 bytes.
RLE_MAX_RATIO = 64
