"""Combine training runs that share one patient split into an ensemble, then re-calibrate it.

The members never saw the validation images (same split seed), so fitting the ensemble's
temperature and threshold on them is as honest as for a single model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pacsbridge.model.architecture import build_model

from .data import labels_of, list_samples, load_images, split_by_patient
from .train import calibrate_and_report, pick_device, predict_logits


def make_ensemble(runs: list[Path], data_dir: Path, out_dir: Path, min_sensitivity: float = 0.95) -> dict:
    reports = [json.loads((r / "training.json").read_text()) for r in runs]
    seeds = {(rep["seed"], rep["val_fraction"]) for rep in reports}
    if len(seeds) != 1:
        raise SystemExit(f"runs use different patient splits {seeds}: their validation sets differ")
    split_seed, val_fraction = seeds.pop()
    blobs = [torch.load(r / "model.pt", map_location="cpu", weights_only=True) for r in runs]
    name = "ensemble:" + "+".join(b["architecture"] for b in blobs)
    model = build_model(name)
    for member, blob in zip(model.members, blobs):
        member.load_state_dict(blob["state_dict"])
    device = pick_device()
    _, val_s = split_by_patient(list_samples(data_dir), val_fraction, split_seed)
    logits = predict_logits(model.to(device), load_images(val_s), device)
    report = calibrate_and_report(labels_of(val_s).numpy(), logits, min_sensitivity)
    first = reports[0]
    report.update(
        architecture=name, input_size=blobs[0]["input_size"], seed=split_seed, val_fraction=val_fraction,
        epochs=[r["epochs"] for r in reports], best_epoch=[r["best_epoch"] for r in reports],
        split=first["split"], command=" && ".join(r.get("command") or "?" for r in reports),
        members=[{"run": str(r), "validation": rep["validation"]} for r, rep in zip(runs, reports)],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.save({"architecture": name, "input_size": report["input_size"], "state_dict": state}, out_dir / "model.pt")
    (out_dir / "training.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("temperature", "threshold", "validation")}, indent=2))
    return report
