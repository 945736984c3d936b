"""Load the shipped model artifact and its card; score display-ready images in batches.

An artifact is ``<name>.pt`` (``{"architecture", "input_size", "state_dict"}``, optionally
``"ood"``: the out-of-distribution statistics of :mod:`.ood`) with its model card ``<name>.json``
beside it.  The card's ``weights_sha256`` must match the file: a model that
is not the one described is refused rather than silently used.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .architecture import build_model
from .ood import AnyOodStats, forward_pooled, stats_from_blob
from .preprocess import preprocess


class ModelError(Exception):
    """The artifact or its card is missing, corrupt or inconsistent."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class LoadedModel:
    """A ready-to-run model with the card's calibration and operating point."""

    model_id: str
    architecture: str
    weights_sha256: str
    threshold: float
    temperature: float
    input_size: int
    device: torch.device
    module: torch.nn.Module
    card: dict = field(repr=False, default_factory=dict)
    #: Out-of-distribution statistics from the artifact (None: the artifact has none).
    ood: AnyOodStats | None = field(repr=False, default=None)
    #: Refuse images whose OOD score is above ``ood.threshold`` (setting ``ood_gate``).
    ood_gate: bool = True
    #: Refuse patients outside the card's intended-use age range (setting ``age_gate``).
    age_gate: bool = True
    #: Which operating point decides: ``model`` (the card's) or a site calibration's short id
    #: (set by ``pacsbridge.validation.calibration.apply_calibration``).
    calibration_id: str = "model"

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw logits for preprocessed inputs ``(N, 1, S, S)``."""
        x = batch.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return self.module(x).float().cpu()
        return self.module(x).float().cpu()

    def probabilities_from_inputs(self, batch: torch.Tensor) -> list[float]:
        """Calibrated probabilities (temperature applied) for preprocessed inputs."""
        z = self.logits(batch) / self.temperature
        return torch.sigmoid(z).tolist()

    @torch.inference_mode()
    def score_inputs(self, batch: torch.Tensor) -> tuple[list[float], list[float | None]]:
        """Calibrated probabilities and OOD scores (None without OOD statistics) from one forward pass."""
        if self.ood is None:
            return self.probabilities_from_inputs(batch), [None] * len(batch)
        x = batch.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                z, pooled = forward_pooled(self.module, x)
        else:
            z, pooled = forward_pooled(self.module, x)
        probs = torch.sigmoid(z.float().cpu() / self.temperature).tolist()
        scores = self.ood.score_pooled(self.module, [p.float().cpu() for p in pooled]).tolist()
        return probs, scores

    def is_out_of_distribution(self, score: float | None) -> bool:
        """True when the OOD gate is on and ``score`` is beyond the artifact's threshold (or not finite)."""
        if score is None or self.ood is None or not self.ood_gate:
            return False
        return not math.isfinite(score) or score > self.ood.threshold

    def predict_images(self, images: Sequence[np.ndarray]) -> list[float]:
        """Calibrated probabilities for display-ready 2-D images in [0, 1]."""
        if not images:
            return []
        batch = torch.stack([preprocess(im, self.input_size) for im in images])
        return self.probabilities_from_inputs(batch)

    def is_positive(self, probability: float) -> bool:
        return probability >= self.threshold


def load_model(path: str | Path, device: str = "auto", *, age_gate: bool = True, ood_gate: bool = True) -> LoadedModel:
    """Load ``path`` and its card; raises :class:`ModelError` with a readable reason.

    ``age_gate`` / ``ood_gate`` (the settings of the same name) say whether the intended-use
    gates apply; they only can where the card has an age range / the artifact OOD statistics.
    """
    path = Path(path)
    cpath = card_path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} not found")
    if not cpath.is_file():
        raise ModelError(f"model card {cpath} not found next to {path.name}")
    try:
        card = json.loads(cpath.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"model card {cpath} is not valid JSON: {exc}") from None
    digest = sha256_file(path)
    if card.get("weights_sha256") != digest:
        raise ModelError(f"{path.name}: SHA-256 {digest[:12]}... does not match the card's weights_sha256")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        module = build_model(blob["architecture"])
        module.load_state_dict(blob["state_dict"])
        ood = stats_from_blob(blob["ood"]) if blob.get("ood") is not None else None
    except Exception as exc:  # noqa: BLE001 - any load failure is a bad artifact
        raise ModelError(f"cannot load {path}: {exc}") from None
    temperature = float(card["temperature"])
    threshold = float(card["threshold"])
    if not (temperature > 0 and math.isfinite(temperature)) or not 0.0 <= threshold <= 1.0:
        raise ModelError(f"{cpath.name}: bad temperature {temperature} or threshold {threshold}")
    dev = resolve_device(device)
    module.to(dev).eval()
    return LoadedModel(
        model_id=str(card["model_id"]), architecture=blob["architecture"], weights_sha256=digest,
        threshold=threshold, temperature=temperature, input_size=int(blob.get("input_size", 192)),
        device=dev, module=module, card=card, ood=ood, ood_gate=bool(ood_gate), age_gate=bool(age_gate),
    )
