"""The shipped model refuses real adult chest radiographs by pixels alone and keeps children in scope.

Uses the shared data (``../shared/data``): the held-aside part of the adult set (never fitted on,
never used to choose anything; see ``model_training.ood.split_adults``) and the pediatric
validation split of the card.  Both skip with a reason when the data is not there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pacsbridge.model.artifact import load_model
from pacsbridge.model.ood import METHOD, METHOD_V1, OutlierExposureStats, stats_from_blob
from pacsbridge.model.preprocess import preprocess
from pipeline_support import SHIPPED_MODEL

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
ADULTS = DATA / "adult_chest"
TRAIN_DIR = DATA / "chest_xray" / "train"
needs_adults = pytest.mark.skipif(not ADULTS.is_dir(), reason=f"adult chest set not found at {ADULTS}")
needs_kids = pytest.mark.skipif(not TRAIN_DIR.is_dir(), reason=f"pediatric training set not found at {TRAIN_DIR}")


@pytest.fixture(scope="module")
def shipped():
    return load_model(SHIPPED_MODEL, "cpu")


def _scores(model, images: torch.Tensor) -> np.ndarray:
    x = torch.stack([preprocess(im) for im in images.float() / 255.0])
    return np.array(model.score_inputs(x)[1])


def test_shipped_artifact_uses_outlier_exposure_with_a_ceiling(shipped) -> None:
    assert isinstance(shipped.ood, OutlierExposureStats) and shipped.ood.method == METHOD
    assert SHIPPED_MODEL.stat().st_size < 20 * 1024 * 1024  # the artifact limit, OOD statistics included
    assert shipped.ood.ceiling is not None and shipped.ood.threshold <= shipped.ood.ceiling
    card = json.loads(SHIPPED_MODEL.with_suffix(".json").read_text())
    assert card["ood"]["ceiling"] == pytest.approx(shipped.ood.ceiling)
    assert card["ood"]["threshold"] == pytest.approx(shipped.ood.threshold)
    assert "covidcxnet" in card["ood"]["adult_split"]["counts"]["held"]


@needs_adults
def test_held_aside_adults_are_refused(shipped) -> None:
    """A sample of the held part of both sources (every 3rd image): at least 90 % refused."""
    from model_training.ood import load_paths, split_adults

    held = split_adults(ADULTS)["held"][::3]
    sources = {p.parent.name for p in held}
    assert len(sources) == 2, sources
    scores = _scores(shipped, load_paths(held))
    refused = scores > shipped.ood.threshold
    assert refused.mean() >= 0.90, (refused.mean(), len(held))
    for src in sources:
        mask = np.array([p.parent.name == src for p in held])
        assert refused[mask].mean() >= 0.85, (src, refused[mask].mean())


@needs_adults
def test_adult_split_is_fixed_disjoint_and_per_source() -> None:
    from model_training.ood import split_adults

    a, b = split_adults(ADULTS), split_adults(ADULTS)
    assert a == b
    parts = [set(a[k]) for k in ("fit", "tune", "held")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    every = sorted(p for p in ADULTS.glob("*/*") if p.suffix.lower() in {".jpeg", ".jpg", ".png"})
    assert sorted(set().union(*parts)) == every
    for src in {p.parent.name for p in every}:
        n = sum(p.parent.name == src for p in every)
        held = sum(p.parent.name == src for p in a["held"])
        assert abs(held - 0.4 * n) <= 1


@needs_kids
def test_pediatric_validation_images_stay_in_scope(shipped) -> None:
    """Every 3rd image of the card's validation split (never fitted on): at least 97 % in scope."""
    from model_training.data import list_samples, load_images, split_by_patient

    _, val = split_by_patient(list_samples(TRAIN_DIR), float(shipped.card["val_fraction"]), int(shipped.card["seed"]))
    val = val[::3]
    scores = _scores(shipped, load_images(val))
    assert (scores <= shipped.ood.threshold).mean() >= 0.97, ((scores <= shipped.ood.threshold).mean(), len(val))


def test_v1_blobs_still_load_and_unknown_methods_are_refused(shipped) -> None:
    blob = shipped.ood.maha.to_blob()
    assert blob["method"] == METHOD_V1 and stats_from_blob(blob).threshold == pytest.approx(blob["threshold"])
    with pytest.raises(ValueError, match="unknown OOD method"):
        stats_from_blob({**blob, "method": "nearest-neighbour-v9"})
    bad = shipped.ood.to_blob()
    bad["ceiling"] = bad["threshold"] - 1.0  # a cut looser than the ceiling is inconsistent
    with pytest.raises(ValueError, match="ceiling"):
        stats_from_blob(bad)
    bad = shipped.ood.to_blob()
    bad["weight"] = bad["weight"][:-3]
    with pytest.raises(ValueError, match="feature counts"):
        stats_from_blob(bad)


def test_score_is_the_larger_component(shipped) -> None:
    """The score is max(logistic, Mahalanobis - offset); noise is far off in the Mahalanobis part."""
    from pacsbridge.model.ood import forward_pooled

    rng = np.random.default_rng(3)
    x = torch.stack([preprocess(rng.random((200, 200), dtype=np.float32)) for _ in range(3)])
    with torch.inference_mode():
        _, pooled = forward_pooled(shipped.module, x)
    lr, m = shipped.ood.components(shipped.module, pooled)
    _, scores = shipped.score_inputs(x)
    assert scores == pytest.approx(torch.maximum(lr, m).tolist(), rel=1e-5, abs=1e-5)
    assert all(s > shipped.ood.threshold for s in scores)
