"""Helpers shared by the pipeline tests (worker, worklist, API, CLI, daemon).

Imported as a plain module (``from pipeline_support import ...``); pytest puts ``tests/`` on sys.path.
"""

from __future__ import annotations

import json
import shutil
import socket
from datetime import datetime
from pathlib import Path

import torch
from pydicom.data import get_testdata_file
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.model.architecture import build_model
from pacsbridge.model.artifact import sha256_file
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Base, Instance, InstanceState, Series, Study, utcnow
from pacsbridge.store.spool import spool_relpath

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "pacsbridge" / "models" / "pneumonia-v1.pt"


def sample_file(name: str) -> Path:
    """A pydicom-data file (no network: it must be installed)."""
    return Path(get_testdata_file(name, download=False))


def export_model(out_dir: Path, threshold: float = 0.5, seed: int = 0, temperature: float = 1.0,
                 name: str = "test-model") -> Path:
    """Export a small-resnet-v1 with seeded random weights + its card; returns the .pt path."""
    torch.manual_seed(seed)
    module = build_model("small-resnet-v1")
    out_dir.mkdir(parents=True, exist_ok=True)
    pt = out_dir / f"{name}.pt"
    torch.save({"architecture": "small-resnet-v1", "input_size": 192, "state_dict": module.state_dict()}, pt)
    write_card(pt, threshold=threshold, temperature=temperature, model_id=name)
    return pt


def write_card(pt: Path, *, threshold: float, temperature: float = 1.0, model_id: str = "test-model") -> None:
    card = {"model_id": model_id, "weights_sha256": sha256_file(pt), "temperature": temperature,
            "threshold": threshold}
    pt.with_suffix(".json").write_text(json.dumps(card))


def sqlite_sessions(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    return make_sessionmaker(engine)


def add_instance(
    sessions: sessionmaker[Session], spool_dir: Path, source: Path | None, *, sop_uid: str,
    study_uid: str = "1.2.3.4", series_uid: str | None = None, state: str = InstanceState.RECEIVED.value,
    received_at: datetime | None = None, requested_priority: str | None = None,
    claimed_by: str | None = None, claimed_at: datetime | None = None,
) -> int:
    """Record an instance as the receiver would (file copied into the spool); returns its id."""
    rel = spool_relpath(sop_uid)
    if source is not None:
        dest = spool_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        size = dest.stat().st_size
    else:
        size = 0
    series_uid = series_uid or study_uid + ".1"
    with sessions.begin() as s:
        study = s.query(Study).filter_by(study_instance_uid=study_uid).one_or_none()
        if study is None:
            study = Study(study_instance_uid=study_uid, requested_priority=requested_priority,
                          created_at=received_at or utcnow())
            s.add(study)
            s.flush()
        series = s.query(Series).filter_by(series_instance_uid=series_uid).one_or_none()
        if series is None:
            series = Series(study_id=study.id, series_instance_uid=series_uid, modality="CR")
            s.add(series)
            s.flush()
        inst = Instance(
            series_id=series.id, sop_instance_uid=sop_uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            transfer_syntax_uid="1.2.840.10008.1.2.1", file_path=rel, file_size=size, state=state,
            received_at=received_at or utcnow(), claimed_by=claimed_by, claimed_at=claimed_at,
        )
        s.add(inst)
        s.flush()
        return inst.id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
