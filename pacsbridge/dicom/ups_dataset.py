"""Builders for the DICOM Unified Procedure Step (UPS) view of a worklist item, and the parser for
what a UPS performer sends back (PS3.4 Annex CC, PS3.3 C.30).

Pure functions over a small :class:`UpsRecord` (no database, no network), so they can be read and
tested alone; :mod:`pacsbridge.dicom.ups_scp` fills the records from the database.

How a worklist item looks as a UPS instance:

* SOP Class UID = UPS Push (every UPS instance is one, PS3.4 CC.1.1), SOP Instance UID = ``item.ups_uid``.
* Procedure Step State: scheduled -> SCHEDULED, in_progress -> IN PROGRESS, completed -> COMPLETED,
  canceled -> CANCELED.
* Scheduled Procedure Step Priority from the priority score (:func:`ups_priority`).
* Procedure Step Label names the AI finding and its probability; Scheduled Workitem Code = (110005, DCM,
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

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

#: Every UPS instance is an instance of the UPS Push SOP Class (PS3.4 CC.1.1).
UPS_PUSH_SOP_CLASS = UID("1.2.840.10008.5.1.4.34.6.1")

UPS_STATE_OF: dict[str, str] = {
    "scheduled": "SCHEDULED",
    "pending": "SCHEDULED",  # rows written before migration 0003 renamed the state
    "in_progress": "IN PROGRESS",
    "completed": "COMPLETED",
    "canceled": "CANCELED",
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
FINDINGS: dict[str, str] = {"pneumonia": "Pneumonia", "no_pneumonia": "No pneumonia", "other": "Other finding"}
#: Other codes accepted for a finding (SNOMED CT "Pneumonia").
FINDING_ALIASES: dict[tuple[str, str], str] = {("SCT", "233604007"): "pneumonia", ("SRT", "D2-00100"): "pneumonia"}
CONCEPT_FINDING = ("121071", "DCM", "Finding")
CONCEPT_PROBABILITY = ("PROB", FINDING_SCHEME, "AI probability of pneumonia")
WORKITEM_INTERPRETATION = ("110005", "DCM", "Interpretation")


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    ds = Dataset()
    ds.CodeValue = value
    ds.CodingSchemeDesignator = scheme
    ds.CodeMeaning = meaning
    return ds


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

    def merged(self, newer: "PerformedData") -> "PerformedData":
        return PerformedData(
            finding=newer.finding or self.finding, comment=newer.comment if newer.comment is not None else self.comment,
            cancel_reason=newer.cancel_reason or self.cancel_reason,
        )


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


def dt_value(dt: datetime | None) -> str:
    """DICOM DT in UTC without offset (the dataset carries Timezone Offset From UTC +0000)."""
    if dt is None:
        return ""
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y%m%d%H%M%S")


def procedure_step_label(rec: UpsRecord) -> str:
    """LO (64 chars): the AI finding the radiologist is asked to read."""
    return f"AI: pneumonia suspected (p={rec.probability:.2f})"[:64]


def build_ups_dataset(rec: UpsRecord, *, worklist_label: str = "pacsbridge AI triage") -> Dataset:
    """The full UPS instance for ``rec`` (the attributes of Table CC.2.5-3 that pacsbridge knows)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: patient names may be anything
    ds.SOPClassUID = UPS_PUSH_SOP_CLASS
    ds.SOPInstanceUID = rec.ups_uid
    ds.TimezoneOffsetFromUTC = "+0000"

    # Unified Procedure Step Scheduled Procedure Information (C.30.2)
    ds.ScheduledProcedureStepPriority = ups_priority(rec.priority)
    ds.ScheduledProcedureStepModificationDateTime = dt_value(rec.modified_at)
    ds.ProcedureStepLabel = procedure_step_label(rec)
    ds.WorklistLabel = worklist_label
    ds.ScheduledProcessingParametersSequence = Sequence([_probability_item(rec.probability)])
    ds.ScheduledStationNameCodeSequence = Sequence()
    ds.ScheduledStationClassCodeSequence = Sequence()
    ds.ScheduledStationGeographicLocationCodeSequence = Sequence()
    ds.ScheduledHumanPerformersSequence = Sequence()
    ds.ScheduledProcedureStepStartDateTime = dt_value(rec.scheduled_at)
    ds.ScheduledWorkitemCodeSequence = Sequence([code_item(*WORKITEM_INTERPRETATION)])
    ds.InputReadinessState = "READY"
    ds.InputInformationSequence = Sequence(_input_items(rec.study_instance_uid, rec.series))
    ds.StudyInstanceUID = rec.study_instance_uid

    # Unified Procedure Step Relationship (C.30.4)
    ds.PatientName = rec.patient_name or ""
    ds.PatientID = rec.patient_id or ""
    ds.IssuerOfPatientID = ""
    ds.PatientBirthDate = rec.patient_birth_date or ""
    ds.PatientSex = rec.patient_sex or ""
    ds.AdmissionID = ""
    ds.IssuerOfAdmissionIDSequence = Sequence()
    ds.ReferencedRequestSequence = Sequence([_request_item(rec)])

    # Unified Procedure Step Progress Information (C.30.1)
    ds.ProcedureStepState = UPS_STATE_OF.get(rec.status, rec.status.upper().replace("_", " "))
    progress = Dataset()
    if rec.status == "canceled":
        progress.ProcedureStepCancellationDateTime = dt_value(rec.completed_at or rec.modified_at)
        progress.ReasonForCancellation = (rec.performed.cancel_reason or "")[:1024]
    ds.ProcedureStepProgressInformationSequence = Sequence([progress]) if len(progress) else Sequence()

    # Unified Procedure Step Performed Procedure Information (C.30.3)
    ds.UnifiedProcedureStepPerformedProcedureSequence = Sequence(
        [_performed_item(rec)] if rec.status != "scheduled" and rec.claimed_at is not None else []
    )
    return ds


def _probability_item(probability: float) -> Dataset:
    item = Dataset()
    item.ValueType = "NUMERIC"
    item.ConceptNameCodeSequence = Sequence([code_item(*CONCEPT_PROBABILITY)])
    item.NumericValue = f"{probability:.4f}"
    item.MeasurementUnitsCodeSequence = Sequence([code_item("1", "UCUM", "no units")])
    return item


def _input_items(study_uid: str, series: Iterable[ReferencedSeries]) -> list[Dataset]:
    items = []
    for s in series:
        item = Dataset()
        item.TypeOfInstances = "DICOM"
        item.StudyInstanceUID = study_uid
        item.SeriesInstanceUID = s.series_instance_uid
        refs = []
        for sop_class, sop_instance in s.instances:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = sop_instance
            refs.append(ref)
        item.ReferencedSOPSequence = Sequence(refs)
        items.append(item)
    return items


def _request_item(rec: UpsRecord) -> Dataset:
    item = Dataset()
    item.AccessionNumber = rec.accession_number or ""
    item.IssuerOfAccessionNumberSequence = Sequence()
    item.StudyInstanceUID = rec.study_instance_uid
    item.RequestedProcedureDescription = (rec.study_description or "")[:64]
    item.RequestedProcedureCodeSequence = Sequence()
    item.RequestedProcedureID = ""
    if rec.requested_priority:
        item.RequestedProcedurePriority = rec.requested_priority[:16]
    return item


def _performed_item(rec: UpsRecord) -> Dataset:
    item = Dataset()
    item.ActualHumanPerformersSequence = Sequence()
    item.PerformedStationNameCodeSequence = Sequence()
    item.PerformedProcedureStepStartDateTime = dt_value(rec.claimed_at)
    item.PerformedWorkitemCodeSequence = Sequence([code_item(*WORKITEM_INTERPRETATION)])
    params = []
    if rec.performed.finding in FINDINGS:
        content = Dataset()
        content.ValueType = "CODE"
        content.ConceptNameCodeSequence = Sequence([code_item(*CONCEPT_FINDING)])
        content.ConceptCodeSequence = Sequence([finding_code(rec.performed.finding)])
        params.append(content)
    item.PerformedProcessingParametersSequence = Sequence(params)
    if rec.performed.comment:
        item.CommentsOnThePerformedProcedureStep = rec.performed.comment[:10240]
    item.PerformedProcedureStepEndDateTime = dt_value(rec.completed_at) if rec.status == "completed" else ""
    item.OutputInformationSequence = Sequence()
    return item


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
