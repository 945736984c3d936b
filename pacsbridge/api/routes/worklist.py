"""``/api/worklist``: the items in reading order, one item, and its life cycle (claim, release,
complete, cancel) through :mod:`pacsbridge.worklist.lifecycle`."""

from __future__ import annotations

from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from ...auth.users import Principal
from ...store.models import Finding
from ...worklist import lifecycle as lc
from ...worklist.items import ALL_STATUSES, list_worklist
from ...worklist.reports import item_detail
from ...worklist.viewer import viewer_link
from ..auth import admin, reader
from ..deps import (
    MAX_OFFSET,
    ApiSettings,
    Config,
    DbSession,
    Heatmaps,
    HeatmapService,
    ItemId,
    Now,
    Sessions,
)

router = APIRouter(tags=["worklist"])


class WorklistEntry(BaseModel):
    id: int
    status: str
    priority: float
    probability: float | None  # null for a blinded audit item (kind "audit", not yet completed)
    study_instance_uid: str
    accession_number: str | None
    patient_name: str | None
    patient_id: str | None
    patient_age: str | None
    study_date: str | None
    study_description: str | None
    modality: str | None
    requested_priority: str | None
    received_at: str
    first_positive_at: str
    waiting_s: float
    claimed_by: str | None
    claim_expires_at: str | None
    finding: str | None
    completed_by: str | None
    completed_at: str | None
    ups_uid: str
    viewer_url: str | None = None
    kind: str = "flag"  # "flag" (scored positive) | "audit" (a scored negative sampled for a blinded read)
    blinded: bool = False


class CompleteBody(BaseModel):
    finding: Finding
    comment: str | None = Field(None, max_length=4000)


class CancelBody(BaseModel):
    reason: str = Field(..., min_length=1, max_length=4000)


def _with_viewer(item: dict[str, Any], config: ApiSettings) -> dict[str, Any]:
    item["viewer_url"] = viewer_link(config.viewer_url, item["study_instance_uid"], item["accession_number"])
    return item


def _item_json(session: Session, item_id: int, now: Any, config: ApiSettings, heat: HeatmapService) -> dict[str, Any]:
    """The one item answer: GET /api/worklist/{id} and every write (claim, release, ...) alike."""
    out = _with_viewer(item_detail(session, item_id, now), config)
    out["heatmap_available"] = not out["blinded"] and heat.available
    return out


class _Transition:
    """A life-cycle move in its own transaction, answered with the item as it is afterwards."""

    def __init__(self, sessions: Sessions, now: Now, config: Config, heat: Heatmaps) -> None:
        self.sessions, self.now, self.config, self.heat = sessions, now, config, heat

    def __call__(self, fn: Callable[..., Any], item_id: int, who: Principal, **kwargs: Any) -> dict[str, Any]:
        with self.sessions.begin() as session:
            fn(session, item_id, lc.Actor(who.name, who.role), now=self.now, **kwargs)
        with self.sessions() as session:
            return _item_json(session, item_id, self.now, self.config, self.heat)


@router.get("/api/worklist", response_model=list[WorklistEntry], dependencies=[Depends(reader)])
def worklist(
    session: DbSession, now: Now, config: Config,
    status: str = Query("open", max_length=16, description="scheduled|in_progress|completed|canceled|all; "
                        "default open = scheduled + in_progress"),
    limit: int = Query(200, ge=1, le=5000), offset: int = Query(0, ge=0, le=MAX_OFFSET),
    kind: Literal["flag", "audit", "all"] = Query("all", description="flag (scored positive), audit "
                                                  "(blinded quality reads of negatives) or all"),
) -> list[dict[str, Any]]:
    """Items in reading order (highest priority first); audit items are blinded (no score) until completed."""
    if status != "open" and status != "all" and status not in ALL_STATUSES:
        raise HTTPException(422, f"status must be one of {', '.join(ALL_STATUSES)}, all or open")
    return [_with_viewer(it, config) for it in list_worklist(
        session, status=None if status == "open" else status, limit=limit, offset=offset, now=now,
        kind=kind)]


@router.get("/api/worklist/{item_id}", dependencies=[Depends(reader)])
def worklist_item(item_id: ItemId, session: DbSession, now: Now, config: Config, heat: Heatmaps) -> dict[str, Any]:
    """One item with its instances, each prediction (probability, threshold, model), image links and history."""
    return _item_json(session, item_id, now, config, heat)


@router.post("/api/worklist/{item_id}/claim")
def claim(item_id: ItemId, config: Config, move: _Transition = Depends(),
          who: Principal = Depends(reader)) -> dict[str, Any]:
    """Claim the item for reading (409 with the holder when someone else has it; again = renew)."""
    return move(lc.claim, item_id, who, claim_timeout_s=config.claim_timeout_s)


@router.post("/api/worklist/{item_id}/release")
def release(item_id: ItemId, move: _Transition = Depends(), who: Principal = Depends(reader)) -> dict[str, Any]:
    """Give the item back to the queue (the claimant or an admin)."""
    return move(lc.release, item_id, who)


@router.post("/api/worklist/{item_id}/complete")
def complete(item_id: ItemId, body: CompleteBody, move: _Transition = Depends(),
             who: Principal = Depends(reader)) -> dict[str, Any]:
    """Record the finding (the claimant or an admin; 409 otherwise)."""
    return move(lc.complete, item_id, who, finding=body.finding.value, comment=body.comment)


@router.post("/api/worklist/{item_id}/cancel")
def cancel(item_id: ItemId, body: CancelBody, move: _Transition = Depends(),
           who: Principal = Depends(admin)) -> dict[str, Any]:
    """Withdraw the item with a reason (admin)."""
    return move(lc.cancel, item_id, who, reason=body.reason)
