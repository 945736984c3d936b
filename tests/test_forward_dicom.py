"""DICOM sending against a peer with a narrow set of SOP classes (pacsbridge's own Storage SCP, which
takes CR/DX/SC only): an SR it cannot take is dead with the reason, the original image is accepted
and arrives byte for byte, and a peer that is not listening is retried."""

from __future__ import annotations

from pydicom import dcmread
from sqlalchemy import select

from dicom_support import free_port, running_receiver
from forward_support import add_result, migrated_sessions
from pacsbridge.config import Destination
from pacsbridge.forward.forwarder import Forwarder
from pacsbridge.forward.senders import ForwardContext
from pacsbridge.store.models import Instance, OutboxEntry
from pipeline_support import reuid, sample_file


def _split(path):  # noqa: ANN001, ANN202
    """The dataset's bytes after the file meta (what is sent over the wire)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.read()


def test_unsupported_sr_is_dead_and_original_arrives_byte_for_byte(tmp_path):
    src = reuid(sample_file("RG1_J2KR.dcm"), tmp_path / "in" / "a.dcm")
    with running_receiver(tmp_path / "peer", allowed=("PACSBRIDGE",)) as peer:
        sessions = migrated_sessions(tmp_path)
        dest = Destination(name="narrow", kind="dicom", host="127.0.0.1", port=peer.port, ae_title="PACSBRIDGE",
                           objects=["sr", "images"], timeout_s=20)
        spool = tmp_path / "spool"
        add_result(sessions, spool, src, [dest])
        fwd = Forwarder(sessions, [dest], ForwardContext("PACSBRIDGE", spool))
        assert fwd.run_once() == {"permanent": 1, "sent": 1}
        fwd.stop()
        with sessions() as s:
            rows = {e.object: e for e in s.scalars(select(OutboxEntry))}
        assert rows["sr"].state == "dead" and rows["sr"].attempts == 1
        assert "1.2.840.10008.5.1.4.1.1.88.33" in rows["sr"].last_error  # the SOP class it would not take
        assert rows["images"].state == "sent"
        with peer.sessions() as s:
            got = s.scalars(select(Instance)).one()
        assert got.sop_instance_uid == dcmread(src).SOPInstanceUID
        assert got.transfer_syntax_uid == "1.2.840.10008.1.2.4.90"  # not transcoded
        assert _split(peer.spool.path(got.file_path)) == _split(src)  # the dataset, byte for byte


def test_nothing_listening_is_transient(tmp_path):
    sessions = migrated_sessions(tmp_path)
    dest = Destination(name="down", kind="dicom", host="127.0.0.1", port=free_port(), ae_title="X", timeout_s=5)
    add_result(sessions, tmp_path / "spool", sample_file("RG1_UNCR.dcm"), [dest])
    fwd = Forwarder(sessions, [dest], ForwardContext("PACSBRIDGE", tmp_path / "spool"))
    assert fwd.run_once() == {"transient": 1}
    fwd.stop()
    with sessions() as s:
        e = s.scalars(select(OutboxEntry)).one()
    assert e.state == "pending" and "cannot connect" in e.last_error
