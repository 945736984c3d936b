"""Decompression-bomb guard: how much memory decoding an image would take, before decoding it.

A few hundred bytes of JPEG 2000 or RLE can claim 65535 x 65535 pixels and thousands of frames;
decoding that would exhaust memory long before any quality check saw a pixel.  Two checks, both
before any pixel is decoded, in :func:`check_decodable` -- the one guard every decode goes through
(the worker, ``predict``, the preview route, heatmaps):

1. The header: Rows x Columns x Number of Frames x Samples per Pixel x Bits Allocated / 8 against
   the limit (config ``max_decoded_bytes``).
2. The codestream (:mod:`.codestream`): frame 0's own dimensions and components must equal the
   header's, and its decoded size must fit the limit too; RLE's segment count must match and each
   segment must be long enough to fill the frame.  A codestream that disagrees is refused, never
   decoded "to see".
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from .codestream import RLE_MAX_RATIO, CodestreamError, frame_header

#: Default limit: 128 MiB (a 4,300 x 3,500 16-bit chest radiograph needs 30 MB).
DEFAULT_MAX_DECODED_BYTES = 128 * 1024 * 1024


def _number(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword, default)
    try:
        return max(int(value if value not in (None, "") else default), 0)
    except (TypeError, ValueError):
        raise ValueError(f"{keyword} is not a number") from None


def decoded_size(ds: Dataset) -> int:
    """Bytes the decoded pixel data of ``ds`` would take (all frames), from the header."""
    rows, cols = _number(ds, "Rows", 0), _number(ds, "Columns", 0)
    frames = max(_number(ds, "NumberOfFrames", 1), 1)
    samples = max(_number(ds, "SamplesPerPixel", 1), 1)
    bits = max(_number(ds, "BitsAllocated", 8), 1)
    return rows * cols * frames * samples * ((bits + 7) // 8)


def check_decoded_size(ds: Dataset, limit: int = DEFAULT_MAX_DECODED_BYTES) -> str | None:
    """``None`` when the header's decoded size fits ``limit`` bytes, else the reason (for ``not_analysed``)."""
    try:
        size = decoded_size(ds)
    except ValueError as exc:
        return f"unreadable image header: {exc}"
    if size > limit:
        return (f"image too large to decode: {ds.get('Rows')} x {ds.get('Columns')} pixels x "
                f"{ds.get('NumberOfFrames', 1)} frame(s) x {ds.get('SamplesPerPixel', 1)} sample(s) x "
                f"{ds.get('BitsAllocated')} bits = {size} bytes, above max_decoded_bytes ({limit})")
    return None


def check_codestream(ds: Dataset, limit: int = DEFAULT_MAX_DECODED_BYTES) -> str | None:
    """``None`` when frame 0's codestream agrees with the header and fits ``limit``; else the reason."""
    try:
        head = frame_header(ds)
    except CodestreamError as exc:
        # A codestream whose own header is missing or malformed is garbage: undecodable, not tried.
        return f"pixel data could not be decoded: {exc} (codestream header checked before decoding)"
    if head is None:
        return None
    rows, cols = _number(ds, "Rows", 0), _number(ds, "Columns", 0)
    samples = max(_number(ds, "SamplesPerPixel", 1), 1)
    bytes_per_sample = (max(_number(ds, "BitsAllocated", 8), 1) + 7) // 8
    if head.kind == "RLE":
        if head.components != samples * bytes_per_sample:
            return (f"RLE pixel data refused without decoding: {head.components} segment(s), but Samples per "
                    f"Pixel {samples} x {bytes_per_sample} byte(s) per sample needs {samples * bytes_per_sample}")
        shortest = -(-rows * cols // RLE_MAX_RATIO)
        for n, length in enumerate(head.segment_lengths, 1):
            if length < shortest:
                return (f"RLE pixel data refused without decoding: segment {n} is {length} bytes, too short to "
                        f"fill {rows} x {cols} pixels (at least {shortest} bytes): the header does not "
                        "match the data")
        return None
    assert head.rows is not None and head.columns is not None
    precision_bytes = ((head.precision or 8) + 7) // 8
    size = head.rows * head.columns * head.components * max(precision_bytes, bytes_per_sample)
    if size > limit:
        return (f"{head.kind} codestream too large to decode: {head.rows} x {head.columns} pixels x "
                f"{head.components} component(s) = {size} bytes, above max_decoded_bytes ({limit})")
    if (head.rows, head.columns) != (rows, cols):
        return (f"{head.kind} codestream is {head.rows} x {head.columns} pixels but the header says "
                f"{rows} x {cols} (Rows x Columns): refused without decoding")
    if head.components != samples:
        return (f"{head.kind} codestream has {head.components} component(s) but Samples per Pixel is "
                f"{samples}: refused without decoding")
    return None


def check_decodable(ds: Dataset, limit: int = DEFAULT_MAX_DECODED_BYTES) -> str | None:
    """The one size guard before any decode: ``None`` when ``ds`` may be decoded within ``limit`` bytes,
    else the reason (header size, then the codestream's own dimensions)."""
    return check_decoded_size(ds, limit) or check_codestream(ds, limit)
