"""The one preprocessing function shared by training and inference.

Input: a display-ready 2-D float image in [0, 1] (bright = dense, as a viewer shows it).
Output: the model's input tensor.  The training images were squashed to 224x224 without
keeping the aspect ratio, so inference squashes too.  Intensities are standardized per image
(zero mean, unit variance) so that the model does not depend on a scanner's grey levels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Side of the square the model sees.
INPUT_SIZE = 192
#: Clip standardized values to this many standard deviations (tames burnt-in text, markers).
CLIP_SIGMA = 4.0


def preprocess_batch(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Turn a batch of display-ready images ``(N, H, W)`` in [0, 1] into ``(N, 1, size, size)``.

    Every image in the batch must already share one ``H, W`` (training batches do; at inference
    each image goes through on its own via :func:`preprocess`).
    """
    if images.ndim != 3:
        raise ValueError(f"expected (N, H, W) images, got shape {tuple(images.shape)}")
    x = images.to(torch.float32).clamp_(0.0, 1.0).unsqueeze(1)
    if x.shape[-2:] != (size, size):
        # Squash (aspect not kept) with antialiasing, as the training JPEGs were resized.
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    return ((x - mean) / std).clamp_(-CLIP_SIGMA, CLIP_SIGMA)


def preprocess(image: np.ndarray | torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Turn one display-ready 2-D image in [0, 1] into the model input ``(1, size, size)``."""
    t = torch.as_tensor(np.asarray(image, dtype=np.float32)) if not isinstance(image, torch.Tensor) else image
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {tuple(t.shape)}")
    if t.shape[0] < 8 or t.shape[1] < 8:
        raise ValueError(f"image too small: {tuple(t.shape)}")
    return preprocess_batch(t.unsqueeze(0), size)[0]
