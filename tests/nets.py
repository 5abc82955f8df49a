"""Small models several test files share (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn

import wnorm


def mean_only_convnet(width: int = 8, classes: int = 5, *, second_bn: bool = False
                      ) -> nn.Sequential:
    """Plain layers on 3-channel images: conv -> mean-only BN -> LeakyReLU -> conv (-> mean-only
    BN with ``second_bn``) -> LeakyReLU -> global average pool -> linear."""
    layers = [
        nn.Conv2d(3, width, 3, padding=1, bias=False),  # the mean-only BN's bias takes its place
        wnorm.MeanOnlyBatchNorm2d(width),
        nn.LeakyReLU(0.1),
        nn.Conv2d(width, width, 3),
    ]
    if second_bn:
        layers.append(wnorm.MeanOnlyBatchNorm2d(width))
    layers += [nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]
    return nn.Sequential(*layers)


class Tagger(nn.Module):
    """A two-layer LSTM over a sequence, then a linear head per step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


class ThreeWays(nn.Module):
    """An Embedding with a padding row (all zeros), a ConvTranspose and a Linear: three layers
    wnorm.apply treats three ways (plain, dim 1, dim 0) whose weights a state dict cannot tell
    apart by name or shape."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, padding_idx=0)
        self.up = nn.ConvTranspose1d(4, 3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(self.emb(x).transpose(1, 2)).transpose(1, 2))


THREE_WAYS_AXES = {"up.weight": 1, "out.weight": 0}  # what wnorm.apply(ThreeWays()) normalizes
