"""Helpers for the foundation tests (receiver, database, daemon, CLI).

Imported as a plain module (``from dicom_support import ...``); pytest puts ``tests/`` on sys.path.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UID, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage, Verification,
)
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.dicom.storage_scp import ACCEPTED_TRANSFER_SYNTAXES, StorageSCP
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.spool import Spool

REPO = Path(__file__).resolve().parents[1]
PG_BASE_URL = os.environ.get("PACSBRIDGE_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
MODALITY_OF = {
    ComputedRadiographyImageStorage: "CR",
    DigitalXRayImageStorageForPresentation: "DX",
    DigitalXRayImageStorageForProcessing: "DX",
    SecondaryCaptureImageStorage: "OT",
}


def data_file(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- PostgreSQL ----------------------------------------------------------------------------------
def postgres_unavailable_reason() -> str | None:
    """None when the test PostgreSQL answers, else a loud reason to skip."""
    try:
        engine = create_engine(PG_BASE_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001
        reason = f"POSTGRESQL NOT AVAILABLE at {PG_BASE_URL} ({type(exc).__name__}); PostgreSQL tests SKIPPED"
        warnings.warn(reason, stacklevel=2)
        return reason


@contextlib.contextmanager
def postgres_schema_url(base_url: str = PG_BASE_URL) -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped afterwards (so reruns start clean)."""
    schema = f"pbtest_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base_url else "?"
    try:
        yield f"{base_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def database_url_for(backend: str, sqlite_path: Path) -> Iterator[str]:
    """Generator behind the ``database_url`` fixtures: a SQLite file URL, or a fresh PostgreSQL
    schema (skipped loudly when the server is absent)."""
    import pytest

    if backend == "sqlite":
        yield f"sqlite:///{sqlite_path}"
        return
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with postgres_schema_url() as url:
        yield url



def migrated_sessions(url: str) -> Iterator[sessionmaker[Session]]:
    """Generator behind the ``sessions`` fixtures: the database at ``url`` migrated to head; the
    engine is disposed afterwards."""
    engine = make_engine(url)
    try:
        migrations.upgrade(engine)
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def migrated_sessions_for(backend: str, sqlite_path: Path) -> Iterator[sessionmaker[Session]]:
    """:func:`migrated_sessions` of :func:`database_url_for` (a SQLite file or a fresh PostgreSQL schema)."""
    for url in database_url_for(backend, sqlite_path):
        yield from migrated_sessions(url)

# -- synthetic images ----------------------------------------------------------------------------
def make_image(
    sop_class: str = ComputedRadiographyImageStorage, *, rows: int = 64, cols: int = 48,
    transfer_syntax: str = ExplicitVRLittleEndian, study_uid: str | None = None, series_uid: str | None = None,
    with_pixels: bool = True, seed: int | None = None,
) -> Dataset:
    """A small valid image of ``sop_class`` with fresh UIDs and random 12-bit pixels."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = MODALITY_OF.get(sop_class, "OT")
    ds.BodyPartExamined = "CHEST"
    ds.PatientID = "TEST-PATIENT-0001"
    ds.PatientName = "Test^Patient"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDate = "20240102"
    ds.RequestedProcedurePriority = "STAT"
    ds.InstanceNumber = 1
    if sop_class == DigitalXRayImageStorageForPresentation or sop_class == DigitalXRayImageStorageForProcessing:
        ds.PresentationIntentType = (
            "FOR PRESENTATION" if sop_class == DigitalXRayImageStorageForPresentation else "FOR PROCESSING"
        )
    if sop_class == SecondaryCaptureImageStorage:
        ds.ConversionType = "WSD"
    if with_pixels:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    return ds


# -- a receiver in this process ------------------------------------------------------------------
@dataclass
class Receiver:
    scp: StorageSCP
    engine: Engine
    sessions: sessionmaker[Session]
    spool: Spool

    @property
    def port(self) -> int:
        return self.scp.port


@contextlib.contextmanager
def running_receiver(
    tmp_path: Path, *, database_url: str | None = None, allowed: tuple[str, ...] = (),
    max_pdu: int = 4_194_304, fsync: bool = True, spool_root: Path | None = None, notifier=None,  # noqa: ANN001
    **scp_kwargs,  # noqa: ANN003 - more StorageSCP arguments (limits, TLS)
) -> Iterator[Receiver]:
    """A migrated database, a spool and a StorageSCP on a free loopback port; stopped afterwards."""
    url = database_url or f"sqlite:///{tmp_path / 'pacsbridge.db'}"
    engine = make_engine(url)
    migrations.upgrade(engine)
    sessions = make_sessionmaker(engine)
    spool = Spool(spool_root or tmp_path / "spool", fsync=fsync)
    spool.prepare()
    scp = StorageSCP(
        ae_title="PACSBRIDGE", bind_address="127.0.0.1", port=0, spool=spool, sessions=sessions,
        allowed_calling_aes=allowed, max_pdu=max_pdu, **{"dimse_timeout": 30, "network_timeout": 30,
                                                          "stop_timeout": 10, **scp_kwargs},
        notifier=notifier,
    )
    scp.start()
    try:
        yield Receiver(scp=scp, engine=engine, sessions=sessions, spool=spool)
    finally:
        scp.stop()
        engine.dispose()


# -- sending ---------------------------------------------------------------------------------------
def scu_ae(transfer_syntaxes: list[str] | None = None, sop_classes: list[str] | None = None) -> AE:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in sop_classes or list(MODALITY_OF):
        for ts in transfer_syntaxes or [str(t) for t in ACCEPTED_TRANSFER_SYNTAXES[:2]]:
            ae.add_requested_context(sop_class, ts)  # one context per syntax: the SCP cannot pick another
    ae.add_requested_context(Verification)
    return ae


def send_datasets(port: int, datasets: list, *, calling_ae: str = "TESTSCU", ae: AE | None = None) -> list[int]:
    """C-STORE each dataset (or file path) over one association; returns the statuses (-1: no status)."""
    ae = ae or scu_ae(sorted({str(d.file_meta.TransferSyntaxUID) for d in datasets if isinstance(d, Dataset)})
                      or None)
    ae.ae_title = calling_ae
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSBRIDGE")
    assert assoc.is_established, "association was not established"
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


def run_dcmtk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited early with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def pacsbridge_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pacsbridge", *args]


def daemon_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env.update(
        PACSBRIDGE_DATA_DIR=str(data_dir), PACSBRIDGE_DICOM_PORT=str(port), PACSBRIDGE_HTTP_PORT="0",
        PACSBRIDGE_DICOM_HOST="127.0.0.1", PACSBRIDGE_WORKER_ENABLED="false",
    )
    env.update(extra)
    return env


class TcpProxy:
    """A loopback TCP forwarder that can be cut (``stop``) and restored (``start``) on the same port,
    to simulate the database going away and coming back."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def stop(self) -> None:
        lst, self._listener = self._listener, None
        if lst is not None:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)
            lst.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
