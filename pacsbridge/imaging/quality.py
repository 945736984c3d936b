"""Quality gate: is this an image the model was trained for (a frontal chest radiograph)?

Each check returns ``None`` when the image may be analysed, else a short human-readable reason
that ends up in the prediction row as "not analysed".  The header checks run before any pixel is
decoded, so refusing a CT series or a hand X-ray costs next to nothing.

What is refused, and why:

* Modality not CR/DX (SC/OT allowed only when grayscale): the model saw only projection
  radiographs.
* Body Part Examined present and not chest-like (e.g. EXTREMITY, HAND, SKULL).
* A lateral or oblique view (View Position, View Code Sequence, or -- without a View Position --
  series description/protocol keywords such as LAT).
* Without Body Part Examined: descriptions naming another anatomy (e.g. KNEE, HAND), or an
  Image Laterality/Laterality of R or L, which belongs to paired body parts, not the chest.
* Not MONOCHROME1/2 (or RGB/YBR whose channels turn out equal after decoding: a grey picture
  stored as colour), 1-bit data, fewer than 128 rows/columns, no pixel data.
* After decoding: real colour (channels differ), a blank image (no contrast at all).
"""

from __future__ import annotations

import re

import numpy as np
from pydicom.dataset import Dataset

MIN_SIDE = 128
RADIOGRAPH_MODALITIES = {"CR", "DX"}
#: Secondary capture / other: allowed only for a grayscale image (a digitised film, say).
GRAYSCALE_ONLY_MODALITIES = {"SC", "OT"}
GRAYSCALE = {"MONOCHROME1", "MONOCHROME2"}
SC_OR_RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7",       # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",     # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",     # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.1",       # CR
    "1.2.840.10008.5.1.4.1.1.1.1",     # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",   # DX for processing
}
#: Three-sample images that may be grey pictures stored as colour (a JPEG converted to DICOM, a
#: digitised film); decoding decides: equal channels are read as grey, real colour is refused.
MAYBE_GREY_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}

#: Words that make a body part or description chest-like (English and a few common locales).
CHEST_WORDS = {"CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "CXR", "TORAX", "THORAX", "TORACE",
               "BRUST", "POITRINE", "PULMONARY", "RIBS"}
#: Anatomy that is clearly not a chest; used on descriptions when Body Part Examined is absent.
OTHER_ANATOMY = {
    "HAND", "HANDS", "FINGER", "FINGERS", "THUMB", "WRIST", "FOREARM", "ELBOW", "HUMERUS", "ARM",
    "SHOULDER", "CLAVICLE", "SCAPULA", "FOOT", "FEET", "TOE", "TOES", "ANKLE", "HEEL", "CALCANEUS",
    "TIBIA", "FIBULA", "LEG", "KNEE", "PATELLA", "FEMUR", "HIP", "HIPS", "PELVIS", "SACRUM",
    "SPINE", "CSPINE", "TSPINE", "LSPINE", "CERVICAL", "LUMBAR", "SKULL", "HEAD", "FACE", "SINUS",
    "SINUSES", "MANDIBLE", "DENTAL", "TEETH", "ABDOMEN", "ABDOMINAL", "KUB", "EXTREMITY",
    "BREAST", "MAMMO", "MAMMOGRAPHY",
}
LATERAL_VIEW_POSITIONS = {"LL", "RL", "LAT", "LATERAL", "LLO", "RLO"}
FRONTAL_VIEW_POSITIONS = {"PA", "AP", "LLD", "RLD"}  # decubitus films are frontal projections
LATERAL_WORDS = {"LAT", "LATERAL", "LATERALE", "LL", "RL", "OBLIQUE", "OBL"}
FRONTAL_WORDS = {"PA", "AP", "FRONTAL", "PORTABLE"}


def _words(text: object) -> set[str]:
    return set(re.split(r"[^A-Z0-9]+", str(text or "").upper())) - {""}


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
        value = " ".join(str(v) for v in value)
    return str(value).strip()


def _view_code_meanings(ds: Dataset) -> list[str]:
    meanings = []
    for item in ds.get("ViewCodeSequence") or []:
        meaning = item.get("CodeMeaning")
        if meaning:
            meanings.append(str(meaning))
    return meanings


def check_header(ds: Dataset) -> str | None:
    """Header-only gate.  ``None`` when the image may be analysed, else the (first) reason."""
    reasons = header_reasons(ds)
    return reasons[0][1] if reasons else None


def header_reasons(ds: Dataset) -> list[tuple[str, str]]:
    """Every header-only reason to refuse ``ds``, as ``(code, text)`` pairs, most telling first.

    All checks run (an adult hand is both "not chest" and, for the age gate, too old); a check that
    meets a malformed value gives ``("header", ...)`` and the others still run.
    """
    out: list[tuple[str, str]] = []
    for check in (_check_pixels_and_modality, _check_anatomy, _check_view, _check_format):
        try:
            found = check(ds)
        except Exception as exc:  # noqa: BLE001 - a malformed header value is a property of the image
            found = ("header", f"unreadable image header: {type(exc).__name__}: {exc}"[:200])
        if found and all(code != found[0] for code, _ in out):
            out.append(found if isinstance(found, tuple) else (_CODES[check], found))
    return out


def _grayscale(ds: Dataset) -> bool:
    photometric = _text(ds, "PhotometricInterpretation").upper()
    samples = ds.get("SamplesPerPixel", 1)
    return (photometric in GRAYSCALE and samples in (None, 1)) or (
        photometric in MAYBE_GREY_COLOUR and samples == 3)  # checked again after decoding


def _check_pixels_and_modality(ds: Dataset) -> tuple[str, str] | None:
    if "PixelData" not in ds:
        return "pixel_data", "no Pixel Data in the file (not an image, or the file is truncated)"
    modality = _text(ds, "Modality").upper()
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if not modality:
        # Converters (e.g. DCMTK img2dcm wrapping a JPEG) often leave Modality out of a Secondary
        # Capture; treat such a file as SC (grey only) rather than drop a radiograph unread.
        if str(ds.get("SOPClassUID", "")) not in SC_OR_RADIOGRAPH_SOP_CLASSES:
            return "modality", "no Modality in the file (and not a CR, DX or Secondary Capture image)"
        modality = "SC"
    if modality in GRAYSCALE_ONLY_MODALITIES:
        if not _grayscale(ds):
            return "colour", f"colour image ({modality}, {photometric or 'no photometric interpretation'})"
    elif modality not in RADIOGRAPH_MODALITIES:
        return "modality", f"modality {modality} is not a radiograph (expects CR or DX)"
    return None


def _check_format(ds: Dataset) -> tuple[str, str] | None:
    if "PixelData" not in ds:
        return None  # said above
    if not _grayscale(ds):
        photometric = _text(ds, "PhotometricInterpretation").upper()
        return "colour", (f"colour image ({photometric or 'no photometric interpretation'}, "
                          f"{ds.get('SamplesPerPixel', 1)} samples/pixel)")
    if ds.get("BitsAllocated") == 1:
        return "bitmap", "1-bit image (a bitmap, not a radiograph)"
    rows, cols = ds.get("Rows") or 0, ds.get("Columns") or 0
    if rows < MIN_SIDE or cols < MIN_SIDE:
        return "too_small", f"image too small ({rows}x{cols}, needs at least {MIN_SIDE}x{MIN_SIDE})"
    return None


def _check_anatomy(ds: Dataset) -> str | None:
    body_part = _text(ds, "BodyPartExamined")
    if body_part:
        if _words(body_part) & CHEST_WORDS:
            return None
        return f"body part {body_part.upper()} is not chest"
    # No body part: look at what the study/series say they are.
    described = (_words(_text(ds, "StudyDescription")) | _words(_text(ds, "SeriesDescription"))
                 | _words(_text(ds, "ProtocolName")))
    if described & CHEST_WORDS:
        return None
    other = sorted(described & OTHER_ANATOMY)
    if other:
        return f"description names {other[0]}, not chest"
    for keyword in ("ImageLaterality", "Laterality"):
        side = _text(ds, keyword).upper()
        if side in ("R", "L"):
            return f"{keyword} {side} without a body part suggests a limb or breast, not chest"
    return None


def _check_view(ds: Dataset) -> str | None:
    view = _text(ds, "ViewPosition").upper()
    if view in LATERAL_VIEW_POSITIONS:
        kind = "oblique" if view.endswith("O") else "lateral"
        return f"{kind} view (View Position {view}); the model reads frontal views"
    for meaning in _view_code_meanings(ds):
        low = meaning.lower()
        if "lateral" in low or "oblique" in low:
            return f"non-frontal view ({meaning}); the model reads frontal views"
    if view in FRONTAL_VIEW_POSITIONS:
        return None
    # No usable View Position: series-level wording.  (Not the study description: "CHEST PA
    # AND LAT" describes a study holding both views.)
    for keyword in ("SeriesDescription", "ProtocolName"):
        words = _words(_text(ds, keyword))
        if words & LATERAL_WORDS and not words & FRONTAL_WORDS:
            return f"lateral view ({keyword} says so); the model reads frontal views"
    return None


def check_image(image: np.ndarray) -> str | None:
    """Gate on the decoded display image: refuse one with no contrast at all."""
    if image.ndim != 2:
        return f"not a 2-D image (shape {image.shape})"
    if float(image.std()) < 1e-3:
        return "blank image (no contrast after windowing)"
    return None


#: The code of each check that returns a bare text.
_CODES = {_check_anatomy: "body_part", _check_view: "view"}
