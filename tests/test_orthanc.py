"""Orthanc as a real PACS peer: Orthanc C-ECHOes and C-STOREs real radiographs to pacsbridge.

Orthanc (Debian's ``orthanc`` package) runs as a subprocess with its own JSON configuration in a
temporary folder (free loopback ports, no plugins, no remote access); pacsbridge's Storage SCP runs
in this process.  Files are uploaded to Orthanc over its REST API, then Orthanc is asked to send
them to pacsbridge, as a hospital PACS would forward studies.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_support import data_file, free_port, running_receiver
from waiting import wait_until
from pacsbridge.store.models import Event, Instance

ORTHANC = shutil.which("Orthanc")
pytestmark = pytest.mark.skipif(
    ORTHANC is None, reason="ORTHANC NOT INSTALLED (apt-get install orthanc): Orthanc peer tests SKIPPED"
)

RADIOGRAPHS = ["RG1_UNCR.dcm", "RG1_J2KR.dcm"]
MODALITY = "pacsbridge"  # Orthanc's name for our node in DicomModalities


@dataclass
class OrthancPeer:
    http_port: int
    dicom_port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | dict | list | None = None,
                timeout: float = 120) -> tuple[int, object]:
        """(HTTP status, decoded JSON or None); Orthanc's error answers are returned, not raised."""
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as res:
                status, raw = res.status, res.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def upload(self, path: Path) -> str:
        status, answer = self.request("POST", "/instances", path.read_bytes())
        assert status == 200 and answer["Status"] in ("Success", "AlreadyStored"), answer
        return answer["ID"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextlib.contextmanager
def running_orthanc(tmp_path: Path, peer_ae: str, peer_port: int) -> Iterator[OrthancPeer]:
    """Orthanc with a throw-away configuration whose only modality is pacsbridge; stopped afterwards."""
    http_port, dicom_port = free_port(), free_port()
    storage = tmp_path / "orthanc-storage"
    storage.mkdir()
    config = {
        "Name": "pacsbridge-test-orthanc",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # Orthanc then binds HTTP to loopback only
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomModalities": {MODALITY: [peer_ae, "127.0.0.1", peer_port]},
        "DicomScuTimeout": 30,
        "DicomAssociationCloseDelay": 0,  # release right after each job (the default keeps it 5 s)
        "SaveJobs": False,
        "StorageCompression": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
    }
    cfg = tmp_path / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    log_path = tmp_path / "orthanc.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path)
    peer = OrthancPeer(http_port, dicom_port, proc, log_path)
    try:
        def answering() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {proc.returncode}:\n{peer.log()}")
            with contextlib.suppress(OSError):
                return peer.request("GET", "/system", timeout=2)[0] == 200
            return False

        wait_until(answering, 60, lambda: f"Orthanc's HTTP to answer:\n{peer.log()}", interval=0.1)
        yield peer
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _assert_same_dataset(sent_path: Path, stored_path: Path) -> None:
    """Every element (pixels included) identical; group lengths and trailing padding may differ."""
    sent, stored = dcmread(sent_path), dcmread(stored_path)
    assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert stored.PixelData == sent.PixelData
    tags = [e.tag for e in sent if e.tag != 0xFFFCFFFC and e.tag.element != 0x0000]
    assert tags == [e.tag for e in stored if e.tag != 0xFFFCFFFC and e.tag.element != 0x0000]
    for tag in tags:
        assert stored[tag].value == sent[tag].value, f"{sent[tag].keyword or tag} differs"


def test_orthanc_echoes_and_stores_real_radiographs(tmp_path):
    with running_receiver(tmp_path, allowed=("ORTHANC",)) as receiver, \
            running_orthanc(tmp_path, "PACSBRIDGE", receiver.port) as orthanc:
        status, answer = orthanc.request("POST", f"/modalities/{MODALITY}/echo", {})
        assert status == 200, (answer, orthanc.log())

        sources = [data_file(name) for name in RADIOGRAPHS]
        ids = [orthanc.upload(p) for p in sources]
        status, answer = orthanc.request("POST", f"/modalities/{MODALITY}/store",
                                         {"Resources": ids, "Synchronous": True})
        assert status == 200, (answer, orthanc.log())
        assert answer.get("InstancesCount") == len(ids) and answer.get("FailedInstancesCount") == 0, answer

        with receiver.sessions() as s:
            for src in sources:
                sent = dcmread(src, stop_before_pixels=True)
                row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sent.SOPInstanceUID)).one()
                assert row.calling_ae == "ORTHANC"
                assert row.state == "received"
                assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID  # not transcoded
                path = receiver.spool.path(row.file_path)
                assert path.stat().st_size == row.file_size
                _assert_same_dataset(src, path)
            assert s.scalars(select(Event).where(Event.kind.in_(["store_failed", "store_rejected"]))).all() == []


def test_orthanc_not_in_allow_list_is_rejected_and_recorded(tmp_path):
    with running_receiver(tmp_path, allowed=("PACS_MAIN",)) as receiver, \
            running_orthanc(tmp_path, "PACSBRIDGE", receiver.port) as orthanc:
        status, answer = orthanc.request("POST", f"/modalities/{MODALITY}/echo", {})
        assert status >= 400, f"Orthanc's C-ECHO succeeded through a rejected association: {answer}"
        instance_id = orthanc.upload(data_file("RG1_UNCR.dcm"))
        status, answer = orthanc.request("POST", f"/modalities/{MODALITY}/store",
                                         {"Resources": [instance_id], "Synchronous": True})
        assert status >= 400, f"Orthanc reported success for a rejected association: {answer}"
        assert "Association Rejected" in answer.get("Details", ""), answer

        # The event is written by the association's thread, possibly just after Orthanc gave up.
        def rejections() -> list[Event]:
            with receiver.sessions() as s:
                return list(s.scalars(select(Event).where(Event.kind == "association_rejected")))

        wait_until(lambda: len(rejections()) >= 2, 10, lambda: f"two rejections recorded, got {rejections()}")
        events = rejections()
        with receiver.sessions() as s:
            stored = s.scalars(select(Instance)).all()
        assert stored == []
        assert len(events) == 2, [(e.kind, e.detail) for e in events]  # the echo and the store
        for e in events:
            assert e.peer.startswith("ORTHANC@127.0.0.1:")
            assert "allowed_calling_aes" in e.detail
