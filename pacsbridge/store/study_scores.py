"""``study_scores``: per study and (model, calibration), when it was first and last scored, first and last
flagged, last scored in shadow mode, and how many of its images were scored, positive, in shadow mode.

Written here only: every prediction inserted through the ORM updates its study's row in the same
transaction (a mapper event, so no code path that records a prediction can forget it).  The live
figures (pacsbridge.validation.live) read the rows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, case, event, select, text
from sqlalchemy.dialects import postgresql, sqlite

from .models import Instance, Prediction, Series, StudyScore


def _later(current: Any, new: Any) -> Any:
    """The later of two timestamps, NULL counting as never."""
    return case((current.is_(None), new), (new.is_(None), current), (new > current, new), else_=current)


def _earlier(current: Any, new: Any) -> Any:
    """The earlier of two timestamps, NULL counting as never."""
    return case((current.is_(None), new), (new.is_(None), current), (new < current, new), else_=current)


def record_score(connection: Connection, study_id: int, model_id: str, calibration: str, at: datetime,
                 positive: bool, shadow: bool) -> None:
    """Move the study's row for (model, calibration) forward for one prediction made at ``at``."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    row = dict(study_id=study_id, model_id=model_id, calibration=calibration, first_scored_at=at, last_scored_at=at,
               first_positive_at=at if positive else None, last_positive_at=at if positive else None,
               last_shadow_at=at if shadow else None,
               images=1, positive_images=int(positive), shadow_images=int(shadow))
    stmt = dialect.insert(StudyScore).values(**row)
    t, new = StudyScore.__table__.c, stmt.excluded
    connection.execute(stmt.on_conflict_do_update(
        index_elements=[t.study_id, t.model_id, t.calibration],
        set_={"first_scored_at": _earlier(t.first_scored_at, new.first_scored_at),
              "last_scored_at": _later(t.last_scored_at, new.last_scored_at),
              "first_positive_at": _earlier(t.first_positive_at, new.first_positive_at),
              "last_positive_at": _later(t.last_positive_at, new.last_positive_at),
              "last_shadow_at": _later(t.last_shadow_at, new.last_shadow_at),
              "images": t.images + 1, "positive_images": t.positive_images + new.positive_images,
              "shadow_images": t.shadow_images + new.shadow_images}))


@event.listens_for(Prediction, "after_insert")
def _on_prediction(mapper: Any, connection: Connection, target: Prediction) -> None:  # noqa: ANN401
    study_id = connection.scalar(select(Series.study_id).join(Instance, Instance.series_id == Series.id)
                                 .where(Instance.id == target.instance_id))
    if study_id is not None:
        record_score(connection, study_id, target.model_id, target.calibration or "model", target.created_at,
                     bool(target.positive), bool(target.shadow))


#: Every study_scores row from the predictions (the migration that made the table ran the same).
REBUILD = text(
    "INSERT INTO study_scores (study_id, model_id, calibration, first_scored_at, last_scored_at, first_positive_at, "
    "last_positive_at, last_shadow_at, images, positive_images, shadow_images) "
    "SELECT series.study_id, p.model_id, p.calibration, min(p.created_at), max(p.created_at), "
    "min(CASE WHEN p.positive THEN p.created_at END), max(CASE WHEN p.positive THEN p.created_at END), "
    "max(CASE WHEN p.shadow THEN p.created_at END), "
    "count(*), sum(CASE WHEN p.positive THEN 1 ELSE 0 END), sum(CASE WHEN p.shadow THEN 1 ELSE 0 END) "
    "FROM predictions p JOIN instances ON instances.id = p.instance_id JOIN series ON series.id = instances.series_id "
    "GROUP BY series.study_id, p.model_id, p.calibration")


def rebuild(connection: Connection) -> None:
    """Recompute every row from the predictions (for predictions inserted without the ORM, e.g. in bulk)."""
    connection.execute(StudyScore.__table__.delete())
    connection.execute(REBUILD)
