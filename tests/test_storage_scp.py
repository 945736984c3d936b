"""The Storage SCP over real loopback associations (pynetdicom SCU and DCMTK storescu/echoscu)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    JPEG2000Lossless, RLELossless, generate_uid,
)
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing, MRImageStorage, SecondaryCaptureImageStorage,
)
from sqlalchemy import func, select

from dicom_support import data_file, make_image, run_dcmtk, running_receiver, scu_ae, send_datasets
from pacsbridge.dicom.storage_scp import encode_file_meta
from pacsbridge.store.models import Event, Instance, Series, Study

needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK NOT INSTALLED: storescu missing")


@pytest.fixture
def receiver(tmp_path):
    with running_receiver(tmp_path) as r:
        yield r


@pytest.fixture
def chunked_send(monkeypatch):
    """Make pynetdicom send a file's encoded bytes as they are (needed to send broken data)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def stored_row(receiver, sop_uid: str) -> Instance:
    with receiver.sessions() as s:
        rows = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).all()
        assert len(rows) == 1, f"expected one row for the instance, found {len(rows)}"
        return rows[0]


def assert_stored_same(receiver, sent) -> Instance:
    """The stored file parses and holds the same dataset (and pixel bytes) as what was sent."""
    sent_ds = sent if not isinstance(sent, (str, Path)) else dcmread(sent)
    row = stored_row(receiver, sent_ds.SOPInstanceUID)
    path = receiver.spool.path(row.file_path)
    assert path.is_file()
    assert path.stat().st_size == row.file_size
    stored = dcmread(path)
    assert stored.SOPInstanceUID not in row.file_path  # hashed name, never the raw UID
    assert stored.file_meta.TransferSyntaxUID == row.transfer_syntax_uid
    assert stored.file_meta.MediaStorageSOPInstanceUID == sent_ds.SOPInstanceUID
    assert stored.PixelData == sent_ds.PixelData
    # Senders may drop Data Set Trailing Padding and group lengths; everything else must be identical.
    sent_tags, stored_tags = _significant_tags(sent_ds), _significant_tags(stored)
    assert sent_tags == stored_tags
    for tag in sent_tags:
        assert stored[tag].value == sent_ds[tag].value, f"{sent_ds[tag].keyword} differs"
    return row


def _significant_tags(ds) -> list:
    return [e.tag for e in ds if e.tag != 0xFFFCFFFC and e.tag.element != 0x0000]


# -- verification and the real radiographs ------------------------------------------------------------
@needs_dcmtk
def test_echo_with_dcmtk_and_pynetdicom(receiver):
    res = run_dcmtk("echoscu", "-aet", "ECHOER", "-aec", "PACSBRIDGE", "127.0.0.1", str(receiver.port))
    assert res.returncode == 0, res.stderr
    ae = scu_ae()
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACSBRIDGE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


@needs_dcmtk
@pytest.mark.parametrize("name, propose", [("RG1_UNCR.dcm", "-xe"), ("RG1_J2KR.dcm", "-xv")])
def test_dcmtk_storescu_real_radiograph(receiver, name, propose):
    src = data_file(name)
    res = run_dcmtk("storescu", propose, "-aet", "MODALITY1", "-aec", "PACSBRIDGE",
                    "127.0.0.1", str(receiver.port), str(src))
    assert res.returncode == 0, res.stderr
    row = assert_stored_same(receiver, src)
    sent = dcmread(src)
    assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
    assert row.sop_class_uid == ComputedRadiographyImageStorage
    assert row.calling_ae == "MODALITY1"
    assert row.state == "received"
    with receiver.sessions() as s:
        series = s.get(Series, row.series_id)
        study = s.get(Study, series.study_id)
        assert (series.series_instance_uid, series.modality, series.body_part) == (
            sent.SeriesInstanceUID, "CR", sent.BodyPartExamined)
        assert study.study_instance_uid == sent.StudyInstanceUID
        assert study.patient_id == sent.PatientID


@needs_dcmtk
def test_dcmtk_storescu_synthetic_cr_dx_sc(receiver, tmp_path):
    """DCMTK sends CR, both DX flavours and SC in one association; all stored and recorded."""
    paths, sent = [], []
    for i, sop_class in enumerate([ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                                   DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage]):
        ds = make_image(sop_class)
        path = tmp_path / f"img{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
        sent.append(ds)
    res = run_dcmtk("storescu", "-aec", "PACSBRIDGE", "127.0.0.1", str(receiver.port), *paths)
    assert res.returncode == 0, res.stderr
    for ds in sent:
        row = assert_stored_same(receiver, ds)
        assert row.sop_class_uid == ds.SOPClassUID


@needs_dcmtk
def test_dcmtk_deflated_transfer(receiver):
    """storescu deflates on the fly; the stored (deflated) file holds the original dataset."""
    src = data_file("RG1_UNCR.dcm")
    res = run_dcmtk("storescu", "-xd", "-R", "-aec", "PACSBRIDGE", "127.0.0.1", str(receiver.port), str(src))
    assert res.returncode == 0, res.stderr
    row = assert_stored_same(receiver, src)
    assert row.transfer_syntax_uid == DeflatedExplicitVRLittleEndian


@pytest.mark.parametrize("sop_class", [
    ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage,
])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                DeflatedExplicitVRLittleEndian])
def test_pynetdicom_synthetic_images(receiver, sop_class, ts):
    ds = make_image(sop_class, transfer_syntax=ts)
    assert send_datasets(receiver.port, [ds], ae=scu_ae([ts], [sop_class])) == [0x0000]
    row = assert_stored_same(receiver, ds)
    assert row.transfer_syntax_uid == ts
    with receiver.sessions() as s:
        study = s.get(Study, s.get(Series, row.series_id).study_id)
        assert study.requested_priority == "STAT"
        assert study.accession_number == "ACC0001"
        assert study.patient_name == "Test^Patient"  # display fields for the worklist, from the first instance
        assert study.study_description is None  # absent in the dataset: stays empty


def test_study_display_fields_are_recorded_and_gaps_filled(receiver):
    first = make_image(ComputedRadiographyImageStorage)
    first.PatientAge, first.PatientSex, first.PatientBirthDate = "061Y", "F", "19650304"
    first.ReferringPhysicianName = "Ref^Doctor"
    second = make_image(ComputedRadiographyImageStorage, study_uid=first.StudyInstanceUID)
    second.StudyDescription = "CHEST PA"  # a later instance fills what the first lacked
    second.PatientAge = "099Y"  # but does not overwrite it
    assert send_datasets(receiver.port, [first, second]) == [0x0000, 0x0000]
    with receiver.sessions() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == first.StudyInstanceUID)).one()
        assert (study.patient_name, study.patient_age, study.patient_sex, study.patient_birth_date,
                study.referring_physician, study.study_description) == (
            "Test^Patient", "061Y", "F", "19650304", "Ref^Doctor", "CHEST PA")


@pytest.mark.parametrize("name", [
    "RG1_J2KI.dcm",                         # JPEG 2000 (lossy)
    "JPEG-LL.dcm",                          # JPEG lossless (process 14)
    "JPGLosslessP14SV1_1s_1f_8b.dcm",       # JPEG lossless SV1
    "SC_rgb_jpeg_dcmtk.dcm",                # JPEG baseline
    "JPEG-lossy.dcm",                       # JPEG extended (12-bit)
    "emri_small_jpeg_ls_lossless.dcm",      # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm",            # JPEG-LS near-lossless
    "emri_small_RLE.dcm",                   # RLE lossless
    "emri_small_jpeg_2k_lossless.dcm",      # JPEG 2000 lossless
])
def test_compressed_transfer_syntaxes_accepted(receiver, tmp_path, chunked_send, name):
    """Real compressed files, relabelled as Secondary Capture, arrive byte for byte."""
    ds = dcmread(data_file(name))
    ts = ds.file_meta.TransferSyntaxUID
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()  # some test files lack them
    path = tmp_path / "relabelled.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert send_datasets(receiver.port, [path], ae=scu_ae([ts], [SecondaryCaptureImageStorage])) == [0x0000]
    row = assert_stored_same(receiver, path)
    assert row.transfer_syntax_uid == ts
    # The encoded dataset was written as received, without decoding or re-encoding.
    sent_body = path.read_bytes()
    stored_body = receiver.spool.path(row.file_path).read_bytes()
    assert sent_body[-len(ds.PixelData):] == stored_body[-len(ds.PixelData):]


def test_pydicom_encoded_rle_and_j2k(receiver):
    datasets = []
    for ts in (RLELossless, JPEG2000Lossless):
        ds = make_image(ComputedRadiographyImageStorage, rows=32, cols=32)
        ds.compress(ts)
        datasets.append(ds)
    ae = scu_ae([RLELossless, JPEG2000Lossless], [ComputedRadiographyImageStorage])
    assert send_datasets(receiver.port, datasets, ae=ae) == [0, 0]
    for ds in datasets:
        assert_stored_same(receiver, ds)


# -- access control ------------------------------------------------------------------------------------
@needs_dcmtk
def test_unknown_calling_ae_rejected_and_recorded(tmp_path):
    with running_receiver(tmp_path, allowed=("GOODPACS",)) as r:
        ae = scu_ae()
        ae.ae_title = "INTRUDER"
        assoc = ae.associate("127.0.0.1", r.port, ae_title="PACSBRIDGE")
        assert assoc.is_rejected
        res = run_dcmtk("echoscu", "-aet", "INTRUDER2", "-aec", "PACSBRIDGE", "127.0.0.1", str(r.port))
        assert res.returncode != 0
        ok = run_dcmtk("echoscu", "-aet", "GOODPACS", "-aec", "PACSBRIDGE", "127.0.0.1", str(r.port))
        assert ok.returncode == 0, ok.stderr
        assert send_datasets(r.port, [make_image()], calling_ae="GOODPACS") == [0]
        with r.sessions() as s:
            events = s.scalars(select(Event).where(Event.kind == "association_rejected")).all()
        peers = sorted(e.peer for e in events)
        assert len(peers) == 2
        assert peers[0].startswith("INTRUDER2@127.0.0.1:") and peers[1].startswith("INTRUDER@127.0.0.1:")
        assert all("allowed_calling_aes" in e.detail for e in events)


# -- duplicates and concurrency ------------------------------------------------------------------------
def test_duplicate_stored_once_and_acknowledged(receiver):
    ds = make_image()
    assert send_datasets(receiver.port, [ds, ds]) == [0, 0]
    assert send_datasets(receiver.port, [ds]) == [0]
    row = assert_stored_same(receiver, ds)
    files = [p for p in receiver.spool.root.rglob("*") if p.is_file()]
    assert files == [receiver.spool.path(row.file_path)]


def test_concurrent_associations_same_study_and_duplicate_race(receiver):
    study, series = generate_uid(), generate_uid()
    shared = make_image(study_uid=study, series_uid=series, seed=1)
    per_thread = [[make_image(study_uid=study, series_uid=series) for _ in range(4)] + [shared] for _ in range(4)]
    results: list[list[int]] = [[] for _ in per_thread]

    def worker(i: int) -> None:
        results[i] = send_datasets(receiver.port, per_thread[i], calling_ae=f"SENDER{i}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(per_thread))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [[0] * 5] * 4
    with receiver.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 4 * 4 + 1
        assert s.scalar(select(func.count()).select_from(Study)) == 1
        assert s.scalar(select(func.count()).select_from(Series)) == 1
    assert_stored_same(receiver, shared)
    assert len([p for p in receiver.spool.root.rglob("*.dcm")]) == 17
    assert list(receiver.spool.tmp_dir.iterdir()) == []


# -- bad input -------------------------------------------------------------------------------------------
def _events(receiver, kind: str) -> list[Event]:
    with receiver.sessions() as s:
        return s.scalars(select(Event).where(Event.kind == kind)).all()


def test_unsupported_sop_class_refused_at_negotiation(receiver):
    ae = scu_ae(sop_classes=[MRImageStorage, ComputedRadiographyImageStorage])
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACSBRIDGE")
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assert MRImageStorage not in accepted and ComputedRadiographyImageStorage in accepted
    mr = dcmread(data_file("MR2_UNCR.dcm"))
    with pytest.raises(ValueError):
        assoc.send_c_store(mr)
    assert assoc.send_c_store(make_image()).Status == 0  # still serving on the same association
    assoc.release()


def _write_with_meta(path: Path, ds, *, meta_class: str, meta_instance: str) -> Path:
    """Save ``ds`` but claim another SOP Class/Instance in the file meta (which the SCU sends as the command)."""
    ds.save_as(path, enforce_file_format=True)
    file_meta, offset = split_dataset(path)
    body = path.read_bytes()[offset:]
    path.write_bytes(encode_file_meta(meta_class, meta_instance, file_meta.TransferSyntaxUID, "") + body)
    return path


def test_bad_datasets_get_failure_status_and_event(receiver, tmp_path, chunked_send):
    cr = ComputedRadiographyImageStorage
    good = make_image()
    good.save_as(tmp_path / "good.dcm", enforce_file_format=True)
    whole = (tmp_path / "good.dcm").read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(whole[: len(whole) - 1000])

    mr = dcmread(data_file("MR2_UNCR.dcm"))
    mr_as_cr = _write_with_meta(tmp_path / "mr.dcm", mr, meta_class=cr, meta_instance=mr.SOPInstanceUID)

    no_pixels = make_image(with_pixels=False)
    no_pixels.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)

    wrong_uid = make_image()
    wrong_uid_path = _write_with_meta(tmp_path / "uid.dcm", wrong_uid, meta_class=cr, meta_instance=generate_uid())

    bad_uid = make_image()
    bad_uid.StudyInstanceUID = "1.2.3.abc"
    bad_uid.save_as(tmp_path / "baduid.dcm", enforce_file_format=True)

    after = make_image()
    statuses = send_datasets(receiver.port, [truncated, mr_as_cr, tmp_path / "nopix.dcm", wrong_uid_path,
                                             tmp_path / "baduid.dcm", after])
    assert statuses[0] >> 12 == 0xC, hex(statuses[0])            # cannot understand
    assert statuses[1] >> 8 == 0xA9, hex(statuses[1])            # does not match SOP class
    assert statuses[2] >> 8 == 0xA9, hex(statuses[2])            # image without Pixel Data
    assert statuses[3] >> 8 == 0xA9, hex(statuses[3])            # dataset is another instance
    assert statuses[4] >> 12 == 0xC, hex(statuses[4])            # invalid UID
    assert statuses[5] == 0                                      # and the receiver keeps serving
    with receiver.sessions() as s:
        assert [i.sop_instance_uid for i in s.scalars(select(Instance))] == [after.SOPInstanceUID]
    reasons = [e.detail for e in _events(receiver, "store_rejected")]
    assert len(reasons) == 5
    assert any("truncated" in r for r in reasons)
    assert any("no Pixel Data" in r for r in reasons)
    assert list(receiver.spool.tmp_dir.iterdir()) == []


# -- faults ------------------------------------------------------------------------------------------------
def test_spool_not_writable_then_recovers(tmp_path):
    """The spool folder replaced by a regular file (root ignores permissions) -> 0xA700, then recovery."""
    spool_root = tmp_path / "data" / "spool"
    with running_receiver(tmp_path, spool_root=spool_root) as r:
        shutil.rmtree(spool_root)
        spool_root.write_bytes(b"not a directory")
        failed = make_image()
        assert send_datasets(r.port, [failed])[0] >> 8 == 0xA7
        res = send_datasets(r.port, [make_image()])  # a new association is still served
        assert res[0] >> 8 == 0xA7
        spool_root.unlink()
        assert send_datasets(r.port, [failed]) == [0]
        assert_stored_same(r, failed)
        assert len(_events(r, "store_failed")) == 2


def test_database_unreachable_then_recovers(tmp_path):
    """PostgreSQL cut off mid-service -> 0xA7xx (never success); the same instance succeeds once it is back."""
    from dicom_support import TcpProxy, postgres_schema_url, postgres_unavailable_reason

    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    proxy = TcpProxy(target_port=5432)
    proxy.start()
    try:
        with postgres_schema_url() as direct_url:
            url = direct_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")
            with running_receiver(tmp_path, database_url=url) as r:
                assert send_datasets(r.port, [make_image()]) == [0]
                proxy.stop()
                lost = make_image()
                statuses = send_datasets(r.port, [lost, make_image()])
                assert all(s >> 8 == 0xA7 for s in statuses), [hex(s) for s in statuses]
                assert list(r.spool.tmp_dir.iterdir()) == []
                proxy.start()
                assert send_datasets(r.port, [lost]) == [0]
                assert_stored_same(r, lost)
                with r.sessions() as s:
                    assert s.scalar(select(func.count()).select_from(Instance)) == 2
    finally:
        proxy.stop()
