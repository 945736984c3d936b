"""DICOM networking: the Storage SCP and what it needs to understand a received dataset."""
