"""Train the pneumonia CNN from scratch, keep the best epoch by validation AUC, calibrate, export."""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pacsbridge.model.architecture import build_model
from pacsbridge.model.preprocess import INPUT_SIZE, preprocess_batch

from . import metrics
from .augment import augment
from .data import labels_of, list_samples, load_images, split_by_patient

log = logging.getLogger("model_training")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 64) -> np.ndarray:
    """Logits for images ``(N, H, W)`` (uint8, or float in [0, 1]) through the shared preprocessing."""
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        out.append(model(preprocess_batch(x).to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def train(
    data_dir: Path,
    out_dir: Path,
    *,
    epochs: int = 20,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 5e-4,
    val_fraction: float = 0.15,
    seed: int = 1234,
    split_seed: int | None = None,
    limit: int | None = None,
    architecture: str = "small-resnet-v1",
    min_sensitivity: float = 0.95,
    mixup: float = 0.0,
    label_smoothing: float = 0.0,
    frame: float = 0.0,
    command: str | None = None,
) -> dict:
    """Train and write ``out_dir/model.pt`` (weights) and ``out_dir/training.json`` (report)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    device = pick_device()
    out_dir.mkdir(parents=True, exist_ok=True)

    split_seed = seed if split_seed is None else split_seed  # same split for ensemble members
    samples = list_samples(data_dir)
    train_s, val_s = split_by_patient(samples, val_fraction, split_seed)
    if limit:  # tiny runs for tests: keep both classes on both sides
        rng = np.random.default_rng(seed)
        train_s = [train_s[i] for i in sorted(rng.choice(len(train_s), min(limit, len(train_s)), replace=False))]
        val_s = [val_s[i] for i in sorted(rng.choice(len(val_s), min(max(limit // 3, 4), len(val_s)), replace=False))]
    log.info("split by patient: %d train / %d validation images (split seed %d)", len(train_s), len(val_s), split_seed)
    x_train, y_train = load_images(train_s), labels_of(train_s)
    x_val, y_val = load_images(val_s), labels_of(val_s).numpy()

    n_pos = float(y_train.sum())
    n_neg = float(len(y_train) - n_pos)
    pos_weight = torch.tensor(n_neg / max(n_pos, 1.0), device=device)  # class imbalance ~1:2.9

    model = build_model(architecture).to(device)
    ema = copy.deepcopy(model).eval()  # exponential moving average of weights: steadier, generalizes better
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, (len(x_train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    use_amp = device.type == "cuda"
    gen = torch.Generator().manual_seed(seed)

    best = {"auc": -1.0, "epoch": -1}
    best_state = None
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", file=sys.stderr, leave=False)
        for step in bar:
            idx = perm[step * batch_size : (step + 1) * batch_size]
            xb = preprocess_batch(augment(x_train[idx].float() / 255.0, gen, frame=frame)).to(device)
            yb = y_train[idx].to(device)
            if label_smoothing > 0:  # some training labels are wrong; do not push logits to infinity on them
                yb = yb * (1 - label_smoothing) + 0.5 * label_smoothing
            if mixup > 0:  # soft labels between pairs: smoother, better-calibrated decision boundary
                lam = float(torch.distributions.Beta(mixup, mixup).sample())
                j = torch.randperm(len(idx), generator=gen)
                xb = lam * xb + (1 - lam) * xb[j]
                yb = lam * yb + (1 - lam) * yb[j]
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(xb)
            loss = F.binary_cross_entropy_with_logits(logits.float(), yb, pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                decay = min(0.998, (1 + step + epoch * steps_per_epoch) / (10 + step + epoch * steps_per_epoch))
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
            total += float(loss.detach()) * len(idx)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        val_logits = predict_logits(ema, x_val, device)
        auc = metrics.roc_auc(y_val, val_logits)
        row = {"epoch": epoch, "train_loss": total / len(x_train), "val_auc": auc, "seconds": time.time() - t0}
        history.append(row)
        print(f"epoch {epoch:3d}  train_loss {row['train_loss']:.4f}  val_auc {auc:.4f}  ({row['seconds']:.0f} s)", flush=True)
        if auc > best["auc"] or best_state is None:
            best = {"auc": auc, "epoch": epoch}
            best_state = {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}

    model = build_model(architecture)
    model.load_state_dict(best_state)
    val_logits = predict_logits(model.to(device), x_val, device)
    report = calibrate_and_report(y_val, val_logits, min_sensitivity)
    report.update(
        architecture=architecture, input_size=INPUT_SIZE, seed=split_seed, init_seed=seed, val_fraction=val_fraction, epochs=epochs,
        best_epoch=best["epoch"], history=history, command=command, mixup=mixup, label_smoothing=label_smoothing, frame=frame,
        split={"train_images": len(train_s), "val_images": len(val_s),
               "train_patients": len({s.patient for s in train_s}), "val_patients": len({s.patient for s in val_s}),
               "train_positive": int(n_pos), "train_negative": int(n_neg),
               "val_positive": int(y_val.sum()), "val_negative": int(len(y_val) - y_val.sum())},
        device=str(device), limit=limit,
    )
    torch.save({"architecture": architecture, "input_size": INPUT_SIZE, "state_dict": best_state}, out_dir / "model.pt")
    (out_dir / "training.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("best_epoch", "temperature", "threshold", "validation")}, indent=2))
    return report


def calibrate_and_report(y: np.ndarray, logits: np.ndarray, min_sensitivity: float) -> dict:
    """Fit the temperature, choose the threshold, and compute validation metrics at it."""
    temperature = metrics.fit_temperature(y, logits)
    raw = metrics.sigmoid(logits)
    prob = metrics.sigmoid(logits / temperature)
    threshold = metrics.threshold_for_sensitivity(y, prob, min_sensitivity)
    val = {"auc": metrics.roc_auc(y, prob), **metrics.confusion(y, prob, threshold),
           "ece_before": metrics.expected_calibration_error(y, raw),
           "ece_after": metrics.expected_calibration_error(y, prob)}
    return {"temperature": temperature, "threshold": threshold, "min_sensitivity": min_sensitivity, "validation": val}
