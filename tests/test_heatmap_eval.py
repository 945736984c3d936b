"""Heatmap methods and ``python -m model_training heatmap-eval`` (where the heatmap mass falls).

The region arithmetic is checked on maps with known answers; the command runs on a few real
validation pneumonias and skips with the reason where ../shared (the training images) is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_support import SHIPPED_MODEL

from model_training.__main__ import main as training_main
from model_training.heatmap_eval import mean_ci, region_shares, wilson_ci
from pacsbridge.model.artifact import load_model
from pacsbridge.model.heatmap import (
    DEFAULT_SPEC,
    METHODS,
    CamSpec,
    class_activation_map,
    grad_cam,
    input_maps,
)
from pacsbridge.model.preprocess import preprocess

TRAIN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray" / "train"
needs_data = pytest.mark.skipif(not TRAIN_DIR.is_dir(), reason=f"training images not found at {TRAIN_DIR} "
                                "(../shared is absent: heatmap-eval needs the validation pneumonias)")


@pytest.fixture(scope="module")
def shipped():
    if not SHIPPED_MODEL.is_file():
        pytest.skip(f"shipped model {SHIPPED_MODEL} missing")
    return load_model(SHIPPED_MODEL, "cpu")


def test_region_shares_known_maps() -> None:
    heat = torch.zeros(90, 90)
    heat[10:20, 5:15] = 1.0  # upper left, inside the lateral third, partly outside the body box
    r = region_shares(heat)
    assert r is not None
    assert r["lateral"] == pytest.approx(1.0) and r["central"] == pytest.approx(0.0)
    assert r["upper"] == pytest.approx(1.0) and r["peak_lateral"] == 1.0
    assert r["outside_box"] == pytest.approx(0.4)  # box from 9 to 81: rows inside, columns 5-8 of 5-14 outside
    heat = torch.zeros(90, 90)
    heat[60:70, 40:50] = 2.0  # lower middle
    r = region_shares(heat)
    assert r["central"] == pytest.approx(1.0) and r["lower"] == pytest.approx(1.0) and r["outside_box"] == 0.0
    uniform = region_shares(torch.ones(90, 90))
    assert uniform["lateral"] == pytest.approx(2 / 3) and uniform["upper"] == pytest.approx(0.5)
    assert region_shares(torch.zeros(8, 8)) is None


def test_intervals() -> None:
    m = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m["mean"] == 2.5 and m["lo"] < 2.5 < m["hi"] and m["n"] == 4
    w = wilson_ci([0.0] * 20)
    assert w["mean"] == 0.0 and w["lo"] == pytest.approx(0.0, abs=1e-12) and 0.1 < w["hi"] < 0.2


def test_spec_parsing() -> None:
    assert CamSpec.parse("gradcam@4") == CamSpec("gradcam", 4, "mean")
    assert str(CamSpec.parse("HiResCAM@3/norm")) == "hirescam@3/norm"
    CamSpec.parse(DEFAULT_SPEC)
    for bad in ("gradcam", "gradcam@5", "saliency@3", "gradcam@3/m7"):
        with pytest.raises(ValueError, match="METHOD@STAGE"):
            CamSpec.parse(bad)


def test_every_method_gives_a_valid_map_and_gradcam_equals_hirescam_on_the_last_stage(shipped) -> None:
    image = np.random.default_rng(3).random((220, 180), dtype=np.float32)
    for method in METHODS:
        for stage in (2, 3, 4):
            heat = class_activation_map(shipped, image, f"{method}@{stage}")
            assert heat.shape == image.shape and heat.dtype == np.float32
            assert 0.0 <= heat.min() and heat.max() <= 1.0
    assert np.array_equal(grad_cam(shipped, image), class_activation_map(shipped, image, DEFAULT_SPEC))
    # The head is global average pooling + linear: at the last stage the gradient is the same at every
    # position, so Grad-CAM and HiResCAM must agree there (and differ on earlier stages).
    x = preprocess(image, shipped.input_size).unsqueeze(0)
    specs = [CamSpec("gradcam", 4), CamSpec("hirescam", 4), CamSpec("gradcam", 3), CamSpec("hirescam", 3)]
    maps = input_maps(shipped, x, specs)
    assert torch.allclose(maps[specs[0]], maps[specs[1]], atol=1e-5)
    assert not torch.allclose(maps[specs[2]], maps[specs[3]], atol=1e-5)


def test_bad_method_is_one_line_and_non_zero(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        training_main(["heatmap-eval", "--model", str(SHIPPED_MODEL), "--data-dir", "/nonexistent",
                       "--method", "gradcam@9"])
    assert exc.value.code != 0
    assert "bad heatmap method 'gradcam@9'" in capsys.readouterr().err


@needs_data
def test_heatmap_eval_on_a_few_validation_pneumonias(shipped, capsys) -> None:
    capsys.readouterr()
    assert training_main(["heatmap-eval", "--model", str(SHIPPED_MODEL), "--data-dir", str(TRAIN_DIR),
                          "--limit", "4", "--method", DEFAULT_SPEC, "--method", "layercam@2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 4 and out["model"] == "pneumonia-v4" and out["default"] == DEFAULT_SPEC
    assert set(out["methods"]) == {DEFAULT_SPEC, "layercam@2", "random (smooth noise)"}
    for name, m in out["methods"].items():
        assert m["lateral"]["n"] + m["empty_maps"] == 4, name
        for key in ("lateral", "central", "upper", "lower", "outside_box", "peak_lateral"):
            assert 0.0 <= m[key]["mean"] <= 1.0, (name, key)
        assert m["lateral"]["mean"] + m["central"]["mean"] == pytest.approx(1.0)
        assert m["upper"]["mean"] + m["lower"]["mean"] == pytest.approx(1.0)
        assert np.isfinite(m["deletion_drop"]["mean"])
    assert out["methods"][DEFAULT_SPEC]["lateral_minus_default"]["mean"] == 0.0
    # Deleting the default map's hottest pixels lowers the score more than deleting a random patch.
    assert out["methods"][DEFAULT_SPEC]["deletion_drop"]["mean"] > out["methods"]["random (smooth noise)"]["deletion_drop"]["mean"]


@needs_data
def test_heatmap_eval_on_validation_normals(capsys) -> None:
    assert training_main(["heatmap-eval", "--model", str(SHIPPED_MODEL), "--data-dir", str(TRAIN_DIR),
                          "--label", "normal", "--limit", "3", "--method", DEFAULT_SPEC, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 3 and out["subset"] == "val normal"
    m = out["methods"][DEFAULT_SPEC]
    assert m["lateral"]["n"] + m["empty_maps"] == 3  # a normal's map may be empty: nothing raised the score
