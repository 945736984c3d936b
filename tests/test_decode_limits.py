"""Decompression-bomb guard: an image whose header promises more decoded bytes than max_decoded_bytes
becomes not_analysed with the reason, before any pixel is decoded -- in the worker `serve` runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from pacsbridge.config import load_settings
from pacsbridge.daemon import Daemon
from pacsbridge.imaging import NotAnalysable, load_for_model
from pacsbridge.store.models import Instance
from pacsbridge.worklist.items import WorklistUpdater
from pipeline_support import add_instance, export_model, sample_file


def bomb_file(tmp_path: Path) -> Path:
    """RG1 (a real chest CR, JPEG 2000) whose header claims 60,000 x 60,000 pixels x 100 frames."""
    ds = dcmread(sample_file("RG1_J2KR.dcm"))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 100
    path = tmp_path / "bomb.dcm"
    ds.save_as(path)
    return path


def test_load_for_model_refuses_before_decoding(tmp_path):
    with pytest.raises(NotAnalysable, match="too large to decode.*max_decoded_bytes"):
        load_for_model(bomb_file(tmp_path))
    # The real image fits the default but not a small limit (1955 x 1841 x 2 bytes = 7.2 MB).
    assert load_for_model(sample_file("RG1_UNCR.dcm")).image.ndim == 2
    with pytest.raises(NotAnalysable, match="7198310 bytes"):
        load_for_model(sample_file("RG1_UNCR.dcm"), max_decoded_bytes=1_000_000)


def test_serve_worker_uses_max_decoded_bytes(tmp_path, monkeypatch):
    for key in ("PACSBRIDGE_AGE_GATE", "PACSBRIDGE_OOD_GATE"):
        monkeypatch.setenv(key, "false")
    model = export_model(tmp_path / "model")
    settings = load_settings(data_dir=tmp_path / "data", model_path=model, max_decoded_bytes=8_000_000)
    daemon = Daemon(settings)
    daemon.prepare()
    try:
        spool = Path(settings.spool_dir)
        add_instance(daemon.sessions, spool, bomb_file(tmp_path), sop_uid="1.1")
        add_instance(daemon.sessions, spool, sample_file("RG1_UNCR.dcm"), sop_uid="1.2", study_uid="2.2")
        worker = daemon.inference_worker(WorklistUpdater(daemon.sessions, 240.0))
        out = worker.drain()
        assert (out.predicted, out.not_analysed) == (1, 1)
        with daemon.sessions() as s:
            states = {i.sop_instance_uid: (i.state, i.state_reason) for i in s.scalars(select(Instance))}
        assert states["1.2"][0] == "predicted"
        assert states["1.1"][0] == "not_analysed" and "max_decoded_bytes (8000000)" in states["1.1"][1]
    finally:
        daemon.engine.dispose()
