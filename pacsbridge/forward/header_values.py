"""The source image's patient and study values, made valid for the objects built from them.

Any header the receiver accepted may carry values that are legal in a received image but break a
builder: a multi-valued Patient's Name (a backslash in PN), Latin-1 or ISO 2022 text, values over
their VR's length, control characters, a date that is not a date.  :func:`header_values` reads each
attribute the result objects use once, decoded with the source's Specific Character Set, and
normalises it per VR:

* every value: control characters removed, surrounding spaces stripped;
* PN: each component group (alphabetic=ideographic=phonetic) at most 64 characters;
  LO 64, SH 16, CS 16 characters (trimmed, with a note);
* DA ``YYYYMMDD`` (``YYYY.MM.DD`` converted), TM ``HHMMSS[.F]``, AS ``nnnD|W|M|Y``, Patient's Sex
  M/F/O: anything else is left out, with a note;
* all values are kept (HL7 sends them as repetitions); :meth:`HeaderValues.dataset` gives the
  single-valued dataset for SR/SC building (first value where the IOD wants one, with a note),
  in the default repertoire when every value is ASCII, else Latin-1 (ISO_IR 100) when that can hold
  every value, else UTF-8 (ISO_IR 192).

The notes name the attribute and what was done, never the value (they go to the log).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

#: keyword -> VR of every attribute the builders take from the source.
ATTRIBUTES: dict[str, str] = {
    "PatientName": "PN", "PatientID": "LO", "IssuerOfPatientID": "LO", "PatientBirthDate": "DA",
    "PatientSex": "CS", "PatientAge": "AS", "StudyDate": "DA", "StudyTime": "TM", "ReferringPhysicianName": "PN",
    "StudyID": "SH", "AccessionNumber": "SH", "StudyDescription": "LO", "CurrentPatientLocation": "LO",
    "AdmissionID": "LO", "PatientOrientation": "CS",
}
#: UIDs are checked by the receiver; they are copied as they are.
UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
#: Image pixel description (numbers the receiver and the size guard have read): copied as they are, so
#: the built objects can reference the source as an image.
PIXEL_DESCRIPTION = ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
                     "BitsStored", "HighBit", "PixelRepresentation", "Modality")
#: Attributes whose IOD allows several values (the rest get their first one in DICOM objects).
MULTI_VALUED = {"PatientOrientation"}

MAX_CHARS = {"LO": 64, "SH": 16, "CS": 16, "AS": 4, "DA": 8, "TM": 14}
PN_GROUP_CHARS = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_DA = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_TM = re.compile(r"^([01]\d|2[0-3])(?::?([0-5]\d)(?::?([0-5]\d|60)(\.\d{1,6})?)?)?$")
_AS = re.compile(r"^\d{3}[DWMY]$")


@dataclass
class HeaderValues:
    """Normalised values (keyword -> list of strings; PN as ``family^given^...=ideographic=...``)."""

    values: dict[str, list[str]] = field(default_factory=dict)
    uids: dict[str, str] = field(default_factory=dict)
    pixel_description: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def first(self, keyword: str) -> str:
        got = self.values.get(keyword)
        return got[0] if got else ""

    def all(self, keyword: str) -> list[str]:
        return list(self.values.get(keyword, []))

    @property
    def character_set(self) -> str | None:
        """The Specific Character Set the values need: None (ASCII), ISO_IR 100 or ISO_IR 192."""
        text = "".join(v for vs in self.values.values() for v in vs)
        if text.isascii():
            return None
        try:
            text.encode("latin-1")
            return "ISO_IR 100"
        except UnicodeEncodeError:
            return "ISO_IR 192"

    def dataset(self) -> Dataset:
        """A dataset with only these values, one per attribute unless its IOD allows more (a note
        for each value dropped), for highdicom to copy into an SR or SC."""
        ds = Dataset()
        charset = self.character_set
        if charset:
            ds.SpecificCharacterSet = charset
        for keyword, uid in self.uids.items():
            setattr(ds, keyword, uid)
        for keyword, value in self.pixel_description.items():
            setattr(ds, keyword, value)
        for keyword, values in self.values.items():
            if not values:
                continue
            if keyword in MULTI_VALUED:
                setattr(ds, keyword, values)
                continue
            if len(values) > 1:
                self.notes.append(f"{keyword}: {len(values)} values; the first is used in DICOM objects")
            setattr(ds, keyword, values[0])
        return ds


def _text(value: object) -> str:
    if isinstance(value, bytes):  # undecodable under the declared character set
        value = value.decode("latin-1")
    text = unicodedata.normalize("NFC", str(value))
    return _CONTROL.sub(" ", text).strip()  # a run of control characters (CR LF, tab) becomes one space


def _raw_values(ds: Dataset, keyword: str) -> list[object]:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a value pydicom cannot even read is left out
        return [object()]  # marker: unreadable
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [v for v in value]
    return [value]


def _person_name(value: object, keyword: str, notes: list[str]) -> str:
    text = _text(str(value) if isinstance(value, PersonName) else value)
    groups = text.split("=")[:3]
    out = []
    for n, group in enumerate(groups):
        comps = [c.strip() for c in group.split("^")[:5]]
        while comps and not comps[-1]:
            comps.pop()
        joined = "^".join(comps)
        if len(joined) > PN_GROUP_CHARS:
            notes.append(f"{keyword}: component group {n + 1} over {PN_GROUP_CHARS} characters: trimmed")
            joined = joined[:PN_GROUP_CHARS].rstrip("^")
        out.append(joined)
    while out and not out[-1]:
        out.pop()
    return "=".join(out)


def _one(value: object, keyword: str, vr: str, notes: list[str]) -> str | None:
    if vr == "PN":
        return _person_name(value, keyword, notes) or None
    text = _text(value).replace("\\", "")
    if not text:
        return None
    if vr == "DA":
        m = _DA.match(text)
        if not m:
            notes.append(f"{keyword}: not a valid DICOM date (DA): left out")
            return None
        return "".join(m.groups())
    if vr == "TM":
        m = _TM.match(text)
        if not m:
            notes.append(f"{keyword}: not a valid DICOM time (TM): left out")
            return None
        hh, mm, ss, frac = m.groups()
        return hh + (mm or "") + (ss or "") + (frac or "")
    if vr == "AS":
        if not _AS.match(text.upper()):
            notes.append(f"{keyword}: not a valid DICOM age (AS): left out")
            return None
        return text.upper()
    if keyword == "PatientSex":
        sex = text.upper()
        if sex not in ("M", "F", "O"):
            notes.append(f"{keyword}: not M, F or O: left out")
            return None
        return sex
    limit = MAX_CHARS.get(vr)
    if vr == "CS":
        text = text.upper()
    if limit is not None and len(text) > limit:
        notes.append(f"{keyword}: over {limit} characters ({vr}): trimmed")
        text = text[:limit].rstrip()
    return text


def header_values(source: Dataset | None) -> HeaderValues:
    """The normalised patient/study values of ``source`` (empty for None)."""
    out = HeaderValues()
    if source is None:
        return out
    for keyword, vr in ATTRIBUTES.items():
        cleaned: list[str] = []
        for raw in _raw_values(source, keyword):
            if type(raw) is object:
                out.notes.append(f"{keyword}: unreadable value: left out")
                continue
            try:
                value = _one(raw, keyword, vr, out.notes)
            except Exception:  # noqa: BLE001 - a value that cannot be made valid is left out
                out.notes.append(f"{keyword}: value cannot be made valid: left out")
                value = None
            if value:
                cleaned.append(value)
        if cleaned:
            out.values[keyword] = cleaned
    for keyword in UIDS:
        try:
            uid = source.get(keyword)
        except Exception:  # noqa: BLE001
            uid = None
        if uid:
            out.uids[keyword] = str(uid)
    for keyword in PIXEL_DESCRIPTION:
        try:
            value = source.get(keyword)
            if keyword in ("PhotometricInterpretation", "Modality"):
                value = _text(value).upper()[:16] if value else None
            elif value is not None:
                value = int(value)
        except Exception:  # noqa: BLE001 - not a number: left out
            value = None
        if value not in (None, ""):
            out.pixel_description[keyword] = value
    return out
