"""Training on the hypersphere (wnorm/sphere.py): row norms after steps for every mode, forced
weight norm equal to its projection form, no host sync, any optimizer, and the errors."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn

import wnorm
from wnorm import WnormError
from wnorm._slot import slot
from wnorm.maps import norm
from wnorm.sphere import Projection, is_projected, project_, project_after_step
from wnorm.weight_norm import default_dim, reparameterize

D = torch.float64


def _rows(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    return t.reshape(1, -1) if dim is None else t.movedim(dim, 0).reshape(t.shape[dim], -1)


def _net() -> nn.Sequential:
    """Linear, Conv1d and ConvTranspose1d (units along dim 1): every output-unit layout."""
    return nn.Sequential(nn.Conv1d(3, 5, 3), nn.ReLU(), nn.ConvTranspose1d(5, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8, 6)).to(D)


def _x() -> torch.Tensor:
    return torch.randn(8, 3, 8, dtype=D)


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int = 5, x=None) -> None:
    x = _x() if x is None else x
    for _ in range(n):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, int | None]]:
    """name -> (the tensor projection acts on, its slice axis)."""
    out = {}
    for name, m in model.named_modules():
        if wnorm.is_weight_normalized(m, "weight"):
            out[name] = (m.weight_v, slot(m, "weight").map.dim)
        elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            out[name] = (m.weight, default_dim(m))
    return out


def _norms(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: _rows(t.detach(), d).norm(dim=1) for k, (t, d) in _weights(model).items()}


@pytest.mark.parametrize("mode", ["unit", "sqrt_fan_in", "initial", 0.7])
@pytest.mark.parametrize("wn", [False, True], ids=["plain", "weightnorm"])
def test_row_norms_after_steps_for_every_mode(mode, wn):
    net = _net()
    if wn:
        wnorm.apply(net)
    start = _norms(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    project_after_step(opt, net, radius=mode)
    _steps(net, opt)
    for name, n in _norms(net).items():
        t, d = _weights(net)[name]
        size = t.numel() // t.shape[d]
        want = {"unit": torch.ones_like(n), "sqrt_fan_in": torch.full_like(n, math.sqrt(size)),
                "initial": start[name], 0.7: torch.full_like(n, 0.7)}[mode]
        torch.testing.assert_close(n, want, rtol=1e-12, atol=1e-12)
    # the steps did move the directions: the projection is not a frozen model
    assert not torch.allclose(net[5].weight, _net()[5].weight)


def test_without_projection_plain_weight_norm_grows_v():
    """The contrast: weight norm's gradient is orthogonal to v, so SGD only grows ||v||."""
    net = wnorm.apply(_net())
    start = _norms(net)
    _steps(net, torch.optim.SGD(net.parameters(), lr=0.5))
    for name, n in _norms(net).items():
        assert (n > start[name]).all(), name


def test_projecting_v_leaves_every_wnorm_weight_as_it_is():
    """Every wnorm map is invariant to a positive rescaling of a slice of v."""
    torch.manual_seed(1)
    for method in (wnorm.weight_norm, wnorm.centered_weight_norm, wnorm.weight_standardization,
                   wnorm.forced_weight_norm, wnorm.family.balanced_weight_norm):
        net = wnorm.apply(_net(), method=method)
        with torch.no_grad():
            for m in net.modules():
                if wnorm.is_weight_normalized(m):  # put v off every sphere first, per slice
                    d = slot(m, "weight").map.dim
                    m.weight_v.mul_(torch.rand_like(norm(m.weight_v, d)) + 0.5)
        before = {k: m.weight.detach().clone() for k, m in net.named_modules()
                  if wnorm.is_weight_normalized(m)}
        project_(net, radius="unit")
        # weight standardization's eps (1e-10, added to the variance) is the one departure
        tol = 1e-7 if method is wnorm.weight_standardization else 1e-13
        for k, m in net.named_modules():
            if k in before:
                torch.testing.assert_close(m.weight, before[k], rtol=tol, atol=tol)


def test_embedding_lstm_and_ties_are_projected_once():
    emb = nn.Embedding(10, 6).to(D)
    head = nn.Linear(6, 10, bias=False).to(D)
    head.weight = emb.weight  # tied: one Parameter, projected once, both holders covered
    lstm = nn.LSTM(6, 6, num_layers=2).to(D)
    model = nn.ModuleDict({"emb": emb, "lstm": lstm, "head": head})
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    proj = project_after_step(opt, model, radius="unit", types=(nn.Embedding, nn.LSTM, nn.Linear))
    assert proj.names == ["emb.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0",
                          "lstm.weight_ih_l1", "lstm.weight_hh_l1"]
    assert is_projected(emb, "weight") and is_projected(head, "weight")
    for _ in range(3):
        opt.zero_grad()
        h, _ = lstm(emb(torch.randint(0, 10, (5, 2))))
        (head(h).pow(2).mean() + h.pow(2).mean()).backward()
        opt.step()
    for name in proj.names:
        t = model.get_parameter(name)
        torch.testing.assert_close(t.norm(dim=1), torch.ones(t.shape[0], dtype=D))


class _HandWN(nn.Module):
    """w = g v/||v|| written out, for the reference trajectory (no wnorm)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        w = lin.weight.detach()
        self.g = nn.Parameter(w.norm(dim=1, keepdim=True).clone())
        self.v = nn.Parameter(w * (math.sqrt(w.shape[1]) / w.norm(dim=1, keepdim=True)))
        self.b = nn.Parameter(lin.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.g * self.v / self.v.norm(dim=1, keepdim=True), self.b)


@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adam", "adamw-fused"])
def test_forced_weight_norm_is_its_map_plus_the_projection(opt_name):
    """forced_weight_norm + project_after_step trains exactly as w = g v/||v|| with v
    renormalized to sqrt(fan-in) by hand after every step."""
    make = {"sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=0.05),
            "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.05, fused=True)}[opt_name]
    dtype = torch.float32 if opt_name == "adamw-fused" else D
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)
    torch.manual_seed(3)
    layers = [nn.Linear(9, 7).to(dtype), nn.Linear(7, 3).to(dtype)]
    hand = [_HandWN(lin) for lin in layers]
    forced = nn.Sequential(*[wnorm.forced_weight_norm(copy.deepcopy(lin)) for lin in layers])
    ref = nn.Sequential(*hand)
    opt_f, opt_r = make(list(forced.parameters())), make([p for h in hand for p in
                                                          (h.g, h.v, h.b)])
    project_after_step(opt_f, forced)
    x = torch.randn(16, 9, dtype=dtype)
    for _ in range(6):
        for model, opt in ((forced, opt_f), (ref, opt_r)):
            opt.zero_grad()
            torch.tanh(model(x)).pow(2).mean().backward()
            opt.step()
        with torch.no_grad():
            for h in hand:
                h.v.mul_(math.sqrt(h.v.shape[1]) / h.v.norm(dim=1, keepdim=True))
        for f, h in zip(forced, hand):
            torch.testing.assert_close(f.weight_v, h.v, **tol)
            torch.testing.assert_close(f.weight_g, h.g, **tol)
            torch.testing.assert_close(f.bias, h.b, **tol)


def test_reading_the_weight_and_a_forward_never_change_a_parameter():
    """Forced WN used to renormalize v in a forward pre-hook; now nothing but the projection
    after a step writes v, so a forward or a read leaves every parameter bitwise as it was."""
    layer = wnorm.forced_weight_norm(nn.Linear(6, 4)).train()
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    project_after_step(opt, layer)
    with torch.no_grad():
        layer.weight_v.mul_(3.0)  # off its sphere, as between a write and the next step
    before = {k: p.detach().clone() for k, p in layer.named_parameters()}
    _ = layer.weight
    layer(torch.randn(3, 6)).sum().backward()
    with torch.no_grad():
        layer(torch.randn(3, 6))
    for k, p in layer.named_parameters():
        assert torch.equal(p, before[k]), k


def test_a_forced_layer_trained_without_projection_warns_once_and_with_one_does_not():
    torch.manual_seed(0)
    net = nn.Sequential(wnorm.forced_weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"Linear: 'weight_v' of forced_weight_norm is "
                                         r"trained, but nothing puts it back on its sphere"):
        net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(x)  # once per layer
        fresh = nn.Sequential(wnorm.forced_weight_norm(nn.Linear(4, 4)))
        opt = torch.optim.Adam(fresh.parameters())
        fresh.eval()(x)  # eval, or no grad: not training, no warning
        with torch.no_grad():
            fresh.train()(x)
        proj = project_after_step(opt, fresh)
        fresh.train()(x)
        assert is_projected(fresh[0], "weight_v")
    proj.remove()
    assert not is_projected(fresh[0], "weight_v")
    with pytest.warns(UserWarning, match="nothing puts it back"):
        fresh(x)


def test_remove_stops_projecting():
    net = wnorm.apply(_net())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    proj = project_after_step(opt, net, radius="initial")
    start = _norms(net)
    proj.remove()
    _steps(net, opt, 2)
    assert all((n > start[k]).all() for k, n in _norms(net).items())


def test_the_projection_does_no_host_sync(monkeypatch):
    """No op in the projection makes the host wait for the device (an .item(), a bool(), a
    boolean-mask index, ...: test_engines.py's counter), as on a GPU, where a weight read
    before it is landed without asking whether it was written: any would stall a CUDA stream
    every step."""
    from test_engines import syncs

    monkeypatch.setattr("wnorm._held._COMPARE_ON", ())
    net = wnorm.apply(_net(), method=wnorm.forced_weight_norm)
    net[5] = wnorm.remove_weight_norm(net[5])
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    start = net[5].weight.detach().norm(dim=1)
    # one weight on two spheres is refused: "initial" holds the plain layer, "unit" the others
    projs = [project_after_step(opt, net, radius="initial", include="5"),
             project_after_step(opt, net, radius="unit", exclude="5")]
    _steps(net, opt, 1)
    _ = net[0].weight  # a read for logging is held: the projection lands it first

    def sync(*a, **k):
        raise AssertionError("host sync in the projection")

    # on the CPU these read the data without the dispatcher, unseen by the counter
    for name in ("tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    assert syncs(lambda: [p() for p in projs]) == []
    monkeypatch.undo()
    torch.testing.assert_close(net[5].weight.norm(dim=1), start)
    torch.testing.assert_close(net[0].weight_v.norm(dim=(1, 2)), torch.full((5,), 3.0, dtype=D))


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.5, foreach=False),
    lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, fused=True),
    lambda p: torch.optim.Adam(p, lr=0.05, foreach=True),
    lambda p: torch.optim.Adam(p, lr=0.05, fused=True),
    lambda p: torch.optim.RMSprop(p, lr=0.01),
], ids=["sgd", "sgd-fused", "adam-foreach", "adam-fused", "rmsprop"])
def test_any_optimizer(make):
    net = _net().float()
    opt = make(net.parameters())
    project_after_step(opt, net, radius="unit")
    _steps(net, opt, 3, _x().float())
    for n in _norms(net).values():
        torch.testing.assert_close(n, torch.ones_like(n))


def test_bfloat16_rows_land_on_the_sphere_to_bfloat16_precision():
    net = _net().to(torch.bfloat16)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    project_after_step(opt, net, radius="sqrt_fan_in")
    _steps(net, opt, 2, _x().to(torch.bfloat16))
    for k, (t, d) in _weights(net).items():
        n = _rows(t.detach().float(), d).norm(dim=1)
        size = t.numel() // t.shape[d]
        torch.testing.assert_close(n, torch.full_like(n, math.sqrt(size)), rtol=2e-2, atol=0)


def test_one_projection_per_optimizer_covers_what_it_updates():
    net = _net()
    body = [p for n, p in net.named_parameters() if not n.startswith("5.")]
    opt_a, opt_b = torch.optim.SGD(body, lr=0.5), torch.optim.Adam(net[5].parameters(), lr=0.1)
    pa = project_after_step(opt_a, net, radius="unit")
    pb = project_after_step(opt_b, net, radius=2.0)
    assert pa.names == ["0.weight", "2.weight"] and pb.names == ["5.weight"]
    x = _x()
    for _ in range(3):
        opt_a.zero_grad(), opt_b.zero_grad()
        net(x).pow(2).mean().backward()
        opt_a.step(), opt_b.step()
    n = _norms(net)
    torch.testing.assert_close(n["0"], torch.ones_like(n["0"]))
    torch.testing.assert_close(n["5"], torch.full_like(n["5"], 2.0))
    assert isinstance(pa, Projection) and "0.weight" in repr(pa)


def test_include_exclude_and_forced_layers_by_default():
    net = _net()
    wnorm.forced_weight_norm(net[0], radius=1.5)
    before = net[5].weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    assert project_after_step(opt, net).names == ["0.weight_v"]  # radius None: forced only
    assert project_after_step(opt, net, radius="unit", exclude="5").names == \
        ["0.weight_v", "2.weight"]
    assert project_after_step(opt, net, radius="unit", include=["5"]).names == ["5.weight"]
    two = nn.Sequential(nn.Linear(2, 2), nn.Conv1d(2, 2, 1))
    lin = two[0].weight.detach().clone()
    project_(two, 1.0, types=nn.Conv1d)  # one type, not a tuple of them
    torch.testing.assert_close(two[1].weight.norm(dim=(1, 2)), torch.ones(2))
    assert torch.equal(two[0].weight, lin)
    torch.testing.assert_close(net[5].weight, before / before.norm(dim=1, keepdim=True))
    _steps(net, opt, 2)
    torch.testing.assert_close(_rows(net[0].weight_v.detach(), 0).norm(dim=1),
                               torch.full((5,), 1.5, dtype=D))


def test_include_takes_any_name_of_a_shared_layer_and_refuses_a_typo_as_apply_does():
    lin = nn.Linear(3, 3)
    net = nn.Module()
    net.enc, net.dec = nn.Sequential(lin), nn.Sequential(lin)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    assert project_after_step(opt, net, radius="unit", include="dec.*").names == ["enc.0.weight"]
    with pytest.raises(WnormError, match=r"project_: include entry 'dex\.\*' matches no module"):
        project_(net, "unit", include=["dec.*", "dex.*"])


def test_exclude_covers_the_layers_inside_a_module_and_refuses_a_typo_as_apply_does():
    # the docs say "as in wnorm.apply", but excluding a block projected its layers anyway and a
    # pattern matching nothing excluded nothing without a word
    net = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    assert project_after_step(opt, net, radius="unit", exclude="0").names == ["1.weight"]
    with pytest.raises(WnormError, match="no weight of Sequential was selected"):
        project_after_step(opt, net, radius="unit", exclude=nn.Sequential)  # the root too
    inner = net[0][0].weight.detach().clone()
    project_(net, 1.0, exclude=["0"])
    assert torch.equal(net[0][0].weight, inner)
    for fn in (lambda: project_(net, 1.0, exclude="O"),
               lambda: project_after_step(opt, net, radius="unit", exclude=[nn.Conv2d])):
        with pytest.raises(WnormError, match=r"exclude entry ('O'|Conv2d) matches no module of "
                                             r"Sequential \(a typo\?\)"):
            fn()


def test_project_now_and_its_errors():
    lin = nn.Linear(4, 3)
    assert project_(lin, 2.0) is lin
    torch.testing.assert_close(lin.weight.norm(dim=1), torch.full((3,), 2.0))
    with pytest.raises(WnormError, match="radius='initial' holds each slice at its norm when "
                                         "the projection starts"):
        project_(lin, "initial")
    for bad in (0, -1.0, math.nan, math.inf, "fan_in", True):
        with pytest.raises(WnormError, match=r"radius must be None, one of \['unit', "
                                             rf"'sqrt_fan_in', 'initial'\] or a finite number > "
                                             rf"0; got {bad!r}"):
            project_(lin, bad)
    with pytest.raises(WnormError, match="has no forced_weight_norm layer, and radius=None"):
        project_(lin)
    with pytest.raises(WnormError, match=r"dim must be None or an axis 0..1 of 'weight' of "
                                         r"shape \(3, 4\); got 2"):
        project_(lin, "unit", dim=2)
    with pytest.raises(WnormError, match="include: expected glob patterns"):
        project_(lin, "unit", include=[3])
    emb = nn.Embedding(5, 3, padding_idx=1)
    with pytest.raises(WnormError, match=r"emb.weight: 1 of 5 slices have norm 0 \(indices "
                                         r"\[1\]\).*padding_idx"):
        project_(nn.ModuleDict({"emb": emb}), "unit", types=(nn.Embedding,))
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(WnormError, match=r"SGD updates none of the 1 selected weights \(weight\)"):
        project_after_step(opt, lin, "unit")
    with pytest.raises(WnormError, match="optimizer must be a torch.optim.Optimizer; got Linear"):
        project_after_step(lin, opt, "unit")  # type: ignore[arg-type]


def test_a_tie_projected_two_ways_is_an_error():
    conv = nn.Conv2d(4, 4, 3)
    convt = nn.ConvTranspose2d(4, 4, 3)
    convt.weight = conv.weight  # dim 0 for one, dim 1 for the other
    with pytest.raises(WnormError, match=r"b.weight is the same Parameter as a.weight, but they "
                                         r"are projected differently \(dim 1 vs 0"):
        project_(nn.ModuleDict({"a": conv, "b": convt}), "unit")


def test_a_map_that_is_not_scale_invariant_is_refused():
    class Raw(wnorm.maps.Map):
        kind = "raw"

        def weight(self, g, v):
            return v

        def split(self, w):
            return None, w

    lin = nn.Linear(3, 2)
    reparameterize(lin, "weight", 0, Raw)
    with pytest.raises(WnormError, match=r"Raw\(dim=0\), whose weight changes when slices of "
                                         r"'weight_v' are rescaled"):
        project_(lin, "unit")


@pytest.mark.parametrize("eps, radius", [(1e-5, "unit"), (1e-10, 1e-4)])
def test_weight_standardization_is_projected_only_where_its_eps_is_negligible(eps, radius):
    # (v - mean)/sqrt(var + eps) is scale invariant only while eps << var: eps=1e-5 on unit
    # rows moved a conv's weight by 3%, a radius of 1e-4 at the default eps by 36%, where
    # projecting "leaves its weight as it is"
    conv = wnorm.weight_standardization(nn.Conv2d(16, 4, 3), eps=eps)
    before = conv.state_dict()
    with pytest.raises(WnormError, match=r"0.weight_v|weight_v: putting the slices of this "
                                         r"weight standardization's v .* would change its weight"):
        project_(nn.Sequential(conv), radius)
    assert all(torch.equal(conv.state_dict()[k], v) for k, v in before.items())
    for ok in ("unit", "sqrt_fan_in", "initial") if eps == 1e-10 else ("initial",):
        ws = wnorm.weight_standardization(nn.Conv2d(16, 4, 3), eps=eps)
        w = ws.weight.detach().clone()
        opt = torch.optim.SGD(ws.parameters(), lr=0.0)
        project_after_step(opt, ws, radius=ok)
        torch.testing.assert_close(ws.weight, w, rtol=1e-5, atol=1e-6)


def test_a_projection_whose_optimizer_is_gone_no_longer_holds_its_weights():
    """A second training stage with a new optimizer: the projection on the first one (kept
    alive by the user's variable) projects nothing after steps, so forced WN must warn."""
    import gc

    torch.manual_seed(0)
    layer = wnorm.forced_weight_norm(nn.Linear(16, 4))
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    proj = project_after_step(opt, layer)
    assert is_projected(layer, "weight_v")
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)  # stage 2; `proj` is still referenced
    gc.collect()
    assert proj._handle.hooks_dict_ref() is None  # the first optimizer is gone
    assert not wnorm.is_projected(layer, "weight_v")
    with pytest.warns(UserWarning, match="nothing puts it back on its sphere"):
        layer(torch.randn(8, 16))
    # nor does it hold the weight against a new projection, on any sphere
    project_after_step(opt, layer, radius="unit", dim=None)
    project_after_step(opt, layer)
    _steps(layer, opt, 2, torch.randn(8, 16))
    torch.testing.assert_close(layer.weight_v.norm(dim=1), torch.full((4,), 4.0))


@pytest.mark.parametrize("radius, what", [(1e6, r"300 entries would overflow to inf \(the "
                                                 r"largest torch.float16 is 65504\)"),
                                          (1e-7, r"6 of its 6 slices would round to all zeros")])
@pytest.mark.parametrize("wn", [False, True], ids=["plain", "weightnorm"])
def test_a_radius_float16_cannot_hold_is_refused_naming_the_layer(radius, what, wn):
    # v became inf (weight NaN) at 1e6; every row of v rounded to 0 (weight NaN) at 1e-7
    torch.manual_seed(0)
    lin = nn.Linear(50, 6).half()
    net = nn.Sequential(wnorm.weight_norm(lin) if wn else lin)
    before = copy.deepcopy(net.state_dict())
    pname = "weight_v" if wn else "weight"
    for register in (lambda: project_(net, radius),
                     lambda: project_after_step(torch.optim.SGD(net.parameters()), net, radius)):
        with pytest.raises(WnormError, match=rf"0.{pname} \(Linear, torch.float16\): on spheres "
                                             rf"of radius {re.escape(f'{radius:g}')}, "
                                             rf".*{what}"):
            register()
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_a_float16_radius_whose_entries_fit_is_held_though_its_scale_would_not():
    # a row of norm ~0.6 scaled to 5e4: the scale (~8e4) overflows float16, the entries do not
    torch.manual_seed(0)
    for net in (nn.Linear(50, 6).half(), wnorm.weight_norm(nn.Linear(50, 6)).half()):
        w = net.weight.detach().clone()
        project_(net, 5e4)
        t = net.weight_v if wnorm.is_weight_normalized(net) else net.weight
        torch.testing.assert_close(t.detach().float().norm(dim=1), torch.full((6,), 5e4),
                                   rtol=1e-3, atol=0)
        if t is not net.weight:  # projecting v leaves a wnorm weight as it was
            torch.testing.assert_close(net.weight, w, rtol=1e-3, atol=1e-4)


def test_a_weight_held_by_a_live_projection_is_not_held_on_another_sphere():
    # a second registration with another radius used to replace the first one's after every
    # step without a word (the last registered won)
    torch.manual_seed(0)
    m = wnorm.weight_norm(nn.Linear(6, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    held = [project_after_step(opt, m, radius="unit")]
    for radius, want in [(3.0, "radius 3 along dim 0"), (0.5, "radius 0.5 along dim 0"),
                         ("initial", None), (1.0, None), (torch.tensor(1.0), None)]:
        if want is None:  # the same spheres again: allowed, only redundant
            held.append(project_after_step(opt, m, radius=radius))
            continue
        with pytest.raises(WnormError, match=r"weight_v is already held by a live projection on "
                                             r"this optimizer \(Projection\(1 tensors: "
                                             r"weight_v\)\) at radius 1 along dim 0; this one "
                                             rf"would hold it at {want}.*\.remove\(\)"):
            project_after_step(opt, m, radius=radius)
    with pytest.raises(WnormError, match="already held by a live projection"):
        project_after_step(opt, m, radius=2.0)  # by any of the four
    _steps(m, opt, 2, torch.randn(4, 6))
    torch.testing.assert_close(m.weight_v.norm(dim=1), torch.ones(3))
    # along another dim, and from another optimizer that is still alive
    plain = nn.Linear(6, 3)
    opt_a, opt_b = (torch.optim.SGD(plain.parameters(), lr=0.1) for _ in range(2))
    project_after_step(opt_a, plain, radius="unit")
    with pytest.raises(WnormError, match=r"weight is already held by a live projection on "
                                         r"another optimizer, still alive .* at radius 1 along "
                                         r"dim 0; this one would hold it at radius 1 along the "
                                         r"whole tensor"):
        project_after_step(opt_b, plain, radius="unit", dim=None)
    for p in held:
        p.remove()
    project_after_step(opt, m, radius=3.0)  # removed: the weight is free for another sphere
    _steps(m, opt, 1, torch.randn(4, 6))
    torch.testing.assert_close(m.weight_v.norm(dim=1), torch.full((3,), 3.0))


def test_a_zero_dimensional_tensor_radius_is_a_number_and_is_projected_is_public():
    lin = nn.Linear(4, 3)
    project_(lin, torch.tensor(2.0))
    torch.testing.assert_close(lin.weight.norm(dim=1), torch.full((3,), 2.0))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    project_after_step(opt, lin, radius=torch.tensor(2, requires_grad=False))
    for bad in (torch.tensor([2.0]), torch.tensor(-1.0), torch.tensor(True)):
        with pytest.raises(WnormError, match=r"radius must be None, one of .* got tensor"):
            project_(lin, bad)
    assert wnorm.is_projected is is_projected and "is_projected" in wnorm.__all__
    assert wnorm.is_projected(lin, "weight")


def test_a_second_stage_projection_is_not_refused_for_an_optimizer_awaiting_collection():
    # a dropped optimizer with an LR scheduler lives in a reference cycle until the collector
    # runs: its projection counted as live, and the new stage's radius was refused
    import gc

    torch.manual_seed(0)
    m = wnorm.apply(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    was = gc.isenabled()
    gc.disable()  # as between two automatic collections
    try:
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, 10)
        wnorm.project_after_step(opt, m, radius="unit")
        m(torch.randn(3, 8)).sum().backward()
        opt.step()
        sched.step()
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)  # stage 2: the first dropped
        sched = torch.optim.lr_scheduler.StepLR(opt, 10)  # noqa: F841
        wnorm.project_after_step(opt, m, radius="sqrt_fan_in")
    finally:
        if was:
            gc.enable()
    m(torch.randn(3, 8)).sum().backward()
    opt.step()
    torch.testing.assert_close(m[0].weight_v.norm(dim=1), torch.full((8,), 8 ** 0.5))


def test_project_with_an_optimizer_first_points_to_project_after_step():
    # it blamed radius and printed the model's repr
    net = nn.Sequential(nn.Linear(4, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(WnormError, match=r"project_: takes \(model, radius\), and got an "
                                         r"optimizer first; .*project_after_step"):
        wnorm.project_(opt, net)
    with pytest.raises(WnormError, match=r"radius must be .*; got Sequential$"):
        wnorm.project_(net, net)


def test_is_projected_of_a_name_the_module_lacks_is_an_error_not_false():
    # a typo, or the container instead of the layer, read as "not projected"
    net = nn.Sequential(wnorm.forced_weight_norm(nn.Linear(4, 3)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    wnorm.project_after_step(opt, net)
    assert wnorm.is_projected(net[0], "weight_v")
    for module, name in ((net[0], "wieght_v"), (net, "weight_v")):
        with pytest.raises(WnormError, match=rf"is_projected: \w+ has no parameter named "
                                             rf"'{name}' of its own"):
            wnorm.is_projected(module, name)
