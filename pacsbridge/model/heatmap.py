"""Explain a score with a class-activation heatmap and draw it over the image.

Every method weighs a stage's feature maps of a member by the gradient of the pneumonia logit with
respect to them and keeps the positive part: Grad-CAM (Selvaraju et al., 2017: one weight per
channel, the mean gradient), HiResCAM (Draelos & Carin, 2020: gradient times activation at every
position), Grad-CAM++ (Chattopadhay et al., 2018: positive gradients weighted by higher-order terms)
and LayerCAM (Jiang et al., 2021: positive gradient times activation).  Stage ``s`` of the small
ResNet is 192 / 2**(s+1) pixels square (stage 4: 6x6, stage 3: 12x12).  The maps are upsampled to
the model input and then mapped back onto the display-ready image: the model squashes the whole
image to a square (no crop), so mapping back is a plain resize to the image's own shape.  For an
ensemble the members' maps are averaged.

A heatmap shows the regions that raised the score, not where disease is: not a segmentation, not
proof of disease, and it may light up the heart, the mediastinum or tubes.  Every overlay carries a
burned-in "not for diagnostic use" label.  ``python -m model_training heatmap-eval`` measures where
the mass falls (docs/heatmap.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..imaging.label import AI_RESULT_LABEL
from .architecture import Ensemble
from .artifact import LoadedModel
from .preprocess import preprocess

DEFAULT_LABEL = AI_RESULT_LABEL
#: Weighting rules ``method`` may name.
METHODS = ("gradcam", "hirescam", "gradcam++", "layercam")
#: How member maps are combined: raw sum, each scaled to peak 1 first, or one member alone.
COMBINES = ("mean", "norm", "m0", "m1")
#: The heatmap the daemon, ``predict --heatmaps`` and the image route draw (see docs/heatmap.md).
DEFAULT_SPEC = "gradcam@4"


@dataclass(frozen=True)
class CamSpec:
    """One heatmap recipe: weighting ``method`` at ResNet ``stage`` (1-4), members combined by ``combine``."""

    method: str = "gradcam"
    stage: int = 4
    combine: str = "mean"

    @classmethod
    def parse(cls, text: str) -> CamSpec:
        """``method@stage[/combine]``, e.g. ``gradcam@4``, ``hirescam@3/norm``, ``layercam@2/m0``."""
        head, _, combine = text.strip().partition("/")
        method, _, stage = head.partition("@")
        spec = cls(method.lower(), int(stage) if stage.isdigit() else -1, combine.lower() or "mean")
        if spec.method not in METHODS or spec.stage not in (1, 2, 3, 4) or spec.combine not in COMBINES:
            raise ValueError(f"bad heatmap method {text!r}: expected METHOD@STAGE[/COMBINE] with METHOD "
                             f"one of {', '.join(METHODS)}, STAGE 1-4, COMBINE one of {', '.join(COMBINES)}")
        return spec

    def __str__(self) -> str:
        return f"{self.method}@{self.stage}" + ("" if self.combine == "mean" else f"/{self.combine}")


def _members(module: torch.nn.Module) -> list[torch.nn.Module]:
    return list(module.members) if isinstance(module, Ensemble) else [module]


def _taps(member: torch.nn.Module, x: torch.Tensor, stages: set[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Activations and logit gradients ``(C, h, w)`` at the end of each stage in ``stages``, one backward pass."""
    feats = member.stem(x)
    taps: dict[int, torch.Tensor] = {}
    for i, block in enumerate(member.features):
        feats = block(feats)
        if i % 2 == 1 and (i // 2 + 1) in stages:  # two blocks per stage
            taps[i // 2 + 1] = feats
    logit = member.head(feats).squeeze()
    grads = torch.autograd.grad(logit, list(taps.values()))
    return {s: (a[0].detach(), g[0].detach()) for (s, a), g in zip(taps.items(), grads)}


def _weigh(method: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The unnormalised map ``(h, w)`` of one weighting rule for activations ``a`` and gradients ``g``."""
    if method == "gradcam":
        cam = (g.mean(dim=(1, 2), keepdim=True) * a).sum(0)
    elif method == "hirescam":
        cam = (g * a).sum(0)
    elif method == "layercam":
        cam = (torch.relu(g) * a).sum(0)
    else:  # gradcam++, with the usual closed form for an exponentiated score
        g2, g3 = g.pow(2), g.pow(3)
        denom = 2 * g2 + a.sum(dim=(1, 2), keepdim=True) * g3
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
        cam = ((alpha * torch.relu(g)).sum(dim=(1, 2), keepdim=True) * a).sum(0)
    return torch.relu(cam)


def _peak_scaled(cam: torch.Tensor) -> torch.Tensor:
    peak = float(cam.max())
    return cam / peak if np.isfinite(peak) and peak > 0 else torch.zeros_like(cam)


def input_maps(model: LoadedModel, x: torch.Tensor, specs: list[CamSpec]) -> dict[CamSpec, torch.Tensor]:
    """Unnormalised maps ``(S, S)`` on the model input ``x`` ``(1, 1, S, S)`` for every spec, on the CPU.

    One backward pass per member serves every spec.  The model stays in eval mode.
    """
    size = x.shape[-2:]
    stages = {s.stage for s in specs}
    module = model.module
    members = _members(module)
    per_member: list[dict[tuple[str, int], torch.Tensor]] = []
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for member in members:
                taps = _taps(member, x.detach().clone().requires_grad_(True), stages)
                maps = {}
                for method, stage in {(s.method, s.stage) for s in specs}:
                    cam = _weigh(method, *taps[stage])
                    up = F.interpolate(cam[None, None].float(), size=size, mode="bilinear", align_corners=False)
                    maps[(method, stage)] = up[0, 0].cpu()
                per_member.append(maps)
    finally:
        module.train(was_training)
    out: dict[CamSpec, torch.Tensor] = {}
    for s in specs:
        key = (s.method, s.stage)
        if s.combine in ("m0", "m1"):
            out[s] = per_member[min(int(s.combine[1]), len(per_member) - 1)][key]
        elif s.combine == "norm":
            out[s] = torch.stack([_peak_scaled(m[key]) for m in per_member]).sum(0)
        else:
            out[s] = torch.stack([m[key] for m in per_member]).sum(0)
    return out


def class_activation_map(model: LoadedModel, image2d: np.ndarray, spec: CamSpec | str = DEFAULT_SPEC) -> np.ndarray:
    """The heatmap ``spec`` of the pneumonia logit for a display-ready 2-D image in [0, 1].

    Returns float32 in [0, 1] with ``image2d``'s shape (all zeros when nothing pushes the score
    up).  Works on whatever device the model lives on; the model stays in eval mode.
    """
    spec = CamSpec.parse(spec) if isinstance(spec, str) else spec
    image2d = np.asarray(image2d, dtype=np.float32)
    if image2d.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image2d.shape}")
    x = preprocess(image2d, model.input_size).unsqueeze(0).to(model.device)
    total = input_maps(model, x, [spec])[spec]
    # Back onto the image: the model input is the whole image squashed, so resize to its shape.
    heat = F.interpolate(total[None, None], size=image2d.shape, mode="bilinear", align_corners=False)[0, 0]
    return _peak_scaled(heat).clamp_(0.0, 1.0).numpy().astype(np.float32)


def grad_cam(model: LoadedModel, image2d: np.ndarray) -> np.ndarray:
    """The default heatmap (:data:`DEFAULT_SPEC`) of the pneumonia logit; see :func:`class_activation_map`.

    The name is kept for the daemon, ``predict --heatmaps`` and the image route.
    """
    return class_activation_map(model, image2d, DEFAULT_SPEC)


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
