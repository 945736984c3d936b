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

Method (``outlier-exposure-v2``, the default since model v4): the v1 score alone left about
half of real adult chest radiographs in scope (they are chests too, so their features are not
far from the children's in every direction).  Outlier exposure (Hendrycks et al., ICLR 2019:
"Deep anomaly detection with outlier exposure") fits the direction in feature space that
separates them:

* Features: mean- and standard-deviation-pooled outputs of the stem and of every ResNet block of
  every member (2 x 9 taps per member), standardised by their training-split mean and std.
* A logistic regression (L2 penalty, classes weighted equally) on those features: in = the
  pediatric training split, out = the *fit* part of the shared adult set.  Its logit,
  standardised by its training-split mean and std, is the first component.
* The v1 Mahalanobis score, standardised the same way and lowered by ``maha_offset``, is the
  second: it catches images far from every training image (noise, other modalities) in
  directions a linear head never saw.  The score is the larger of the two.
* Threshold: a percentile of the pediatric validation split's scores, never above ``ceiling``
  (the loosest cut that still refuses 90 % of the adult *tuning* part); a site calibration may
  lower the cut but not raise it above the ceiling.

Nothing here reads headers: the score works on pixels alone, so it holds when Body Part, view or
age tags are missing or wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .architecture import Ensemble

METHOD_V1 = "mahalanobis-multilayer-v1"
METHOD = "outlier-exposure-v2"
#: Indices into ``SmallResNet.features`` whose outputs end a stage (two blocks per stage).
STAGE_ENDS = (1, 3, 5, 7)
#: Taps of :func:`forward_pooled`: 0 = stem, 1 + i = ``features[i]``; each gives mean then std.
N_TAPS = 9


def members_of(module: nn.Module) -> list[nn.Module]:
    return list(module.members) if isinstance(module, Ensemble) else [module]


def forward_pooled(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The module's logits ``(N,)`` and, per member, the pooled features ``(N, D)`` of every tap:
    ``[stem mean, stem std, features[0] mean, features[0] std, ...]``.  Logits match ``module(x)``."""
    logits = []
    pooled: list[torch.Tensor] = []
    for member in members_of(module):
        y = member.stem(x)
        cols = [y.mean(dim=(2, 3)), y.std(dim=(2, 3))]
        for block in member.features:
            y = block(y)
            cols += [y.mean(dim=(2, 3)), y.std(dim=(2, 3))]
        pooled.append(torch.cat(cols, dim=1).float())
        logits.append(member.head(y).squeeze(1))
    z = torch.stack(logits).mean(0) if isinstance(module, Ensemble) else logits[0]
    return z, pooled


def stage_features(module: nn.Module, pooled: list[torch.Tensor]) -> list[torch.Tensor]:
    """The v1 features (mean-pooled stage ends, member-major) cut out of :func:`forward_pooled`'s."""
    feats = []
    for member, p in zip(members_of(module), pooled):
        widths = [member.stem[0].out_channels] + [b.conv2.out_channels for b in member.features]
        starts = [0]
        for w in widths:
            starts.append(starts[-1] + 2 * w)
        for i in STAGE_ENDS:
            tap = i + 1
            feats.append(p[:, starts[tap] : starts[tap] + widths[tap]])
    return feats


def forward_with_features(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The module's logits ``(N,)`` and the pooled stage features ``[(N, C)]`` of every member,
    ordered member-major (member 0 stage 0, member 0 stage 1, ...).  Logits match ``module(x)``."""
    z, pooled = forward_pooled(module, x)
    return z, stage_features(module, pooled)


@dataclass
class OodStats:
    """Fitted statistics of one (member, stage) feature block, plus the combined threshold."""

    means: list[torch.Tensor]        # per block: (K, C) class means
    precisions: list[torch.Tensor]   # per block: (C, C) inverse shrunk covariance
    centre: torch.Tensor             # per block: mean of training min-distances (B,)
    scale: torch.Tensor              # per block: std of training min-distances (B,)
    use: list[int]                   # which blocks make up the score
    threshold: float                 # scores above it are refused
    method: str = METHOD_V1
    #: v1 artifacts were not fitted against outliers: no ceiling.
    ceiling: float | None = None

    def score_pooled(self, module: nn.Module, pooled: list[torch.Tensor]) -> torch.Tensor:
        """OOD score ``(N,)`` from :func:`forward_pooled`'s features."""
        return self.score(stage_features(module, pooled))

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
        if blob.get("method") != METHOD_V1:
            raise ValueError(f"unknown OOD method {blob.get('method')!r} (expected {METHOD_V1!r})")
        means, precs = list(blob["means"]), list(blob["precisions"])
        n = len(means)
        if n == 0 or len(precs) != n or len(blob["centre"]) != n or len(blob["scale"]) != n:
            raise ValueError("OOD statistics are inconsistent (block counts differ)")
        use = [int(u) for u in blob["use"]]
        if not use or not all(0 <= u < n for u in use):
            raise ValueError(f"OOD statistics: bad block selection {use}")
        return cls(means=means, precisions=precs, centre=torch.as_tensor(blob["centre"]),
                   scale=torch.as_tensor(blob["scale"]), use=use, threshold=float(blob["threshold"]))


@dataclass
class OutlierExposureStats:
    """``outlier-exposure-v2``: the larger of a logistic in-vs-adult score and the v1 Mahalanobis
    score (both standardised on the training split; the latter lowered by ``maha_offset``)."""

    maha: OodStats                   # the v1 component (its own threshold is not used)
    feat_mean: torch.Tensor          # (D,) training mean of the pooled features of all members
    feat_std: torch.Tensor           # (D,) training std of those features
    weight: torch.Tensor             # (D,) logistic weights on the standardised features
    bias: float
    logit_centre: float              # training mean / std of the logit
    logit_scale: float
    maha_centre: float               # training mean / std of the v1 score
    maha_scale: float
    maha_offset: float               # the v1 component counts only this far beyond its training spread
    threshold: float                 # scores above it are refused
    ceiling: float | None = None     # the loosest cut that still refuses 90 % of the adult tuning part
    method: str = METHOD

    @property
    def use(self) -> list[int]:
        return self.maha.use

    def components(self, module: nn.Module, pooled: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The standardised logistic and (offset) Mahalanobis components ``(N,)`` each, float64."""
        x = torch.cat([p.double() for p in pooled], dim=1)
        if x.shape[1] != self.weight.numel():
            raise ValueError(f"OOD statistics expect {self.weight.numel()} features, the model gives {x.shape[1]}")
        z = ((x - self.feat_mean.double()) / self.feat_std.double()) @ self.weight.double() + self.bias
        lr = (z - self.logit_centre) / self.logit_scale
        m = (self.maha.score_pooled(module, pooled) - self.maha_centre) / self.maha_scale - self.maha_offset
        return lr, m

    def score_pooled(self, module: nn.Module, pooled: list[torch.Tensor]) -> torch.Tensor:
        """OOD score ``(N,)`` (float64); larger is farther from the intended population."""
        lr, m = self.components(module, pooled)
        return torch.maximum(lr, m)

    def to_blob(self) -> dict:
        return {
            "method": self.method, "maha": self.maha.to_blob(),
            "feat_mean": self.feat_mean.float(), "feat_std": self.feat_std.float(), "weight": self.weight.float(),
            "bias": float(self.bias), "logit_centre": float(self.logit_centre), "logit_scale": float(self.logit_scale),
            "maha_centre": float(self.maha_centre), "maha_scale": float(self.maha_scale),
            "maha_offset": float(self.maha_offset), "threshold": float(self.threshold),
            "ceiling": None if self.ceiling is None else float(self.ceiling),
        }

    @classmethod
    def from_blob(cls, blob: dict) -> "OutlierExposureStats":
        if blob.get("method") != METHOD:
            raise ValueError(f"unknown OOD method {blob.get('method')!r} (expected {METHOD!r})")
        maha = OodStats.from_blob(blob["maha"])
        mean, std, w = (torch.as_tensor(blob[k]).flatten() for k in ("feat_mean", "feat_std", "weight"))
        if not (mean.numel() == std.numel() == w.numel() > 0):
            raise ValueError("OOD statistics are inconsistent (feature counts differ)")
        if not bool((std > 0).all()):
            raise ValueError("OOD statistics: feature scales must be positive")
        scalars = {k: float(blob[k]) for k in ("bias", "logit_centre", "logit_scale", "maha_centre", "maha_scale",
                                               "maha_offset", "threshold")}
        ceiling = None if blob.get("ceiling") is None else float(blob["ceiling"])
        if not all(math.isfinite(v) for v in scalars.values()) or scalars["logit_scale"] <= 0 or scalars["maha_scale"] <= 0:
            raise ValueError("OOD statistics: bad scalar values")
        if ceiling is not None and not scalars["threshold"] <= ceiling:
            raise ValueError(f"OOD threshold {scalars['threshold']} is above its ceiling {ceiling}")
        return cls(maha=maha, feat_mean=mean, feat_std=std, weight=w, ceiling=ceiling, **scalars)


#: What an artifact's ``ood`` blob may hold.
AnyOodStats = OodStats | OutlierExposureStats


def stats_from_blob(blob: dict) -> AnyOodStats:
    """The statistics of whichever known method the artifact's ``ood`` blob names."""
    method = blob.get("method")
    if method == METHOD:
        return OutlierExposureStats.from_blob(blob)
    if method == METHOD_V1:
        return OodStats.from_blob(blob)
    raise ValueError(f"unknown OOD method {method!r} (this version knows {METHOD!r}, {METHOD_V1!r})")


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
