"""Reference tests for pacsbridge.imaging: the same picture stored many ways must look the same.

In the spirit of pydicom's pixel tests: one reference picture (RG1's chest, half size, windowed
independently of the code under test) is stored as 8/12/16-bit, signed with rescale,
MONOCHROME1, with LUTs, padding, several frames, and compressed (JPEG 2000, RLE, JPEG-LS,
JPEG lossless).  Each file is written to disk, read back through ``load_for_model`` on the reduced
and on the full-resolution path, and compared with the display image its header implies
(computed here with plain numpy), and through ``preprocess`` with the model input of that image.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless,
    generate_uid,
)

from pacsbridge.imaging import NotAnalysable, load_for_model
from pacsbridge.imaging import frames
from pacsbridge.model.preprocess import preprocess

#: Display images agree when their mean absolute difference at 192x192 is below this.
IMAGE_TOL = 0.01
#: Model inputs (standardized, unit variance) agree when their mean absolute difference is below.
INPUT_TOL = 0.05


def data_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom-data file {name} not installed")
    return path


def at_192(image: np.ndarray) -> np.ndarray:
    t = torch.as_tensor(np.asarray(image, np.float32))[None, None]
    out = F.interpolate(t, size=(192, 192), mode="bilinear", antialias=True, align_corners=False)
    return out[0, 0].numpy()


def image_mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(at_192(a) - at_192(b)).mean())


def input_mad(a: np.ndarray, b: np.ndarray) -> float:
    return float((preprocess(a) - preprocess(b)).abs().mean())


# --- the reference picture and the ways of storing it ------------------------------------------


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    """RG1 chest at half size, display-ready, computed without pacsbridge: 1-99 % window, inverted."""
    raw = pydicom.dcmread(data_file("RG1_UNCR.dcm")).pixel_array.astype(np.float64)
    h, w = raw.shape[0] // 2 * 2, raw.shape[1] // 2 * 2
    raw = raw[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    lo, hi = np.percentile(raw, [1, 99])
    return 1.0 - np.clip((raw - lo) / (hi - lo), 0.0, 1.0)  # MONOCHROME1: low stored = bright


def new_dataset(stored: np.ndarray, *, bits_stored: int, photometric: str = "MONOCHROME2") -> Dataset:
    """A minimal CR image dataset holding ``stored`` (2-D, or 3-D for several frames)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(np.issubdtype(stored.dtype, np.signedinteger))
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def percentile_stretch(image: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    sample = image if keep is None else image[keep]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)


def mono2_8bit(d):
    ds = new_dataset(np.rint(d * 255).astype(np.uint8), bits_stored=8)
    ds.WindowCenter, ds.WindowWidth = 128, 256
    return ds, d


def full_window_12bit(d):
    ds = new_dataset(np.rint(d * 4095).astype(np.uint16), bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    return ds, d


def signed_rescale_16bit(d):
    # Stored -30000..30000; rescaled 0.5 * s - 1000 -> -16000..14000; window covers that range.
    ds = new_dataset((np.rint(d * 60000) - 30000).astype(np.int16), bits_stored=16)
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1000
    ds.WindowCenter, ds.WindowWidth = -1000, 30001
    return ds, d


def mono1_12bit(d):
    ds = new_dataset(np.rint((1 - d) * 4095).astype(np.uint16), bits_stored=12, photometric="MONOCHROME1")
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    return ds, d


def no_voi_12bit(d):
    stored = np.rint(d * 4095).astype(np.uint16)
    return new_dataset(stored, bits_stored=12), percentile_stretch(stored.astype(np.float64))


def sigmoid_12bit(d):
    stored = np.rint(d * 4095).astype(np.uint16)
    ds = new_dataset(stored, bits_stored=12)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 1500, 2000, "SIGMOID"
    return ds, 1.0 / (1.0 + np.exp(-4.0 * (stored - 1500.0) / 2000.0))


def voi_lut_12bit(d):
    # A gamma curve as VOI LUT: 4096 entries, 16-bit output.
    stored = np.rint(d * 4095).astype(np.uint16)
    ds = new_dataset(stored, bits_stored=12)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor
    item.add_new(0x00283006, "US", np.rint((np.arange(4096) / 4095) ** 0.5 * 65535).astype(int).tolist())
    ds.VOILUTSequence = [item]
    return ds, (stored / 4095.0) ** 0.5


def modality_lut_12bit(d):
    # Modality LUT multiplies by 16 into 16-bit output; the window covers that output.
    stored = np.rint(d * 4095).astype(np.uint16)
    ds = new_dataset(stored, bits_stored=12)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])
    item.add_new(0x00283006, "US", (np.arange(4096) * 16).tolist())
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 32760, 65520
    return ds, d


PAD_ROWS, PAD_COLS = 64, 232  # multiples of 8, so reduced blocks do not straddle the border


def padded(d, photometric: str):
    keep = np.ones(d.shape, bool)
    keep[:PAD_ROWS, :] = False
    keep[:, :PAD_COLS] = False
    d_in = d if photometric == "MONOCHROME2" else 1 - d
    stored = (np.rint(d_in * 30000) + 10000).astype(np.uint16)  # well clear of the padding
    stored[~keep] = 0
    ds = new_dataset(stored, bits_stored=16, photometric=photometric)
    ds.PixelPaddingValue = 0
    return ds, keep


def padding_no_voi(d):
    # The percentile window must ignore the (25 %+) padding, which then shows black.
    ds, keep = padded(d, "MONOCHROME2")
    expected = percentile_stretch(d, keep)
    expected[~keep] = 0.0
    return ds, expected


def padding_mono1_window(d):
    # Padding stored as 0 would show *white* in MONOCHROME1; it must be black.
    ds, keep = padded(d, "MONOCHROME1")
    ds.WindowCenter, ds.WindowWidth = 25000, 30001
    expected = d.copy()
    expected[~keep] = 0.0
    return ds, expected


def three_frames(d):
    first = np.rint(d * 4095).astype(np.uint16)
    noise = np.random.default_rng(0).integers(0, 4096, d.shape).astype(np.uint16)
    ds = new_dataset(np.stack([first, 4095 - first, noise]), bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    return ds, d


def compressed(build: Callable, syntax) -> Callable:
    def make(d):
        ds, expected = build(d)
        ds.compress(syntax)
        return ds, expected
    return make


def jpeg_lossless_via_gdcm(d):
    """pydicom cannot encode JPEG lossless; GDCM can (file to file)."""
    gdcm = pytest.importorskip("gdcm")
    ds, expected = full_window_12bit(d)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "in.dcm"), Path(tmp, "out.dcm")
        ds.save_as(src, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(dst))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        out = pydicom.dcmread(dst)
    assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    return out, expected


def jpeg_baseline_via_pillow(d):
    from PIL import Image
    ds, expected = mono2_8bit(d)
    buf = io.BytesIO()
    Image.fromarray(np.rint(d * 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds, expected


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[np.ndarray], tuple[Dataset, np.ndarray]]
    notes: tuple[str, ...] = ()
    #: Lossy compression: the full-resolution pixels may differ a little more.
    lossy: bool = False
    #: The decoder the reduced path must use (when its library is installed).
    reduced_decoder: str = "pydicom+box"


J2K, GLYMUR = JPEG2000Lossless, "glymur-j2k"
CASES = [
    Case("8bit_mono2_window", mono2_8bit),
    Case("12bit_full_window", full_window_12bit),
    Case("16bit_signed_rescale", signed_rescale_16bit),
    Case("12bit_mono1", mono1_12bit, ("MONOCHROME1 inverted",)),
    Case("12bit_no_voi", no_voi_12bit, ("no VOI in file: percentile window",)),
    Case("12bit_sigmoid", sigmoid_12bit),
    Case("12bit_voi_lut", voi_lut_12bit),
    Case("12bit_modality_lut", modality_lut_12bit),
    Case("padding_no_voi", padding_no_voi, ("pixel padding",)),
    Case("padding_mono1_window", padding_mono1_window, ("pixel padding",)),
    Case("three_frames", three_frames, ("first frame of 3",)),
    Case("j2k_12bit", compressed(full_window_12bit, J2K), reduced_decoder=GLYMUR),
    Case("j2k_signed_rescale", compressed(signed_rescale_16bit, J2K), reduced_decoder=GLYMUR),
    Case("j2k_mono1", compressed(mono1_12bit, J2K), reduced_decoder=GLYMUR),
    Case("j2k_three_frames", compressed(three_frames, J2K), ("first frame of 3",), reduced_decoder=GLYMUR),
    Case("rle_mono1", compressed(mono1_12bit, RLELossless)),
    Case("rle_padding", compressed(padding_no_voi, RLELossless), ("pixel padding",)),
    Case("jpegls_12bit", compressed(full_window_12bit, JPEGLSLossless)),
    Case("jpeg_lossless_gdcm", jpeg_lossless_via_gdcm),
    Case("jpeg_baseline_8bit", jpeg_baseline_via_pillow, lossy=True,
         reduced_decoder="pillow-jpeg-draft"),
]


@pytest.fixture(scope="module")
def stored_files(truth, tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    """Each case written to a real file once per module (encoding takes a moment)."""
    out, folder = {}, tmp_path_factory.mktemp("imaging_cases")
    for case in CASES:
        try:
            ds, expected = case.build(truth)
        except pytest.skip.Exception:
            continue
        path = folder / f"{case.name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out[case.name] = (path, expected)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("full_resolution", [False, True], ids=["reduced", "full"])
def test_stored_variants_look_the_same(case, full_resolution, stored_files):
    if case.name not in stored_files:
        pytest.skip(f"{case.name}: encoder not available")
    path, expected = stored_files[case.name]
    result = load_for_model(path, full_resolution=full_resolution)
    img = result.image
    assert img.dtype == np.float32 and img.ndim == 2
    assert 0.0 <= img.min() and img.max() <= 1.0
    if full_resolution:
        assert result.reduction == 1 and img.shape == expected.shape
        assert float(np.abs(img - expected).mean()) < (0.01 if case.lossy else 0.002)
    else:
        assert result.reduction >= 2, "a ~1000 px image must be decoded reduced"
        if case.reduced_decoder != "glymur-j2k" or frames._glymur_available():
            assert result.decoder == case.reduced_decoder
        assert min(img.shape) >= frames.DEFAULT_MIN_SIDE
    assert image_mad(img, expected) < IMAGE_TOL
    assert input_mad(img, expected) < INPUT_TOL
    for note in case.notes:
        assert any(note in n for n in result.notes), (note, result.notes)


def test_tolerances_catch_wrong_processing(truth, stored_files):
    """The comparisons above fail for the mistakes they are meant to catch."""
    _, expected = stored_files["12bit_mono1"]
    assert image_mad(1 - expected, expected) > 10 * IMAGE_TOL          # forgot MONOCHROME1
    assert input_mad(1 - expected, expected) > 10 * INPUT_TOL

    ds, expected = signed_rescale_16bit(truth)                           # ignored the rescale
    del ds.RescaleSlope, ds.RescaleIntercept
    assert image_mad(load_for_model(ds).image, expected) > 5 * IMAGE_TOL

    ds, expected = three_frames(truth)                                   # wrong frame
    ds.PixelData = ds.PixelData[len(ds.PixelData) // 3:] + ds.PixelData[: len(ds.PixelData) // 3]
    assert image_mad(load_for_model(ds).image, expected) > 10 * IMAGE_TOL

    ds, keep = padded(truth, "MONOCHROME2")                              # padding in the stats
    wrong = percentile_stretch(np.where(keep, truth * 30000 + 10000, 0))
    wrong[~keep] = 0.0
    _, expected = padding_no_voi(truth)
    assert image_mad(wrong, expected) > 2 * IMAGE_TOL
    assert image_mad(load_for_model(ds).image, expected) < IMAGE_TOL

    ds, expected = sigmoid_12bit(truth)                                  # SIGMOID read as LINEAR
    ds.VOILUTFunction = "LINEAR"
    assert image_mad(load_for_model(ds).image, expected) > 2 * IMAGE_TOL


def test_unusable_window_falls_back_to_percentiles(truth):
    ds, _ = full_window_12bit(truth)
    ds.WindowWidth = 0  # invalid for LINEAR
    result = load_for_model(ds)
    assert any("VOI in file unusable" in n for n in result.notes)
    expected = percentile_stretch(np.rint(truth * 4095))
    assert image_mad(result.image, expected) < IMAGE_TOL


def test_several_windows_use_the_first(truth):
    ds, expected = full_window_12bit(truth)
    ds.WindowCenter, ds.WindowWidth = [2048, 500], [4096, 200]
    result = load_for_model(ds)
    assert any("first of 2 windows" in n for n in result.notes)
    assert image_mad(result.image, expected) < IMAGE_TOL


# --- pydicom-data's real radiographs ----------------------------------------------------------


@pytest.fixture(scope="module")
def rg1() -> dict[tuple[str, bool], object]:
    return {(name, full): load_for_model(data_file(name), full_resolution=full)
            for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm") for full in (False, True)}


def test_rg1_full_path_matches_its_window(rg1):
    """RG1 carries WC 15000 / WW 30000 and is MONOCHROME1: check the formula by hand."""
    ds = pydicom.dcmread(data_file("RG1_UNCR.dcm"))
    x = ds.pixel_array.astype(np.float64)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = 1.0 - np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    got = rg1[("RG1_UNCR.dcm", True)].image
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max()) < 1e-5


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_rg1_reduced_matches_full(rg1, name):
    reduced, full = rg1[(name, False)], rg1[(name, True)]
    assert reduced.reduction == 8 and full.reduction == 1
    assert image_mad(reduced.image, full.image) < IMAGE_TOL
    assert input_mad(reduced.image, full.image) < INPUT_TOL


def test_rg1_j2k_matches_uncompressed(rg1):
    for full in (False, True):
        a, b = rg1[("RG1_UNCR.dcm", full)].image, rg1[("RG1_J2KR.dcm", full)].image
        assert image_mad(a, b) < IMAGE_TOL
        assert input_mad(a, b) < INPUT_TOL
    # Lossless: at full resolution they are the same pixels.
    assert np.array_equal(rg1[("RG1_UNCR.dcm", True)].image, rg1[("RG1_J2KR.dcm", True)].image)


def test_rg1_j2k_reads_a_reduced_level(rg1):
    if not frames._glymur_available():
        pytest.skip("glymur/libopenjp2 not available: the pydicom fallback is used")
    result = rg1[("RG1_J2KR.dcm", False)]
    assert result.decoder == "glymur-j2k"
    assert result.image.shape == (245, 231)  # ceil(1955/8), ceil(1841/8)


def test_j2k_falls_back_to_pydicom_when_glymur_fails(monkeypatch, rg1):
    def broken(ds, min_side):
        raise OSError("simulated OpenJPEG failure")
    glymur_plugin = frames.REDUCED_DECODERS[0]
    monkeypatch.setattr(frames, "REDUCED_DECODERS", (
        frames.ReducedDecoder(glymur_plugin.name, lambda: True, glymur_plugin.supports, broken),
        *frames.REDUCED_DECODERS[1:],
    ))
    result = load_for_model(data_file("RG1_J2KR.dcm"))
    assert result.decoder == "pydicom+box" and result.reduction == 8
    assert any("simulated OpenJPEG failure" in n for n in result.notes)
    assert image_mad(result.image, rg1[("RG1_J2KR.dcm", False)].image) < IMAGE_TOL


def test_rg1_lossy_j2k_is_analysed(rg1):
    result = load_for_model(data_file("RG1_J2KI.dcm"))
    assert image_mad(result.image, rg1[("RG1_UNCR.dcm", True)].image) < IMAGE_TOL


@pytest.mark.parametrize("name", ["RG3_UNCR.dcm", "RG3_J2KR.dcm"])
def test_rg3_extremity_is_refused(name):
    with pytest.raises(NotAnalysable, match="body part EXTREMITY is not chest"):
        load_for_model(data_file(name))


def test_dataset_and_file_object_inputs(rg1):
    path = data_file("RG1_UNCR.dcm")
    with open(path, "rb") as f:
        from_file_object = load_for_model(f)
    from_dataset = load_for_model(pydicom.dcmread(path))
    ref = rg1[("RG1_UNCR.dcm", False)].image
    assert np.array_equal(from_file_object.image, ref) and np.array_equal(from_dataset.image, ref)
    assert from_dataset.decode_ms > 0 and from_dataset.source_shape == (1955, 1841)


# --- the reduction itself ---------------------------------------------------------------------


def test_box_reduce_averages_blocks_and_keeps_padding_out():
    stored = np.array([
        [10, 20, 0, 0, 7, 7],
        [30, 40, 0, 50, 7, 7],
    ], dtype=np.uint16)
    assert frames.box_reduce(stored, 2).tolist() == [[25, 12, 7]]  # 12.5 rounds to even
    pad = stored == 0
    # Block 2 holds one real pixel among three padding ones: mostly padding -> stays padding.
    assert frames.box_reduce(stored, 2, pad, 0).tolist() == [[25, 0, 7]]
    pad[0, 2] = False  # now half real (0 and 50): the mean of the real pixels only
    assert frames.box_reduce(stored, 2, pad, 0).tolist() == [[25, 25, 7]]


def test_box_reduce_keeps_signed_dtype():
    stored = np.array([[-100, -300], [-200, -400]], dtype=np.int16)
    out = frames.box_reduce(stored, 2)
    assert out.dtype == np.int16 and out.tolist() == [[-250]]


@pytest.mark.parametrize("rows, cols, min_side, factor", [
    (1955, 1841, 224, 8), (977, 920, 224, 4), (300, 300, 224, 1), (100, 4000, 224, 1), (2048, 2048, 256, 8),
])
def test_box_factor_keeps_the_short_side(rows, cols, min_side, factor):
    assert frames.box_factor(rows, cols, min_side) == factor
    assert min(rows, cols) // factor >= min(min_side, min(rows, cols))


def test_padding_range_limit():
    ds = Dataset()
    ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = 100, 10
    stored = np.array([[5, 10, 55, 100, 101]])
    assert frames.padding_range(ds) == (10, 100)
    assert frames.padding_mask(ds, stored).tolist() == [[False, True, True, True, False]]
