"""Bad checkpoints are refused with an error naming the key or the file, and a failed load leaves
the model bitwise as it was (no half-loaded model, no stale inference cache).

tests/test_state_dict.py covers single faults on a Linear; this file covers a model with every
kind of layer (conv, mean-only BN buffers, LSTM, linear), faults in every checkpoint layout and
at every position. Files that are not checkpoints: tests/test_files.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import wnorm
from wnorm import WnormError
from wnorm._files import load_checkpoint, save_checkpoint
from wnorm.state_dict import convert_state_dict, load_state_dict


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(3, 4, 3, bias=False), wnorm.MeanOnlyBatchNorm1d(4))
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)
        return self.head(self.lstm(h)[0][:, -1])


X = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(1))


def scramble(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [model.conv[1].running_mean]:
            t.add_(0.3 * torch.randn(t.shape, generator=gen))
    return model


def target() -> nn.Module:
    torch.manual_seed(0)
    return scramble(wnorm.apply(Net()), seed=1).eval()


def source(layout: str) -> dict[str, torch.Tensor]:
    """A valid checkpoint of another Net, in ``layout``."""
    torch.manual_seed(2)
    sd = dict(scramble(wnorm.apply(Net()), seed=3).state_dict())
    return convert_state_dict(sd, layout)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], out: torch.Tensor) -> None:
    now = model.state_dict()
    assert list(now) == list(before)
    changed = [k for k in before if not torch.equal(now[k], before[k])]
    assert not changed, f"a failed load changed {changed}"
    with torch.no_grad():  # the cached inference weights were not replaced either
        assert torch.equal(model(X), out)


def expect_refused(model: nn.Module, sd, match: str, **kwargs) -> None:
    before = snapshot(model)
    with torch.no_grad():
        out = model(X)  # fills the inference cache
    with pytest.raises(WnormError, match=match):
        load_state_dict(model, sd, **kwargs)
    assert_unchanged(model, before, out)


def test_a_valid_source_loads_in_every_layout() -> None:
    """The baseline the faults below break: every layout loads and changes the model."""
    for layout in ("plain", "torch-old", "torch-new", "wnorm"):
        model = target()
        before = snapshot(model)
        load_state_dict(model, source(layout))
        assert any(not torch.equal(model.state_dict()[k], before[k]) for k in before)


# --------------------------------------------------------------------------- state dict faults
def v_key(sd: dict, weight: str) -> str:
    """The key holding v (or w) of ``weight`` (e.g. ``"lstm.weight_ih_l0"``) in any layout."""
    module, _, name = weight.rpartition(".")
    for key in (weight, weight + "_v", f"{module}.parametrizations.{name}.original1"):
        if key in sd:
            return key
    raise KeyError(weight)


Fault = Callable[[dict], tuple[dict, str]]


def wrong_shape_last_layer(sd: dict) -> tuple[dict, str]:
    k = v_key(sd, "head.weight")
    return {**sd, k: torch.ones(2, 6)}, rf"'{k}': expected shape \(2, 5\).*got \(2, 6\)"


def wrong_shape_lstm(sd: dict) -> tuple[dict, str]:
    k = v_key(sd, "lstm.weight_hh_l0")
    return {**sd, k: torch.ones(20, 4)}, rf"'{k}': expected shape \(20, 5\)"


def wrong_shape_buffer(sd: dict) -> tuple[dict, str]:
    k = "conv.1.running_mean"
    return {**sd, k: torch.zeros(5)}, rf"'{k}': expected shape \(4,\)"


def nan_in_v(sd: dict) -> tuple[dict, str]:
    k = v_key(sd, "lstm.weight_ih_l0")
    t = sd[k].clone()
    t[3, 1] = float("nan")
    return {**sd, k: t}, rf"'{k}': expected finite values"


def inf_in_g(sd: dict) -> tuple[dict, str]:
    ks = [k for k in sd if k.startswith("head.") and k.endswith(("_g", "original0"))]
    k = ks[0] if ks else "head.weight"
    t = sd[k].clone()
    t.view(-1)[0] = float("inf")
    return {**sd, k: t}, rf"'{k}': expected finite values"


def nan_in_buffer(sd: dict) -> tuple[dict, str]:
    k = "conv.1.running_mean"
    return {**sd, k: torch.full((4,), float("nan"))}, rf"'{k}': expected finite values"


def missing_bias(sd: dict) -> tuple[dict, str]:
    return ({k: v for k, v in sd.items() if k != "lstm.bias_hh_l0"},
            r"missing keys \['lstm.bias_hh_l0'\]")


def missing_half_of_a_pair(sd: dict) -> tuple[dict, str]:
    ks = [k for k in sd if k.startswith("conv.0.") and k.endswith(("_g", "original0"))]
    if not ks:  # plain: drop the weight itself
        return {k: v for k, v in sd.items() if k != "conv.0.weight"}, r"missing keys.*conv\.0"
    return {k: v for k, v in sd.items() if k != ks[0]}, r"conv\.0"


def extra_key(sd: dict) -> tuple[dict, str]:
    return {**sd, "decoder.weight": torch.ones(3, 3)}, r"unexpected keys \['decoder.weight'\]"


def int64_weight(sd: dict) -> tuple[dict, str]:
    k = v_key(sd, "head.weight")
    return {**sd, k: torch.ones(2, 5, dtype=torch.int64)}, rf"'{k}': expected a tensor of dtype"


def float_step_counter(sd: dict) -> tuple[dict, str]:
    k = "conv.1.num_batches_tracked"
    return {**sd, k: torch.tensor(1.5)}, rf"'{k}': expected a tensor of dtype like torch.int64"


def not_a_tensor(sd: dict) -> tuple[dict, str]:
    return {**sd, "head.bias": [0.0, 0.0]}, r"'head.bias' is a list, not a tensor"


FAULTS: list[Fault] = [wrong_shape_last_layer, wrong_shape_lstm, wrong_shape_buffer, nan_in_v,
                       inf_in_g, nan_in_buffer, missing_bias, missing_half_of_a_pair, extra_key,
                       int64_weight, float_step_counter, not_a_tensor]


@pytest.mark.parametrize("layout", ["plain", "torch-old", "torch-new", "wnorm"])
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
def test_bad_state_dict_is_refused_naming_the_key_and_model_unchanged(fault, layout) -> None:
    sd, match = fault(source(layout))
    expect_refused(target(), sd, match)


@pytest.mark.parametrize("fault", [wrong_shape_lstm, nan_in_v, int64_weight, not_a_tensor],
                         ids=lambda f: f.__name__)
def test_strict_false_still_refuses_invalid_values(fault) -> None:
    sd, match = fault(source("torch-old"))
    expect_refused(target(), sd, match, strict=False)


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_safetensors_with_wrong_dtype_is_refused_and_model_unchanged(tmp_path: Path,
                                                                     dtype) -> None:
    pytest.importorskip("safetensors")
    sd = source("wnorm")
    k = "lstm.weight_ih_l0_v"
    sd[k] = (sd[k] * 100).to(dtype)
    path = tmp_path / "bad.safetensors"
    save_checkpoint(sd, path)
    loaded = load_checkpoint(path)
    assert loaded[k].dtype == dtype
    expect_refused(target(), loaded, rf"'{k}': expected a tensor of dtype like torch.float32.*"
                                     rf"got {dtype}")


def test_other_float_dtype_loads_converted() -> None:
    """Not a fault: a float64 (or float16) checkpoint loads into a float32 model, cast."""
    for dtype in (torch.float64, torch.float16):
        sd = {k: (v.to(dtype) if v.is_floating_point() else v)
              for k, v in source("torch-old").items()}
        model = target()
        load_state_dict(model, sd)
        assert all(p.dtype == torch.float32 for p in model.parameters())


# --------------------------------------------------------------------------- float16 range
BIG16 = torch.full((2, 1024), 3000.0, dtype=torch.float16)  # every entry fits; a row's norm not


def test_a_norm_past_float16_is_computed_wide_and_loads_into_float32() -> None:
    sd = {"weight": BIG16, "bias": torch.zeros(2, dtype=torch.float16)}
    model = wnorm.weight_norm(nn.Linear(1024, 2))
    load_state_dict(model, sd)
    assert model.weight_g.dtype == torch.float32
    torch.testing.assert_close(model.weight_g, torch.full((2, 1), 96000.0))
    reference = nn.Linear(1024, 2)
    reference.load_state_dict(sd)
    x = torch.ones(1, 1024)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize("to", ["torch-old", "torch-new"])
def test_converting_to_a_g_that_overflows_float16_is_refused(to: str) -> None:
    sd = {"fc.weight": BIG16, "fc.bias": torch.zeros(2, dtype=torch.float16)}
    with pytest.raises(WnormError, match=r"'fc.weight': 2 of 2 values of \|\|w\|\| along dim 0 "
                                         r"overflow torch.float16"):
        convert_state_dict(sd, to)


def big_g(sd: dict) -> dict:
    return {**sd, "weight_g": torch.full((2, 1), 1e5)}


def big_weight(sd: dict) -> dict:
    return {"weight": torch.full((2, 3), 1e5), "bias": sd["bias"]}


def big_bias(sd: dict) -> dict:
    return {**sd, "bias": torch.tensor([1.0, 7e4])}


@pytest.mark.parametrize("edit,key,target", [
    (big_g, "weight_g", "weight_g"),  # same layout: copied, cast
    (big_weight, "weight", "weight_v"),  # plain w into a pair: v = w, cast
    (big_bias, "bias", "bias"),
], ids=["g", "plain-w", "bias"])
def test_float32_values_past_float16_into_a_half_model_are_refused(edit, key, target) -> None:
    src = wnorm.weight_norm(nn.Linear(3, 2))
    model = wnorm.weight_norm(nn.Linear(3, 2)).half()
    before = snapshot(model)
    with pytest.raises(WnormError, match=rf"'{key}': \d+ of \d+ values for the model's "
                                         rf"'{target}' overflow torch.float16"):
        load_state_dict(model, edit(dict(src.state_dict())))
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


# --------------------------------------------------------------------------- two layouts
def two_layouts(case: str) -> tuple[dict, list[str]]:
    """``head.weight`` twice: the wnorm pair plus another layout of a different weight."""
    sd = source("wnorm")
    plain = {"head.weight": torch.randn(2, 5)}
    if case == "plain-last":
        return {**sd, **plain}, ["head.weight_g", "head.weight_v", "head.weight"]
    if case == "plain-first":
        return {**plain, **sd}, ["head.weight", "head.weight_g", "head.weight_v"]
    new = {k: v * 2 for k, v in source("torch-new").items() if k.startswith("head.param")}
    return {**sd, **new}, ["head.weight_g", "head.weight_v",
                           "head.parametrizations.weight.original0",
                           "head.parametrizations.weight.original1"]


@pytest.mark.parametrize("case", ["plain-last", "plain-first", "old-and-new"])
def test_one_weight_in_two_layouts_is_refused_naming_both(case: str) -> None:
    sd, keys = two_layouts(case)
    match = r"both hold the weight 'head.weight', in two layouts"
    for strict in (True, False):
        before = snapshot(model := target())
        with pytest.raises(WnormError, match=match) as info:
            load_state_dict(model, sd, strict=strict)
        assert all(f"'{k}'" in str(info.value) for k in keys)
        assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    for to in ("plain", "torch-old", "torch-new", "wnorm"):
        with pytest.raises(WnormError, match=match):
            convert_state_dict(sd, to)
