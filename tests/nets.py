"""Small models several test files share (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


class Tagger(nn.Module):
    """A two-layer LSTM over a sequence, then a linear head per step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])
