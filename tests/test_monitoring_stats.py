"""RIS labels import and live performance figures, on SQLite and the real PostgreSQL.

The scenario is constructed so that the truth is known: 100 one-image studies, 30 with pneumonia;
the model flags 24 of them and 7 of the 70 others.  Every study gets a RIS label, readers complete
every flagged study (one of them against the RIS), so sensitivity, NPV and PPV are known exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicom_support import migrated_sessions_for
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import (
    Instance, InstanceState, Label, Prediction, Series, Study, WorklistItem, WorklistStatus, utcnow,
)
from pacsbridge.store.reasons import Reason, join_reasons, reasons_json
from pacsbridge.validation.live import live_stats
from pacsbridge.validation.ris_labels import LabelsImportError, import_labels, match_labels
from pacsbridge.validation.stats import wilson_interval

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path: Path):
    """A migrated database: a SQLite file, or a fresh schema on the test PostgreSQL (dicom_support)."""
    yield from migrated_sessions_for(request.param, tmp_path / "pb.db")


def _study(session, uid: str, *, accession: str | None = None, probability: float | None = None,
           threshold: float = 0.5, refused: str | None = None, at=None, model_id: str = "m") -> Study:  # noqa: ANN001
    at = at or utcnow()
    study = Study(study_instance_uid=uid, accession_number=accession, created_at=at)
    session.add(study)
    session.flush()
    series = Series(study_id=study.id, series_instance_uid=uid + ".1", modality="CR")
    session.add(series)
    session.flush()
    inst = Instance(series_id=series.id, sop_instance_uid=uid + ".1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                    transfer_syntax_uid="1.2.840.10008.1.2.1", file_path=f"x/{uid}.dcm", file_size=1,
                    state=InstanceState.NOT_ANALYSED.value if refused else InstanceState.PREDICTED.value,
                    state_reason=refused, received_at=at)
    session.add(inst)
    session.flush()
    if probability is not None:
        session.add(Prediction(instance_id=inst.id, probability=probability, positive=probability >= threshold,
                               threshold=threshold, model_id=model_id, weights_sha256="ab" * 32, created_at=at))
    return study


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# -- labels import ---------------------------------------------------------------------------------

def test_import_bad_rows_named_idempotent_and_matched_later(sessions, tmp_path: Path) -> None:
    with sessions.begin() as s:
        _study(s, "1.2.3.1", accession="ACC1", probability=0.9)
    csv_path = _write(tmp_path / "ris-2026-11.csv", [
        "study_instance_uid,accession_number,finding,reported_at",
        "1.2.3.1,,pneumonia,2026-11-30T10:00:00Z",      # a study already received
        ",ACC2,No_Pneumonia,2026-11-30",                 # arrives later (by accession)
        "1.2.3.3,,other,",                               # arrives later (by UID)
        ",,pneumonia,",                                  # no key
        "1.2.x.4,,pneumonia,",                           # not a UID
        ",ACCESSION-NUMBER-TOO-LONG,pneumonia,",         # accession over 16 characters
        "1.2.3.5,,maybe,",                               # unknown finding
        "1.2.3.6,,pneumonia,yesterday",                  # bad reported_at
        "1.2.3.7,,pneumonia,",                           # conflicting duplicate: both lines unusable
        "1.2.3.7,,no_pneumonia,",
        "1.2.3.3,,other,",                               # identical duplicate: harmless
    ])
    with sessions.begin() as s:
        r = import_labels(s, csv_path).as_dict()
    assert (r["source"], r["rows"], r["added"], r["updated"], r["unchanged"], r["matched"]) == \
        ("ris-2026-11.csv", 11, 3, 0, 0, 1)
    assert [(b["line"], b["reason"].split(" ")[0]) for b in r["bad"]] == [
        (5, "no"), (6, "study_instance_uid"), (7, "accession_number"), (8, "unknown"), (9, "reported_at"),
        (10, "finding"), (11, "finding")]
    assert "maybe" in r["bad"][3]["reason"] and r["bad"][3]["key"] == "1.2.3.5"

    with sessions.begin() as s:  # the same file again changes nothing
        again = import_labels(s, csv_path).as_dict()
    assert (again["added"], again["updated"], again["unchanged"]) == (0, 0, 3)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == 3
        reported = s.scalar(select(Label.reported_at).where(Label.study_key == "uid:1.2.3.1"))
        assert reported is not None and reported.day == 30

    with sessions.begin() as s:  # the two other studies arrive; the scheduler's job links their labels
        _study(s, "1.2.3.2", accession="ACC2", probability=0.1)
        _study(s, "1.2.3.3", accession="ACC3", probability=0.2)
    with sessions.begin() as s:
        assert match_labels(s) == 2
        assert match_labels(s) == 0
    with sessions() as s:
        linked = dict(s.execute(select(Label.study_key, Study.study_instance_uid).join(Study, Study.id == Label.study_id)).all())
    assert linked == {"uid:1.2.3.1": "1.2.3.1", "acc:ACC2": "1.2.3.2", "uid:1.2.3.3": "1.2.3.3"}

    # A corrected file of the same name updates the finding (and only that row).
    _write(csv_path, ["study_instance_uid,finding", "1.2.3.3,pneumonia"])
    with sessions.begin() as s:
        fix = import_labels(s, csv_path).as_dict()
    assert (fix["added"], fix["updated"], fix["unchanged"]) == (0, 1, 0)


def test_import_unusable_files(sessions, tmp_path: Path) -> None:
    cases = {
        "empty.csv": [],
        "nofinding.csv": ["study_instance_uid,label", "1.2.3,pneumonia"],
        "nokey.csv": ["patient,finding", "x,pneumonia"],
    }
    for name, lines in cases.items():
        p = tmp_path / name
        p.write_text("\n".join(lines))
        with sessions.begin() as s, pytest.raises(LabelsImportError) as exc:
            import_labels(s, p)
        assert name in str(exc.value)
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00bad")
    with sessions.begin() as s, pytest.raises(LabelsImportError, match="not UTF-8"):
        import_labels(s, tmp_path / "bin.csv")
    with sessions.begin() as s, pytest.raises(LabelsImportError, match="cannot read"):
        import_labels(s, tmp_path / "missing.csv")
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == 0


# -- live performance ------------------------------------------------------------------------------

def _scenario(sessions, tmp_path: Path, *, days_ago: float = 1.0) -> None:  # noqa: ANN001
    """100 studies: 0-29 pneumonia (0-23 flagged), 30-99 not (30-36 flagged); RIS labels for all."""
    at = utcnow() - timedelta(days=days_ago)
    lines = ["study_instance_uid,accession_number,finding"]
    with sessions.begin() as s:
        for i in range(100):
            pneumonia = i < 30
            flagged = i < 24 or 30 <= i < 37
            _study(s, f"9.9.{i}", accession=f"A{i}", probability=0.8 if flagged else 0.2, at=at)
            finding = "pneumonia" if pneumonia else ("other" if i % 10 == 5 else "no_pneumonia")
            lines.append(f"9.9.{i},,{finding}" if i % 2 else f",A{i},{finding}")  # half by accession
        _study(s, "9.9.900", refused="image unlike this model's training data (out-of-distribution score 3.10 > "
                                     "threshold 2.00): outside its intended use", at=at)
        _study(s, "9.9.901", refused="not a chest image (BodyPartExamined HAND)", at=at)
    with sessions.begin() as s:
        assert not import_labels(s, _write(tmp_path / "ris.csv", lines)).bad
    with sessions.begin() as s:
        studies = {st.study_instance_uid: st for st in s.scalars(select(Study))}
        for i in [*range(24), *range(30, 37)]:
            st = studies[f"9.9.{i}"]
            finding = "pneumonia" if i < 30 else "no_pneumonia"
            if i == 0:
                finding = "no_pneumonia"  # a reader disagrees with the RIS on study 0
            s.add(WorklistItem(study_id=st.id, ups_uid=f"2.25.{i + 1}", priority=1.0, probability=0.8,
                               status=WorklistStatus.COMPLETED.value, first_positive_at=at, finding=finding,
                               completed_at=at + timedelta(minutes=10 + i), completed_by="anna"))


def test_live_figures_on_a_scenario_with_known_truth(sessions, tmp_path: Path) -> None:
    _scenario(sessions, tmp_path)
    with sessions() as s:
        out = live_stats(s)
    [m] = out["models"]
    assert (m["model_id"], m["calibration"], m["scored"], m["flagged"]) == ("m", "model", 100, 31)
    # Readers: 31 flagged studies read, 23 pneumonia (study 0 read as no pneumonia).
    assert m["completed"] == {"pneumonia": 23, "no_pneumonia": 8, "other": 0} and m["completed_total"] == 31
    assert m["ppv"] == round(23 / 31, 4)
    lo, hi = wilson_interval(23, 31)
    assert m["ppv_ci"] == [round(lo, 4), round(hi, 4)]
    # RIS: 24 of 30 pneumonias flagged; 63 of 69 unflagged are not pneumonia.
    sens = m["sensitivity"]
    assert (sens["value"], sens["n"], sens["method"]) == (0.8, 30, "ris_labels")
    lo, hi = wilson_interval(24, 30)
    assert sens["ci"] == [round(lo, 4), round(hi, 4)] and lo < 0.8 < hi
    assert m["npv"]["value"] == round(63 / 69, 4) and m["npv"]["n"] == 69
    assert m["ris_labelled"] == {"true_positive": 24, "false_negative": 6, "true_negative": 63, "false_positive": 7}
    t = m["receipt_to_completion_s"]
    assert t["n"] == 31 and t["p50"] == pytest.approx((10 + 15) * 60, abs=1)  # median of studies 0-23, 30-36: the 16th, study 15
    assert m["window"]["scored"] == 100 and m["window"]["sensitivity"]["value"] == 0.8
    assert m["audit"] == {"sampled": 0, "completed": 0, "pneumonia": 0}
    assert out["refused"]["total"] == {"image unlike this model's training data": 1, "not a chest image": 1}
    assert out["refused_codes"]["total"] == {"ood": 1, "body_part": 1}  # rows without a reason list: their text
    assert out["labels"] == {"ris": 100, "ris_matched": 100, "ris_unmatched": 0, "reader": 31, "disagreements": 1}

    # A window that starts after the scenario: the totals stay, the window is empty.
    with sessions() as s:
        later = live_stats(s, since=utcnow() - timedelta(hours=1))
    [m] = later["models"]
    assert m["scored"] == 100 and m["window"]["scored"] == 0 and m["window"]["sensitivity"]["value"] is None
    assert later["refused"]["window"] == {}


def test_no_labels_no_sensitivity(sessions) -> None:
    with sessions.begin() as s:
        _study(s, "7.7.1", probability=0.9)
        _study(s, "7.7.2", probability=0.1, model_id="other-model")
    with sessions() as s:
        out = live_stats(s)
    assert [m["model_id"] for m in out["models"]] == ["m", "other-model"]
    for m in out["models"]:
        assert m["sensitivity"]["value"] is None and m["sensitivity"]["method"] == "none"
        assert m["ppv"] is None and m["ppv_ci"] is None


def test_cli_labels_import_and_stats(tmp_path: Path) -> None:
    db = tmp_path / "pacsbridge.db"
    engine = make_engine(f"sqlite:///{db}")
    migrations.upgrade(engine)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        _study(s, "5.5.1", probability=0.9)
        _study(s, "5.5.2", probability=0.1)
    engine.dispose()
    env = {"PACSBRIDGE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pacsbridge", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    good = _write(tmp_path / "ris.csv", ["study_instance_uid,finding", "5.5.1,pneumonia", "5.5.2,pneumonia",
                                          "5.5.3,no_pneumonia", "5.5.4,perhaps"])
    r = run("labels", "import", str(good))
    assert r.returncode == 1
    assert "4 rows: 3 added, 0 updated, 0 unchanged, 1 not usable; 2 labels" in r.stdout
    assert r.stderr.strip() == "pacsbridge: labels import: line 5: 5.5.4: unknown finding 'perhaps' " \
                               "(pneumonia, no_pneumonia, other)"
    r = run("labels", "import", str(good), "--json")
    assert json.loads(r.stdout)["unchanged"] == 3
    bad = _write(tmp_path / "bad.csv", ["uid,finding"])
    r = run("labels", "import", str(bad))
    assert r.returncode == 1 and "nothing imported" in r.stderr and "Traceback" not in r.stderr
    r = run("stats", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mode"] == "live" and out["models"][0]["sensitivity"]["value"] == 0.5
    r = run("stats")
    assert r.returncode == 0 and "sensitivity 50.0%" in r.stdout and "(ris_labels)" in r.stdout
    r = run("stats", "--since", "last tuesday")
    assert r.returncode == 1 and r.stderr.startswith("pacsbridge: stats: --since:")


def test_refusals_by_code_count_every_reason_of_an_image(sessions) -> None:
    """An image refused for its age and its body part counts under both codes, in total and in the
    window; one refused before the window counts in total only."""
    now = utcnow()
    both = [Reason("age", "patient age 64 y is outside this model's intended use (1-5 y)"),
            Reason("body_part", "body part HAND is not chest")]
    with sessions.begin() as s:
        for uid, reasons, at in (("5.5.1", both, now), ("5.5.2", both[1:], now - timedelta(days=40)),
                                 ("5.5.3", [Reason("ood", "image unlike this model's training data")], now)):
            study = _study(s, uid, refused=join_reasons(reasons), at=at)
            inst = s.scalars(select(Instance).join(Series).where(Series.study_id == study.id)).one()
            inst.state_reasons = reasons_json(reasons)
    with sessions() as s:
        out = live_stats(s, now=now)
    assert out["refused_codes"] == {"total": {"age": 1, "body_part": 2, "ood": 1},
                                    "window": {"age": 1, "body_part": 1, "ood": 1}}
    assert sum(out["refused"]["total"].values()) == 3  # the images themselves, once each
