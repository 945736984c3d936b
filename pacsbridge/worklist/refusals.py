"""Why the worklist life cycle refused a transition: one class per reason.

:mod:`pacsbridge.worklist.lifecycle` raises these; each face maps them to its own answer (the DICOM
UPS face to a DIMSE status, the HTTP API to 403/404/409/422) and keeps no state rules of its own.
Every refusal carries the item id and its current state (``None`` when there is no such item, or for
a value refused before the item was read), and its message names both, never patient data.

    LifecycleError                 a transition failed (also: the row kept changing under us)
    +-- ItemNotFound (NotFound)    no item with that id / UPS SOP Instance UID
    +-- IllegalTransition          not from this state
    |   +-- NotInProgress          it must be claimed first (scheduled)
    |   +-- ItemClosed             completed or canceled: may no longer be updated
    |   |   +-- AlreadyCompleted   asked to complete a completed item
    |   |   +-- AlreadyCanceled    asked to cancel a canceled item
    |   +-- CannotReschedule       only the model schedules an item (UPS: no N-ACTION to SCHEDULED)
    +-- ClaimConflict              someone (UPS: even the caller) holds a running claim
    +-- NotClaimant                the claim is someone else's
    |   +-- NotPermitted           the caller's role may not do this (e.g. cancel, unless admin)
    +-- WrongTransaction           the Transaction UID is not the claim's (or none was given)
    +-- ClaimExpired               the caller's claim ran out (the item is as good as scheduled)
    +-- FindingMissing             completing a UPS before a finding was given
    +-- InvalidValue               a finding we do not know, an empty reason, a bad timeout
"""

from __future__ import annotations


class LifecycleError(Exception):
    """A transition was refused; the message names the item and its current state."""

    def __init__(self, message: str, item_id: int | None = None, current: str | None = None) -> None:
        super().__init__(message)
        self.item_id = item_id
        self.current = current


class ItemNotFound(LifecycleError):
    pass


NotFound = ItemNotFound


class IllegalTransition(LifecycleError):
    """E.g. "item 12 is completed; cannot claim it"."""


class NotInProgress(IllegalTransition):
    """The item is scheduled: claim it first."""


class ItemClosed(IllegalTransition):
    """The item is completed or canceled."""


class AlreadyCompleted(ItemClosed):
    pass


class AlreadyCanceled(ItemClosed):
    pass


class CannotReschedule(IllegalTransition):
    """Only the worklist scheduler opens items; a performer gives one back by releasing it."""


class ClaimConflict(LifecycleError):
    """Someone else holds the claim (``holder``)."""

    def __init__(self, message: str, item_id: int | None = None, current: str | None = None,
                 holder: str = "") -> None:
        super().__init__(message, item_id, current)
        self.holder = holder


class NotClaimant(LifecycleError):
    """Release/complete/cancel by someone who neither holds the claim nor is an admin."""

    def __init__(self, message: str, item_id: int | None = None, current: str | None = None,
                 holder: str | None = None) -> None:
        super().__init__(message, item_id, current)
        self.holder = holder


class NotPermitted(NotClaimant):
    """Not for the caller's role, whoever holds the claim (only an admin may cancel an item)."""


class WrongTransaction(LifecycleError):
    """A Transaction UID was given (UPS) and differs from the item's."""


class ClaimExpired(LifecycleError):
    """The caller held the claim, but it ran out before the scheduler returned the item."""


class FindingMissing(LifecycleError):
    """A UPS performer asked to complete before giving a finding with N-SET."""


class InvalidValue(LifecycleError):
    """A finding outside the known findings, an empty cancel reason, a bad timeout."""
