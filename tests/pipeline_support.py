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
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.model.architecture import build_model
from pacsbridge.model.artifact import sha256_file
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Base, Instance, InstanceState, Series, Study, utcnow
from pacsbridge.store.spool import spool_relpath

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "pacsbridge" / "models" / "pneumonia-v4.pt"


def sample_file(name: str) -> Path:
    """A pydicom-data file (no network: it must be installed)."""
    return Path(get_testdata_file(name, download=False))


def export_model(out_dir: Path, threshold: float = 0.5, seed: int = 0, temperature: float = 1.0,
                 name: str = "test-model", spread_on: "list | None" = None) -> Path:
    """Export a small-resnet-v1 with seeded random weights + its card; returns the .pt path.

    A randomly initialised network gives nearly the same score to every image.  With ``spread_on``
    (display-ready images), the last layer is rescaled so that these images' logits have mean 0 and
    standard deviation 2: scores then spread over (0, 1) and a threshold can split them.
    """
    torch.manual_seed(seed)
    module = build_model("small-resnet-v1")
    if spread_on:
        from pacsbridge.model.preprocess import preprocess

        module.eval()
        with torch.no_grad():
            x = torch.stack([preprocess(im) for im in spread_on]).double()
            m64 = module.double()
            feats = m64.head[:2](m64.features(m64.stem(x)))
            lin = m64.head[-1]
            z = feats @ lin.weight[0]
            k = 2.0 / float(z.std().clamp_min(1e-12))
            lin.weight.mul_(k)
            lin.bias.fill_(-k * float(z.mean()))
            module = m64.float()
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


def synthetic_chest(seed: int, *, rows: int = 512, cols: int = 512, study_uid: str | None = None,
                    priority: str | None = None) -> Dataset:
    """A frontal DX chest-like image (two dark lung fields in a brighter body, 12-bit, MONOCHROME2)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols] / np.array([rows, cols]).reshape(2, 1, 1)
    body = 2400 - 1400 * ((xx - 0.5) ** 2 * 3 + (yy - 0.55) ** 2 * 1.5)
    for cx in (0.32, 0.68):
        lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        body = np.where(lung, body - 900 + rng.normal(0, 60 + 40 * seed % 3, body.shape), body)
    body += rng.normal(0, 25, body.shape)
    pixels = np.clip(body, 0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientID, ds.PatientName = f"SYN{seed:04d}", "Synthetic^Patient"
    if priority:
        ds.RequestedProcedurePriority = priority
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


def reuid(source: Path, dest: Path, *, study_uid: str | None = None, priority: str | None = None) -> Path:
    """Copy a DICOM file with fresh SOP/series (and given study) UIDs: a new instance of the same image."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if priority:
        ds.RequestedProcedurePriority = priority
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest
