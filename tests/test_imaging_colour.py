"""Grey pictures stored as colour (RGB, YBR JPEG) are read as grey; real colour is refused.

Converters that wrap a JPEG or PNG into DICOM often keep three equal channels; such an image is
a radiograph all the same and must be scored, not dropped as 'colour'.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from PIL import Image

from pacsbridge.imaging import NotAnalysable, load_for_model
from pacsbridge.model.preprocess import preprocess


def _phantom(size: int = 256) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    img = 60 + 120 * np.exp(-((x - 0.3) ** 2 + (y - 0.5) ** 2) / 0.05) + 60 * (y > 0.8)
    img += 30 * np.sin(12 * x)  # structure so that a wrong channel or offset shows
    return np.clip(img, 0, 255).astype(np.uint8)


def _sc(pixels: np.ndarray, photometric: str, *, samples: int, jpeg: bytes | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([jpeg]) if jpeg else pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _jpeg(pixels: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("full_resolution", [False, True])
def test_grey_rgb_and_ybr_jpeg_read_like_monochrome2(full_resolution: bool) -> None:
    grey = _phantom()
    mono = load_for_model(_sc(grey, "MONOCHROME2", samples=1), full_resolution=full_resolution)
    rgb = load_for_model(_sc(np.repeat(grey[..., None], 3, axis=2), "RGB", samples=3),
                         full_resolution=full_resolution)
    ybr = load_for_model(_sc(grey, "YBR_FULL_422", samples=3, jpeg=_jpeg(grey, "RGB")),
                         full_resolution=full_resolution)
    assert np.array_equal(mono.image, rgb.image)
    assert any("stored as RGB" in n for n in rgb.notes)
    assert np.abs(ybr.image - mono.image).mean() < 0.01
    for r in (rgb, ybr):
        assert (preprocess(r.image) - preprocess(mono.image)).abs().mean() < 0.05
    # 8-bit without VOI is shown as stored (0..255), as the training images were read.
    assert np.allclose(mono.image, grey / 255.0, atol=1e-6)


def test_real_colour_is_refused() -> None:
    grey = _phantom()
    colour = np.stack([grey, np.flipud(grey), 255 - grey], axis=2)
    with pytest.raises(NotAnalysable, match="colour image"):
        load_for_model(_sc(colour, "RGB", samples=3))
