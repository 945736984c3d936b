"""What the builders need to know about one result (a prediction of one instance), and its stable UIDs.

A result's objects keep their UIDs however often they are built or sent (after a crash, a retry, a
``pacsbridge outbox retry``): each UID is derived from the source SOP Instance UID, the model's
weights hash and the object kind, so a receiver that already has the object de-duplicates it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydicom.uid import UID, generate_uid

#: pydicom's UID root for derived UIDs (``2.25`` would also do; this keeps them short enough).
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class Result:
    """One prediction, with what identifies its source image (read from the database)."""

    prediction_id: int
    probability: float
    positive: bool
    threshold: float
    model_id: str
    weights_sha256: str
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    file_path: str  # relative to the spool
    spool_deleted: bool = False
    #: The operating point that decided: ``model`` or a site calibration id.
    calibration: str = "model"

    @property
    def model_version(self) -> str:
        """``<model id> sha256:<first 16 hex digits of the weights>``: the algorithm version we report."""
        return f"{self.model_id} sha256:{self.weights_sha256[:16]}"

    def derived_uid(self, purpose: str) -> UID:
        """A UID that is always the same for this result and ``purpose`` (e.g. ``"sr"``, ``"sr-series"``)."""
        return generate_uid(UID_PREFIX, entropy_srcs=[
            "pacsbridge", purpose, self.sop_instance_uid, self.model_id, self.weights_sha256,
        ])

    def message_control_id(self, destination: str) -> str:
        """HL7 MSH-10 for this result's ORU (at most 20 characters, the same on every send)."""
        digest = hashlib.sha256(
            "|".join(["oru", destination, self.sop_instance_uid, self.weights_sha256]).encode()
        ).hexdigest()
        return "PB" + digest[:18].upper()


def device_uid(ae_title: str) -> UID:
    """The observer device UID of this pacsbridge node (stable for an AE title)."""
    return generate_uid(UID_PREFIX, entropy_srcs=["pacsbridge-device", ae_title])
