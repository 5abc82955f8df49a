"""wnorm.apply: which modules get weight-normalized, and which never do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wnorm
from wnorm import WnormError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(4, 3, 3), nn.LayerNorm([3, 5, 5]))
        self.head = nn.Linear(75, 2)
        self.emb = nn.Embedding(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)).flatten(1))


def normalized(model: nn.Module) -> set[str]:
    return {f"{m}.{p}" if m else p for m, _, p, _ in wnorm.normalized_weights(model)}


def test_default_types():
    net = Net()
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        before = net(x)
    assert wnorm.apply(net) is net
    assert normalized(net) == {"encoder.0.weight", "encoder.3.weight", "decoder.0.weight",
                               "head.weight"}
    with torch.no_grad():  # starts at g = ||w||, v = w: same function
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)


def test_include_glob():
    net = wnorm.apply(Net(), include=["encoder.*"])
    assert normalized(net) == {"encoder.0.weight", "encoder.3.weight"}


def test_exclude_glob_and_type():
    net = wnorm.apply(Net(), exclude=["head", nn.ConvTranspose2d])
    assert normalized(net) == {"encoder.0.weight", "encoder.3.weight"}
    net = wnorm.apply(Net(), exclude=["encoder.?"])
    assert normalized(net) == {"decoder.0.weight", "head.weight"}


def test_types_and_filter():
    net = wnorm.apply(Net(), types=(nn.Linear, nn.Embedding))
    assert normalized(net) == {"head.weight", "emb.weight"}
    net = wnorm.apply(Net(), filter=lambda name, m: getattr(m, "out_channels", 0) == 4)
    assert normalized(net) == {"encoder.0.weight", "encoder.3.weight"}


def test_normalization_layers_never_touched():
    net = Net()
    norm_state = {k: v.clone() for k, v in net.state_dict().items()
                  if k.startswith(("encoder.1", "encoder.4", "decoder.1"))}
    types = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.Conv2d)
    wnorm.apply(net, types=types)
    assert normalized(net) == {"encoder.0.weight", "encoder.3.weight"}
    for name in ("encoder.1", "encoder.4", "decoder.1"):
        m = net.get_submodule(name)
        assert not wnorm.is_weight_normalized(m)
        assert type(m) in (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    for k, v in norm_state.items():
        assert torch.equal(net.state_dict()[k], v)


def test_only_norm_layers_selected_is_an_error():
    net = nn.Sequential(nn.BatchNorm1d(3), nn.LayerNorm(3))
    with pytest.raises(WnormError, match=r"apply: no module of Sequential was selected"):
        wnorm.apply(net, types=(nn.BatchNorm1d, nn.LayerNorm))


def test_nothing_selected_is_an_error():
    with pytest.raises(WnormError, match=r"apply: no module of Net was selected .*"
                                         r"include=\['nothing\*'\]"):
        wnorm.apply(Net(), include=["nothing*"])


def test_every_lstm_weight_normalized():
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    wnorm.apply(lstm)
    expected = {n for n, _ in lstm.named_parameters()}
    expected = {n[:-2] for n in expected if n.endswith("_g")}
    weights = {n for n in lstm._flat_weights_names if n.startswith("weight_")}
    assert normalized(lstm) == weights == expected
    assert len(weights) == 12  # ih, hh, hr x 2 layers x 2 directions
    assert not any(n.startswith("bias") and n.endswith(("_g", "_v"))
                   for n, _ in lstm.named_parameters())


def test_twice_on_lstm_is_an_error_naming_the_layer():
    net = nn.Sequential(nn.LSTM(3, 4))
    wnorm.apply(net)
    with pytest.raises(WnormError, match=r"0 \(LSTM\): 'weight_ih_l0' is already "
                                         r"weight-normalized by wnorm"):
        wnorm.apply(net)



@pytest.mark.parametrize("prepare, msg", [
    (wnorm.weight_norm, "is already weight-normalized by wnorm"),
    (torch.nn.utils.weight_norm, "is already weight-normalized .it has 'weight_g'/'weight_v'"),
    (torch.nn.utils.parametrizations.weight_norm, "already has a PyTorch parametrization"),
], ids=["wnorm", "torch-old", "torch-parametrizations"])
def test_already_normalized_linear_is_an_error(prepare, msg):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    prepare(net[2])
    with pytest.raises(WnormError, match=rf"2 \((Parametrized)?Linear\): 'weight' {msg}"):
        wnorm.apply(net)


def test_error_names_module_path():
    net = Net()
    with torch.no_grad():
        net.decoder[0].weight.fill_(float("nan"))
    with pytest.raises(WnormError, match=r"decoder.0 \(ConvTranspose2d\): 'weight' has \d+ "
                                         r"non-finite values"):
        wnorm.apply(net)


def test_shared_module_normalized_once():
    lin = nn.Linear(3, 3)
    net = nn.Sequential(lin, nn.ReLU(), lin)
    wnorm.apply(net)
    assert normalized(net) == {"0.weight"}
    assert net[2] is net[0] and wnorm.is_weight_normalized(net[2])


def test_dim_none_passed_through():
    net = wnorm.apply(nn.Sequential(nn.Linear(3, 4), nn.Conv1d(4, 2, 1)), dim=None)
    for _, m, _, dim in wnorm.normalized_weights(net):
        assert dim is None and m.weight_g.numel() == 1
        torch.testing.assert_close(m.weight.norm(), m.weight_g.detach().reshape(()))
