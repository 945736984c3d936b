"""Understand a received dataset without decoding its pixels.

``read_metadata`` checks that the encoded bytes are complete and well framed, that they match the
C-STORE request (SOP Class/Instance), that the UIDs are valid, and pulls the few attributes the
database needs.  Problems raise :class:`RejectedDataset` carrying the DIMSE status to answer with.
"""

from __future__ import annotations

import re
import warnings
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

# C-STORE failure statuses (PS3.4 Annex B.2.3).
STATUS_OUT_OF_RESOURCES = 0xA700      # disk trouble
STATUS_OUT_OF_RESOURCES_DB = 0xA701   # database trouble (still "Refused: Out of Resources")
STATUS_DATASET_TOO_LARGE = 0xA702     # data set (or its inflated form) above our limit: out of resources
STATUS_DOES_NOT_MATCH = 0xA900        # dataset does not match SOP class
STATUS_CANNOT_UNDERSTAND = 0xC000     # unparseable / truncated
STATUS_BAD_UID = 0xC001               # a UID we must store is missing or invalid

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
#: Default cap on an inflated Deflated Explicit VR Little Endian data set (config max_inflated_bytes).
DEFAULT_MAX_INFLATED_BYTES = 128 * 1024 * 1024


class RejectedDataset(Exception):
    """The dataset cannot be stored; ``status`` is the DIMSE failure status to return."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class InstanceMeta:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part: str | None
    patient_id: str | None  # PHI: never log at INFO
    accession_number: str | None
    study_date: str | None
    requested_priority: str | None
    # Shown to readers on the worklist (PHI: never log at INFO).
    patient_name: str | None = None
    patient_age: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_description: str | None = None
    referring_physician: str | None = None

    def study_fields(self) -> dict[str, str]:
        """The study's display fields that are present (for :class:`pacsbridge.store.models.Study`)."""
        return {k: v for k in STUDY_DISPLAY_FIELDS if (v := getattr(self, k))}


STUDY_DISPLAY_FIELDS = ("patient_name", "patient_age", "patient_birth_date", "patient_sex", "study_description",
                        "referring_physician")


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def read_metadata(body: bytes, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str, *,
                  max_inflated: int = DEFAULT_MAX_INFLATED_BYTES) -> InstanceMeta:
    """Validate the encoded dataset ``body`` (no file meta) and return what the database needs.

    ``sop_class_uid``/``sop_instance_uid`` are the values from the C-STORE request.  A deflated data
    set is inflated up to ``max_inflated`` bytes (a zip bomb is refused with 0xA702).
    """
    ts = UID(transfer_syntax)
    for name, uid in (("Affected SOP Class UID", sop_class_uid), ("Affected SOP Instance UID", sop_instance_uid)):
        if not is_valid_uid(uid):
            raise RejectedDataset(STATUS_BAD_UID, f"request {name} is not a valid UID")

    plain = _inflate(body, max_inflated) if ts == DeflatedExplicitVRLittleEndian else body
    tags = _check_framing(plain, ts)
    try:
        ds = _parse_without_pixels(plain, ts)
        meta = _extract(ds, ts, sop_class_uid, sop_instance_uid)
    except RejectedDataset:
        raise
    except Exception as exc:  # noqa: BLE001 - anything pydicom cannot read is "cannot understand"
        raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}: {exc}") from exc

    if _PIXEL_DATA not in tags:
        raise RejectedDataset(STATUS_DOES_NOT_MATCH, "image SOP class but the dataset has no Pixel Data")
    return meta


def _inflate(body: bytes, limit: int = DEFAULT_MAX_INFLATED_BYTES) -> bytes:
    """Inflate a deflated data set, never producing more than ``limit`` bytes (decompression bombs)."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)  # max_length: zlib stops there, whatever the input claims
        if len(out) <= limit and not d.eof:
            out += d.flush()
    except zlib.error as exc:
        raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, f"deflated dataset does not inflate: {exc}") from exc
    if len(out) > limit:
        raise RejectedDataset(STATUS_DATASET_TOO_LARGE,
                              f"deflated data set inflates to more than max_inflated_bytes ({limit})")
    if not d.eof:
        raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, "deflated dataset is truncated")
    return out


def _encoding(ts: UID) -> tuple[bool, bool]:
    """(is_implicit_VR, is_little_endian) of a transfer syntax's dataset encoding."""
    if ts == ImplicitVRLittleEndian:
        return True, True
    if ts == ExplicitVRBigEndian:
        return False, False
    return False, True


def _check_framing(plain: bytes, ts: UID) -> set[int]:
    """Walk the top-level elements; every declared length must be present.  Returns the tags seen.

    pydicom is lenient with truncated input (it returns short values), so check it here: a dataset
    cut off mid-transfer must never be acknowledged.
    """
    implicit, little = _encoding(ts)
    tags: set[int] = set()
    total = len(plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # defer_size: large values are skipped (seeked over), not copied; check their extent instead.
            for elem in data_element_generator(BytesIO(plain), implicit, little, defer_size=4096):
                tags.add(int(elem.tag))
                # Sequences come back parsed (no .length); other values must fit in what was received.
                length = getattr(elem, "length", _UNDEFINED)
                if length == _UNDEFINED:
                    continue
                value = elem.value
                have = len(value) if isinstance(value, (bytes, bytearray)) else max(0, total - elem.value_tell)
                if value is None or isinstance(value, (bytes, bytearray)):
                    if have < length:
                        raise RejectedDataset(
                            STATUS_CANNOT_UNDERSTAND,
                            f"dataset truncated in element {elem.tag} ({have} of {length} bytes)",
                        )
        except RejectedDataset:
            raise
        except Exception as exc:  # noqa: BLE001
            raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, f"malformed dataset: {type(exc).__name__}: {exc}") from exc
    for w in caught:
        if "End of file" in str(w.message) or "delimiter" in str(w.message):
            raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, f"dataset truncated: {w.message}")
    if not tags:
        raise RejectedDataset(STATUS_CANNOT_UNDERSTAND, "empty dataset")
    return tags


def _parse_without_pixels(plain: bytes, ts: UID) -> Dataset:
    implicit, little = _encoding(ts)
    return read_dataset(BytesIO(plain), implicit, little, stop_when=_stop_at_pixels)


def _stop_at_pixels(tag: object, vr: object, length: object) -> bool:
    return int(tag) >= _PIXEL_DATA  # type: ignore[call-overload]


def _text(ds: Dataset, keyword: str, max_len: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    text = str(value).strip()
    return text[:max_len] or None


def _extract(ds: Dataset, ts: UID, sop_class_uid: str, sop_instance_uid: str) -> InstanceMeta:
    uids = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = ds.get(keyword)
        value = str(value).rstrip("\0 ") if value is not None else None
        if not is_valid_uid(value):
            raise RejectedDataset(STATUS_BAD_UID, f"{keyword} is missing or not a valid UID")
        uids[keyword] = value
    if uids["SOPClassUID"] != sop_class_uid:
        raise RejectedDataset(STATUS_DOES_NOT_MATCH, "dataset SOP Class UID differs from the C-STORE request")
    if uids["SOPInstanceUID"] != sop_instance_uid:
        raise RejectedDataset(STATUS_DOES_NOT_MATCH, "dataset SOP Instance UID differs from the C-STORE request")

    priority = _text(ds, "RequestedProcedurePriority", 16)
    if priority is None:
        for item in ds.get("RequestAttributesSequence", None) or []:
            priority = _text(item, "RequestedProcedurePriority", 16)
            if priority:
                break

    return InstanceMeta(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=str(ts),
        modality=_text(ds, "Modality", 16),
        body_part=_text(ds, "BodyPartExamined", 64),
        patient_id=_text(ds, "PatientID", 64),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        requested_priority=priority.upper() if priority else None,
        patient_name=_text(ds, "PatientName", 200),
        patient_age=_text(ds, "PatientAge", 4),
        patient_birth_date=_text(ds, "PatientBirthDate", 8),
        patient_sex=_text(ds, "PatientSex", 16),
        study_description=_text(ds, "StudyDescription", 64),
        referring_physician=_text(ds, "ReferringPhysicianName", 200),
    )
