"""wnorm.apply: which modules get weight-normalized, and which never do."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

from conftest import normalized_weights

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
    return {f"{m}.{p}" if m else p for m, _, p, _ in normalized_weights(model)}


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


def _encoder_then_head() -> nn.Module:
    return nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Linear(8, 3))


@pytest.mark.parametrize("exclude, left", [
    (nn.TransformerEncoderLayer, {"1.weight"}),
    ("0", {"1.weight"}),
    (nn.MultiheadAttention, {"0.linear1.weight", "0.linear2.weight", "1.weight"}),
    ("0.self_attn", {"0.linear1.weight", "0.linear2.weight", "1.weight"}),
], ids=["block-type", "block-name", "attention-type", "attention-name"])
def test_excluding_a_module_excludes_the_layers_inside_it(exclude, left):
    """Only each layer's own type and name were tested: excluding the encoder block or its
    attention left their Linears normalized."""
    assert normalized(wnorm.apply(_encoder_then_head(), exclude=exclude)) == left


@pytest.mark.parametrize("exclude, what", [("haed", "'haed'"), (nn.Conv2d, "Conv2d"),
                                           (["1", "0.linaer1"], "'0.linaer1'")])
def test_an_exclude_entry_matching_no_module_is_an_error_naming_it(exclude, what):
    """A typo excluded nothing and normalized the layer it meant to leave alone, silently."""
    model = _encoder_then_head()
    with pytest.raises(WnormError, match=rf"apply: exclude entry {what} matches no module of "
                                         r"Sequential .*'0.self_attn.out_proj'"):
        wnorm.apply(model, exclude=exclude)
    assert not any(wnorm.is_weight_normalized(m) for m in model.modules())


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


def test_an_include_entry_matching_no_module_is_an_error():
    # a typo among several entries left its layer plain, silently
    with pytest.raises(WnormError, match=r"apply: include entry 'nothing\*' matches no module of "
                                         r"Net \(a typo\?\); its modules are e.g. "
                                         r"\['encoder', 'encoder.0', .*'encoder.\*' selects"):
        wnorm.apply(Net(), include=["encoder.*", "nothing*"])


def test_a_shared_module_is_included_by_any_of_its_names():
    # include matched only the first name of a shared layer: 'dec.*' left dec.0 plain
    lin = nn.Linear(3, 3)
    net = nn.Module()
    net.enc, net.dec = nn.Sequential(lin), nn.Sequential(lin, nn.Linear(3, 2))
    wnorm.apply(net, include="dec.*")
    assert wnorm.is_weight_normalized(net.dec[0]) and wnorm.is_weight_normalized(net.dec[1])


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



def test_already_normalized_by_wnorm_is_an_error():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    wnorm.weight_norm(net[2])
    with pytest.raises(WnormError, match=r"2 \(Linear\): 'weight' is already weight-normalized "
                                         r"by wnorm; leave it out \(wnorm.apply\(model, "
                                         r"exclude=\['2'\]\)\)"):
        wnorm.apply(net)
    wnorm.apply(net, exclude=["2"])  # the way on that the message gives
    assert wnorm.is_weight_normalized(net[0])


@pytest.mark.parametrize("prepare", [torch.nn.utils.weight_norm,
                                     torch.nn.utils.parametrizations.weight_norm],
                         ids=["torch-old", "torch-parametrizations"])
def test_pytorch_weight_norm_is_adopted_not_refused(prepare):
    """Issue 15 item 8: apply on a model that uses PyTorch's weight norm adopts those layers
    (same g, v Parameters and axis, same outputs bit for bit) and normalizes the rest."""
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    prepare(net[2], dim=1)
    x = torch.randn(5, 3)
    y = net(x)
    params = {id(p) for p in net[2].parameters()}
    wnorm.apply(net)
    assert wnorm.is_weight_normalized(net[0]) and wnorm.is_weight_normalized(net[2])
    assert net[2]._wn["weight"].dim == 1 and type(net[2]).__mro__[1] is nn.Linear
    assert params == {id(p) for p in net[2].parameters()}  # PyTorch's g and v kept, not copied
    assert torch.equal(net(x), y)


class _Kernel(nn.Module):
    """A custom layer with a plain ``weight`` beside a ``kernel`` PyTorch's weight norm holds."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.kernel = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight + self.kernel).T


@pytest.mark.parametrize("prepare", [torch.nn.utils.weight_norm,
                                     torch.nn.utils.parametrizations.weight_norm],
                         ids=["torch-old", "torch-parametrizations"])
def test_adopting_takes_exactly_the_weights_pytorch_normalized_whatever_their_names(prepare):
    # types=() ("adopt only") also normalized the weights PyTorch left plain (an LSTM's
    # weight_ih, a layer's plain weight), and a weight norm on another name than 'weight'
    # (MultiheadAttention's in_proj_weight) was never adopted: left on, or refused
    lstm, kernel, mha = nn.LSTM(4, 3), _Kernel(), nn.MultiheadAttention(4, 2)
    prepare(lstm, "weight_hh_l0")
    prepare(kernel, "kernel")
    prepare(mha, "in_proj_weight")
    for layer, name in ((lstm, "weight_hh_l0"), (kernel, "kernel"), (mha, "in_proj_weight")):
        x = torch.randn(2, 5, 4)
        before = layer(x, x, x) if layer is mha else layer(x)
        wnorm.apply(layer, types=())
        assert [(m, n) for m, _, n, _ in normalized_weights(layer)] == [("", name)]
        after = layer(x, x, x) if layer is mha else layer(x)
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert "weight_ih_l0" in dict(lstm.named_parameters()) and "weight" in dict(
        kernel.named_parameters())
    # with the default types, MultiheadAttention's in_proj_weight is adopted beside out_proj
    mha = nn.MultiheadAttention(4, 2)
    prepare(mha, "in_proj_weight")
    wnorm.apply(mha)
    assert wnorm.is_weight_normalized(mha, "in_proj_weight")
    assert wnorm.is_weight_normalized(mha.out_proj)


@pytest.mark.parametrize("other", ["spectral_norm", "parametrizations.spectral_norm",
                                   "parametrizations.orthogonal", "prune"])
def test_a_layer_whose_weight_something_else_computes_is_left_plain_with_a_warning(other):
    # an SN-GAN discriminator keeps its spectral norm; apply used to skip it without a word,
    # and include= said only that it held no 'weight'
    import torch.nn.utils.prune as prune
    from torch.nn.utils import parametrizations

    def make() -> nn.Sequential:
        net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        {"spectral_norm": lambda m: nn.utils.spectral_norm(m),
         "parametrizations.spectral_norm": lambda m: parametrizations.spectral_norm(m),
         "parametrizations.orthogonal": lambda m: parametrizations.orthogonal(m),
         "prune": lambda m: prune.l1_unstructured(m, "weight", amount=0.5)}[other](net[2])
        return net

    net = make()
    with pytest.warns(UserWarning, match=r"apply leaves 1 selected layer\(s\) plain: 2 "
                      r"\((Parametrized)?Linear\), whose 'weight' .+ computes"):
        wnorm.apply(net)
    assert wnorm.is_weight_normalized(net[0]) and not wnorm.is_weight_normalized(net[2])
    with pytest.raises(WnormError, match=r"whose 'weight' .+ computes: remove that first"):
        wnorm.apply(make(), include="2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wnorm.apply(make(), exclude="2")  # excluded: nothing to say


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
    for _, m, _, dim in normalized_weights(net):
        assert dim is None and m.weight_g.numel() == 1
        torch.testing.assert_close(m.weight.norm(), m.weight_g.detach().reshape(()))


# ------------------------------------------------------------------------ tied weights
class _Tied(nn.Module):
    """Two Linears sharing one weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.enc(x)))


class _TiedLM(nn.Module):
    """Embedding and output layer sharing one weight Parameter (a tied language model)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(i)))


@pytest.mark.parametrize("make, x, types, a, b", [
    (_Tied, lambda: torch.randn(8, 4), wnorm.DEFAULT_TYPES, "enc", "dec"),
    (_TiedLM, lambda: torch.randint(0, 10, (8,)), wnorm.DEFAULT_TYPES + (nn.Embedding,),
     "emb", "out"),
], ids=["linear-linear", "embedding-linear"])
def test_tied_weight_stays_tied(make, x, types, a, b):
    """A weight shared by two selected modules is normalized once: both hold the same g and v
    (one entry each in parameters(), both names in the state dict, as torch shows a tie), and
    training keeps them equal. Each module got its own g and v before: silently untied."""
    torch.manual_seed(0)
    model, inp = make(), x()
    with torch.no_grad():
        before = model(inp)
    wnorm.apply(model, types=types)
    ma, mb = getattr(model, a), getattr(model, b)
    assert wnorm.is_weight_normalized(ma, "weight") and wnorm.is_weight_normalized(mb, "weight")
    assert ma.weight_g is mb.weight_g and ma.weight_v is mb.weight_v
    names = [n for n, _ in model.named_parameters()]
    assert f"{a}.weight_v" in names and f"{b}.weight_v" not in names  # listed once
    sd = model.state_dict()
    assert sd[f"{a}.weight_v"].data_ptr() == sd[f"{b}.weight_v"].data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(inp), before)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(inp).square().sum().backward()
    opt.step()
    assert torch.equal(ma.weight, mb.weight)
    twin = copy.deepcopy(model)
    assert getattr(twin, a).weight_g is getattr(twin, b).weight_g


def test_tie_with_an_unselected_module_is_an_error_naming_both():
    """The embedding is not in the default types: normalizing only the output layer would untie
    it from the embedding (it did, silently)."""
    model = _TiedLM()
    w = model.emb.weight
    with pytest.raises(WnormError, match=r"out \(Linear\): 'weight' is the same Parameter as "
                                         r"'weight' of emb \(Embedding\), which is not selected"):
        wnorm.apply(model)
    assert model.out.weight is w and model.emb.weight is w
    assert not wnorm.is_weight_normalized(model.out) and type(model.out) is nn.Linear


def test_tie_along_different_axes_is_an_error():
    """A Conv2d (units on axis 0) tied to a ConvTranspose2d (units on axis 1): one g cannot
    serve both."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 3, 3))
    model[2].weight = model[0].weight
    with pytest.raises(WnormError, match=r"0 \(Conv2d\): 'weight' is the same Parameter as "
                                         r"'weight' of 2 \(ConvTranspose2d\), but .*dim 0 and 1"):
        wnorm.apply(model)
    assert model[0].weight is model[2].weight and not wnorm.is_weight_normalized(model[0])


def test_weight_norm_on_one_holder_of_a_tie_unties_as_documented():
    """wnorm.weight_norm sees one module: the other holder keeps the old Parameter."""
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    w = a.weight
    wnorm.weight_norm(b)
    assert a.weight is w and not wnorm.is_weight_normalized(a)
    torch.testing.assert_close(b.weight, w)
    assert "Tied weights" in wnorm.weight_norm.__doc__


# ------------------------------------------------------------------- all or nothing
def _lstm_then_zero_row() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        net[2].weight[1] = 0
    return net


@pytest.mark.parametrize("make, kw", [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), {"dim": 2}),
    (_lstm_then_zero_row, {}),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2)),
     {"method": wnorm.centered_weight_norm}),
], ids=["dim-out-of-range", "lstm-then-zero-row", "third-layer-constant"])
def test_failed_apply_leaves_the_model_exactly_unchanged(make, kw):
    """A weight failing after others were normalized: the earlier ones are put back, the same
    Parameter objects under the same names and classes, and a corrected call then works (the
    earlier layers stayed normalized, and the retry said 'already weight-normalized')."""
    torch.manual_seed(0)
    model = make()
    if "method" in kw:  # a constant row has zero norm after centering
        with torch.no_grad():
            model[2].weight[0] = 1.0
    params = list(model.named_parameters())
    classes = [type(m) for m in model.modules()]
    with pytest.raises(WnormError):
        wnorm.apply(model, **kw)
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in params]
    assert [type(m) for m in model.modules()] == classes
    assert not any(wnorm.is_weight_normalized(m) for m in model.modules())
    if isinstance(model[1], nn.LSTM):
        assert all(a is b for a, b in zip(model[1]._flat_weights, model[1].parameters()))
        model[1](torch.randn(5, 4))  # still runs
    with torch.no_grad():
        model[-1].weight.normal_()
    wnorm.apply(model)  # the retry works


# ------------------------------------------------------------------------- arguments
def test_one_string_is_one_pattern():
    """include="encoder.*" selected everything (its '*' character matched every name) and
    exclude="head" excluded nothing: a string was iterated character by character."""
    assert normalized(wnorm.apply(Net(), include="encoder.*")) == {"encoder.0.weight",
                                                                    "encoder.3.weight"}
    assert normalized(wnorm.apply(Net(), exclude="head")) == {
        "encoder.0.weight", "encoder.3.weight", "decoder.0.weight"}
    assert normalized(wnorm.apply(Net(), exclude=nn.Linear)) == {
        "encoder.0.weight", "encoder.3.weight", "decoder.0.weight"}
    with pytest.raises(WnormError, match=r"apply: no module of Net was selected .*"
                                         r"include=\['encoder'\]"):
        wnorm.apply(Net(), include="encoder")


def test_a_pattern_that_is_not_a_string_is_an_error():
    net = Net()
    with pytest.raises(WnormError, match=r"apply: exclude takes glob patterns \(str\) or module "
                                         r"types; got Linear"):
        wnorm.apply(net, exclude=[net.head])  # a module, not its name: was silently ignored
    with pytest.raises(WnormError, match=r"apply: include takes glob patterns \(str\); got 3"):
        wnorm.apply(net, include=["head", 3])
    assert not any(wnorm.is_weight_normalized(m) for m in net.modules())


@pytest.mark.parametrize("make", [lambda: nn.LazyLinear(3), lambda: nn.LazyConv2d(3, 3)],
                         ids=["LazyLinear", "LazyConv2d"])
def test_lazy_module_before_its_first_forward_is_an_error_naming_it(make):
    net = nn.Sequential(nn.Linear(2, 2), make())
    kind = type(net[1]).__name__
    with pytest.raises(WnormError, match=rf"1 \({kind}\): \['weight', 'bias'\] are not "
                                         r"initialized yet .*run one forward pass"):
        wnorm.apply(net)
    assert not wnorm.is_weight_normalized(net[0])
    with pytest.raises(WnormError, match=rf"{kind}: 'weight' is not initialized yet"):
        wnorm.weight_norm(make())


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_apply_to_a_ddp_wrapped_model_is_refused_with_the_order(one_rank_group):
    """DDP keeps all-reducing the weights it was built with: g and v would never be synced
    and the ranks would drift apart (seen: g differing after one step on 2 ranks)."""
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    with pytest.raises(WnormError, match=r"wrapped in DistributedDataParallel.*apply \(and "
                                         r"data_init\) to the unwrapped model first"):
        wnorm.apply(ddp)
    assert not any(wnorm.is_weight_normalized(m) for m in net.modules())


def test_fold_of_a_sharded_model_is_refused_before_changing_anything(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    net = wnorm.apply(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    fully_shard(net)
    names = [n for n, _ in net.named_parameters()]
    with pytest.raises(WnormError, match=r"fold: 0.bias is sharded .* fold an unsharded copy"):
        wnorm.fold(net)
    assert [n for n, _ in net.named_parameters()] == names


def test_a_model_built_on_the_meta_device_is_normalized_then_materialized():
    # the FSDP2 / large-model habit: build on meta, apply, to_empty, then init or load
    def make():
        return nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.ConvTranspose1d(4, 3, 3),
                             nn.Flatten(), nn.Linear(3 * 9, 5))
    with torch.device("meta"):
        model = wnorm.apply(make())
    assert len(list(normalized_weights(model))) == 3
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    torch.manual_seed(0)
    plain = make()  # the same init, in the same order
    for a, b in zip(model.modules(), plain.modules()):
        if hasattr(b, "weight"):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    x = torch.randn(4, 2, 9)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    wnorm.load_state_dict(model, plain.state_dict())  # or a checkpoint, after to_empty
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("call, match", [
    (lambda: wnorm.apply(None), r"apply: expects an nn.Module; got NoneType"),
    (lambda: wnorm.apply(nn.Linear(2, 2), types="Linear"),
     r"apply: types takes nn.Module classes \(e.g. torch.nn.Linear\); got 'Linear'"),
    (lambda: wnorm.apply(nn.Linear(2, 2), types=[nn.Linear, int]),
     r"types takes nn.Module classes .*got <class 'int'>"),
    (lambda: wnorm.fold("model.pt"), r"fold: expects an nn.Module; got str"),
    (lambda: wnorm.apply(nn.Linear(2, 2), filter=3), r"apply: filter must be callable; got int"),
    (lambda: wnorm.apply(nn.Linear(2, 2), method="wn"), r"apply: method must be callable"),
    (lambda: wnorm.data_init(None, torch.randn(2, 2)), r"data_init: expects an nn.Module"),
    (lambda: wnorm.load_state_dict("model.pt", {}), r"load_state_dict: expects an nn.Module"),
    (lambda: wnorm.remove_weight_norm(None), r"remove_weight_norm: expects an nn.Module"),
    (lambda: wnorm.is_weight_normalized(None), r"is_weight_normalized: expects an nn.Module"),
    (lambda: wnorm.arpit_init(None), r"arpit_init: expects an nn.Module"),
])
def test_a_wrong_argument_is_a_wnorm_error_saying_what_was_expected(call, match):
    with pytest.raises(WnormError, match=match):
        call()


def test_a_partial_fixing_dim_is_a_method_whose_dim_serves_for_every_layer():
    """The docstring offers partials, but apply passed dim positionally as well: a raw
    TypeError 'got multiple values for argument dim'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (4, 1)), nn.ConvTranspose1d(4, 2, 3))
    plain, x = copy.deepcopy(model), torch.randn(2, 3)
    wnorm.apply(model, method=functools.partial(wnorm.weight_norm, dim=None))
    assert model[0].weight_g.shape == model[2].weight_g.shape == ()  # one norm per tensor
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))
    with pytest.raises(WnormError, match=r"apply: dim=0, but method fixes dim=None"):
        wnorm.apply(nn.Linear(3, 4), dim=0, method=functools.partial(wnorm.weight_norm, dim=None))


@pytest.mark.parametrize("method", [torch.nn.utils.parametrizations.weight_norm,
                                    lambda module, name: module], ids=["pytorch", "two-args"])
def test_a_method_without_wnorms_signature_is_an_error_saying_what_it_must_accept(method):
    """PyTorch's own weight_norm failed with a raw TypeError about 'where'."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    params = [(n, id(p)) for n, p in model.named_parameters()]
    with pytest.raises(WnormError, match=r"apply: method must accept \(module, name, dim=\.\.\., "
                                         r"\*, where=\.\.\.\) .*got .*\(module"):
        wnorm.apply(model, method=method)
    assert [(n, id(p)) for n, p in model.named_parameters()] == params


def test_a_method_that_leaves_the_weight_plain_is_an_error_and_undone():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(WnormError, match=r"0 \(Linear\): method .* left 'weight' not "
                                         r"reparameterized by wnorm"):
        wnorm.apply(model, method=lambda module, name, dim, where: module)


def test_apply_takes_one_type_as_well_as_a_tuple():
    net = wnorm.apply(nn.Sequential(nn.Linear(2, 2), nn.Conv1d(2, 2, 1)), types=nn.Conv1d)
    assert [n for n, _ in net.named_parameters()] == ["0.weight", "0.bias", "1.bias",
                                                      "1.weight_g", "1.weight_v"]


def test_selected_modules_without_a_weight_are_an_error_not_a_no_op():
    mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(WnormError, match=r"hold no parameter 'weight' to normalize .*"
                                         r"MultiheadAttention.*in_proj_weight"):
        wnorm.apply(mha, types=(nn.MultiheadAttention,))
    assert not wnorm.is_weight_normalized(mha.out_proj)


def test_a_failed_apply_gives_back_pytorchs_weight_norm_it_had_adopted():
    first = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    bad = nn.Linear(4, 3)
    with torch.no_grad():
        bad.weight[1].zero_()  # refused: after the first layer was already adopted
    net = nn.Sequential(first, bad)
    x = torch.randn(2, 4)
    y, keys = net(x), list(net.state_dict())
    with pytest.raises(WnormError, match="zero norm"):
        wnorm.apply(net)
    assert list(net[0].parametrizations) == ["weight"] and list(net.state_dict()) == keys
    assert torch.equal(net(x), y)


class _CellDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.gru, self.rnn = nn.LSTMCell(4, 6), nn.GRUCell(6, 5), nn.RNNCell(5, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.gru(self.lstm(x)[0])))


def test_rnn_cells_are_normalized_like_rnns_not_left_plain():
    # LSTMCell/GRUCell/RNNCell derive from RNNCellBase, not RNNBase: apply left them plain
    import copy

    torch.manual_seed(0)
    plain, x = _CellDecoder(), torch.randn(7, 4)
    model = wnorm.apply(copy.deepcopy(plain))
    for cell in (model.lstm, model.gru, model.rnn):
        assert sorted(n for n, _ in cell.named_parameters()) == [
            "bias_hh", "bias_ih", "weight_hh_g", "weight_hh_v", "weight_ih_g", "weight_ih_v"]
    assert torch.equal(model(x), plain(x))
    model(x).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # weight_hh's are 0: h0 = 0
    assert torch.equal(wnorm.fold(copy.deepcopy(model))(x), model(x))
    with pytest.warns(UserWarning, match="recurrent layer"):
        report = wnorm.data_init(model, x)
    assert [r.name for r in report.initialized] == ["out"]


@pytest.mark.parametrize("make, name", [(lambda: nn.GRUCell(4, 5), "weight_hh"),
                                        (lambda: nn.LSTM(4, 5), "weight_hh_l0")])
def test_a_recurrent_layer_with_pytorchs_weight_norm_on_one_weight_is_adopted(make, name):
    # PyTorch's parametrization on weight_hh was taken for 'another parametrization' when apply
    # came to weight_ih, and apply refused the layer
    torch.manual_seed(0)
    layer = torch.nn.utils.parametrizations.weight_norm(make(), name)
    x = torch.randn(3, 4)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    ref = first(layer(x))
    wnorm.apply(layer)
    assert torch.equal(first(layer(x)), ref)
    assert {name + "_g", name + "_v"} <= {n for n, _ in layer.named_parameters()}


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_reset_parameters_of_a_normalized_rnn_cell_draws_a_plain_cells_weights(cls):
    # its init draws weight_ih, weight_hh, bias_ih, bias_hh in that order; the normalized
    # cell's parameters came biases first, so the same seed gave other weights
    plain, cell = cls(3, 4), wnorm.apply(cls(3, 4))
    torch.manual_seed(1)
    plain.reset_parameters()
    torch.manual_seed(1)
    cell.reset_parameters()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(getattr(cell, name), p, rtol=0, atol=1e-6)


def test_apply_without_exclude_does_not_walk_every_path_of_a_cyclic_model():
    # a child holding its parent (self.owner = parent) made the exclude walk recurse forever
    class Child(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = Child()
            self.c.owner = self

    model = wnorm.apply(Parent())
    assert wnorm.is_weight_normalized(model.c.lin)


def _nested_sharing(depth: int) -> nn.Module:
    """Each level holds the next twice: 2**depth paths to the innermost Linear."""
    inner: nn.Module = nn.Sequential(nn.Linear(3, 3))
    for _ in range(depth):
        level = nn.Module()
        level.a = level.b = inner
        inner = level
    root = nn.Module()
    root.body, root.head = inner, nn.Linear(3, 2)
    return root


def test_exclude_on_a_model_with_nested_sharing_is_walked_in_bounded_time():
    # every path of a shared module was walked: 2**depth names, minutes at depth 22
    model = _nested_sharing(22)
    with pytest.warns(UserWarning, match=r"more than 100,000 paths .* first name only") as rec:
        wnorm.apply(model, exclude="head")
    assert rec[0].filename == __file__
    assert not wnorm.is_weight_normalized(model.head)
    assert wnorm.is_weight_normalized(model.body.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a[0])


def test_exclude_by_any_path_of_a_cyclic_or_shared_model_still_works():
    # a child holding its parent is not followed; a shared module excluded by its second name
    model = _nested_sharing(2)
    model.body.owner = model
    wnorm.apply(model, exclude="body.b.a")  # the Linear's parent, reached as body.a.a first
    assert not wnorm.is_weight_normalized(model.body.a.a[0])
    assert wnorm.is_weight_normalized(model.head)


def test_a_failed_apply_leaves_a_pytorch_normalized_rnn_as_it_was():
    # the GRU was restored before its parametrizations list: refreshing its flat weights raised
    # KeyError, hiding the real error and breaking every later forward (found by review)
    torch.manual_seed(0)
    model = nn.Module()
    model.rnn = nn.utils.parametrizations.weight_norm(nn.GRU(3, 4), "weight_hh_l0")
    model.head = nn.Linear(4, 2)
    with torch.no_grad():
        model.head.weight[1] = 0
    x = torch.randn(2, 5, 3)
    before = model.rnn(x)[0].detach()
    with pytest.raises(WnormError, match=r"head \(Linear\): 1 of 2 slices"):
        wnorm.apply(model)
    assert not wnorm.is_weight_normalized(model.rnn)
    torch.testing.assert_close(model.rnn(x)[0], before, rtol=0, atol=0)


def test_an_optimizer_built_before_apply_is_warned_about_at_its_first_step():
    # it held the replaced weights and trained only the biases, without a word
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    before = torch.optim.Adam(net.parameters())
    wnorm.apply(net)
    net(torch.randn(2, 4)).sum().backward()
    with pytest.warns(UserWarning, match=r"Adam holds 2 Parameters that weight normalization "
                                         r"replaced \(0 \(Linear\) 'weight', 2 \(Linear\) "
                                         r"'weight'\): it was built before wnorm.apply") as said:
        before.step()
    assert said[0].filename == __file__
    after = torch.optim.Adam(net.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before.step()  # said once per optimizer
        after.step()  # built after apply: nothing to say
