"""wnorm.fold: a trained WN (+ mean-only BN) model becomes a plain one with the same eval outputs."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import wnorm
from wnorm import ChannelShift, MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, WnormError

ATOL = 1e-5


def train_a_little(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """Move g, v, biases and running means away from their initial values."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        y = model(x)
        (y[0] if isinstance(y, tuple) else y).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():  # a non-trivial learned shift for every mean-only BN
        for m in model.modules():
            if isinstance(m, (MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d)):
                m.bias.add_(torch.randn_like(m.bias))


def assert_plain(model: nn.Module) -> None:
    assert not any("_wn" in m.__dict__ for m in model.modules())
    assert not any(isinstance(m, (MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d))
                   for m in model.modules())
    keys = list(model.state_dict())
    assert not any(k.endswith(("_g", "_v", "running_mean")) for k in keys)
    return keys


def check_fold(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.eval()
    with torch.no_grad():
        before = model(x)
    folded = wnorm.fold(model)
    with torch.no_grad():
        after = folded(x)
    if isinstance(before, tuple):
        before, after = before[0], after[0]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=ATOL)
    assert_plain(folded)
    return folded


def test_convnet_wn_mean_only_bn_in_sequentials():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), MeanOnlyBatchNorm2d(6), nn.ReLU(),
        nn.Sequential(nn.Conv2d(6, 5, 3), MeanOnlyBatchNorm2d(5), nn.ReLU()),
        nn.Flatten(), nn.Linear(5 * 2 * 2, 4), MeanOnlyBatchNorm1d(4))
    wnorm.apply(model)
    x = torch.randn(8, 3, 6, 6)
    train_a_little(model, x)
    folded = check_fold(model, x)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[3][1], nn.Identity)
    assert isinstance(folded[6], nn.Identity)
    keys = folded.state_dict().keys()
    assert {"0.weight", "0.bias", "3.0.weight", "5.weight"} <= set(keys)
    assert type(folded[0]) is nn.Conv2d and type(folded[5]) is nn.Linear
    # the folded model is an ordinary model: it loads into a fresh plain copy
    fresh = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Identity(), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(6, 5, 3), nn.Identity(), nn.ReLU()),
                          nn.Flatten(), nn.Linear(20, 4), nn.Identity())
    fresh.load_state_dict(folded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), folded(x), rtol=0, atol=0)


class Branchy(nn.Module):
    """The mean-only BN is an attribute, not a Sequential neighbour of its conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = MeanOnlyBatchNorm2d(4)
        self.after_relu = nn.Sequential(nn.ReLU(), MeanOnlyBatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_relu(self.bn(self.conv(x)))


def test_not_in_sequential_becomes_channel_shift():
    model = wnorm.apply(Branchy())
    x = torch.randn(8, 3, 5, 5)
    train_a_little(model, x)
    expected_shift = (model.bn.bias - model.bn.running_mean).detach().clone()
    folded = check_fold(model, x)
    assert isinstance(folded.bn, ChannelShift) and isinstance(folded.after_relu[1], ChannelShift)
    torch.testing.assert_close(folded.bn.shift, expected_shift)
    assert "bn.shift" in folded.state_dict()


class ResidualSequential(nn.Sequential):
    """A Sequential whose own forward reuses the Linear's output (a skip around the BN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self[0](x)
        return self[1](h) + h


def test_a_sequential_subclass_with_its_own_forward_keeps_a_channel_shift():
    # the shift moved into the Linear's bias would reach the skip path too
    model = wnorm.apply(ResidualSequential(nn.Linear(4, 4), MeanOnlyBatchNorm1d(4)))
    x = torch.randn(16, 4) + 3
    train_a_little(model, x)
    folded = check_fold(model, x)
    assert isinstance(folded[1], ChannelShift)


class _ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _LrMulLinear(nn.Linear):  # StyleGAN's equalized learning rate
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias * 0.5)


class _ScaledConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


class _ScaledConvForward(nn.Conv2d):  # keeps Conv2d.forward, which adds the bias in this
    def _conv_forward(self, x: torch.Tensor, w: torch.Tensor,
                      b: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(x, w, b) * 0.5


def _instance_scaled_conv1d() -> nn.Conv1d:
    conv = nn.Conv1d(3, 4, 3)
    plain = conv._conv_forward
    conv._conv_forward = lambda x, w, b: plain(x, w, b) * 0.5
    return conv


@pytest.mark.parametrize("make, shape", [(lambda: _ScaledLinear(3, 4), (16, 3)),
                                         (lambda: _LrMulLinear(3, 4), (16, 3)),
                                         (lambda: _ScaledConv(3, 4, 3), (4, 3, 6, 6)),
                                         (lambda: _ScaledConvForward(3, 4, 3), (4, 3, 6, 6)),
                                         (_instance_scaled_conv1d, (4, 3, 6))])
def test_a_layer_subclass_with_a_forward_of_its_own_keeps_a_channel_shift(make, shape):
    # its forward does not add its bias once: the shift in its bias moved the outputs by 0.5
    torch.manual_seed(0)
    bn = MeanOnlyBatchNorm2d(4) if len(shape) == 4 else MeanOnlyBatchNorm1d(4)
    model = wnorm.apply(nn.Sequential(make(), bn))
    x = torch.randn(shape) + 3
    train_a_little(model, x)
    folded = check_fold(model, x)
    assert isinstance(folded[1], ChannelShift)


def test_conv_without_bias_gets_one():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), MeanOnlyBatchNorm2d(4), nn.ReLU())
    wnorm.apply(model)
    x = torch.randn(8, 3, 5, 5)
    train_a_little(model, x)
    shift = (model[1].bias - model[1].running_mean).detach().clone()
    folded = check_fold(model, x)
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded[0].bias.detach(), shift)
    assert folded[0].bias.requires_grad


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 5, num_layers=2, batch_first=True)
        self.head = nn.Sequential(nn.Linear(5, 4), MeanOnlyBatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.rnn(x)[0][:, -1]
        return self.head(h)


def test_lstm_model():
    model = wnorm.apply(Seq2Seq())
    x = torch.randn(6, 4, 3)
    train_a_little(model, x)
    folded = check_fold(model, x)
    assert type(folded.rnn) is nn.LSTM
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l1", "head.0.weight"} <= set(folded.state_dict())
    # the plain LSTM still trains and deep-copies
    clone = copy.deepcopy(folded)
    folded.train()
    folded(x).sum().backward()
    assert folded.rnn.weight_hh_l0.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(x), folded.eval()(x))


def test_fold_on_mean_only_bn_itself():
    bn = MeanOnlyBatchNorm1d(3)
    bn(torch.randn(5, 3) + 2)
    bn.eval()
    x = torch.randn(4, 3)
    with torch.no_grad():
        before = bn(x)
    shift = wnorm.fold(bn)
    assert isinstance(shift, ChannelShift)
    torch.testing.assert_close(shift(x), before)


def test_shared_preceding_layer():
    shared = nn.Linear(4, 4)
    model = wnorm.apply(nn.Sequential(shared, MeanOnlyBatchNorm1d(4), nn.Tanh(), shared))
    x = torch.randn(8, 4)
    train_a_little(model, x)
    check_fold(model, x)


def test_no_running_stats_is_an_error():
    model = nn.Sequential(nn.Linear(3, 4),
                          nn.Sequential(nn.Linear(4, 4), MeanOnlyBatchNorm1d(4, track_running_stats=False)))
    with pytest.raises(WnormError, match=r"1.1 \(MeanOnlyBatchNorm1d\): cannot fold: "
                                         r"track_running_stats=False"):
        wnorm.fold(model)


# --------------------------------------------------------------------------- found in review
def test_a_module_reused_in_the_sequential_does_not_hide_the_real_predecessor():
    """One ReLU in two slots: named_children() lists it once, so the Linear two slots before
    the batch norm looked like its predecessor and took a shift meant for after the ReLU."""
    act = nn.ReLU()
    model = wnorm.apply(nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 6), act,
                                      MeanOnlyBatchNorm1d(6)))
    x = torch.randn(16, 4) * 3
    train_a_little(model, x)
    folded = check_fold(model, x)
    assert isinstance(folded[4], ChannelShift) and folded[2].bias is not None


def test_a_batch_norm_in_two_slots_folds_at_each():
    bn = MeanOnlyBatchNorm1d(4)
    model = wnorm.apply(nn.Sequential(nn.Linear(4, 4), bn, nn.Tanh(), nn.Linear(4, 4), bn))
    x = torch.randn(16, 4)
    train_a_little(model, x)
    folded = check_fold(model, x)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.Identity)


def test_a_hook_on_the_preceding_layer_sees_what_it_saw_before():
    """An output hook on the layer before the batch norm runs before the shift: the shift
    cannot move into that layer's bias."""
    model = wnorm.apply(nn.Sequential(nn.Linear(4, 6), MeanOnlyBatchNorm1d(6)))
    x = torch.randn(16, 4) + 2
    train_a_little(model, x)
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()) or o.clamp(min=0))
    model.eval()
    with torch.no_grad():
        model(x)
    folded = check_fold(model, x)
    assert isinstance(folded[1], ChannelShift)
    torch.testing.assert_close(seen[-1], seen[0])  # the hook saw the same, unshifted output


def test_hooks_on_the_batch_norm_move_to_its_channel_shift():
    model = wnorm.apply(nn.Sequential(nn.Linear(4, 6), MeanOnlyBatchNorm1d(6)))
    x = torch.randn(16, 4) + 2
    train_a_little(model, x)
    handle = model[1].register_forward_hook(lambda m, i, o: o * 2)
    folded = check_fold(model, x)
    assert isinstance(folded[1], ChannelShift)
    handle.remove()  # the user's handle still removes it
    assert not folded[1]._forward_hooks


def test_a_batch_norm_with_a_forward_set_on_the_instance_is_left_with_a_warning():
    model = wnorm.apply(nn.Sequential(nn.Linear(4, 6), MeanOnlyBatchNorm1d(6)))
    x = torch.randn(16, 4) + 2
    train_a_little(model, x)
    bn = model[1]
    plain_forward = bn.forward
    bn.forward = lambda t: plain_forward(t) * 3
    model.eval()
    with torch.no_grad():
        before = model(x)
    with pytest.warns(UserWarning, match=r"1 \(MeanOnlyBatchNorm1d\) has a forward set"):
        folded = wnorm.fold(model)
    assert folded[1] is bn
    with torch.no_grad():
        torch.testing.assert_close(folded(x), before)


@pytest.mark.parametrize("api", ["old", "new"])
def test_pytorchs_own_weight_norm_is_folded_too(api):
    """A model normalized with PyTorch's own APIs (HiFi-GAN and friends) folds as well: plain
    weights, the same outputs, and TorchScript works (it cannot script either API)."""
    wn = (torch.nn.utils.weight_norm if api == "old"
          else torch.nn.utils.parametrizations.weight_norm)
    torch.manual_seed(0)
    model = nn.Sequential(wn(nn.Conv1d(2, 4, 3, dilation=2)), nn.LeakyReLU(0.1),
                          wn(nn.ConvTranspose1d(4, 3, 4, stride=2)), nn.Flatten(),
                          wn(nn.Linear(3 * 14, 5)))
    x = torch.randn(3, 2, 10)
    train_a_little(model, x)
    folded = check_fold(model, x)
    assert sorted(folded.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight",
                                           "4.bias", "4.weight"]
    assert not any(m._forward_pre_hooks for m in folded.modules())
    torch.testing.assert_close(torch.jit.script(folded)(x), folded(x))


@pytest.mark.parametrize("tie", ["two modules", "one module in two slots"])
def test_a_tied_weight_stays_one_parameter_after_fold(tie):
    # an encoder/decoder or a shared block: one (g, v) for every holder, then one w
    a = nn.Linear(4, 4)
    b = nn.Linear(4, 4) if tie == "two modules" else a
    b.weight = a.weight
    net = wnorm.apply(nn.Sequential(a, nn.Tanh(), b)).eval()
    x = torch.randn(3, 4)
    y = net(x)
    wnorm.fold(net)
    assert net[0].weight is net[2].weight
    assert sum(p.numel() for p in net.parameters()) == 16 + 4 + (4 if tie == "two modules" else 0)
    torch.testing.assert_close(net(x), y, rtol=0, atol=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)  # and it trains as one weight
    net(x).sum().backward()
    opt.step()
    assert net[0].weight is net[2].weight


def test_a_bias_another_layer_shares_does_not_take_the_shift():
    # the shift goes into a ChannelShift instead: added to the shared bias it would move the
    # other layer's output too
    p = nn.Linear(4, 3)
    q = nn.Linear(4, 3)
    q.bias = p.bias
    net = nn.ModuleDict({"p": nn.Sequential(p, MeanOnlyBatchNorm1d(3)), "q": q})
    with torch.no_grad():
        net["p"][1].running_mean.fill_(0.3)
    net.eval()
    x = torch.randn(5, 4)
    before = net["p"](x), net["q"](x)
    wnorm.fold(net)
    torch.testing.assert_close(net["p"](x), before[0])
    torch.testing.assert_close(net["q"](x), before[1])


def test_a_channel_shift_keeps_the_input_dtype_and_refuses_another_channel_count():
    """Mean-only BN returns its input's dtype; the ChannelShift replacing it added a float32
    shift, so the folded model returned float32 under bfloat16 autocast. And a 1-channel input
    broadcast silently to every channel, where the batch norm raised."""
    model = wnorm.apply(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), MeanOnlyBatchNorm2d(4)))
    x = torch.randn(4, 3, 6, 6)
    train_a_little(model, x)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(x)
    folded = wnorm.fold(model)
    assert isinstance(folded[2], ChannelShift)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = folded(x)
    assert before.dtype == after.dtype == torch.bfloat16
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for bad in (torch.randn(2, 1, 6, 6), torch.randn(2, 5, 6), torch.randn(4)):
        with pytest.raises(WnormError, match=re.escape(
                "ChannelShift (folded from 2, MeanOnlyBatchNorm2d): expected 4 channels in "
                f"dim 1; got shape {list(bad.shape)}")):
            folded[2](bad)
    bn = MeanOnlyBatchNorm1d(3).eval()
    with pytest.raises(WnormError, match=re.escape("ChannelShift (folded from <model>, "
                                                   "MeanOnlyBatchNorm1d): expected 3 channels")):
        wnorm.fold(bn)(torch.randn(2, 1))


class _Abs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


def _untracked_bn(net: nn.Sequential) -> nn.Sequential:
    return net.append(MeanOnlyBatchNorm1d(4, track_running_stats=False))


def _parametrized_bias(net: nn.Sequential) -> nn.Sequential:
    parametrize.register_parametrization(net[2], "bias", _Abs())
    return net


def _pruned_v(net: nn.Sequential) -> nn.Sequential:
    prune.l1_unstructured(net[2], "weight_v", 0.5)
    return net


def _weight_swapped_through_data(net: nn.Sequential) -> nn.Sequential:
    net[2].weight.data = torch.zeros(5, 5)  # held: refused when split back into g and v
    return net


_UNTRACKED = r"3 \(MeanOnlyBatchNorm1d\): cannot fold: track_running_stats=False"
_PRUNED = r"2 \(Linear\): .*'weight_v'.* no longer"


# runs: whether the spoiled model still gives outputs (wnorm refuses a pruned v, and a weight
# of another shape, in the forward too)
@pytest.mark.parametrize("normalize, spoil, runs, message", [
    ("wnorm", _untracked_bn, True, _UNTRACKED),
    ("pytorch", _untracked_bn, True, _UNTRACKED),
    ("wnorm", _parametrized_bias, True,
     r"2 \(Linear\): PyTorch parametrizations \(\['bias'\]\) were registered on top of wnorm's"),
    ("wnorm", _pruned_v, False, _PRUNED),
    ("pytorch", _pruned_v, True, _PRUNED),
    # PyTorch's removal hook left on an adopted layer is wnorm's: its message, not PyTorch's
    ("adopted", _pruned_v, False, r"2 \(Linear\): 'weight_v' is no longer a parameter of this "
                                  r"layer \(torch\.nn\.utils\.prune or a parametrization"),
    ("wnorm", _weight_swapped_through_data, False, r"2 \(Linear\): 'weight' was replaced through"),
], ids=["untracked mean-only BN", "untracked mean-only BN, PyTorch's weight norms",
        "parametrized bias", "pruned v", "pruned v, PyTorch's weight norms", "pruned v, adopted",
        "weight swapped"])
def test_a_refused_fold_leaves_the_model_as_it_was(normalize, spoil, runs, message):
    """fold raised only after the layers before the bad one were folded: their g and v, which
    an optimizer holds, were gone, and a parametrized layer's error named its class only."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))
    if normalize == "wnorm":
        wnorm.apply(net)
    else:
        net[0] = torch.nn.utils.parametrizations.weight_norm(net[0])
        with pytest.warns(FutureWarning):
            net[2] = torch.nn.utils.weight_norm(net[2])
        if normalize == "adopted":
            wnorm.apply(net)
    net = spoil(net).eval()
    x = torch.randn(5, 3)
    params = dict(net.named_parameters())
    values = {n: p.detach().clone() for n, p in params.items()}
    normalized = [wnorm.is_weight_normalized(m) for m in net.modules()]
    classes = [type(m) for m in net.modules()]
    with torch.no_grad():
        before = net(x) if runs else None
    with pytest.raises(WnormError, match=message):
        wnorm.fold(net)
    assert dict(net.named_parameters()).keys() == params.keys()
    for n, p in net.named_parameters():
        assert p is params[n]
        torch.testing.assert_close(p.detach(), values[n], rtol=0, atol=0)
    assert [wnorm.is_weight_normalized(m) for m in net.modules()] == normalized
    assert [type(m) for m in net.modules()] == classes
    if before is not None:
        with torch.no_grad():
            torch.testing.assert_close(net(x), before, rtol=0, atol=0)


def test_a_parametrized_bias_before_the_batch_norm_does_not_lose_the_shift():
    """The bias is computed on each access: the shift added into it was thrown away, silently
    changing the outputs. It becomes a ChannelShift instead."""
    net = nn.Sequential(nn.Linear(3, 4), MeanOnlyBatchNorm1d(4))
    parametrize.register_parametrization(net[0], "bias", _Abs())
    with torch.no_grad():
        net[1].running_mean.fill_(0.7)
    net.eval()
    x = torch.randn(5, 3)
    before = net(x)
    wnorm.fold(net)
    assert isinstance(net[1], ChannelShift)
    torch.testing.assert_close(net(x), before)


def test_a_channel_shift_pickled_before_it_named_its_origin_still_refuses_clearly():
    import pickle

    old = ChannelShift(torch.zeros(4))
    del old.__dict__["origin"]  # as one pickled before ChannelShift had the attribute
    back = pickle.loads(pickle.dumps(old))
    with pytest.raises(WnormError, match=r"^ChannelShift: expected 4 channels in dim 1"):
        back(torch.zeros(2, 3))


def test_a_linear_on_length_inputs_before_a_batch_norm_keeps_the_shift_on_the_channels():
    # a Linear's bias adds along the last axis; the batch norm's shift, along dim 1 of its
    # (N, C, L) input: folded into the bias, eval outputs moved by 0.04 without a word
    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(4, 4), wnorm.MeanOnlyBatchNorm1d(4)))
    x = torch.randn(8, 4, 4)
    for _ in range(3):
        model(x)
    with torch.no_grad():
        model[1].bias.uniform_(-1, 1)
    model.eval()
    before = model(x)
    wnorm.fold(model)
    assert isinstance(model[1], wnorm.ChannelShift)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    # the usual (N, C) input still folds into the Linear's bias
    flat = wnorm.apply(nn.Sequential(nn.Linear(4, 4), wnorm.MeanOnlyBatchNorm1d(4)))
    flat(torch.randn(8, 4))
    assert isinstance(wnorm.fold(flat.eval())[1], nn.Identity)



@pytest.mark.parametrize("sync", [False, True], ids=["plain", "synced"])
@pytest.mark.parametrize("bn, shape", [(wnorm.MeanOnlyBatchNorm2d, (6, 4, 3, 4)),
                                       (wnorm.MeanOnlyBatchNorm3d, (6, 4, 2, 3, 4))])
def test_a_linear_before_a_2d_or_3d_batch_norm_never_takes_its_shift_even_after_a_load(
        bn, shape, sync):
    # its bias adds along the last axis, never the batch norm's dim 1: a model loaded from a
    # checkpoint (no forward in this process) folded to outputs off by 1.0; converted to
    # SyncMeanOnlyBatchNorm (which takes any rank), the layer's rank was forgotten
    torch.manual_seed(0)
    trained = wnorm.apply(nn.Sequential(nn.Linear(4, 4), bn(4)))
    x = torch.randn(shape)
    for _ in range(3):
        trained(x)
    with torch.no_grad():
        trained[1].bias.uniform_(-1, 1)
    fresh = wnorm.apply(nn.Sequential(nn.Linear(4, 4), bn(4)))
    if sync:
        fresh = wnorm.SyncMeanOnlyBatchNorm.convert_sync_batchnorm(fresh)
    fresh.load_state_dict(trained.state_dict())
    before = trained.eval()(x)  # the fresh model runs nothing before its fold
    wnorm.fold(fresh.eval())
    assert isinstance(fresh[1], wnorm.ChannelShift)
    torch.testing.assert_close(fresh(x), before, rtol=0, atol=1e-6)


def test_a_zero_row_of_v_from_structured_pruning_is_refused_not_folded_into_nan():
    # ln_structured on weight_v zeroes whole rows: g v/||v|| is NaN there, and fold wrote it
    # into the plain model for good
    torch.manual_seed(0)
    net = wnorm.apply(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)))
    prune.ln_structured(net[0], "weight_v", amount=0.4, n=2, dim=0)
    prune.remove(net[0], "weight_v")
    rows = (net[0].weight_v == 0).all(1).nonzero().flatten().tolist()
    assert len(rows) == 2
    before = {k: t.clone() for k, t in net.state_dict().items()}
    with pytest.raises(WnormError, match=re.escape(
            f"has non-finite values in rows {rows}: a zero row of 'weight_v' (no direction; "
            "structured pruning of 'weight_v' makes those: prune the unit's 'weight_g' instead)")):
        wnorm.fold(net)
    assert type(net[0]) is not nn.Linear  # nothing folded
    for k, t in net.state_dict().items():
        assert torch.equal(t, before[k]), k


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
@pytest.mark.parametrize("api", ["torch-new", "torch-old"])
def test_a_zero_row_of_v_in_pytorchs_weight_norm_is_refused_as_in_wnorms(api):
    # fold takes PyTorch's weight norm off too: a zero row of its v was folded into NaN rows
    # without a word, where the same row in a wnorm layer is refused
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    if api == "torch-new":
        nn.utils.parametrizations.weight_norm(net[2])
        v, vname = net[2].parametrizations.weight.original1, "parametrizations.weight.original1"
    else:
        nn.utils.weight_norm(net[2])
        v, vname = net[2].weight_v, "weight_v"
    with torch.no_grad():
        v[1].zero_()
    before = {k: t.clone() for k, t in net.state_dict().items()}
    with pytest.raises(WnormError, match=re.escape(
            f"2 (Linear): the weight-normalized 'weight' has non-finite values in rows [1]: a "
            f"zero row of '{vname}'")):
        wnorm.fold(net)
    assert "weight" not in net[2]._parameters  # nothing folded: no plain weight
    for k, t in net.state_dict().items():
        assert torch.equal(t, before[k]), k
