"""Stress validation: how AUC, sensitivity and specificity at the shipped threshold move when the
validation images are changed the way another site's images differ (exposure, contrast, blur,
resolution, compression, collimation).

Validation AUC on this data saturates near 0.99 and says little about a new site; these shifts are
a cheap proxy for the distribution shift the held-out data brings.  They are not a substitute for
a real external test.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import metrics

Perturb = Callable[[torch.Tensor], torch.Tensor]


def _jpeg(x: torch.Tensor, quality: int = 25) -> torch.Tensor:
    out = []
    for im in x:
        buf = io.BytesIO()
        Image.fromarray((im.numpy() * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
        out.append(torch.from_numpy(np.asarray(Image.open(buf), dtype=np.float32) / 255.0))
    return torch.stack(out)


def _resample(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    y = F.interpolate(x.unsqueeze(1), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False).squeeze(1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.arange(-4, 5, dtype=torch.float32)
    w = torch.exp(-(k**2) / (2 * sigma**2))
    w = w / w.sum()
    y = F.conv2d(F.pad(x.unsqueeze(1), (4, 4, 0, 0), mode="replicate"), w.view(1, 1, 1, 9))
    return F.conv2d(F.pad(y, (0, 0, 4, 4), mode="replicate"), w.view(1, 1, 9, 1)).squeeze(1)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    out = []
    for im in x:
        v = im.flatten()
        ranks = torch.argsort(torch.argsort(v)).float() / (len(v) - 1)
        out.append(ranks.view_as(im))
    return torch.stack(out)


def _zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """factor > 1 crops in (tighter collimation); < 1 shrinks into a black border."""
    n = x.shape[0]
    theta = torch.tensor([[1 / factor, 0, 0], [0, 1 / factor, 0]], dtype=torch.float32).expand(n, 2, 3)
    grid = F.affine_grid(theta, (n, 1, *x.shape[-2:]), align_corners=False)
    return F.grid_sample(x.unsqueeze(1), grid, padding_mode="zeros", align_corners=False).squeeze(1)


PERTURBATIONS: dict[str, Perturb] = {
    "none": lambda x: x,
    "gamma 0.6": lambda x: x.clamp(1e-4, 1) ** 0.6,
    "gamma 1.6": lambda x: x.clamp(1e-4, 1) ** 1.6,
    "low contrast": lambda x: 0.3 + 0.4 * x,
    "blur s=1.5": lambda x: _blur(x, 1.5),
    "low res 96px": lambda x: _resample(x, 96),
    "jpeg q25": _jpeg,
    "hist. equalized": _equalize,
    "zoom in 1.15": lambda x: _zoom(x, 1.15),
    "zoom out 0.85": lambda x: _zoom(x, 0.85),
}


def stress_table(predict: Callable[[torch.Tensor], np.ndarray], images_u8: torch.Tensor, y: np.ndarray,
                 threshold: float) -> list[dict]:
    """``predict`` maps float images ``(N, H, W)`` in [0, 1] to calibrated probabilities."""
    base = images_u8.float() / 255.0
    rows = []
    for name, fn in PERTURBATIONS.items():
        prob = predict(fn(base).clamp(0, 1))
        c = metrics.confusion(y, prob, threshold)
        rows.append({"perturbation": name, "auc": metrics.roc_auc(y, prob),
                     "sensitivity": c["sensitivity"], "specificity": c["specificity"]})
    return rows
