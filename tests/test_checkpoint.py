"""Checkpoints from PyTorch's two weight-norm APIs, plain models and wnorm load and give the same
outputs; conversions round-trip; every bad input is a WnormError and leaves the model as it was."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from conftest import normalized_weights

import wnorm
from wnorm import WnormError
from wnorm.checkpoint import (
    FORMATS,
    convert_checkpoint,
    convert_state_dict,
    find_state_dicts,
    incompatible_keys,
    load_checkpoint,
    load_state_dict,
    save_checkpoint,
)

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
    for _, module, pname, dim in normalized_weights(target):
        w = getattr(module, pname).detach()
        axes = [d for d in range(w.dim()) if d != dim]
        g = getattr(module, pname + "_g").detach()
        torch.testing.assert_close(g, w.norm(dim=axes, keepdim=True), rtol=1e-5, atol=1e-6)
    assert [d for _, m, _, d in normalized_weights(target) if
            isinstance(m, nn.ConvTranspose1d)] == [1, 1]


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
    assert incompatible_keys(model, sd) == (["bias"], ["extra"])
    with pytest.warns(UserWarning, match=r"missing keys \['bias'\], unexpected keys \['extra'\]"):
        assert load_state_dict(model, sd, strict=False) is model
    assert torch.equal(model.bias, before["bias"])
    assert torch.equal(model.weight_v, sd["weight_v"])


def test_missing_pair_is_reported_with_the_models_keys() -> None:
    model = wnorm.weight_norm(nn.Linear(3, 2))
    assert incompatible_keys(model, {"bias": torch.zeros(2)}).missing_keys == [
        "weight_g", "weight_v"]


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


def test_convert_errors() -> None:
    with pytest.raises(WnormError, match=r"expected 'to' in .*got 'onnx'"):
        convert_state_dict({"w": torch.ones(1)}, "onnx")  # type: ignore[arg-type]
    with pytest.raises(WnormError, match=r"'0.weight': expected a nonzero norm in every row"):
        convert_state_dict({"0.weight": torch.zeros(2, 2)}, "torch-old")
    with pytest.raises(WnormError, match=r"'a.weight_v': expected finite values"):
        convert_state_dict({"a.weight_g": torch.ones(2, 1),
                            "a.weight_v": torch.full((2, 2), float("nan"))}, "plain")


# --------------------------------------------------------------------------- files
def test_nested_checkpoint_converts_the_state_dict_and_keeps_the_rest() -> None:
    ckpt = {"generator": pure(OLD), "optim_g": {"lr": 0.1}, "steps": 12}
    assert find_state_dicts(ckpt) == [("generator",)]
    out, n = convert_checkpoint(ckpt, "plain")
    assert n == 10 and out["steps"] == 12 and out["optim_g"] == {"lr": 0.1}
    assert "pre.weight" in out["generator"] and "pre.weight_g" in ckpt["generator"]


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_save_and_load_round_trip(tmp_path: Path, suffix: str) -> None:
    pytest.importorskip("safetensors") if suffix == ".safetensors" else None
    sd = pure(NEW)
    save_checkpoint(sd, tmp_path / f"c{suffix}")
    back = load_checkpoint(tmp_path / f"c{suffix}")
    assert same_state(dict(back), sd) if suffix != ".safetensors" else (
        sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd))


def test_file_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(WnormError, match=r"notes.pt: not a PyTorch checkpoint"):
        load_checkpoint(text)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(WnormError, match=r"meta.pt: not a checkpoint: expected a state dict"):
        load_checkpoint(tmp_path / "meta.pt")
    with pytest.raises(WnormError, match=r"nope.pt: expected a checkpoint file; got no such"):
        load_checkpoint(tmp_path / "nope.pt")
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00" * 5)
    pytest.importorskip("safetensors")
    with pytest.raises(WnormError, match=r"fake.safetensors: not a readable safetensors file"):
        load_checkpoint(fake)
    with pytest.raises(WnormError, match=r"out.safetensors: a .safetensors file holds a flat"):
        save_checkpoint({"model": pure(plain), "step": 1}, tmp_path / "out.safetensors")


def test_safetensors_with_wrong_dtype_is_an_error_and_leaves_the_model_unchanged(
    tmp_path: Path,
) -> None:
    pytest.importorskip("safetensors")
    model, sd = linear_pair()
    sd["weight_v"] = (sd["weight_v"] * 100).to(torch.int32)
    save_checkpoint(sd, tmp_path / "int.safetensors")
    before = snapshot(model)
    with pytest.raises(WnormError, match=r"'weight_v': expected a tensor of dtype like "
                                          r"torch.float32.*got torch.int32"):
        load_state_dict(model, load_checkpoint(tmp_path / "int.safetensors"))
    assert same_state(snapshot(model), before)


def test_missing_safetensors_package_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(WnormError, match=r"x.safetensors: .*pip install safetensors"):
        save_checkpoint({"w": torch.ones(1)}, tmp_path / "x.safetensors")


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
def test_torch_formats_load_into_torchs_default_weight_norm(make, x, to: str, api: Norm) -> None:
    source = scramble(wnorm.weight_norm(make())).eval()  # wnorm: per output channel (dim 1)
    sd = convert_state_dict(source.state_dict(), to)
    target = api(make()).eval()  # PyTorch's default: dim 0, per input channel
    target.load_state_dict(sd)  # torch's own strict loader: keys and shapes are its layout
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-6)
    # and wnorm's loader takes it back (per output channel again), same outputs
    back = wnorm.weight_norm(make()).eval()
    load_state_dict(back, sd)
    with torch.no_grad():
        torch.testing.assert_close(back(x), source(x), rtol=1e-5, atol=1e-6)


def test_other_axes_and_squeezed_g_become_dim_0_wnorm_format_keeps_them() -> None:
    source = scramble(wnorm.weight_norm(nn.Linear(3, 4), dim=1))  # g (1, 3)
    sd = dict(source.state_dict())
    old = convert_state_dict(sd, "torch-old")
    assert old["weight_g"].shape == (4, 1)
    torch.testing.assert_close(old["weight_g"], old["weight_v"].norm(dim=1, keepdim=True))
    torch.testing.assert_close(old["weight_v"], source.weight.detach())
    kept = convert_state_dict(sd, "wnorm")  # wnorm's own layout: as it is, bitwise
    assert all(torch.equal(kept[k], sd[k]) for k in sd)
    squeezed = {"weight_g": torch.tensor([2.0, 3.0]), "weight_v": torch.randn(2, 3)}
    out = convert_state_dict(squeezed, "torch-new")
    assert out["parametrizations.weight.original0"].shape == (2, 1)
    whole = {"weight_g": torch.tensor(2.0), "weight_v": torch.randn(2, 3)}  # torch's dim=None
    assert convert_state_dict(whole, "torch-old")["weight_g"].shape == ()


def test_a_zero_row_cannot_be_moved_to_dim_0() -> None:
    source = wnorm.weight_norm(nn.ConvTranspose1d(3, 2, 2))
    with torch.no_grad():
        source.weight_v[1] = 0.0  # input channel 1 is zero; every output channel is not
    with pytest.raises(WnormError, match=r"'weight_v': expected a nonzero norm in every row"):
        convert_state_dict(source.state_dict(), "torch-old")


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
    assert incompatible_keys(target, sd) == ([], [])
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
