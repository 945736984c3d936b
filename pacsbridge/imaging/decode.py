"""DICOM file or dataset -> display-ready image for the model, or a reason it cannot be analysed.

The entry point is :func:`load_for_model`.  It reads the file, runs the header quality gate,
decodes frame 0 (reduced to what the model needs unless ``full_resolution``), applies the
grayscale display pipeline (:mod:`.display`) and the image gate.  Every failure -- not a chest
radiograph, not DICOM, truncated, garbage pixel data -- is raised as :class:`NotAnalysable` with a
readable reason; no other exception escapes for bad input.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .display import to_display
from .frames import DEFAULT_MIN_SIDE, ColourImage, DecodeRefused, number_of_frames, read_stored_frame
from .limits import DEFAULT_MAX_DECODED_BYTES, check_decodable
from .quality import check_header, check_image


class NotAnalysable(Exception):
    """The image cannot be given to the model; ``reason`` says why in plain words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ImageResult:
    """A display-ready image (float32, 2-D, [0, 1], bright = dense) and how it was made."""

    image: np.ndarray
    #: Things worth knowing, e.g. "first frame of 3", "no VOI in file: percentile window".
    notes: list[str] = field(default_factory=list)
    #: Wall time to read (when given a path), decode and window, in milliseconds.
    decode_ms: float = 0.0
    #: Each image pixel stands for ``reduction x reduction`` stored pixels (1 = full resolution).
    reduction: int = 1
    #: Which decoding path made it: "glymur-j2k", "pillow-jpeg-draft", "pydicom+box" or "pydicom".
    decoder: str = "pydicom"
    #: (Rows, Columns) of the stored image.
    source_shape: tuple[int, int] = (0, 0)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line, for logs and the DB
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_display(ds: Dataset, *, full_resolution: bool = False,
                   min_side: int = DEFAULT_MIN_SIDE,
                   max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> ImageResult:
    """Decode frame 0 of ``ds`` into a display-ready image (no quality gate).

    The size guard (:func:`~.limits.check_decodable`: header and codestream within
    ``max_decoded_bytes``) runs first, so no caller can decode without it.  Raises
    :class:`NotAnalysable` when the pixel data cannot or may not be decoded.
    """
    start = time.perf_counter()
    reason = check_decodable(ds, max_decoded_bytes)  # decompression bombs: before any pixel is decoded
    if reason:
        raise NotAnalysable(reason)
    notes: list[str] = []
    frames = number_of_frames(ds)
    if frames > 1:
        notes.append(f"first frame of {frames}")
    try:
        stored = read_stored_frame(ds, full_resolution=full_resolution, min_side=min_side, notes=notes)
        if int(ds.get("SamplesPerPixel") or 1) == 3:
            notes.append(f"grey picture stored as {ds.get('PhotometricInterpretation')}: channels equal, read as grey")
        image = to_display(ds, stored.pixels, notes)
    except DecodeRefused as exc:
        raise NotAnalysable(f"compressed pixel data refused without decoding: {exc}") from None
    except ColourImage as exc:
        raise NotAnalysable(f"colour image ({ds.get('PhotometricInterpretation')}): {exc}; "
                            "the model reads greyscale radiographs") from None
    except MemoryError:
        raise NotAnalysable("pixel data could not be decoded: image too large for memory") from None
    except Exception as exc:  # noqa: BLE001 - codecs raise anything on garbage; report, never crash
        raise NotAnalysable(f"pixel data could not be decoded: {_short(exc)}") from exc
    if stored.reduction > 1:
        notes.append(f"decoded at 1/{stored.reduction} resolution ({stored.decoder})")
    return ImageResult(
        image=image, notes=notes, decode_ms=(time.perf_counter() - start) * 1e3,
        reduction=stored.reduction, decoder=stored.decoder,
        source_shape=(int(ds.Rows), int(ds.Columns)),
    )


def read_dataset(source: str | os.PathLike | BinaryIO) -> Dataset:
    """Read a DICOM file; :class:`NotAnalysable` when it is not one or cannot be parsed."""
    try:
        try:
            ds = pydicom.dcmread(source)
        except InvalidDicomError:
            # Some tools write a bare dataset without preamble/meta: accept it only if it
            # parses into something with an image in it.
            if hasattr(source, "seek"):
                source.seek(0)
            ds = pydicom.dcmread(source, force=True)
            if "PixelData" not in ds or "Rows" not in ds:
                raise NotAnalysable("not a DICOM file (no preamble/meta and no image in it)") from None
            if ds.file_meta.get("TransferSyntaxUID") is None:
                implicit, little = getattr(ds, "original_encoding", (True, True))
                ds.file_meta.TransferSyntaxUID = (
                    ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little
                    else ExplicitVRBigEndian)
    except NotAnalysable:
        raise
    except FileNotFoundError:
        raise NotAnalysable("file not found") from None
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise NotAnalysable(f"DICOM file could not be parsed: {_short(exc)}") from exc
    if len(ds) == 0:
        # pydicom hands back an empty dataset for a file cut inside encapsulated pixel data.
        raise NotAnalysable("DICOM file could not be parsed: empty or truncated dataset")
    return ds


def load_for_model(source: str | os.PathLike | BinaryIO | Dataset, *,
                   full_resolution: bool = False,
                   min_side: int = DEFAULT_MIN_SIDE,
                   max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> ImageResult:
    """Quality-gated, display-ready image of a DICOM file (path or file object) or dataset.

    ``full_resolution=False`` (default) decodes only as much as a model input of ``min_side``
    pixels needs; ``True`` decodes everything (reference path).  Raises :class:`NotAnalysable`.
    """
    start = time.perf_counter()
    ds = source if isinstance(source, Dataset) else read_dataset(source)
    try:
        reason = check_header(ds)
    except Exception as exc:  # noqa: BLE001 - malformed header values
        reason = f"unreadable image header: {_short(exc)}"
    if reason:
        raise NotAnalysable(reason)
    result = decode_display(ds, full_resolution=full_resolution, min_side=min_side,
                            max_decoded_bytes=max_decoded_bytes)
    reason = check_image(result.image)
    if reason:
        raise NotAnalysable(reason)
    result.decode_ms = (time.perf_counter() - start) * 1e3
    return result
