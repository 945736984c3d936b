"""Links that open a study in the site's own image viewer (PACS web viewer, Orthanc Stone/OHIF, OHIF).

The template is a URL with ``{study_instance_uid}`` and/or ``{accession_number}``; values are
URL-encoded, so a UID or accession can never change the link's shape.
"""

from __future__ import annotations

import string
from urllib.parse import quote

#: The placeholders a viewer_url template may use.
FIELDS = ("study_instance_uid", "accession_number")


def check_template(template: str) -> str:
    """``template`` unchanged when usable (empty = no viewer); else ValueError saying why."""
    if not template:
        return template
    if not template.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
    unknown = sorted({n for n in names if n not in FIELDS})
    if unknown:
        raise ValueError(f"unknown placeholder {{{unknown[0]}}}; use {{study_instance_uid}} or {{accession_number}}")
    if not names:
        raise ValueError("needs {study_instance_uid} or {accession_number}")
    return template


def viewer_link(template: str | None, study_instance_uid: str | None, accession_number: str | None) -> str | None:
    """The filled-in link, or None when no template is set or a value it needs is missing."""
    if not template:
        return None
    values = {"study_instance_uid": study_instance_uid or "", "accession_number": accession_number or ""}
    needed = [n for _, n, _, _ in string.Formatter().parse(template) if n]
    if any(not values[n] for n in needed):
        return None
    return template.format_map({k: quote(v, safe="") for k, v in values.items()})
