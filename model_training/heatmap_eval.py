"""Where the heatmap mass falls on validation pneumonias (or normals), for each heatmap method.

Regions are fixed fractions of the model input (the whole image squashed to a square, as the model
sees it): the lateral thirds of the width (where the lung fields lie) against the central third
(heart, mediastinum, spine, and the medial lung next to them), the upper against the lower half,
and the mass outside a central body box (10-90 % of width and height: corners, markers, shoulders,
arms, the lateral chest wall).  A map spread evenly would put 2/3 in the lateral thirds, 1/2 in the
upper half and 0.36 outside the box: those are the chance figures to compare with.

Deletion: the hottest 10 % of the input's pixels are set to the image's mean grey (0 after the
model's standardisation), and the drop of the ensemble's logit is recorded.  A map that points at
what the model uses lowers the score more than one that points elsewhere (a check of faithfulness,
not of anatomy); the ``random`` row (a smooth random map, seeded) is the floor.  A map can put its
mass in the lung fields and still fail this check: then it shows regions the model does not use.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pacsbridge.model.artifact import LoadedModel, load_model
from pacsbridge.model.heatmap import (
    COMBINES,
    DEFAULT_SPEC,
    METHODS,
    CamSpec,
    input_maps,
)
from pacsbridge.model.preprocess import preprocess

from .data import list_samples, load_images, split_by_patient

BODY_BOX = (0.1, 0.9)  # fraction of width and of height, both axes
DELETE_SHARE = 0.10
UNIFORM = {"lateral": 2 / 3, "central": 1 / 3, "upper": 0.5, "lower": 0.5,
           "outside_box": 1 - (BODY_BOX[1] - BODY_BOX[0]) ** 2, "peak_lateral": 2 / 3}
RANDOM = "random (smooth noise)"
METRICS = ("lateral", "central", "upper", "lower", "outside_box", "peak_lateral", "deletion_drop")
PAIRED = ("lateral_minus_default", "deletion_minus_default")  # per image, against the default method


def default_specs() -> list[CamSpec]:
    """Every method at stages 2-4 (members summed), and the member variants of stages 3 and 4 Grad-CAM."""
    specs = [CamSpec(m, s) for s in (4, 3, 2) for m in METHODS]
    specs += [CamSpec("gradcam", s, c) for s in (4, 3) for c in COMBINES if c != "mean"]
    return specs


def region_shares(heat: torch.Tensor) -> dict[str, float] | None:
    """Shares of the mass of a non-negative map ``(S, S)``; None when the map is all zero."""
    total = float(heat.sum())
    if not math.isfinite(total) or total <= 0:
        return None
    h, w = heat.shape
    p = heat / total
    c0, c1 = round(w / 3), round(2 * w / 3)
    lo_y, hi_y = round(BODY_BOX[0] * h), round(BODY_BOX[1] * h)
    lo_x, hi_x = round(BODY_BOX[0] * w), round(BODY_BOX[1] * w)
    central = float(p[:, c0:c1].sum())
    upper = float(p[: h // 2].sum())
    peak_x = int(heat.argmax()) % w
    return {"lateral": 1.0 - central, "central": central, "upper": upper, "lower": 1.0 - upper,
            "outside_box": 1.0 - float(p[lo_y:hi_y, lo_x:hi_x].sum()),
            "peak_lateral": float(not c0 <= peak_x < c1)}


def _deleted(x: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """``x`` with its hottest ``DELETE_SHARE`` of pixels set to the image's mean (0 once standardised)."""
    k = max(1, int(DELETE_SHARE * heat.numel()))
    keep = torch.ones(heat.numel(), dtype=x.dtype)
    keep[torch.topk(heat.flatten(), k).indices] = 0  # exactly k pixels, also where the map is flat or zero
    return x * keep.view(1, 1, *heat.shape)


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and normal-approximation 95 % interval (t would differ by < 1 % at n >= 100)."""
    a = np.asarray(values, dtype=np.float64)
    if len(a) == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")
    return {"mean": float(a.mean()), "lo": float(a.mean() - 1.96 * se), "hi": float(a.mean() + 1.96 * se),
            "n": len(a)}


def wilson_ci(hits: list[float]) -> dict[str, float]:
    """A share of yes/no outcomes with its Wilson 95 % interval (stays inside [0, 1])."""
    n = len(hits)
    if n == 0:
        return mean_ci([])
    p, z = sum(hits) / n, 1.96
    mid, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"mean": p, "lo": mid - half, "hi": mid + half, "n": n}


def _score_image(model: LoadedModel, image2d: np.ndarray, specs: list[CamSpec], seed: int) -> dict[str, dict[str, float] | None]:
    """Region shares and deletion drop of every spec's map (and a smooth random map) for one image."""
    x = preprocess(image2d, model.input_size).unsqueeze(0)
    maps: dict[str, torch.Tensor] = {str(s): m for s, m in input_maps(model, x, specs).items()}
    noise = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    maps[RANDOM] = F.interpolate(noise, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    rows = {name: region_shares(m) for name, m in maps.items()}
    live = [name for name in maps if rows[name] is not None]
    if live:
        with torch.inference_mode():
            batch = torch.cat([x] + [_deleted(x, maps[name]) for name in live])
            logits = model.module(batch).float()
        for s, z in zip(live, logits[1:].tolist()):
            rows[s]["deletion_drop"] = float(logits[0]) - z  # type: ignore[index]
    return rows


def heatmap_eval(model_path: Path, data_dir: Path, *, limit: int | None = 200,
                 methods: list[str] | None = None, as_json: bool = False, holdout: bool = False, label: str = "pneumonia") -> dict:
    """Region shares (mean, 95 % CI) of each method's heatmap over validation pneumonias; prints a table.

    The validation split is the card's (its seed and validation fraction); with ``limit`` an evenly
    spaced subset of its pneumonias is used (deterministic, spread over the sorted file list); with
    ``holdout`` too, the pneumonias outside that subset (to confirm a choice made on the subset).
    ``label='normal'`` scores the validation normals instead (where little raises the score).
    """
    specs = [CamSpec.parse(m) for m in methods] if methods else default_specs()
    base = CamSpec.parse(DEFAULT_SPEC)
    model = load_model(model_path, device="cpu")
    samples = list_samples(data_dir)
    _, val = split_by_patient(samples, float(model.card["val_fraction"]), int(model.card["seed"]))
    positives = [s for s in val if s.label == (0 if label == "normal" else 1)]
    if limit is not None and 0 < limit < len(positives):
        chosen = {int(i * len(positives) / limit) for i in range(limit)}
        positives = [p for i, p in enumerate(positives) if (i in chosen) != holdout]
    names = [str(s) for s in specs] + [RANDOM]
    values: dict[str, dict[str, list[float]]] = {n: {k: [] for k in (*METRICS, *PAIRED)} for n in names}
    empty = dict.fromkeys(names, 0)
    for i, u8 in enumerate(load_images(positives)):
        rows = _score_image(model, u8.numpy().astype(np.float32) / 255.0, list(dict.fromkeys([*specs, base])), i)
        ref = rows[str(base)]
        for n in names:
            row = rows[n]
            if row is None:
                empty[n] += 1
                continue
            for k in METRICS:
                values[n][k].append(row[k])
            if ref is not None:
                values[n]["lateral_minus_default"].append(row["lateral"] - ref["lateral"])
                values[n]["deletion_minus_default"].append(row["deletion_drop"] - ref["deletion_drop"])
    result = {
        "model": model.model_id, "data_dir": str(data_dir),
        "subset": f"val {label}" + (f", outside the {limit} of --limit" if holdout and limit else ""),
        "images": len(positives), "input_size": model.input_size, "default": DEFAULT_SPEC,
        "body_box": list(BODY_BOX), "delete_share": DELETE_SHARE, "uniform": UNIFORM,
        "methods": {n: {"empty_maps": empty[n], **{k: (wilson_ci if k == "peak_lateral" else mean_ci)(v)
                                                          for k, v in values[n].items()}} for n in names},
    }
    print(json.dumps(result, indent=2) if as_json else format_table(result))
    return result


def format_table(result: dict) -> str:
    """A Markdown table: one row per method, mean [95 % CI] of each share."""
    def cell(d: dict) -> str:
        return f"{d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]" if d["n"] else "-"

    lines = [(f"model {result['model']}, {result['images']} validation images ({result['subset']}), input {result['input_size']} px; "
              f"default {result['default']}"),
             "", ("| method | lateral thirds | central third | upper half | outside body box | peak in lateral "
                  "thirds | lateral - default (paired) | deletion logit drop | deletion - default (paired) | empty |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    u = result["uniform"]
    lines.append(f"| uniform map (chance) | {u['lateral']:.3f} | {u['central']:.3f} | {u['upper']:.3f} | "
                 f"{u['outside_box']:.3f} | {u['peak_lateral']:.3f} | - | - | - | - |")
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {cell(m['lateral'])} | {cell(m['central'])} | {cell(m['upper'])} | "
                     f"{cell(m['outside_box'])} | {cell(m['peak_lateral'])} | {cell(m['lateral_minus_default'])} | "
                     f"{cell(m['deletion_drop'])} | {cell(m['deletion_minus_default'])} | {m['empty_maps']} |")
    return "\n".join(lines)
