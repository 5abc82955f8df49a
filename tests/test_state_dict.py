"""State dicts from PyTorch's two weight-norm APIs, plain models and wnorm load and give the same
outputs; conversions round-trip and keep each pair's axis; every bad input is a WnormError and
leaves the model as it was; a module that does not take what it is given is an error."""

from __future__ import annotations

import copy
import io
import itertools
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn
from nets import THREE_WAYS_AXES, ThreeWays
from torch.nn.utils import parametrizations

import wnorm
from wnorm import WnormError
from wnorm._layouts import FORMATS
from wnorm.maps import METHODS
from wnorm.state_dict import convert_state_dict, load_state_dict

Norm = Callable[[nn.Module], nn.Module]
OLD: Norm = nn.utils.weight_norm
NEW: Norm = parametrizations.weight_norm


def plain(m: nn.Module) -> nn.Module:
    return m


class ResBlock(nn.Module):
    def __init__(self, ch: int, norm: Norm) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            norm(nn.Conv1d(ch, ch, 3, dilation=d, padding=d)) for d in (1, 3, 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(nn.functional.leaky_relu(x, 0.1))
        return x


class Vocoder(nn.Module):
    """HiFi-GAN's shape, small: conv pre, two transposed-conv upsamplings each followed by a
    dilated residual block, leaky ReLU, conv post to one channel (g of shape (1, 1, 1))."""

    def __init__(self, norm: Norm = plain) -> None:
        super().__init__()
        self.pre = norm(nn.Conv1d(6, 16, 7, padding=3))
        self.ups = nn.ModuleList(
            [norm(nn.ConvTranspose1d(16, 8, 4, 2, 1)), norm(nn.ConvTranspose1d(8, 4, 4, 2, 1))]
        )
        self.blocks = nn.ModuleList([ResBlock(8, norm), ResBlock(4, norm)])
        self.post = norm(nn.Conv1d(4, 1, 7, padding=3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        for up, block in zip(self.ups, self.blocks):
            x = block(up(nn.functional.leaky_relu(x, 0.1)))
        return torch.tanh(self.post(nn.functional.leaky_relu(x)))


def scramble(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter away from its init (so g != ||v||: copying v as w would be wrong)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5 + torch.rand(p.shape, generator=gen)).add_(
                0.05 * torch.randn(p.shape, generator=gen)
            )
    return model


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


X = torch.randn(2, 6, 20, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- the must-show test
@pytest.mark.parametrize("norm", [OLD, NEW, plain], ids=["torch-old", "torch-new", "plain"])
def test_vocoder_checkpoint_loads_into_wnorm_model_with_same_outputs(norm: Norm) -> None:
    torch.manual_seed(0)
    source = scramble(Vocoder(norm)).eval()
    target = wnorm.apply(Vocoder()).eval()
    with torch.no_grad():
        target(X)  # fills wnorm's inference cache: loading must invalidate it
    assert load_state_dict(target, source.state_dict()) is target
    with torch.no_grad():
        torch.testing.assert_close(target(X), source(X), rtol=1e-5, atol=1e-5)
    # every target g is ||w|| along wnorm's own axis (1 for ConvTranspose), whatever the source's
    layers = [m for m in target.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
    assert len(layers) == 10
    for module in layers:
        dim = 1 if isinstance(module, nn.ConvTranspose1d) else 0
        w = module.weight.detach()
        axes = [d for d in range(w.dim()) if d != dim]
        assert module.weight_g.shape == w.norm(dim=axes, keepdim=True).shape
        torch.testing.assert_close(module.weight_g.detach(), w.norm(dim=axes, keepdim=True),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", [OLD, NEW, plain], ids=["torch-old", "torch-new", "plain"])
def test_wnorm_checkpoint_loads_back_into_every_layout(norm: Norm) -> None:
    source = scramble(wnorm.apply(Vocoder())).eval()
    target = Vocoder(norm).eval()
    load_state_dict(target, source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(target(X), source(X), rtol=1e-5, atol=1e-5)


def test_wnorm_to_wnorm_copies_g_and_v_bitwise() -> None:
    source = scramble(wnorm.apply(Vocoder()))
    target = wnorm.apply(Vocoder())
    load_state_dict(target, source.state_dict())
    assert same_state(snapshot(target), snapshot(source))


def test_same_shapes_are_copied_as_is_from_torch_old() -> None:
    # torch's Conv1d layout equals wnorm's (dim 0): its g and v arrive untouched (training state)
    source = scramble(OLD(nn.Conv1d(3, 5, 3)))
    target = wnorm.weight_norm(nn.Conv1d(3, 5, 3))
    load_state_dict(target, source.state_dict())
    assert torch.equal(target.weight_g, source.weight_g)
    assert torch.equal(target.weight_v, source.weight_v)


def test_conv_transpose_with_single_output_channel() -> None:
    # torch dim 0 (per input channel) vs wnorm dim 1 with one output channel: g is (1, 1, 1)
    source = scramble(OLD(nn.ConvTranspose1d(4, 1, 3)))
    target = wnorm.weight_norm(nn.ConvTranspose1d(4, 1, 3))
    assert target.weight_g.shape == (1, 1, 1)
    load_state_dict(target, source.state_dict())
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", [OLD, NEW], ids=["torch-old", "torch-new"])
def test_linear_whole_tensor_norm(norm: Callable[..., nn.Module]) -> None:
    source = scramble(norm(nn.Linear(5, 3), dim=None))
    g = source.state_dict()["weight_g" if norm is OLD else "parametrizations.weight.original0"]
    assert g.dim() == 0
    target = wnorm.weight_norm(nn.Linear(5, 3))  # per row: values are converted
    load_state_dict(target, source.state_dict())
    x = torch.randn(4, 5)
    torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-6)
    whole = wnorm.weight_norm(nn.Linear(5, 3), dim=None)  # same layout: copied as is
    load_state_dict(whole, source.state_dict())
    assert torch.equal(whole.weight_g, g)


def lstm_source(norm: Norm) -> nn.LSTM:
    lstm = nn.LSTM(4, 3, num_layers=2)
    for name in [n for n in lstm._flat_weights_names if n.startswith("weight_")]:
        if norm is OLD:
            nn.utils.weight_norm(lstm, name)
        else:
            parametrizations.weight_norm(lstm, name)
    return scramble(lstm)


@pytest.mark.parametrize("norm", [OLD, NEW], ids=["torch-old", "torch-new"])
def test_lstm_weights_from_both_apis(norm: Norm) -> None:
    source = lstm_source(norm)
    sd = source.state_dict()
    weights = {}  # eq. 2 by hand, one g per gate row (torch's old API only refreshes in forward)
    for n in source._flat_weights_names:
        if n.startswith("bias"):
            continue
        g, v = (sd[f"{n}_g"], sd[f"{n}_v"]) if norm is OLD else (
            sd[f"parametrizations.{n}.original0"], sd[f"parametrizations.{n}.original1"])
        weights[n] = g * v / v.norm(dim=1, keepdim=True)
    target = wnorm.apply(nn.LSTM(4, 3, num_layers=2))
    load_state_dict(target, source.state_dict())
    for name, w in weights.items():
        torch.testing.assert_close(getattr(target, name), w, rtol=1e-5, atol=1e-6)
    reference = nn.LSTM(4, 3, num_layers=2)  # plain, loaded with the computed weights
    reference.load_state_dict(convert_state_dict(source.state_dict(), "plain"))
    x = torch.randn(5, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(target(x)[0], reference(x)[0], rtol=1e-5, atol=1e-6)


def test_buffers_pass_through_and_plain_target_layers_get_w() -> None:
    def net(norm: Norm) -> nn.Sequential:
        return nn.Sequential(norm(nn.Conv1d(3, 4, 3)), nn.BatchNorm1d(4), norm(nn.Linear(4, 2)))

    source = scramble(net(OLD))
    with torch.no_grad():
        source[:2].train()(torch.randn(8, 3, 5))  # fills BatchNorm's running stats
    source = source.eval()
    target = wnorm.apply(net(plain), exclude=["2"]).eval()  # layer 2 stays plain
    load_state_dict(target, source.state_dict())
    assert torch.equal(target[1].running_mean, source[1].running_mean)
    assert "2.weight" in target.state_dict()
    x = torch.randn(3, 3, 6)  # conv output length 4: the Linear(4, 2) acts along time
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- strict / errors
def linear_pair() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = scramble(wnorm.weight_norm(nn.Linear(3, 2)), seed=3)
    source = scramble(OLD(nn.Linear(3, 2)), seed=4)
    return model, dict(source.state_dict())


def test_bitwise_unchanged_helper_sees_a_load() -> None:
    model, sd = linear_pair()
    before = snapshot(model)
    load_state_dict(model, sd)
    assert not same_state(before, snapshot(model))


def bad_inputs() -> list[tuple[str, Callable[[dict[str, torch.Tensor]], dict], str]]:
    def drop(sd: dict) -> dict:
        return {k: v for k, v in sd.items() if k != "bias"}

    def extra(sd: dict) -> dict:
        return {**sd, "head.weight": torch.ones(1, 2)}

    def shape(sd: dict) -> dict:
        return {**sd, "weight_v": torch.ones(2, 4), "weight_g": torch.ones(2, 1)}

    def nan(sd: dict) -> dict:
        v = sd["weight_v"].clone()
        v[1, 2] = float("nan")
        return {**sd, "weight_v": v}

    def inf_bias(sd: dict) -> dict:
        return {**sd, "bias": torch.tensor([0.0, float("inf")])}

    def zero_row(sd: dict) -> dict:
        return {"weight": torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), "bias": sd["bias"]}

    def int_weight(sd: dict) -> dict:
        return {"weight": torch.ones(2, 3, dtype=torch.int64), "bias": sd["bias"]}

    def bad_g(sd: dict) -> dict:
        return {**sd, "weight_g": torch.ones(3, 2)}

    def nested(sd: dict) -> dict:
        return {"state_dict": sd}

    return [
        ("missing", drop, r"missing keys \['bias'\]"),
        ("unexpected", extra, r"unexpected keys \['head.weight'\]"),
        ("shape", shape, r"'weight_v': expected shape \(2, 3\).*got \(2, 4\)"),
        ("nan", nan, r"'weight_v': expected finite values; got 1 NaN/inf"),
        ("inf", inf_bias, r"'bias': expected finite values"),
        ("zero-norm", zero_row, r"'weight': 1 of 2 slices along dim 0 have zero norm"),
        ("dtype", int_weight, r"'weight': expected a tensor of dtype like torch.float32.*got "
                              r"torch.int64"),
        ("g-axis", bad_g, r"'weight_g': cannot tell which axis.*got shape \(3, 2\)"),
        ("nested", nested, r"'state_dict' is a dict, not a tensor"),
    ]


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda c: c[0])
def test_bad_state_dict_is_an_error_and_leaves_the_model_unchanged(case) -> None:
    _, edit, match = case
    model, sd = linear_pair()
    before = snapshot(model)
    with pytest.raises(WnormError, match=match):
        load_state_dict(model, edit(sd))
    assert same_state(snapshot(model), before)


def test_error_after_some_valid_keys_still_leaves_the_model_unchanged() -> None:
    model = scramble(wnorm.apply(Vocoder()))
    sd = dict(scramble(Vocoder(OLD), seed=5).state_dict())
    sd["post.weight_v"] = sd["post.weight_v"].clone()
    sd["post.weight_v"][0, 0, 0] = float("nan")  # the last layer: earlier ones were all valid
    before = snapshot(model)
    with pytest.raises(WnormError, match="post.weight_v"):
        load_state_dict(model, sd)
    assert same_state(snapshot(model), before)


def test_strict_false_loads_what_matches_and_reports_the_rest() -> None:
    model, sd = linear_pair()
    before = snapshot(model)
    sd = {k: v for k, v in sd.items() if k != "bias"}
    sd["extra"] = torch.zeros(1)
    with pytest.warns(UserWarning, match=r"missing keys \['bias'\], unexpected keys \['extra'\]"):
        assert load_state_dict(model, sd, strict=False) is model
    assert torch.equal(model.bias, before["bias"])
    assert torch.equal(model.weight_v, sd["weight_v"])


def test_pytorchs_strict_false_load_keeps_a_write_into_a_layer_it_does_not_load() -> None:
    """A write into a weight is split into g and v at the next access; before, PyTorch's own
    load_state_dict(strict=False) dropped it in every layer, loaded or not. A layer whose g
    and v are loaded takes them; the others keep the write."""
    torch.manual_seed(0)
    net = wnorm.apply(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    other = wnorm.apply(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    nn.init.constant_(net[0].weight, 0.5)  # not loaded below: lands
    nn.init.constant_(net[1].weight, 0.25)  # loaded below: replaced
    only_b = {k: t for k, t in other.state_dict().items() if k.startswith("1.")}
    report = net.load_state_dict(only_b, strict=False)
    assert sorted(report.missing_keys) == ["0.bias", "0.weight_g", "0.weight_v"]
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(net[0](x), nn.functional.linear(x, torch.full((3, 4), 0.5),
                                                                   net[0].bias))
        torch.testing.assert_close(net(x), other[1](net[0](x)))
        torch.testing.assert_close(net[1].weight, other[1].weight, rtol=0, atol=0)


def test_missing_pair_is_reported_with_the_models_keys() -> None:
    model = wnorm.weight_norm(nn.Linear(3, 2))
    with pytest.raises(WnormError, match=r"missing keys \['weight_g', 'weight_v'\]$"):
        load_state_dict(model, {"bias": torch.zeros(2)})


def test_half_a_pair_is_named_as_such_not_as_both_missing_and_unexpected() -> None:
    # the report said missing ['0.weight_g', '0.weight_v'] and unexpected ['0.weight_g']: the
    # checkpoint's g named as both, its absent v never named as the cause
    torch.manual_seed(0)
    src = wnorm.apply(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)))
    sd = dict(src.state_dict())
    del sd["0.weight_v"]
    new = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    for m in (new[0], new[2]):
        parametrizations.weight_norm(m)
    for model in (wnorm.apply(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))), new):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(WnormError) as info:
            load_state_dict(model, sd)
        message = str(info.value)
        assert "'0.weight_g' without its other half '0.weight_v'" in message, message
        assert "unexpected" not in message and "missing keys" not in message, message
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        with pytest.warns(UserWarning) as caught:
            load_state_dict(model, sd, strict=False)
        message = str(caught[0].message)
        assert "'0.weight_g' without its other half '0.weight_v'" in message, message
        assert "unexpected" not in message and "missing keys" not in message, message
        x = torch.randn(3, 4)
        assert torch.equal(model[2](x), src[2](x))  # the rest is loaded


def test_a_batchnorm_checkpoint_from_before_num_batches_tracked_loads_as_in_pytorch() -> None:
    # PyTorch < 0.4.1 saved no num_batches_tracked (and no version 2 in the metadata);
    # torch's load_state_dict takes such a checkpoint (BatchNorm's loader keeps the count),
    # wnorm's refused it as missing a key
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    src(torch.randn(8, 3))
    old = {k: v for k, v in src.state_dict().items() if k != "1.num_batches_tracked"}
    model = wnorm.apply(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    load_state_dict(model, old)
    x = torch.randn(5, 3)
    assert torch.equal(model.eval()(x), src.eval()(x))
    assert int(model[1].num_batches_tracked) == 0
    # saved at version 2 and the key dropped since: missing, as in torch
    newer = copy.copy(src.state_dict())
    del newer["1.num_batches_tracked"]
    with pytest.raises(WnormError, match=r"missing keys \['1.num_batches_tracked'\]"):
        load_state_dict(wnorm.apply(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))), newer)


# --------------------------------------------------------------------------- conversion
def pure(norm: Norm) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return dict(scramble(Vocoder(norm)).state_dict())


def weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return convert_state_dict(sd, "plain")


@pytest.mark.parametrize(
    "start,a,b",
    [(s, a, b) for s in ("torch-old", "torch-new", "plain") for a, b in
     itertools.product(FORMATS, FORMATS)],
)
def test_convert_round_trips_keep_the_weights(start: str, a: str, b: str) -> None:
    sd = pure({"torch-old": OLD, "torch-new": NEW, "plain": plain}[start])
    expected = weights(sd)
    out = convert_state_dict(convert_state_dict(sd, a), b)
    got = weights(out)
    assert list(got) == list(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("to", FORMATS)
def test_converted_checkpoint_loads_into_the_models_with_same_outputs(to: str) -> None:
    torch.manual_seed(0)
    source = scramble(Vocoder(NEW)).eval()
    sd = convert_state_dict(source.state_dict(), to)
    make = {"plain": lambda: Vocoder(), "torch-old": lambda: Vocoder(OLD),
            "torch-new": lambda: Vocoder(NEW), "wnorm": lambda: wnorm.apply(Vocoder())}[to]
    target = make().eval()
    if to == "wnorm":  # per input channel in the file, per output channel in the model
        load_state_dict(target, sd)
    else:  # torch's own loader: the keys and shapes are exactly that layout's
        target.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(target(X), source(X), rtol=1e-5, atol=1e-5)


def test_convert_key_names() -> None:
    sd = pure(OLD)
    new = convert_state_dict(sd, "torch-new")
    assert "ups.0.parametrizations.weight.original0" in new
    assert "blocks.1.convs.2.parametrizations.weight.original1" in new
    assert list(convert_state_dict(new, "wnorm")) == list(sd)
    flat = convert_state_dict(sd, "plain")
    assert "pre.weight" in flat and "pre.weight_g" not in flat
    top = convert_state_dict(dict(NEW(nn.Linear(2, 2)).state_dict()), "torch-old")
    assert sorted(top) == ["bias", "weight_g", "weight_v"]


def test_convert_plain_normalizes_weights_only() -> None:
    net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.LayerNorm(3), nn.Linear(3, 2))
    old = convert_state_dict(net.state_dict(), "torch-old")
    assert {k for k in old if k.endswith(("_g", "_v"))} == {
        "0.weight_g", "0.weight_v", "3.weight_g", "3.weight_v"}
    assert "1.weight" in old and "2.weight" in old and "1.running_var" in old
    assert old["0.weight_g"].shape == (3, 1, 1)


def test_convert_keeps_plain_layers_plain_when_some_are_normalized() -> None:
    net = nn.Sequential(OLD(nn.Linear(3, 3)), nn.Linear(3, 2))
    new = convert_state_dict(net.state_dict(), "torch-new")
    assert "1.weight" in new and "0.parametrizations.weight.original0" in new




def test_a_plain_checkpoint_converted_to_wnorm_loads_into_the_applied_model_unchanged() -> None:
    # the padding row is zero: normalizing the Embedding (which apply leaves plain) along dim 0
    # would abort, and a ConvTranspose normalized along dim 0 is not apply's layout
    torch.manual_seed(0)
    source = ThreeWays().eval()
    with pytest.warns(UserWarning, match=r"convert to 'wnorm': 3 plain weight\(s\) "
                                         r"\['emb.weight', 'up.weight', 'out.weight'\] left plain"):
        sd = convert_state_dict(source.state_dict(), "wnorm")
    target = wnorm.apply(ThreeWays()).eval()
    for key in sd:  # no g or v on an axis (or a layer) that wnorm.apply does not use
        if key.endswith(("_g", "_v")):
            assert tuple(sd[key].shape) == tuple(target.state_dict()[key].shape), key
    load_state_dict(target, sd)
    x = torch.tensor([[0, 3, 0, 7, 9]])
    with torch.no_grad():
        assert torch.equal(target(x), source(x)) and bool(torch.isfinite(target(x)).all())


def test_dims_naming_each_weight_write_the_applied_models_own_layout() -> None:
    torch.manual_seed(0)
    source = ThreeWays().eval()
    sd = convert_state_dict(source.state_dict(), "wnorm", dim=THREE_WAYS_AXES)
    target = wnorm.apply(ThreeWays()).eval()
    target.load_state_dict(sd)  # PyTorch's own strict loader: exactly the model's keys and shapes
    x = torch.tensor([[0, 3, 0, 7, 9]])
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    # a mapping moves only the pairs it names; the others keep their axis
    moved = convert_state_dict(sd, "torch-old", dim={"out.weight": None})
    assert moved["out.weight_g"].shape == () and moved["up.weight_g"].shape == (1, 3, 1)
    with pytest.raises(WnormError, match=r"dim names 'emb', which is no weight of the state "
                                         r"dict; expected weight keys .*'emb.weight'"):
        convert_state_dict(source.state_dict(), "wnorm", dim={"emb": 0})
    with pytest.raises(WnormError, match=r"expected dim as a mapping of weight keys to an axis "
                                         r">= 0 or None .*got \{'out.weight': -1\}"):
        convert_state_dict(source.state_dict(), "wnorm", dim={"out.weight": -1})


def test_a_zero_row_to_normalize_is_refused_naming_the_key_and_how_to_keep_it_plain() -> None:
    sd = ThreeWays().state_dict()  # PyTorch's weight_norm default (dim 0 for every weight)
    with pytest.raises(WnormError, match=r"'emb.weight': expected a nonzero norm in every slice "
                                         r"along dim 0 .*indices \[0\].*NaN.*if 'emb.weight' is "
                                         r"to stay plain .*--dim KEY=AXIS"):
        convert_state_dict(sd, "torch-old")
    out = convert_state_dict(sd, "torch-old", dim={"up.weight": 0, "out.weight": 0})
    assert out["emb.weight"] is sd["emb.weight"] and "up.weight_g" in out


def test_convert_errors() -> None:
    with pytest.raises(WnormError, match=r"expected 'to' in .*got 'onnx'"):
        convert_state_dict({"w": torch.ones(1)}, "onnx")  # type: ignore[arg-type]
    with pytest.raises(WnormError, match=r"'0.weight': expected a nonzero norm in every slice "
                                         r"along dim 0"):
        convert_state_dict({"0.weight": torch.zeros(2, 2)}, "torch-old")
    with pytest.raises(WnormError, match=r"'a.weight_v': expected finite values"):
        convert_state_dict({"a.weight_g": torch.ones(2, 1),
                            "a.weight_v": torch.full((2, 2), float("nan"))}, "plain")


# --------------------------------------------------------------------------- size-1 axes grid
LAYERS = {
    "linear-1-in": lambda: nn.Linear(1, 3),
    "linear-1-out": lambda: nn.Linear(3, 1),
    "linear-1-1": lambda: nn.Linear(1, 1),
    "conv1d-k1": lambda: nn.Conv1d(3, 4, 1),
    "conv1d-1-in": lambda: nn.Conv1d(1, 4, 3),
    "convT-1-out": lambda: nn.ConvTranspose1d(3, 1, 2),
    "convT-1-in": lambda: nn.ConvTranspose1d(1, 3, 2),
    "convT-k1": lambda: nn.ConvTranspose1d(3, 3, 1),
    "conv2d-1x1": lambda: nn.Conv2d(2, 2, 1),
}


@pytest.mark.parametrize("layer", list(LAYERS), ids=list(LAYERS))
@pytest.mark.parametrize("api,src_dim", [(OLD, 0), (OLD, None), (NEW, 0), (NEW, None),
                                         (OLD, 1), ("wnorm", None)])
@pytest.mark.parametrize("dst_dim", ["default", None])
def test_ambiguous_shapes_load_with_same_outputs(layer, api, src_dim, dst_dim) -> None:
    torch.manual_seed(0)
    make = LAYERS[layer]
    if api == "wnorm":
        src = wnorm.weight_norm(make(), dim=src_dim)
    else:
        src = api(make(), dim=src_dim)
    src = scramble(src).eval()
    dst = wnorm.weight_norm(make()) if dst_dim == "default" else wnorm.weight_norm(
        make(), dim=None)
    load_state_dict(dst, src.state_dict())
    plain_src = make()  # the reference: the weights computed by hand from the file
    plain_src.load_state_dict(convert_state_dict(src.state_dict(), "plain"))
    shape = {nn.Linear: (2, make().weight.shape[1]), nn.Conv1d: (2, make().weight.shape[1], 5),
             nn.ConvTranspose1d: (2, make().weight.shape[0], 5),
             nn.Conv2d: (2, 2, 3, 3)}[type(make())]
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), plain_src(x), rtol=1e-5, atol=1e-6)
        if api != "wnorm":
            torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make", [lambda: nn.ConvTranspose1d(64, 32, 5),
                                  lambda: wnorm.weight_norm(nn.ConvTranspose1d(64, 32, 5))],
                         ids=["plain", "wnorm"])
def test_low_precision_checkpoint_into_float32_is_not_rounded_on_the_way(low, make) -> None:
    # torch's per-input-channel layout: the weight is computed, not copied (wnorm: dim 1)
    sd = scramble(OLD(nn.ConvTranspose1d(64, 32, 5))).to(low).state_dict()
    reference = OLD(nn.ConvTranspose1d(64, 32, 5))
    reference.load_state_dict(sd)  # torch: exact upcast, w computed in float32
    target = make()
    load_state_dict(target, sd)
    x = torch.randn(2, 64, 9)
    with torch.no_grad():  # (torch's old API computes its weight in the forward pass)
        torch.testing.assert_close(target(x), reference(x), rtol=1e-5, atol=1e-5)
    assert target.weight.dtype == torch.float32
    torch.testing.assert_close(target.weight, reference.weight, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- torch's own layout
@pytest.mark.parametrize("make,x", [
    (lambda: nn.ConvTranspose1d(4, 3, 5), torch.randn(2, 4, 7)),
    (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2), torch.randn(2, 4, 5, 5)),
    (lambda: nn.ConvTranspose1d(4, 1, 3), torch.randn(2, 4, 7)),  # one output channel: g (1,1,1)
], ids=["convT1d", "convT2d", "convT1d-1-out"])
@pytest.mark.parametrize("to,api", [("torch-old", OLD), ("torch-new", NEW)])
def test_dim_0_loads_into_torchs_default_weight_norm(make, x, to: str, api: Norm) -> None:
    source = scramble(wnorm.weight_norm(make())).eval()  # wnorm: per output channel (dim 1)
    sd = convert_state_dict(source.state_dict(), to, dim=0)
    target = api(make()).eval()  # PyTorch's default: dim 0, per input channel
    target.load_state_dict(sd)  # torch's own strict loader: keys and shapes are its layout
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-6)
    # and wnorm's loader takes it back (per output channel again), same outputs
    back = wnorm.weight_norm(make()).eval()
    load_state_dict(back, sd)
    with torch.no_grad():
        torch.testing.assert_close(back(x), source(x), rtol=1e-5, atol=1e-6)


def test_other_axes_are_kept_or_moved_by_dim_and_squeezed_g_gets_its_kept_dim_shape() -> None:
    source = scramble(wnorm.weight_norm(nn.Linear(3, 4), dim=1))  # g (1, 3)
    sd = dict(source.state_dict())
    for to in ("torch-old", "torch-new", "wnorm"):  # each pair on its own axis, bitwise
        kept = convert_state_dict(sd, to)
        assert [torch.equal(a, b) for a, b in zip(kept.values(), sd.values())] == [True] * 3
    old = convert_state_dict(sd, "torch-old", dim=0)  # moved: the same weight along dim 0
    assert old["weight_g"].shape == (4, 1)
    torch.testing.assert_close(old["weight_g"], old["weight_v"].norm(dim=1, keepdim=True))
    torch.testing.assert_close(old["weight_v"], source.weight.detach())
    squeezed = {"weight_g": torch.tensor([2.0, 3.0]), "weight_v": torch.randn(2, 3)}
    out = convert_state_dict(squeezed, "torch-new")
    assert out["parametrizations.weight.original0"].shape == (2, 1)
    assert torch.equal(out["parametrizations.weight.original0"].flatten(), squeezed["weight_g"])
    assert convert_state_dict(squeezed, "wnorm")["weight_g"].shape == (2,)  # wnorm reads it
    whole = {"weight_g": torch.tensor(2.0), "weight_v": torch.randn(2, 3)}  # torch's dim=None
    assert convert_state_dict(whole, "torch-old")["weight_g"].shape == ()


def test_a_zero_row_cannot_be_moved_to_dim_0() -> None:
    source = wnorm.weight_norm(nn.ConvTranspose1d(3, 2, 2))
    with torch.no_grad():
        source.weight_v[1] = 0.0  # input channel 1 is zero; every output channel is not
    convert_state_dict(source.state_dict(), "torch-old")  # kept along dim 1: fine
    with pytest.raises(WnormError, match=r"'weight_v': expected a nonzero norm in every slice "
                                         r"along dim 0"):
        convert_state_dict(source.state_dict(), "torch-old", dim=0)


# --------------------------------------------------------------------------- wrapper prefixes
def small(norm: Norm = plain) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(norm(nn.Conv1d(6, 4, 3)), nn.Tanh(), norm(nn.ConvTranspose1d(4, 2, 3)))


class Holder(nn.Module):
    """A model whose only child is named ``module`` (like a wrapper, but part of the model)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


@pytest.mark.parametrize("case", ["ddp-checkpoint", "compiled-checkpoint",
                                  "into-data-parallel", "into-compiled", "prefix-added"])
def test_wrapper_prefixes_are_read_past_and_wrapped_models_unwrapped(case: str) -> None:
    source = scramble(small(OLD)).eval()
    sd = dict(source.state_dict())
    target = wnorm.apply(small())
    inner = target
    if case == "ddp-checkpoint":
        sd = {"module." + k: v for k, v in sd.items()}
    elif case == "compiled-checkpoint":
        sd = dict(torch.compile(source).state_dict())  # '_orig_mod.' keys (nothing compiled)
        assert all(k.startswith("_orig_mod.") for k in sd)
    elif case == "into-data-parallel":
        target = nn.DataParallel(target)  # its keys carry 'module.', the checkpoint's do not
    elif case == "into-compiled":
        target = torch.compile(target)
    else:
        target = inner = Holder(target)  # its own keys start with 'module.'
    assert load_state_dict(target, sd) is target
    with torch.no_grad():
        torch.testing.assert_close(inner.eval()(X), source(X), rtol=1e-5, atol=1e-6)


def test_an_error_after_reading_past_a_prefix_says_so() -> None:
    sd = {"module." + k: v for k, v in small(OLD).state_dict().items()}
    sd["module.0.weight_v"] = torch.ones(4, 6, 2)
    with pytest.raises(WnormError, match=r"'0.weight_v': expected shape .* \(the state dict's "
                                         r"keys were read without their 'module.' prefix\)"):
        load_state_dict(wnorm.apply(small()), sd)
    del sd["module.0.weight_v"], sd["module.0.weight_g"]
    with pytest.raises(WnormError, match=r"missing keys \['0.weight_g', '0.weight_v'\] \(the "
                                         r"state dict's keys were read without their 'module.'"):
        load_state_dict(wnorm.apply(small()), sd)


# --------------------------------------------------------------------------- checked as written
class SkipsWeight(nn.Linear):
    """A Linear whose own loader takes its bias and drops its weight key (a module that reads
    its keys its own way and gets it wrong)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        state_dict.pop(prefix + "weight", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LeavesOut(nn.Linear):
    """A Linear whose state_dict leaves its weight out: no state dict can set it."""

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        del destination[prefix + "weight"]


class Fails(nn.Linear):
    def _load_from_state_dict(self, *args, **kwargs) -> None:
        raise RuntimeError("disk on fire")


def loaded_or_refused(model: nn.Module, sd: dict, expected: dict[str, torch.Tensor]) -> bool:
    """load_state_dict's contract: it returns with every value in place, or raises a WnormError
    and leaves the model as it was. True when it loaded, False when it refused."""
    before = snapshot(model)
    try:
        load_state_dict(model, sd)
    except WnormError:
        assert same_state(snapshot(model), before)
        return False
    now = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(now[k], v), f"load_state_dict returned but '{k}' was not loaded"
    return True


def test_a_module_that_drops_its_weight_key_is_an_error_and_the_model_is_restored() -> None:
    model = nn.Sequential(scramble(nn.Linear(3, 3), seed=1), SkipsWeight(3, 2))
    sd = dict(scramble(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), seed=2).state_dict())
    before = snapshot(model)
    with pytest.raises(WnormError, match=r"did not take \['1.weight'\] as given.*'1' "
                                         r"\(SkipsWeight\): _load_from_state_dict of "
                                         r"[\w.]*SkipsWeight; the model is as it was"):
        load_state_dict(model, sd)
    assert same_state(snapshot(model), before)  # 0.* and 1.bias had loaded: put back
    with pytest.warns(UserWarning, match=r"did not take \['1.weight'\].*strict=False: the rest"):
        load_state_dict(model, sd, strict=False)
    assert torch.equal(model[0].weight, sd["0.weight"]) and torch.equal(model[1].bias,
                                                                        sd["1.bias"])
    assert torch.equal(model[1].weight, before["1.weight"])


def test_a_parameter_the_state_dict_leaves_out_is_an_error_before_loading() -> None:
    model = nn.Sequential(nn.Linear(3, 3), LeavesOut(3, 2))
    sd = {k: v + 1 for k, v in model.state_dict().items()}
    before = snapshot(model)
    with pytest.raises(WnormError, match=r"parameters/buffers \['1.weight'\] that the model's own "
                                         r"state_dict leaves out.*\('1' \(LeavesOut\): "
                                         r"_save_to_state_dict of [\w.]*LeavesOut\)"):
        load_state_dict(model, sd)
    assert torch.equal(model[0].weight, before["0.weight"])  # nothing was touched
    with pytest.warns(UserWarning, match=r"not loaded: parameters/buffers \['1.weight'\]"):
        load_state_dict(model, sd, strict=False)
    assert torch.equal(model[0].weight, sd["0.weight"])


def test_an_exception_from_the_models_loader_leaves_the_model_as_it_was() -> None:
    model = nn.Sequential(nn.Linear(3, 3), Fails(3, 2))
    sd = {k: v + 1 for k, v in model.state_dict().items()}
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="disk on fire"):
        load_state_dict(model, sd)
    assert same_state(snapshot(model), before)


def test_pytorchs_renaming_hook_left_after_removal_cannot_drop_g_and_v_silently() -> None:
    # parametrizations.weight_norm registers a load_state_dict pre-hook that renames '_g'/'_v'
    # keys; remove_parametrizations leaves it behind, and wnorm's g and v then use those names
    conv = parametrizations.weight_norm(nn.Conv1d(2, 3, 3))
    nn.utils.parametrize.remove_parametrizations(conv, "weight")
    model = wnorm.weight_norm(conv)
    source = scramble(wnorm.weight_norm(nn.Conv1d(2, 3, 3)), seed=7)
    expected = {k: v.detach() for k, v in source.state_dict().items()}
    loaded_or_refused(model, source.state_dict(), expected)


def test_torch_geometric_linear_is_loaded_or_refused_never_skipped() -> None:
    dense = pytest.importorskip("torch_geometric.nn.dense.linear")
    source = scramble(dense.Linear(3, 2), seed=5)
    model = wnorm.weight_norm(scramble(dense.Linear(3, 2), seed=6))
    if loaded_or_refused(model, source.state_dict(), {}):
        torch.testing.assert_close(model.weight, source.weight, rtol=1e-6, atol=1e-7)
    back = scramble(dense.Linear(3, 2), seed=8)  # and the other way: into PyG's plain Linear
    expected = {"weight": model.weight.detach().clone(), "bias": model.bias.detach().clone()}
    if loaded_or_refused(back, model.state_dict(), {}):
        torch.testing.assert_close(back.weight, expected["weight"], rtol=1e-6, atol=1e-7)
        assert torch.equal(back.bias, expected["bias"])


# --------------------------------------------------------------------------- each pair's axis
def pos_conv(norm: Callable[..., nn.Module] = NEW, dim: int | None = 2) -> nn.Conv1d:
    """Wav2Vec2/HuBERT's positional conv: grouped, weight-normalized along dim 2 (the kernel)."""
    return scramble(norm(nn.Conv1d(8, 8, 5, padding=2, groups=2), name="weight", dim=dim))


@pytest.mark.parametrize("to,api", [("torch-old", OLD), ("torch-new", NEW), ("wnorm", OLD)])
def test_torch_formats_keep_dim_2_and_the_models_own_loader_reads_them(to: str, api) -> None:
    source = pos_conv().eval()
    sd = convert_state_dict(source.state_dict(), to)
    g = sd["weight_g" if to != "torch-new" else "parametrizations.weight.original0"]
    assert g.shape == (1, 1, 5) and torch.equal(g, source.parametrizations.weight.original0)
    target = pos_conv(api, dim=2).eval()
    target.load_state_dict(sd)  # PyTorch's own strict loader
    x = torch.randn(2, 8, 11)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("start", [OLD, NEW, "wnorm"], ids=["torch-old", "torch-new", "wnorm"])
def test_dim_2_state_dicts_round_trip_bitwise(start) -> None:
    if start == "wnorm":
        source = scramble(wnorm.weight_norm(nn.Conv1d(8, 8, 5, groups=2), dim=2))
    else:
        source = pos_conv(start)
    sd = dict(source.state_dict())
    out = sd
    for to in ("wnorm", "torch-new", "torch-old", "torch-new", "wnorm", "torch-old"):
        out = convert_state_dict(out, to)
    back = convert_state_dict(out, "torch-new" if start is NEW else "torch-old")
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("dim", [0, 1, None])
@pytest.mark.parametrize("to,api", [("torch-old", OLD), ("torch-new", NEW)])
def test_dim_moves_every_pair_to_the_axis_asked_for(dim, to: str, api) -> None:
    source = pos_conv().eval()
    sd = convert_state_dict(source.state_dict(), to, dim=dim)
    target = pos_conv(api, dim=dim).eval()
    target.load_state_dict(sd)
    x = torch.randn(2, 8, 11)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-6)
    wn = wnorm.weight_norm(nn.Conv1d(8, 8, 5, padding=2, groups=2), dim=2).eval()
    load_state_dict(wn, sd)  # and back onto dim 2
    with torch.no_grad():
        torch.testing.assert_close(wn(x), source(x), rtol=1e-5, atol=1e-6)


def test_dim_normalizes_a_plain_state_dict_along_the_axis_asked_for() -> None:
    plain_sd = scramble(nn.Conv1d(3, 4, 5)).state_dict()
    out = convert_state_dict(plain_sd, "torch-old", dim=2)
    assert out["weight_g"].shape == (1, 1, 5)
    torch.testing.assert_close(out["weight_g"], plain_sd["weight"].norm(dim=(0, 1), keepdim=True))
    assert convert_state_dict(plain_sd, "wnorm", dim=None)["weight_g"].shape == ()


@pytest.mark.parametrize("to,dim,match", [
    ("torch-old", 3, r"'weight_v': dim 3 is out of range for a tensor of shape \(8, 4, 5\)"),
    ("torch-old", -1, r"expected dim 'keep', None .* or an axis >= 0; got -1"),
    ("torch-new", "2", r"expected dim 'keep', None .* got '2'"),
    ("plain", 0, r"dim=0 chooses the axis of g and v; 'plain' writes w alone"),
])
def test_bad_dims_are_errors_naming_what_was_expected(to: str, dim, match: str) -> None:
    with pytest.raises(WnormError, match=match):
        convert_state_dict(pos_conv(OLD).state_dict(), to, dim=dim)


def test_a_model_on_the_meta_device_is_an_error_not_a_no_op() -> None:
    # torch's own load_state_dict only warns: copying into a meta tensor does nothing
    model = nn.Sequential(nn.Linear(3, 2, device="meta"))
    with pytest.raises(WnormError, match=r"did not take \['0.weight', '0.bias'\].*on the meta "
                                         r"device.*to_empty"), pytest.warns(UserWarning):
        load_state_dict(model, nn.Sequential(nn.Linear(3, 2)).state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("make, dim", [
    (lambda: nn.Linear(37, 5), 0), (lambda: nn.Conv1d(3, 4, 5), 0),
    (lambda: nn.ConvTranspose1d(4, 3, 5), 1), (lambda: nn.Linear(6, 7), None),
], ids=["linear", "conv", "convT", "linear-dim-None"])
@pytest.mark.parametrize("how", ["load", "convert"])
def test_a_plain_weight_comes_back_bit_for_bit_through_a_normalized_layer(make, dim, dtype, how):
    # g = ||w|| must be the norm the layer's forward divides by, or w moves by an ulp
    torch.manual_seed(0)
    source = scramble(make()).to(dtype)
    sd = source.state_dict()
    if how == "convert":
        sd = convert_state_dict(sd, "wnorm", dim=dim)
    target = wnorm.weight_norm(make().to(dtype), dim=dim)
    load_state_dict(target, sd)
    assert torch.equal(target.weight, source.weight)


@pytest.mark.parametrize("to, api", [("torch-new", NEW), ("torch-old", OLD)])
@pytest.mark.parametrize("make, dim", [
    (lambda: nn.Linear(37, 5), 0), (lambda: nn.ConvTranspose1d(4, 3, 5), 1),
], ids=["linear", "convT"])
def test_a_plain_weight_converted_for_pytorchs_weight_norm_comes_back_bit_for_bit(
        make, dim, to, api):
    torch.manual_seed(0)
    source = scramble(make())
    target = api(make(), dim=dim)
    target.load_state_dict(convert_state_dict(source.state_dict(), to, dim=dim))
    if api is OLD:
        target(torch.randn(2, *(37,) if isinstance(source, nn.Linear) else (4, 9)))
    assert torch.equal(target.weight, source.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make, dim", [
    (lambda: nn.Linear(37, 5), 0), (lambda: nn.ConvTranspose1d(4, 3, 5), 1),
    (lambda: nn.Conv1d(6, 6, 5, groups=2), 2), (lambda: nn.Linear(6, 7), None),
], ids=["linear", "convT", "conv-dim-2", "linear-dim-None"])
@pytest.mark.parametrize("api", [NEW, OLD, wnorm.weight_norm], ids=["torch-new", "torch-old",
                                                                     "wnorm"])
def test_a_pair_converted_to_plain_is_the_weight_the_layer_computes_bit_for_bit(
        make, dim, dtype, api):
    # the same bits as the model's own forward and as fold, not a float64 w rounded once
    torch.manual_seed(0)
    layer = scramble(api(make().to(dtype), dim=dim))
    sd = convert_state_dict(layer.state_dict(), "plain")
    assert torch.equal(sd["weight"], wnorm.fold(layer).weight)


def test_a_refused_strict_load_puts_extra_state_back_too():
    class Scaler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = 1.0

        def get_extra_state(self):
            return {"scale": self.scale}

        def set_extra_state(self, state) -> None:
            self.scale = state["scale"]

    class Doubling(nn.Linear):  # its loader does not take its weight as given
        def _load_from_state_dict(self, sd, prefix, *args, **kwargs):
            super()._load_from_state_dict(sd, prefix, *args, **kwargs)
            with torch.no_grad():
                self.weight.mul_(2)

    model = nn.Sequential(Scaler(), wnorm.weight_norm(nn.Linear(3, 3)), Doubling(3, 3))
    sd = {k: v.clone() if isinstance(v, torch.Tensor) else v
          for k, v in model.state_dict().items()}
    sd["0._extra_state"] = {"scale": 1000.0}
    with pytest.raises(WnormError, match="the model is as it was"):
        load_state_dict(model, sd)
    assert model[0].scale == 1.0


def test_a_lazy_module_is_an_error_naming_the_key_before_anything_loads():
    model = nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 2))
    sd = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).state_dict()
    with pytest.raises(WnormError, match=r"'0.weight' of the model is not initialized yet"):
        load_state_dict(model, sd)


def _mlp(method):
    torch.manual_seed(1)
    return wnorm.apply(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), method=method)


@pytest.mark.filterwarnings("ignore:.*nothing puts it back on its sphere")
@pytest.mark.parametrize("method", [wnorm.centered_weight_norm, wnorm.balanced_weight_norm])
def test_a_checkpoint_of_another_map_is_refused_not_loaded_into_other_outputs(method):
    # a weight norm's (g, v) have a centered model's shapes: they loaded without a word, and
    # the outputs moved by up to 0.44
    src = _mlp(wnorm.weight_norm)
    sd = src.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)  # the map kind travels with the file
    buf.seek(0)
    for saved in (sd, torch.load(buf)):
        dst = _mlp(method)
        before = copy.deepcopy(dst.state_dict())
        with pytest.raises(RuntimeError, match=r"0 \(Linear\): '0\.weight' was saved by "
                           r"wnorm\.weight_norm, the model's is wnorm\." + method.__name__):
            dst.load_state_dict(saved)
        with pytest.raises(WnormError, match=r"'0\.weight' was saved by wnorm\.weight_norm.*"
                                             r"\(the model is as it was\)"):
            wnorm.load_state_dict(dst, saved)
        assert all(torch.equal(v, dst.state_dict()[k]) for k, v in before.items())
    # the other way round, into a plain model or through convert: read as a weight norm's
    back = _mlp(method).state_dict()
    with pytest.raises(WnormError, match=r"'0\.weight' was saved by wnorm\." + method.__name__
                       + r", the model's is plain or PyTorch's weight norm"):
        wnorm.load_state_dict(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), back)
    with pytest.raises(WnormError, match=r"^'0\.weight' was saved by wnorm\." + method.__name__
                       + r": converting reads every \(g, v\) as a weight norm's"):
        wnorm.convert_state_dict(back, "plain")


SAME_KIND_OTHER_WEIGHT = {
    "standardized dim 0 -> None": (lambda m: wnorm.weight_standardization(m),
                                   lambda m: wnorm.weight_standardization(m, dim=None)),
    "standardized dim 0 -> 1": (lambda m: wnorm.weight_standardization(m),
                                lambda m: wnorm.weight_standardization(m, dim=1)),
    "standardized eps": (lambda m: wnorm.weight_standardization(m, eps=1e-10),
                         lambda m: wnorm.weight_standardization(m, eps=1e-3)),
    "fixed gain": (lambda m: wnorm.forced_weight_norm(m, gain=2.0),
                   lambda m: wnorm.forced_weight_norm(m, gain=1.0)),
    "fixed gain dim": (lambda m: wnorm.forced_weight_norm(m, gain=1.0),
                       lambda m: wnorm.forced_weight_norm(m, gain=1.0, dim=None)),
}


@pytest.mark.filterwarnings("ignore:.*nothing puts it back on its sphere")
@pytest.mark.parametrize("case", list(SAME_KIND_OTHER_WEIGHT))
def test_a_map_without_g_saved_with_other_settings_is_refused(case):
    # no g whose shape tells the axis: a weight standardization along dim 0, or with another
    # eps, or a fixed gain of 2, loaded into one of other settings with every key matching, and
    # the outputs moved by up to 3 (a gain of 2 read as 1 halved them)
    make_src, make_dst = SAME_KIND_OTHER_WEIGHT[case]
    torch.manual_seed(0)
    sd = make_src(nn.Conv2d(4, 4, 3)).state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    for saved in (sd, torch.load(buf)):
        dst = make_dst(nn.Conv2d(4, 4, 3))
        before = copy.deepcopy(dst.state_dict())
        with pytest.raises(RuntimeError, match=r"'weight' was saved by wnorm\.\w+\(dim=.*\), "
                                               r"the model's is wnorm\.\w+\(dim="):
            dst.load_state_dict(saved)
        with pytest.raises(WnormError, match=r"\(the model is as it was\)"):
            wnorm.load_state_dict(dst, saved)
        assert all(torch.equal(v, dst.state_dict()[k]) for k, v in before.items())
    same = make_src(nn.Conv2d(4, 4, 3))  # the same settings load, with the same outputs
    same.load_state_dict(sd)
    x = torch.randn(2, 4, 6, 6)
    src = make_src(nn.Conv2d(4, 4, 3))
    src.load_state_dict(sd)
    assert torch.equal(same(x), src(x))


@pytest.mark.filterwarnings("ignore:.*nothing puts it back on its sphere")
def test_a_checkpoint_of_a_map_with_the_same_weight_loads_to_identical_outputs():
    # a forced weight norm computes w = g v/||v|| as weight norm does; a checkpoint without
    # wnorm's metadata (PyTorch's, a plain dict) is read as before
    src, x = _mlp(wnorm.weight_norm), torch.randn(5, 4)
    for sd in (src.state_dict(), dict(src.state_dict())):
        for dst in (_mlp(wnorm.forced_weight_norm), _mlp(wnorm.weight_norm)):
            dst.load_state_dict(sd)
            torch.testing.assert_close(dst(x), src(x), rtol=0, atol=1e-6)
    dst = _mlp(wnorm.centered_weight_norm)
    dst.load_state_dict(dict(src.state_dict()))  # no metadata: nothing to tell it by
    ddp_like = nn.Sequential()
    ddp_like.module = _mlp(wnorm.centered_weight_norm)  # keys with a wrapper prefix
    with pytest.raises(WnormError, match=r"'module\.0\.weight' was saved by wnorm\.centered"):
        wnorm.load_state_dict(src, ddp_like.state_dict())


def test_load_from_state_dict_takes_pytorchs_keyword_names():
    # Lightning's DeepSpeed restore calls it with PyTorch's keywords: a renamed parameter was a
    # TypeError
    src, dst = _mlp(wnorm.weight_norm), _mlp(wnorm.weight_norm)
    with torch.no_grad():
        src[0].weight_g.mul_(2)
    missing, unexpected, errors = [], [], []
    dst[0]._load_from_state_dict(src[0].state_dict(), "", {}, True, missing_keys=missing,
                                 unexpected_keys=unexpected, error_msgs=errors)
    assert (missing, unexpected, errors) == ([], [], [])
    assert torch.equal(dst[0].weight_g, src[0].weight_g)



def test_a_bias_named_in_dims_is_refused_not_split_into_g_and_v():
    # '0.bias' became bias_g/bias_v, a layout no wnorm model has (found by review)
    sd = nn.Sequential(nn.Linear(3, 2)).state_dict()
    with pytest.raises(WnormError, match=r"dim names '0\.bias', which is no weight of the state "
                                         r"dict; expected weight keys .*\['0\.weight'\]"):
        convert_state_dict(sd, "wnorm", dim={"0.bias": 0})



def test_dims_may_name_a_weight_of_any_name_wnorm_normalizes():
    # the check that refuses a bias refused in_proj_weight and a custom 2-D W too, which
    # wnorm.weight_norm(module, name) normalizes (found by review)
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2)
            self.W = nn.Parameter(torch.randn(4, 3))

    torch.manual_seed(0)
    source = M()
    out = convert_state_dict(source.state_dict(), "wnorm", dim={"mha.in_proj_weight": 0, "W": 0})
    target = M()
    wnorm.weight_norm(target.mha, "in_proj_weight")
    wnorm.weight_norm(target, "W")
    target.load_state_dict(out)
    torch.testing.assert_close(target.W, source.W)
    torch.testing.assert_close(target.mha.in_proj_weight, source.mha.in_proj_weight)


class _TiedLM(nn.Module):
    """An embedding and an LM head sharing one weight (GPT-2's habit)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.wte(ids))))


@pytest.mark.parametrize("normalized", [True, False])
def test_a_tie_written_once_loads_through_either_name(normalized: bool) -> None:
    # safetensors' save_model and transformers' save_pretrained write shared tensors once;
    # the other name of the tie was reported missing and the load refused
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = _TiedLM()
        return wnorm.apply(m, types=(nn.Linear, nn.Embedding)) if normalized else m

    src, ids = make(0), torch.randint(0, 11, (3, 5))
    full = src.state_dict()
    for drop in ("head.", "wte."):
        sd = {k: v for k, v in full.items() if not k.startswith(drop)}
        dst = make(1)
        load_state_dict(dst, sd)  # strict
        assert torch.equal(dst(ids), src(ids))
    # a weight that is not tied is still missing
    sd = {k: v for k, v in full.items() if not k.startswith("mid.")}
    with pytest.raises(wnorm.WnormError, match=r"missing keys \['mid\."):
        load_state_dict(make(1), sd)


def test_a_tied_transformers_model_reloads_from_its_save_pretrained_file(tmp_path) -> None:
    tf = pytest.importorskip("transformers")
    st = pytest.importorskip("safetensors.torch")

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        cfg = tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16,
                            bos_token_id=0, eos_token_id=0)
        return wnorm.apply(tf.GPT2LMHeadModel(cfg).eval(),
                           types=(*wnorm.DEFAULT_TYPES, nn.Embedding))

    model, ids = make(0), torch.randint(0, 40, (2, 7))
    model.save_pretrained(tmp_path)
    sd = st.load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight_v" not in sd  # written once, under the embedding's name
    fresh = make(1)
    load_state_dict(fresh, sd)
    assert torch.equal(fresh(ids).logits, model(ids).logits)


# ------------------------------------------------- PyTorch's own load_state_dict, other layouts
def _trained_stock_conv() -> tuple[nn.Module, nn.Module]:
    """A Conv1d under PyTorch's parametrized weight norm (as transformers builds its audio
    models) and a 'fine-tuned' copy of it."""
    torch.manual_seed(0)
    stock = parametrizations.weight_norm(nn.Conv1d(2, 4, 3))
    trained = copy.deepcopy(stock)
    with torch.no_grad():
        trained.parametrizations.weight.original1.mul_(2).add_(0.1)
        trained.parametrizations.weight.original0.mul_(1.5)
    return stock, trained


@pytest.mark.parametrize("strict", [True, False])
def test_an_adopted_layer_reads_its_own_pytorch_checkpoints_with_pytorchs_loader(strict) -> None:
    # adoption removed PyTorch's renaming hook: strict=True raised PyTorch's missing/unexpected
    # keys error, and strict=False (transformers' Trainer) left the layer as it was, silently
    stock, trained = _trained_stock_conv()
    layer = wnorm.weight_norm(copy.deepcopy(stock))
    result = layer.load_state_dict(trained.state_dict(), strict=strict)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 2, 9)
    assert torch.equal(layer(x), trained(x))


def test_pytorchs_loader_reads_a_plain_weight_into_a_weight_normalized_layer() -> None:
    _, trained = _trained_stock_conv()
    plain = {"weight": trained.weight.detach().clone(), "bias": trained.bias.detach().clone()}
    layer = wnorm.weight_norm(nn.Conv1d(2, 4, 3))
    result = layer.load_state_dict(plain, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 2, 9)
    assert torch.equal(layer(x), trained(x))


def test_pytorchs_loader_moves_a_pair_saved_along_another_axis() -> None:
    torch.manual_seed(0)
    other = parametrizations.weight_norm(nn.Linear(3, 5), dim=1)
    layer = wnorm.weight_norm(nn.Linear(3, 5))  # dim 0
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer.weight, other.weight, rtol=1e-6, atol=1e-7)


def test_pytorchs_loader_refuses_a_plain_zero_row_and_other_maps_naming_the_layer() -> None:
    w = torch.randn(4, 3)
    w[2] = 0
    layer = wnorm.weight_norm(nn.Linear(3, 4))
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(RuntimeError, match=r"Linear: 'weight': expected a nonzero norm in every "
                                           r"slice .*\(indices \[2\]\).*nothing of this layer"):
        layer.load_state_dict({"weight": w, "bias": torch.zeros(4)})
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())
    centered = wnorm.centered_weight_norm(nn.Linear(3, 4))
    with pytest.raises(RuntimeError, match=r"holds its 'weight' as 'weight', which a "
                                           r"wnorm.centered_weight_norm weight cannot be loaded"):
        centered.load_state_dict({"weight": torch.randn(4, 3), "bias": torch.zeros(4)},
                                 strict=False)


@pytest.mark.parametrize("scale", [1e-24, 1e20], ids=["squares-underflow", "squares-overflow"])
@pytest.mark.parametrize("case", ["pair, wnorm", "plain, wnorm", "plain, module"])
def test_a_row_whose_norm_float32_cannot_compute_is_refused_at_load(case, scale) -> None:
    # the loaders checked ||v|| in float64, where these rows are fine, but the layer takes it
    # in float32: the row's sum of squares is 0 or inf there, and the row loaded as inf, NaN
    # or (huge) a silently dead 0
    torch.manual_seed(0)
    layout, loader = case.split(", ")
    src = wnorm.weight_norm(nn.Linear(64, 4))
    sd = {k: t.detach().clone() for k, t in src.state_dict().items()}
    sd["weight_v"][1].fill_(scale)
    if layout == "plain":
        sd = {"weight": sd.pop("weight_v"), "bias": sd["bias"]}
    key = "weight_v" if layout == "pair" else "weight"
    layer = wnorm.weight_norm(nn.Linear(64, 4))
    before = copy.deepcopy(layer.state_dict())
    want = (rf"'{key}': 1 slices along dim 0 \(indices \[1\]\) have norms that torch.float32 "
            rf"cannot compute: .*largest \|entry\| there {re.escape(f'{scale:.3g}')}")
    with pytest.raises(WnormError if loader == "wnorm" else RuntimeError, match=want):
        load_state_dict(layer, sd) if loader == "wnorm" else layer.load_state_dict(sd)
    assert all(torch.equal(layer.state_dict()[k], t) for k, t in before.items())


@pytest.mark.parametrize("method", [wnorm.centered_weight_norm,
                                    lambda m: wnorm.forced_weight_norm(m, gain=1.0),
                                    wnorm.weight_norm],
                         ids=["centered", "forced-fixed-gain", "weight-norm"])
@pytest.mark.parametrize("bad", ["tiny row", "zero row", "inf g"])
@pytest.mark.parametrize("loader", ["wnorm", "module"])
def test_both_loaders_refuse_what_any_map_would_compute_as_nan_or_inf(method, bad,
                                                                      loader) -> None:
    # a centered or fixed-gain row too small for float32 loaded as inf through
    # wnorm.load_state_dict (its checks before the load covered weight norm's map only), and
    # the model's own loader took any of these in wnorm's layout
    torch.manual_seed(0)
    sd = {k: t.detach().clone() for k, t in method(nn.Linear(64, 4)).state_dict().items()}
    if bad == "inf g":
        if "weight_g" not in sd:
            pytest.skip("a fixed-gain map has no g")
        sd["weight_g"][1] = float("inf")
    else:
        sd["weight_v"][1] = torch.linspace(-1, 1, 64) * (1e-25 if bad == "tiny row" else 0)
    layer = method(nn.Linear(64, 4))
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(WnormError if loader == "wnorm" else RuntimeError,
                       match=r"'weight_[gv]'|rows \[1\]"):
        load_state_dict(layer, sd) if loader == "wnorm" else layer.load_state_dict(sd)
    assert all(torch.equal(layer.state_dict()[k], t) for k, t in before.items())


def test_the_module_loaders_check_reaches_a_meta_model_assigned_and_mixes_no_dtypes() -> None:
    # a model built on the meta device and loaded with assign=True (the mmap path of large
    # models) took a zero row of v; a bfloat16 g given alone with assign=True made the check
    # itself fail with a bare dtype error naming nothing
    sd = {k: t.detach().clone() for k, t in wnorm.weight_norm(nn.Linear(8, 3)).state_dict().items()}
    sd["weight_v"][1] = 0
    with torch.device("meta"):
        meta = wnorm.weight_norm(nn.Linear(8, 3))
    with pytest.raises(RuntimeError, match=r"Linear: 'weight_v' has 1 slices along dim 0 "
                                           r"\(indices \[1\]\) whose norms torch\.float32 "
                                           r"computes as 0, inf or NaN"):
        meta.load_state_dict(sd, assign=True)
    layer = wnorm.weight_norm(nn.Linear(8, 3))
    g = layer.weight_g.detach().bfloat16()
    layer.load_state_dict({"weight_g": g}, strict=False, assign=True)
    assert layer.weight_g.dtype == torch.bfloat16


@pytest.mark.parametrize("loader", ["module", "wnorm"])
def test_the_load_check_takes_the_norms_as_the_layer_will(loader) -> None:
    # in the layer's dtype after the load, unrounded: a float16 layer whose rows' norms are
    # past 65504 (computed in float32, fine) loads its own checkpoint; a float64 checkpoint
    # row of 1e-24 entries is refused by a float32 layer and taken by a float64 one
    load = (lambda m, sd: load_state_dict(m, sd)) if loader == "wnorm" else (
        lambda m, sd: m.load_state_dict(sd))
    torch.manual_seed(0)
    half = wnorm.weight_norm(nn.Linear(64, 4)).half()
    with torch.no_grad():
        half.weight_v.fill_(2e4)  # norms 1.6e5 > 65504
        half.weight_g.fill_(1.0)
    x = torch.randn(2, 64).half()
    want = half(x)
    twin = wnorm.weight_norm(nn.Linear(64, 4)).half()
    load(twin, half.state_dict())
    assert torch.equal(twin(x), want) and torch.isfinite(want).all()
    src = nn.utils.parametrizations.weight_norm(nn.Linear(64, 4).double())
    with torch.no_grad():
        src.parametrizations.weight.original1[1].fill_(1e-24)
    sd = src.state_dict()
    with pytest.raises(WnormError if loader == "wnorm" else RuntimeError,
                       match=r"'parametrizations\.weight\.original1': 1 slices along dim 0 "
                             r"\(indices \[1\]\) have norms that torch\.float32 cannot"):
        load(wnorm.weight_norm(nn.Linear(64, 4)), sd)
    wide = wnorm.weight_norm(nn.Linear(64, 4).double())
    load(wide, sd)
    assert torch.isfinite(wide(torch.randn(2, 64, dtype=torch.float64))).all()


@pytest.mark.parametrize("method", [wnorm.centered_weight_norm,
                                    lambda m: wnorm.forced_weight_norm(m, gain=1.0)],
                         ids=["centered", "forced-fixed-gain"])
def test_a_plain_checkpoint_into_another_maps_layer_says_why_it_cannot_load(method) -> None:
    # it read only "expected the model's keys (in any weight-norm layout)", which every
    # layout of the file seemed to contradict
    model = nn.Sequential(method(nn.Linear(3, 4)))
    sd = nn.Sequential(nn.Linear(3, 4)).state_dict()
    name = METHODS[model[0]._wn["weight"].kind]
    with pytest.raises(WnormError, match=rf"the model's '0.weight' is a wnorm.{name} weight, "
                                         r"which cannot be loaded from '0.weight'"):
        load_state_dict(model, sd)


@pytest.mark.filterwarnings("ignore:.*nothing puts it back on its sphere")
@pytest.mark.parametrize("layout", ["plain", "torch-old", "torch-new"])
@pytest.mark.parametrize("loader", ["module", "wnorm"])
def test_any_layout_loads_into_a_forced_weight_norm_with_v_on_its_sphere(layout, loader):
    # a learned-g forced weight norm is weight norm's map: PyTorch's old-API pair loaded
    # (its keys are wnorm's), while the new-API pair and a plain weight were refused, saying
    # its (g, v) came only from a checkpoint of the same method
    torch.manual_seed(0)
    src = nn.Linear(6, 4)
    if layout == "torch-old":
        src = torch.nn.utils.weight_norm(src)
    elif layout == "torch-new":
        src = parametrizations.weight_norm(src)
    dst = wnorm.forced_weight_norm(nn.Linear(6, 4))
    if loader == "module":
        dst.load_state_dict(src.state_dict())
    else:
        load_state_dict(dst, src.state_dict())
    x = torch.randn(3, 6)
    torch.testing.assert_close(dst(x), src(x), rtol=1e-6, atol=1e-6)
    if layout != "torch-old":  # read as a weight, split onto the sphere of radius sqrt(6)
        torch.testing.assert_close(dst.weight_v.norm(dim=1), torch.full((4,), 6 ** 0.5))


@pytest.mark.parametrize("layout", ["plain", "torch-new"])
def test_pytorchs_loader_with_assign_keeps_the_checkpoints_dtype_and_device(layout) -> None:
    # (g, v) were cast to the model's float32 while the bias took the checkpoint's bfloat16:
    # the forward then failed on mixed dtypes; a meta checkpoint raised from .item()
    torch.manual_seed(0)
    src = nn.Linear(3, 4)
    if layout == "torch-new":
        src = parametrizations.weight_norm(src)
    src = src.to(torch.bfloat16)
    with torch.device("meta"):
        layer = wnorm.weight_norm(nn.Linear(3, 4))
    layer.load_state_dict(src.state_dict(), assign=True)
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), src(x))
    with torch.device("meta"):
        meta_src, meta_layer = nn.Linear(3, 4), wnorm.weight_norm(nn.Linear(3, 4))
    meta_layer.load_state_dict(meta_src.state_dict(), assign=True)
    assert meta_layer.weight_v.is_meta and meta_layer.weight_g.shape == (4, 1)


def test_pytorchs_loader_takes_each_half_of_a_pair_split_across_shards() -> None:
    # a sharded checkpoint (each shard loaded with strict=False, as transformers' Trainer
    # resumes) can split original0 from original1: neither loaded, without a word
    stock, trained = _trained_stock_conv()
    layer = wnorm.weight_norm(copy.deepcopy(stock))
    sd = trained.state_dict()
    g_key, v_key = "parametrizations.weight.original0", "parametrizations.weight.original1"
    first = layer.load_state_dict({g_key: sd[g_key], "bias": sd["bias"]}, strict=False)
    second = layer.load_state_dict({v_key: sd[v_key]}, strict=False)
    assert not first.unexpected_keys and not second.unexpected_keys
    x = torch.randn(2, 2, 9)
    assert torch.equal(layer(x), trained(x))


def test_convert_with_its_arguments_swapped_names_types_not_the_whole_state_dict():
    sd = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)]).state_dict()
    with pytest.raises(WnormError) as raised:
        convert_state_dict("plain", sd)  # type: ignore[arg-type]
    message = str(raised.value)
    assert "got OrderedDict (a state dict? the arguments are (state_dict, to))" in message
    assert len(message) < 200  # it held every tensor: 9,189 characters here


@pytest.mark.parametrize("strict", [None, 0, "False"])
def test_strict_must_be_a_bool(strict):
    # None and 0 loaded non-strictly without being asked
    layer = wnorm.weight_norm(nn.Linear(3, 2))
    with pytest.raises(WnormError, match=r"strict must be True or False"):
        load_state_dict(layer, nn.Linear(3, 2).state_dict(), strict=strict)
