"""Write the daemon's artifact (``pneumonia-<version>.pt``) and its model card (JSON + Markdown)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pacsbridge.model.artifact import sha256_file

DATA_CREDIT = (
    "Kermany, Daniel; Zhang, Kang; Goldbaum, Michael (2018), \"Labeled Optical Coherence Tomography (OCT) "
    "and Chest X-Ray Images for Classification\", Mendeley Data, V2, doi:10.17632/rscbjbr9sj.2; "
    "Kermany et al., Cell 172(5):1122-1131, 2018. License: CC BY 4.0."
)
INTENDED_USE = (
    "Screening aid that routes likely-pneumonia chest radiographs to a radiologist first. "
    "Not a diagnosis: every study still needs a radiologist's read; a negative score does not rule out disease."
)
LIMITS = [
    "Trained only on pediatric (age 1-5) frontal chest radiographs from one hospital (Guangzhou), mostly AP views.",
    "Training images were 8-bit JPEGs squashed to 224x224; adult, lateral or non-chest images are out of scope "
    "(the daemon's quality gate refuses what it can recognize).",
    "Threshold chosen on a patient-grouped validation split for sensitivity >= 0.95; performance on other sites "
    "shifts (expect lower specificity) and must be monitored locally.",
]


def export(run_dir: Path, out_dir: Path, version: str, half: bool = False) -> Path:
    """Copy the weights from a training run and write the card; returns the artifact path.

    ``half`` stores floating-point weights as float16 (half the size, e.g. to keep an ensemble
    under 20 MB); they are loaded back into float32 modules, so inference stays float32 on CPU.
    """
    report = json.loads((run_dir / "training.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"pneumonia-{version}"
    dest = out_dir / f"{name}.pt"
    blob = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    if half:
        blob["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    torch.save(blob, dest)
    digest = sha256_file(dest)
    card = {
        "model_id": name,
        "version": version,
        "architecture": report["architecture"],
        "weights_file": dest.name,
        "weights_sha256": digest,
        "weights_dtype": "float16" if half else "float32",
        "input": {
            "channels": 1, "size": report["input_size"],
            "expects": "display-ready 2-D float image in [0,1], bright = dense; squashed to a square",
            "preprocessing": "pacsbridge.model.preprocess.preprocess",
        },
        "output": "one logit; probability = sigmoid(logit / temperature)",
        "temperature": report["temperature"],
        "threshold": report["threshold"],
        "operating_point": f"sensitivity >= {report['min_sensitivity']} on validation",
        "validation": report["validation"],
        "split": report["split"],
        "best_epoch": report["best_epoch"],
        "epochs": report["epochs"],
        "seed": report["seed"],
        "val_fraction": report["val_fraction"],
        "training_command": report.get("command"),
        "data_source": DATA_CREDIT,
        "intended_use": INTENDED_USE,
        "limits": LIMITS,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(model_card_markdown(card))
    return dest


def model_card_markdown(card: dict) -> str:
    v = card["validation"]
    s = card["split"]
    lines = [
        f"# Model card: {card['model_id']}",
        "",
        f"- Architecture: `{card['architecture']}` (trained from scratch, no ImageNet weights)",
        f"- Weights: `{card['weights_file']}`, SHA-256 `{card['weights_sha256']}`",
        f"- Input: {card['input']['expects']}; {card['input']['size']}x{card['input']['size']}, "
        f"via `{card['input']['preprocessing']}`",
        f"- Calibration: temperature {card['temperature']:.4f} (ECE {v['ece_before']:.4f} -> {v['ece_after']:.4f})",
        f"- Threshold: {card['threshold']:.4f} ({card['operating_point']})",
        "",
        "## Validation (patient-grouped split of the training folder)",
        "",
        f"Split: {s['train_images']} training images ({s['train_patients']} patients), "
        f"{s['val_images']} validation images ({s['val_patients']} patients; "
        f"{s['val_positive']} pneumonia, {s['val_negative']} normal). Seed {card['seed']}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| ROC AUC | {v['auc']:.4f} |",
        f"| sensitivity | {v['sensitivity']:.4f} |",
        f"| specificity | {v['specificity']:.4f} |",
        f"| accuracy | {v['accuracy']:.4f} |",
        f"| false-negative rate | {v['false_negative_rate']:.4f} |",
        f"| confusion (TP/FN/TN/FP) | {v['tp']}/{v['fn']}/{v['tn']}/{v['fp']} |",
        "",
        "Reproduce: `python -m model_training evaluate --model pacsbridge/models/"
        f"{card['weights_file']} --data-dir ../shared/data/chest_xray/train --subset val`",
        "",
        f"Training command: `{card['training_command']}`",
        "",
        "## Data",
        "",
        card["data_source"],
        "",
        "## Intended use",
        "",
        *_intended_use_lines(card["intended_use"]),
        "",
        *_ood_lines(card.get("ood")),
        *_extra_lines(card.get("measurements")),
        "## Limits",
        "",
        *[f"- {x}" for x in card["limits"]],
        "",
    ]
    return "\n".join(lines)


def _intended_use_lines(use: str | dict) -> list[str]:
    if isinstance(use, str):
        return [use]
    age = use.get("age_years") or {}
    return [
        use.get("summary", ""),
        "",
        f"- Population: {use.get('population')}",
        f"- Age: {age.get('label')} ({age.get('note', '')}); the daemon's age gate (`age_gate`) refuses others "
        "as not analysed, reading Patient's Age or Birth Date with the Study/Acquisition Date",
        f"- Body part: {use.get('body_part')}; views: {', '.join(use.get('views', []))}; "
        f"modalities: {', '.join(use.get('modalities', []))}",
    ]


def _ood_lines(ood: dict | None) -> list[str]:
    if not ood:
        return []
    if ood.get("method") == "outlier-exposure-v2":
        split = ood.get("adult_split", {})
        counts = "; ".join(f"{part}: " + ", ".join(f"{src} {n}" for src, n in by.items())
                           for part, by in split.get("counts", {}).items())
        return [
            "## Out-of-distribution refusal",
            "",
            f"Method `{ood['method']}` (see `pacsbridge/model/ood.py`), outlier exposure: a logistic regression "
            f"(L2 {ood['l2']}) on the mean- and std-pooled features of the stem and every ResNet block of every "
            f"member, {ood['fitted_on']}; its logit, standardised on the training split, is compared with the v1 "
            f"Mahalanobis score (blocks {ood['blocks_used']}, standardised, lowered by {ood['maha_offset']}) and the "
            "larger is the score.",
            "",
            f"Threshold {ood['threshold']:.3f}: the {ood['keep_quantile']} quantile of the pediatric validation "
            f"split's scores ({ood['validation_quantile_cut']:.3f}), capped at the ceiling {ood['ceiling']:.3f} "
            f"({ood['ceiling_rule']}; {ood['calibrated_on']}). "
            f"Validation refusal rate {ood['validation_refusal_rate']:.4f} (training {ood['train_refusal_rate']:.4f}; "
            f"adult fit part {ood['adult_fit_refusal_rate']:.4f}, adult tuning part "
            f"{ood['adult_tune_refusal_rate']:.4f}). A site calibration may lower the cut, never raise it above the "
            "ceiling. The daemon refuses an image above the cut as not analysed (`ood_gate`) and records the score "
            "with every prediction.",
            "",
            f"Adult split (seed {split.get('seed')}, by {split.get('by')}): {counts}. The held part is never fitted "
            "on nor used to choose anything.",
            "",
            f"Reproduce: `{ood['command']}`",
            "",
        ]
    return [
        "## Out-of-distribution refusal",
        "",
        f"Method `{ood['method']}` (see `pacsbridge/model/ood.py`): Mahalanobis distance of the pooled features "
        f"of every ResNet stage of every member to class-conditional Gaussians (shared Ledoit-Wolf covariance) "
        f"fitted on the {ood['fitted_on']}, standardised per block, averaged over blocks {ood['blocks_used']}. "
        f"Threshold {ood['threshold']:.3f} = the {ood['keep_quantile']} quantile of the {ood['calibrated_on']} "
        f"scores: validation refusal rate {ood['validation_refusal_rate']:.4f} "
        f"(training {ood['train_refusal_rate']:.4f}). The daemon refuses an image above it as not analysed "
        "(`ood_gate`) and records the score with every prediction.",
        "",
        f"Reproduce: `{ood['command']}`",
        "",
    ]


def _extra_lines(measurements: dict | None) -> list[str]:
    """Free-form measured tables (Markdown lines) kept in the card under ``measurements``."""
    if not measurements:
        return []
    out: list[str] = []
    for title, body in measurements.items():
        out += [f"## {title}", "", *body, ""]
    return out
