"""Forwarding: results to the reading PACS (DICOM SR, heatmap SC, original images) and the RIS (HL7
ORU), through a crash-safe outbox.  outbox.py owns the state; sr.py, heatmap_sc.py and hl7_oru.py
build objects; senders.py delivers them; forwarder.py is the scheduler job."""
