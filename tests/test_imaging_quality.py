"""The quality gate and bad input: every refusal is a NotAnalysable with a readable reason."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless

from pacsbridge.imaging import NotAnalysable, check_header, load_for_model


def data_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom-data file {name} not installed")
    return path


@pytest.fixture(scope="module")
def rg1_bytes() -> bytes:
    with open(data_file("RG1_UNCR.dcm"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def rg1_j2k_bytes() -> bytes:
    with open(data_file("RG1_J2KR.dcm"), "rb") as f:
        return f.read()


@pytest.fixture
def rg1_header() -> Dataset:
    """RG1 (CR chest PA) as the gate sees it: header plus a Pixel Data element."""
    return pydicom.dcmread(data_file("RG1_UNCR.dcm"))


def _view_code(meaning: str) -> list[Dataset]:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "x", "99TEST", meaning
    return [item]


DELETE = object()

# (change to RG1's header, expected reason fragment or None for "analyse it")
GATE_CASES = [
    ({}, None),
    ({"Modality": "DX"}, None),
    ({"Modality": "SC"}, None),
    ({"Modality": "CT"}, "modality CT is not a radiograph"),
    ({"Modality": "MG"}, "modality MG is not a radiograph"),
    ({"Modality": DELETE}, None),  # a CR image without Modality (converters omit it): read as SC
    ({"Modality": DELETE, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"}, "no Modality"),  # MR class
    # Three-sample RGB/YBR passes the header gate: decoding decides whether it is grey (see
    # test_imaging_colour.py); palette colour and 3-sample MONOCHROME are refused outright.
    ({"Modality": "OT", "PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}, None),
    ({"PhotometricInterpretation": "PALETTE COLOR"}, "colour image"),
    ({"PhotometricInterpretation": "YBR_FULL", "SamplesPerPixel": 3}, None),
    ({"PhotometricInterpretation": "MONOCHROME2", "SamplesPerPixel": 3}, "colour image"),
    ({"BodyPartExamined": "HAND"}, "body part HAND is not chest"),
    ({"BodyPartExamined": "KNEE"}, "body part KNEE is not chest"),
    ({"BodyPartExamined": "LUNG"}, None),
    ({"BodyPartExamined": "THORAX"}, None),
    ({"BodyPartExamined": ""}, None),
    ({"ViewPosition": "LL"}, "lateral view"),
    ({"ViewPosition": "RL"}, "lateral view"),
    ({"ViewPosition": "LATERAL"}, "lateral view"),
    ({"ViewPosition": "RLO"}, "oblique view"),
    ({"ViewPosition": "AP"}, None),
    ({"ViewPosition": "", "SeriesDescription": "CHEST LAT"}, "lateral view"),
    ({"ViewPosition": "", "ProtocolName": "Thorax lateral"}, "lateral view"),
    ({"ViewPosition": "", "SeriesDescription": "CHEST PA"}, None),
    ({"ViewPosition": "", "StudyDescription": "CHEST PA AND LAT"}, None),  # study holds both
    ({"ViewPosition": "", "ViewCodeSequence": _view_code("left lateral")}, "non-frontal view"),
    ({"ViewPosition": "", "ViewCodeSequence": _view_code("postero-anterior")}, None),
    ({"BodyPartExamined": DELETE, "StudyDescription": "KNEE 2 VIEWS"}, "description names KNEE"),
    ({"BodyPartExamined": DELETE, "StudyDescription": "XR HAND LEFT"}, "description names HAND"),
    ({"BodyPartExamined": DELETE}, None),  # RG1's study description says THORAX
    ({"BodyPartExamined": DELETE, "StudyDescription": DELETE, "ImageLaterality": "R"},
     "ImageLaterality R without a body part"),
    ({"BodyPartExamined": DELETE, "StudyDescription": DELETE}, None),  # nothing says otherwise
    ({"Rows": 100}, "image too small"),
    ({"Columns": 64}, "image too small"),
    ({"BitsAllocated": 1}, "1-bit image"),
    ({"PixelData": DELETE}, "no Pixel Data"),
]


@pytest.mark.parametrize("changes, reason", GATE_CASES, ids=[repr(c) for c, _ in GATE_CASES])
def test_header_gate(rg1_header, changes, reason):
    for keyword, value in changes.items():
        if value is DELETE:
            if keyword in rg1_header:
                delattr(rg1_header, keyword)
        else:
            setattr(rg1_header, keyword, value)
    got = check_header(rg1_header)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_rg1_passes_and_rg3_fails_the_gate_on_tags():
    assert check_header(pydicom.dcmread(data_file("RG1_J2KR.dcm"))) is None
    reason = check_header(pydicom.dcmread(data_file("RG3_J2KR.dcm")))
    assert reason == "body part EXTREMITY is not chest"


# --- bad input: NotAnalysable, never another exception -----------------------------------------


def _rewrap(raw: bytes, **changes) -> io.BytesIO:
    ds = pydicom.dcmread(io.BytesIO(raw))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return buf


def _small_image(rows: int = 256, cols: int = 256) -> Dataset:
    """A valid little chest-like CR for corruption tests."""
    ds = pydicom.dcmread(data_file("RG1_UNCR.dcm"))
    ds.PixelData = ds.pixel_array[::7, ::7][:rows, :cols].copy().tobytes()
    ds.Rows, ds.Columns = rows, cols
    return ds


def _garbage_encapsulated(syntax) -> Dataset:
    ds = _small_image()
    ds.PixelData = encapsulate([np.random.default_rng(7).bytes(20000)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


BAD_INPUTS = {
    "not DICOM": (lambda raw, j2k: io.BytesIO(b"GIF89a not a DICOM file at all" * 20), "not a DICOM file"),
    "empty file": (lambda raw, j2k: io.BytesIO(b""), "not a DICOM file"),
    "header only": (lambda raw, j2k: io.BytesIO(raw[:600]), ""),
    "native cut in half": (lambda raw, j2k: io.BytesIO(raw[: len(raw) // 2]), "could not be decoded"),
    "native Pixel Data 2 bytes short": (lambda raw, j2k: _rewrap(raw, PixelData=pydicom.dcmread(
        io.BytesIO(raw)).PixelData[:-2]), "less than expected"),
    "J2K file cut at 60 %": (lambda raw, j2k: io.BytesIO(j2k[: int(len(j2k) * 0.6)]), "truncated"),
    "J2K codestream cut": (lambda raw, j2k: _j2k_with_codestream_cut(j2k), "could not be decoded"),
    "garbage J2K": (lambda raw, j2k: _garbage_encapsulated(JPEG2000Lossless), "could not be decoded"),
    "garbage RLE": (lambda raw, j2k: _garbage_encapsulated(RLELossless), "could not be decoded"),
    "Rows larger than the data": (lambda raw, j2k: _rewrap(raw, Rows=4000), "could not be decoded"),
    # SC_rgb is 100x100: the size check refuses it before its (real) colour is decoded;
    # test_imaging_colour.py covers real colour at a usable size.
    "colour SC": (lambda raw, j2k: data_file("SC_rgb.dcm"), "image too small"),
    "palette colour": (lambda raw, j2k: data_file("OT-PAL-8-face.dcm"), "colour image"),
    "CT slice": (lambda raw, j2k: data_file("CT_small.dcm"), "modality CT"),
    "blank image": (lambda raw, j2k: _blank(), "blank image"),
    "missing file": (lambda raw, j2k: "/nonexistent/pacsbridge/x.dcm", "file not found"),
}


def _j2k_with_codestream_cut(j2k: bytes) -> Dataset:
    from pydicom.encaps import get_frame
    ds = pydicom.dcmread(io.BytesIO(j2k))
    codestream = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([codestream[: len(codestream) // 2]])
    return ds


def _blank() -> Dataset:
    ds = _small_image()
    ds.PixelData = np.full((256, 256), 1234, np.uint16).tobytes()
    del ds.WindowCenter, ds.WindowWidth
    return ds


@pytest.mark.parametrize("full_resolution", [False, True], ids=["reduced", "full"])
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_not_analysable(name, full_resolution, rg1_bytes, rg1_j2k_bytes):
    make, fragment = BAD_INPUTS[name]
    with pytest.raises(NotAnalysable) as info:
        load_for_model(make(rg1_bytes, rg1_j2k_bytes), full_resolution=full_resolution)
    reason = info.value.reason
    assert fragment in reason
    assert reason == str(info.value) and "\n" not in reason and 0 < len(reason) <= 300


def test_small_valid_image_is_analysed():
    """The corruption cases above start from an image that is fine."""
    result = load_for_model(_small_image())
    assert result.image.shape == (256, 256) and result.image.std() > 0.05


@pytest.mark.parametrize("seed", range(12))
def test_random_damage_never_escapes_as_another_exception(seed, rg1_j2k_bytes):
    """Cut or scribble over the J2K file at random: a result or NotAnalysable, nothing else."""
    rng = np.random.default_rng(seed)
    data = bytearray(rg1_j2k_bytes)
    if seed % 3 == 0:
        data = data[: int(rng.integers(200, len(data)))]
    else:
        start = int(rng.integers(132, len(data) - 4096))
        length = int(rng.integers(1, 4096))
        data[start:start + length] = rng.bytes(length)
    try:
        result = load_for_model(io.BytesIO(bytes(data)))
    except NotAnalysable as exc:
        assert exc.reason
    else:
        assert result.image.ndim == 2 and np.isfinite(result.image).all()
