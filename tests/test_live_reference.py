"""The live figures (pacsbridge.validation.live) against a plain reference computed from the rows.

A seeded random history: three (model, calibration) pairs, studies of one to three images scored
over 60 days (some in shadow mode), flag and audit items in every state, RIS labels on part of
the studies.  Every figure that ``/api/stats`` reports per model is recomputed here the slow and
obvious way (every prediction, item and label loaded into Python) for the totals and for a window,
on SQLite and PostgreSQL.  The receipt-to-read times are checked with a small TIMES_OF, so that
"the latest N items" really cuts.  The study_scores rows kept as predictions were recorded must
equal a rebuild from the predictions, and what migration 0016 makes of the same predictions.
"""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from dicom_support import migrated_sessions_for
from pacsbridge.store import migrations, study_scores
from pacsbridge.store.models import (
    Finding, Instance, InstanceState, Label, Prediction, Series, Study, StudyScore, WorklistItem, WorklistStatus,
    utcnow,
)
from pacsbridge.validation import live
from pacsbridge.validation.live import live_stats

PAIRS = [("a", "model"), ("a", "site-1"), ("b", "model")]
STATUSES = [s.value for s in WorklistStatus]
FINDINGS = [Finding.PNEUMONIA.value, Finding.NO_PNEUMONIA.value, "other"]


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path: Path):
    yield from migrated_sessions_for(request.param, tmp_path / "pb.db")


def _history(sessions, now: datetime, seed: int = 5) -> None:  # noqa: ANN001
    rng = random.Random(seed)
    with sessions.begin() as s:
        for k in range(80):
            received = now - timedelta(days=rng.uniform(0, 60))
            study = Study(study_instance_uid=f"2.25.{seed}.{k}", created_at=received)
            s.add(study)
            s.flush()
            series = Series(study_id=study.id, series_instance_uid=f"2.25.{seed}.{k}.1", modality="CR")
            s.add(series)
            s.flush()
            for j in range(rng.randint(1, 3)):
                at = received + timedelta(hours=rng.uniform(0, 30 * 24) if rng.random() < 0.2 else rng.uniform(0, 2))
                inst = Instance(series_id=series.id, sop_instance_uid=f"2.25.{seed}.{k}.1.{j}",
                                sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                                file_path=f"x/{k}-{j}.dcm", file_size=1, state=InstanceState.PREDICTED.value,
                                received_at=at)
                s.add(inst)
                s.flush()
                mid, cal = rng.choice(PAIRS)
                p = rng.random()
                s.add(Prediction(instance_id=inst.id, probability=p, positive=p > 0.6, threshold=0.6, model_id=mid,
                                 calibration=cal, weights_sha256="ab" * 32, created_at=min(at, now),
                                 shadow=rng.random() < 0.15))
            if rng.random() < 0.6:
                status = rng.choice(STATUSES)
                closed = status in (WorklistStatus.COMPLETED.value, WorklistStatus.CANCELED.value)
                s.add(WorklistItem(
                    study_id=study.id, ups_uid=f"2.25.9{seed}.{k}", priority=1.0, probability=0.7,
                    kind=rng.choice(["flag", "flag", "audit"]), status=status, first_positive_at=received,
                    finding=rng.choice(FINDINGS) if status == WorklistStatus.COMPLETED.value else None,
                    completed_at=received + timedelta(minutes=rng.uniform(5, 600)) if closed else None))
            for source in ("ris.csv", "ris-2.csv")[:rng.choice([0, 0, 1, 2])]:
                s.add(Label(source=source, study_key=f"uid:{study.study_instance_uid}",
                            study_instance_uid=study.study_instance_uid, finding=rng.choice(FINDINGS),
                            study_id=study.id, imported_at=now))


def _reference(sessions, since: datetime | None, times_of: int) -> dict[tuple[str, str], dict[str, Any]]:  # noqa: ANN001
    """Every figure per (model, calibration) from rows loaded into Python (predictions since ``since``)."""
    with sessions() as s:
        preds = s.execute(select(Prediction, Series.study_id).join(Instance, Instance.id == Prediction.instance_id)
                          .join(Series, Series.id == Instance.series_id)).all()
        items = s.scalars(select(WorklistItem)).all()
        labels = s.scalars(select(Label).where(Label.study_id.is_not(None))).all()
        received = dict(s.execute(select(Study.id, Study.created_at)).all())
    truth: dict[int, bool] = defaultdict(bool)
    for lab in labels:
        truth[lab.study_id] |= lab.finding == Finding.PNEUMONIA.value
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for pair in {(p.model_id, p.calibration) for p, _ in preds}:
        mine = [(p, sid) for p, sid in preds if (p.model_id, p.calibration) == pair
                and (since is None or p.created_at >= since)]
        scored_studies = {sid for _, sid in mine}
        flagged = {sid for p, sid in mine if p.positive}
        shadowed = {sid for p, sid in mine if p.shadow}
        e: dict[str, Any] = {"scored": len(mine), "flagged": sum(p.positive for p, _ in mine),
                             "shadow": sum(p.shadow for p, _ in mine),
                             "studies": {"flagged": len(flagged), "negative": len(scored_studies - flagged - shadowed)}}
        cells = {"true_positive": 0, "false_negative": 0, "true_negative": 0, "false_positive": 0}
        for sid in scored_studies & set(truth):
            cells[{(True, True): "true_positive", (False, True): "false_negative", (False, False): "true_negative",
                   (True, False): "false_positive"}[(sid in flagged, truth[sid])]] += 1
        e["ris_labelled"] = cells
        reads = [i for i in items if i.kind == "flag" and i.study_id in flagged
                 and i.status in (WorklistStatus.COMPLETED.value, WorklistStatus.CANCELED.value)]
        done = [i for i in reads if i.status == WorklistStatus.COMPLETED.value]
        e["canceled"] = len(reads) - len(done)
        e["completed"] = {"pneumonia": sum(i.finding == Finding.PNEUMONIA.value for i in done),
                          "no_pneumonia": sum(i.finding == Finding.NO_PNEUMONIA.value for i in done)}
        e["completed"]["other"] = len(done) - sum(e["completed"].values())
        audits = [i for i in items if i.kind == "audit" and i.study_id in scored_studies]
        audits_done = [i for i in audits if i.status == WorklistStatus.COMPLETED.value]
        e["audit"] = {"sampled": len(audits), "completed": len(audits_done),
                      "pneumonia": sum(i.finding == Finding.PNEUMONIA.value for i in audits_done)}
        latest = sorted((i for i in done if i.completed_at is not None), key=lambda i: i.completed_at,
                        reverse=True)[:times_of]
        t = [(i.completed_at - received[i.study_id]).total_seconds() for i in latest]
        e["receipt_to_completion_s"] = {"p50": round(float(np.percentile(t, 50)), 1) if t else None,
                                        "p95": round(float(np.percentile(t, 95)), 1) if t else None, "n": len(t)}
        out[pair] = e
    return out


def _picked(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("scored", "flagged", "shadow", "studies", "ris_labelled", "canceled", "completed",
                                  "audit", "receipt_to_completion_s")}


def test_live_figures_equal_a_reference_from_the_rows(sessions, monkeypatch) -> None:  # noqa: ANN001
    now = utcnow()
    _history(sessions, now)
    monkeypatch.setattr(live, "TIMES_OF", 4)
    since = now - timedelta(days=20)
    with sessions() as s:
        out = live_stats(s, since=since, now=now)
    total, window = _reference(sessions, None, 4), _reference(sessions, since, 4)
    assert {(m["model_id"], m["calibration"]) for m in out["models"]} == set(PAIRS) == set(total)
    for m in out["models"]:
        pair = (m["model_id"], m["calibration"])
        assert _picked(m) == total[pair], pair
        assert _picked(m["window"]) == window.get(pair, _picked(m["window"])), pair
        assert m["window"]["scored"] == (window[pair]["scored"] if pair in window else 0)
    # the random history exercises what it should: windows cut, the times list is cut at TIMES_OF
    assert any(total[p]["scored"] > window.get(p, {"scored": 0})["scored"] > 0 for p in PAIRS)
    assert any(total[p]["receipt_to_completion_s"]["n"] == 4 for p in PAIRS)
    assert any(total[p]["studies"]["negative"] and total[p]["audit"]["sampled"] for p in PAIRS)


def test_study_scores_equal_a_rebuild_and_the_migration(sessions) -> None:  # noqa: ANN001
    _history(sessions, utcnow(), seed=8)

    def rows() -> list[tuple]:
        with sessions() as s:
            return sorted(tuple(r) for r in s.execute(select(
                StudyScore.study_id, StudyScore.model_id, StudyScore.calibration, StudyScore.last_scored_at,
                StudyScore.last_positive_at, StudyScore.last_shadow_at, StudyScore.images,
                StudyScore.positive_images, StudyScore.shadow_images)))

    kept = rows()
    assert len(kept) >= 80 and any(r[4] is None for r in kept) and any(r[5] is not None for r in kept)
    with sessions.begin() as s:
        study_scores.rebuild(s.connection())
    assert rows() == kept
    engine = sessions.kw["bind"]
    migrations.downgrade(engine, "0015")
    migrations.upgrade(engine)
    assert rows() == kept
