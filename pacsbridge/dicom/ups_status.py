"""DIMSE status codes of the DICOM UPS face (PS3.4 CC.2, PS3.7 C) and the one table that answers each
refusal of the worklist life cycle (:mod:`pacsbridge.worklist.refusals`) with its status.

Change UPS State follows PS3.4 Table CC.1.1-2:

=======================  ==========  ===========  ==========  ==========
N-ACTION to              SCHEDULED   IN PROGRESS  COMPLETED   CANCELED
=======================  ==========  ===========  ==========  ==========
IN PROGRESS (claim)      claim       C302         C300        C300
COMPLETED                C310        C301 / C304  B306        C300
CANCELED                 C310        C301         C300        B304
SCHEDULED                C303        C303         C303        C303
=======================  ==========  ===========  ==========  ==========

(C301: the Transaction UID is not the one of the claim; C304: no finding was given with N-SET before
COMPLETED; 0x0124: the claim's Transaction UID from another user than the claimant; C310 also when the
caller's claim ran out.)  N-SET: C310 unless IN PROGRESS, C300 once COMPLETED/CANCELED, C301 for a
wrong or missing Transaction UID, 0x0106 for a finding pacsbridge does not know.  Unknown SOP
Instance UID: C307 everywhere.
"""

from __future__ import annotations

from pacsbridge.worklist.refusals import (
    AlreadyCanceled, AlreadyCompleted, CannotReschedule, ClaimConflict, ClaimExpired, FindingMissing,
    IllegalTransition, InvalidValue, ItemClosed, ItemNotFound, LifecycleError, NotClaimant, NotInProgress,
    NotPermitted, WrongTransaction,
)

# Status codes (PS3.4 CC.2, PS3.7 C)
SUCCESS = 0x0000
OPTIONAL_NOT_SUPPORTED = 0x0001  # warning: requested optional attributes are not supported
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
MISSING_ATTRIBUTE = 0x0120
SOP_CLASS_NOT_SUPPORTED = 0x0122
NO_SUCH_ACTION = 0x0123
NOT_AUTHORISED = 0x0124
INVALID_ARGUMENT_VALUE = 0x0115
OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
ALREADY_CANCELED = 0xB304
ALREADY_COMPLETED = 0xB306
MAY_NO_LONGER_BE_UPDATED = 0xC300
WRONG_TRANSACTION_UID = 0xC301
ALREADY_IN_PROGRESS = 0xC302
ONLY_NCREATE_SCHEDULES = 0xC303
FINAL_STATE_NOT_MET = 0xC304
NO_SUCH_UPS = 0xC307
NOT_IN_PROGRESS = 0xC310
PENDING = 0xFF00
CANCEL = 0xFE00

#: The status each refusal of the life cycle is answered with, most specific first (PS3.4 CC.1.1-2, CC.2).
UPS_STATUS_OF_REFUSAL: tuple[tuple[type[LifecycleError], int], ...] = (
    (ItemNotFound, NO_SUCH_UPS),
    (AlreadyCompleted, ALREADY_COMPLETED),  # a warning: nothing changes
    (AlreadyCanceled, ALREADY_CANCELED),
    (ItemClosed, MAY_NO_LONGER_BE_UPDATED),
    (NotInProgress, NOT_IN_PROGRESS),
    (ClaimExpired, NOT_IN_PROGRESS),  # as good as scheduled again
    (CannotReschedule, ONLY_NCREATE_SCHEDULES),
    (IllegalTransition, MAY_NO_LONGER_BE_UPDATED),
    (ClaimConflict, ALREADY_IN_PROGRESS),
    (WrongTransaction, WRONG_TRANSACTION_UID),
    (NotPermitted, NOT_AUTHORISED),  # not for this user's role
    (NotClaimant, NOT_AUTHORISED),  # the lock's Transaction UID, from another user
    (FindingMissing, FINAL_STATE_NOT_MET),
    (InvalidValue, INVALID_ATTRIBUTE_VALUE),
    (LifecycleError, PROCESSING_FAILURE),
)


def ups_status_of(exc: LifecycleError) -> int:
    """The DIMSE status that answers this refusal."""
    return next(code for cls, code in UPS_STATUS_OF_REFUSAL if isinstance(exc, cls))
