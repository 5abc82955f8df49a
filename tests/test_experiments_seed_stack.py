"""experiments.seed_stack: S seeds side by side compute exactly what the S networks compute,
through the data-dependent init, the forward (train and eval), the gradients and an Adam step,
for every variant it accepts; and it refuses what it cannot stack."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import wnorm
from wnorm import WnormError
from experiments.nets import build, initialize
from experiments.seed_stack import (STACKABLE, SeedDropout, SeedNoise, draw_ahead, seed_state_dict,
                                   stack, stack_inputs)

WIDTH, SEEDS = 0.05, (0, 1, 2)


def _nets(variant: str) -> list:
    """The seeds' networks in float64: in float32 the other summation order moves a few
    pre-activations across the leaky ReLU's kink, and their gradients by 10x."""
    nets = []
    for s in SEEDS:  # noise and dropout off: the stack draws its own random numbers
        torch.manual_seed(s)
        nets.append(build(variant, 1, WIDTH, noise=0.0, dropout=0.0).double())
    return nets


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=what)


@pytest.mark.parametrize("variant", STACKABLE)
def test_a_stack_trains_exactly_like_its_seeds(variant: str) -> None:
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(len(SEEDS), 40, 1, 16, 16, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 10, (len(SEEDS), 40), generator=g)
    nets = _nets(variant)
    model = stack(nets)
    assert model.variant == variant and model.seeds == len(SEEDS)
    # the data-dependent init, each seed on its own batch
    for net, x in zip(nets, xs):
        initialize(net, x[:20])
    initialize(model, stack_inputs(xs[:, :20]))
    for i, net in enumerate(nets):
        for k, v in seed_state_dict(model, i, net).items():
            _close(v, net.state_dict()[k], f"{variant} seed {i} after init: {k}")
    # a training step: forward, per-seed losses summed, backward: each seed's gradient is its
    # own network's (an SGD step then moves both alike; Adam is elementwise, but its first
    # step, lr * sign(gradient), turns rounding in a near-zero gradient into a full step)
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if variant == "forced":  # its rows go back on their spheres after the step, seed by seed
        for o, n in zip([opt, *opts], [model, *nets]):
            wnorm.project_after_step(o, n)
    out = model.train()(stack_inputs(xs[:, 20:]))  # (N, S, 10)
    losses = F.cross_entropy(out.permute(0, 2, 1), ys[:, 20:].T, reduction="none").mean(0)
    opt.zero_grad()
    losses.sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    opt.step()
    for i, (net, o) in enumerate(zip(nets, opts)):
        logits = net.train()(xs[i, 20:])
        _close(out[:, i], logits, f"{variant} seed {i}: training logits")
        o.zero_grad()
        F.cross_entropy(logits, ys[i, 20:]).backward()
        for k, p in net.named_parameters():
            _close(grads[k].chunk(len(SEEDS))[i].reshape(p.shape), p.grad,
                   f"{variant} seed {i}: d{k}")
        o.step()
        for k, v in seed_state_dict(model, i, net).items():
            _close(v, net.state_dict()[k], f"{variant} seed {i} after a step: {k}")
    # eval mode (running statistics) on one batch shared by all seeds
    x = xs[0, :8]
    out = model.eval()(stack_inputs(x.expand(len(SEEDS), *x.shape)))
    for i, net in enumerate(nets):
        _close(out[:, i], net.eval()(x), f"{variant} seed {i}: eval logits")


def test_the_stack_is_one_network_of_grouped_layers() -> None:
    model = stack(_nets("wn+meanonly"))
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 10 and {c.groups for c in convs} == {3}  # 9 convs + the dense layer
    assert convs[1].weight_v.shape == (3 * 5, 5, 3, 3)  # width 0.05: 5 channels a seed
    assert convs[1].weight_v.dtype == torch.float64  # the seeds' dtype


def test_what_cannot_be_stacked_is_refused() -> None:
    with pytest.raises(WnormError, match="'arpit' cannot be stacked"):
        stack([build("arpit", 1, WIDTH)])
    with pytest.raises(WnormError, match="same variant and shape"):
        stack([build("normal", 1, WIDTH), build("weightnorm", 1, WIDTH)])
    with pytest.raises(WnormError, match="same variant and shape"):
        stack([build("normal", 1, WIDTH), build("normal", 1, 2 * WIDTH)])
    with pytest.raises(WnormError, match="no networks"):
        stack([])


@pytest.mark.parametrize("variant", ["weightnorm", "batchnorm"])
def test_each_seed_draws_its_own_noise_and_dropout(variant: str) -> None:
    """With noise and dropout on, seed s of a stack given one generator per seed draws what its
    own network draws from the global generator in that state: through the data init and a
    training step, whatever the other seeds of the stack."""
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(len(SEEDS), 30, 1, 16, 16, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 10, (len(SEEDS), 10), generator=g)
    nets = []
    for s in SEEDS:
        torch.manual_seed(s)
        nets.append(build(variant, 1, WIDTH, noise=0.15, dropout=0.5).double())
    streams = [torch.Generator().manual_seed(100 + s) for s in SEEDS]
    model = stack(nets, streams)
    initialize(model, stack_inputs(xs[:, :20]))
    for s, net, x in zip(SEEDS, nets, xs):
        torch.manual_seed(100 + s)
        initialize(net, x[:20])
    for i, net in enumerate(nets):
        for k, v in seed_state_dict(model, i, net).items():
            _close(v, net.state_dict()[k], f"{variant} seed {i} after init: {k}")
    for s, st in zip(SEEDS, streams):
        st.manual_seed(200 + s)
    out = model.train()(stack_inputs(xs[:, 20:]))
    losses = F.cross_entropy(out.permute(0, 2, 1), ys.T, reduction="none").mean(0)
    losses.sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    for i, (s, net) in enumerate(zip(SEEDS, nets)):
        torch.manual_seed(200 + s)
        logits = net.train()(xs[i, 20:])
        _close(out[:, i], logits, f"{variant} seed {i}: training logits, noise and dropout on")
        F.cross_entropy(logits, ys[i]).backward()
        for k, p in net.named_parameters():
            _close(grads[k].chunk(len(SEEDS))[i].reshape(p.shape), p.grad,
                   f"{variant} seed {i}: d{k}, noise and dropout on")


def _noisy_stack(variant: str = "weightnorm") -> tuple[torch.nn.Module, list, torch.Tensor]:
    """A small stack of 2 seeds with noise and dropout on, data-initialized, its streams and
    an input (float64, as :func:`_nets`: aot_eager computes the weight norm in other ops)."""
    nets = []
    for s in SEEDS[:2]:
        torch.manual_seed(s)
        nets.append(build(variant, 1, WIDTH, noise=0.15, dropout=0.5).double())
    streams = [torch.Generator().manual_seed(100 + s) for s in SEEDS[:2]]
    x = stack_inputs(torch.randn(2, 6, 1, 12, 12, generator=torch.Generator().manual_seed(7),
                                 dtype=torch.float64))
    model = stack(nets, streams)
    initialize(model, x)  # outputs of order 1, so that a tolerance does not hide a wrong draw
    return model.train(), streams, x


def _states(streams: list) -> list[torch.Tensor]:
    return [g.get_state() for g in streams]


def test_draws_made_ahead_leave_the_compiled_forward_without_graph_breaks() -> None:
    model, _, x = _noisy_stack()
    draw_ahead(model, x)  # the first forward on this input draws in its layers, and records
    model(x)
    torch._dynamo.reset()
    try:
        draw_ahead(model, x)
        explained = torch._dynamo.explain(model)(x)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("variant", ["weightnorm", "batchnorm"])
def test_the_compiled_forward_draws_what_the_eager_one_draws(variant: str) -> None:
    """Compiled with the draws made ahead: each step's outputs, gradients and every stream's
    state after it are the eager forward's (which draws in its layers), with one compilation
    for all steps."""
    model, streams, x = _noisy_stack(variant)
    draw_ahead(model, x)
    model(x)  # records the layers' inputs
    start = _states(streams)
    eager = []
    for _ in range(2):
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        eager.append((out.detach(), grads, _states(streams)))
    for g, st in zip(streams, start):
        g.set_state(st)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    try:
        compiled = torch.compile(model, backend=counter)
        for step, (out_e, grads_e, states_e) in enumerate(eager):
            draw_ahead(model, x)
            out = compiled(x)
            grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
            _close(out, out_e, f"step {step}: outputs")
            for g, g_e in zip(grads, grads_e):
                _close(g, g_e, f"step {step}: gradients")
            for s, (st, st_e) in enumerate(zip(_states(streams), states_e)):
                assert torch.equal(st, st_e), f"step {step}: stream of seed {s}"
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1  # fresh draws each step: no recompilation


def test_draws_ahead_follow_the_input_and_eval_draws_nothing() -> None:
    model, streams, x = _noisy_stack()
    # eval: nothing drawn, no stream moved
    before = _states(streams)
    draw_ahead(model.eval(), x)
    model(x)
    assert all(torch.equal(a, b) for a, b in zip(_states(streams), before))
    model.train()
    # inputs of two shapes, each new then known: the eager forward's draws, shaped for each
    for xn in (x, x[:4], x, x[:4]):
        start = _states(streams)
        draw_ahead(model, xn)
        out = model(xn)
        for g, st in zip(streams, start):
            g.set_state(st)
        torch.testing.assert_close(out, model(xn), rtol=0, atol=0)
    # drawn for one input, run on another: an error naming the layer, never a wrong shape
    draw_ahead(model, x)
    with pytest.raises(WnormError, match=r"SeedStack\[0\].*\(4, 2, 12, 12\)"):
        model(x[:4])


def test_an_eval_forward_after_a_recording_call_records_nothing() -> None:
    # draw_ahead on a new input arms the layers to record; an eval forward on another input
    # then came between, and the next training forward recorded its own shape under the first
    # input's key: every later draw_ahead on that input failed, moving the generators
    model, streams, x = _noisy_stack()
    draw_ahead(model, x)
    model.eval()
    model(x[:2])
    model.train()
    model(x[:4])  # no draw_ahead before it: draws in its layers, records nothing
    for _ in range(2):
        draw_ahead(model, x)  # records at this forward, then draws ahead at the next call
        model(x)


def test_draw_ahead_reaches_the_layers_of_a_wrapped_or_compiled_model() -> None:
    model, _, x = _noisy_stack()
    draw_ahead(model, x)
    model(x)  # records
    for wrapped in (torch.nn.Sequential(model), torch.compile(model, backend="eager")):
        draw_ahead(wrapped, x)
        layers = [m for m in model if isinstance(m, (SeedNoise, SeedDropout))]
        assert layers and all(m._ahead is not None for m in layers)
    torch._dynamo.reset()
