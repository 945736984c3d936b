"""The heatmap as a DICOM Secondary Capture (highdicom ``SCImage``): an RGB overlay of the model's
heatmap on the image, with "AI result - not for diagnostic use" burned in, in a series of its own
in the source study (UIDs derived from the result, see results.py).

The overlay comes from the model package (``pacsbridge.model.heatmap``: Grad-CAM and the colour
overlay); this module only turns an RGB array into a valid object, so it can be built from any
overlay.
"""

from __future__ import annotations

import warnings

import numpy as np
import highdicom as hd
from PIL import Image
from pydicom import Dataset

from ..imaging.label import AI_RESULT_LABEL, WHITE, burn_in
from .results import Result
from .sr import MANUFACTURER, clean_source

WARNING_TEXT = AI_RESULT_LABEL
SC_SERIES_NUMBER = 9902


def burn_in_warning(rgb: np.ndarray, text: str = WARNING_TEXT) -> np.ndarray:
    """``rgb`` (H x W x 3 uint8) with ``text`` burned in along the bottom, white on a black band
    (the top-left corner is where the overlay carries its own label)."""
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    w, h = img.size
    burn_in(img, text, size=max(10, min(h // 20, int(w / (0.6 * len(text))))), edge="bottom", colour=WHITE)
    return np.asarray(img, dtype=np.uint8)


def build_heatmap_sc(result: Result, source: Dataset, overlay_rgb: np.ndarray) -> hd.sc.SCImage:
    """The Secondary Capture for ``result`` from an RGB overlay (H x W x 3, uint8)."""
    rgb = np.asarray(overlay_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"overlay must be an H x W x 3 uint8 array, not {rgb.dtype} {rgb.shape}")
    source = clean_source(source, f"heatmap for prediction {result.prediction_id}")  # valid values only
    with warnings.catch_warnings():  # e.g. a one-component referring physician name copied from the source
        warnings.simplefilter("ignore", UserWarning)
        sc = _from_ref(result, source, rgb)
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = "AI pneumonia heatmap (not for diagnostic use)"
    sc.ImageComments = f"{WARNING_TEXT}; {result.model_version}; probability {result.probability:.4f}"
    return sc


def _orientation(source: Dataset) -> tuple[str, str]:
    """The source's Patient Orientation when it has two values, else that of a PA chest (L, F)."""
    value = source.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2 and all(value):
        return str(value[0]), str(value[1])
    return "L", "F"


def _from_ref(result: Result, source: Dataset, rgb: np.ndarray) -> hd.sc.SCImage:
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=burn_in_warning(rgb),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result.derived_uid("heatmap-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result.derived_uid("heatmap"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=_orientation(source),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )


def heatmap_overlay(model, image2d: np.ndarray, label: str) -> np.ndarray:  # noqa: ANN001
    """RGB overlay from the model package's Grad-CAM (imported lazily: an optional part of the model)."""
    try:
        from ..model.heatmap import grad_cam, overlay_rgb
    except ImportError as exc:
        raise HeatmapUnavailable("heatmaps need pacsbridge.model.heatmap, which this version lacks") from exc
    heat = grad_cam(model, image2d)
    return overlay_rgb(image2d, heat, label)


class HeatmapUnavailable(RuntimeError):
    """The heatmap cannot be made with this installation (a permanent condition)."""
