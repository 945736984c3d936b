"""Out-of-distribution score from the model's own features (Mahalanobis, several layers, each member).

Why: the CNN scores anything it is given.  An adult chest, a hip or a hand gets a pneumonia
probability like any child's chest.  Images unlike the training data leave the network's internal
features in regions the training images never reached; the Mahalanobis distance of those features
from the training distribution measures how far (Lee et al., NeurIPS 2018: "A simple unified
framework for detecting out-of-distribution samples").

Method (``mahalanobis-multilayer-v1``):

* Features: the global-average-pooled output of each ResNet stage (``features[1]``, ``[3]``,
  ``[5]``, ``[7]``; 48/96/160/256 channels) of every ensemble member, from the same forward pass
  that gives the logit.
* One Gaussian per class (NORMAL, PNEUMONIA) per (member, stage), with a shared covariance shrunk
  towards a scaled identity (Ledoit-Wolf), all fitted on the training split only.
* Per (member, stage): the squared Mahalanobis distance to the nearer class mean, standardised
  by that stage's mean and standard deviation over the training images (so every stage counts
  alike).  The OOD score is the mean of these standardised distances over the stages and members
  used (``stages`` in the stats): 0 is typical of training images; larger is farther away.
* Threshold: a high percentile of the scores of the patient-grouped validation split (images the
  fit never saw), stored in the artifact with the statistics.

Nothing here reads headers: the score works on pixels alone, so it holds when Body Part, view or
age tags are missing or wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .architecture import Ensemble

METHOD = "mahalanobis-multilayer-v1"
#: Indices into ``SmallResNet.features`` whose outputs end a stage (two blocks per stage).
STAGE_ENDS = (1, 3, 5, 7)


def members_of(module: nn.Module) -> list[nn.Module]:
    return list(module.members) if isinstance(module, Ensemble) else [module]


def forward_with_features(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The module's logits ``(N,)`` and the pooled stage features ``[(N, C)]`` of every member,
    ordered member-major (member 0 stage 0, member 0 stage 1, ...).  Logits match ``module(x)``."""
    logits = []
    feats: list[torch.Tensor] = []
    for member in members_of(module):
        y = member.stem(x)
        for i, block in enumerate(member.features):
            y = block(y)
            if i in STAGE_ENDS:
                feats.append(y.mean(dim=(2, 3)).float())
        logits.append(member.head(y).squeeze(1))
    z = torch.stack(logits).mean(0) if isinstance(module, Ensemble) else logits[0]
    return z, feats


@dataclass
class OodStats:
    """Fitted statistics of one (member, stage) feature block, plus the combined threshold."""

    means: list[torch.Tensor]        # per block: (K, C) class means
    precisions: list[torch.Tensor]   # per block: (C, C) inverse shrunk covariance
    centre: torch.Tensor             # per block: mean of training min-distances (B,)
    scale: torch.Tensor              # per block: std of training min-distances (B,)
    use: list[int]                   # which blocks make up the score
    threshold: float                 # scores above it are refused
    method: str = METHOD

    def block_distances(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Standardised squared distances ``(N, B)`` of every block."""
        cols = []
        for b, f in enumerate(feats):
            f = f.double()
            mu = self.means[b].double()
            prec = self.precisions[b].double()
            diff = f[:, None, :] - mu[None, :, :]                       # (N, K, C)
            d2 = torch.einsum("nkc,cd,nkd->nk", diff, prec, diff).amin(dim=1)
            cols.append((d2 - float(self.centre[b])) / float(self.scale[b]))
        return torch.stack(cols, dim=1)

    def score(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """OOD score ``(N,)`` (float64): the mean standardised distance of the blocks in ``use``."""
        return self.block_distances(feats)[:, self.use].mean(dim=1)

    def to_blob(self) -> dict:
        return {
            "method": self.method, "means": [m.float() for m in self.means],
            "precisions": [p.float() for p in self.precisions], "centre": self.centre.double(),
            "scale": self.scale.double(), "use": list(self.use), "threshold": float(self.threshold),
        }

    @classmethod
    def from_blob(cls, blob: dict) -> "OodStats":
        if blob.get("method") != METHOD:
            raise ValueError(f"unknown OOD method {blob.get('method')!r} (this version knows {METHOD!r})")
        means, precs = list(blob["means"]), list(blob["precisions"])
        n = len(means)
        if n == 0 or len(precs) != n or len(blob["centre"]) != n or len(blob["scale"]) != n:
            raise ValueError("OOD statistics are inconsistent (block counts differ)")
        use = [int(u) for u in blob["use"]]
        if not use or not all(0 <= u < n for u in use):
            raise ValueError(f"OOD statistics: bad block selection {use}")
        return cls(means=means, precisions=precs, centre=torch.as_tensor(blob["centre"]),
                   scale=torch.as_tensor(blob["scale"]), use=use, threshold=float(blob["threshold"]))


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance of centred rows ``x`` (N, C), float64."""
    x = x.double()
    n, c = x.shape
    s = x.T @ x / n
    mu = torch.trace(s) / c
    delta = ((s - mu * torch.eye(c, dtype=s.dtype)) ** 2).sum() / c
    x2 = x**2
    beta = ((x2.T @ x2) / n - s**2).sum() / (c * n)
    shrink = float(torch.clamp(beta / delta.clamp_min(1e-30), 0.0, 1.0)) if float(delta) > 0 else 1.0
    return (1 - shrink) * s + shrink * mu * torch.eye(c, dtype=s.dtype)


def fit_blocks(feats: list[torch.Tensor], labels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Class means and shared shrunk precision of every block (training features only)."""
    means, precs = [], []
    y = labels.long()
    classes = sorted(set(y.tolist()))
    for f in feats:
        f = f.double()
        mu = torch.stack([f[y == k].mean(0) for k in classes])
        centred = f - mu[torch.searchsorted(torch.tensor(classes), y)]
        cov = ledoit_wolf(centred)
        precs.append(torch.linalg.inv(cov))
        means.append(mu)
    return means, precs
