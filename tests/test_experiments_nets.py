"""experiments.nets: the section-5 network in every variant, for 1- and 3-channel inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wnorm
from wnorm import WnormError
from experiments.nets import (
    MLP,
    MLP_VARIANTS,
    VARIANTS,
    GaussianNoise,
    PaperNet,
    build,
    initialize,
    reparameterized_layers,
)

WIDTH = 0.05  # 5 / 10 channels


@pytest.mark.filterwarnings("ignore:.*of forced_weight_norm is trained")  # no optimizer here
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


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.detach().flatten(1)


def test_relatives_reparameterize_every_layer_their_way() -> None:
    """Each relative's computed weights have its defining property on every conv and dense
    layer: centered rows have mean 0 and norm g; balanced rows sum to 0 with L1 norm g; forced
    v rows have norm sqrt(fan-in); standardized rows mean 0, std 1 (convs only, the dense layer
    stays plain)."""
    for variant in ("centered", "forced", "balanced", "arpit"):
        net = build(variant, 1, WIDTH)
        layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert len(reparameterized_layers(net)) == len(layers) == 10  # 9 convs + dense
        assert not any(isinstance(m, nn.GroupNorm) for m in net.modules())
        for m in layers:
            w, g = _rows(m.weight), m.weight_g.detach().flatten()
            norm = w.abs().sum(1) if variant == "balanced" else w.norm(dim=1)
            torch.testing.assert_close(norm, g, rtol=1e-5, atol=1e-6)
            if variant in ("centered", "balanced"):
                assert w.mean(1).abs().max() < 1e-6
    net = build("forced", 1, WIDTH).train()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    wnorm.project_after_step(opt, net)  # forced WN: its map plus this projection
    net(torch.randn(2, 1, 28, 28)).square().sum().backward()
    opt.step()  # v left its sphere, and was put back on it
    for m in (m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
        v = _rows(m.weight_v)
        torch.testing.assert_close(v.norm(dim=1), torch.full((v.shape[0],), v.shape[1] ** 0.5))
    ws = build("ws+gn", 1, 1.0)
    convs = [m for m in ws if isinstance(m, nn.Conv2d)]
    gns = [m for m in ws if isinstance(m, nn.GroupNorm)]
    assert set(reparameterized_layers(ws)) == {str(i) for i, m in enumerate(ws)
                                               if isinstance(m, nn.Conv2d)}
    for c in convs:
        w = _rows(c.weight)
        assert w.mean(1).abs().max() < 1e-6
        torch.testing.assert_close(w.std(1, unbiased=False), torch.ones(w.shape[0]))
    assert [g.num_channels for g in gns] == [c.out_channels for c in convs]
    assert {g.num_groups for g in gns} == {32}  # Qiao et al.'s 32 groups at full width
    assert all(c.bias is None for c in convs) and ws[-1].bias is not None  # plain dense layer
    assert not wnorm.is_weight_normalized(ws[-1])
    assert {g.num_groups for g in build("ws+gn", 1, 0.125).modules()
            if isinstance(g, nn.GroupNorm)} == {4, 8}  # gcd(12, 32), gcd(24, 32)


def test_arpit_gets_orthogonal_v_and_its_gains_without_data() -> None:
    torch.manual_seed(0)
    net = build("arpit", 1, WIDTH)
    msg = initialize(net, torch.full((4, 1, 28, 28), float("nan")))  # the data is not looked at
    assert "without data" in msg
    dense = net[-1]
    v = dense.weight_v
    torch.testing.assert_close(v @ v.T, torch.eye(10), atol=1e-5, rtol=0)  # 10 rows, 10 inputs
    torch.testing.assert_close(dense.weight_g.flatten(), torch.full((10,), 1.0))  # sqrt(10/10)
    conv = net[3]  # 5 -> 5 channels, 3x3: fan_in 45, fan_out 5 x 9 = 45
    torch.testing.assert_close(conv.weight_g.flatten(), torch.full((5,), (2 * 45 / 45) ** 0.5))
    assert all(float(m.bias.detach().abs().max()) == 0 for m in net.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))


@pytest.mark.filterwarnings("ignore:.*of forced_weight_norm is trained")  # no optimizer here
@pytest.mark.parametrize("variant", MLP_VARIANTS)
def test_mlp_variants(variant: str) -> None:
    torch.manual_seed(0)
    net = MLP(variant, 784, hidden=16, depth=2)
    x = torch.randn(64, 1, 28, 28)
    initialize(net, x)
    out = net(x)
    assert out.shape == (64, 10) and bool(torch.isfinite(out).all())
    assert len(reparameterized_layers(net)) == (0 if variant == "normal" else 3)
    if variant != "arpit":  # data init: the first layer's pre-activations are standardized
        with torch.no_grad():
            y = net[1](net[0](x))
        torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(16), atol=1e-4, rtol=0)
    with pytest.raises(WnormError, match="unknown variant"):
        MLP("batchnorm", 784)


@pytest.mark.parametrize("variant", ["normal", "weightnorm", "wn+meanonly", "meanonly",
                                     "centered", "forced", "balanced"])
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


@pytest.mark.parametrize("variant", ["batchnorm", "ws+gn"])
def test_normalization_layer_variants_get_no_data_init(variant: str) -> None:
    net = build(variant, 1, WIDTH)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert "no data-dependent init" in initialize(net, torch.randn(16, 1, 28, 28))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_bad_variant_and_width() -> None:
    with pytest.raises(WnormError, match="unknown variant 'wn'"):
        build("wn", 1, 1.0)
    with pytest.raises(WnormError, match="width must be positive"):
        build("normal", 1, 0.0)
