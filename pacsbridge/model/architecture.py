"""CNN architectures the daemon knows how to build from an artifact's ``architecture`` name."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class _Block(nn.Module):
    """A ResNet basic block (two 3x3 convolutions with a shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.short(x))


class SmallResNet(nn.Module):
    """A compact ResNet for 1-channel radiographs, trainable from scratch on 2 CPU cores.

    Returns one logit per image (pneumonia vs. normal).
    """

    def __init__(self, widths: tuple[int, ...] = (24, 48, 96, 160, 256), dropout: float = 0.3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        layers = []
        cin = widths[0]
        for w in widths[1:]:
            layers += [_Block(cin, w, 2), _Block(w, w, 1)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.stem(x))).squeeze(1)


class Ensemble(nn.Module):
    """Averages the logits of several members (named ``ensemble:a+b+...``); steadier under site shift."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "small-resnet-v1": SmallResNet,
}


def build_model(name: str) -> nn.Module:
    """Build an untrained model by architecture name; raises ``KeyError`` for an unknown name."""
    if name.startswith("ensemble:"):
        return Ensemble([build_model(n) for n in name[len("ensemble:"):].split("+")])
    try:
        return ARCHITECTURES[name]()
    except KeyError:
        raise KeyError(f"unknown model architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None
