"""The whole pipeline on a grid of layer types x sizes (geotorch-style): apply, data_init,
5 Adam steps, then ||w|| = |g| per unit, a finite loss, fold keeps the eval outputs, deepcopy works."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import unit_rows, normalized_weights
from torch import nn

import wnorm
from wnorm import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d


class RNNHead(nn.Module):
    def __init__(self, rnn: nn.RNNBase, h: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(h * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def build(kind: str, h: int) -> tuple[nn.Module, tuple[int, ...]]:
    if kind == "linear":
        return nn.Sequential(nn.Linear(5, h), nn.ReLU(), nn.Linear(h, 3)), (16, 5)
    if kind == "linear+mobn":
        return nn.Sequential(nn.Linear(5, h), MeanOnlyBatchNorm1d(h), nn.ReLU(),
                             nn.Linear(h, 3)), (16, 5)
    if kind in ("conv1d", "conv2d", "conv3d"):
        nd = int(kind[-2])
        conv = getattr(nn, f"Conv{nd}d")
        side = {1: 8, 2: 5, 3: 3}[nd]
        return (nn.Sequential(conv(2, h, 3, padding=1), nn.ReLU(), conv(h, 3, 1)),
                (4, 2) + (side,) * nd)
    if kind == "conv2d+mobn":
        return (nn.Sequential(nn.Conv2d(2, h, 3), MeanOnlyBatchNorm2d(h), nn.ReLU(),
                              nn.Conv2d(h, 3, 1), MeanOnlyBatchNorm2d(3)), (4, 2, 5, 5))
    if kind in ("convT1d", "convT2d"):
        nd = int(kind[-2])
        conv_t = getattr(nn, f"ConvTranspose{nd}d")
        return (nn.Sequential(conv_t(2, h, 2, stride=2), nn.ReLU(), conv_t(h, 3, 3)),
                (4, 2) + (3,) * nd)
    if kind == "lstm":
        return RNNHead(nn.LSTM(3, h, batch_first=True), h), (4, 5, 3)
    if kind == "gru-bi":
        return RNNHead(nn.GRU(3, h, num_layers=2, bidirectional=True, batch_first=True), h), (4, 5, 3)
    if kind == "rnn":
        return RNNHead(nn.RNN(3, h, batch_first=True), h), (4, 5, 3)
    raise AssertionError(kind)


KINDS = ["linear", "linear+mobn", "conv1d", "conv2d", "conv3d", "conv2d+mobn", "convT1d",
         "convT2d", "lstm", "gru-bi", "rnn"]
SIZES = [4, 9]


@pytest.mark.parametrize("h", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_grid(kind, h):
    model, shape = build(kind, h)
    wnorm.apply(model)
    x = torch.randn(shape)
    target = torch.randn(model(x).shape)
    recurrent = any(isinstance(m, nn.RNNBase) for m in model.modules())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = wnorm.data_init(model, x)
    assert report.initialized  # every grid model has a layer the init applies to
    if recurrent:
        assert any("recurrent" in str(w.message) for w in caught)
        assert [r.name for r in report.skipped] == ["rnn"]
    else:
        assert not report.skipped and not caught

    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        loss = (model(x) - target).pow(2).mean()
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    assert torch.isfinite((model(x) - target).pow(2).mean())

    specs = list(normalized_weights(model))
    assert len(specs) >= 2
    for name, module, pname, dim in specs:
        w = getattr(module, pname).detach()
        g = getattr(module, pname + "_g").detach()
        torch.testing.assert_close(unit_rows(w, dim).norm(dim=1), g.reshape(-1).abs(),
                                   rtol=1e-5, atol=1e-7, msg=f"{name}.{pname}")

    model.eval()
    with torch.no_grad():
        before = model(x)
        clone = copy.deepcopy(model)
        torch.testing.assert_close(clone(x), before, rtol=0, atol=0)
        folded = wnorm.fold(model)
        assert not any("_wn" in m.__dict__ for m in folded.modules())
        torch.testing.assert_close(folded(x), before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clone(x), before, rtol=0, atol=0)  # the copy is unaffected
