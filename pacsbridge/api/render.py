"""PNG rendering of an instance as the model saw it: the same decode path (pacsbridge.imaging),
scaled for a screen, with "NOT FOR DIAGNOSTIC USE" burned into the pixels; optionally the model's
heatmap over it (when pacsbridge.model.heatmap exists)."""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..imaging import (
    DEFAULT_MAX_DECODED_BYTES,
    NotAnalysable,
    decode_display,
    read_dataset,
)
from ..imaging.label import PREVIEW_LABEL, burn_in
from ..store.spool import OutsideSpool, contained_path


class RenderError(Exception):
    """The image cannot be rendered; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def heatmap_module() -> Any:
    """``pacsbridge.model.heatmap``, imported on first use (it pulls in torch)."""
    return importlib.import_module("pacsbridge.model.heatmap")


def spool_file(spool_dir: Path, rel: str) -> Path:
    """``spool_dir/rel``, refusing anything that escapes the spool."""
    try:
        return contained_path(spool_dir, rel)
    except OutsideSpool:
        raise RenderError(404, "the stored file path is outside the spool") from None


def decoded_image(path: Path, min_side: int | None = None, *,
                  max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> np.ndarray:
    """The display-ready 2-D image in [0, 1] the model is given (same decoder, window and size guard
    as the worker); with ``min_side`` decoded at a resolution of at least that many pixels (the
    model's own is smaller).  An image over ``max_decoded_bytes`` is a 422, never decoded."""
    try:
        ds = read_dataset(path)
        kwargs: dict[str, Any] = {"max_decoded_bytes": max_decoded_bytes}
        if min_side:
            kwargs["min_side"] = min_side
        return decode_display(ds, **kwargs).image
    except NotAnalysable as exc:
        raise RenderError(422, f"the image cannot be decoded: {exc.reason}") from None


def to_png(image: np.ndarray, size: int, *, heat: np.ndarray | None = None, overlay: Any | None = None) -> bytes:
    """PNG of ``image`` (2-D float [0, 1]) fitted into ``size`` x ``size``, labelled.

    With ``heat`` and the heatmap module's ``overlay_rgb``, the heatmap is blended in colour.
    """
    if heat is not None and overlay is not None:
        rgb = np.asarray(overlay(image, heat, "model attention"), dtype=np.uint8)
        pic = Image.fromarray(rgb, "RGB")
    else:
        pic = Image.fromarray(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    scale = size / max(pic.size)
    pic = pic.resize((max(1, round(pic.size[0] * scale)), max(1, round(pic.size[1] * scale))),
                     Image.Resampling.LANCZOS)
    size = max(10, pic.size[1] // 18 - 4)
    burn_in(pic, PREVIEW_LABEL, size=size, edge="top", centred=True)
    burn_in(pic, "AI triage preview - " + PREVIEW_LABEL, size=size, edge="bottom", centred=True)
    out = io.BytesIO()
    pic.save(out, "PNG", optimize=False)
    return out.getvalue()
