"""Helpers for the forwarding tests: a restartable Orthanc, results in a database, SR reading.

Imported as a plain module (``from forward_support import ...``); pytest puts ``tests/`` on sys.path.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
from hl7.mllp import start_hl7_server
from pydicom import Dataset, dcmread
from sqlalchemy.orm import Session, sessionmaker

from dicom_support import free_port
from pacsbridge.config import Destination
from pacsbridge.forward.outbox import Outbox
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import InstanceState, Prediction
from pipeline_support import add_instance

ORTHANC = shutil.which("Orthanc")
ORTHANC_MISSING = "ORTHANC NOT INSTALLED (apt-get install orthanc): Orthanc forwarding tests SKIPPED"


class OrthancServer:
    """Orthanc on fixed free loopback ports with a throw-away storage; ``stop()``/``start()`` keep both."""

    def __init__(self, tmp_path: Path, **config: Any) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        self.storage = tmp_path / "orthanc-storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config = {
            "Name": "pacsbridge-forward-test", "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage), "Plugins": [], "HttpServerEnabled": True,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": True, "DicomAet": "ORTHANC", "DicomPort": self.dicom_port,
            "DicomScuTimeout": 30, "SaveJobs": False, "StorageCompression": False,
            "OrthancExplorerEnabled": False, "WebDavEnabled": False, "OverwriteInstances": False,
            **config,
        }
        self.cfg_path = tmp_path / "orthanc.json"
        self.cfg_path.write_text(json.dumps(self.config, indent=2))
        self.log_path = tmp_path / "orthanc.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60) -> None:
        with open(self.log_path, "a") as log_file:
            self.proc = subprocess.Popen([ORTHANC, str(self.cfg_path)], stdout=log_file,
                                         stderr=subprocess.STDOUT, cwd=self.cfg_path.parent)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                # HTTP answers before the DICOM listener is up: a forward sent in between is refused
                # at TCP level (a transient fault) instead of getting Orthanc's A-ASSOCIATE-RJ.
                if self.request("GET", "/system", timeout=2)[0] == 200:
                    socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2).close()
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc did not answer within {timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
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
            return status, raw

    def instances(self) -> list[dict]:
        """Every stored instance: {"id", "sop", "study", "series", "modality", "sop_class"}."""
        status, found = self.request("GET", "/instances?expand")
        assert status == 200, found
        series_cache: dict[str, dict] = {}
        study_cache: dict[str, str] = {}
        out = []
        for inst in found:
            sid = inst["ParentSeries"]
            if sid not in series_cache:
                series_cache[sid] = self.request("GET", f"/series/{sid}")[1]
            series = series_cache[sid]
            st = series["ParentStudy"]
            if st not in study_cache:
                study_cache[st] = self.request("GET", f"/studies/{st}")[1]["MainDicomTags"]["StudyInstanceUID"]
            out.append({"id": inst["ID"], "sop": inst["MainDicomTags"]["SOPInstanceUID"], "study": study_cache[st],
                        "series": series["MainDicomTags"].get("SeriesInstanceUID"),
                        "modality": series["MainDicomTags"].get("Modality")})
        return out

    def file(self, orthanc_id: str) -> bytes:
        req = urllib.request.Request(f"{self.url}/instances/{orthanc_id}/file")
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.read()

    def dataset(self, orthanc_id: str) -> Dataset:
        return dcmread(io.BytesIO(self.file(orthanc_id)))


@contextlib.contextmanager
def running_orthanc(tmp_path: Path, **config: Any) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path, **config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- results in a database -----------------------------------------------------------------------
def migrated_sessions(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'pacsbridge.db'}")
    migrations.upgrade(engine)
    return make_sessionmaker(engine)


def add_result(sessions: sessionmaker[Session], spool_dir: Path, source: Path, destinations: list[Destination], *,
               probability: float = 0.9, threshold: float = 0.5, model_id: str = "test-model",
               weights_sha256: str = "ab" * 32) -> int:
    """Record ``source`` as a predicted instance with a prediction and its outbox entries; returns the prediction id."""
    ds = dcmread(source, stop_before_pixels=True)
    iid = add_instance(sessions, spool_dir, source, sop_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID,
                       series_uid=ds.SeriesInstanceUID, state=InstanceState.PREDICTED.value)
    with sessions.begin() as s:
        from pacsbridge.store.models import Instance

        inst = s.get(Instance, iid)
        inst.sop_class_uid = ds.SOPClassUID
        inst.transfer_syntax_uid = ds.file_meta.TransferSyntaxUID
        p = Prediction(instance_id=iid, probability=probability, positive=probability >= threshold,
                       threshold=threshold, model_id=model_id, weights_sha256=weights_sha256)
        s.add(p)
        s.flush()
        Outbox(destinations).enqueue(s, p.id, p.positive)
        return p.id


# -- reading an SR -------------------------------------------------------------------------------
def sr_items(ds: Dataset) -> list[tuple[str, str, Any]]:
    """Flattened content tree: (value type, concept meaning, value) for every content item."""
    out: list[tuple[str, str, Any]] = []

    def walk(seq) -> None:  # noqa: ANN001
        for item in seq:
            vt = item.ValueType
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if vt == "CODE":
                value: Any = (item.ConceptCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodingSchemeDesignator)
            elif vt == "NUM":
                value = float(item.MeasuredValueSequence[0].NumericValue)
            elif vt == "TEXT":
                value = item.TextValue
            elif vt == "UIDREF":
                value = item.UID
            elif vt == "IMAGE":
                ref = item.ReferencedSOPSequence[0]
                value = (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID)
            else:
                value = None
            out.append((vt, name, value))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return out


# -- a RIS ---------------------------------------------------------------------------------------
class MllpListener:
    """A RIS stand-in: answers each message with the next scripted code (AA, AE, AR or "silent")."""

    def __init__(self, script: list[str], encoding: str = "utf-8") -> None:
        self.script = list(script)
        self.encoding = encoding
        self.received: list[hl7.Message] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, reader, writer) -> None:  # noqa: ANN001
        try:
            while not reader.at_eof():
                msg = await reader.readmessage()
                self.received.append(msg)
                code = self.script.pop(0) if self.script else "AA"
                if code == "silent":
                    continue
                writer.writemessage(msg.create_ack(ack_code=code))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._server = await start_hl7_server(self._handle, "127.0.0.1", self.port, encoding=self.encoding)
            self._ready.set()
            await self._server.serve_forever()

        try:
            self._loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    def __enter__(self) -> "MllpListener":
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        for task in asyncio.all_tasks(self._loop):
            self._loop.call_soon_threadsafe(task.cancel)
        self._thread.join(10)
