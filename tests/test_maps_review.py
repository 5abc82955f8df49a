"""Review regressions for wnorm.maps: second derivatives and forward-mode AD of the weight."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import wnorm
from wnorm import maps

D = torch.float64


def _by_hand(g: torch.Tensor, v: torch.Tensor, dim: int | None) -> torch.Tensor:
    return v * (g / maps.norm(v, dim))  # eq. 2 written out: every order of derivative exact


@pytest.mark.parametrize(("shape", "dim"), [((4, 3), 0), ((4, 3), 1), ((4, 3, 2), 0),
                                            ((4, 3, 2), 2), ((5,), 0), ((4, 3), None)])
def test_weight_norm_second_derivatives_pass_gradgradcheck(shape, dim):
    # PyTorch's fused kernel (dim 0 or the last axis) differentiates its own backward with
    # ||v|| held constant: Hessian-vector products in v were wrong
    torch.manual_seed(0)
    v = torch.randn(*shape, dtype=D, requires_grad=True)
    g = (torch.rand_like(maps.norm(v.detach(), dim)) + 0.5).requires_grad_()
    m = maps.WeightNorm(dim)
    assert torch.autograd.gradcheck(lambda g, v: m.weight(g, v), (g, v))
    assert torch.autograd.gradgradcheck(lambda g, v: m.weight(g, v), (g, v))


def _hvp(params: list[torch.Tensor], loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(sum(gr.sum() for gr in grads), params)


def test_a_hessian_vector_product_of_a_weight_normalized_net_is_eq_2s():
    torch.manual_seed(0)
    net = wnorm.apply(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))).to(D)
    x = torch.randn(6, 4, dtype=D)
    names, params = zip(*net.named_parameters())
    got = _hvp(list(params), net(x).square().sum())
    ps = {n: p.detach().clone().requires_grad_() for n, p in zip(names, params)}

    def w(i: int) -> torch.Tensor:
        return _by_hand(ps[f"{i}.weight_g"], ps[f"{i}.weight_v"], 0)

    y = torch.tanh(x @ w(0).T + ps["0.bias"]) @ w(2).T + ps["2.bias"]
    want = _hvp([ps[n] for n in names], y.square().sum())
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, msg=n)
    with wnorm.cached():  # the cached weight's backward recomputes the map: the same
        got = _hvp(list(params), net(x).square().sum())
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, msg=n)


def test_torch_func_hessian_and_jvp_in_g_and_v():
    # forward-mode AD: PyTorch's fused kernel has no jvp rule (NotImplementedError), and
    # jacrev(jacrev) went through its constant-norm double backward
    torch.manual_seed(0)
    net = wnorm.apply(nn.Linear(3, 2)).to(D)
    x = torch.randn(5, 3, dtype=D)
    params = {k: p.detach() for k, p in net.named_parameters()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(net, p, (x,)).square().sum()

    def by_hand(p: dict[str, torch.Tensor]) -> torch.Tensor:
        w = _by_hand(p["weight_g"], p["weight_v"], 0)
        return (x @ w.T + p["bias"]).square().sum()

    tangents = {k: torch.randn_like(p) for k, p in params.items()}
    _, jv = torch.func.jvp(loss, (params,), (tangents,))
    torch.testing.assert_close(jv, torch.func.jvp(by_hand, (params,), (tangents,))[1])
    for transform in (torch.func.hessian, lambda f: torch.func.jacrev(torch.func.jacrev(f))):
        got, want = transform(loss)(params), transform(by_hand)(params)
        for a in params:
            for b in params:
                torch.testing.assert_close(got[a][b], want[a][b], msg=f"{a}, {b}")


@pytest.mark.parametrize("make", [wnorm.weight_norm, wnorm.centered_weight_norm,
                                  wnorm.forced_weight_norm])
def test_jvp_with_one_g_for_the_whole_weight_matches_finite_differences(make):
    # dim=None: norm_except_dim's forward-mode rule gave a tangent of shape [] for a norm of
    # shape [1, 1], and torch.func.jvp/hessian raised
    torch.manual_seed(0)
    net = make(nn.Linear(4, 3).to(D), dim=None)
    x = torch.randn(5, 4, dtype=D)
    params = {k: p.detach() for k, p in net.named_parameters()}

    def loss(v: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(net, {**params, "weight_v": v}, (x,)).square().sum()

    v, t = params["weight_v"], torch.randn_like(params["weight_v"])
    _, jv = torch.func.jvp(loss, (v,), (t,))
    fd = (loss(v + 1e-6 * t) - loss(v - 1e-6 * t)) / 2e-6
    torch.testing.assert_close(jv, fd, rtol=1e-6, atol=1e-8)
    assert torch.func.hessian(loss)(v).shape == (3, 4, 3, 4)


@pytest.mark.parametrize("block", [False, True])
def test_fast_weights_are_not_kept_alive_by_a_graph_kept_after_its_backward(block):
    # MAML: g and v computed from the parameters (not leaves). A hook holding them kept every
    # step's fast weights alive for as long as the user kept that step's loss (a log list)
    import weakref

    torch.manual_seed(0)
    net = wnorm.apply(nn.Linear(16, 16)).to(D)
    x = torch.randn(8, 16, dtype=D)
    params = dict(net.named_parameters())
    fast = {k: p * 1.0 for k, p in params.items()}  # one inner step's weights, in the graph
    alive = weakref.ref(fast["weight_v"])
    with wnorm.cached() if block else contextlib.nullcontext():  # the cached node held them too
        loss = torch.func.functional_call(net, fast, (x,)).square().sum()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    sum(gr.sum() for gr in grads).backward()
    kept = [loss]  # noqa: F841  the graph outlives its backward
    del fast
    assert alive() is None
    # and the second derivatives through them are eq. 2's
    ps = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    y = x @ _by_hand(ps["weight_g"] * 1.0, ps["weight_v"] * 1.0, 0).T + ps["bias"]
    gr = torch.autograd.grad(y.square().sum(), list(ps.values()), create_graph=True)
    sum(g_.sum() for g_ in gr).backward()
    for k in params:
        torch.testing.assert_close(params[k].grad, ps[k].grad, msg=k)


# --------------------------------------------------------------------------- _layouts
def _spectral_and_weight_norm() -> nn.Module:
    from torch.nn.utils import spectral_norm, weight_norm

    torch.manual_seed(0)
    net = nn.Sequential(spectral_norm(nn.Conv1d(2, 4, 3)), weight_norm(nn.Conv1d(4, 4, 3)),
                        nn.Conv1d(4, 3, 1))
    net(torch.randn(1, 2, 9))  # one power iteration: weight_u and weight_v hold values
    return net


@pytest.mark.parametrize("to", ["plain", "torch-old", "torch-new", "wnorm"])
def test_convert_keeps_a_spectral_norm_layer_as_it_is(to):
    # torch.nn.utils.spectral_norm saves weight_orig, weight_u and weight_v (HiFi-GAN's and
    # SN-GAN's discriminators): its weight_v was refused as half of a weight-norm pair
    sd = _spectral_and_weight_norm().state_dict()
    out = wnorm.convert_state_dict(sd, to=to)
    for k in ("0.weight_orig", "0.weight_u", "0.weight_v"):
        assert torch.equal(out[k], sd[k]), k
    assert not any(k.startswith("0.") and k not in sd for k in out)


def test_convert_of_plain_weights_leaves_a_spectral_norm_layers_weight_plain():
    # with no pair in the state dict, every plain weight is normalized: weight_orig became a
    # pair that no model has (0.parametrizations.weight_orig.original0)
    net = _spectral_and_weight_norm()
    torch.nn.utils.remove_weight_norm(net[1])
    sd = net.state_dict()
    out = wnorm.convert_state_dict(sd, to="torch-new")
    assert {k for k in out if k.startswith("0.")} == {"0.bias", "0.weight_orig", "0.weight_u",
                                                     "0.weight_v"}
    assert "1.parametrizations.weight.original0" in out
