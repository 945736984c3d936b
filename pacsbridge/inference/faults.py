"""Fault of the system or property of the image: the one test both scoring paths use.

The imaging layer turns everything that goes wrong while reading and decoding into
:class:`~pacsbridge.imaging.NotAnalysable`, chained to the original exception.  Most of those are
about the image (pydicom or a codec choking on its bytes) and stay a refusal; a few are faults of
the system that a later attempt may not meet (see :func:`system_fault`).
"""

from __future__ import annotations

import errno


def system_fault(exc: BaseException) -> BaseException | None:
    """The fault of the system behind ``exc`` (itself, or what it was raised from), or None.

    A MemoryError, or an OS error with an errno (EIO, EACCES, ENOENT...) from a system call.
    pydicom and Pillow also raise OSError for corrupt data, but without an errno: that is the
    image's, and stays a refusal.
    """
    for candidate in (exc, exc.__cause__ or exc.__context__):
        if isinstance(candidate, MemoryError):
            return candidate
        if isinstance(candidate, OSError) and candidate.errno in errno.errorcode:
            return candidate
    return None
