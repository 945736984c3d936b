"""Fast tests of the training package and the shared preprocessing (no real data needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_training import metrics
from model_training.__main__ import main as train_main
from model_training.data import list_samples, patient_key, split_by_patient
from pacsbridge.model.artifact import ModelError, load_model
from pacsbridge.model.preprocess import INPUT_SIZE, preprocess, preprocess_batch

SHARED_TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray" / "train"


# --- preprocessing -------------------------------------------------------------------------

def test_preprocess_shape_dtype_and_standardization() -> None:
    img = np.random.default_rng(0).random((300, 500)).astype(np.float32)
    x = preprocess(img)
    assert x.shape == (1, INPUT_SIZE, INPUT_SIZE) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 0.05


def test_preprocess_squashes_without_keeping_aspect() -> None:
    # Left half dark, right half bright on a wide image: after squashing the split stays in the middle.
    img = np.zeros((100, 400), np.float32)
    img[:, 200:] = 1.0
    x = preprocess(img)[0]
    assert float(x[:, : INPUT_SIZE // 2 - 2].max()) < 0 < float(x[:, INPUT_SIZE // 2 + 2 :].min())
    # A tall image is squashed too (no padding rows).
    tall = np.zeros((400, 100), np.float32)
    tall[200:, :] = 1.0
    y = preprocess(tall)[0]
    assert float(y[: INPUT_SIZE // 2 - 2].max()) < 0 < float(y[INPUT_SIZE // 2 + 2 :].min())


def test_preprocess_is_invariant_to_linear_intensity_changes() -> None:
    img = np.random.default_rng(1).random((224, 224)).astype(np.float32)
    a = preprocess(img)
    b = preprocess(0.2 + 0.5 * img)
    assert torch.allclose(a, b, atol=1e-4)


def test_preprocess_clamps_out_of_range_and_rejects_bad_shapes() -> None:
    img = np.full((64, 64), 0.5, np.float32)
    img[0, 0] = 5.0  # outside [0, 1]: clamped before standardization
    assert torch.isfinite(preprocess(img)).all()
    with pytest.raises(ValueError):
        preprocess(np.zeros((3, 64, 64), np.float32))
    with pytest.raises(ValueError):
        preprocess(np.zeros((4, 4), np.float32))


def test_preprocess_single_equals_batch() -> None:
    imgs = torch.rand(3, 224, 224)
    batch = preprocess_batch(imgs)
    for i in range(3):
        assert torch.allclose(preprocess(imgs[i]), batch[i], atol=1e-6)


# --- metrics, temperature, threshold -------------------------------------------------------

def test_auc_known_values() -> None:
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert metrics.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    # 3 of 4 positive/negative pairs ordered correctly.
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.35, 0.3, 0.4]) == 0.75


def test_temperature_recovers_known_scale() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < metrics.sigmoid(true_logits)).astype(float)
    # The model is over-confident by a factor 3: the fitted temperature must undo it.
    t = metrics.fit_temperature(y, true_logits * 3.0)
    assert 2.7 < t < 3.3
    assert metrics.expected_calibration_error(y, metrics.sigmoid(true_logits * 3 / t)) < \
        metrics.expected_calibration_error(y, metrics.sigmoid(true_logits * 3))


def test_threshold_for_sensitivity_known_answer() -> None:
    y = np.array([1] * 20 + [0] * 5)
    prob = np.r_[np.linspace(1.0, 0.05, 20), [0.9, 0.5, 0.3, 0.2, 0.01]]
    t = metrics.threshold_for_sensitivity(y, prob, 0.95)
    # 19 of 20 positives must be >= t, so t is the 19th-highest positive score.
    assert t == pytest.approx(np.sort(prob[:20])[::-1][18])
    c = metrics.confusion(y, prob, t)
    assert c["sensitivity"] >= 0.95 and c["tp"] == 19 and c["fn"] == 1
    assert metrics.confusion(y, prob, np.nextafter(t, 2))["sensitivity"] < 0.95  # highest such t


# --- data split ----------------------------------------------------------------------------

def test_patient_keys() -> None:
    assert patient_key(Path("IM-0115-0001.jpeg")) == "IM-0115"
    assert patient_key(Path("NORMAL2-IM-0427-0001.jpeg")) == "NORMAL2-IM-0427"
    assert patient_key(Path("person1000_bacteria_2931.jpeg")) == "person1000"
    assert patient_key(Path("person1000_virus_1681.jpeg")) == "person1000"


def _fake_folder(root: Path, n_per_class: int = 24) -> Path:
    """A tiny image folder: 'pneumonia' images carry a bright blob, normals do not."""
    rng = np.random.default_rng(0)
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            img = (rng.random((224, 224)) * 80 + 60).astype(np.uint8)
            if label:
                img[60:160, 40:110] = 230
            name = f"IM-{i // 2:04d}-{i % 2 + 1:04d}.jpeg" if not label else f"person{i // 2}_bacteria_{i}.jpeg"
            Image.fromarray(img).convert("RGB").save(root / cls / name)
    return root


def test_split_is_by_patient_and_reproducible(tmp_path: Path) -> None:
    samples = list_samples(_fake_folder(tmp_path / "data"))
    tr, va = split_by_patient(samples, 0.25, seed=7)
    assert {s.patient for s in tr}.isdisjoint({s.patient for s in va})
    tr2, va2 = split_by_patient(samples, 0.25, seed=7)
    assert [s.path for s in va] == [s.path for s in va2]
    assert {s.label for s in va} == {0, 1}


# --- the whole train -> export -> load -> evaluate path --------------------------------------

def test_train_export_load_evaluate_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _fake_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert train_main(["train", "--data-dir", str(data), "--out", str(run), "--epochs", "1", "--val-fraction", "0.3"]) == 0
    report = json.loads((run / "training.json").read_text())
    assert report["split"]["val_images"] > 0 and math.isfinite(report["temperature"])
    assert train_main(["export", "--run", str(run), "--out", str(tmp_path / "models"), "--version", "t1"]) == 0
    art = tmp_path / "models" / "pneumonia-t1.pt"
    card = json.loads(art.with_suffix(".json").read_text())
    assert card["threshold"] == report["threshold"] and "CC BY 4.0" in card["data_source"]
    assert art.stat().st_size < 20 * 1024 * 1024

    # Export then load gives identical outputs to the trained weights on the same input.
    from pacsbridge.model.architecture import build_model

    blob = torch.load(run / "model.pt", weights_only=True)
    ref = build_model(blob["architecture"])
    ref.load_state_dict(blob["state_dict"])
    ref.eval()
    loaded = load_model(art, device="cpu")
    x = preprocess_batch(torch.rand(4, 224, 224))
    with torch.inference_mode():
        assert torch.equal(ref(x), loaded.logits(x))

    # The card's validation figures are reproducible by `evaluate --subset val`.
    capsys.readouterr()
    assert train_main(["evaluate", "--model", str(art), "--data-dir", str(data), "--subset", "val",
                       "--plots", str(tmp_path / "plots")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["auc"] == pytest.approx(card["validation"]["auc"], abs=1e-6)
    assert out["sensitivity"] == pytest.approx(card["validation"]["sensitivity"])
    assert (tmp_path / "plots" / "roc.png").stat().st_size > 1000


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    from pacsbridge.model.architecture import build_model

    art = tmp_path / "m.pt"
    torch.save({"architecture": "small-resnet-v1", "input_size": INPUT_SIZE,
                "state_dict": build_model("small-resnet-v1").state_dict()}, art)
    art.with_suffix(".json").write_text(json.dumps({"model_id": "m", "weights_sha256": "0" * 64,
                                                    "temperature": 1.0, "threshold": 0.5}))
    with pytest.raises(ModelError, match="SHA-256"):
        load_model(art)


@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason=f"training data not present at {SHARED_TRAIN} (a user's clone has none)")
def test_train_on_real_subset_runs(tmp_path: Path) -> None:
    """The real data path (patient keys, JPEG loading) on a few dozen real radiographs, one epoch."""
    assert train_main(["train", "--data-dir", str(SHARED_TRAIN), "--out", str(tmp_path), "--epochs", "1",
                       "--limit", "48"]) == 0
    report = json.loads((tmp_path / "training.json").read_text())
    assert report["split"]["train_images"] == 48


def test_ensemble_of_two_runs_exports_and_loads(tmp_path: Path) -> None:
    data = _fake_folder(tmp_path / "data", n_per_class=12)
    runs = []
    for seed in (1, 2):
        run = tmp_path / f"run{seed}"
        assert train_main(["train", "--data-dir", str(data), "--out", str(run), "--epochs", "1",
                           "--seed", str(seed), "--split-seed", "5", "--val-fraction", "0.3"]) == 0
        runs += ["--run", str(run)]
    assert train_main(["ensemble", *runs, "--data-dir", str(data), "--out", str(tmp_path / "ens")]) == 0
    assert train_main(["export", "--run", str(tmp_path / "ens"), "--out", str(tmp_path / "m"), "--version", "e",
                       "--half"]) == 0
    model = load_model(tmp_path / "m" / "pneumonia-e.pt", device="cpu")
    assert model.architecture == "ensemble:small-resnet-v1+small-resnet-v1"
    # The ensemble's logit is the mean of its members' logits.
    x = preprocess_batch(torch.rand(2, 224, 224))
    with torch.inference_mode():
        members = torch.stack([m(x) for m in model.module.members]).mean(0)
    assert torch.allclose(model.logits(x), members, atol=1e-6)
    # float16 storage: loaded back as float32 modules, close to the float32 run weights.
    assert next(model.module.parameters()).dtype == torch.float32
    full = torch.load(tmp_path / "ens" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(v.float(), full[k].float(), rtol=1e-2, atol=1e-3)
               for k, v in model.module.state_dict().items())
    assert not torch.allclose(model.module.members[0](x), model.module.members[1](x))


def test_ood_command_keeps_weights_adds_stats_and_evaluate_reports_refusals(tmp_path: Path, capsys) -> None:
    """`model_training ood` writes a new artifact (same weights + OOD statistics + intended use) that
    loads with its statistics; `evaluate --stress` then reports OOD refusal rates."""
    data = _fake_folder(tmp_path / "data", n_per_class=12)
    run = tmp_path / "run"
    assert train_main(["train", "--data-dir", str(data), "--out", str(run), "--epochs", "1", "--val-fraction", "0.3"]) == 0
    assert train_main(["export", "--run", str(run), "--out", str(tmp_path / "m"), "--version", "a"]) == 0
    assert train_main(["ood", "--model", str(tmp_path / "m" / "pneumonia-a.pt"), "--data-dir", str(data),
                       "--out", str(tmp_path / "m"), "--version", "b", "--keep", "0.9", "--blocks", "1,2,3"]) == 0
    old, new = load_model(tmp_path / "m" / "pneumonia-a.pt", "cpu"), load_model(tmp_path / "m" / "pneumonia-b.pt", "cpu")
    assert old.ood is None and new.ood is not None and new.ood.use == [1, 2, 3]
    card = json.loads((tmp_path / "m" / "pneumonia-b.json").read_text())
    assert card["ood"]["threshold"] == pytest.approx(new.ood.threshold)
    assert card["intended_use"]["age_years"]["max_exclusive"] == 6
    assert "Out-of-distribution refusal" in (tmp_path / "m" / "pneumonia-b.md").read_text()
    x = preprocess_batch(torch.rand(3, 224, 224))
    assert torch.equal(old.logits(x), new.logits(x))  # the weights are untouched
    probs, scores = new.score_inputs(x)
    assert probs == pytest.approx(old.probabilities_from_inputs(x), abs=1e-6)
    assert all(math.isfinite(s) for s in scores)
    capsys.readouterr()
    assert train_main(["evaluate", "--model", str(tmp_path / "m" / "pneumonia-b.pt"), "--data-dir", str(data),
                       "--subset", "val", "--stress"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= out["ood"]["refused_rate"] <= 0.5
    assert all(0.0 <= r["ood_refused_rate"] <= 1.0 for r in out["stress"])


def _fake_adults(root: Path, per_source: int = 10) -> Path:
    """Two 'sources' of out-of-scope images: smooth gradients and stripes, unlike the fake children."""
    yy, xx = np.mgrid[0:224, 0:224]
    for s, src in enumerate(("alpha", "beta")):
        (root / src).mkdir(parents=True)
        for i in range(per_source):
            img = ((np.sin(xx / (8 + i + 5 * s)) + 1) * 100 + yy / 4).astype(np.uint8)
            Image.fromarray(img).convert("RGB").save(root / src / f"{i:03d}.jpeg")
    return root


def test_ood_oe_command_fits_a_ceiling_keeps_weights_and_ood_eval_reports(tmp_path: Path, capsys) -> None:
    """`ood --method oe` writes outlier-exposure statistics with threshold <= ceiling (same weights);
    `ood-eval` reports held-aside refusal per source and the validation in-scope rate."""
    from model_training.ood import ceiling_of, split_adults
    from pacsbridge.model.ood import METHOD, OutlierExposureStats

    data = _fake_folder(tmp_path / "data", n_per_class=12)
    adults = _fake_adults(tmp_path / "adults")
    parts = split_adults(adults)
    assert [len(parts[k]) for k in ("fit", "tune", "held")] == [8, 4, 8]
    run = tmp_path / "run"
    assert train_main(["train", "--data-dir", str(data), "--out", str(run), "--epochs", "1", "--val-fraction", "0.3"]) == 0
    assert train_main(["export", "--run", str(run), "--out", str(tmp_path / "m"), "--version", "a"]) == 0
    cache = tmp_path / "cache"
    args = ["ood", "--method", "oe", "--model", str(tmp_path / "m" / "pneumonia-a.pt"), "--data-dir", str(data),
            "--adult-dir", str(adults), "--out", str(tmp_path / "m"), "--keep", "0.9", "--feature-cache", str(cache),
            "--blocks", "0,1,2,3"]  # one member: 4 stage blocks
    assert train_main([*args, "--version", "b"]) == 0
    assert len(list(cache.glob("*.pt"))) == 5  # train, val, adult fit, adult tune, shifted training copies
    assert train_main([*args, "--version", "c"]) == 0  # from the cache: the same statistics
    old, new = load_model(tmp_path / "m" / "pneumonia-a.pt", "cpu"), load_model(tmp_path / "m" / "pneumonia-b.pt", "cpu")
    again = load_model(tmp_path / "m" / "pneumonia-c.pt", "cpu")
    assert isinstance(new.ood, OutlierExposureStats) and new.ood.method == METHOD
    assert new.ood.ceiling is not None and new.ood.threshold <= new.ood.ceiling
    assert again.ood.threshold == pytest.approx(new.ood.threshold) and again.ood.ceiling == pytest.approx(new.ood.ceiling)
    card = json.loads((tmp_path / "m" / "pneumonia-b.json").read_text())
    assert card["ood"]["ceiling"] == pytest.approx(new.ood.ceiling)
    assert card["ood"]["adult_split"]["counts"]["held"] == {"alpha": 4, "beta": 4}
    assert "outlier exposure" in (tmp_path / "m" / "pneumonia-b.md").read_text()
    x = preprocess_batch(torch.rand(3, 224, 224))
    assert torch.equal(old.logits(x), new.logits(x))  # the weights are untouched
    assert all(math.isfinite(s) for s in new.score_inputs(x)[1])
    capsys.readouterr()
    assert train_main(["ood-eval", "--model", str(tmp_path / "m" / "pneumonia-b.pt"), "--data-dir", str(data),
                       "--adult-dir", str(adults), "--parts", "tune,held", "--no-external"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["adult_held"]["by_source"]) == {"alpha", "beta"} and out["adult_held"]["images"] == 8
    assert 0.0 <= out["validation"]["in_scope_rate"] <= 1.0
    assert out["adult_tune"]["refused_rate"] >= 0.9  # the cut never sits above the ceiling
    # the ceiling rule on known scores: the loosest cut refusing >= 90 % of 10 scores is the 1st one
    assert ceiling_of(np.arange(10.0)) == 0.0 and ceiling_of(np.arange(20.0)) == 1.0


def test_frame_augmentation_shrinks_into_black_border_and_collimates() -> None:
    from model_training.augment import _frame, augment

    ones = torch.ones(32, 1, 64, 64)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(_frame(ones.clone(), gen, 0.0), ones)  # off: untouched
    framed = _frame(ones.clone(), gen, 1.0)
    black = (framed < 0.01).float().mean(dim=(1, 2, 3))
    # Shrunk to 0.7-0.95 of the field: at least 1 - 0.95^2 ~ 10 % of every image is black, and the
    # chest itself stays (at most ~1 - 0.58^2 of it black even with strips on all four edges).
    assert bool((black > 0.09).all()) and bool((black < 0.75).all())
    # Through the whole augmentation the share still controls how many images get a frame.
    x = torch.full((64, 64, 64), 0.8)
    some = augment(x, torch.Generator().manual_seed(1), frame=0.3)
    n_framed = int(((some < 0.05).float().mean(dim=(1, 2)) > 0.05).sum())
    assert 5 <= n_framed <= 45
    assert int(((augment(x, torch.Generator().manual_seed(1)) < 0.05).float().mean(dim=(1, 2)) > 0.05).sum()) == 0


def test_train_records_label_smoothing_and_frame(tmp_path: Path) -> None:
    data = _fake_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert train_main(["train", "--data-dir", str(data), "--out", str(run), "--epochs", "1", "--val-fraction", "0.3",
                       "--label-smoothing", "0.1", "--frame", "0.3"]) == 0
    report = json.loads((run / "training.json").read_text())
    assert report["label_smoothing"] == 0.1 and report["frame"] == 0.3


def test_ensemble_reuses_the_members_of_a_shipped_artifact(tmp_path: Path) -> None:
    data = _fake_folder(tmp_path / "data", n_per_class=12)
    for seed in (1, 2, 3):
        assert train_main(["train", "--data-dir", str(data), "--out", str(tmp_path / f"run{seed}"), "--epochs", "1",
                           "--seed", str(seed), "--split-seed", "5", "--val-fraction", "0.3"]) == 0
    assert train_main(["ensemble", "--run", str(tmp_path / "run1"), "--run", str(tmp_path / "run2"),
                       "--data-dir", str(data), "--out", str(tmp_path / "ens2")]) == 0
    assert train_main(["export", "--run", str(tmp_path / "ens2"), "--out", str(tmp_path / "m"), "--version", "a",
                       "--half"]) == 0
    old = tmp_path / "m" / "pneumonia-a.pt"
    assert train_main(["ensemble", "--members-of", str(old), "--run", str(tmp_path / "run3"),
                       "--data-dir", str(data), "--out", str(tmp_path / "ens3")]) == 0
    assert train_main(["export", "--run", str(tmp_path / "ens3"), "--out", str(tmp_path / "m"), "--version", "b"]) == 0
    new = load_model(tmp_path / "m" / "pneumonia-b.pt", device="cpu")
    first = load_model(old, device="cpu")
    run3 = torch.load(tmp_path / "run3" / "model.pt", weights_only=True)["state_dict"]
    assert new.architecture == "ensemble:small-resnet-v1+small-resnet-v1+small-resnet-v1"
    x = preprocess_batch(torch.rand(2, 224, 224))
    with torch.inference_mode():
        for i in (0, 1):  # the old members, unchanged (float16-stored weights, now float32)
            assert torch.equal(new.module.members[i](x), first.module.members[i](x))
    assert all(torch.equal(v, run3[k]) for k, v in new.module.members[2].state_dict().items())
    report = json.loads((tmp_path / "ens3" / "training.json").read_text())
    assert report["members"][0]["run"] == "pneumonia-a.pt#member0" and len(report["members"]) == 3

    # A run on another patient split is refused: its validation images were training images.
    assert train_main(["train", "--data-dir", str(data), "--out", str(tmp_path / "other"), "--epochs", "1",
                       "--seed", "4", "--split-seed", "6", "--val-fraction", "0.3"]) == 0
    with pytest.raises(SystemExit, match="different patient splits"):
        train_main(["ensemble", "--members-of", str(old), "--run", str(tmp_path / "other"),
                    "--data-dir", str(data), "--out", str(tmp_path / "bad")])


def test_compare_scores_every_combination_under_every_shift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from model_training.stress import PERTURBATIONS

    data = _fake_folder(tmp_path / "data", n_per_class=12)
    for seed in (1, 2):
        assert train_main(["train", "--data-dir", str(data), "--out", str(tmp_path / f"run{seed}"), "--epochs", "1",
                           "--seed", str(seed), "--split-seed", "5", "--val-fraction", "0.3"]) == 0
    capsys.readouterr()
    assert train_main(["compare", "--run", str(tmp_path / "run1"), "--run", str(tmp_path / "run2"),
                       "--data-dir", str(data)]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["members"] for r in results] == [["run1"], ["run2"], ["run1", "run2"]]
    for r in results:
        assert [row["shift"] for row in r["rows"]] == list(PERTURBATIONS)
        clean = r["rows"][0]
        assert clean["sensitivity"] >= 0.95  # the threshold is chosen on the clean copy for sensitivity 0.95
        assert all(0.0 <= row["specificity"] <= 1.0 and 0.0 <= row["auc"] <= 1.0 for row in r["rows"])
