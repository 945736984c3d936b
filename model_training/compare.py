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
from pacsbridge.model.preprocess import preprocess_batch

from . import metrics
from .data import labels_of, list_samples, load_images, split_by_patient
from .ensemble import artifact_members
from .stress import PERTURBATIONS
from .train import pick_device


def member_logits(members: dict[str, torch.nn.Module], images_u8: torch.Tensor, device: torch.device,
                  batch: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """``{shift: {member: logits}}`` for every shift in ``PERTURBATIONS``."""
    base = images_u8.float() / 255.0
    out: dict[str, dict[str, np.ndarray]] = {}
    for shift, fn in PERTURBATIONS.items():
        x = preprocess_batch(fn(base).clamp(0, 1))
        out[shift] = {}
        for name, m in members.items():
            with torch.inference_mode():
                out[shift][name] = torch.cat([m(x[i:i + batch].to(device)).float().cpu()
                                              for i in range(0, len(x), batch)]).numpy()
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
    blobs: dict[str, dict] = {}
    splits = set()
    for art in members_of or []:
        for label, blob, rep in artifact_members(art):
            blobs[label] = blob
            splits.add((rep["seed"], rep["val_fraction"]))
    for r in runs:
        rep = json.loads((r / "training.json").read_text())
        blobs[r.name] = torch.load(r / "model.pt", map_location="cpu", weights_only=True)
        splits.add((rep["seed"], rep["val_fraction"]))
    if len(splits) != 1:
        raise SystemExit(f"members use different patient splits {splits}: their validation sets differ")
    split_seed, val_fraction = splits.pop()
    device = pick_device()
    members = {}
    for label, blob in blobs.items():
        m = build_model(blob["architecture"])
        m.load_state_dict(blob["state_dict"])
        members[label] = m.to(device).eval()
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
