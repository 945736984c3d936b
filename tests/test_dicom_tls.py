"""DICOM over TLS: a throw-away PKI made with `openssl`, pynetdicom and DCMTK storescu as TLS clients,
mutual TLS, refusals of untrusted or certificate-less clients, minimum version, a silent TLS client."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time

import pytest
from sqlalchemy import select

from dicom_support import data_file, make_image, run_dcmtk, running_receiver, scu_ae
from hostile_support import env_for_tls, make_pki, running_serve
from waiting import wait_until
from pacsbridge.config import ConfigError, load_settings
from pacsbridge.dicom.tls import make_client_context, make_server_context
from pacsbridge.store.models import Event, Instance

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="OPENSSL COMMAND MISSING: TLS tests SKIPPED")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_receiver(tmp_path, pki, *, verify_client: bool = True, min_version: str = "1.2", **kw):  # noqa: ANN001,ANN003
    ctx = make_server_context(str(pki.server_cert), str(pki.server_key), ca=str(pki.ca), verify_client=verify_client,
                              min_version=min_version)
    return running_receiver(tmp_path, tls_context=ctx, tls_port=0, **kw)


def associate_tls(port: int, ctx: ssl.SSLContext, hostname: str = "localhost"):  # noqa: ANN201
    ae = scu_ae()
    return ae.associate("127.0.0.1", port, ae_title="PACSBRIDGE", tls_args=(ctx, hostname))


def rejected_events(r) -> list[Event]:  # noqa: ANN001
    with r.sessions() as s:
        return list(s.scalars(select(Event).where(Event.kind == "association_rejected")))


def test_mutual_tls_store_with_settings_client_context(tmp_path, pki):
    settings = load_settings(data_dir=tmp_path / "cfg", dicom_tls_ca=str(pki.ca), dicom_tls_client_cert=str(pki.client_cert),
                             dicom_tls_client_key=str(pki.client_key))
    with tls_receiver(tmp_path, pki) as r:
        assoc = associate_tls(r.scp.tls_port, make_client_context(
            ca=settings.dicom_tls_ca, cert=settings.dicom_tls_client_cert, key=settings.dicom_tls_client_key))
        assert assoc.is_established
        assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
        ds = make_image()
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        with r.sessions() as s:
            assert s.scalars(select(Instance.sop_instance_uid)).all() == [ds.SOPInstanceUID]


@pytest.mark.parametrize("who", ["no certificate", "untrusted CA", "plain TCP"])
def test_clients_without_a_trusted_certificate_are_refused(tmp_path, pki, who):
    with tls_receiver(tmp_path, pki) as r:
        if who == "plain TCP":
            assoc = scu_ae().associate("127.0.0.1", r.scp.tls_port, ae_title="PACSBRIDGE")
        else:
            cert = pki.rogue_cert if who == "untrusted CA" else ""
            key = pki.rogue_key if who == "untrusted CA" else ""
            assoc = associate_tls(r.scp.tls_port, make_client_context(ca=str(pki.ca), cert=str(cert) if cert else "",
                                                                      key=str(key) if key else ""))
            if assoc.is_established:  # TLS 1.3: the client learns of the refusal on its first read
                status = assoc.send_c_echo()
                assert "Status" not in status
        assert not assoc.is_established or assoc.is_aborted
        ev = wait_until(lambda: rejected_events(r), 5, "the refused handshake recorded")
        assert ev and "TLS handshake failed" in ev[0].detail and ev[0].peer.startswith("127.0.0.1:")
        with r.sessions() as s:
            assert s.scalars(select(Instance)).all() == []


def test_client_refuses_a_server_it_does_not_trust(tmp_path, pki):
    with tls_receiver(tmp_path, pki, verify_client=False) as r:
        assoc = associate_tls(r.scp.tls_port, make_client_context(ca=str(pki.rogue_ca)))
        assert not assoc.is_established
        assoc = associate_tls(r.scp.tls_port, make_client_context(ca=str(pki.ca)), hostname="not-this-host")
        assert not assoc.is_established
        ok = associate_tls(r.scp.tls_port, make_client_context(ca=str(pki.ca)))  # no client cert needed here
        assert ok.is_established
        ok.release()


def test_minimum_tls_version(tmp_path, pki):
    with tls_receiver(tmp_path, pki, min_version="1.3") as r:
        old = make_client_context(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        assert not associate_tls(r.scp.tls_port, old).is_established
        new = make_client_context(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))
        assoc = associate_tls(r.scp.tls_port, new)
        assert assoc.is_established and assoc.dul.socket.socket.version() == "TLSv1.3"
        assoc.release()


def test_a_silent_tls_client_does_not_stall_the_listener(tmp_path, pki):
    with tls_receiver(tmp_path, pki) as r:
        # No ClientHello from these: they are ahead of the real client in the listener's accept queue.
        silent = [socket.create_connection(("127.0.0.1", r.scp.tls_port)) for _ in range(3)]
        start = time.monotonic()
        ctx = make_client_context(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))
        assoc = associate_tls(r.scp.tls_port, ctx)
        assert assoc.is_established and time.monotonic() - start < 5
        assoc.release()
        for s in silent:
            s.close()


needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK NOT INSTALLED: storescu missing")


@needs_dcmtk
def test_dcmtk_storescu_over_mutual_tls(tmp_path, pki):
    rg1 = str(data_file("RG1_UNCR.dcm"))
    with tls_receiver(tmp_path, pki) as r:
        port = str(r.scp.tls_port)
        res = run_dcmtk("storescu", "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca),
                        "-aet", "DCMTKTLS", "-aec", "PACSBRIDGE", "127.0.0.1", port, rg1)
        assert res.returncode == 0, res.stderr
        # Anonymous TLS (no client certificate) is refused by mutual TLS.
        res = run_dcmtk("storescu", "+tla", "+cf", str(pki.ca), "-aet", "DCMTKANON", "-aec", "PACSBRIDGE",
                        "127.0.0.1", port, str(data_file("RG1_UNCR.dcm")))
        assert res.returncode != 0
        with r.sessions() as s:
            assert len(s.scalars(select(Instance)).all()) == 1


def test_serve_tls_only_from_environment(tmp_path, pki):
    from dicom_support import free_port

    tls_port = free_port()
    env = env_for_tls(pki, tls_port, PACSBRIDGE_DICOM_TLS_ONLY="true", PACSBRIDGE_DICOM_TLS_VERIFY_CLIENT="true")
    with running_serve(tmp_path, **env) as d:
        ctx = make_client_context(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))
        assoc = associate_tls(tls_port, ctx)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", d.port), timeout=2).close()  # no plain listener
        assert "(TLS)" in d.log()


def test_tls_settings_are_validated(tmp_path, pki):
    with pytest.raises(ConfigError, match="dicom_tls_cert"):
        load_settings(dicom_tls_port=2762)
    with pytest.raises(ConfigError, match="dicom_tls_ca"):
        load_settings(dicom_tls_port=2762, dicom_tls_cert=str(pki.server_cert), dicom_tls_key=str(pki.server_key),
                      dicom_tls_verify_client=True)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(dicom_tls_cert=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="tls_min_version"):
        load_settings(tls_min_version="1.0")
    # A key that does not belong to the certificate: one clear line, exit status 2, no traceback.
    from dicom_support import daemon_env, free_port, pacsbridge_cmd

    env = daemon_env(tmp_path / "data", free_port(), **env_for_tls(
        pki, free_port(), PACSBRIDGE_DICOM_TLS_KEY=str(pki.client_key)))
    res = subprocess.run(pacsbridge_cmd("serve"), env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "dicom_tls_cert/dicom_tls_key" in res.stderr
