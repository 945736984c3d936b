"""Stored pixel values of the first frame, decoding no more than the model needs.

The model sees ~192-224 pixels a side, while a radiograph has ~2000.  So by default we ask each
decoder for a reduced image whose short side is still at least ``min_side``:

* JPEG 2000 (and HTJ2K): OpenJPEG, through glymur, decodes a lower wavelet resolution level
  directly (1/2, 1/4, 1/8 ... of each side) -- the full image is never reconstructed.
* 8-bit baseline JPEG: Pillow's draft mode scales the inverse DCT by 1/2, 1/4 or 1/8.
* anything else pydicom can decode (uncompressed, RLE, JPEG lossless, JPEG-LS ...): decode the
  frame with pydicom's plugins, then box-average the *integer* stored values by an integer factor.
  The Modality LUT and VOI that follow are pointwise, so they commute with the subsampling (up to
  the rounding of the block mean), and they then run on ~50x fewer pixels.

Each reduced decoder is a small plugin with an availability check, tried in order; when one fails
(library missing, odd codestream) the next one is used, ending with pydicom's plain full decode.
``full_resolution=True`` always uses pydicom's plain full decode: the reference path.

The output stays in *stored-value* space (the integer dtype pydicom would return), so everything
downstream (padding, Modality LUT, VOI) works the same on reduced and full images.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import pixel_array
from pydicom.uid import JPEG2000TransferSyntaxes, JPEGBaseline8Bit, UID

#: Default: keep at least this many pixels on the short side (the model trains at 224).
DEFAULT_MIN_SIDE = 224


class DecodeRefused(ValueError):
    """The decoder found the codestream disagrees with the header: refused, never tried another way."""


@dataclass
class StoredFrame:
    """Stored (pre-LUT) integer values of one frame, possibly reduced."""

    pixels: np.ndarray
    #: Each output pixel stands for ``reduction x reduction`` stored pixels (1 = full resolution).
    reduction: int
    #: Which path produced it: "glymur-j2k", "pillow-jpeg-draft", "pydicom+box" or "pydicom".
    decoder: str


def transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    return None if meta is None else meta.get("TransferSyntaxUID")


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def padding_range(ds: Dataset) -> tuple[int, int] | None:
    """The stored values marked as padding (PS3.3 C.7.5.1.1.2), inclusive; None when none."""
    value = ds.get("PixelPaddingValue")
    if value is None or isinstance(value, (bytes, list)):
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None or isinstance(limit, (bytes, list)):
        return int(value), int(value)
    return min(int(value), int(limit)), max(int(value), int(limit))


def padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    rng = padding_range(ds)
    if rng is None:
        return None
    lo, hi = rng
    mask = stored == lo if lo == hi else (stored >= lo) & (stored <= hi)
    return mask if mask.any() else None


def box_factor(rows: int, cols: int, min_side: int) -> int:
    """Largest integer factor that keeps the short side >= ``min_side`` (at least 1)."""
    return max(1, min(rows, cols) // max(1, min_side))


def box_reduce(stored: np.ndarray, factor: int, pad: np.ndarray | None = None,
               pad_value: int | None = None) -> np.ndarray:
    """Mean of each ``factor x factor`` block, rounded back to the stored integer dtype.

    Summing ``factor**2`` strided views touches every pixel once but allocates only at the
    reduced size (a reshape-mean is ~4x slower here).  Padding pixels are left out of the mean;
    a block that is mostly padding becomes ``pad_value`` so it is still recognised as padding.
    The last ``rows % factor`` rows (and columns) are dropped.
    """
    if factor <= 1:
        return stored
    h, w = stored.shape[0] // factor, stored.shape[1] // factor
    acc = np.zeros((h, w), np.int64)
    count = None if pad is None else np.zeros((h, w), np.int32)
    for i in range(factor):
        for j in range(factor):
            view = stored[i:h * factor:factor, j:w * factor:factor]
            if pad is None:
                acc += view
            else:
                keep = ~pad[i:h * factor:factor, j:w * factor:factor]
                acc += np.where(keep, view, 0)
                count += keep
    if count is None:
        mean = np.rint(acc / (factor * factor))
    else:
        mean = np.rint(acc / np.maximum(count, 1))
        mean[count * 2 < factor * factor] = pad_value
    return mean.astype(stored.dtype)


# --- decoders ------------------------------------------------------------------------------


def decode_full(ds: Dataset) -> StoredFrame:
    """pydicom's own decode of frame 0 with whichever plugin it has (reference path)."""
    arr = pixel_array(ds, index=0)
    return StoredFrame(_two_d(arr), 1, "pydicom")


def decode_then_box(ds: Dataset, min_side: int) -> StoredFrame:
    """Decode frame 0 with pydicom, then box-average the integer values."""
    arr = _two_d(pixel_array(ds, index=0))
    factor = box_factor(arr.shape[0], arr.shape[1], min_side)
    if factor == 1:
        return StoredFrame(arr, 1, "pydicom")
    rng = padding_range(ds)
    pad = padding_mask(ds, arr)
    reduced = box_reduce(arr, factor, pad, None if rng is None else rng[0])
    return StoredFrame(reduced, factor, "pydicom+box")


def _glymur_available() -> bool:
    try:
        import glymur  # noqa: F401
        from glymur.lib import openjp2
    except Exception:  # noqa: BLE001 - missing or broken install means "not available"
        return False
    return getattr(openjp2, "OPENJP2", None) is not None


def _scratch_dir() -> str | None:
    # glymur reads only from a path; a RAM-backed tmpfs keeps that cheap where there is one.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def decode_j2k_reduced(ds: Dataset, min_side: int) -> StoredFrame:
    """Decode a lower JPEG 2000 resolution level of frame 0 with glymur/OpenJPEG."""
    import glymur

    codestream = get_frame(ds.PixelData, 0, number_of_frames=number_of_frames(ds))
    rows, cols = int(ds.Rows), int(ds.Columns)
    wanted = box_factor(rows, cols, min_side)
    with tempfile.NamedTemporaryFile(suffix=".j2k", dir=_scratch_dir()) as tmp:
        tmp.write(codestream)
        tmp.flush()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # glymur warns about harmless header oddities
            jp2 = glymur.Jp2kr(tmp.name)
            if tuple(jp2.shape[:2]) != (rows, cols):  # the guard checked SIZ; this is OpenJPEG's own view
                raise DecodeRefused(f"JPEG 2000 codestream is {jp2.shape[0]} x {jp2.shape[1]} pixels, "
                                    f"the header says {rows} x {cols}")
            levels = min(_decomposition_levels(jp2), 31)
            rlevel = 0
            while rlevel < levels and 2 ** (rlevel + 1) <= wanted:
                rlevel += 1
            step = 2 ** rlevel
            arr = jp2[::step, ::step] if step > 1 else jp2[:]
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"JPEG 2000 frame has {arr.shape[2]} components, expected 1")  # pydicom path then decides
    expected = (-(-rows // step), -(-cols // step))
    if arr.shape != expected:
        raise ValueError(f"JPEG 2000 level is {arr.shape}, expected {expected} from Rows/Columns")
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if np.issubdtype(arr.dtype, np.signedinteger) != signed:
        # pydicom knows how to reconcile a codestream whose sign disagrees with the header.
        raise ValueError("JPEG 2000 signedness differs from Pixel Representation")
    return StoredFrame(arr, step, "glymur-j2k")


def _pillow_available() -> bool:
    try:
        from PIL import Image  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _is_8bit_grayscale_jpeg(ds: Dataset) -> bool:
    return (transfer_syntax(ds) == JPEGBaseline8Bit and ds.get("BitsAllocated") == 8
            and ds.get("SamplesPerPixel", 1) == 1 and ds.get("PixelRepresentation", 0) == 0)


def decode_jpeg_draft(ds: Dataset, min_side: int) -> StoredFrame:
    """8-bit baseline JPEG: Pillow's draft mode scales the IDCT by 1/2, 1/4 or 1/8."""
    from PIL import Image

    data = get_frame(ds.PixelData, 0, number_of_frames=number_of_frames(ds))
    rows, cols = int(ds.Rows), int(ds.Columns)
    step = 1
    while step < 8 and 2 * step <= box_factor(rows, cols, min_side):
        step *= 2
    with Image.open(io.BytesIO(data)) as im:
        if im.size != (cols, rows):  # Pillow read the SOF; nothing is decoded yet
            raise DecodeRefused(f"JPEG codestream is {im.size[1]} x {im.size[0]} pixels, the header says "
                                f"{rows} x {cols}")
        if step > 1:
            im.draft("L", (cols // step, rows // step))  # Pillow picks scale = size // request
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"JPEG frame decoded to shape {arr.shape}, expected one component")
    step = -(-cols // arr.shape[1])  # what draft actually chose
    expected = (-(-rows // step), -(-cols // step))
    if arr.shape != expected or arr.dtype != np.uint8:
        raise ValueError(f"JPEG draft gave {arr.shape} {arr.dtype}, expected {expected} uint8")
    return StoredFrame(arr, step, "pillow-jpeg-draft")


def _decomposition_levels(jp2: object) -> int:
    for segment in jp2.codestream.segment:
        if segment.marker_id == "COD":
            return int(segment.num_res)
    return 0


class ColourImage(ValueError):
    """The decoded frame holds real colour, not a grey picture stored in three channels."""


#: Largest mean / 99th-percentile channel spread (in stored units, 8-bit scale) still read as grey:
#: lossy JPEG and YBR->RGB rounding leave a few units between channels of a grey picture.
GREY_MEAN_SPREAD = 1.5
GREY_P99_SPREAD = 6.0


def grey_from_colour(arr: np.ndarray) -> np.ndarray:
    """One grey channel from an ``(H, W, 3)`` frame whose channels agree; else :class:`ColourImage`."""
    spread = arr.max(axis=2).astype(np.int64) - arr.min(axis=2)
    scale = max(1.0, float(np.iinfo(arr.dtype).max) / 255.0) if np.issubdtype(arr.dtype, np.integer) else 1 / 255
    mean, p99 = float(spread.mean()) / scale, float(np.percentile(spread, 99)) / scale
    if mean > GREY_MEAN_SPREAD or p99 > GREY_P99_SPREAD:
        raise ColourImage(f"channels differ (mean spread {mean:.1f}, 99th percentile {p99:.1f} of 255)")
    return np.rint(arr.mean(axis=2)).astype(arr.dtype)


def _two_d(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 3:
        return grey_from_colour(arr)  # pydicom hands colour back as RGB (YBR converted)
    if arr.ndim != 2:
        raise ValueError(f"expected one grayscale frame, decoder returned shape {arr.shape}")
    return arr


@dataclass(frozen=True)
class ReducedDecoder:
    name: str
    is_available: Callable[[], bool]
    supports: Callable[[Dataset], bool]
    decode: Callable[[Dataset, int], StoredFrame]


#: Tried in order; the last one handles everything pydicom can decode.
REDUCED_DECODERS: tuple[ReducedDecoder, ...] = (
    ReducedDecoder("glymur-j2k", _glymur_available,
                   lambda ds: transfer_syntax(ds) in JPEG2000TransferSyntaxes, decode_j2k_reduced),
    ReducedDecoder("pillow-jpeg-draft", _pillow_available, _is_8bit_grayscale_jpeg, decode_jpeg_draft),
    ReducedDecoder("pydicom+box", lambda: True, lambda ds: True, decode_then_box),
)


def read_stored_frame(ds: Dataset, *, full_resolution: bool = False,
                      min_side: int = DEFAULT_MIN_SIDE,
                      notes: list[str] | None = None) -> StoredFrame:
    """Frame 0's stored values; reduced unless ``full_resolution``.  Raises on undecodable data.

    A reduced decoder that fails falls through to the next one (a note says so); the error of
    the last one is raised.
    """
    if full_resolution:
        return decode_full(ds)
    last_error: Exception | None = None
    for dec in REDUCED_DECODERS:
        if not (dec.supports(ds) and dec.is_available()):
            continue
        try:
            return dec.decode(ds, min_side)
        except DecodeRefused:
            raise  # a codestream that disagrees with its header is never decoded another way
        except Exception as exc:  # noqa: BLE001 - any codec failure: try the next decoder
            last_error = exc
            if notes is not None:
                notes.append(f"{dec.name} failed ({type(exc).__name__}: {exc}); fell back")
    assert last_error is not None
    raise last_error
