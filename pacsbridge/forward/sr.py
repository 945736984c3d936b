"""The AI result as a DICOM Comprehensive SR: a TID 1500 Measurement Report built with highdicom.

Content tree (what a PACS viewer shows as a structured report):

    Imaging Measurement Report (TID 1500)
      observer: device (pacsbridge, its AE title and version)
      procedure reported: chest radiograph
      Imaging Measurements
        Measurement Group (TID 1501)
          tracking identifier/UID, algorithm name + version (model id, weights hash)
          finding: Pneumonia (SCT 233604007) = Present | Absent (SCT)
          AI triage positive = Yes | No
          Probability (DCM 122157), Threshold Value (DCM 122411), unitless ratios
          source image: the scored instance (SOP class + instance UID)

It is put in the source study (same Study Instance UID, patient module copied by highdicom from
the source) in a series of its own, with UIDs derived from the result (see results.py).
"""

from __future__ import annotations

import logging

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from .. import __version__
from .header_values import header_values
from .results import Result, device_uid

log = logging.getLogger(__name__)

PNEUMONIA = CodedConcept("233604007", "SCT", "Pneumonia")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
YES = CodedConcept("373066001", "SCT", "Yes")
NO = CodedConcept("373067005", "SCT", "No")
AI_POSITIVE = CodedConcept("AI-POSITIVE", "99PACSBRIDGE", "AI triage positive")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
THRESHOLD = CodedConcept("122411", "DCM", "Threshold Value")
RATIO = CodedConcept("1", "UCUM", "no units")
CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")

SR_SERIES_NUMBER = 9901
MANUFACTURER = "pacsbridge"


def build_sr(result: Result, source: Dataset, *, ae_title: str) -> hd.sr.ComprehensiveSR:
    """The SR for ``result``; ``source`` is the scored image's dataset (header is enough).

    highdicom validates the content tree and the IODs on construction (it raises on a violation).
    Only the source's patient/study values and UIDs are used, normalised per VR first
    (:mod:`.header_values`), so any header the receiver accepted gives a valid SR.
    """
    source = with_type2_patient_study(clean_source(source, f"SR for prediction {result.prediction_id}"))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(ae_title), name=ae_title, manufacturer_name=MANUFACTURER,
        model_name=f"pacsbridge {__version__}",
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device,
        ),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result.derived_uid("tracking"), identifier=f"pneumonia AI result {result.prediction_id}",
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(name=result.model_id, version=result.model_version,
                                                   parameters=[f"calibration={result.calibration}"]),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(PNEUMONIA, PRESENT if result.positive else ABSENT),
            hd.sr.QualitativeEvaluation(AI_POSITIVE, YES if result.positive else NO),
        ],
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=round(float(result.probability), 6), unit=RATIO),
            hd.sr.Measurement(name=THRESHOLD, value=round(float(result.threshold), 6), unit=RATIO),
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context, procedure_reported=CHEST_XRAY, imaging_measurements=[group],
    )
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=result.derived_uid("sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result.derived_uid("sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # a machine result, not verified by a person
        series_description="AI pneumonia triage (not for diagnostic use)",
    )


#: Type 2 attributes of the patient and study modules that highdicom copies from the evidence; a real
#: image may lack some of them (they are then present and empty in the SR, as the standard allows).
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def clean_source(source: Dataset, what: str) -> Dataset:
    """The values of ``source`` the result objects copy, normalised (notes logged, never the values)."""
    values = header_values(source)
    ds = values.dataset()
    for note in values.notes:
        log.info("%s: %s", what, note)
    return ds


def with_type2_patient_study(source: Dataset) -> Dataset:
    """``source`` (a shallow copy when needed) with the missing Type 2 patient/study attributes empty."""
    missing = [kw for kw in TYPE2_COPIED if kw not in source]
    if not missing:
        return source
    copy = Dataset()
    copy.update(source)
    if hasattr(source, "file_meta"):
        copy.file_meta = source.file_meta
    for kw in missing:
        setattr(copy, kw, None)
    return copy
