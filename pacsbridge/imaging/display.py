"""Stored pixel values -> display-ready float image in [0, 1], bright = dense.

The grayscale pipeline of PS3.4 N.2.1, as a viewer applies it:

1. Modality LUT: Rescale Slope/Intercept or a Modality LUT Sequence (pydicom).
2. VOI: the file's first VOI LUT, else its first window (LINEAR, LINEAR_EXACT or SIGMOID per
   VOI LUT Function; pydicom).  Fallback when the file has none (or an unusable one): a linear
   window from the 0.5th to the 99.5th percentile of the image's non-padding pixels.
3. Scale the VOI output range to [0, 1].
4. MONOCHROME1 (low values bright): invert, so that bright always means dense.
5. Pixel padding (stored values marked as padding) -> 0 (black), and kept out of the
   percentile statistics.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from .frames import padding_mask

#: Percentiles of the fallback window (when the file carries no usable VOI).
FALLBACK_PERCENTILES = (0.5, 99.5)


def has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and None not in (seq[0].get("LUTDescriptor"), seq[0].get("LUTData"))


def has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _count(value: object) -> int:
    try:
        return len(value)
    except TypeError:
        return 1


def _voi_from_file(values: np.ndarray, ds: Dataset,
                   notes: list[str]) -> tuple[np.ndarray, float, float] | None:
    """Apply the file's VOI; return (output, low, high) of its output range, or None."""
    try:
        if has_voi_lut(ds):
            n = len(ds.VOILUTSequence)
            if n > 1:
                notes.append(f"first of {n} VOI LUTs")
            lut_input = np.rint(values).astype(np.int64)  # a LUT indexes integers
            out = apply_voi(lut_input, ds, 0)
            # The LUT's own entries give its output range (some 16-bit LUTs hold 12-bit data).
            descriptor = ds.VOILUTSequence[0].LUTDescriptor
            first, entries = int(descriptor[1]), int(descriptor[0]) or 2 ** 16
            every = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds, 0)
            return out, float(every.min()), float(every.max())
        if has_window(ds):
            n = _count(ds.WindowCenter)
            if n > 1:
                notes.append(f"first of {n} windows")
            out = apply_windowing(values, ds, 0)
            # Probe far below/above the window for the exact output range pydicom uses.
            with np.errstate(over="ignore"):
                lo, hi = apply_windowing(np.array([-1e30, 1e30]), ds, 0)
            return out, float(lo), float(hi)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, NotImplementedError) as exc:
        notes.append(f"VOI in file unusable ({exc}): percentile window")
        return None
    notes.append("no VOI in file: percentile window")
    return None


def percentile_window(values: np.ndarray, pad: np.ndarray | None) -> tuple[float, float]:
    sample = values if pad is None else values[~pad]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, FALLBACK_PERCENTILES)
    return float(lo), float(hi)


def stored_8bit_window(ds: Dataset) -> tuple[float, float] | None:
    """An unsigned <= 8-bit image with no VOI and no Modality LUT is shown as stored (0..255),
    as viewers do and as the model's 8-bit training images were read; wider data has no such
    natural range, hence the percentile window."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    identity = (float(ds.get("RescaleSlope", 1) or 1) == 1 and float(ds.get("RescaleIntercept", 0) or 0) == 0
                and "ModalityLUTSequence" not in ds)
    if bits <= 8 and int(ds.get("PixelRepresentation", 0) or 0) == 0 and identity:
        return 0.0, float(2**bits - 1)
    return None


def to_display(ds: Dataset, stored: np.ndarray, notes: list[str]) -> np.ndarray:
    """Display-ready float32 image in [0, 1] from frame 0's stored values (any resolution)."""
    pad = padding_mask(ds, stored)
    values = apply_modality_lut(stored, ds)
    voi = _voi_from_file(values, ds, notes)
    if voi is None:
        out = values.astype(np.float64, copy=False)
        window = stored_8bit_window(ds)
        if window is not None:
            notes[-1] = notes[-1].replace("percentile window", "8-bit values shown as stored")
            lo, hi = window
        else:
            lo, hi = percentile_window(out, pad)
    else:
        out, lo, hi = voi
        out = out.astype(np.float64, copy=False)
    span = hi - lo
    if span == 0 or not np.isfinite(span):
        image = np.zeros(out.shape, np.float32)  # a constant image; the quality gate refuses it
    else:
        image = ((out - lo) / span).astype(np.float32)  # a negative span flips, as it should
        np.clip(image, 0.0, 1.0, out=image)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        np.subtract(1.0, image, out=image)
        notes.append("MONOCHROME1 inverted")
    if pad is not None:
        image[pad] = 0.0
        notes.append(f"pixel padding: {pad.mean():.1%} of pixels set to black")
    if not np.isfinite(image).all():
        raise ValueError("non-finite values after Modality LUT/VOI")
    return image
