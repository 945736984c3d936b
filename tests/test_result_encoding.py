"""Results from any legal header: a multi-valued, a Latin-1 (ISO_IR 100) and an ISO 2022 Japanese
Patient's Name, over-long and invalid values -> the SR builds with highdicom, reaches a real DCMTK
storescp over DICOM and passes dsrdump without errors; the heatmap SC builds; the ORU reaches a real
MLLP listener with MSH-18, the name as real characters and multi-valued ids as repetitions."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from dicom_support import free_port, wait_for_port
from forward_support import MllpListener, add_result, migrated_sessions
from pacsbridge.config import Destination
from pacsbridge.forward.forwarder import Forwarder
from pacsbridge.forward.header_values import header_values
from pacsbridge.forward.heatmap_sc import build_heatmap_sc
from pacsbridge.forward.hl7_oru import build_oru
from pacsbridge.forward.results import Result
from pacsbridge.forward.senders import ForwardContext
from pacsbridge.forward.sr import build_sr
from pipeline_support import sample_file


def unusual_header(tmp_path: Path, name: str = "latin1") -> Path:
    """RG1 saved (so pydicom decodes it from bytes, as from the spool) with legal but unusual values."""
    ds = dcmread(sample_file("RG1_UNCR.dcm"))
    if name == "latin1":
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = ["Müller^Hans", "Mueller^Hans"]       # multi-valued PN, Latin-1
        ds.ReferringPhysicianName = ["Dr^Zoë", "Other^Doc"]
    else:
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]        # ISO 2022 Japanese (PS3.5 H.3.1)
        ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.PatientID = ["ID", "TWO"]                                # multi-valued LO
    ds.AccessionNumber = ["ACC1", "ACC2"]
    ds.StudyID = "S" * 16
    ds.add_new("StudyDescription", "LO", "chest " + "x" * 80)   # over the LO limit
    ds.PatientBirthDate = "1940.03.05"                          # ACR-NEMA style date: converted
    ds.PatientSex = "F"
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _result(src) -> Result:  # noqa: ANN001
    return Result(prediction_id=3, probability=0.9, positive=True, threshold=0.5, model_id="test-model",
                  weights_sha256="ab" * 32, sop_instance_uid=src.SOPInstanceUID, sop_class_uid=src.SOPClassUID,
                  series_instance_uid=src.SeriesInstanceUID, study_instance_uid=src.StudyInstanceUID,
                  file_path="x.dcm")


def _dsrdump(path: Path) -> subprocess.CompletedProcess:
    if shutil.which("dsrdump") is None:
        pytest.skip("DCMTK NOT INSTALLED: dsrdump check SKIPPED")
    res = subprocess.run(["dsrdump", "-v", "--convert-to-utf8", str(path)], capture_output=True, timeout=60)
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode("utf-8", "replace"),
                                       res.stderr.decode("utf-8", "replace"))


def test_header_values_normalise_per_vr(tmp_path) -> None:
    hv = header_values(dcmread(unusual_header(tmp_path), stop_before_pixels=True))
    assert hv.all("PatientName") == ["Müller^Hans", "Mueller^Hans"]
    assert hv.all("PatientID") == ["ID", "TWO"] and hv.first("PatientBirthDate") == "19400305"
    assert len(hv.first("StudyDescription")) == 64
    assert hv.character_set == "ISO_IR 100"
    ds = hv.dataset()
    assert ds.PatientName == "Müller^Hans" and ds.PatientID == "ID" and ds.AccessionNumber == "ACC1"
    assert any("PatientName: 2 values" in n for n in hv.notes)
    assert any("StudyDescription: over 64" in n for n in hv.notes)
    assert all("Müller" not in n and "ID" not in n.split(":")[1] for n in hv.notes)  # notes carry no values
    src = dcmread(sample_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    src.PatientName, src.PatientSex, src.StudyTime, src.PatientBirthDate = "Doe\tJohn\x01", "MALE", "25:99", "19xx0101"
    hv = header_values(src)
    assert hv.first("PatientName") == "Doe John"
    assert "PatientSex" not in hv.values and "StudyTime" not in hv.values and "PatientBirthDate" not in hv.values
    assert {n.split(":")[0] for n in hv.notes} == {"PatientSex", "StudyTime", "PatientBirthDate"}


@pytest.mark.parametrize("name", ["latin1", "iso2022"])
def test_sr_and_sc_from_unusual_headers_pass_highdicom_and_dsrdump(tmp_path, name) -> None:
    src_path = unusual_header(tmp_path, name)
    src = dcmread(src_path, stop_before_pixels=True)
    sr = build_sr(_result(src), src, ae_title="PACSBRIDGE")
    out = tmp_path / "sr.dcm"
    sr.save_as(out, enforce_file_format=True)
    again = dcmread(out)
    hd.sr.ComprehensiveSR.from_dataset(again)
    if name == "latin1":
        assert again.SpecificCharacterSet == "ISO_IR 100" and again.PatientName == "Müller^Hans"
    else:
        assert again.SpecificCharacterSet == "ISO_IR 192" and str(again.PatientName).split("=")[1] == "山田^太郎"
    assert again.PatientID == "ID" and again.PatientBirthDate == "19400305"
    res = _dsrdump(out)
    assert res.returncode == 0, res.stderr
    assert "E:" not in res.stderr, res.stderr
    assert ("Müller^Hans" if name == "latin1" else "山田") in res.stdout
    sc = build_heatmap_sc(_result(src), dcmread(src_path), np.zeros((64, 64, 3), np.uint8))
    sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    assert dcmread(tmp_path / "sc.dcm").PatientID == "ID"


def test_sr_of_a_multivalued_latin1_name_is_sent_to_dcmtk_storescp(tmp_path) -> None:
    if shutil.which("storescp") is None:
        pytest.skip("DCMTK NOT INSTALLED: storescp check SKIPPED")
    port, received = free_port(), tmp_path / "received"
    received.mkdir()
    peer = subprocess.Popen(["storescp", "-aet", "READPACS", "-od", str(received), "+xa", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, 30, peer)
        sessions = migrated_sessions(tmp_path)
        dest = Destination(name="pacs", kind="dicom", host="127.0.0.1", port=port, ae_title="READPACS",
                           objects=["sr"], timeout_s=20)
        add_result(sessions, tmp_path / "spool", unusual_header(tmp_path), [dest])
        fwd = Forwarder(sessions, [dest], ForwardContext("PACSBRIDGE", tmp_path / "spool"))
        assert fwd.run_once() == {"sent": 1}
        fwd.stop()
    finally:
        peer.terminate()
        peer.wait(10)
    files = list(received.iterdir())
    assert len(files) == 1
    got = dcmread(files[0])
    assert got.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and got.PatientName == "Müller^Hans"
    res = _dsrdump(files[0])
    assert res.returncode == 0 and "E:" not in res.stderr, res.stderr


@pytest.mark.parametrize("charset, codec", [("UNICODE UTF-8", "utf-8"), ("8859/1", "latin-1")])
def test_oru_over_mllp_carries_msh18_real_characters_and_repetitions(tmp_path, charset, codec) -> None:
    with MllpListener(["AA"], encoding=codec) as ris:
        sessions = migrated_sessions(tmp_path)
        dest = Destination(name="ris", kind="hl7", host="127.0.0.1", port=ris.port, receiving_application="RIS",
                           hl7_encoding=charset, timeout_s=5)
        add_result(sessions, tmp_path / "spool", unusual_header(tmp_path), [dest])
        fwd = Forwarder(sessions, [dest], ForwardContext("PACSBRIDGE", tmp_path / "spool"))
        assert fwd.run_once() == {"sent": 1}
        fwd.stop()
    msg = ris.received[0]
    raw = str(msg)
    assert str(msg.segment("MSH")[18]) == charset
    pid = msg.segment("PID")
    names = [str(rep[0]) for rep in pid[5]]
    assert names == ["Müller", "Mueller"]                       # real characters, both repetitions
    assert [str(rep[0]) for rep in pid[3]] == ["ID", "TWO"]     # CX repetitions, not "['ID', 'TWO']"
    assert "\\X" not in raw and "[" not in raw                  # no code-point escapes, no Python list text
    assert str(msg.segment("OBR")[2]) == "ACC1"
    assert str(pid[7]) == "19400305" and str(pid[8]) == "F"


def test_oru_control_characters_and_unencodable_text() -> None:
    src = dcmread(sample_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    src.PatientName = "O|Brien^Jo\te\x01"
    src.SpecificCharacterSet = "ISO_IR 192"
    src.AdmissionID = "V\r\n1"
    src.AccessionNumber = "山田"
    r = _result(src)
    msg = build_oru(r, src, control_id="C1", sending_application="A", sending_facility="", receiving_application="B",
                    receiving_facility="", charset="ASCII")
    raw = str(msg)
    assert raw.isascii() and "\\X" not in raw and "\t" not in raw
    assert msg.unescape(str(msg.segment("PID")[5][0][0])) == "O|Brien"
    assert str(msg.segment("PID")[5][0][1]) == "Jo e"
    assert str(msg.segment("PV1")[19]) == "V 1"
    assert str(msg.segment("OBR")[2]) == "??"  # ASCII cannot hold it: replaced, never escaped by code point
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "PV1", "OBR"] + ["OBX"] * 8  # no segment broken by CR
