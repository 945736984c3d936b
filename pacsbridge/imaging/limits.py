"""Decompression-bomb guard: how much memory decoding an image would take, from its header alone.

A few hundred bytes of JPEG 2000 or RLE can claim 65535 x 65535 pixels and thousands of frames;
decoding that would exhaust memory long before any quality check saw a pixel.  The header's
Rows x Columns x Number of Frames x Samples per Pixel x Bits Allocated / 8 is compared with a limit
(config ``max_decoded_bytes``) before anything is decoded.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

#: Default limit: 128 MiB (a 4,300 x 3,500 16-bit chest radiograph needs 30 MB).
DEFAULT_MAX_DECODED_BYTES = 128 * 1024 * 1024


def decoded_size(ds: Dataset) -> int:
    """Bytes the decoded pixel data of ``ds`` would take (all frames), from the header."""
    def number(keyword: str, default: int) -> int:
        value = ds.get(keyword, default)
        try:
            return max(int(value if value not in (None, "") else default), 0)
        except (TypeError, ValueError):
            raise ValueError(f"{keyword} is not a number") from None

    rows, cols = number("Rows", 0), number("Columns", 0)
    frames = max(number("NumberOfFrames", 1), 1)
    samples = max(number("SamplesPerPixel", 1), 1)
    bits = max(number("BitsAllocated", 8), 1)
    return rows * cols * frames * samples * ((bits + 7) // 8)


def check_decoded_size(ds: Dataset, limit: int = DEFAULT_MAX_DECODED_BYTES) -> str | None:
    """``None`` when decoding ``ds`` fits ``limit`` bytes, else the reason (for ``not_analysed``)."""
    try:
        size = decoded_size(ds)
    except ValueError as exc:
        return f"unreadable image header: {exc}"
    if size > limit:
        return (f"image too large to decode: {ds.get('Rows')} x {ds.get('Columns')} pixels x "
                f"{ds.get('NumberOfFrames', 1)} frame(s) x {ds.get('SamplesPerPixel', 1)} sample(s) x "
                f"{ds.get('BitsAllocated')} bits = {size} bytes, above max_decoded_bytes ({limit})")
    return None
