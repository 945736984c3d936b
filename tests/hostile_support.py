"""Helpers for the hostile-input tests: raw PDUs on a socket, `pacsbridge serve` as a subprocess with
its resident memory read from /proc, and a throw-away PKI made with the ``openssl`` command."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_RQ, A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from dicom_support import daemon_env, free_port, pacsbridge_cmd, scu_ae, wait_for_port

CR_CONTEXT_ID = 1
ECHO_CONTEXT_ID = 3
RELEASE_RQ = A_RELEASE_RQ().encode()
PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF", 5: "A-RELEASE-RQ",
             6: "A-RELEASE-RP", 7: "A-ABORT"}


# -- building PDUs -------------------------------------------------------------------------------
def assoc_rq(calling: str = "FUZZ", called: str = "PACSBRIDGE", max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ proposing CR storage (explicit VR LE, context 1) and Verification (context 3)."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title, prim.called_ae_title = calling, called
    cr = build_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])
    cr.context_id = CR_CONTEXT_ID
    echo = build_context(Verification, [ImplicitVRLittleEndian])
    echo.context_id = ECHO_CONTEXT_ID
    prim.presentation_context_definition_list = [cr, echo]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.826.0.1.3680043.8.498.1"
    prim.user_information = [ml, ic]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu.encode()


def encode_dataset(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def c_store_pdus(raw: bytes, sop_class: str, sop_instance: str, *, message_id: int = 1, max_pdu: int = 16384,
                 context_id: int = CR_CONTEXT_ID) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE-RQ carrying the encoded data set ``raw`` (any bytes)."""
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    req.DataSet = BytesIO(raw)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return [_pdata(p) for p in msg.encode_msg(context_id, max_pdu)]


def c_echo_pdus(message_id: int = 1) -> list[bytes]:
    req = C_ECHO()
    req.MessageID = message_id
    req.AffectedSOPClassUID = Verification
    msg = C_ECHO_RQ()
    msg.primitive_to_message(req)
    return [_pdata(p) for p in msg.encode_msg(ECHO_CONTEXT_ID, 16384)]


def _pdata(primitive) -> bytes:  # noqa: ANN001
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return pdu.encode()


# -- reading what the server answers ------------------------------------------------------------
def _read_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_one_pdu(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """The next whole PDU (header included), or what arrived before the peer closed / the timeout."""
    deadline = time.monotonic() + timeout
    try:
        header = _read_exact(sock, 6, deadline)
        if len(header) < 6:
            return header
        return header + _read_exact(sock, struct.unpack(">L", header[2:6])[0], deadline)
    except (TimeoutError, socket.timeout, OSError):
        return b""


def split_pdus(data: bytes) -> list[tuple[int, bytes]]:
    pdus, i = [], 0
    while i + 6 <= len(data):
        pdu_type, _, length = struct.unpack(">BBL", data[i:i + 6])
        pdus.append((pdu_type, bytes(data[i + 6:i + 6 + length])))
        i += 6 + length
    return pdus


def read_pdus(sock: socket.socket, timeout: float = 5.0) -> tuple[list[tuple[int, bytes]], bool]:
    """Every PDU the peer sends until it closes (or ``timeout``): ([(type, body)], closed_by_peer)."""
    data, closed = _read_all(sock, timeout)
    return split_pdus(data), closed


def _read_all(sock: socket.socket, timeout: float, stop_at_end: bool = False) -> tuple[bytes, bool]:
    """Read until the peer closes or ``timeout``; with ``stop_at_end`` also once a PDU that ends the
    exchange (A-ASSOCIATE-RJ, A-RELEASE-RP, A-ABORT) has arrived whole."""
    data = bytearray()
    closed = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
            if stop_at_end and _ends(data):
                break
    except (TimeoutError, socket.timeout):
        pass
    except OSError:  # reset by the peer
        closed = True
    return bytes(data), closed


def _ends(data: bytes) -> bool:
    i = 0
    while i + 6 <= len(data):
        pdu_type, _, length = struct.unpack(">BBL", data[i:i + 6])
        if i + 6 + length > len(data):
            return False
        if pdu_type in (3, 6, 7):
            return True
        i += 6 + length
    return False


def dimse_statuses(pdus: list[tuple[int, bytes]]) -> list[int]:
    """Status of every DIMSE response in the P-DATA-TF PDUs (command fragments only)."""
    statuses, command = [], bytearray()
    for pdu_type, body in pdus:
        if pdu_type != 4:
            continue
        i = 0
        while i + 6 <= len(body):
            length = struct.unpack(">L", body[i:i + 4])[0]
            header, value = body[i + 5], body[i + 6:i + 4 + length]
            if header & 1:
                command += value
                if header & 2:
                    ds = decode(BytesIO(bytes(command)), True, True)
                    statuses.append(int(ds.Status))
                    command = bytearray()
            i += 4 + length
    return statuses


def exchange(port: int, stream: list[bytes] | bytes, *, timeout: float = 5.0, host: str = "127.0.0.1",
             half_close: bool = True) -> tuple[list[tuple[int, bytes]], bool, int]:
    """Send ``stream`` on a new connection, then read the answers: (pdus, closed_by_peer, our port).

    A list is sent as a requestor would: its first item (the A-ASSOCIATE-RQ), then -- once the answer to
    it has arrived -- the rest (sending P-DATA before the A-ASSOCIATE-AC is itself a protocol error).
    """
    items = [stream] if isinstance(stream, (bytes, bytearray)) else list(stream)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        local_port = sock.getsockname()[1]
        first = b""
        try:
            sock.sendall(items[0])
            if len(items) > 1:
                first = read_one_pdu(sock, timeout)
                if first[:1] == b"\x02":  # accepted: go on
                    sock.sendall(b"".join(items[1:]))
        except OSError:
            pass  # the server may close first (that is an answer too)
        rest, closed = _read_all(sock, timeout, stop_at_end=True)
        if not closed and half_close and not _ends(first + rest):
            # No end in sight (e.g. a stream without A-RELEASE-RQ): close our side and see what the server says.
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            more, closed = _read_all(sock, timeout)
            rest += more
        elif _ends(first + rest):
            closed = closed or _closed_soon(sock)
    return split_pdus(first + rest), closed, local_port


def _closed_soon(sock: socket.socket, timeout: float = 2.0) -> bool:
    """After an A-ABORT/A-ASSOCIATE-RJ the server closes the connection."""
    data, closed = _read_all(sock, timeout)
    return closed


def echo_ok(port: int, **kwargs) -> bool:  # noqa: ANN003
    ae = scu_ae()
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSBRIDGE", **kwargs)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return "Status" in status and status.Status == 0
    finally:
        assoc.release()


# -- pacsbridge serve as a subprocess ----------------------------------------------------------
def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Serve:
    proc: subprocess.Popen
    port: int
    data_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_serve(tmp_path: Path, **env_extra: str) -> Iterator[Serve]:
    """``pacsbridge serve`` (no worker, no HTTP) on a free port; SIGTERM'd afterwards."""
    port = free_port()
    data = tmp_path / "data"
    env = daemon_env(data, port, **env_extra)
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(pacsbridge_cmd("serve"), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(int(env_extra.get("PACSBRIDGE_DICOM_TLS_PORT", port)) if env_extra.get(
            "PACSBRIDGE_DICOM_TLS_ONLY") == "true" else port, 90, proc)
        yield Serve(proc, port, data, log_path)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- a throw-away PKI -----------------------------------------------------------------------------
@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {res.stderr}")


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)


def _leaf(folder: Path, name: str, ca: str, ext: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    (folder / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)


def make_pki(folder: Path) -> Pki:
    """A CA with a server certificate (localhost, 127.0.0.1) and a client certificate, and a second,
    untrusted ("rogue") CA with its own client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    _ca(folder, "ca")
    _ca(folder, "rogue-ca")
    _leaf(folder, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _leaf(folder, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(folder, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    f = folder
    return Pki(f / "ca.pem", f / "server.pem", f / "server.key", f / "client.pem", f / "client.key",
               f / "rogue-ca.pem", f / "rogue.pem", f / "rogue.key")


def env_for_tls(pki: Pki, tls_port: int, **extra: str) -> dict[str, str]:
    env = {"PACSBRIDGE_DICOM_TLS_PORT": str(tls_port), "PACSBRIDGE_DICOM_TLS_CERT": str(pki.server_cert),
           "PACSBRIDGE_DICOM_TLS_KEY": str(pki.server_key), "PACSBRIDGE_DICOM_TLS_CA": str(pki.ca)}
    env.update(extra)
    return env


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
