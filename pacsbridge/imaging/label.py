"""The one "not for diagnostic use" burn-in: every picture pacsbridge makes for people (the web
preview, the heatmap overlay, the heatmap Secondary Capture) carries it in its pixels, drawn here."""

from __future__ import annotations

from typing import Literal

from PIL import Image, ImageDraw, ImageFont

#: What an AI picture says about itself (also in the Secondary Capture's Image Comments).
AI_RESULT_LABEL = "AI result - not for diagnostic use"
PREVIEW_LABEL = "NOT FOR DIAGNOSTIC USE"
YELLOW, WHITE, BLACK = (255, 214, 0), (255, 255, 255), (0, 0, 0)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # noqa: BLE001 - Pillow without FreeType (or < 10.1): the small bitmap font
        return ImageFont.load_default()


def _fitted_font(draw: ImageDraw.ImageDraw, text: str, size: int, width: int) -> ImageFont.ImageFont:
    """The largest font up to ``size`` whose rendering of ``text`` fits in ``width`` pixels."""
    font = _font(size)
    while size > 8 and draw.textlength(text, font=font) > width:
        size -= 1
        font = _font(size)
    return font


def burn_in(pic: Image.Image, text: str, *, size: int, edge: Literal["top", "bottom"] = "top",
            colour: tuple[int, int, int] = YELLOW, full_width: bool = True, centred: bool = False) -> Image.Image:
    """Draw ``text`` (font ``size`` or smaller, to fit the width) on a black band along ``edge`` of the
    RGB ``pic``, in place; the band spans the width, or only the text (``full_width=False``).
    Returns ``pic``."""
    w, h = pic.size
    draw = ImageDraw.Draw(pic)
    font = _fitted_font(draw, text, size, w - 8)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, size // 4)
    band = bottom - top + 2 * pad
    y0 = 0 if edge == "top" else h - band
    draw.rectangle([0, y0, w if full_width else right - left + 2 * pad, y0 + band], fill=BLACK)
    x = (w - (right - left)) / 2 - left if centred else pad - left
    draw.text((x, y0 + pad - top), text, fill=colour, font=font)
    return pic
