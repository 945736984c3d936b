"""The worklist queries behind DICOM UPS C-FIND and N-GET: read-only, in reading order.

The UPS face (:mod:`pacsbridge.dicom.ups_scp`) turns a C-FIND Identifier into a :class:`UpsFilter`
(only the keys SQL can narrow exactly; every other key is matched on the built datasets) and the
items it gets back into UPS datasets with :func:`study_context`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..store.models import Instance, Series, Study, WorklistItem

#: One study's referenced instances: series UID -> [(SOP Class UID, SOP Instance UID)], in arrival order.
SeriesRefs = dict[str, list[tuple[str, str]]]


@dataclass(frozen=True)
class UpsFilter:
    """What a C-FIND may narrow in SQL; ``None`` or empty: no condition on it."""

    statuses: Sequence[str] | None = None
    min_priority: float | None = None  # inclusive
    below_priority: float | None = None  # exclusive
    ups_uids: Sequence[str] = ()
    study_uids: Sequence[str] = ()
    patient_ids: Sequence[str] = ()


def candidates(session: Session, where: UpsFilter, batch: int = 200) -> Iterator[list[WorklistItem]]:
    """Items that may match, in reading order (highest priority, then longest waiting), ``batch`` at a time."""
    q = select(WorklistItem).join(Study, Study.id == WorklistItem.study_id)
    if where.statuses is not None:
        q = q.where(WorklistItem.status.in_(list(where.statuses)))
    if where.min_priority is not None:
        q = q.where(WorklistItem.priority >= where.min_priority)
    if where.below_priority is not None:
        q = q.where(WorklistItem.priority < where.below_priority)
    for values, column in ((where.ups_uids, WorklistItem.ups_uid), (where.study_uids, Study.study_instance_uid),
                           (where.patient_ids, Study.patient_id)):
        if values:
            q = q.where(column.in_(list(values)))
    q = q.order_by(WorklistItem.priority.desc(), WorklistItem.first_positive_at, WorklistItem.id)
    offset = 0
    seen: set[int] = set()  # priorities change while we page: never return an item twice
    while True:
        page = list(session.scalars(q.limit(batch).offset(offset)))
        if not page:
            return
        offset += len(page)
        items = [i for i in page if i.id not in seen]
        seen.update(i.id for i in items)
        yield items


def study_context(session: Session, items: Sequence[WorklistItem], *,
                  instances: bool = True) -> tuple[dict[int, Study], dict[int, SeriesRefs]]:
    """The studies of ``items`` by id and, unless ``instances=False``, their referenced instances by study id."""
    study_ids = sorted({i.study_id for i in items})
    if not study_ids:
        return {}, {}
    studies = {s.id: s for s in session.scalars(select(Study).where(Study.id.in_(study_ids)))}
    series: dict[int, SeriesRefs] = {}
    rows = [] if not instances else session.execute(
        select(Series.study_id, Series.series_instance_uid, Instance.sop_class_uid, Instance.sop_instance_uid)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id.in_(study_ids))
        .order_by(Series.id, Instance.id)
    )
    for study_id, series_uid, sop_class, sop_instance in rows:
        series.setdefault(study_id, {}).setdefault(series_uid, []).append((sop_class, sop_instance))
    return studies, series
