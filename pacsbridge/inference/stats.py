"""Timing percentiles of recent predictions, for ``pacsbridge status``."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..store.models import Instance, Prediction

#: Percentiles are over this many most recent predictions: recent behaviour, bounded cost.
RECENT = 1000


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(arr, 50)), 1), "p95": round(float(np.percentile(arr, 95)), 1)}


def timing_percentiles(session: Session, recent: int = RECENT) -> dict[str, Any]:
    """p50/p95 (ms) of decode, inference and store-to-prediction latency over the last ``recent`` predictions."""
    rows = session.execute(
        select(Prediction.decode_ms, Prediction.inference_ms, Prediction.created_at, Instance.received_at)
        .join(Instance, Instance.id == Prediction.instance_id)
        .order_by(Prediction.id.desc())
        .limit(recent)
    ).all()
    decode = [r[0] for r in rows if r[0] is not None]
    infer = [r[1] for r in rows if r[1] is not None]
    latency = [
        (created - received).total_seconds() * 1000 for _, _, created, received in rows
        if created is not None and received is not None
    ]
    return {
        "samples": len(rows),
        "decode_ms": _pct(decode),
        "inference_ms": _pct(infer),
        "store_to_prediction_ms": _pct(latency),
    }
