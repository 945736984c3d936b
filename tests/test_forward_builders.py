"""Result objects: the SR (highdicom validation on construction and on re-reading, DCMTK dsrdump),
the heatmap Secondary Capture, and the HL7 ORU^R01; UIDs stable per result."""

from __future__ import annotations

import shutil
import subprocess

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from forward_support import sr_items
from pacsbridge.forward.heatmap_sc import WARNING_TEXT, build_heatmap_sc
from pacsbridge.forward.hl7_oru import build_oru
from pacsbridge.forward.results import Result
from pacsbridge.forward.sr import build_sr
from pipeline_support import sample_file


def _result(src, *, probability=0.87, threshold=0.5, model="pneumonia-v1") -> Result:  # noqa: ANN001
    return Result(prediction_id=7, probability=probability, positive=probability >= threshold, threshold=threshold,
                  model_id=model, weights_sha256="0123456789abcdef" * 4, sop_instance_uid=src.SOPInstanceUID,
                  sop_class_uid=src.SOPClassUID, series_instance_uid=src.SeriesInstanceUID,
                  study_instance_uid=src.StudyInstanceUID, file_path="x.dcm")


@pytest.mark.parametrize("probability", [0.87, 0.12])
def test_sr_content_validation_and_dsrdump(tmp_path, probability):
    src = dcmread(sample_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    r = _result(src, probability=probability)
    sr = build_sr(r, src, ae_title="PACSBRIDGE")
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)

    again = dcmread(path)
    hd.sr.ComprehensiveSR.from_dataset(again)  # highdicom re-validates what it reads
    report = hd.sr.srread(path)
    assert report.StudyInstanceUID == src.StudyInstanceUID
    assert report.SeriesInstanceUID not in (src.SeriesInstanceUID, "") and report.PatientID == src.PatientID
    assert report.SOPInstanceUID == build_sr(r, src, ae_title="PACSBRIDGE").SOPInstanceUID  # stable
    assert report.SOPInstanceUID != build_sr(_result(src, model="other"), src, ae_title="PACSBRIDGE").SOPInstanceUID
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID

    items = sr_items(again)
    finding = [v for vt, name, v in items if name == "Pneumonia"]
    assert finding == [("52101004", "SCT") if r.positive else ("272519000", "SCT")]
    assert [v for _, n, v in items if n == "Probability"] == [pytest.approx(probability)]
    assert [v for _, n, v in items if n == "Threshold Value"] == [0.5]
    assert [v for _, n, v in items if n == "AI triage positive"] == [("373066001" if r.positive else "373067005", "SCT")]
    assert [v for _, n, v in items if n == "Algorithm Version"] == ["pneumonia-v1 sha256:0123456789abcdef"]
    assert ("IMAGE", "Source of Measurement", (src.SOPClassUID, src.SOPInstanceUID)) in items
    assert ("CODE", "Observer Type", ("121007", "DCM")) in items

    if shutil.which("dsrdump") is None:
        pytest.skip("DCMTK NOT INSTALLED: dsrdump check SKIPPED")
    res = subprocess.run(["dsrdump", "-v", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "E:" not in res.stderr and "W:" not in res.stderr, res.stderr
    assert "Pneumonia" in res.stdout and "Probability" in res.stdout


def test_heatmap_secondary_capture(tmp_path):
    src = dcmread(sample_file("RG1_UNCR.dcm"))
    r = _result(src)
    overlay = np.zeros((300, 280, 3), np.uint8)
    overlay[..., 0] = np.linspace(0, 255, 280, dtype=np.uint8)  # a red ramp standing in for a heatmap
    sc = build_heatmap_sc(r, src, overlay)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    ds = dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.PhotometricInterpretation == "RGB"
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    assert ds.SeriesInstanceUID not in (src.SeriesInstanceUID, build_sr(r, src, ae_title="X").SeriesInstanceUID)
    assert ds.SOPInstanceUID == build_heatmap_sc(r, src, overlay).SOPInstanceUID  # stable
    assert ds.BurnedInAnnotation == "YES" and WARNING_TEXT in ds.ImageComments
    px = ds.pixel_array
    assert px.shape == (300, 280, 3)
    band, body = px[-12:], px[:-60]
    assert (band == 255).all(axis=2).sum() > 50, "no white text burned in along the bottom"
    assert np.array_equal(body, overlay[:-60]), "the overlay above the text band must be unchanged"
    with pytest.raises(ValueError):
        build_heatmap_sc(r, src, overlay[..., 0])


def test_oru_fields_and_escaping():
    src = dcmread(sample_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    src.PatientName = "O|Brien^Jo&e"
    src.AccessionNumber = "ACC^42"
    src.AdmissionID = "V123"
    src.IssuerOfPatientID = "HOSP"
    r = _result(src, probability=0.91)
    msg = build_oru(r, src, control_id=r.message_control_id("ris"), sending_application="PACSBRIDGE",
                    sending_facility="RAD", receiving_application="RIS", receiving_facility="HOSP")
    assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(msg.segment("MSH")[12]) == "2.5.1"
    assert str(msg.segment("MSH")[10]) == r.message_control_id("ris") != r.message_control_id("ris2")
    pid = msg.segment("PID")
    assert str(pid[3][0][0]) == "9RG1" and str(pid[3][0][3]) == "HOSP"
    assert msg.unescape(str(pid[5][0][0])) == "O|Brien" and msg.unescape(str(pid[5][0][1])) == "Jo&e"
    assert str(pid[7]) == "19400305" and str(pid[8]) == "F"
    assert str(msg.segment("PV1")[19]) == "V123"
    obr = msg.segment("OBR")
    assert msg.unescape(str(obr[3])) == "ACC^42" and str(obr[25]) == "P"
    obx = {str(s[3][0][0]): s for s in msg.segments("OBX")}
    assert str(obx["233604007"][5]) == "52101004^Present^SCT" and str(obx["233604007"][8]) == "A"
    assert float(str(obx["122157"][5])) == pytest.approx(0.91)
    assert str(obx["AIPRIORITY"][5]) == "URGENT"
    assert str(obx["111003"][5]) == "pneumonia-v1 sha256:0123456789abcdef"
    assert str(obx["113014"][5]) == src.StudyInstanceUID
    negative = build_oru(_result(src, probability=0.1), None, control_id="X1", sending_application="A",
                         sending_facility="", receiving_application="B", receiving_facility="")
    obx = {str(s[3][0][0]): s for s in negative.segments("OBX")}
    assert str(obx["233604007"][5]) == "272519000^Absent^SCT" and str(obx["AIPRIORITY"][5]) == "ROUTINE"
    assert str(negative.segment("PID")[3]) == ""  # no header: no demographics, still a valid message


def test_sr_from_an_image_without_optional_patient_attributes(tmp_path):
    """Real images may lack Type 2 patient/study attributes that the SR must carry (then empty)."""
    from pipeline_support import synthetic_chest

    src = synthetic_chest(1)
    for kw in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
               "AccessionNumber"):
        assert kw not in src
    sr = build_sr(_result(src), src, ae_title="PACSBRIDGE")
    assert sr.PatientID == src.PatientID and not sr.PatientBirthDate and not sr.AccessionNumber
    assert "PatientBirthDate" in sr and "AccessionNumber" in sr  # Type 2: present, empty
    assert "PatientBirthDate" not in src  # the source is not modified
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    hd.sr.srread(tmp_path / "sr.dcm")
