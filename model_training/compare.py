"""Compare candidate members and their combinations on clean and stress-shifted validation.

Validation specificity saturates at 1.0 on this data, so it cannot choose between recipes; the
stress shifts (``stress.PERTURBATIONS``) can.  For every subset of the given members (mean
logit, as the shipped ensemble does) this prints clean AUC, then, under each shift: AUC,
sensitivity and specificity at the threshold chosen on clean validation (sensitivity >= 0.95,
the shipped policy), and the specificity the ranking allows at sensitivity 0.95 on the shifted
copy itself (how well the model still separates the classes, whatever the threshold).

Each member's logits are computed once per shift, so ``n`` members cost ``n`` passes, not
``2^n``.  Temperature does not change any of these numbers (it is monotone), so none is fitted.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch

from pacsbridge.model.architecture import build_model

from . import metrics
from .data import labels_of, list_samples, load_images, split_by_patient
from .ensemble import gather_members
from .stress import PERTURBATIONS
from .train import pick_device, predict_logits


def member_logits(members: dict[str, torch.nn.Module], images_u8: torch.Tensor, device: torch.device
                  ) -> dict[str, dict[str, np.ndarray]]:
    """``{shift: {member: logits}}`` for every shift in ``PERTURBATIONS``."""
    base = images_u8.float() / 255.0
    out: dict[str, dict[str, np.ndarray]] = {}
    for shift, fn in PERTURBATIONS.items():
        shifted = fn(base).clamp(0, 1)
        out[shift] = {name: predict_logits(m, shifted, device) for name, m in members.items()}
    return out


def subset_rows(y: np.ndarray, logits: dict[str, dict[str, np.ndarray]], subset: tuple[str, ...],
                min_sensitivity: float = 0.95) -> dict:
    def mean(shift: str) -> np.ndarray:
        return np.mean([logits[shift][n] for n in subset], axis=0)

    clean = mean("none")
    t = metrics.threshold_for_sensitivity(y, clean, min_sensitivity)
    rows = []
    for shift in logits:
        s = mean(shift)
        c = metrics.confusion(y, s, t)
        ranking = metrics.confusion(y, s, metrics.threshold_for_sensitivity(y, s, min_sensitivity))
        rows.append({"shift": shift, "auc": metrics.roc_auc(y, s), "sensitivity": c["sensitivity"],
                     "specificity": c["specificity"], "spec_at_sens95": ranking["specificity"]})
    shifted = [r for r in rows if r["shift"] != "none"]
    return {
        "members": list(subset), "clean_auc": rows[0]["auc"],
        "mean_shift_sensitivity": float(np.mean([r["sensitivity"] for r in shifted])),
        "mean_shift_specificity": float(np.mean([r["specificity"] for r in shifted])),
        "min_shift_sensitivity": float(np.min([r["sensitivity"] for r in shifted])),
        "mean_shift_spec_at_sens95": float(np.mean([r["spec_at_sens95"] for r in shifted])),
        "rows": rows,
    }


def compare(runs: list[Path], data_dir: Path, members_of: list[Path] | None = None, max_size: int = 2) -> list[dict]:
    labels, blobs, _, split_seed, val_fraction = gather_members(runs, members_of)
    device = pick_device()
    members = {}
    for label, blob in zip(labels, blobs):
        m = build_model(blob["architecture"])
        m.load_state_dict(blob["state_dict"])
        members[Path(label).name] = m.to(device).eval()  # a run folder by its name
    _, val_s = split_by_patient(list_samples(data_dir), val_fraction, split_seed)
    y = labels_of(val_s).numpy()
    logits = member_logits(members, load_images(val_s), device)
    results = []
    for k in range(1, min(max_size, len(members)) + 1):
        for subset in itertools.combinations(members, k):
            results.append(subset_rows(y, logits, subset))
    print(f"{'members':52s} {'AUC':>6s} {'shift sens':>10s} {'min sens':>8s} {'shift spec':>10s} "
          f"{'spec@sens.95':>12s}")
    for r in results:
        print(f"{' + '.join(r['members']):52s} {r['clean_auc']:6.4f} {r['mean_shift_sensitivity']:10.3f} "
              f"{r['min_shift_sensitivity']:8.3f} {r['mean_shift_specificity']:10.3f} "
              f"{r['mean_shift_spec_at_sens95']:12.3f}")
    for r in results:
        print(f"\n{' + '.join(r['members'])}")
        for row in r["rows"]:
            print(f"  {row['shift']:16s} AUC {row['auc']:.4f}  sens {row['sensitivity']:.3f}  "
                  f"spec {row['specificity']:.3f}  spec@sens.95 {row['spec_at_sens95']:.3f}")
    print(json.dumps(results))
    return results
