"""Orphan spool files (a crash between moving a file into place and committing its row) and
``spool/tmp`` leftovers are removed when ``serve`` starts, with one Event; nothing recorded is touched."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import select, update

from dicom_support import free_port, make_image, running_receiver, send_datasets
from pacsbridge.config import load_settings
from pacsbridge.daemon import Daemon
from pacsbridge.store.models import Event, Instance
from pacsbridge.store.orphans import ORPHAN_MIN_AGE_S, sweep_orphans
from pacsbridge.store.spool import spool_relpath

HOUR_AGO = time.time() - 3600


def _plant(spool_root: Path, sop_uid: str, *, mtime: float | None = None) -> Path:
    """A spool file under the name the receiver would give ``sop_uid``, with no row behind it."""
    path = spool_root / spool_relpath(sop_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _age(path: Path, mtime: float = HOUR_AGO) -> None:
    os.utime(path, (mtime, mtime))


def test_sweep_removes_only_old_unrecorded_spool_files(tmp_path):
    with running_receiver(tmp_path, fsync=False) as r:
        images = [make_image() for _ in range(3)]
        assert send_datasets(r.port, images) == [0, 0, 0]
        with r.sessions() as s:
            rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        recorded = [r.spool.path(rows[ds.SOPInstanceUID].file_path) for ds in images]
        for path in recorded:
            _age(path)  # old, but recorded: kept
        # Retention deleted one file; a file at that name again is not referenced by a live row.
        with r.sessions.begin() as s:
            s.execute(update(Instance).where(Instance.sop_instance_uid == images[2].SOPInstanceUID)
                      .values(spool_deleted_at=Instance.received_at))
        old_orphans = [_plant(r.spool.root, f"9.9.{i}", mtime=HOUR_AGO) for i in range(3)]
        young_orphan = _plant(r.spool.root, "9.9.100")  # could be a C-STORE whose commit is in flight
        foreign = r.spool.root / "ab" / "not-ours.dcm"
        foreign.write_bytes(b"x")
        _age(foreign)
        misplaced = r.spool.root / "00" / "00" / (spool_relpath("9.9.200").split("/")[-1])  # wrong folder
        misplaced.parent.mkdir(parents=True, exist_ok=True)
        misplaced.write_bytes(b"x")
        _age(misplaced)

        assert sweep_orphans(r.sessions, r.spool) == 4  # three planted + the retention-deleted one
        for path in old_orphans + [recorded[2]]:
            assert not path.exists()
        for path in recorded[:2] + [young_orphan, foreign, misplaced]:
            assert path.exists(), path
        assert sweep_orphans(r.sessions, r.spool) == 0
        assert sweep_orphans(r.sessions, r.spool, min_age_s=0) == 1  # the young one, once old enough
        assert not young_orphan.exists()
        assert send_datasets(r.port, [make_image()]) == [0]  # the receiver is unaffected


def test_serve_start_removes_tmp_leftovers_and_orphans_with_one_event(tmp_path):
    data = tmp_path / "data"
    settings = load_settings(None, data_dir=data, dicom_port=free_port(), http_port=0, worker_enabled=False,
                             bind_address="127.0.0.1", fsync=False)
    daemon = Daemon(settings)
    daemon.prepare()  # first start: migrated database, empty spool
    daemon.stop()
    spool = daemon.spool  # the node's own tmp folder: the next start on this data folder takes it again
    leftovers = [spool.tmp_dir / "0123abcd.part", spool.tmp_dir / "stray"]
    for p in leftovers:
        p.write_bytes(b"partial")  # a crash while receiving: never acknowledged
    orphan = _plant(spool.root, "1.2.3.4.5", mtime=time.time() - ORPHAN_MIN_AGE_S - 60)
    young = _plant(spool.root, "1.2.3.4.6")

    daemon = Daemon(settings)
    daemon.start()
    try:
        assert not any(p.exists() for p in leftovers)  # before the port opened
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with daemon.sessions() as s:
                events = s.scalars(select(Event).where(Event.kind == "spool_orphans_removed")).all()
            if events:
                break
            time.sleep(0.05)
    finally:
        daemon.stop()
    assert len(events) == 1, "one event per start"
    assert "removed 1 orphan spool file" in events[0].detail and "2 leftover temporary file" in events[0].detail
    assert events[0].level == "warning"
    assert not orphan.exists() and young.exists()


def test_contained_path_refuses_what_leads_out_of_the_spool(tmp_path: Path) -> None:
    import pytest

    from pacsbridge.store.spool import OutsideSpool, contained_path

    root = tmp_path / "spool"
    (root / "ab").mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    (root / "ab" / "link.dcm").symlink_to(tmp_path / "secret")
    assert contained_path(root, "ab/cd/x.dcm") == (root / "ab/cd/x.dcm").resolve()
    for bad in ("", ".", "../secret", str(tmp_path / "secret"), "ab/../../secret", "ab/link.dcm"):
        with pytest.raises(OutsideSpool):
            contained_path(root, bad)
