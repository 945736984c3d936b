"""Batched augmentation of display-ready images the way radiographs really vary.

Geometry: small rotation, shift, (anisotropic) scale, as positioning and the squash to a square
vary.  Intensity: gamma, contrast, brightness, blur and noise, as exposure, detector and
post-processing vary between sites.  No left-right flip: the heart sits on the left and
mirrored chests never reach a reader, so a flip teaches the model images that do not exist.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, gen: torch.Generator, frame: float = 0.0) -> torch.Tensor:
    """Augment a float batch ``(N, H, W)`` in [0, 1]; returns a new tensor of the same shape.

    ``frame`` is the share of images shrunk into a black border or cut by black collimation
    strips: other sites frame the chest wider and collimate visibly, and the stress run showed
    a model that never saw a black frame falls apart on one ("zoom out 0.85").
    """
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    angle = u(-10, 10) * math.pi / 180
    sx, sy = u(0.88, 1.12), u(0.88, 1.12)
    tx, ty = u(-0.08, 0.08), u(-0.08, 0.08)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos / sx, -sin / sx, tx], 1), torch.stack([sin / sy, cos / sy, ty], 1)], 1
    )
    grid = F.affine_grid(theta, (n, 1, *x.shape[1:]), align_corners=False)
    y = F.grid_sample(x.unsqueeze(1), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if frame > 0:
        y = _frame(y, gen, frame)

    # Exposure and processing: gamma, contrast about mid-grey, brightness.
    gamma = torch.exp(u(-0.45, 0.45)).view(n, 1, 1, 1)
    y = y.clamp(1e-4, 1.0) ** gamma
    contrast = u(0.7, 1.35).view(n, 1, 1, 1)
    bright = u(-0.1, 0.1).view(n, 1, 1, 1)
    y = (y - 0.5) * contrast + 0.5 + bright

    # Blur a third of the images (different detector MTF / downsampling).
    blur = torch.rand(n, generator=gen) < 0.3
    if blur.any():
        sigma = float(u(0.5, 1.5)[0])
        k = torch.arange(-3, 4, dtype=torch.float32)
        w = torch.exp(-(k**2) / (2 * sigma**2))
        w = (w / w.sum()).to(y.dtype)
        yb = y[blur]
        yb = F.conv2d(F.pad(yb, (3, 3, 0, 0), mode="replicate"), w.view(1, 1, 1, 7))
        yb = F.conv2d(F.pad(yb, (0, 0, 3, 3), mode="replicate"), w.view(1, 1, 7, 1))
        y[blur] = yb

    # Quantum / electronic noise on half of them.
    noisy = (torch.rand(n, generator=gen) < 0.5).float().view(n, 1, 1, 1)
    sigma_n = u(0.0, 0.04).view(n, 1, 1, 1)
    y = y + noisy * sigma_n * torch.randn(y.shape, generator=gen)
    return y.clamp(0.0, 1.0).squeeze(1)


def _frame(y: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    """Shrink a share ``p`` of ``(N, 1, H, W)`` into a black border (scale 0.7-0.95, off-centre), and
    black out random edge strips (collimation) on another share ``p``."""
    n, _, h, w = y.shape
    shrink = torch.rand(n, generator=gen) < p
    if shrink.any():
        k = int(shrink.sum())
        s = torch.rand(k, generator=gen) * 0.25 + 0.7
        off = (torch.rand(k, 2, generator=gen) * 2 - 1) * (1 - s).unsqueeze(1)  # stay inside the field
        zero = torch.zeros(k)
        theta = torch.stack([torch.stack([1 / s, zero, -off[:, 0] / s], 1),
                             torch.stack([zero, 1 / s, -off[:, 1] / s], 1)], 1)
        grid = F.affine_grid(theta, (k, 1, h, w), align_corners=False)
        y = y.clone()
        y[shrink] = F.grid_sample(y[shrink], grid, padding_mode="zeros", align_corners=False)
    strips = torch.rand(n, generator=gen) < p
    for i in torch.nonzero(strips).flatten().tolist():
        t, b, left, r = (torch.rand(4, generator=gen) * 0.12 * torch.tensor([h, h, w, w])).long().tolist()
        y[i, :, :t] = 0
        y[i, :, h - b:] = 0
        y[i, :, :, :left] = 0
        y[i, :, :, w - r:] = 0
    return y
