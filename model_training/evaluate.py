"""Score an exported artifact on an image folder: metrics at the card's threshold, ROC and calibration plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pacsbridge.model.artifact import load_model

from . import metrics
from .data import labels_of, list_samples, load_images, split_by_patient
from .ood import external_table, extract_pooled


def evaluate(model_path: Path, data_dir: Path, *, subset: str = "all", plots: Path | None = None,
             stress: bool = False, external: bool = False) -> dict:
    """Print and return AUC, sensitivity, specificity, accuracy, FNR and the confusion matrix.

    ``subset='val'`` re-creates the training run's patient split from the card's seed and
    validation fraction, so the card's validation figures can be reproduced exactly.
    """
    model = load_model(model_path, device="auto")
    samples = list_samples(data_dir)
    if subset != "all":
        train_s, val_s = split_by_patient(samples, float(model.card["val_fraction"]), int(model.card["seed"]))
        samples = val_s if subset == "val" else train_s
    y = labels_of(samples).numpy()
    images = load_images(samples)

    def score(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities and OOD scores (None without OOD statistics), one forward pass."""
        logits, pooled = extract_pooled(model.module, x, model.device)
        ood = model.ood.score_pooled(model.module, pooled).numpy() if model.ood is not None else None
        return metrics.sigmoid(logits / model.temperature), ood

    prob, ood = score(images)
    result = {
        "model": model.model_id, "images": len(samples), "subset": subset,
        "auc": metrics.roc_auc(y, prob), "threshold": model.threshold,
        **metrics.confusion(y, prob, model.threshold),
        "ece": metrics.expected_calibration_error(y, prob),
    }
    if ood is not None:
        result["ood"] = gated_metrics(y, prob, ood, model.threshold, model.ood.threshold)
    print(f"model {result['model']} on {data_dir} ({subset}, {len(samples)} images)")
    print(f"  ROC AUC             {result['auc']:.4f}")
    print(f"  threshold           {model.threshold:.4f}")
    print(f"  sensitivity         {result['sensitivity']:.4f}")
    print(f"  specificity         {result['specificity']:.4f}")
    print(f"  accuracy            {result['accuracy']:.4f}")
    print(f"  false-negative rate {result['false_negative_rate']:.4f}")
    print(f"  ECE                 {result['ece']:.4f}")
    print("  confusion matrix (rows: truth NORMAL/PNEUMONIA, cols: predicted NORMAL/PNEUMONIA)")
    print(f"    NORMAL     {result['tn']:5d} {result['fp']:5d}")
    print(f"    PNEUMONIA  {result['fn']:5d} {result['tp']:5d}")
    if ood is not None:
        g = result["ood"]
        print(f"  OOD gate (threshold {model.ood.threshold:.3f}): refused {g['refused_rate']:.4f} "
              f"({g['refused']} of {len(y)}); with refusals counted (a refused pneumonia = missed, a refused "
              f"normal = not flagged): sensitivity {g['sensitivity']:.4f}, specificity {g['specificity']:.4f}")
    if plots is not None:
        write_plots(y, prob, model.threshold, Path(plots))
        print(f"  plots: {Path(plots) / 'roc.png'}, {Path(plots) / 'calibration.png'}")
    if stress:
        from .stress import stress_table

        scored: list[tuple[np.ndarray, np.ndarray | None]] = []

        def predict(shifted: torch.Tensor) -> np.ndarray:
            scored.append(score(shifted))
            return scored[-1][0]

        result["stress"] = stress_table(predict, images, y, model.threshold)
        for r, (p, o) in zip(result["stress"], scored):
            if o is not None:
                g = gated_metrics(y, p, o, model.threshold, model.ood.threshold)  # type: ignore[union-attr]
                r.update(ood_refused_rate=g["refused_rate"], gated_sensitivity=g["sensitivity"],
                         gated_specificity=g["specificity"])
        print("  stress validation (shifted copies of the same images, card threshold; 'gated': OOD refusals")
        print("  counted, a refused pneumonia as missed and a refused normal as not flagged):")
        print(f"    {'perturbation':18s} {'AUC':>7s} {'sens':>7s} {'spec':>7s} {'OOD refused':>11s} "
              f"{'gated sens':>10s} {'gated spec':>10s}")
        for r in result["stress"]:
            gated = (f"{r['ood_refused_rate']:11.4f} {r['gated_sensitivity']:10.4f} {r['gated_specificity']:10.4f}"
                     if "ood_refused_rate" in r else f"{'-':>11s} {'-':>10s} {'-':>10s}")
            print(f"    {r['perturbation']:18s} {r['auc']:7.4f} {r['sensitivity']:7.4f} {r['specificity']:7.4f} {gated}")
    if external and model.ood is not None:
        result["external"] = external_table(model)
        n = len(result["external"])
        refused = sum(r["refused"] for r in result["external"])
        print(f"  OOD gate on pydicom-data/pydicom images (no header gate; a sanity check, not a tuning set): "
              f"refused {refused} of {n}")
        for r in result["external"]:
            print(f"    {r['file']:36s} {r['what']:22s} score {r['ood_score']:8.2f} {'refused' if r['refused'] else 'SCORED'}")
    print(json.dumps(result))
    return result



def gated_metrics(y: np.ndarray, prob: np.ndarray, ood: np.ndarray, threshold: float,
                  ood_threshold: float) -> dict:
    """Refusal rate of the OOD gate and sensitivity/specificity counting a refusal as 'not flagged'."""
    refused = ood > ood_threshold
    flagged = (prob >= threshold) & ~refused
    c = metrics.confusion(y, flagged.astype(float), 0.5)
    return {"refused": int(refused.sum()), "refused_rate": float(refused.mean()),
            "refused_pneumonia": int((refused & (y == 1)).sum()), "refused_normal": int((refused & (y == 0)).sum()),
            "sensitivity": c["sensitivity"], "specificity": c["specificity"]}


def write_plots(y: np.ndarray, prob: np.ndarray, threshold: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fpr, tpr, _ = metrics.roc_curve(y, prob)
    c = metrics.confusion(y, prob, threshold)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC {metrics.roc_auc(y, prob):.4f}")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.plot(1 - c["specificity"], c["sensitivity"], "o", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax.legend(loc="lower right")
    fig.savefig(out / "roc.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    bins = np.linspace(0, 1, 11)
    idx = np.clip(np.digitize(prob, bins[1:-1]), 0, 9)
    conf = [prob[idx == b].mean() for b in range(10) if (idx == b).any()]
    acc = [y[idx == b].mean() for b in range(10) if (idx == b).any()]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.plot(conf, acc, "o-", label=f"ECE {metrics.expected_calibration_error(y, prob):.4f}")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Calibration")
    ax.legend(loc="upper left")
    fig.savefig(out / "calibration.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
