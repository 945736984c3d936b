"""C-FIND attribute matching (PS3.4 C.2.2.2) of a query Identifier against a full dataset, and the
response Identifier built from the query's keys.

Kinds of matching supported: universal (empty key), single value (case-sensitive, except PN which is
matched case-insensitively), wildcard (``*`` and ``?``, string VRs other than DA/TM/DT/UI), list of UIDs
(UI with several values), range (DA, TM, DT: ``a-b``, ``a-``, ``-b``; a bound with less precision than
the value compares on that precision), any-of for several values of other VRs, and sequence matching
(one item: every non-empty key in it must match one item of the record's sequence).
"""

from __future__ import annotations

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

_WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
_RANGE_VRS = {"DA", "TM", "DT"}
#: Attributes never returned even when asked for (the UPS Transaction UID is the performer's lock).
NEVER_RETURNED = {0x00081195}


def _values(elem: DataElement) -> list[str]:
    """The element's values as strings (empty list for an empty element)."""
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value if str(v) != ""]
    text = str(value)
    return [v for v in text.split("\\")] if "\\" in text else [text]


def wildcard_match(pattern: str, value: str) -> bool:
    """DICOM wildcard matching: ``*`` any run of characters, ``?`` one character, nothing else special.

    Iterative, remembering only the last ``*`` (O(len(pattern) * len(value)) at worst): a query from a
    hostile peer with many ``*`` cannot make it backtrack exponentially as a regular expression could.
    """
    p = v = 0
    star, mark = -1, 0
    while v < len(value):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == value[v]):
            p += 1
            v += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, v
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            v = mark
        else:
            return False
    return all(c == "*" for c in pattern[p:])


def _match_one(key: str, value: str, vr: str) -> bool:
    v = value.strip()
    if vr in _RANGE_VRS and "-" in key:
        lo, hi = key.split("-", 1)
        # A bound with less precision than the value compares on the bound's precision.
        return not (lo and v[: len(lo)] < lo) and not (hi and v[: len(hi)] > hi)
    if vr in _WILDCARD_VRS and ("*" in key or "?" in key):
        return wildcard_match(key.lower(), v.lower()) if vr == "PN" else wildcard_match(key, v)
    if vr == "PN":
        return key.strip().lower() == v.lower()
    return key.strip() == v


def element_matches(key: DataElement, record: Dataset) -> bool:
    """Does ``record`` match the query element ``key``?"""
    if key.VR == "SQ":
        items = key.value or []
        if not items or len(items[0]) == 0:
            return True  # universal sequence matching
        sub = items[0]
        if not any(_non_empty(e) for e in sub):
            return True
        rec_items = record.get(key.tag)
        rec_items = rec_items.value if rec_items is not None else []
        return any(all(element_matches(e, rec_item) for e in sub if _non_empty(e)) for rec_item in rec_items)
    keys = _values(key)
    if not keys:
        return True  # universal matching
    rec_elem = record.get(key.tag)
    if rec_elem is None:
        return False
    rec_values = _values(rec_elem)
    vr = rec_elem.VR
    return any(_match_one(k, v, vr) for k in keys for v in rec_values)


def _non_empty(elem: DataElement) -> bool:
    if elem.tag.group in (0x0008,) and elem.tag.element == 0x0005:  # Specific Character Set
        return False
    if elem.VR == "SQ":
        return bool(elem.value) and any(_non_empty(e) for e in elem.value[0])
    return bool(_values(elem))


def matches(identifier: Dataset, record: Dataset) -> bool:
    """True when every matching key of ``identifier`` matches ``record``."""
    for elem in identifier:
        if elem.tag == 0x00080005 or elem.tag.group == 0x0000:
            continue
        if not element_matches(elem, record):
            return False
    return True


def response_identifier(identifier: Dataset, record: Dataset, always: tuple[str, ...] = ()) -> Dataset:
    """The C-FIND response: each key of ``identifier`` with the record's value (empty when unknown).

    A sequence key with an empty item (or no item) returns the record's whole sequence; with keys in its
    item, each record item is reduced to those keys.  Keywords in ``always`` are added when absent.
    """
    out = Dataset()
    if "SpecificCharacterSet" in record:
        out.SpecificCharacterSet = record.SpecificCharacterSet
    for elem in identifier:
        if elem.tag == 0x00080005 or elem.tag.group == 0x0000 or int(elem.tag) in NEVER_RETURNED:
            continue
        out.add(_returned(elem, record))
    for keyword in always:
        if keyword not in out and keyword in record:
            out.add(record[keyword])
    return out


def _returned(key: DataElement, record: Dataset) -> DataElement:
    rec_elem = record.get(key.tag)
    if key.VR == "SQ":
        if rec_elem is None:
            return DataElement(key.tag, "SQ", Sequence())
        sub = key.value[0] if key.value else None
        if sub is None or len(sub) == 0:
            return rec_elem  # the whole sequence (shared: response datasets are only encoded)
        return DataElement(key.tag, "SQ", Sequence([_reduced(sub, i) for i in rec_elem.value]))
    if rec_elem is None:
        return DataElement(key.tag, key.VR, None)
    return rec_elem  # elements are not changed afterwards: share, do not copy


def _reduced(keys: Dataset, item: Dataset) -> Dataset:
    out = Dataset()
    for elem in keys:
        if int(elem.tag) not in NEVER_RETURNED and elem.tag.group != 0x0000:
            out.add(_returned(elem, item))
    return out


def exact_values(identifier: Dataset, keyword: str) -> list[str]:
    """The key's values when it is single-value or list matching without wildcards; [] otherwise."""
    elem = identifier[keyword] if keyword in identifier else None
    if elem is None or elem.value in (None, ""):
        return []
    raw = elem.value
    values = [str(v) for v in raw] if not isinstance(raw, str) and hasattr(raw, "__iter__") else str(raw).split("\\")
    values = [v.strip() for v in values if v.strip()]
    if any("*" in v or "?" in v for v in values):
        return []
    return values


def single_value(identifier: Dataset, keyword: str) -> str | None:
    """The key's one exact value (see :func:`exact_values`), else None."""
    values = exact_values(identifier, keyword)
    return values[0] if len(values) == 1 else None
