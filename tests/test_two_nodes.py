"""Two ``pacsbridge serve`` nodes on one PostgreSQL database and one shared spool, each with its own
data folder, forwarding to a real Orthanc (SR) and an MLLP listener (HL7 ORU).

200 images are sent half to each node; the scheduler leader is SIGKILLed mid-stream and restarted
later. At the end every acknowledged image is scored exactly once, each result's SR is in Orthanc
once, the RIS received each ORU once, the leadership moved to the survivor, and no outbox entry is
left pending or claimed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from dicom_support import free_port, postgres_schema_url, postgres_unavailable_reason, send_datasets, wait_for_port
from forward_support import ORTHANC, ORTHANC_MISSING, MllpListener, running_orthanc
from pacsbridge.store.models import Instance, Prediction
from pipeline_support import export_model, synthetic_chest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(ORTHANC is None, reason=ORTHANC_MISSING)]

N_IMAGES = 200
BATCH = 10


class Node:
    """One ``pacsbridge serve`` (every role) with its own data folder and the shared spool."""

    def __init__(self, name: str, root: Path, spool: Path, database_url: str, model: Path,
                 destinations: list[dict]) -> None:
        self.name, self.data_dir = name, root / name
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
        self.env.update(
            PACSBRIDGE_DATA_DIR=str(self.data_dir), PACSBRIDGE_SPOOL_DIR=str(spool),
            PACSBRIDGE_DATABASE_URL=database_url, PACSBRIDGE_DICOM_PORT=str(self.port),
            PACSBRIDGE_HTTP_PORT="0", PACSBRIDGE_BIND_ADDRESS="127.0.0.1", PACSBRIDGE_MODEL_PATH=str(model),
            PACSBRIDGE_DEVICE="cpu", PACSBRIDGE_FSYNC="false", PACSBRIDGE_DESTINATIONS=json.dumps(destinations),
            PACSBRIDGE_SCHEDULER_INTERVAL_S="0.5", PACSBRIDGE_OUTBOX_INTERVAL_S="0.5",
            PACSBRIDGE_OUTBOX_RETRY_INITIAL_S="0.5", PACSBRIDGE_OUTBOX_RETRY_MAX_S="2",
            # short leases so that the killed node's claims come back within the test
            PACSBRIDGE_LEADER_RETRY_S="1", PACSBRIDGE_CLAIM_LEASE_S="10", PACSBRIDGE_HEARTBEAT_S="2",
            PACSBRIDGE_OUTBOX_LEASE_S="10", PYTHONPATH=str(REPO),
        )
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        log = open(self.data_dir / "serve.log", "a")  # noqa: SIM115 - kept open by the child
        self.proc = subprocess.Popen([sys.executable, "-m", "pacsbridge", "serve"], env=self.env, cwd=REPO,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for_port(self.port, 120, self.proc)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pacsbridge", *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    def status(self) -> dict:
        res = self.cli("status", "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def outbox(self) -> list[dict]:
        res = self.cli("outbox", "list", "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def log(self) -> str:
        return (self.data_dir / "serve.log").read_text(errors="replace")


def _wait(predicate, timeout: float, what: str, nodes: list[Node] = ()):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n.name}\n{n.log()[-3000:]}" for n in nodes)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.5)


def _leader(node: Node) -> str | None:
    return (node.status().get("scheduler") or {}).get("leader")


@pytest.fixture
def database_url():
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with postgres_schema_url() as url:
        yield url


def test_two_nodes_one_database_score_and_send_each_image_once(tmp_path, database_url):
    model = export_model(tmp_path / "model", threshold=0.0, name="cluster-test-model")  # every image positive
    images = [synthetic_chest(seed, rows=256, cols=256) for seed in range(N_IMAGES)]
    batches = [images[i:i + BATCH] for i in range(0, N_IMAGES, BATCH)]
    with running_orthanc(tmp_path / "orthanc") as orthanc, MllpListener([]) as ris:
        destinations = [
            {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
             "ae_title": "ORTHANC", "objects": ["sr"], "timeout_s": 10},
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port, "receiving_application": "RIS"},
        ]
        spool = tmp_path / "spool"
        a = Node("a", tmp_path, spool, database_url, model, destinations)  # migrates the database, then leads
        b = Node("b", tmp_path, spool, database_url, model, destinations)
        nodes = [a, b]
        try:
            first_leader = _wait(lambda: _leader(a), 60, "a scheduler leader", nodes)
            # The leader names its node (host, pid, ...); the first node up normally leads.
            leader = b if str(b.proc.pid) in first_leader and str(a.proc.pid) not in first_leader else a
            other = b if leader is a else a
            # Send alternately to both nodes; after a third of the images, SIGKILL the leader.
            sent: list = []
            for i, batch in enumerate(batches):
                target = nodes[i % 2]
                if i == len(batches) // 3:
                    leader.kill9()
                if target.proc.poll() is not None:  # the killed node: its share goes to the survivor
                    target = other
                assert send_datasets(target.port, batch) == [0] * len(batch)
                sent += batch
                if i == 2 * len(batches) // 3:
                    moved = _wait(lambda: (lambda ld: ld if ld and ld != first_leader else None)(_leader(other)),
                                  60, "the leadership to move to the survivor", nodes)
                    leader.start()  # the killed node comes back (as a follower)
            assert len(sent) == N_IMAGES

            engine = create_engine(database_url)
            try:
                def all_scored() -> bool:
                    with engine.connect() as conn:
                        states = dict(conn.execute(select(Instance.state, func.count()).group_by(Instance.state)).all())
                    return states.get("predicted", 0) == N_IMAGES
                _wait(all_scored, 300, f"{N_IMAGES} instances predicted", nodes)
                rows = _wait(lambda: (lambda rs: rs if len(rs) == 2 * N_IMAGES and all(r["state"] == "sent" for r in rs)
                                      else None)(a.outbox()), 300, "every outbox entry sent", nodes)
                with engine.connect() as conn:
                    per_instance = conn.execute(select(Prediction.instance_id, func.count())
                                                .group_by(Prediction.instance_id)).all()
                    n_instances = conn.execute(select(func.count()).select_from(Instance)).scalar_one()
            finally:
                engine.dispose()
            status = b.status()
        finally:
            for n in nodes:
                n.stop()

        # every acknowledged image stored once and scored once
        assert n_instances == N_IMAGES
        assert len(per_instance) == N_IMAGES and all(c == 1 for _, c in per_instance)
        assert status["outbox"] == {"pending": 0, "sent": 2 * N_IMAGES, "dead": 0}
        # each result's SR in Orthanc once
        pacs = [r for r in rows if r["destination"] == "pacs"]
        stored = [i for i in orthanc.instances() if i["modality"] == "SR"]
        assert len({r["sop_instance_uid"] for r in pacs}) == N_IMAGES
        assert {r["object_uid"] for r in pacs} == {i["sop"] for i in stored} and len(stored) == N_IMAGES
        # each ORU received once: one message per result, no duplicate control ID
        oru = [r for r in rows if r["destination"] == "ris"]
        control_ids = Counter(str(m.segment("MSH")[10]) for m in ris.received)
        assert set(control_ids) == {r["object_uid"] for r in oru}
        duplicates = {k: c for k, c in control_ids.items() if c > 1}
        assert not duplicates, f"ORU sent more than once: {duplicates}"
        # the leadership moved while the first leader was dead
        assert moved != first_leader
        assert status["scheduler"]["leader"]
