"""Weight normalization's relatives: their invariants, and that they work wherever weight_norm does."""

from __future__ import annotations

import copy
import functools
import io
import math
import re

import pytest
import torch
from torch import nn

import wnorm
from wnorm._slot import slots_of
from wnorm.family import balanced_weight_norm
from wnorm.maps import BalancedWeightNorm, ForcedWeightNorm
from wnorm.sphere import project_after_step
from wnorm.weight_norm import default_dim
from wnorm import WnormError

METHODS = {
    "centered": wnorm.centered_weight_norm,
    "standardized": wnorm.weight_standardization,
    "forced": wnorm.forced_weight_norm,
    "forced-radius": functools.partial(wnorm.forced_weight_norm, radius=2.5),
    "balanced": balanced_weight_norm,
}
LAYERS = {
    "linear": lambda: nn.Linear(7, 5),
    "conv2d": lambda: nn.Conv2d(3, 4, 3),
    "convT1d": lambda: nn.ConvTranspose1d(3, 4, 5),
}


def _rows(layer: nn.Module) -> torch.Tensor:
    w = layer.weight
    return w.movedim(default_dim(layer), 0).flatten(1)


def _train(model: nn.Module, x: torch.Tensor, steps: int = 5, lr: float = 0.5) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if any(isinstance(s.map, ForcedWeightNorm) for s in slots_of(model).values()):
        project_after_step(opt, model)  # what makes forced WN forced: v back on its sphere
    norms = []
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        norms.append(_rows_v(model).norm(dim=1).detach().clone())
    return norms


def _rows_v(layer: nn.Module) -> torch.Tensor:
    return layer.weight_v.movedim(default_dim(layer), 0).flatten(1)


def _input(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(16, 7, dtype=torch.float64)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(4, 3, 6, 6, dtype=torch.float64)
    return torch.randn(4, 3, 9, dtype=torch.float64)


@pytest.mark.parametrize("layer", LAYERS)
def test_centered_rows_have_mean_zero_and_norm_g_after_training(layer):
    m = wnorm.centered_weight_norm(LAYERS[layer]().double())
    _train(m, _input(m))
    rows = _rows(m)
    g = m.weight_g.flatten()
    assert rows.mean(1).abs().max() < 1e-12
    torch.testing.assert_close(rows.norm(dim=1), g.abs(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", LAYERS)
def test_standardized_rows_have_mean_zero_and_std_one_after_training(layer):
    m = wnorm.weight_standardization(LAYERS[layer]().double())
    assert "weight_g" not in dict(m.named_parameters())
    _train(m, _input(m))
    rows = _rows(m)
    assert rows.mean(1).abs().max() < 1e-12
    torch.testing.assert_close(rows.std(1, unbiased=False), torch.ones(rows.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("layer", LAYERS)
def test_balanced_rows_sum_to_zero_with_l1_norm_g_after_training(layer):
    """Defazio & Bottou's balance: per unit, the positive weights sum to |g|/2 and the negative
    ones to -|g|/2, whatever training did to g and v."""
    m = balanced_weight_norm(LAYERS[layer]().double())
    _train(m, _input(m))
    rows = _rows(m)
    g = m.weight_g.flatten().abs()
    torch.testing.assert_close(rows.sum(1), torch.zeros_like(g), rtol=0, atol=1e-14)
    torch.testing.assert_close(rows.abs().sum(1), g, rtol=1e-12, atol=0)
    torch.testing.assert_close(rows.clamp(min=0).sum(1), g / 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(rows.clamp(max=0).sum(1), -g / 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_balanced_layer_maps_a_constant_input_to_its_bias(layer):
    """Positive and negative contributions cancel for inputs of a common value: the output's
    mean does not move with the weights (what batch norm's mean subtraction does, here without
    a batch)."""
    m = balanced_weight_norm(LAYERS[layer]().double())
    _train(m, _input(m))
    x = torch.full_like(_input(m), 3.7)
    b = m.bias.view(-1, *([1] * (x.dim() - 2)))
    torch.testing.assert_close(m(x), b.expand_as(m(x)), rtol=0, atol=1e-13)
    plain = LAYERS[layer]().double()  # a plain layer's output moves with the input's level
    assert not torch.allclose(plain(x), plain.bias.view_as(b).expand_as(plain(x)))


@pytest.mark.parametrize("dim", [0, 1, None])
def test_balanced_gradients_by_gradcheck(dim):
    torch.manual_seed(1)
    v = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    m = BalancedWeightNorm(dim)
    g = (m.split(v.detach())[0] * 1.3).requires_grad_(True)
    assert torch.autograd.gradcheck(m.weight, (g, v))
    lin = balanced_weight_norm(nn.Linear(5, 3).double())
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, g, v: torch.nn.functional.linear(x, BalancedWeightNorm(0).weight(g, v), lin.bias),
        (x, lin.weight_g, lin.weight_v))


def test_balanced_weight_is_the_formula_and_keeps_the_centered_function_at_the_start():
    torch.manual_seed(2)
    plain = nn.Linear(6, 4).double()
    m = balanced_weight_norm(copy.deepcopy(plain))
    w0 = plain.weight.detach()
    torch.testing.assert_close(m.weight, w0 - w0.mean(1, keepdim=True))  # g starts at the L1 norm
    with torch.no_grad():
        m.weight_g.mul_(torch.linspace(-2, 3, 4, dtype=torch.float64).view(4, 1))
        m.weight_v.add_(torch.randn_like(m.weight_v))
    c = m.weight_v - m.weight_v.mean(1, keepdim=True)
    torch.testing.assert_close(m.weight, m.weight_g * c / c.abs().sum(1, keepdim=True))


def test_balanced_in_bfloat16_is_computed_in_float32():
    m32 = balanced_weight_norm(nn.Linear(64, 8))
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    ref = BalancedWeightNorm(0).weight(m16.weight_g.float(), m16.weight_v.float())
    torch.testing.assert_close(m16.weight, ref.to(torch.bfloat16), rtol=0, atol=0)


def test_data_init_standardizes_balanced_layers():
    torch.manual_seed(0)
    net = wnorm.apply(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)),
                      method=balanced_weight_norm)
    x = torch.randn(300, 6) * 2 + 1
    report = wnorm.data_init(net, x, init_scale=0.5)
    assert {r.name: r.status for r in report} == {"0": "initialized", "2": "initialized"}
    with torch.no_grad():
        y = net(x)
        h = net[0](x)
    for out, units in ((h, 8), (y, 5)):
        torch.testing.assert_close(out.mean(0), torch.zeros(units), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.std(0, unbiased=False), torch.full((units,), 0.5),
                                   atol=1e-5, rtol=0)
    rows = net[2].weight
    torch.testing.assert_close(rows.sum(1), torch.zeros(5), atol=1e-6, rtol=0)  # still balanced


@pytest.mark.parametrize("layer", LAYERS)
def test_forced_keeps_norm_of_v_constant_across_steps(layer):
    m = wnorm.forced_weight_norm(LAYERS[layer]().double())
    size = _rows_v(m).shape[1]
    x = _input(m)
    norms = _train(m, x, steps=6, lr=2.0)
    # the projection put v back at sqrt(size) after every step; plain WN would grow it
    torch.testing.assert_close(_rows_v(m).norm(dim=1), torch.full_like(norms[0], math.sqrt(size)))
    plain = wnorm.weight_norm(LAYERS[layer]().double())
    grown = _train(plain, x, steps=6, lr=2.0)
    # the growth forced WN removes (Salimans & Kingma 2016, section 2.1)
    assert (grown[-1] > grown[0]).all()


@pytest.mark.parametrize("layer", LAYERS)
def test_forced_radius_holds_v_at_that_norm_and_starts_at_the_same_function(layer):
    plain = LAYERS[layer]().double()
    m = wnorm.forced_weight_norm(copy.deepcopy(plain), radius=0.75)
    x = _input(m)
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x))  # the function is unchanged at the start
    torch.testing.assert_close(_rows_v(m).norm(dim=1), torch.full((_rows_v(m).shape[0],), 0.75,
                                                                   dtype=torch.float64))
    _train(m, x, steps=4, lr=2.0)
    torch.testing.assert_close(_rows_v(m).norm(dim=1), torch.full((_rows_v(m).shape[0],), 0.75,
                                                                   dtype=torch.float64))


@pytest.mark.filterwarnings("ignore:.*of forced_weight_norm is trained:UserWarning")
def test_forced_radius_sets_how_far_an_adam_step_turns_the_weight():
    """Adam's first step has the same size whatever the gradient's scale, so on a sphere of
    twice the radius it turns each weight row by half the angle."""
    angles = {}
    for radius in (1.0, 2.0):
        torch.manual_seed(0)
        m = wnorm.forced_weight_norm(nn.Linear(64, 8).double(), radius=radius)
        x = torch.randn(32, 64, dtype=torch.float64)
        before = m.weight.detach().clone()
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        m(x).pow(2).mean().backward()
        opt.step()
        after = m.weight.detach()
        cos = (before * after).sum(1) / (before.norm(dim=1) * after.norm(dim=1))
        angles[radius] = torch.arccos(cos.clamp(-1, 1))
    ratio = angles[1.0] / angles[2.0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.0), rtol=0.02, atol=0.0)


def test_forced_with_fixed_gain_has_no_g_and_rows_of_norm_gain():
    m = wnorm.forced_weight_norm(nn.Linear(6, 3), gain=0.5)
    assert "weight_g" not in dict(m.named_parameters())
    torch.testing.assert_close(m.weight.norm(dim=1), torch.full((3,), 0.5))


@pytest.mark.filterwarnings("ignore:.*of forced_weight_norm is trained:UserWarning")
@pytest.mark.parametrize("method", METHODS)
def test_fold_deepcopy_pickle_and_checkpoint_keep_outputs(method):
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    wnorm.apply(net, method=METHODS[method])
    x = torch.randn(5, 3, 8, 8)
    _ = net(x).sum().backward()  # a training forward
    net.eval()
    with torch.no_grad():
        ref = net(x)
        torch.testing.assert_close(copy.deepcopy(net)(x), ref)
        buf = io.BytesIO()
        torch.save(net, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.load(buf, weights_only=False)(x), ref)
        twin = wnorm.apply(nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(),
                                         nn.Linear(4 * 4 * 4, 3)), method=METHODS[method]).eval()
        wnorm.load_state_dict(twin, net.state_dict())
        torch.testing.assert_close(twin(x), ref)
        folded = wnorm.fold(net)
        assert not any(wnorm.is_weight_normalized(m) for m in folded.modules())
        torch.testing.assert_close(folded(x), ref, atol=1e-5, rtol=1e-5)


def test_data_init_standardizes_centered_layers_and_reports_those_without_g():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    wnorm.centered_weight_norm(net[0])
    wnorm.weight_standardization(net[2])
    wnorm.weight_norm(net[4])
    x = torch.randn(200, 6) * 3 + 1
    with pytest.warns(UserWarning, match="no per-unit g"):
        report = wnorm.data_init(net, x, init_scale=0.5)
    status = {r.name: r.status for r in report}
    assert status == {"0": "initialized", "4": "initialized", "2": "skipped"}
    with torch.no_grad():
        y0 = net[0](x)
    torch.testing.assert_close(y0.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(y0.std(0, unbiased=False), torch.full((8,), 0.5), atol=1e-5, rtol=0)


def test_constant_rows_are_refused_by_centered_and_standardized():
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight[1] = 3.0
    for fn in (wnorm.centered_weight_norm, wnorm.weight_standardization, balanced_weight_norm):
        with pytest.raises(WnormError, match=r"1 of 2 slices along dim 0 of 'weight' have zero norm after centering"):
            fn(copy.deepcopy(lin))


def test_bad_arguments():
    with pytest.raises(WnormError, match="gain must be a finite number > 0"):
        wnorm.forced_weight_norm(nn.Linear(3, 2), gain=0.0)
    for bad in (0, -1.0, math.nan, math.inf, "2", True):
        with pytest.raises(WnormError, match=f"radius must be a finite number > 0 or None; "
                                             f"got {bad!r}"):
            wnorm.forced_weight_norm(nn.Linear(3, 2), radius=bad)
    # math.inf gave an all-zero weight, silently; "1e-5" a TypeError; True an eps of 1
    for bad in (-1.0, math.nan, math.inf, "1e-5", True, torch.ones(2)):
        layer = nn.Linear(3, 2)
        with pytest.raises(WnormError, match=r"weight_standardization: eps must be a finite "
                                             r"number >= 0; got "):
            wnorm.weight_standardization(layer, eps=bad)
        assert not wnorm.is_weight_normalized(layer)
    for ok in (0.0, 1e-5, torch.tensor(1e-5)):
        layer = wnorm.weight_standardization(nn.Linear(3, 2), eps=ok)
        assert slots_of(layer)["weight"].map.eps == pytest.approx(float(ok))
    with pytest.raises(WnormError, match="already weight-normalized by wnorm"):
        wnorm.centered_weight_norm(wnorm.weight_norm(nn.Linear(3, 2)))


def _deep_relu(width: int = 256, depth: int = 12) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return wnorm.apply(nn.Sequential(*layers))


def test_arpit_init_keeps_activation_scale_through_a_deep_relu_net():
    torch.manual_seed(0)
    net = _deep_relu()
    gains = wnorm.arpit_init(net)
    assert gains["0"] == pytest.approx(math.sqrt(2.0))
    assert gains["24"] == pytest.approx(math.sqrt(256 / 10))
    x = torch.randn(512, 256)

    def ratio(model: nn.Sequential) -> float:
        h = x
        with torch.no_grad():
            for m in list(model)[:-1]:  # through the 12th ReLU
                h = m(h)
        return (h.pow(2).sum(1).mean() / x.pow(2).sum(1).mean()).item()

    # Arpit et al.: the squared norm per example stays of order 1 through 12 ReLU layers
    # (finite width drifts it a little); PyTorch's default init loses ~5 orders of magnitude.
    assert 0.4 < ratio(net) < 2.5, ratio(net)
    torch.manual_seed(0)
    assert ratio(_deep_relu()) < 1e-3
    for name, m in net.named_modules():
        if wnorm.is_weight_normalized(m):
            rows = m.weight_v.flatten(1)
            unit = rows / rows.norm(dim=1, keepdim=True)
            if rows.shape[0] <= rows.shape[1]:
                torch.testing.assert_close(unit @ unit.T, torch.eye(rows.shape[0]), atol=1e-5, rtol=0)
            assert m.bias.abs().max() == 0


def test_arpit_init_keeps_feature_map_scale_through_relu_convs():
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Conv2d(32, 32, 3, padding=1, padding_mode="circular"), nn.ReLU()]
    net = wnorm.apply(nn.Sequential(*layers, nn.Conv2d(32, 10, 1)))
    wnorm.arpit_init(net)
    x = torch.randn(16, 32, 12, 12)
    with torch.no_grad():
        h = net[:-1](x)  # through the 8th ReLU; circular padding keeps every position's fan-in
    ratio = (h.pow(2).sum() / x.pow(2).sum()).item()
    assert 0.4 < ratio < 2.5, ratio


def test_arpit_init_residual_gains():
    net = nn.ModuleDict({"stem": nn.Conv2d(3, 8, 3), "b1": nn.Conv2d(8, 8, 3), "b2": nn.Conv2d(8, 8, 3),
                         "short": nn.Conv2d(8, 16, 1), "fc": nn.Linear(16, 10)})
    wnorm.apply(net)
    gains = wnorm.arpit_init(net, block_last=["b2"], shortcuts=["short"], blocks_per_stage=4)
    assert gains["b2"] == pytest.approx(math.sqrt(72 / (4 * 72)))  # fan_out = 8 channels x 9
    assert gains["short"] == pytest.approx(math.sqrt(8 / 16))
    assert gains["b1"] == pytest.approx(math.sqrt(2 * 72 / 72))
    with pytest.raises(WnormError, match="needs blocks_per_stage"):
        wnorm.arpit_init(net, block_last=["b2"])
    with pytest.raises(WnormError, match="call wnorm.apply"):
        wnorm.arpit_init(nn.Linear(3, 2))


def test_a_forced_weight_with_a_fixed_gain_takes_a_written_direction_and_refuses_zero_rows():
    layer = wnorm.forced_weight_norm(nn.Linear(4, 3), gain=1.0)
    nn.init.constant_(layer.weight, 2.0)  # the direction is taken; every row keeps norm 1
    torch.testing.assert_close(layer.weight, torch.full((3, 4), 0.5))
    nn.init.zeros_(layer.weight)
    with pytest.raises(WnormError, match=r"written with rows of norm 0, but a ForcedWeightNorm "
                                         r"with a fixed gain has norm 1.0"):
        layer(torch.randn(2, 4))


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(16, 32, 3, padding=1, groups=4),
    lambda: nn.Conv2d(16, 32, 4, stride=2, padding=1),
], ids=["grouped", "strided"])
def test_arpit_init_energy_ratio_holds_for_grouped_and_strided_convs(conv):
    # |relu'(y)|^2 / |x|^2 = 2 for a layer followed by ReLU: y = conv(x) with gain sqrt(2 fan_in
    # / fan_out), where fan_out counts the outputs one input entry reaches
    torch.manual_seed(0)
    layer = wnorm.apply(nn.Sequential(conv(), nn.Identity(), nn.Conv2d(32, 2, 1)))
    wnorm.arpit_init(layer, linear=["2"])
    x = torch.randn(64, 16, 16, 16)
    with torch.no_grad():
        y = layer[0](x)
    assert abs(y.square().sum().item() / x.square().sum().item() - 2.0) < 0.35


def test_arpit_init_warns_naming_each_layer_it_leaves_as_it_is():
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(16, 16), nn.ReLU())],
                        nn.Linear(16, 4))
    wnorm.weight_norm(net[0])
    wnorm.weight_norm(net[2], dim=None)
    wnorm.weight_norm(net[4], dim=1)
    wnorm.weight_standardization(net[6])
    wnorm.forced_weight_norm(net[8], gain=1.0)
    wnorm.weight_norm(net[10])
    kept = {i: {k: t.clone() for k, t in net[i].state_dict().items()} for i in (2, 4, 6, 8)}
    with pytest.warns(UserWarning, match=re.escape(
            "arpit_init: layers not initialized: 2 (g is not one per output unit (dim=None)); "
            "4 (g is not one per output unit (dim=1)); 6 (no per-unit g to set (standardized "
            "weight)); 8 (no per-unit g to set (forced weight))")):
        gains = wnorm.arpit_init(net)
    assert gains == pytest.approx({"0": math.sqrt(2.0), "10": math.sqrt(16 / 4)})
    for i, state in kept.items():  # left as they are, as the warning says
        for k, t in net[i].state_dict().items():
            assert torch.equal(t, state[k]), (i, k)
    # the classifier left out keeps its role: the layer before it, followed by a ReLU, gets
    # the ReLU gain, not the linear one
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    wnorm.weight_norm(net[0])
    wnorm.weight_norm(net[2], dim=None)
    with pytest.warns(UserWarning, match="layers not initialized: 2"):
        assert wnorm.arpit_init(net) == pytest.approx({"0": math.sqrt(2.0)})
    with pytest.raises(WnormError, match=re.escape(
            "no weight-normalized layer it can set (a learned per-unit g, not frozen) in Linear; "
            "layers not initialized: <model> (g is not one per output unit (dim=None))")):
        wnorm.arpit_init(wnorm.weight_norm(nn.Linear(3, 2), dim=None))


@pytest.mark.parametrize("table", [nn.Embedding, nn.EmbeddingBag])
def test_arpit_init_leaves_embeddings_as_they_are(table):
    # an embedding's input is an index, not an activation whose scale the gains would keep:
    # the ReLU gain sqrt(2 * 32 / 1000) gave every row norm 0.25
    net = nn.Sequential(table(1000, 32), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    wnorm.apply(net, types=wnorm.DEFAULT_TYPES + (table,))
    rows = net[0].weight.detach().clone()
    with pytest.warns(UserWarning, match=re.escape(
            "arpit_init: layers not initialized: 0 (a lookup table: its input is an index, not "
            "an activation whose scale the gains keep)")):
        gains = wnorm.arpit_init(net)
    assert gains == pytest.approx({"1": math.sqrt(2.0), "3": math.sqrt(32 / 10)})
    assert torch.equal(net[0].weight, rows)


@pytest.mark.parametrize("frozen", ["weight_v", "weight_g", "bias"])
def test_arpit_init_leaves_a_frozen_layer_as_it_is(frozen):
    # a pretrained backbone frozen under a new head keeps what it learned, as data_init keeps it
    net = wnorm.apply(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                    nn.Linear(16, 4)))
    getattr(net[0], frozen).requires_grad_(False)
    state = {k: t.clone() for k, t in net[0].state_dict().items()}
    with pytest.warns(UserWarning, match=re.escape(
            f"arpit_init: layers not initialized: 0 (frozen ({frozen} with requires_grad=False)"
            ": it keeps what it learned; unfreeze it to initialize it)")):
        gains = wnorm.arpit_init(net)
    assert gains == pytest.approx({"2": math.sqrt(2.0), "4": math.sqrt(16 / 4)})
    for k, t in net[0].state_dict().items():
        assert torch.equal(t, state[k]), k
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(WnormError, match=re.escape(
            "no weight-normalized layer it can set (a learned per-unit g, not frozen) in "
            "Sequential; layers not initialized: 0 (frozen (weight_v/weight_g/bias with")):
        wnorm.arpit_init(net)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_arpit_init_energy_ratio_holds_for_grouped_and_strided_transposed_convs(groups, stride):
    # as for convs above; a transposed conv's weight is (in, out/groups, *k), so its units are
    # already one group's (dividing fan_out by groups again gave a ratio of 2 * groups).
    # padding 0: every input entry reaches all of its outputs
    torch.manual_seed(0)
    layer = wnorm.apply(nn.Sequential(nn.ConvTranspose2d(16, 32, 4, stride=stride,
                                                         groups=groups),
                                      nn.Identity(), nn.Conv2d(32, 2, 1)))
    wnorm.arpit_init(layer, linear=["2"])
    x = torch.randn(64, 16, 16, 16)
    with torch.no_grad():
        y = layer[0](x)
    assert abs(y.square().sum().item() / x.square().sum().item() - 2.0) < 0.1


@pytest.mark.parametrize("method", [wnorm.centered_weight_norm, wnorm.balanced_weight_norm])
def test_arpit_init_refuses_maps_its_gains_do_not_hold_for(method):
    net = wnorm.apply(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), method=method)
    with pytest.raises(WnormError, match=r"arpit_init: 0 \(Linear\) is reparameterized by"):
        wnorm.arpit_init(net)


def test_arpit_init_says_which_recurrent_weights_it_leaves_as_they_are():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.LSTM(4, 6), nn.Linear(6, 2)

    net = wnorm.apply(Net())
    g = net.rnn.weight_hh_l0_g.clone()
    with pytest.warns(UserWarning, match=r"left as they are: \['rnn\.weight_ih_l0', "
                      r"'rnn\.weight_hh_l0'\] \(Arpit et al\.'s gains are for feed-forward"):
        assert list(wnorm.arpit_init(net)) == ["fc"]
    assert torch.equal(net.rnn.weight_hh_l0_g, g)
    # not 'call wnorm.apply first': it was
    with pytest.raises(WnormError, match=r"no weight-normalized layer it can set \(a learned "
                       r"per-unit g, not frozen\) in LSTM; left as they are"):
        wnorm.arpit_init(wnorm.apply(nn.LSTM(4, 6)))


def test_arpit_init_leaves_a_layer_tied_to_one_it_leaves_as_it_is():
    # an LM head tied to its embedding: the embedding was said to be left as it is, and then
    # changed through the head
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.hidden, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), \
                nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, i: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.hidden(self.emb(i))))

    model = wnorm.apply(TiedLM(), types=wnorm.DEFAULT_TYPES + (nn.Embedding,))
    before = {k: p.clone() for k, p in model.emb.named_parameters()}
    with pytest.warns(UserWarning, match=r"head \(shares its weight with emb, which is left as "
                                         r"it is\)"):
        gains = wnorm.arpit_init(model)
    assert list(gains) == ["hidden"]
    assert all(torch.equal(p, before[k]) for k, p in model.emb.named_parameters())


def _twin(roles_differ: bool) -> nn.Module:
    """Two Linears sharing one weight (and so one g and v), then a classifier."""
    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b(torch.relu(self.a(x)))
            return self.out(h if roles_differ else torch.relu(h))

    return wnorm.apply(Twin())


def test_arpit_init_refuses_tied_layers_whose_roles_ask_for_two_gains():
    # the second write won without a word: the report said 2.0 for 'a', whose g held 1.0
    model = _twin(True)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WnormError, match=r"arpit_init: a and b share one g and v, but their "
                                         r"roles ask for gains 1\.414 and 1"):
        wnorm.arpit_init(model, linear=["b", "out"])
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_arpit_init_sets_tied_layers_of_one_role_once_and_reports_the_gain_they_hold():
    model = _twin(False)
    gains = wnorm.arpit_init(model)
    assert model.a.weight_g is model.b.weight_g
    assert gains["a"] == gains["b"] == pytest.approx(math.sqrt(2.0))
    torch.testing.assert_close(model.a.weight_g, torch.full_like(model.a.weight_g, gains["a"]))
    v = model.a.weight_v.detach()
    torch.testing.assert_close(v @ v.T, torch.eye(6), atol=1e-5, rtol=0)  # drawn orthogonal
    assert torch.equal(model.b.bias, torch.zeros(6))


def test_arpit_init_fills_each_g_of_layers_sharing_only_v():
    # drawing a shared v once skipped the second layer's own g: its report said 1.414, its g
    # held what it held before
    net = wnorm.apply(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                    nn.Linear(8, 2)))
    net[2].weight_v = net[0].weight_v
    with torch.no_grad():
        net[2].weight_g.fill_(123.0)
    gains = wnorm.arpit_init(net)
    for i in (0, 2):
        torch.testing.assert_close(net[i].weight_g, torch.full_like(net[i].weight_g, gains[str(i)]))


def test_arpit_init_leaves_a_layer_it_has_no_gains_for_as_it_is():
    # a Bilinear given through types= got a ReLU layer's gain the paper does not derive
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    model.bi = nn.Bilinear(3, 3, 2)
    wnorm.apply(model, types=wnorm.DEFAULT_TYPES + (nn.Bilinear,))
    before = model.bi.weight_v.detach().clone()
    with pytest.warns(UserWarning, match=r"bi \(Bilinear: Arpit et al\. derive gains for "
                                         r"Linear and convolution layers only\)"):
        gains = wnorm.arpit_init(model, linear=["2"])
    assert list(gains) == ["0", "2"] and torch.equal(model.bi.weight_v, before)


@pytest.mark.parametrize("kwargs", [
    {"linear": "fc"},
    {"linear": ["fc"]},  # a typo: the classifier is called head
    {"shortcuts": ["short*"]},
    {"block_last": ["blk.*.conv2"], "blocks_per_stage": 2},
], ids=["str", "list", "shortcuts", "block_last"])
def test_arpit_init_refuses_a_pattern_naming_no_layer_before_writing_anything(kwargs):
    # each was ignored without a word: the layer meant kept the ReLU gain
    net = wnorm.apply(nn.Sequential(nn.Linear(64, 32), nn.ReLU()))
    net.head = nn.Linear(32, 10)
    wnorm.apply(net.head)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(WnormError, match=r"arpit_init: (linear|shortcuts|block_last) pattern "
                                         r"'[^']+' matches no weight-normalized layer of "
                                         r"Sequential \(a typo\?\)"):
        wnorm.arpit_init(net, **kwargs)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_arpit_init_takes_one_str_as_one_pattern():
    from collections import OrderedDict

    net = wnorm.apply(nn.Sequential(OrderedDict(
        body=nn.Linear(64, 32), act=nn.ReLU(), mid=nn.Linear(32, 32), head=nn.Linear(32, 10))))
    # a str was read as one pattern per character ('m', 'i', 'd'), matching no layer: mid got
    # the ReLU gain sqrt(2), and the head, no longer the default, too
    gains = wnorm.arpit_init(net, linear="mid")
    assert gains["mid"] == pytest.approx(1.0)
    assert gains["head"] == pytest.approx(math.sqrt(2 * 32 / 10))


@pytest.mark.parametrize("n", [0, -2, 2.5, True])
def test_arpit_init_refuses_blocks_per_stage_that_is_no_count(n):
    # -2 raised Python's "math domain error" naming nothing; 2.5 was taken as 2.5 blocks
    net = wnorm.apply(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    with pytest.raises(WnormError, match="blocks_per_stage"):
        wnorm.arpit_init(net, block_last=["0"], blocks_per_stage=n)


@pytest.mark.parametrize("radius", [None, 2.5])
def test_arpit_init_sets_a_forced_weight_norm_with_a_learned_g_as_weight_norm(radius):
    # its map is weight norm's, w = g v/||v||, yet it was refused as a map the gains do not
    # hold for; its v is put on the sphere forced_weight_norm holds it on
    torch.manual_seed(0)
    net = wnorm.apply(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                      method=functools.partial(wnorm.forced_weight_norm, radius=radius))
    gains = wnorm.arpit_init(net)
    assert gains == pytest.approx({"0": 2.0, "2": math.sqrt(32 / 10)})
    for i, fan_in in ((0, 64), (2, 32)):
        layer = net[i]
        w = layer.weight.detach()
        torch.testing.assert_close(w.norm(dim=1), torch.full((w.shape[0],), gains[str(i)]))
        rows = w / w.norm(dim=1, keepdim=True)  # orthonormal rows, as for weight_norm
        torch.testing.assert_close(rows @ rows.T, torch.eye(w.shape[0]), atol=1e-5, rtol=0)
        sphere = math.sqrt(fan_in) if radius is None else radius
        torch.testing.assert_close(layer.weight_v.detach().norm(dim=1),
                                   torch.full((w.shape[0],), sphere))
        assert not layer.bias.any()


def test_arpit_init_says_it_leaves_a_parametrized_bias_as_it_is():
    # zero_() went to the tensor the parametrization computed: b = 0 was not set, without a word
    import torch.nn.utils.parametrize as P

    class Scaled(nn.Module):
        def forward(self, b: torch.Tensor) -> torch.Tensor:
            return 2 * b

    net = wnorm.apply(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    P.register_parametrization(net[0], "bias", Scaled())
    with pytest.warns(UserWarning, match=r"arpit_init: biases left as they are, not set to 0: "
                                         r"\['0'\]"):
        wnorm.arpit_init(net)
    assert not net[2].bias.any()
