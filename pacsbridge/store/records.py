"""Database writes and reads shared by the stages: received instances, events, state counts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.store.models import Event, Instance, InstanceState, Series, Study

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceivedInstance:
    """What the receiver knows about a stored file (metadata from the dataset, no pixels)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    file_path: str  # relative to the spool
    file_size: int
    calling_ae: str | None = None
    modality: str | None = None
    body_part: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    requested_priority: str | None = None
    study_fields: dict[str, str] = field(default_factory=dict)  # patient_name, study_description, ...


def record_received(
    sessions: sessionmaker[Session], rec: ReceivedInstance, place_file: Callable[[], None], attempts: int = 5
) -> tuple[int, bool]:
    """Insert study/series/instance rows for ``rec`` in one transaction; returns (instance id, created).

    ``place_file`` moves the fsync'd file to its final path; it runs inside the transaction after
    the rows are flushed and before the commit, so a committed row always has its file, and a
    duplicate (the same SOP Instance UID already recorded, possibly by a concurrent association)
    never replaces the recorded file.  Constraint races are retried.
    """
    for attempt in range(1, attempts + 1):
        with sessions() as session:
            existing = session.scalar(select(Instance.id).where(Instance.sop_instance_uid == rec.sop_instance_uid))
            if existing is not None:
                return existing, False
            try:
                study = session.scalar(select(Study).where(Study.study_instance_uid == rec.study_instance_uid))
                if study is None:
                    study = Study(
                        study_instance_uid=rec.study_instance_uid, patient_id=rec.patient_id,
                        accession_number=rec.accession_number, study_date=rec.study_date,
                        requested_priority=rec.requested_priority, **rec.study_fields,
                    )
                    session.add(study)
                    session.flush()
                else:
                    if rec.requested_priority and not study.requested_priority:
                        study.requested_priority = rec.requested_priority
                    for key, value in rec.study_fields.items():  # fill gaps from later instances
                        if not getattr(study, key):
                            setattr(study, key, value)
                series = session.scalar(select(Series).where(Series.series_instance_uid == rec.series_instance_uid))
                if series is None:
                    series = Series(
                        study_id=study.id, series_instance_uid=rec.series_instance_uid,
                        modality=rec.modality, body_part=rec.body_part,
                    )
                    session.add(series)
                    session.flush()
                instance = Instance(
                    series_id=series.id, sop_instance_uid=rec.sop_instance_uid, sop_class_uid=rec.sop_class_uid,
                    transfer_syntax_uid=rec.transfer_syntax_uid, file_path=rec.file_path,
                    file_size=rec.file_size, calling_ae=rec.calling_ae, state=InstanceState.RECEIVED.value,
                )
                session.add(instance)
                session.flush()
                place_file()
                session.commit()
                return instance.id, True
            except IntegrityError:
                # Another association inserted the same study/series/instance first: look again.
                session.rollback()
                log.debug("constraint race on attempt %d; retrying", attempt)
    raise RuntimeError(f"could not record instance after {attempts} attempts (constraint races)")


def record_event(
    sessions: sessionmaker[Session], kind: str, detail: str | None = None, *, level: str = "info",
    peer: str | None = None, sop_instance_uid: str | None = None, instance_id: int | None = None,
) -> bool:
    """Add an audit event in its own short transaction; never raises (returns False on failure)."""
    try:
        with sessions.begin() as session:
            session.add(Event(
                kind=kind[:32], level=level[:8], detail=detail, peer=peer[:64] if peer else None,
                sop_instance_uid=sop_instance_uid[:64] if sop_instance_uid else None, instance_id=instance_id,
            ))
        return True
    except Exception as exc:  # noqa: BLE001 - the database may be the thing that is broken
        log.warning("could not record event %s: %s", kind, type(exc).__name__)
        return False


def instance_state_counts(session: Session) -> dict[str, int]:
    """Instances by state; see :func:`pacsbridge.store.queue.state_counts` (the owner of the states)."""
    from .queue import state_counts

    return state_counts(session)


def spool_file_counts(session: Session) -> dict[str, int]:
    """{"files": instances whose spool file is kept, "deleted": instances whose file retention deleted}."""
    deleted = Instance.spool_deleted_at.is_not(None)
    kept, gone = session.execute(
        select(func.count().filter(~deleted), func.count().filter(deleted)).select_from(Instance)
    ).one()
    return {"files": int(kept or 0), "deleted": int(gone or 0)}
