"""Pure imaging functions: DICOM -> display-ready 2-D float image; the quality gate.

No database, no network.  Use :func:`load_for_model`; it raises :class:`NotAnalysable`.
"""

from .decode import ImageResult, NotAnalysable, decode_display, load_for_model, read_dataset
from .limits import DEFAULT_MAX_DECODED_BYTES, check_decodable
from .quality import check_header, check_image

__all__ = [
    "DEFAULT_MAX_DECODED_BYTES", "ImageResult", "NotAnalysable", "check_decodable", "check_header", "check_image", "decode_display",
    "load_for_model", "read_dataset",
]
