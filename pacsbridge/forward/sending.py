"""What every sender shares: the outcome it reports per outbox entry, the sender protocol, and the
daemon's context (our AE title, the spool, the model for heatmaps, the TLS defaults).

Outcomes are ``sent``, ``transient`` (retry later) or ``permanent`` (dead).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..config import Destination
from ..imaging.limits import DEFAULT_MAX_DECODED_BYTES
from ..store.spool import OutsideSpool, contained_path
from .outbox import DueEntry
from .results import Result


class SendResult(str, enum.Enum):
    """What a sender reports for one outbox entry (the forwarder turns it into the entry's next state)."""

    SENT = "sent"              # acknowledged: the entry becomes sent
    TRANSIENT = "transient"    # try again later (backoff), dead after outbox_max_age_hours
    PERMANENT = "permanent"    # the peer or the object can never succeed: the entry becomes dead


SENT, TRANSIENT, PERMANENT = SendResult.SENT.value, SendResult.TRANSIENT.value, SendResult.PERMANENT.value


@dataclass(frozen=True)
class Outcome:
    entry_id: int
    state: str  # a SendResult value
    detail: str = ""
    object_uid: str | None = None


Report = Callable[[Outcome], None]


class Sender(Protocol):
    def send(self, destination: Destination, entries: list[DueEntry], report: Report) -> None: ...


class PermanentError(Exception):
    """The object can never be built or sent as configured (dead at once)."""


@dataclass
class ForwardContext:
    """What senders need from the daemon: our AE title, the spool, and (for heatmaps) the model."""

    ae_title: str
    spool_dir: Path
    load_model: Callable[[], Any] | None = None  # -> LoadedModel, called once on the first heatmap
    # For destinations with tls = true: the lowest version offered, and the CA bundle and client
    # certificate used where a destination names none of its own (dicom_tls_ca, dicom_tls_client_*).
    tls_min_version: str = "1.2"
    tls_ca: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    #: Heatmaps decode the source within this (the worker's max_decoded_bytes).
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    _model: Any = field(default=None, repr=False)

    def source_path(self, result: Result) -> Path:
        if result.spool_deleted:
            raise PermanentError("the source image was deleted by retention")
        try:
            path = contained_path(self.spool_dir, result.file_path)
        except OutsideSpool:
            path = None
        if path is None or not path.is_file():
            raise PermanentError("the source image is missing from the spool")
        return path

    def model(self) -> Any:
        if self._model is None:
            if self.load_model is None:
                raise PermanentError("no model is configured for heatmaps")
            self._model = self.load_model()
        return self._model
