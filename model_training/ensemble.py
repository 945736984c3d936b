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


def artifact_members(artifact: Path) -> list[tuple[str, dict, dict]]:
    """``(label, blob, report)`` for each member of a shipped artifact (an ensemble or one model),
    so a new ensemble can reuse members whose training runs are gone; the report carries what
    :func:`make_ensemble` checks (split seed, validation fraction) from the artifact's card.

    ``path.pt#1`` (or ``#0,1``) takes only those members, counted from 0.
    """
    artifact, _, pick = str(artifact).partition("#")
    artifact = Path(artifact)
    card = json.loads(artifact.with_suffix(".json").read_text())
    blob = torch.load(artifact, map_location="cpu", weights_only=True)
    arch = blob["architecture"]
    names = arch[len("ensemble:"):].split("+") if arch.startswith("ensemble:") else [arch]
    epochs = card["epochs"] if isinstance(card["epochs"], list) else [card["epochs"]] * len(names)
    best = card["best_epoch"] if isinstance(card["best_epoch"], list) else [card["best_epoch"]] * len(names)
    commands = (card.get("training_command") or "?").split(" && ")
    out = []
    for i, name in enumerate(names):
        if pick and str(i) not in pick.split(","):
            continue
        prefix = f"members.{i}." if arch.startswith("ensemble:") else ""
        state = {k[len(prefix):]: v.float() if v.is_floating_point() else v
                 for k, v in blob["state_dict"].items() if k.startswith(prefix)}
        report = {"seed": card["seed"], "val_fraction": card["val_fraction"], "epochs": epochs[i],
                  "best_epoch": best[i], "split": card["split"], "validation": None,
                  "command": commands[i] if len(commands) == len(names) else card.get("training_command")}
        out.append((f"{artifact.name}#member{i}", {"architecture": name, "input_size": blob["input_size"],
                                                   "state_dict": state}, report))
    return out


def gather_members(runs: list[Path], members_of: list[Path] | None = None
                   ) -> tuple[list[str], list[dict], list[dict], int, float]:
    """Labels, weight blobs and reports of the members of shipped artifacts, then of training runs,
    and their shared patient split ``(seed, validation fraction)``; exits if the splits differ."""
    reused = [m for art in members_of or [] for m in artifact_members(art)]
    labels = [label for label, _, _ in reused] + [str(r) for r in runs]
    blobs = [b for _, b, _ in reused] + [torch.load(r / "model.pt", map_location="cpu", weights_only=True) for r in runs]
    reports = [rep for _, _, rep in reused] + [json.loads((r / "training.json").read_text()) for r in runs]
    seeds = {(rep["seed"], rep["val_fraction"]) for rep in reports}
    if len(seeds) != 1:
        raise SystemExit(f"runs use different patient splits {seeds}: their validation sets differ")
    split_seed, val_fraction = seeds.pop()
    return labels, blobs, reports, split_seed, val_fraction


def make_ensemble(runs: list[Path], data_dir: Path, out_dir: Path, min_sensitivity: float = 0.95,
                  members_of: list[Path] | None = None, half: bool = False) -> dict:
    """Average the members' logits; fit temperature and threshold on the shared validation split.

    ``half`` rounds the weights to float16 first, as ``export --half`` will store them: the
    threshold sits on one validation image, and rounding alone can move that image across it.
    """
    labels, blobs, reports, split_seed, val_fraction = gather_members(runs, members_of)
    name = "ensemble:" + "+".join(b["architecture"] for b in blobs)
    model = build_model(name)
    for member, blob in zip(model.members, blobs):
        state = blob["state_dict"]
        if half:
            state = {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}
        member.load_state_dict(state)
    device = pick_device()
    _, val_s = split_by_patient(list_samples(data_dir), val_fraction, split_seed)
    logits = predict_logits(model.to(device), load_images(val_s), device)
    report = calibrate_and_report(labels_of(val_s).numpy(), logits, min_sensitivity)
    first = reports[0]
    report.update(
        architecture=name, input_size=blobs[0]["input_size"], seed=split_seed, val_fraction=val_fraction,
        epochs=[r["epochs"] for r in reports], best_epoch=[r["best_epoch"] for r in reports],
        split=first["split"], command=" && ".join(r.get("command") or "?" for r in reports),
        rounded_to_float16=half,
        members=[{"run": label, "validation": rep["validation"]} for label, rep in zip(labels, reports)],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.save({"architecture": name, "input_size": report["input_size"], "state_dict": state}, out_dir / "model.pt")
    (out_dir / "training.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("temperature", "threshold", "validation")}, indent=2))
    return report
