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

Values come from the DICOM header through :mod:`.header_values` (decoded with the image's Specific
Character Set, control characters removed, invalid dates/sexes left out).  A multi-valued Patient ID
or Patient's Name is sent as HL7 repetitions (``~``) in PID-3 / PID-5; fields that do not repeat
(OBR-2/3, PV1-3/19) carry the first value.  MSH-18 names the character set (``UNICODE UTF-8`` by
default, per destination ``hl7_encoding``); non-ASCII text is sent as real characters in that
encoding (a character it cannot hold becomes ``?``), and the HL7 delimiters are escaped with
python-hl7's escaping.
"""

from __future__ import annotations

from datetime import datetime, timezone

import hl7
from pydicom import Dataset

from .header_values import HeaderValues, header_values
from .results import Result

ENCODING_CHARS = "^~\\&"
_ESCAPER = hl7.parse("MSH|^~\\&|X")  # a container that knows the delimiters, for Message.escape

#: MSH-18 values we can send, and the codec of the bytes on the wire for each.
HL7_CHARSETS = {"UNICODE UTF-8": "utf-8", "8859/1": "latin-1", "ASCII": "ascii"}
DEFAULT_CHARSET = "UNICODE UTF-8"


def wire_encoding(charset: str) -> str:
    """The Python codec for an MSH-18 value (see :data:`HL7_CHARSETS`)."""
    return HL7_CHARSETS[charset]


def _esc(value: object, codec: str = "utf-8") -> str:
    """``value`` escaped for an HL7 field: delimiters by python-hl7 (ASCII runs), other characters
    kept as they are (if ``codec`` can hold them, else ``?``), control characters dropped."""
    if value in (None, ""):
        return ""
    text = str(value).encode(codec, "replace").decode(codec)
    out, run = [], []
    for ch in text:
        if ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            continue  # not allowed in ST/XPN/CX; the header values have none left, this is a safeguard
        if ch.isascii():
            run.append(ch)
            continue
        if run:
            out.append(_ESCAPER.escape("".join(run)))
            run = []
        out.append(ch)
    if run:
        out.append(_ESCAPER.escape("".join(run)))
    return "".join(out)


def _components(*values: object, codec: str = "utf-8") -> str:
    """Escaped components joined with ``^``; trailing empty ones dropped."""
    parts = [_esc(v, codec) for v in values]
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts)


def _person_name(pn: object, codec: str = "utf-8") -> str:
    """DICOM PN (family^given^middle^prefix^suffix) -> HL7 XPN (family^given^middle^suffix^prefix);
    the alphabetic group (the first non-empty group when it is empty)."""
    if not pn:
        return ""
    group = next((g for g in str(pn).split("=") if g.strip("^ ")), "")
    family, given, middle, prefix, suffix = (group.split("^") + [""] * 5)[:5]
    return _components(family, given, middle, suffix, prefix, codec=codec)


def _repeated(items: list[str]) -> str:
    return "~".join(i for i in items if i)


def _ts(date: str | None, time: str | None = None) -> str:
    d = "".join(ch for ch in str(date or "") if ch.isdigit())[:8]
    if len(d) != 8:
        return ""
    t = "".join(ch for ch in str(time or "").split(".")[0] if ch.isdigit())[:6]
    return d + t


def build_oru(result: Result, source: Dataset | HeaderValues | None, *, control_id: str,
              sending_application: str, sending_facility: str, receiving_application: str,
              receiving_facility: str, now: datetime | None = None,
              charset: str = DEFAULT_CHARSET) -> hl7.Message:
    """The ORU^R01 for ``result``; ``source`` is the image's header or its normalised values (None
    when the file is gone).  ``charset`` is MSH-18; send the message encoded with
    :func:`wire_encoding` of it."""
    codec = wire_encoding(charset)
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    hv = source if isinstance(source, HeaderValues) else header_values(source)
    g = hv.first
    stamp = now.strftime("%Y%m%d%H%M%S")
    accession = g("AccessionNumber")
    issuer = g("IssuerOfPatientID")
    sex = g("PatientSex")
    status = "P"
    ids = _repeated([_components(pid, "", "", issuer, codec=codec) for pid in hv.all("PatientID")])
    names = _repeated([_person_name(pn, codec) for pn in hv.all("PatientName")])
    abnormal = "A" if result.positive else "N"
    segments = [
        "|".join(["MSH", ENCODING_CHARS, sending_application, sending_facility, receiving_application,
                  receiving_facility, stamp, "", "ORU^R01^ORU_R01", control_id, "P", "2.5.1", "", "", "AL", "NE",
                  "", charset]),
        "|".join(["PID", "1", "", ids, "", names, "", _ts(g("PatientBirthDate")), sex]),
        "|".join(["PV1", "1", "U", _components(g("CurrentPatientLocation"), codec=codec)] + [""] * 15
                 + [_components(g("AdmissionID"), codec=codec)]),
        "|".join(["OBR", "1", _components(accession, codec=codec), _components(accession, codec=codec),
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
