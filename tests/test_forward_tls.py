"""Forwarding over DICOM TLS: a destination with ``tls = true`` sends to a mutual-TLS listener (pacsbridge's own
receiver with a throw-away PKI made by `openssl`); a client certificate the peer does not trust, or a peer
certificate we do not trust, never delivers; bad TLS settings stop start-up naming the field."""

from __future__ import annotations

import shutil

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from dicom_support import running_receiver
from forward_support import add_result, migrated_sessions
from hostile_support import make_pki
from pacsbridge.config import Destination
from pacsbridge.dicom.tls import make_server_context
from pacsbridge.forward.forwarder import Forwarder
from pacsbridge.forward.senders import ForwardContext
from pacsbridge.store.models import Instance, OutboxEntry
from pipeline_support import reuid, sample_file

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="OPENSSL COMMAND MISSING: TLS tests SKIPPED")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _forward_once(tmp_path, pki, defaults=None, **tls):  # noqa: ANN001, ANN003, ANN202
    """Send one original image to a mutual-TLS receiver; returns (outbox entry, instances the peer stored)."""
    server_ctx = make_server_context(str(pki.server_cert), str(pki.server_key), ca=str(pki.ca), verify_client=True)
    src = reuid(sample_file("RG1_UNCR.dcm"), tmp_path / "in" / "a.dcm")
    with running_receiver(tmp_path / "peer", allowed=("PACSBRIDGE",), tls_context=server_ctx, tls_port=0,
                          tls_only=True) as peer:
        sessions = migrated_sessions(tmp_path)
        dest = Destination(name="tls-pacs", kind="dicom", host="localhost", port=peer.scp.tls_port,
                           ae_title="PACSBRIDGE", objects=["images"], timeout_s=10, tls=True, **tls)
        spool = tmp_path / "spool"
        add_result(sessions, spool, src, [dest])
        fwd = Forwarder(sessions, [dest], ForwardContext("PACSBRIDGE", spool, **(defaults or {})))
        fwd.run_once()
        fwd.stop()
        with sessions() as s:
            entry = s.scalars(select(OutboxEntry)).one()
        with peer.sessions() as s:
            stored = s.scalars(select(Instance.sop_instance_uid)).all()
    return entry, stored


def test_forward_over_mutual_tls(tmp_path, pki):
    entry, stored = _forward_once(tmp_path, pki, tls_ca_file=pki.ca, tls_cert_file=pki.client_cert,
                                  tls_key_file=pki.client_key)
    assert entry.state == "sent", entry.last_error
    assert len(stored) == 1


def test_forward_over_mutual_tls_with_the_global_dicom_tls_settings(tmp_path, pki):
    # No files on the destination: dicom_tls_ca / dicom_tls_client_cert / _key (the daemon passes them).
    entry, stored = _forward_once(tmp_path, pki, defaults={
        "tls_ca": str(pki.ca), "tls_client_cert": str(pki.client_cert), "tls_client_key": str(pki.client_key)})
    assert entry.state == "sent", entry.last_error
    assert len(stored) == 1


@pytest.mark.parametrize("who", ["no client certificate", "untrusted client certificate", "untrusted server"])
def test_forward_without_mutual_trust_is_not_delivered(tmp_path, pki, who):
    tls = {"tls_ca_file": pki.ca, "tls_cert_file": pki.client_cert, "tls_key_file": pki.client_key}
    if who == "no client certificate":
        del tls["tls_cert_file"], tls["tls_key_file"]
    elif who == "untrusted client certificate":
        tls.update(tls_cert_file=pki.rogue_cert, tls_key_file=pki.rogue_key)
    else:  # we only trust the rogue CA, which did not sign the peer's certificate
        tls["tls_ca_file"] = pki.rogue_ca
    entry, stored = _forward_once(tmp_path, pki, **tls)
    assert entry.state != "sent" and entry.last_error and entry.sent_at is None
    assert stored == []


def test_tls_settings_are_checked(tmp_path, pki):
    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file go together"):
        Destination(name="x", kind="dicom", host="h", port=1, ae_title="X", tls=True, tls_cert_file=pki.client_cert)
    with pytest.raises(ValidationError, match="tls_ca_file: no such file"):
        Destination(name="x", kind="dicom", host="h", port=1, ae_title="X", tls=True, tls_ca_file=tmp_path / "none.pem")
    with pytest.raises(ValidationError, match="only DICOM destinations"):
        Destination(name="x", kind="hl7", host="h", port=1, tls=True)
