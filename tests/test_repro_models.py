"""wnorm.repro.models: the section-5 network in every variant, for 1- and 3-channel inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wnorm
from wnorm import WnormError
from wnorm.repro.models import VARIANTS, GaussianNoise, PaperNet, build, initialize

WIDTH = 0.05  # 5 / 10 channels


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_logits_shape_every_variant(variant: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    net = build(variant, channels, WIDTH)
    x = torch.randn(8, channels, size, size)
    initialize(net, x)
    assert net.train()(x).shape == (8, 10)
    out = net.eval()(x)
    assert out.shape == (8, 10) and bool(torch.isfinite(out).all())


def test_layers_follow_the_paper() -> None:
    net = PaperNet("normal", in_channels=3, width=1.0)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96] * 3 + [192] * 6
    assert [c.kernel_size for c in convs] == [(3, 3)] * 7 + [(1, 1)] * 2
    assert [c.padding for c in convs] == [(1, 1)] * 6 + [(0, 0)] * 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in net) == 2
    assert [m.p for m in net if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert {m.negative_slope for m in net if isinstance(m, nn.LeakyReLU)} == {0.1}
    assert isinstance(net[0], GaussianNoise) and net[0].sigma == 0.15
    assert isinstance(net[-1], nn.Linear) and net[-1].out_features == 10


def test_normalizers_per_variant() -> None:
    def kinds(v: str) -> set[type]:
        return {type(m) for m in build(v, 1, WIDTH).modules()}

    assert wnorm.is_weight_normalized(build("weightnorm", 1, WIDTH)[1])
    assert not any(wnorm.is_weight_normalized(m) for m in build("normal", 1, WIDTH).modules())
    assert {nn.BatchNorm2d, nn.BatchNorm1d} <= kinds("batchnorm")
    wn_mo = build("wn+meanonly", 1, WIDTH)
    assert wnorm.MeanOnlyBatchNorm2d in {type(m) for m in wn_mo.modules()}
    assert all(wnorm.is_weight_normalized(m) for m in wn_mo.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert wnorm.MeanOnlyBatchNorm1d in kinds("meanonly")
    # 9 convs + the dense layer, each followed by its normalizer
    assert sum(isinstance(m, nn.BatchNorm2d) for m in build("batchnorm", 1, WIDTH).modules()) == 9


@pytest.mark.parametrize("variant", ["normal", "weightnorm", "wn+meanonly", "meanonly"])
def test_data_init_standardizes_the_first_layer(variant: str) -> None:
    """After the init the first conv's pre-activations have mean 0, std 1 on the init batch
    (the noise layer is on during the init pass, so we compare on the noisy batch it saw)."""
    torch.manual_seed(0)
    net = build(variant, 3, WIDTH)
    x = torch.randn(64, 3, 32, 32)
    torch.manual_seed(1)
    initialize(net, x)
    torch.manual_seed(1)
    with torch.no_grad():
        y = net[1](net[0].train()(x))
        if variant in ("wn+meanonly", "meanonly"):
            y = y - y.mean(dim=(0, 2, 3), keepdim=True)
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(y.shape[1]),
                               atol=1e-4, rtol=0)


def test_batchnorm_gets_no_data_init() -> None:
    net = build("batchnorm", 1, WIDTH)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert "no data-dependent init" in initialize(net, torch.randn(16, 1, 28, 28))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_bad_variant_and_width() -> None:
    with pytest.raises(WnormError, match="unknown variant 'wn'"):
        build("wn", 1, 1.0)
    with pytest.raises(WnormError, match="width must be positive"):
        build("normal", 1, 0.0)
