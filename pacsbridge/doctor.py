"""``pacsbridge doctor``: is this installation healthy?  One :class:`~pacsbridge.health.Check` per line.

Checks, in order: configuration, database reachable, schema at head, spool (folder, writable, free space
above ``min_free_bytes``), the cluster (spool marker against the database's cluster id, scheduler leader,
live workers: :mod:`pacsbridge.doctor_cluster`), model file against its card's SHA-256, site calibration,
each listening port (free, or held by a running pacsbridge), each forwarding destination (C-ECHO for
DICOM, an MLLP connect for HL7) and the expiry of every configured TLS certificate.  It changes nothing: no migration, no file
created (an absent SQLite database is reported, not made).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import socket
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pacsbridge.config import Destination, Settings
from pacsbridge.health import Check, check_database, check_migrations, check_spool

#: A certificate expiring within this is a warning (renew it); an expired one fails.
CERT_WARN_DAYS = 30
CONNECT_TIMEOUT_S = 5.0


def run_checks(settings: Settings, config_source: str) -> list[Check]:
    checks = [check_config(settings, config_source)]
    db = _database_checks(settings)
    checks += db
    checks.append(_spool(settings))
    from pacsbridge.doctor_cluster import cluster_checks  # spool marker, scheduler leader, live workers

    checks += cluster_checks(settings, all(c.ok for c in db))
    checks.append(check_model(settings))
    checks.append(check_site_calibration(settings))
    checks += list(check_ports(settings))
    checks += [check_destination(d, settings) for d in settings.destinations]
    checks += list(check_certificates(settings))
    return checks


def check_config(settings: Settings, source: str) -> Check:
    notes = []
    if not settings.allowed_calling_aes:
        notes.append("allowed_calling_aes is empty (any calling AE title is accepted)")
    if not settings.fsync:
        notes.append("fsync = false (acknowledged images can be lost on power failure)")
    if notes:
        return Check("config", True, f"{source}; " + "; ".join(notes), warn=True)
    return Check("config", True, source)


def _database_checks(settings: Settings) -> list[Check]:
    from sqlalchemy.engine import make_url

    from pacsbridge.store.db import make_engine

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not Path(url.database).is_file():
            return [Check("database", False, f"SQLite file {url.database} does not exist: start `pacsbridge "
                          "serve` or run `pacsbridge db upgrade` (or fix data_dir / database_url)"),
                    Check("migrations", False, "no database")]
    try:
        engine = make_engine(settings.database_url)
    except Exception as exc:  # noqa: BLE001
        return [Check("database", False, f"cannot open {url.render_as_string(hide_password=True)}: {exc}"),
                Check("migrations", False, "no database")]
    try:
        db = check_database(engine)
        return [db, check_migrations(engine) if db.ok else Check("migrations", False, "no database")]
    finally:
        engine.dispose()


def _spool(settings: Settings) -> Check:
    spool = Path(settings.spool_dir)
    if not spool.exists():
        return Check("spool", True, f"{spool} does not exist yet (`pacsbridge serve` creates it)", warn=True)
    return check_spool(spool, settings.min_free_bytes)


def check_model(settings: Settings) -> Check:
    from pacsbridge.model.artifact import card_path, sha256_file

    path = Path(settings.model_path)

    def bad(detail: str) -> Check:  # a failure where serve scores images, else a warning
        if settings.worker_enabled:
            return Check("model", False, detail)
        return Check("model", True, f"{detail} (worker_enabled = false)", warn=True)

    if not path.is_file():
        return bad(f"{path} does not exist")
    card = card_path(path)
    if not card.is_file():
        return bad(f"model card {card} not found next to {path.name}")
    try:
        expected = json.loads(card.read_text()).get("weights_sha256")
    except (OSError, ValueError) as exc:
        return bad(f"model card {card} is not valid JSON: {exc}")
    digest = sha256_file(path)
    if expected != digest:
        return bad(f"{path.name}: SHA-256 {digest[:12]}... does not match the card's weights_sha256 "
                   f"({str(expected)[:12]}...)")
    return Check("model", True, f"{path.name} matches its card (sha256 {digest[:12]}...)")


def check_site_calibration(settings: Settings) -> Check:
    """The configured site calibration file reads, and was made for the configured model's weights."""
    from pacsbridge.model.artifact import sha256_file
    from pacsbridge.validation.calibration import CalibrationError, read_calibration

    path = settings.site_calibration
    if path is None:
        return Check("site calibration", True, "not configured (the model card's threshold decides)")
    try:
        data, cal_id = read_calibration(Path(path))
    except CalibrationError as exc:
        return Check("site calibration", False, str(exc))
    try:
        weights = sha256_file(Path(settings.model_path))
    except OSError:
        return Check("site calibration", False, f"{path}: cannot compare with the model (model file unreadable)")
    if data["weights_sha256"] != weights:
        return Check("site calibration", False, f"{path} was made for other weights (sha256 "
                     f"{data['weights_sha256'][:12]}..., model {weights[:12]}...): validate again with this model")
    return Check("site calibration", True, f"{path} ({cal_id}, threshold {data['threshold']:.4g}) matches the model")


# -- ports -----------------------------------------------------------------------------------------
def check_ports(settings: Settings) -> Iterator[Check]:
    if not settings.dicom_tls_only:
        yield _port("dicom_port", settings.dicom_host, settings.dicom_port, lambda: _is_our_dicom(settings))
    if settings.dicom_tls_port:
        # Whoever holds the TLS port is ours when this installation's plain DICOM (or HTTP) port answers as ours.
        yield _port("dicom_tls_port", settings.dicom_host, settings.dicom_tls_port,
                    lambda: (not settings.dicom_tls_only and _is_our_dicom(settings))
                    or (bool(settings.http_port) and _is_our_http(settings)))
    if settings.http_port:
        yield _port("http_port", settings.http_host, settings.http_port, lambda: _is_our_http(settings))


def _port(name: str, host: str, port: int, ours) -> Check:  # noqa: ANN001 - () -> bool
    """Free (we could bind it), held by a running pacsbridge (``ours()``), or taken by something else."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
        try:
            sock.bind((host, port))
            return Check(name, True, f"{host}:{port} free")
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return Check(name, False, f"cannot bind {host}:{port}: {exc.strerror or exc}")
    pid = listener_pid(port)
    if pid is not None:
        cmdline = _cmdline(pid)
        if "pacsbridge" in cmdline and "serve" in cmdline:
            return Check(name, True, f"{host}:{port} held by a running pacsbridge (pid {pid})")
        return Check(name, False, f"{host}:{port} is taken by another process (pid {pid}: {cmdline[:80]})")
    try:  # the owner is not visible in /proc (another user, a container): ask the protocol
        mine = ours()
    except Exception:  # noqa: BLE001
        mine = False
    if mine:
        return Check(name, True, f"{host}:{port} held by a running pacsbridge")
    return Check(name, False, f"{host}:{port} is taken by another process")


def listener_pid(port: int) -> int | None:
    """The pid holding a listening TCP socket on ``port`` (Linux /proc), or None when it cannot be seen."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                try:
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
                except OSError:
                    continue
        except OSError:
            continue
    return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _is_our_dicom(settings: Settings) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="PB_DOCTOR")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = CONNECT_TIMEOUT_S
    ae.add_requested_context(Verification)
    assoc = ae.associate(_local(settings.dicom_host), settings.dicom_port, ae_title=settings.ae_title)
    try:
        if assoc.is_established:
            return str(assoc.acceptor.implementation_version_name or "").startswith("PACSBRIDGE")
        return False
    finally:
        if assoc.is_established:
            assoc.release()


def _is_our_http(settings: Settings) -> bool:
    import httpx

    scheme = "https" if settings.http_tls_cert else "http"
    # Only identifies who listens (our /readyz names its checks); certificate trust is not the question here.
    r = httpx.get(f"{scheme}://{_local(settings.http_host)}:{settings.http_port}/readyz", timeout=CONNECT_TIMEOUT_S,
                  verify=False)  # noqa: S501
    try:
        return isinstance(r.json().get("checks"), dict) or r.json().get("status") in {"ready", "not ready"}
    except ValueError:
        return False


# -- destinations ------------------------------------------------------------------------------------
def check_destination(dest: Destination, settings: Settings) -> Check:
    name = f"destination {dest.name}"
    timeout = min(dest.timeout_s, CONNECT_TIMEOUT_S * 2)
    if dest.kind == "hl7":
        try:
            with socket.create_connection((dest.host, dest.port), timeout=timeout):
                pass
        except OSError as exc:
            return Check(name, False, f"HL7 MLLP {dest.host}:{dest.port}: cannot connect: {exc.strerror or exc}")
        return Check(name, True, f"HL7 MLLP {dest.host}:{dest.port} accepts connections")
    return _echo(name, dest, settings, timeout)


def _echo(name: str, dest: Destination, settings: Settings, timeout: float) -> Check:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    where = f"DICOM {dest.ae_title}@{dest.host}:{dest.port}{' (TLS)' if dest.tls else ''}"
    tls_args = None
    if dest.tls:
        from pacsbridge.dicom.tls import make_client_context

        own = dest.tls_cert_file is not None
        try:
            ctx = make_client_context(
                ca=str(dest.tls_ca_file or settings.dicom_tls_ca),
                cert=str(dest.tls_cert_file) if own else settings.dicom_tls_client_cert,
                key=str(dest.tls_key_file) if own else settings.dicom_tls_client_key,
                min_version=settings.tls_min_version, check_hostname=dest.tls_check_hostname)
        except (OSError, ValueError) as exc:
            return Check(name, False, f"{where}: TLS configuration: {exc}")
        tls_args = (ctx, dest.host)
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title or "ANY-SCP", tls_args=tls_args)
    except Exception as exc:  # noqa: BLE001 - e.g. a name that does not resolve
        return Check(name, False, f"{where}: cannot connect: {type(exc).__name__}: {exc}")
    if assoc.is_rejected:
        return Check(name, False, f"{where}: association rejected (check its AE title and that it knows ours, "
                     f"{settings.ae_title})")
    if not assoc.is_established:
        return Check(name, False, f"{where}: no association (refused, timed out or aborted)")
    try:
        status = assoc.send_c_echo()
        code = int(status.Status) if status is not None and "Status" in status else None
    finally:
        assoc.release()
    if code != 0:
        return Check(name, False, f"{where}: C-ECHO answered {'nothing' if code is None else f'0x{code:04X}'}")
    return Check(name, True, f"{where}: C-ECHO ok")


# -- certificates ------------------------------------------------------------------------------------
CERT_KEYS = ("dicom_tls_cert", "dicom_tls_client_cert", "http_tls_cert", "dicom_tls_ca")


def check_certificates(settings: Settings, now: datetime | None = None) -> Iterator[Check]:
    now = now or datetime.now(timezone.utc)
    files: list[tuple[str, Path]] = [(k, Path(getattr(settings, k))) for k in CERT_KEYS if getattr(settings, k)]
    for d in settings.destinations:
        for attr in ("tls_ca_file", "tls_cert_file"):
            if getattr(d, attr):
                files.append((f"destinations.{d.name}.{attr}", Path(getattr(d, attr))))
    for key, path in files:
        name = f"certificate {key}"
        try:
            ends = pem_not_after(path.read_bytes())
        except (OSError, ValueError) as exc:
            yield Check(name, False, f"{path}: cannot read the certificate: {exc}")
            continue
        if not ends:
            yield Check(name, False, f"{path}: no certificate in it")
            continue
        first = min(ends)
        left = first - now
        when = first.strftime("%Y-%m-%d %H:%M UTC")
        if left <= timedelta(0):
            yield Check(name, False, f"{path}: expired on {when}")
        elif left < timedelta(days=CERT_WARN_DAYS):
            yield Check(name, True, f"{path}: expires on {when} (in {left.days} days): renew it", warn=True)
        else:
            yield Check(name, True, f"{path}: valid until {when}")


_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)


def pem_not_after(pem: bytes) -> list[datetime]:
    """The notAfter of each certificate in a PEM file (a chain or CA bundle: all of them)."""
    return [_der_not_after(base64.b64decode(b"".join(m.group(1).split()))) for m in _PEM_RE.finditer(pem)]


def _der_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the DER element at ``pos``."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _der_not_after(der: bytes) -> datetime:
    """Certificate -> tbsCertificate -> [version], serial, signature, issuer, validity -> notAfter."""
    _, cert, _ = _der_tlv(der, 0)
    _, pos, _ = _der_tlv(der, cert)  # tbsCertificate
    tag, _, end = _der_tlv(der, pos)
    if tag == 0xA0:  # explicit version
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, pos = _der_tlv(der, pos)
    tag, validity, _ = _der_tlv(der, pos)
    if tag != 0x30:
        raise ValueError("not an X.509 certificate")
    _, _, pos = _der_tlv(der, validity)  # notBefore
    tag, start, end = _der_tlv(der, pos)
    text = der[start:end].decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
        return datetime.strptime(text, "%y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)
    if tag == 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)
    raise ValueError("unknown time type in validity")
