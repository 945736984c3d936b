"""Model artifact loading, the shared preprocessing and batch inference.

Nothing here knows about DICOM, the database or the network.
"""
