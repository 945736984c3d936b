"""The AI result as an HL7 v2.5.1 ORU^R01 message (python-hl7), for a RIS.

    MSH  sending/receiving application and facility (from the destination), a message control id
         derived from the result (the same on every resend, so the RIS can de-duplicate)
    PID  patient id (with issuer), name, birth date, sex: from the DICOM header, where present
    PV1  patient class (U), assigned location, visit number (Admission ID), where present
    OBR  placer and filler order number = Accession Number, the AI service, observation time,
         result status P (preliminary: a machine result, not a report)
    OBX  1 finding (SCT 233604007 Pneumonia = Present/Absent, abnormal flag A/N), 2 probability,
         3 threshold, 4 priority flag (URGENT/ROUTINE), 5 algorithm name, 6 algorithm version
         (model id + weights hash), 7 Study Instance UID, 8 algorithm parameters (``calibration=<id>``:
         the model card's operating point or the site calibration that decided)

Every value taken from DICOM is escaped with python-hl7's escaping, component by component.
"""

from __future__ import annotations

from datetime import datetime, timezone

import hl7
from pydicom import Dataset

from .results import Result

ENCODING_CHARS = "^~\\&"
_ESCAPER = hl7.parse("MSH|^~\\&|X")  # a container that knows the delimiters, for Message.escape


def _esc(value: object) -> str:
    return _ESCAPER.escape(str(value)) if value not in (None, "") else ""


def _components(*values: object) -> str:
    """Escaped components joined with ``^``; trailing empty ones dropped."""
    parts = [_esc(v) for v in values]
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts)


def _person_name(pn: object) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) -> HL7 XPN (family^given^middle^suffix^prefix)."""
    if not pn:
        return ""
    parts = (str(pn).split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return _components(family, given, middle, suffix, prefix)


def _ts(date: str | None, time: str | None = None) -> str:
    d = "".join(ch for ch in str(date or "") if ch.isdigit())[:8]
    if len(d) != 8:
        return ""
    t = "".join(ch for ch in str(time or "").split(".")[0] if ch.isdigit())[:6]
    return d + t


def build_oru(result: Result, source: Dataset | None, *, control_id: str, sending_application: str,
              sending_facility: str, receiving_application: str, receiving_facility: str,
              now: datetime | None = None) -> hl7.Message:
    """The ORU^R01 for ``result``; ``source`` is the image's header (None when the file is gone)."""
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    src = source if source is not None else Dataset()
    g = src.get
    stamp = now.strftime("%Y%m%d%H%M%S")
    accession = g("AccessionNumber") or ""
    issuer = g("IssuerOfPatientID") or ""
    sex = str(g("PatientSex") or "").upper()
    status = "P"
    abnormal = "A" if result.positive else "N"
    segments = [
        "|".join(["MSH", ENCODING_CHARS, sending_application, sending_facility, receiving_application,
                  receiving_facility, stamp, "", "ORU^R01^ORU_R01", control_id, "P", "2.5.1", "", "", "AL", "NE"]),
        "|".join(["PID", "1", "", _components(g("PatientID") or "", "", "", issuer), "",
                  _person_name(g("PatientName")), "", _ts(g("PatientBirthDate")),
                  sex if sex in ("M", "F", "O") else ("U" if sex else "")]),
        "|".join(["PV1", "1", "U", _components(g("CurrentPatientLocation") or "")] + [""] * 15
                 + [_components(g("AdmissionID") or "")]),
        "|".join(["OBR", "1", _components(accession), _components(accession),
                  "AIPNEU^AI pneumonia triage (chest radiograph)^L", "", "",
                  _ts(g("StudyDate"), g("StudyTime")) or stamp] + [""] * 14 + [stamp, "", "RAD", status]),
        _obx(1, "CE", "233604007^Pneumonia^SCT",
             "52101004^Present^SCT" if result.positive else "272519000^Absent^SCT", "", abnormal, status),
        _obx(2, "NM", "122157^Probability^DCM", f"{result.probability:.6f}", "1^no units^UCUM", abnormal, status),
        _obx(3, "NM", "122411^Threshold Value^DCM", f"{result.threshold:.6f}", "1^no units^UCUM", "", status),
        _obx(4, "ST", "AIPRIORITY^AI triage priority^L", "URGENT" if result.positive else "ROUTINE", "",
             abnormal, status),
        _obx(5, "ST", "111001^Algorithm Name^DCM", _esc(result.model_id), "", "", status),
        _obx(6, "ST", "111003^Algorithm Version^DCM", _esc(result.model_version), "", "", status),
        _obx(7, "ST", "113014^Study Instance UID^DCM", _esc(result.study_instance_uid), "", "", status),
        _obx(8, "ST", "111002^Algorithm Parameters^DCM", _esc(f"calibration={result.calibration}"), "", "", status),
    ]
    return hl7.parse("\r".join(segments))


def _obx(n: int, value_type: str, identifier: str, value: str, units: str, abnormal: str, status: str) -> str:
    return "|".join(["OBX", str(n), value_type, identifier, "", value, units, "", abnormal, "", "", status])
