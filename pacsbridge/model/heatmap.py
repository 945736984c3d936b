"""Explain a score with a class-activation heatmap (Grad-CAM) and draw it over the image.

Grad-CAM (Selvaraju et al., 2017): weight the last convolutional feature maps of a member by the
mean gradient of the pneumonia logit with respect to them, keep the positive part.  The maps are
coarse (6x6 for a 192 px input); they are upsampled to the model input and then mapped back onto
the display-ready image.  The model squashes the whole image to a square (no crop), so mapping
back is a plain resize to the image's own shape.  For an ensemble the members' maps are averaged.

A heatmap shows where the model looked, not where disease is: every overlay carries a burned-in
"not for diagnostic use" label.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..imaging.label import AI_RESULT_LABEL
from .architecture import Ensemble
from .artifact import LoadedModel
from .preprocess import preprocess

DEFAULT_LABEL = AI_RESULT_LABEL


def _members(module: torch.nn.Module) -> list[torch.nn.Module]:
    return list(module.members) if isinstance(module, Ensemble) else [module]


def _member_cam(member: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Grad-CAM ``(h, w)`` of one small-resnet member for input ``(1, 1, S, S)``."""
    feats = member.features(member.stem(x))
    feats.retain_grad()
    logit = member.head(feats).squeeze()
    (grad,) = torch.autograd.grad(logit, feats)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * feats).sum(dim=1))[0].detach()


def grad_cam(model: LoadedModel, image2d: np.ndarray) -> np.ndarray:
    """Grad-CAM of the pneumonia logit for a display-ready 2-D image in [0, 1].

    Returns float32 in [0, 1] with ``image2d``'s shape (all zeros when nothing pushes the score
    up).  Works on whatever device the model lives on; the model stays in eval mode.
    """
    image2d = np.asarray(image2d, dtype=np.float32)
    if image2d.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image2d.shape}")
    x = preprocess(image2d, model.input_size).unsqueeze(0).to(model.device)
    size = x.shape[-2:]
    total = torch.zeros(size, dtype=torch.float32)
    module = model.module
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for member in _members(module):
                cam = _member_cam(member, x.clone().requires_grad_(True))
                cam = F.interpolate(cam[None, None].float(), size=size, mode="bilinear", align_corners=False)
                total += cam[0, 0].cpu()
    finally:
        module.train(was_training)
    # Back onto the image: the model input is the whole image squashed, so resize to its shape.
    heat = F.interpolate(total[None, None], size=image2d.shape, mode="bilinear", align_corners=False)[0, 0]
    peak = float(heat.max())
    if not np.isfinite(peak) or peak <= 0:
        return np.zeros(image2d.shape, dtype=np.float32)
    return (heat / peak).clamp_(0.0, 1.0).numpy().astype(np.float32)


def _colormap(heat: np.ndarray) -> np.ndarray:
    """A blue -> cyan -> yellow -> red ramp (jet-like) for values in [0, 1]; returns float RGB."""
    stops = np.array([0.0, 0.35, 0.65, 1.0])
    colours = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return np.stack([np.interp(heat, stops, colours[:, c]) for c in range(3)], axis=-1)


def overlay_rgb(image2d: np.ndarray, heat: np.ndarray, label: str = DEFAULT_LABEL) -> np.ndarray:
    """The image in grey with ``heat`` blended in colour (opacity grows with heat) and ``label``
    burned into the top-left corner.  Returns ``uint8`` of shape ``(H, W, 3)``."""
    from PIL import Image

    from ..imaging.label import burn_in

    image2d = np.clip(np.asarray(image2d, dtype=np.float32), 0.0, 1.0)
    heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)), 0.0, 1.0)
    if image2d.ndim != 2 or heat.shape != image2d.shape:
        raise ValueError(f"image {image2d.shape} and heat {heat.shape} must be the same 2-D shape")
    grey = np.repeat(image2d[..., None], 3, axis=-1)
    alpha = (0.55 * heat)[..., None]  # cold areas keep the radiograph readable
    rgb = (1 - alpha) * grey + alpha * _colormap(heat)
    out = Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")
    if label:
        burn_in(out, label, size=max(10, min(image2d.shape) // 28), edge="top", full_width=False)
    return np.asarray(out, dtype=np.uint8).copy()
