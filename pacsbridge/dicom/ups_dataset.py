"""Builders for the DICOM Unified Procedure Step (UPS) view of a worklist item, and the parser for
what a UPS performer sends back (PS3.4 Annex CC, PS3.3 C.30).

Pure functions over a small :class:`UpsRecord` (no database, no network), so they can be read and
tested alone; :mod:`pacsbridge.dicom.ups_scp` fills the records from the database.

How a worklist item looks as a UPS instance:

* SOP Class UID = UPS Push (every UPS instance is one, PS3.4 CC.1.1), SOP Instance UID = ``item.ups_uid``.
* Procedure Step State: scheduled -> SCHEDULED, in_progress -> IN PROGRESS, completed -> COMPLETED,
  canceled -> CANCELED.
* Scheduled Procedure Step Priority from the priority score (:func:`ups_priority`).
* Procedure Step Label names the AI finding and its probability (an audit item: "Quality audit (blinded
  read)", priority LOW, and no probability until it is completed); Scheduled Workitem Code = (110005, DCM,
  "Interpretation"); Scheduled Processing Parameters carry the probability as a numeric content item.
* Patient name/ID/birth date/sex, Study Instance UID, and the Referenced Request Sequence (accession
  number, study description); Input Information Sequence: one item per series with its SOP Class and
  Instance UIDs.
* Once a finding is known (N-SET while IN PROGRESS, or completed over HTTP): the UPS Performed
  Procedure Sequence with the finding as a CODE content item (concept name (121071, DCM, "Finding")) in
  Performed Processing Parameters and the comment in Comments on the Performed Procedure Step.

The Transaction UID is never part of these datasets: it is the performer's lock (PS3.4 CC.2.2.3).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from pacsbridge.store.models import Finding, WorklistStatus

#: Every UPS instance is an instance of the UPS Push SOP Class (PS3.4 CC.1.1).
UPS_PUSH_SOP_CLASS = UID("1.2.840.10008.5.1.4.34.6.1")

UPS_STATE_OF: dict[str, str] = {
    WorklistStatus.SCHEDULED.value: "SCHEDULED",
    WorklistStatus.IN_PROGRESS.value: "IN PROGRESS",
    WorklistStatus.COMPLETED.value: "COMPLETED",
    WorklistStatus.CANCELED.value: "CANCELED",
}

# -- priority ------------------------------------------------------------------------------------
#: Score bands of pacsbridge.worklist.priority.priority_score mapped to the three UPS priorities.
#: A fresh routine positive scores its probability (< 1.0) plus a waiting ramp (0..1); a HIGH order adds
#: 0.5, a STAT order 1.0, and an overdue item (waited ``priority_max_wait_minutes``) at least 4.0.
#: HIGH: >= 1.5 (every overdue item, STAT orders with p >= 0.5, p = 0.9 after 60% of the maximum wait);
#: MEDIUM: >= 1.0 (a HIGH order, a STAT order below p 0.5, or a routine positive that has waited);
#: LOW: below 1.0 (fresh routine positives).
UPS_HIGH_AT = 1.5
UPS_MEDIUM_AT = 1.0


def ups_priority(score: float) -> str:
    """Scheduled Procedure Step Priority (HIGH / MEDIUM / LOW) for a worklist priority score."""
    if score >= UPS_HIGH_AT:
        return "HIGH"
    if score >= UPS_MEDIUM_AT:
        return "MEDIUM"
    return "LOW"


# -- codes -----------------------------------------------------------------------------------------
#: Local coding scheme for the findings a radiologist records ("99" prefix = private, PS3.16 8.2).
FINDING_SCHEME = "99PACSBRIDGE"
FINDINGS: dict[str, str] = {Finding.PNEUMONIA.value: "Pneumonia", Finding.NO_PNEUMONIA.value: "No pneumonia",
                            Finding.OTHER.value: "Other finding"}
#: Other codes accepted for a finding (SNOMED CT "Pneumonia").
FINDING_ALIASES: dict[tuple[str, str], str] = {("SCT", "233604007"): Finding.PNEUMONIA.value,
                                               ("SRT", "D2-00100"): Finding.PNEUMONIA.value}
CONCEPT_FINDING = ("121071", "DCM", "Finding")
CONCEPT_PROBABILITY = ("PROB", FINDING_SCHEME, "AI probability of pneumonia")
WORKITEM_INTERPRETATION = ("110005", "DCM", "Interpretation")


def item(*elements: DataElement) -> Dataset:
    """A sequence item (or dataset) from ready elements: much faster than setting attributes one by one."""
    ds = Dataset()
    for elem in elements:
        ds.add(elem)
    return ds


def el(keyword: str, value: Any) -> DataElement:
    """An element by keyword, its VR from the dictionary (resolved once), values not re-validated: the
    builders below bound every length themselves, and building thousands of datasets per C-FIND with
    pydicom's per-value validation costs several milliseconds each."""
    tag, vr = _tag_vr(keyword)
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


@lru_cache(maxsize=None)
def _tag_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag, dictionary_VR(tag)


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    return item(el("CodeValue", value), el("CodingSchemeDesignator", scheme), el("CodeMeaning", meaning))


def finding_code(finding: str) -> Dataset:
    return code_item(finding, FINDING_SCHEME, FINDINGS[finding])


# -- the record the builders read ------------------------------------------------------------------
@dataclass(frozen=True)
class ReferencedSeries:
    series_instance_uid: str
    instances: tuple[tuple[str, str], ...]  # (SOP Class UID, SOP Instance UID)


@dataclass(frozen=True)
class PerformedData:
    """What a performer told us with N-SET (or what HTTP completion recorded)."""

    finding: str | None = None
    comment: str | None = None
    cancel_reason: str | None = None


@dataclass(frozen=True)
class UpsRecord:
    """One worklist item with its study, as much as the UPS datasets need."""

    ups_uid: str
    status: str  # WorklistStatus value
    priority: float
    probability: float
    scheduled_at: datetime  # when the item was created (the step was scheduled)
    modified_at: datetime
    study_instance_uid: str
    patient_name: str | None = None
    patient_id: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    requested_priority: str | None = None
    series: tuple[ReferencedSeries, ...] = ()
    claimed_at: datetime | None = None
    completed_at: datetime | None = None
    performed: PerformedData = field(default_factory=PerformedData)
    kind: str = "flag"  # "audit": a negative sampled for a blinded quality read (pacsbridge.worklist.audit)

    @property
    def blinded(self) -> bool:
        return self.kind == "audit" and self.status != WorklistStatus.COMPLETED.value


def dt_value(dt: datetime | None) -> str:
    """DICOM DT in UTC without offset (the dataset carries Timezone Offset From UTC +0000)."""
    if dt is None:
        return ""
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y%m%d%H%M%S")


def procedure_step_label(rec: UpsRecord) -> str:
    """LO (64 chars): the AI finding the radiologist is asked to read; for an audit, no score."""
    if rec.kind == "audit":
        return AUDIT_LABEL
    return f"AI: pneumonia suspected (p={rec.probability:.2f})"[:64]


AUDIT_LABEL = "Quality audit (blinded read): no AI score shown"


WORKLIST_LABEL = "pacsbridge AI triage"


def _progress(rec: UpsRecord) -> Sequence:
    if rec.status != WorklistStatus.CANCELED.value:
        return Sequence()
    return Sequence([item(
        el("ProcedureStepCancellationDateTime", dt_value(rec.completed_at or rec.modified_at)),
        el("ReasonForCancellation", (rec.performed.cancel_reason or "")[:1024]),
    )])


#: The UPS attributes pacsbridge knows (Table CC.2.5-3), in tag order, each built only when asked for.
_ATTRIBUTES: dict[str, Callable[[UpsRecord], Any]] = {
    "SpecificCharacterSet": lambda r: "ISO_IR 192",  # UTF-8: patient names may be anything
    "SOPClassUID": lambda r: UPS_PUSH_SOP_CLASS,
    "SOPInstanceUID": lambda r: r.ups_uid,
    "TimezoneOffsetFromUTC": lambda r: "+0000",
    "PatientName": lambda r: (r.patient_name or "")[:64 * 5],
    "PatientID": lambda r: (r.patient_id or "")[:64],
    "IssuerOfPatientID": lambda r: "",
    "PatientBirthDate": lambda r: r.patient_birth_date or "",
    "PatientSex": lambda r: (r.patient_sex or "")[:16],
    "StudyInstanceUID": lambda r: r.study_instance_uid,
    "AdmissionID": lambda r: "",
    "IssuerOfAdmissionIDSequence": lambda r: Sequence(),
    "ScheduledProcedureStepStartDateTime": lambda r: dt_value(r.scheduled_at),
    "ScheduledProcedureStepModificationDateTime": lambda r: dt_value(r.modified_at),
    "ScheduledWorkitemCodeSequence": lambda r: Sequence([code_item(*WORKITEM_INTERPRETATION)]),
    "InputInformationSequence": lambda r: Sequence(_input_items(r.study_instance_uid, r.series)),
    "ScheduledStationNameCodeSequence": lambda r: Sequence(),
    "ScheduledStationClassCodeSequence": lambda r: Sequence(),
    "ScheduledStationGeographicLocationCodeSequence": lambda r: Sequence(),
    "ScheduledHumanPerformersSequence": lambda r: Sequence(),
    "InputReadinessState": lambda r: "READY",
    "ReferencedRequestSequence": lambda r: Sequence([_request_item(r)]),
    "ProcedureStepState": lambda r: UPS_STATE_OF.get(r.status, r.status.upper().replace("_", " ")),
    "ProcedureStepProgressInformationSequence": _progress,
    "ScheduledProcedureStepPriority": lambda r: "LOW" if r.kind == "audit" else ups_priority(r.priority),
    "WorklistLabel": lambda r: WORKLIST_LABEL,
    "ProcedureStepLabel": procedure_step_label,
    "ScheduledProcessingParametersSequence": lambda r: Sequence(
        [] if r.blinded else [_probability_item(r.probability)]),
    "UnifiedProcedureStepPerformedProcedureSequence": lambda r: Sequence(
        [_performed_item(r)] if r.status != WorklistStatus.SCHEDULED.value and r.claimed_at is not None else []),
}
UPS_TAGS: frozenset[int] = frozenset(_tag_vr(k)[0] for k in _ATTRIBUTES)


def build_ups_dataset(rec: UpsRecord, only: Collection[int] | None = None) -> Dataset:
    """The UPS instance for ``rec``: every attribute pacsbridge knows, or only the top-level tags in ``only``
    (a C-FIND builds just the keys it was asked for)."""
    ds = Dataset()
    for keyword, build in _ATTRIBUTES.items():
        tag, vr = _tag_vr(keyword)
        if only is None or tag in only:
            ds.add(DataElement(tag, vr, build(rec), validation_mode=config.IGNORE))
    return ds


def _probability_item(probability: float) -> Dataset:
    return item(
        el("MeasurementUnitsCodeSequence", Sequence([code_item("1", "UCUM", "no units")])),
        el("ValueType", "NUMERIC"),
        el("ConceptNameCodeSequence", Sequence([code_item(*CONCEPT_PROBABILITY)])),
        el("NumericValue", f"{probability:.4f}"),
    )


def _input_items(study_uid: str, series: Iterable[ReferencedSeries]) -> list[Dataset]:
    return [
        item(
            el("ReferencedSOPSequence", Sequence([
                item(el("ReferencedSOPClassUID", sop_class), el("ReferencedSOPInstanceUID", sop_instance))
                for sop_class, sop_instance in s.instances
            ])),
            el("StudyInstanceUID", study_uid),
            el("SeriesInstanceUID", s.series_instance_uid),
            el("TypeOfInstances", "DICOM"),
        )
        for s in series
    ]


def _request_item(rec: UpsRecord) -> Dataset:
    elements = [
        el("AccessionNumber", (rec.accession_number or "")[:16]),
        el("StudyInstanceUID", rec.study_instance_uid),
        el("RequestedProcedureDescription", (rec.study_description or "")[:64]),
        el("RequestedProcedureCodeSequence", Sequence()),
        el("RequestedProcedureID", ""),
        el("IssuerOfAccessionNumberSequence", Sequence()),
    ]
    if rec.requested_priority:
        elements.append(el("RequestedProcedurePriority", rec.requested_priority[:16]))
    return item(*elements)


def _performed_item(rec: UpsRecord) -> Dataset:
    params = []
    if rec.performed.finding in FINDINGS:
        params.append(item(
            el("ValueType", "CODE"),
            el("ConceptNameCodeSequence", Sequence([code_item(*CONCEPT_FINDING)])),
            el("ConceptCodeSequence", Sequence([finding_code(rec.performed.finding)])),
        ))
    elements = [
        el("ActualHumanPerformersSequence", Sequence()),
        el("PerformedStationNameCodeSequence", Sequence()),
        el("PerformedProcedureStepStartDateTime", dt_value(rec.claimed_at)),
        el("PerformedWorkitemCodeSequence", Sequence([code_item(*WORKITEM_INTERPRETATION)])),
        el("PerformedProcessingParametersSequence", Sequence(params)),
        el("PerformedProcedureStepEndDateTime", dt_value(rec.completed_at) if rec.status == WorklistStatus.COMPLETED.value else ""),
        el("OutputInformationSequence", Sequence()),
    ]
    if rec.performed.comment:
        elements.append(el("CommentsOnThePerformedProcedureStep", rec.performed.comment[:10240]))
    return item(*elements)


# -- what the performer sends ----------------------------------------------------------------------
class InvalidPerformedData(ValueError):
    """The N-SET Modification List holds a value pacsbridge cannot take (answered 0x0106)."""


#: Attributes an N-SET may carry that pacsbridge reads; anything else is ignored and answered with the
#: warning 0x0001 "Requested optional Attributes are not supported".
NSET_ACCEPTED = {"TransactionUID", "UnifiedProcedureStepPerformedProcedureSequence",
                 "ProcedureStepProgressInformationSequence", "SpecificCharacterSet"}


def parse_performed_data(mods: Dataset) -> tuple[PerformedData, list[str]]:
    """Read the finding, comment and cancellation reason from an N-SET Modification List.

    Returns the data and the keywords of attributes that were ignored.  The finding is a CODE content
    item with concept name (121071, DCM, "Finding") in the Performed Processing Parameters Sequence of the
    (first) UPS Performed Procedure Sequence item, or a finding code in its Performed Workitem Code
    Sequence; codes are (pneumonia | no_pneumonia | other, 99PACSBRIDGE) or (233604007, SCT) for pneumonia.
    """
    ignored = [elem.keyword or str(elem.tag) for elem in mods if elem.keyword not in NSET_ACCEPTED]
    finding = comment = reason = None
    performed = mods.get("UnifiedProcedureStepPerformedProcedureSequence")
    if performed:
        item = performed[0]
        for content in item.get("PerformedProcessingParametersSequence", []):
            names = content.get("ConceptNameCodeSequence", [])
            name = (str(names[0].get("CodeValue", "")), str(names[0].get("CodingSchemeDesignator", ""))) if names \
                else ("", "")
            if name != CONCEPT_FINDING[:2]:
                continue
            if content.get("ValueType") == "CODE" and content.get("ConceptCodeSequence"):
                finding = _finding_from_code(content.ConceptCodeSequence[0])
            elif content.get("ValueType") == "TEXT":
                text = str(content.get("TextValue", "")).strip().lower()
                if text not in FINDINGS:
                    raise InvalidPerformedData(f"finding text {text!r} is not one of {', '.join(FINDINGS)}")
                finding = text
        if finding is None:
            for code in item.get("PerformedWorkitemCodeSequence", []):
                if str(code.get("CodingSchemeDesignator", "")) == FINDING_SCHEME:
                    finding = _finding_from_code(code)
        if "CommentsOnThePerformedProcedureStep" in item:
            comment = str(item.CommentsOnThePerformedProcedureStep or "")
    progress = mods.get("ProcedureStepProgressInformationSequence")
    if progress:
        p = progress[0]
        reason = str(p.get("ReasonForCancellation", "") or "") or None
        if reason is None and p.get("ProcedureStepDiscontinuationReasonCodeSequence"):
            reason = str(p.ProcedureStepDiscontinuationReasonCodeSequence[0].get("CodeMeaning", "")) or None
    return PerformedData(finding=finding, comment=comment, cancel_reason=reason), ignored


def _finding_from_code(code: Dataset) -> str:
    value = str(code.get("CodeValue", "")).strip()
    scheme = str(code.get("CodingSchemeDesignator", "")).strip()
    if scheme == FINDING_SCHEME and value in FINDINGS:
        return value
    if (scheme, value) in FINDING_ALIASES:
        return FINDING_ALIASES[(scheme, value)]
    raise InvalidPerformedData(f"finding code ({value}, {scheme}) is not a pacsbridge finding "
                               f"({', '.join(FINDINGS)} in {FINDING_SCHEME}, or 233604007 in SCT)")
