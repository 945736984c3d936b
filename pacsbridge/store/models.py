"""SQLAlchemy 2 models.  One migration in ``pacsbridge/migrations/versions`` per change here."""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    Boolean, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint,
)
from sqlalchemy import false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names so Alembic migrations are reproducible on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(dt: datetime | None) -> datetime | None:
    """``dt`` as an aware UTC datetime (a naive one is taken to be UTC, as everything stored is)."""
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp that is always an aware UTC datetime in Python, on every backend.

    SQLite keeps no time zone and hands back naive datetimes; PostgreSQL hands back the session's
    zone. Both come back as UTC here, so no stage has to normalise what it reads."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        return as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        return as_utc(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class InstanceState(str, enum.Enum):
    """Where an instance is on its way through pacsbridge (pacsbridge.store.queue is the one state machine)."""

    RECEIVED = "received"          # on disk and recorded; waiting for the inference worker
    PROCESSING = "processing"      # claimed by a worker
    PREDICTED = "predicted"        # a prediction row exists
    NOT_ANALYSED = "not_analysed"  # the image itself was refused (scope, data, size, quality); reason recorded
    FAILED = "failed"              # a fault of the system (missing file, crash); retried, reason recorded


class WorklistStatus(str, enum.Enum):
    """Life cycle of a worklist item (pacsbridge.worklist.lifecycle is the one state machine)."""

    SCHEDULED = "scheduled"        # waiting for a reader; its priority ages
    IN_PROGRESS = "in_progress"    # claimed by one reader until claim_expires_at
    COMPLETED = "completed"        # read, with a finding
    CANCELED = "canceled"          # withdrawn by an admin (or the UPS performer), with a reason


class Finding(str, enum.Enum):
    """What the radiologist found when completing an item."""

    PNEUMONIA = "pneumonia"
    NO_PNEUMONIA = "no_pneumonia"
    OTHER = "other"


class OutboxState(str, enum.Enum):
    """Where a result is on its way to one destination (pacsbridge.forward.outbox is the one state machine)."""

    PENDING = "pending"            # due now or at next_attempt_at (after a transient failure)
    SENT = "sent"                  # the peer acknowledged it
    DEAD = "dead"                  # refused for good, or still failing after outbox_max_age_hours


class Role(str, enum.Enum):
    """Roles of API users: admin may do everything, radiologist works the worklist, monitor reads metrics/stats."""

    ADMIN = "admin"
    RADIOLOGIST = "radiologist"
    MONITOR = "monitor"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))  # PHI: never log at INFO
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)  # RIS labels match on it
    study_date: Mapped[str | None] = mapped_column(String(8))
    requested_priority: Mapped[str | None] = mapped_column(String(16))  # e.g. STAT, HIGH, ROUTINE
    # Shown to the reader on the worklist (PHI: never log at INFO); from the first instance received.
    patient_name: Mapped[str | None] = mapped_column(String(200))
    patient_age: Mapped[str | None] = mapped_column(String(4))  # DICOM AS, e.g. 045Y
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: A negative study drawn for a blinded audit read: ``sampled`` (an audit item was made) or ``capped``
    #: (the day's audit_max_per_day was reached); NULL = never drawn.  Decided once (pacsbridge.worklist.audit).
    audit_decision: Mapped[str | None] = mapped_column(String(8))

    series: Mapped[list["Series"]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"
    # Weekly received/refused counts from the index alone (pacsbridge.validation.weekly).
    __table_args__ = (Index("ix_instances_received_state", "received_at", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(String(255))  # relative to the spool dir; built from hashes
    file_size: Mapped[int] = mapped_column(Integer)
    # Set when retention deleted the spool file (file_path is kept for the audit trail); None = file kept.
    spool_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=InstanceState.RECEIVED.value, index=True)
    state_reason: Mapped[str | None] = mapped_column(Text)
    # Every reason of a refusal as JSON [{"code", "text"}]; valid while its texts join to state_reason.
    state_reasons: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The claim holds until then (renewed by the holder's heartbeat); NULL for claims made before leases.
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Failed attempts (faults of the system) since it was received or last queued again by hand.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When a failed instance is tried again; NULL when no automatic retry is left (or not failed).
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    last_error: Mapped[str | None] = mapped_column(Text)  # reason of the last failed attempt (kept after success)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")
    prediction: Mapped["Prediction | None"] = relationship(back_populates="instance")


class Prediction(Base):
    __tablename__ = "predictions"
    # Counts per week, model and calibration from the index alone (/api/stats, its weekly figures).
    __table_args__ = (Index("ix_predictions_created_model", "created_at", "model_id", "calibration", "positive",
                            "shadow"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), unique=True)
    probability: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool] = mapped_column(Boolean)
    threshold: Mapped[float] = mapped_column(Float)
    model_id: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    decode_ms: Mapped[float | None] = mapped_column(Float)
    inference_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    #: The model's out-of-distribution score (pacsbridge.model.ood); NULL when the model has none.
    ood_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Which operating point decided: ``model`` (the card's) or a site calibration id (pacsbridge.validation).
    calibration: Mapped[str] = mapped_column(String(32), default="model", server_default="model")
    #: Made in shadow mode (``mode = "shadow"``): recorded and counted, never a worklist item or outbox entry.
    shadow: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    instance: Mapped[Instance] = relationship(back_populates="prediction")


class StudyScore(Base):
    """What one (model, calibration) made of one study, kept up to date as predictions are recorded
    (pacsbridge.store.study_scores): the live and weekly figures count studies from these rows
    instead of grouping every prediction by study.  Predictions are never changed or deleted, so these rows
    only move forward."""

    __tablename__ = "study_scores"
    # Study and image counts per model and calibration, in total and since a date, from the index alone.
    __table_args__ = (Index("ix_study_scores_model", "model_id", "calibration", "last_scored_at", "last_positive_at",
                            "last_shadow_at", "images", "positive_images", "shadow_images"),
                      # SQLite: the row lives in its primary-key b-tree, so a lookup by study is one search
                      {"sqlite_with_rowid": False})

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    calibration: Mapped[str] = mapped_column(String(32), primary_key=True)
    first_scored_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_scored_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: First and latest predictions of the study that were positive (it is flagged); NULL: none was.
    first_positive_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_positive_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: Latest prediction made in shadow mode; NULL: none was.
    last_shadow_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: Predictions of the study by this (model, calibration): all, positive, in shadow mode.
    images: Mapped[int] = mapped_column(Integer, default=0)
    positive_images: Mapped[int] = mapped_column(Integer, default=0)
    shadow_images: Mapped[int] = mapped_column(Integer, default=0)


class WorklistItem(Base):
    """A study with a positive prediction, on the radiologists' queue (also a DICOM UPS instance).

    A study has at most one open (scheduled or in_progress) item: ``open_study_id`` equals
    ``study_id`` while the item is open and is NULL once it is completed or canceled, and it is
    unique.  A study that gets new positive images after its item was closed opens a NEW item (the
    closed one keeps its finding).
    """

    __tablename__ = "worklist_items"
    # The latest completed items, newest first, without a sort (receipt-to-read times in /api/stats).
    __table_args__ = (Index("ix_worklist_items_status_completed_at", "status", "completed_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    open_study_id: Mapped[int | None] = mapped_column(Integer, unique=True)
    ups_uid: Mapped[str] = mapped_column(String(64), unique=True)  # UPS SOP Instance UID
    priority: Mapped[float] = mapped_column(Float, index=True)
    #: ``flag`` (scored positive) or ``audit`` (scored negative, sampled for a blinded read; pacsbridge.worklist.audit).
    kind: Mapped[str] = mapped_column(String(8), default="flag", server_default="flag", index=True)
    probability: Mapped[float] = mapped_column(Float)  # highest calibrated probability in the study
    status: Mapped[str] = mapped_column(String(16), default=WorklistStatus.SCHEDULED.value, index=True)
    first_positive_at: Mapped[datetime] = mapped_column(UTCDateTime())  # first positive prediction recorded
    claimed_by: Mapped[str | None] = mapped_column(String(64))  # user name (UPS: the user the AE title is bound to)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    transaction_uid: Mapped[str | None] = mapped_column(String(64))  # UPS Transaction UID of the claim
    finding: Mapped[str | None] = mapped_column(String(16))  # Finding values
    comment: Mapped[str | None] = mapped_column(Text)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # completed or canceled
    completed_by: Mapped[str | None] = mapped_column(String(64))
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    # The holder's draft (UPS N-SET) under the current claim; cleared when the claim ends.
    draft_finding: Mapped[str | None] = mapped_column(String(16))
    draft_comment: Mapped[str | None] = mapped_column(Text)
    draft_cancel_reason: Mapped[str | None] = mapped_column(Text)
    draft_by: Mapped[str | None] = mapped_column(String(64))
    draft_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    study: Mapped[Study] = relationship()


class Event(Base):
    """Audit trail: what happened, to what, and why (rejections, failures, state changes)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)  # e.g. association_rejected, store_failed
    level: Mapped[str] = mapped_column(String(8), default="info")
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id", ondelete="SET NULL"))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    peer: Mapped[str | None] = mapped_column(String(64))  # calling AE @ address
    detail: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(64))  # user name that caused it (UPS: the bound user)
    worklist_item_id: Mapped[int | None] = mapped_column(
        ForeignKey("worklist_items.id", ondelete="SET NULL"), index=True)


class User(Base):
    """A person (or script) using the HTTP API; authenticates with API tokens."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # Role values
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    tokens: Mapped[list["ApiToken"]] = relationship(back_populates="user")
    ae_bindings: Mapped[list["UserAeBinding"]] = relationship(back_populates="user")


class ApiToken(Base):
    """An API token; only its SHA-256 is stored (the token itself is shown once)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship(back_populates="tokens")


class UserAeBinding(Base):
    """A DICOM calling AE title that acts as a user (DICOM UPS); owned by pacsbridge/auth/users.py."""

    __tablename__ = "user_ae_bindings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True)  # at most one user per AE title
    # Required client certificate subject (RFC 4514 text) when set: the station must use mutual TLS.
    tls_subject: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    user: Mapped[User] = relationship(back_populates="ae_bindings")


class OutboxEntry(Base):
    """One result object for one destination (pending -> sent | dead); owned by pacsbridge/forward/outbox.py."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("prediction_id", "destination", "object", name="uq_outbox_result_object"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)  # a [[destinations]] name
    object: Mapped[str] = mapped_column(String(16))  # sr | heatmap | images | oru
    state: Mapped[str] = mapped_column(String(8), default=OutboxState.PENDING.value, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    object_uid: Mapped[str | None] = mapped_column(String(64))  # SOP Instance UID or HL7 message control id
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # When it last became pending (creation or a manual retry); the max-age limit counts from here.
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The node sending it and until when that claim holds (several nodes: see forward/outbox.py).
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())


class SchedulerLeader(Base):
    """The node holding the scheduler's advisory lock (at most one row, id 1); owned by store/leader.py."""

    __tablename__ = "scheduler_leader"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(200))  # hostname:pid:uuid:machine of the leading process
    since: Mapped[datetime] = mapped_column(UTCDateTime())
    backend_pid: Mapped[int | None] = mapped_column(Integer)  # PostgreSQL session holding the lock


class Label(Base):
    """Ground truth for a study from the RIS (``pacsbridge labels import``); owned by pacsbridge/monitoring/labels.py.

    One row per study key (``uid:<Study Instance UID>`` or ``acc:<Accession Number>``) and source
    file, so importing a file again changes nothing.  ``study_id`` is NULL until the study arrives.
    Reader findings are not copied here: completed worklist items are labels where they are.
    """

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("source", "study_key", name="uq_labels_source_study_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(200))  # the file name it came from
    study_key: Mapped[str] = mapped_column(String(80))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    finding: Mapped[str] = mapped_column(String(16))  # Finding values
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="SET NULL"), index=True)
    imported_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Worker(Base):
    """One start of an inference worker (``serve`` or ``pacsbridge worker``); owned by pacsbridge/store/workers.py."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # host:pid:uuid, as in instances.claimed_by
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    #: Where ``pid`` means something: host, boot and pid namespace (pacsbridge.store.workers.machine_id);
    #: NULL where it cannot be told (not Linux, rows from before it was recorded).
    machine: Mapped[str | None] = mapped_column(String(64), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))  # serve | worker
    batch_size: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # a clean stop; NULL otherwise


class ClusterIdentity(Base):
    """One row: the cluster id the spool marker must carry (pacsbridge/store/spool_marker.py)."""

    __tablename__ = "cluster_identity"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    cluster_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
