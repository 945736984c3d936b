"""Fit the out-of-distribution statistics of an exported model and write a new artifact with them.

``python -m model_training ood --model runs/art/pneumonia-v3-weights.pt --data-dir ... --version v3``
(method ``mahalanobis-multilayer-v1``), or with ``--method oe --adult-dir ../shared/data/adult_chest``
(method ``outlier-exposure-v2``, see :mod:`pacsbridge.model.ood`).  ``ood-eval`` scores an artifact's
refusal on the held-aside adults and its in-scope rate on the pediatric validation split.

The adult set is split by :func:`split_adults`: per source, by image, with a fixed seed, into a
*fit* part (the logistic head's outliers), a *tune* part (the ceiling; choosing hyper-parameters)
and a *held* part that nothing is fitted or chosen on (the refusal rate reported in the card).

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
from pacsbridge.model.ood import (METHOD, METHOD_V1, OodStats, OutlierExposureStats, fit_blocks,
                                  forward_pooled, forward_with_features, stage_features)
from pacsbridge.model.preprocess import preprocess, preprocess_batch

from .data import Sample, labels_of, list_samples, load_images, split_by_patient

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
def _extract_with(forward, module: torch.nn.Module, images: torch.Tensor, device: torch.device,  # noqa: ANN001
                  batch: int) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Logits and the feature blocks ``forward(module, x)`` returns, batch by batch, each block
    concatenated over the images."""
    module.eval()
    logits, blocks = [], None
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        z, feats = forward(module, preprocess_batch(x).to(device))
        logits.append(z.float().cpu())
        feats = [f.cpu() for f in feats]
        blocks = [[f] for f in feats] if blocks is None else [b + [f] for b, f in zip(blocks, feats)]
    return torch.cat(logits).numpy(), [torch.cat(b) for b in (blocks or [])]


def extract(module: torch.nn.Module, images: torch.Tensor, device: torch.device,
            batch: int = 64) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Logits and pooled stage features of float images ``(N, H, W)`` in [0, 1] (or uint8)."""
    return _extract_with(forward_with_features, module, images, device, batch)


def extract_pooled(module: torch.nn.Module, images: torch.Tensor, device: torch.device,
                   batch: int = 64) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Logits and :func:`forward_pooled` features (one ``(N, D)`` per member) of float images ``(N, H, W)``."""
    return _extract_with(forward_pooled, module, images, device, batch)


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
        "method": METHOD_V1, "blocks_used": use, "keep_quantile": keep,
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


def external_table(model) -> list[dict]:  # noqa: ANN001 - a LoadedModel with OOD statistics
    """OOD scores of the distinct grey images of pydicom-data / pydicom (adult chest, extremity, CT, MR...)."""
    rows = []
    for name, what, image in external_images():
        _, [s] = model.score_inputs(preprocess(image, model.input_size).unsqueeze(0))
        rows.append({"file": name, "what": what, "ood_score": float(s), "refused": bool(s > model.ood.threshold)})
    return rows


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


#: Default seed of the adult split (fit / tune / held) and the parts' shares.
ADULT_SEED = 15
ADULT_PARTS = (("fit", 0.4), ("tune", 0.2), ("held", 0.4))
#: A site's cut may not be looser than the one that refuses this share of the adult tuning part.
CEILING_REFUSAL = 0.90


def split_adults(adult_dir: Path, seed: int = ADULT_SEED) -> dict[str, list[Path]]:
    """The adult set's images split per source folder and by image into fit / tune / held parts.

    Sources are the sub-folders of ``adult_dir`` (sorted); each is shuffled with one seeded
    generator (in source order) and cut 40 / 20 / 40 %, so every part holds both sources."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[Path]] = {name: [] for name, _ in ADULT_PARTS}
    sources = sorted(p for p in Path(adult_dir).iterdir() if p.is_dir())
    if not sources:
        raise FileNotFoundError(f"no source folders under {adult_dir}")
    for source in sources:
        files = sorted(f for f in source.iterdir() if f.suffix.lower() in {".jpeg", ".jpg", ".png"})
        order = [files[i] for i in rng.permutation(len(files))]
        start, acc = 0, 0.0
        for name, share in ADULT_PARTS:
            acc += share
            end = int(round(acc * len(order)))
            parts[name] += order[start:end]
            start = end
    return parts


def load_paths(paths: list[Path]) -> torch.Tensor:
    return load_images([Sample(p, 0, p.parent.name) for p in paths])


def in_scope_variants(images_u8: torch.Tensor, seed: int = 7, batch: int = 64) -> torch.Tensor:
    """Mildly shifted copies of pediatric images (float, [0, 1]) that the logistic head is told are
    in scope, so that the adult direction it learns is not "tighter framing" or "other grey levels":
    per batch of ``batch`` images one zoom-in 1.0-1.2, one gamma 0.6-1.6, and a quarter each blurred
    (sigma 1-2) or JPEG-compressed (q25).  Seeded, so a refit gives the same copies."""
    from .stress import _blur, _jpeg, _zoom

    base = images_u8.float() / 255.0
    g = torch.Generator().manual_seed(seed)
    out = torch.empty_like(base)
    for i in range(0, len(base), batch):
        x = _zoom(base[i : i + batch], 1.0 + 0.2 * float(torch.rand(1, generator=g)))
        gamma = float(torch.exp(torch.empty(1).uniform_(float(np.log(0.6)), float(np.log(1.6)), generator=g)))
        x = x.clamp(1e-4, 1) ** gamma
        r = float(torch.rand(1, generator=g))
        if r < 0.25:
            x = _blur(x, 1.0 + float(torch.rand(1, generator=g)))
        elif r < 0.5:
            x = _jpeg(x.clamp(0, 1))
        out[i : i + len(x)] = x.clamp(0, 1)
    return out


def cached_pooled(model, paths: list[Path], cache: Path | None, what: str,  # noqa: ANN001
                  variants: bool = False) -> list[torch.Tensor]:
    """:func:`extract_pooled` features of image files, kept in ``cache`` (a scratch folder, never the
    repository) under a key of the weights and the file list, so refits with other settings are quick."""
    import hashlib

    key = hashlib.sha256((model.weights_sha256 + "\n" + "\n".join(str(p) for p in paths)).encode()).hexdigest()[:16]
    if cache is not None:
        f = Path(cache) / f"{what}-{key}.pt"
        if f.is_file():
            return torch.load(f, weights_only=True)
    images = load_paths(paths)
    _, pooled = extract_pooled(model.module, in_scope_variants(images) if variants else images, model.device)
    if cache is not None:
        Path(cache).mkdir(parents=True, exist_ok=True)
        torch.save(pooled, f)
    return pooled


def fit_logistic(x_in: torch.Tensor, x_out: torch.Tensor, lam: float, iters: int = 300) -> tuple[torch.Tensor, float]:
    """L2-penalised logistic regression (out = 1), both classes weighted equally; float64 L-BFGS."""
    x = torch.cat([x_in, x_out]).double()
    y = torch.cat([torch.zeros(len(x_in)), torch.ones(len(x_out))]).double()
    wts = torch.where(y > 0, 0.5 / len(x_out), 0.5 / len(x_in)).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (wts * torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).sum()
        loss = loss + lam * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), float(b.detach())


def ceiling_of(tune_scores: np.ndarray, refusal: float = CEILING_REFUSAL) -> float:
    """The loosest cut (largest threshold) that still refuses ``refusal`` of ``tune_scores``."""
    s = np.sort(np.asarray(tune_scores, dtype=np.float64))
    need = int(np.ceil(refusal * len(s)))
    j = len(s) - need - 1
    return float(s[j]) if j >= 0 else float(s[0] - 1.0)


def fit_oe_stats(module: torch.nn.Module, train_pooled: list[torch.Tensor], train_labels: torch.Tensor,
                 val_pooled: list[torch.Tensor], fit_pooled: list[torch.Tensor], tune_pooled: list[torch.Tensor], *,
                 use: list[int], keep: float, lam: float, maha_offset: float,
                 variant_pooled: list[torch.Tensor] | None = None) -> tuple[OutlierExposureStats, dict]:
    """Fit ``outlier-exposure-v2``: logistic head (training split, plus ``variant_pooled``: shifted
    copies of it, vs the adult fit part) + v1 Mahalanobis.  Standardisation is on the training split."""
    n_blocks = len(stage_features(module, [p[:1] for p in train_pooled]))
    if not use or not all(0 <= u < n_blocks for u in use):
        raise ValueError(f"--blocks {use}: this model has blocks 0..{n_blocks - 1}")
    maha, _ = fit_stats(stage_features(module, train_pooled), train_labels, stage_features(module, val_pooled),
                        use, keep)
    x_tr = torch.cat([p.double() for p in train_pooled], 1)
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    x_out = torch.cat([p.double() for p in fit_pooled], 1)
    x_in = x_tr if variant_pooled is None else torch.cat([x_tr, torch.cat([p.double() for p in variant_pooled], 1)])
    w, b = fit_logistic((x_in - mean) / std, (x_out - mean) / std, lam)
    z_tr = ((x_tr - mean) / std) @ w + b
    m_tr = maha.score_pooled(module, train_pooled)
    stats = OutlierExposureStats(
        maha=maha, feat_mean=mean.float(), feat_std=std.float(), weight=w.float(), bias=b,
        logit_centre=float(z_tr.mean()), logit_scale=float(z_tr.std().clamp_min(1e-9)),
        maha_centre=float(m_tr.mean()), maha_scale=float(m_tr.std().clamp_min(1e-9)), maha_offset=maha_offset,
        threshold=0.0)  # set below, once the stored (float32) statistics have scored validation
    # The stored float32 vectors are what inference uses: score with them, not the float64 fit.
    stats = OutlierExposureStats.from_blob(stats.to_blob())
    val = stats.score_pooled(module, val_pooled).numpy()
    tune = stats.score_pooled(module, tune_pooled).numpy()
    quantile_cut = float(np.quantile(val, keep, method="higher"))
    stats.ceiling = ceiling_of(tune)
    stats.threshold = min(quantile_cut, stats.ceiling)
    report = {
        "method": METHOD, "blocks_used": use, "keep_quantile": keep, "l2": lam, "maha_offset": maha_offset,
        "in_scope_variants": variant_pooled is not None,
        "threshold": stats.threshold, "validation_quantile_cut": quantile_cut, "ceiling": stats.ceiling,
        "ceiling_rule": f"largest cut refusing >= {CEILING_REFUSAL:.0%} of the adult tuning part",
        "validation_refusal_rate": float((val > stats.threshold).mean()),
        "train_refusal_rate": float((stats.score_pooled(module, train_pooled).numpy() > stats.threshold).mean()),
        "adult_fit_refusal_rate": float((stats.score_pooled(module, fit_pooled).numpy() > stats.threshold).mean()),
        "adult_tune_refusal_rate": float((tune > stats.threshold).mean()),
    }
    return stats, report


def write_oe_artifact(model_path: Path, data_dir: Path, adult_dir: Path, out_dir: Path, version: str, *,
                      use: list[int], keep: float = 0.98, lam: float = 0.01, maha_offset: float = 2.0,
                      adult_seed: int = ADULT_SEED, cache: Path | None = None, variants: bool = True) -> Path:
    """A copy of ``model_path`` with ``outlier-exposure-v2`` statistics; returns the new .pt."""
    from .export import model_card_markdown

    model = load_model(model_path, device="auto")
    card = copy.deepcopy(model.card)
    train_s, val_s = split_by_patient(list_samples(data_dir), float(card["val_fraction"]), int(card["seed"]))
    adults = split_adults(adult_dir, adult_seed)
    log.info("features of %d training, %d validation, %d adult fit and %d adult tuning images",
             len(train_s), len(val_s), len(adults["fit"]), len(adults["tune"]))
    def feats(paths: list[Path], what: str) -> list[torch.Tensor]:
        return cached_pooled(model, paths, cache, what)

    tr = feats([s.path for s in train_s], "train")
    va = feats([s.path for s in val_s], "val")
    fit = feats(adults["fit"], "adult-fit")
    tune = feats(adults["tune"], "adult-tune")
    shifted = cached_pooled(model, [s.path for s in train_s], cache, "train-variants", variants=True) if variants else None
    stats, report = fit_oe_stats(model.module, tr, labels_of(train_s), va, fit, tune, use=use, keep=keep,
                                 lam=lam, maha_offset=maha_offset, variant_pooled=shifted)

    blob = torch.load(model_path, map_location="cpu", weights_only=True)
    blob["ood"] = stats.to_blob()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"pneumonia-{version}"
    dest = out_dir / f"{name}.pt"
    torch.save(blob, dest)
    counts = {part: {src.name: sum(p.parent.name == src.name for p in paths)
                     for src in sorted(q for q in Path(adult_dir).iterdir() if q.is_dir())}
              for part, paths in adults.items()}
    card.update(
        model_id=name, version=version, weights_file=dest.name, weights_sha256=sha256_file(dest),
        intended_use=INTENDED_USE,
        ood={**report, "fitted_on": f"training split ({len(train_s)} images"
                                    f"{' and one shifted copy of each' if variants else ''}) vs adult fit part "
                                    f"({len(adults['fit'])} images)",
             "calibrated_on": f"validation split ({len(val_s)} images); ceiling on the adult tuning part "
                              f"({len(adults['tune'])} images)",
             "adult_split": {"seed": adult_seed, "by": "source folder, then image",
                             "shares": dict(ADULT_PARTS), "counts": counts},
             "command": f"python -m model_training ood --method oe --model {model_path} --data-dir {data_dir} "
                        f"--adult-dir {adult_dir} --version {version} --keep {keep} --l2 {lam} "
                        f"--maha-offset {maha_offset} --blocks {','.join(map(str, use))}"
                        + ("" if variants else " --no-variants")},
    )
    previous = card.get("derived_from") or {}
    card["derived_from"] = {
        "artifact": model_path.name, "weights_sha256": model.weights_sha256,
        "note": f"same weights as {model.model_id} (state_dict copied unchanged); OOD statistics refitted "
                f"({METHOD}) and the threshold/ceiling set",
        "build_commands": [*previous.get("build_commands", []), card["ood"]["command"]],
    }
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(model_card_markdown(card))
    print(json.dumps(card["ood"], indent=2))
    return dest


def evaluate_refusal(model_path: Path, data_dir: Path, adult_dir: Path, *, adult_seed: int = ADULT_SEED,
                     parts: tuple[str, ...] = ("held",), external: bool = True) -> dict:
    """Refusal of adult parts (per source) and the in-scope rate of the pediatric validation split,
    at the artifact's own cut; prints a table and one JSON line."""
    model = load_model(model_path, device="auto")
    if model.ood is None:
        raise SystemExit(f"{model_path} has no OOD statistics")
    cut = model.ood.threshold
    _, val_s = split_by_patient(list_samples(data_dir), float(model.card["val_fraction"]), int(model.card["seed"]))

    def scores(images: torch.Tensor) -> np.ndarray:
        _, pooled = extract_pooled(model.module, images, model.device)
        return model.ood.score_pooled(model.module, pooled).numpy()  # type: ignore[union-attr]

    val = scores(load_images(val_s))
    result: dict = {"model": model.model_id, "method": model.ood.method, "threshold": cut,
                    "ceiling": getattr(model.ood, "ceiling", None),
                    "validation": {"images": len(val), "in_scope_rate": float((val <= cut).mean())}}
    print(f"model {model.model_id} ({model.ood.method}), OOD cut {cut:.3f}")
    print(f"  pediatric validation: {len(val)} images, in scope {result['validation']['in_scope_rate']:.4f}")
    adults = split_adults(adult_dir, adult_seed)
    for part in parts:
        paths = adults[part]
        s = scores(load_paths(paths))
        src = np.array([p.parent.name for p in paths])
        row = {"images": len(paths), "refused_rate": float((s > cut).mean()),
               "by_source": {k: {"images": int((src == k).sum()), "refused_rate": float((s[src == k] > cut).mean())}
                             for k in sorted(set(src))}}
        result[f"adult_{part}"] = row
        by = ", ".join(f"{k} {v['refused_rate']:.4f} of {v['images']}" for k, v in row["by_source"].items())
        print(f"  adult {part} part: {len(paths)} images, refused {row['refused_rate']:.4f} ({by})")
    if external:
        ext = external_table(model)
        result["external"] = {"images": len(ext), "refused": sum(r["refused"] for r in ext)}
        print(f"  pydicom-data grey images (header gates bypassed): {result['external']['refused']} of {len(ext)} refused")
    print(json.dumps(result))
    return result
