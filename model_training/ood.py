"""Fit the out-of-distribution statistics of an exported model and write a new artifact with them.

``python -m model_training ood --model runs/art/pneumonia-v3-weights.pt --data-dir ... --version v3``

* The Gaussians (class means, shrunk shared covariance per member and stage) are fitted on the
  **training** split of the card's patient split only.
* The threshold is the ``keep`` quantile of the OOD scores of the **validation** split (images
  the fit never saw): e.g. ``keep=0.99`` refuses about 1 % of in-distribution images.
* The weights are copied unchanged: the new artifact scores exactly as the old one.

``external_images()`` gives the real non-pediatric radiographs and other modalities shipped in
pydicom-data / pydicom (adult chest RG1, extremity RG3, CT, MR, NM, US, ...), decoded without
any header gate: the only honest "outside" images available offline.  They are a sanity check,
not a tuning set.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch

from pacsbridge.model.artifact import load_model, sha256_file
from pacsbridge.model.ood import METHOD, OodStats, fit_blocks, forward_with_features
from pacsbridge.model.preprocess import preprocess_batch

from .data import labels_of, list_samples, load_images, split_by_patient

log = logging.getLogger("model_training")

#: Intended use written into the card of models trained on the Kermany set (see its README:
#: "Children aged 1 to 5 from one hospital, mostly AP views").
INTENDED_USE = {
    "summary": (
        "Screening aid that routes likely-pneumonia chest radiographs of young children to a radiologist "
        "first. Not a diagnosis: every study still needs a radiologist's read; a negative score does not "
        "rule out disease."
    ),
    "population": "children aged 1 to 5 years (Guangzhou Women and Children's Medical Center; Kermany et al. 2018)",
    "age_years": {"min": 1, "max_exclusive": 6, "label": "1-5 y",
                  "note": "whole years 1 to 5: refused below the 1st and from the 6th birthday on; "
                          "adults are always refused. A missing or malformed age is not refused "
                          "(the image-based OOD check still applies)."},
    "body_part": "CHEST",
    "views": ["AP", "PA"],
    "modalities": ["CR", "DX", "SC (digitised grey film)"],
}


@torch.inference_mode()
def extract(module: torch.nn.Module, images: torch.Tensor, device: torch.device,
            batch: int = 64) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Logits and pooled stage features of float images ``(N, H, W)`` in [0, 1] (or uint8)."""
    module.eval()
    logits, blocks = [], None
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        z, feats = forward_with_features(module, preprocess_batch(x).to(device))
        logits.append(z.float().cpu())
        feats = [f.cpu() for f in feats]
        blocks = [[f] for f in feats] if blocks is None else [b + [f] for b, f in zip(blocks, feats)]
    return torch.cat(logits).numpy(), [torch.cat(b) for b in (blocks or [])]


def fit_stats(train_feats: list[torch.Tensor], train_labels: torch.Tensor, val_feats: list[torch.Tensor],
              use: list[int], keep: float) -> tuple[OodStats, dict]:
    """Fit on training features, standardise per block on training, threshold at the ``keep``
    quantile of validation scores.  Returns the stats and a small report."""
    means, precs = fit_blocks(train_feats, train_labels)
    stats = OodStats(means=means, precisions=precs, centre=torch.zeros(len(means), dtype=torch.float64),
                     scale=torch.ones(len(means), dtype=torch.float64), use=use, threshold=float("inf"))
    raw = stats.block_distances(train_feats)
    stats.centre = raw.mean(0)
    stats.scale = raw.std(0).clamp_min(1e-9)
    val_scores = stats.score(val_feats).numpy()
    stats.threshold = float(np.quantile(val_scores, keep, method="higher"))
    report = {
        "method": METHOD, "blocks_used": use, "keep_quantile": keep,
        "threshold": stats.threshold,
        "validation_refusal_rate": float((val_scores > stats.threshold).mean()),
        "train_refusal_rate": float((stats.score(train_feats).numpy() > stats.threshold).mean()),
    }
    return stats, report


def external_images() -> list[tuple[str, str, np.ndarray]]:
    """(file name, what it is, display-ready image) for the grey images in pydicom-data / pydicom,
    decoded with no header gate (body part, modality, view ignored).  Multi-frame: first frame."""
    import pydicom

    from pacsbridge.imaging.decode import decode_display

    roots = []
    try:
        import data_store  # pydicom-data

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    roots.append(Path(pydicom.__file__).parent / "data" / "test_files")
    out = []
    seen: set[bytes] = set()
    for root in roots:
        for path in sorted(root.glob("*.dcm")):
            try:
                ds = pydicom.dcmread(path)
                if "PixelData" not in ds or int(ds.get("SamplesPerPixel", 1)) != 1:
                    continue
                image = decode_display(ds).image
            except Exception:  # noqa: BLE001 - broken test files are expected in those folders
                continue
            if image.ndim != 2 or min(image.shape) < 32 or float(image.std()) < 1e-3:
                continue
            key = np.round(image[::8, ::8], 1).tobytes()  # the same picture in another transfer syntax
            if key in seen:
                continue
            seen.add(key)
            what = " ".join(str(v) for v in (ds.get("Modality"), ds.get("BodyPartExamined")) if v)
            out.append((path.name, what or "?", image))
    return out


def write_ood_artifact(model_path: Path, data_dir: Path, out_dir: Path, version: str, *,
                       use: list[int], keep: float = 0.99) -> Path:
    """A copy of ``model_path`` with OOD statistics and the intended use; returns the new .pt."""
    from .export import model_card_markdown

    model = load_model(model_path, device="auto")
    card = copy.deepcopy(model.card)
    samples = list_samples(data_dir)
    train_s, val_s = split_by_patient(samples, float(card["val_fraction"]), int(card["seed"]))
    log.info("features of %d training and %d validation images", len(train_s), len(val_s))
    _, train_feats = extract(model.module, load_images(train_s), model.device)
    _, val_feats = extract(model.module, load_images(val_s), model.device)
    stats, report = fit_stats(train_feats, labels_of(train_s), val_feats, use, keep)

    blob = torch.load(model_path, map_location="cpu", weights_only=True)
    blob["ood"] = stats.to_blob()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"pneumonia-{version}"
    dest = out_dir / f"{name}.pt"
    torch.save(blob, dest)
    card.update(
        model_id=name, version=version, weights_file=dest.name, weights_sha256=sha256_file(dest),
        intended_use=INTENDED_USE, derived_from={"artifact": model_path.name, "weights_sha256": model.weights_sha256,
                                                 "note": "same weights; OOD statistics and intended use added"},
        ood={**report, "fitted_on": f"training split ({len(train_s)} images)",
             "calibrated_on": f"validation split ({len(val_s)} images)",
             "command": f"python -m model_training ood --model {model_path} --data-dir {data_dir} "
                        f"--version {version} --keep {keep} --blocks {','.join(map(str, use))}"},
    )
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(model_card_markdown(card))
    print(json.dumps(card["ood"], indent=2))
    return dest
