"""Property-based fuzzing (hypothesis, a fixed number of derandomized examples) of the functions that
read untrusted bytes: data set validation on receipt, inflation, and decoding for the model.

Contracts: ``read_metadata`` returns metadata or raises ``RejectedDataset`` with a failure status, never
anything else; ``_inflate`` never returns more than its cap; ``load_for_model`` returns an image or
raises ``NotAnalysable``; the decode-size guard refuses what is too big before decoding.
"""

from __future__ import annotations

import zlib
from io import BytesIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_support import make_image
from hostile_support import encode_dataset
from pacsbridge.dicom.metadata import RejectedDataset, _inflate, read_metadata
from pacsbridge.imaging import NotAnalysable, load_for_model
from pacsbridge.imaging.limits import check_decoded_size

FUZZ = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FAILURE_STATUSES = {0xA700, 0xA701, 0xA702, 0xA900, 0xC000, 0xC001}

_BASE = make_image(rows=16, cols=16, seed=7)
BASE_RAW = encode_dataset(_BASE)
BASE_CLASS, BASE_UID = str(_BASE.SOPClassUID), str(_BASE.SOPInstanceUID)
_IMAGE = make_image(rows=128, cols=128, seed=8)  # big enough for the quality gate: decoding is reached
_IMAGE.SOPInstanceUID = BASE_UID
IMAGE_RAW = encode_dataset(_IMAGE)


@st.composite
def mutated(draw, base: bytes = BASE_RAW) -> bytes:  # noqa: ANN001
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "overwrite_len"]))
        if not data:
            break
        # Mostly in the header elements (the first ~500 bytes), where framing and image attributes live.
        end = len(data) - 1 if draw(st.booleans()) else min(len(data) - 1, 500)
        i = draw(st.integers(0, end))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 32))]
        else:
            data[i:i + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xf0\xff\xff\x7f"]))
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")
@FUZZ
@given(body=st.one_of(mutated(), st.binary(max_size=2048)),
       ts=st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
def test_read_metadata_only_accepts_or_rejects_with_a_failure_status(body, ts):
    try:
        meta = read_metadata(body, str(ts), BASE_CLASS, BASE_UID)
    except RejectedDataset as exc:
        assert exc.status in FAILURE_STATUSES and exc.reason
        return
    assert meta.sop_instance_uid == BASE_UID and meta.sop_class_uid == BASE_CLASS


@pytest.mark.filterwarnings("ignore::UserWarning")
@FUZZ
@given(body=st.binary(max_size=4096), cap=st.integers(1, 100_000))
def test_inflate_is_bounded_and_only_rejects(body, cap):
    try:
        out = _inflate(body, cap)
    except RejectedDataset as exc:
        assert exc.status in (0xA702, 0xC000)
        return
    assert len(out) <= cap


@FUZZ
@given(n=st.integers(0, 3_000_000), cap=st.integers(1_000, 1_000_000))
def test_inflate_of_deflated_zeros(n, cap):
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = c.compress(b"\x00" * n) + c.flush()
    if n <= cap:
        assert _inflate(body, cap) == b"\x00" * n
    else:
        with pytest.raises(RejectedDataset) as exc:
            _inflate(body, cap)
        assert exc.value.status == 0xA702


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@FUZZ
@given(body=mutated(IMAGE_RAW))
def test_load_for_model_returns_an_image_or_not_analysable(body):
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = BASE_CLASS, BASE_UID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    buf.write(body)
    buf.seek(0)
    try:
        result = load_for_model(buf, max_decoded_bytes=10_000_000)
    except NotAnalysable as exc:
        assert str(exc)
        return
    assert result.image.ndim == 2


def test_the_unmutated_image_is_analysable():  # so the harness above does reach the decoder
    buf = BytesIO()
    _IMAGE.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    assert load_for_model(buf).image.ndim == 2


@FUZZ
@given(rows=st.integers(0, 70_000), cols=st.integers(0, 70_000), frames=st.integers(1, 5000),
       bits=st.sampled_from([1, 8, 12, 16, 32]), samples=st.sampled_from([1, 3]))
def test_decode_size_guard(rows, cols, frames, bits, samples):
    ds = make_image(rows=16, cols=16, with_pixels=True, seed=1)
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.BitsAllocated, ds.SamplesPerPixel = bits, samples
    size = rows * cols * frames * samples * ((bits + 7) // 8)
    reason = check_decoded_size(ds, 256 * 1024 * 1024)
    assert (reason is None) == (size <= 256 * 1024 * 1024)
    if reason:
        assert "too large to decode" in reason and "max_decoded_bytes" in reason


def test_deflated_dataset_from_pydicom_is_read_within_the_cap():
    ds = make_image(rows=64, cols=64, transfer_syntax=DeflatedExplicitVRLittleEndian)
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    raw = encode_dataset(ds)
    body = c.compress(raw) + c.flush()
    meta = read_metadata(body, str(DeflatedExplicitVRLittleEndian), str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                         max_inflated=len(raw))
    assert meta.sop_instance_uid == ds.SOPInstanceUID
    with pytest.raises(RejectedDataset) as exc:
        read_metadata(body, str(DeflatedExplicitVRLittleEndian), str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                      max_inflated=len(raw) - 1)
    assert exc.value.status == 0xA702
