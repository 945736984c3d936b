"""Site validation, without the CLI: labels CSV, statistics against hand-computed values, the site
threshold rule, the sample floor, calibration files and applying them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pacsbridge.model.artifact import load_model
from pacsbridge.validation import stats
from pacsbridge.validation.calibration import (CalibrationError, apply_calibration, calibration_id, ood_ceiling,
                                               read_calibration, write_calibration)
from pacsbridge.validation.labels import LabelsError, read_labels
from pacsbridge.validation.run import (ImageRecord, Options, Unit, ValidationInputError, calibration_content, join,
                                       validate)
from pipeline_support import SHIPPED_MODEL, export_model


def _csv(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# -- statistics --------------------------------------------------------------------------------
def test_wilson_interval_matches_hand_computation() -> None:
    # 8/10, z = 1.96: centre (0.8 + 1.9208/10) / 1.38416 = 0.71675, half 1.96 * sqrt(0.025604) / 1.38416 = 0.22658
    lo, hi = stats.wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=2e-4) and hi == pytest.approx(0.94334, abs=2e-4)
    # 0/20 and 20/20: the interval stays inside [0, 1] and is not degenerate
    lo, hi = stats.wilson_interval(0, 20)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.16113, abs=2e-4)
    lo, hi = stats.wilson_interval(20, 20)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 0.16113, abs=2e-4)
    assert stats.wilson_interval(0, 0) is None
    # one-sided 95 % lower bound, z = 1.6449: 95/100 -> centre (0.95 + 0.013528) / 1.027055 = 0.93813,
    # half 1.6449 * sqrt(0.000475 + 0.0000676) / 1.027055 = 0.03731 -> 0.90083
    assert stats.wilson_lower(95, 100, 0.95) == pytest.approx(0.90083, abs=2e-4)


def test_auc_and_delong_interval_match_hand_computation() -> None:
    # pos 0.9, 0.8, 0.4; neg 0.7, 0.3: 5 of 6 pairs ordered -> AUC 5/6.
    # Placements V10 = [1, 1, 0.5] (var 1/12), V01 = [2/3, 1] (var 1/18); var = (1/12)/3 + (1/18)/2 = 1/18.
    r = stats.auc_delong([0.9, 0.8, 0.4], [0.7, 0.3])
    assert r.auc == pytest.approx(5 / 6)
    assert r.se == pytest.approx(math.sqrt(1 / 18))
    assert r.ci[0] == pytest.approx(5 / 6 - 1.959964 * math.sqrt(1 / 18), abs=1e-5)
    assert r.ci[1] == 1.0  # clipped
    # ties count one half
    assert stats.auc_delong([0.5, 0.5], [0.5, 0.2]).auc == pytest.approx(0.75)
    assert stats.auc_delong([1.0], []) is None


def test_delong_interval_covers_the_truth_in_simulation() -> None:
    """Binormal scores with known AUC Phi(1/sqrt 2 * d): the 95 % interval covers it in about 95 % of draws."""
    from statistics import NormalDist

    rng = np.random.default_rng(7)
    d = 1.5
    truth = NormalDist().cdf(d / math.sqrt(2))
    covered = 0
    for _ in range(300):
        r = stats.auc_delong(rng.normal(d, 1, 80), rng.normal(0, 1, 120))
        covered += r.ci[0] <= truth <= r.ci[1]
    assert 0.90 <= covered / 300 <= 0.99


# -- the site threshold rule -------------------------------------------------------------------
def test_site_threshold_is_the_highest_meeting_the_lower_bound() -> None:
    rng = np.random.default_rng(3)
    scores = list(rng.uniform(0, 1, 200))
    t, k = stats.site_threshold(scores, 0.90, 0.95)
    detected = sum(s >= t for s in scores)
    assert detected == k
    assert stats.wilson_lower(k, 200, 0.95) >= 0.90
    assert stats.wilson_lower(k - 1, 200, 0.95) < 0.90  # one step higher would not meet it
    assert k / 200 > 0.90 + 0.02  # the observed sensitivity carries the margin


def test_site_threshold_meets_the_target_in_truth_where_the_plain_quantile_does_not() -> None:
    """Scores of positives uniform on (0, 1): true sensitivity at t is 1 - t.  Over repeated sites of 200
    positives the rule keeps the true sensitivity >= target about 95 % of the time; the empirical
    quantile only about half the time."""
    rng = np.random.default_rng(11)
    target, reps = 0.95, 400
    rule_ok = quantile_ok = 0
    for _ in range(reps):
        scores = rng.uniform(0, 1, 200)
        t, _ = stats.site_threshold(list(scores), target, 0.95)
        rule_ok += (1 - t) >= target
        q = np.sort(scores)[::-1][math.ceil(target * 200) - 1]  # lowest t with observed sensitivity >= target
        quantile_ok += (1 - q) >= target
    assert rule_ok / reps >= 0.90
    assert quantile_ok / reps <= 0.75


def test_refused_positives_count_as_misses_and_too_few_gives_none() -> None:
    assert stats.site_threshold([0.9] * 10 + [None] * 10, 0.8, 0.95) is None  # at most half detectable
    t, k = stats.site_threshold([0.9, 0.8, 0.7, 0.6, 0.5] * 40, 0.5, 0.95)
    assert k < 200 and t > 0.5
    assert stats.site_threshold([0.9, 0.9, 0.9], 0.99, 0.95) is None


def test_ood_keep_cut_keeps_the_share_with_confidence() -> None:
    v = list(range(1, 1001))
    cut = stats.keep_cut(v, 0.97, 0.95)
    k = sum(x <= cut for x in v)
    assert stats.wilson_lower(k, 1000, 0.95) >= 0.97 > stats.wilson_lower(k - 1, 1000, 0.95)
    assert 970 < k < 1000
    assert stats.keep_cut([1.0, 2.0, 3.0], 0.97, 0.95) == 3.0  # too few: keep them all
    # Future images from the same distribution (uniform): the share kept is >= 0.97 in most draws.
    rng = np.random.default_rng(5)
    ok = sum(stats.keep_cut(list(rng.uniform(0, 1, 400)), 0.97, 0.95) >= 0.97 for _ in range(300))
    assert ok / 300 >= 0.90


# -- labels CSV --------------------------------------------------------------------------------
def test_labels_values_any_case_and_key_precedence(tmp_path: Path) -> None:
    p = _csv(tmp_path, "accession_number,sop_instance_uid,label\nA1,1.2.3,PNEUMONIA\nA2,1.2.4,Normal\nA3,1.2.5,1\nA4,1.2.6,0\n")
    lab = read_labels(p)
    assert lab.key_column == "sop_instance_uid"  # the first present of path, sop, study, accession
    assert [(r.key, r.label) for r in lab.rows] == [("1.2.3", 1), ("1.2.4", 0), ("1.2.5", 1), ("1.2.6", 0)]
    assert read_labels(_csv(tmp_path, "label;study_instance_uid\nnormal;9.9\n", "b.csv")).key_column == "study_instance_uid"


def test_labels_bad_rows_are_counted_with_reasons(tmp_path: Path) -> None:
    p = _csv(tmp_path, "path,label\na.dcm,pneumonia\nb.dcm,maybe\n,normal\nc.dcm,normal\nc.dcm,pneumonia\n\nd.dcm,1\n")
    lab = read_labels(p)
    assert [r.key for r in lab.rows] == ["a.dcm", "d.dcm"]
    reasons = {(line, why.split(" ")[0]) for line, _, why in lab.bad}
    assert reasons == {(3, "unknown"), (4, "empty"), (5, "duplicate"), (6, "duplicate")}
    assert lab.total_rows == 6


@pytest.mark.parametrize("text,msg", [
    ("", "empty"),
    ("path,finding\na,1\n", "no 'label' column"),
    ("file,label\na,1\n", "no key column"),
])
def test_labels_file_that_cannot_be_used(tmp_path: Path, text: str, msg: str) -> None:
    with pytest.raises(LabelsError, match=msg):
        read_labels(_csv(tmp_path, text))
    with pytest.raises(LabelsError, match="cannot read"):
        read_labels(tmp_path / "missing.csv")


def _records(tmp_path: Path, names: list[str]) -> list[ImageRecord]:
    out = []
    for i, n in enumerate(names):
        p = tmp_path / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        out.append(ImageRecord(p, f"1.2.{i}", 0.1 * i, 0.0, None))
    return out


def test_join_by_path_name_and_sop(tmp_path: Path) -> None:
    recs = _records(tmp_path, ["d/a.dcm", "d/b.dcm", "d/sub/c.dcm", "e/sub2/c.dcm", "d/extra.dcm"])
    p = _csv(tmp_path, "path,label\na.dcm,1\nsub/c.dcm,0\nc.dcm,1\nnope.dcm,0\n"
             f"{tmp_path / 'd' / 'b.dcm'},0\n../d/a.dcm,1\n")
    units, acc = join(read_labels(p), recs, [tmp_path / "d", tmp_path / "e"])
    assert [u.key for u in units] == ["a.dcm", "sub/c.dcm", str(tmp_path / "d" / "b.dcm")]
    why = {b["key"]: b["reason"] for b in acc["unusable"]}
    assert "matches 2 files" in why["c.dcm"] and why["nope.dcm"] == "matches no file found"
    assert why["../d/a.dcm"].startswith("same file as line")
    assert acc["files_without_label"] == 2 and acc["rows_unusable"] == 3 and acc["rows"] == 6
    units, acc = join(read_labels(_csv(tmp_path, "sop_instance_uid,label\n1.2.0,1\n1.2.9,0\n", "s.csv")), recs, [])
    assert [u.images[0].path.name for u in units] == ["a.dcm"] and acc["rows_unusable"] == 1


# -- validate(): accounting, the floor, the proposed point -------------------------------------
@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return load_model(export_model(tmp_path_factory.mktemp("m"), threshold=0.5), "cpu")


def _units(n_pos: int, n_neg: int, seed: int = 0) -> list[Unit]:
    rng = np.random.default_rng(seed)
    units = []
    for i in range(n_pos + n_neg):
        label = int(i < n_pos)
        p = float(np.clip(rng.normal(0.75 if label else 0.25, 0.15), 0.001, 0.999))
        units.append(Unit(f"k{i}", label, [ImageRecord(Path(f"f{i}.dcm"), f"1.9.{i}", p, None, None)]))
    return units


def _acc(n: int, bad: int = 0) -> dict:
    return {"key_column": "path", "rows": n + bad, "rows_used": n, "rows_unusable": bad,
            "unusable": [{"line": 2, "key": "x", "reason": "matches no file found"}] * bad, "files_found": n,
            "files_without_label": 0, "files_without_label_examples": []}


def test_validate_refuses_a_calibration_below_the_floor(small_model) -> None:
    units = _units(40, 80)
    r = validate(units, _acc(len(units)), small_model, Options(min_per_class=50, target_sensitivity=0.9))
    assert r["proposed"]["threshold"] is not None
    assert "40 pneumonia and 80 normal" in r["calibration_refused"]
    r = validate(units, _acc(len(units)), small_model, Options(min_per_class=40, target_sensitivity=0.9))
    assert r["calibration_refused"] is None
    # 40 positives cannot show 0.95 with 95 % confidence even if all are found (40/40: lower bound 0.937)
    r = validate(units, _acc(len(units)), small_model, Options(min_per_class=40, target_sensitivity=0.95,
                                                               confidence=0.95))
    assert r["proposed"]["threshold"] is None and "no threshold reaches" in r["calibration_refused"]


def test_validate_result_keys_and_the_proposed_point_meets_the_bound(small_model) -> None:
    units = _units(120, 150, seed=2)
    r = validate(units, _acc(len(units)), small_model, Options(target_sensitivity=0.9))
    for key in ("n", "scored", "refused", "auc", "auc_ci", "at_current", "proposed"):
        assert key in r
    for point in (r["at_current"], r["proposed"]):
        for key in ("threshold", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "ppv", "npv",
                    "ood_threshold"):
            assert key in point
    p = r["proposed"]
    assert stats.wilson_lower(p["tp"], p["tp"] + p["fn"], r["confidence"]) >= 0.9
    assert r["at_current"]["threshold"] == 0.5 and r["n"] == 270 and r["scored"] == 270
    assert json.loads(json.dumps(r)) == r  # plain JSON


def test_refused_pneumonia_is_a_miss_in_the_triage_view(small_model) -> None:
    units = _units(60, 60, seed=4)
    for u in units[:6]:
        u.images[0] = ImageRecord(Path("r.dcm"), None, None, None, "not a chest radiograph (BodyPartExamined HIP)")
    r = validate(units, _acc(len(units)), small_model, Options())
    cur = r["at_current"]
    assert cur["fn"] >= 6 and cur["scored_only"]["fn"] == cur["fn"] - 6
    assert r["refused"] == {"not a chest radiograph": 6}


def test_too_many_unusable_rows_is_an_input_error(small_model) -> None:
    units = _units(5, 5)
    with pytest.raises(ValidationInputError, match="3 of 13 label rows are unusable"):
        validate(units, _acc(10, bad=3), small_model, Options(max_unusable_share=0.1))
    with pytest.raises(ValidationInputError, match="no labelled file"):
        validate([], _acc(0), small_model, Options())


# -- calibration files -------------------------------------------------------------------------
def test_calibration_round_trip_and_apply(tmp_path: Path, small_model) -> None:
    units = _units(60, 60, seed=5)
    r = validate(units, _acc(len(units)), small_model, Options())
    content = calibration_content(r)
    f = tmp_path / "cal.json"
    cal_id = write_calibration(f, content)
    data, got_id = read_calibration(f)
    assert got_id == cal_id == calibration_id(f.read_bytes()) and cal_id.startswith("site-")
    assert data["threshold"] == r["proposed"]["threshold"] and data["weights_sha256"] == small_model.weights_sha256
    assert data["data"]["n_pneumonia"] == 60 and data["data"]["sha256"] == r["data_sha256"]
    applied = apply_calibration(small_model, data, cal_id)
    assert applied.threshold == data["threshold"] and applied.calibration_id == cal_id
    assert small_model.threshold == 0.5 and small_model.calibration_id == "model"  # the original is untouched


def test_a_calibration_for_other_weights_is_refused(tmp_path: Path, small_model) -> None:
    f = tmp_path / "cal.json"
    write_calibration(f, {"model_id": "other", "weights_sha256": "ab" * 32, "threshold": 0.3, "ood_threshold": None})
    data, cal_id = read_calibration(f)
    with pytest.raises(CalibrationError, match="made for model other"):
        apply_calibration(small_model, data, cal_id, source=f)


@pytest.mark.parametrize("content,msg", [
    (b"{not json", "not valid JSON"),
    (b'{"format": "something else"}', "not a pacsbridge site calibration"),
    (b'{"format": "pacsbridge-site-calibration-1", "threshold": 1.5, "model_id": "m", "weights_sha256": "x"}',
     "threshold must be"),
    (b'{"format": "pacsbridge-site-calibration-1", "threshold": 0.5, "model_id": "m"}', "weights_sha256 is missing"),
])
def test_unusable_calibration_files(tmp_path: Path, content: bytes, msg: str) -> None:
    f = tmp_path / "cal.json"
    f.write_bytes(content)
    with pytest.raises(CalibrationError, match=msg):
        read_calibration(f)
    with pytest.raises(CalibrationError, match="cannot read"):
        read_calibration(tmp_path / "absent.json")


@pytest.fixture(scope="module")
def shipped():
    return load_model(SHIPPED_MODEL, "cpu")


def test_site_ood_cut_applies_and_may_not_be_looser_than_the_ceiling(tmp_path: Path, shipped) -> None:
    ceiling = ood_ceiling(shipped)
    assert ceiling is not None
    base = {"model_id": shipped.model_id, "weights_sha256": shipped.weights_sha256, "threshold": 0.2}
    own = shipped.ood.threshold
    assert own <= ceiling
    write_calibration(tmp_path / "ok.json", {**base, "ood_threshold": own * 0.8})  # stricter than the model's
    data, cal_id = read_calibration(tmp_path / "ok.json")
    applied = apply_calibration(shipped, data, cal_id)
    assert applied.ood.threshold == pytest.approx(own * 0.8)
    assert applied.is_out_of_distribution(own * 0.9) and not shipped.is_out_of_distribution(own * 0.9)
    if ceiling > own:  # looser than the model's own cut, but within the ceiling: allowed
        write_calibration(tmp_path / "wide.json", {**base, "ood_threshold": (own + ceiling) / 2})
        data, cal_id = read_calibration(tmp_path / "wide.json")
        wide = apply_calibration(shipped, data, cal_id)
        between = (own + (own + ceiling) / 2) / 2
        assert shipped.is_out_of_distribution(between) and not wide.is_out_of_distribution(between)
    write_calibration(tmp_path / "loose.json", {**base, "ood_threshold": ceiling * 2})
    data, cal_id = read_calibration(tmp_path / "loose.json")
    with pytest.raises(CalibrationError, match="looser than the model's ceiling"):
        apply_calibration(shipped, data, cal_id)


def test_sr_and_hl7_carry_the_calibration() -> None:
    from pacsbridge.forward.hl7_oru import build_oru
    from pacsbridge.forward.results import Result
    from pacsbridge.forward.sr import build_sr
    from pipeline_support import synthetic_chest

    src = synthetic_chest(1)
    result = Result(prediction_id=3, probability=0.8, positive=True, threshold=0.4, model_id="m",
                    weights_sha256="0123456789abcdef" * 4, sop_instance_uid=src.SOPInstanceUID,
                    sop_class_uid=src.SOPClassUID, series_instance_uid=src.SeriesInstanceUID,
                    study_instance_uid=src.StudyInstanceUID, file_path="x.dcm", calibration="site-0123456789ab")
    msg = str(build_oru(result, src, control_id="C1", sending_application="PB", sending_facility="",
                        receiving_application="RIS", receiving_facility=""))
    assert "111002^Algorithm Parameters^DCM||calibration=site-0123456789ab" in msg
    sr = build_sr(result, src, ae_title="PACSBRIDGE")

    def texts(items) -> list[tuple[str, str]]:
        out = []
        for item in items:
            if "TextValue" in item:
                out.append((item.ConceptNameCodeSequence[0].CodeMeaning, str(item.TextValue)))
            out += texts(item.get("ContentSequence", []))
        return out

    assert ("Algorithm Parameters", "calibration=site-0123456789ab") in texts(sr.ContentSequence)


def test_site_calibration_setting(tmp_path: Path, monkeypatch) -> None:
    from pacsbridge.config import load_settings

    for key in list(__import__("os").environ):
        if key.startswith("PACSBRIDGE_"):
            monkeypatch.delenv(key)
    assert load_settings().site_calibration is None
    cfg = tmp_path / "etc" / "pacsbridge.toml"
    cfg.parent.mkdir()
    cfg.write_text('site_calibration = "site.json"\nvalidation_min_per_class = 80\n')
    s = load_settings(cfg)
    assert s.site_calibration == tmp_path / "etc" / "site.json" and s.validation_min_per_class == 80
    monkeypatch.setenv("PACSBRIDGE_SITE_CALIBRATION", "")
    assert load_settings().site_calibration is None


def test_study_labels_apply_to_all_images_and_the_study_scores_its_highest(tmp_path: Path, small_model) -> None:
    from pacsbridge.validation.run import evaluate_units
    from pipeline_support import synthetic_chest

    recs = []
    for i, (study, acc, prob) in enumerate([("1.2.9.1", "ACC1", 0.2), ("1.2.9.1", "ACC1", 0.7), ("1.2.9.2", "ACC2", 0.4)]):
        ds = synthetic_chest(i, rows=64, cols=64, study_uid=study)
        ds.AccessionNumber = acc
        p = tmp_path / f"{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        recs.append(ImageRecord(p, ds.SOPInstanceUID, prob, None, None))
    recs.append(ImageRecord(tmp_path / "junk.txt", None, None, None, "not a DICOM file"))
    (tmp_path / "junk.txt").write_text("x")
    for column, keys in (("study_instance_uid", ("1.2.9.1", "1.2.9.2", "1.2.9.3")), ("accession_number", ("ACC1", "ACC2", "ACC3"))):
        labels = read_labels(_csv(tmp_path, f"{column},label\n{keys[0]},pneumonia\n{keys[1]},normal\n{keys[2]},normal\n", f"{column}.csv"))
        units, acc = join(labels, recs, [tmp_path])
        assert [(u.key, len(u.images)) for u in units] == [(keys[0], 2), (keys[1], 1)]
        assert acc["rows_unusable"] == 1 and acc["files_without_label"] == 1
        assert [o.score for o in evaluate_units(units, small_model, None)] == [0.7, 0.4]
