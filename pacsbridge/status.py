"""``pacsbridge status --json``: one JSON object assembled from small sections.

Each section is a function ``(settings, sessions) -> dict`` merged into the result; to add keys,
write a function and append it to :data:`SECTIONS`.  Existing keys are a stable contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge import __version__
from pacsbridge.config import Settings
from pacsbridge.store import migrations
from pacsbridge.store.records import instance_state_counts, spool_file_counts

Section = Callable[[Settings, sessionmaker[Session]], dict[str, Any]]


def general(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, Any]:
    engine: Engine = sessions.kw["bind"]
    return {
        "version": __version__,
        "ae_title": settings.ae_title,
        # "shadow": images are scored and recorded, nothing goes on the worklist or to the destinations.
        "mode": settings.mode,
        "dicom_port": settings.dicom_port,
        "data_dir": str(settings.data_dir.resolve()),
        "database": engine.url.render_as_string(hide_password=True),
        "schema": {"current": migrations.current_revision(engine), "head": migrations.head_revision()},
    }


def instances(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, Any]:
    with sessions() as session:
        return {"instances": instance_state_counts(session), "spool": spool_file_counts(session)}


def worklist_and_timings(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, Any]:
    from pacsbridge.inference.stats import timing_percentiles
    from pacsbridge.worklist.items import count_items

    with sessions() as session:
        return {"worklist": {"items": count_items(session)}, "timings": timing_percentiles(session)}


def outbox(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, Any]:
    from pacsbridge.forward.outbox import state_counts

    with sessions() as session:
        return {"outbox": state_counts(session)}


def calibration(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, Any]:
    """The site calibration in force (``id`` ``model``: the model card's operating point)."""
    from pacsbridge.validation.calibration import calibration_summary

    return {"calibration": calibration_summary(settings)}


def workers(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, Any]:
    """Inference workers whose heartbeat is recent (``pacsbridge workers`` lists them)."""
    from pacsbridge.store.workers import live_count

    with sessions() as session:
        return {"workers": {"live": live_count(session, settings.heartbeat_s)}}


def scheduler(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, Any]:
    """The scheduler leader (store/leader.py): node name, since when, and whether it still holds the lock."""
    from pacsbridge.store.leader import leader_info

    with sessions() as session:
        return {"scheduler": leader_info(session)}


SECTIONS: list[Section] = [general, instances, worklist_and_timings, outbox, calibration, workers, scheduler]


def collect_status(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for section in SECTIONS:
        result.update(section(settings, sessions))
    return result
