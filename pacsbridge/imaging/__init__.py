"""Pure imaging functions: DICOM -> display-ready 2-D float image; the quality gate.

No database, no network.  Use :func:`load_for_model`; it raises :class:`NotAnalysable`.
"""

from .decode import ImageResult, NotAnalysable, decode_display, load_for_model, read_dataset
from .quality import check_header, check_image

__all__ = [
    "ImageResult", "NotAnalysable", "check_header", "check_image", "decode_display",
    "load_for_model", "read_dataset",
]
