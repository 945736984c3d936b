"""One vocabulary of reason codes: ``code_of`` (store/reasons.py) gives every real reason text the
code the scoring path records for it, and ``pacsbridge_refusals_total`` counts refusals under those
codes, once per reason.

The texts are the gates' own (pacsbridge.scoring.Scorer on real images and variants of them, or the
gate functions themselves), never copied strings.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
from image_variants import blank, text_file, truncated, variant
from pipeline_support import SHIPPED_MODEL, export_model, sample_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacsbridge.imaging.quality import check_image
from pacsbridge.inference.gates import ood_refusal
from pacsbridge.model.artifact import load_model
from pacsbridge.scoring import FAILED, NOT_ANALYSED, Scorer
from pacsbridge.store.events import EventCounts
from pacsbridge.store.reasons import code_of, split_reasons

KIDS = {"age_years": {"min": 1, "max_exclusive": 6, "label": "1-5 y"}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The small test model with a 1-5 y age range on its card (so the age gate applies)."""
    pt = export_model(tmp_path_factory.mktemp("model"))
    card = json.loads(pt.with_suffix(".json").read_text())
    card["intended_use"] = KIDS
    pt.with_suffix(".json").write_text(json.dumps(card))
    return load_model(pt, "cpu")



def _no_anatomy(tmp: Path, name: str, **changes: object) -> Path:
    """No Body Part Examined, descriptions as given (neutral by default)."""
    plain = {"BodyPartExamined": None, "StudyDescription": "STUDY", "SeriesDescription": "SERIES",
             "ProtocolName": "PROTOCOL"}
    return variant(tmp, name, **{**plain, **changes})


def _view_code(tmp: Path) -> Path:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "R-10206", "SRT", "left lateral"
    return variant(tmp, "viewcode", ViewPosition="", ViewCodeSequence=Sequence([item]))


def _real_colour(tmp: Path) -> Path:
    """A CR whose three channels differ: passes the header, refused once decoded."""
    ds = pydicom.dcmread(variant(tmp, "rgb0"))
    rng = np.random.default_rng(0)
    ds.Rows = ds.Columns = 256
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8).tobytes()
    for kw in ("WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope"):
        if kw in ds:
            delattr(ds, kw)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    path = tmp / "rgb.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path





def _dangling(tmp: Path) -> Path:
    path = tmp / "gone.dcm"
    path.symlink_to(tmp / "nowhere.dcm")
    return path


Make = Callable[[Path], Path]
#: One input per gate text: how it is made, and the codes the scoring path must record for it
#: (the codes it gives through code_of itself are named here, so that they are checked too).
INPUTS: list[tuple[str, Make, list[str]]] = [
    ("adult age", lambda t: variant(t, "adult", PatientBirthDate="19400305"), ["age"]),
    ("body part", lambda t: variant(t, "hand", BodyPartExamined="HAND"), ["body_part"]),
    ("description names", lambda t: _no_anatomy(t, "knee", StudyDescription="KNEE"), ["body_part"]),
    ("laterality", lambda t: _no_anatomy(t, "side", ImageLaterality="R"), ["body_part"]),
    ("lateral view position", lambda t: variant(t, "lat", ViewPosition="LL"), ["view"]),
    ("oblique view position", lambda t: variant(t, "obl", ViewPosition="RLO"), ["view"]),
    ("view code sequence", _view_code, ["view"]),
    ("series says lateral", lambda t: variant(t, "serlat", ViewPosition=None, SeriesDescription="CHEST LAT",
                                               ProtocolName=None), ["view"]),
    ("modality", lambda t: variant(t, "ct", Modality="CT"), ["modality"]),
    ("no modality", lambda t: variant(t, "nomod", Modality=None, SOPClassUID="1.2.840.10008.5.1.4.1.1.2"),
     ["modality"]),
    ("colour in the header", lambda t: variant(t, "palette", PhotometricInterpretation="PALETTE COLOR"),
     ["colour"]),
    ("colour once decoded", _real_colour, ["colour"]),
    ("1-bit", lambda t: variant(t, "bits", BitsAllocated=1), ["bitmap"]),
    ("too small", lambda t: variant(t, "small", Rows=64), ["too_small"]),
    ("no pixel data", lambda t: variant(t, "nopixels", PixelData=None), ["pixel_data"]),
    ("blank", blank, ["blank"]),
    ("truncated (and aged 64)", truncated, ["age", "decode"]),
    ("not DICOM", text_file, ["not_dicom"]),
    ("a folder", lambda t: t, ["not_regular_file"]),
    ("file cannot be opened", _dangling, ["read_error"]),
]


def _assert_codes_agree(reasons: list) -> None:
    for r in reasons:
        assert code_of(r.text) == r.code, r.text
    joined = "; ".join(r.text for r in reasons)
    assert split_reasons(joined) == [r.text for r in reasons]


@pytest.mark.parametrize("name, make, codes", INPUTS, ids=[r[0] for r in INPUTS])
def test_code_of_each_real_reason_is_the_code_the_scoring_path_records(tmp_path, model, name, make,
                                                                      codes) -> None:
    [out] = Scorer(model).score([make(tmp_path)])
    assert out.state in (NOT_ANALYSED, FAILED) and [r.code for r in out.reasons] == codes, out.reasons
    _assert_codes_agree(out.reasons)


def test_too_large_and_the_gate_functions_get_the_scoring_codes(tmp_path, model) -> None:
    [out] = Scorer(model, max_decoded_bytes=1_000_000).score([variant(tmp_path, "big")])
    assert [r.code for r in out.reasons] == ["too_large"]
    _assert_codes_agree(out.reasons)
    # Texts the scoring path files under a fixed code (scoring.Scorer._decode and _decide).
    not_2d = check_image(np.zeros((4, 4, 3), dtype=np.float32))
    assert not_2d and "blank" not in not_2d and code_of(not_2d) == "quality"
    assert code_of(check_image(np.zeros((4, 4), dtype=np.float32)) or "") == "blank"
    for score in (9.1, float("nan")):
        assert code_of(ood_refusal(score, 3.0) or "") == "ood"


@pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason="shipped model missing")
def test_the_out_of_distribution_reason_of_the_shipped_model() -> None:
    [out] = Scorer(load_model(SHIPPED_MODEL, "cpu")).score([Path(sample_file("RG3_UNCR.dcm"))])
    assert [r.code for r in out.reasons] == ["body_part", "age", "ood"]
    _assert_codes_agree(out.reasons)


def test_refusals_are_counted_once_under_each_of_their_codes(tmp_path, model) -> None:
    """The counter reads the ``not_analysed`` events the worker writes (the joined text) and counts
    each refusal under every code it was refused for, a code repeated in one text once."""
    from pacsbridge.store import migrations
    from pacsbridge.store.db import make_engine, make_sessionmaker
    from pacsbridge.store.records import record_event

    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    migrations.upgrade(engine)
    sessions = make_sessionmaker(engine)
    sources = [Path(sample_file("RG3_UNCR.dcm")), variant(tmp_path, "lat", ViewPosition="LL"), _real_colour(tmp_path),
               variant(tmp_path, "both", PatientBirthDate="19400305", ViewPosition="LL", BodyPartExamined="HAND"),
               truncated(tmp_path)]
    outcomes = Scorer(model).score(sources)
    expected: Counter[str] = Counter()
    for o in outcomes:
        assert o.state == NOT_ANALYSED and o.reason
        record_event(sessions, "not_analysed", o.reason)
        expected.update({r.code for r in o.reasons})
    assert len(outcomes[3].reasons) == 3  # one image, three labels
    counts = EventCounts().read(sessions())
    assert counts["refusals"] == dict(expected)
    assert sum(expected.values()) > len(outcomes)
    engine.dispose()


def test_a_part_without_a_reason_of_its_own_stays_with_the_reason_before_it() -> None:
    assert split_reasons(None) == [] and split_reasons("") == []
    assert [code_of(t) for t in split_reasons("body part HAND is not chest; something unheard of")] == ["body_part"]
    assert [code_of(t) for t in split_reasons("something unheard of")] == ["other"]
