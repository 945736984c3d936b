"""pacsbridge: an AI triage bridge for chest radiographs (DICOM in, prioritized worklist out)."""

__version__ = "0.1.0"
