"""Training images, converted to DICOM the ways a site would, reach the model as in training.

The model learnt from 8-bit JPEGs read as ``pixels / 255``.  The held-out images arrive as DICOM,
so every conversion below must give (almost) the same model input, and the same probability, as
the training path: DCMTK's ``img2dcm`` (JPEG baseline, YBR_FULL_422, no Modality), 8-bit
MONOCHROME2, RGB, 16-bit MONOCHROME1 with a window, and JPEG 2000 lossless.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless, ExplicitVRLittleEndian, generate_uid

from pacsbridge.imaging import load_for_model
from pacsbridge.model.artifact import load_model
from pacsbridge.model.preprocess import preprocess, preprocess_batch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT.parent / "shared" / "data" / "chest_xray" / "train"
SHIPPED = ROOT / "pacsbridge" / "models" / "pneumonia-v4.pt"

pytestmark = pytest.mark.skipif(
    not TRAIN.is_dir(), reason=f"real training images not present at {TRAIN} (only in the project's workspace)")


def _files(n: int = 6) -> list[Path]:
    return sorted((TRAIN / "NORMAL").glob("*.jpeg"))[:n] + sorted((TRAIN / "PNEUMONIA").glob("*.jpeg"))[:n]


def _training_input(path: Path) -> torch.Tensor:
    from model_training.data import Sample, load_images

    return preprocess_batch(load_images([Sample(path, 0, "x")]).float() / 255.0)[0]


def _cr(grey: np.ndarray, *, bits: int, photometric: str, window: bool) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "AP"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    scale = (2**bits - 1) / 255.0
    values = np.rint(grey.astype(np.float64) * scale)
    if photometric == "MONOCHROME1":
        values = (2**bits - 1) - values
    if window:
        ds.WindowCenter, ds.WindowWidth = (2**bits - 1) / 2, 2**bits
    ds.PixelData = values.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
    return ds


@pytest.fixture(scope="module")
def model():
    """The shipped model; without one, seeded random weights (the parity still must hold)."""
    if SHIPPED.is_file():
        return load_model(SHIPPED, device="cpu")
    from pacsbridge.model.architecture import build_model
    from pacsbridge.model.artifact import LoadedModel

    torch.manual_seed(0)
    return LoadedModel("random", "small-resnet-v1", "-", 0.5, 1.0, 192, torch.device("cpu"),
                       build_model("small-resnet-v1").eval())


@pytest.mark.skipif(shutil.which("img2dcm") is None, reason="DCMTK img2dcm not installed")
def test_img2dcm_conversion_matches_training_input(tmp_path: Path, model) -> None:
    for path in _files():
        out = tmp_path / (path.stem + ".dcm")
        subprocess.run(["img2dcm", str(path), str(out)], check=True, capture_output=True)
        x = preprocess(load_for_model(out).image)
        ref = _training_input(path)
        assert (x - ref).abs().mean() < 0.02, path.name
        p_dicom, p_train = model.probabilities_from_inputs(torch.stack([x, ref]))
        assert abs(p_dicom - p_train) < 0.01, path.name


@pytest.mark.parametrize("variant", ["8bit-mono2", "rgb", "16bit-mono1-window", "12bit-j2k-window"])
def test_dicom_variants_match_training_input(variant: str, model) -> None:
    from PIL import Image

    for path in _files(3):
        grey = np.asarray(Image.open(path).convert("L"))
        if variant == "8bit-mono2":
            ds = _cr(grey, bits=8, photometric="MONOCHROME2", window=False)
        elif variant == "rgb":
            ds = _cr(grey, bits=8, photometric="MONOCHROME2", window=False)
            ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
            ds.PixelData = np.repeat(grey[..., None], 3, axis=2).tobytes()
        elif variant == "16bit-mono1-window":
            ds = _cr(grey, bits=16, photometric="MONOCHROME1", window=True)
        else:
            ds = _cr(grey, bits=12, photometric="MONOCHROME2", window=True)
            ds.compress(JPEG2000Lossless)
            ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(ds)))
        x = preprocess(load_for_model(ds).image)
        ref = _training_input(path)
        assert (x - ref).abs().mean() < 0.02, (variant, path.name)
        p = model.probabilities_from_inputs(torch.stack([x, ref]))
        assert abs(p[0] - p[1]) < 0.01, (variant, path.name)


def _bytes(ds: Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
