"""SyncMeanOnlyBatchNorm: the batch mean over every rank, on 2 CPU processes over gloo.

The property: ranks holding shares of a batch compute what one process computes on the whole
batch with :class:`wnorm.MeanOnlyBatchNorm2d`/``1d`` (outputs, input gradients, parameter
gradients, running means), whatever the shares' sizes, an empty share included; DDP training
with it equals one process training on the global batches. Without a process group it is the
plain layer, bit for bit (checked here in one process, fast).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
from torch import nn

import wnorm
from conftest import spawn_ranks
from wnorm.mean_only_bn import MeanOnlyBatchNormBase

WORLD = 2
SPLITS = {"even": (8, 8), "uneven": (3, 5), "empty": (0, 6)}
STEPS = 3


def plain_net() -> nn.Sequential:
    """Conv -> mean-only 2d -> flatten -> Linear -> mean-only 1d -> Linear, weight-normalized
    (v and g from seed 0)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), wnorm.MeanOnlyBatchNorm2d(4),
                        nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(4 * 4 * 4, 5, bias=False),
                        wnorm.MeanOnlyBatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        for m in net:
            if isinstance(m, wnorm.MeanOnlyBatchNorm1d | wnorm.MeanOnlyBatchNorm2d):
                m.bias.uniform_(-1, 1)  # a bias that matters, in its gradient too
    return wnorm.apply(net)


def synced_net(group=None) -> nn.Module:
    return wnorm.SyncMeanOnlyBatchNorm.convert_sync_batchnorm(plain_net(), group)


def inputs(n: int, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A global batch of n images whose halves differ in distribution (so that local means
    differ from the global one), targets, and fixed output weights for a linear loss."""
    gen = torch.Generator().manual_seed(100 + salt)
    x = torch.randn(n, 3, 6, 6, generator=gen)
    x[n // 2:] = 3.0 * x[n // 2:] + 2.0
    return x, torch.randint(0, 3, (n,), generator=gen), torch.randn(n, 3, generator=gen)


def share(t: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def _buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: b.clone() for k, b in net.named_buffers()}


def _penalty_grads(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of a gradient penalty, sum of (d sum(out**3) / dx)**2 (WGAN-GP's shape)."""
    x = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(net(x).pow(3).sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
    return _grads(net)


# --------------------------------------------------------------------------- the worker
def _worker(rank: int) -> dict[str, object]:
    result: dict[str, object] = {}
    for case, sizes in SPLITS.items():
        net = synced_net()
        x, _, c = inputs(sum(sizes))
        xr = share(x, sizes, rank).requires_grad_()
        out = net(xr)
        (out * share(c, sizes, rank)).sum().backward()
        result[case] = {"out": out.detach(), "x.grad": xr.grad, "grads": _grads(net),
                        "buffers": _buffers(net)}
    # bfloat16 activations (autocast's): sums and counts travel in float32
    x, _, c = inputs(8)
    bn = wnorm.SyncMeanOnlyBatchNorm(3)
    xr = share(x, SPLITS["uneven"], rank).to(torch.bfloat16).requires_grad_()
    out = bn(xr)
    (out.float() * share(c, SPLITS["uneven"], rank)[:, :, None, None]
     .expand(-1, -1, 6, 6)[:, :3]).sum().backward()
    result["bf16"] = {"out": out.detach(), "x.grad": xr.grad, "running_mean": bn.running_mean}
    # a training forward and backward make no host sync (the collectives wait on the device)
    from test_engines import syncs

    net, x = synced_net(), share(inputs(16)[0], SPLITS["even"], rank)
    result["syncs"] = syncs(lambda: net(x).sum().backward())
    # compiled: no graph break (the collectives are traced), the eager outputs and gradients
    eager, net = synced_net(), synced_net()
    result["graph breaks"] = torch._dynamo.explain(synced_net())(x).graph_break_count
    out, want = torch.compile(net)(x), eager(x)
    out.sum().backward()
    want.sum().backward()
    result["compiled"] = {"out": (out.detach(), want.detach()),
                          "grads": (_grads(net), _grads(eager))}
    # DDP training with an explicit group, SGD with momentum
    group = dist.new_group(list(range(WORLD)))
    net = synced_net(group)
    ddp = nn.parallel.DistributedDataParallel(net, process_group=group)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        x, y, _ = inputs(16, salt=step)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(share(x, SPLITS["even"], rank)),
                                    share(y, SPLITS["even"], rank)).backward()
        opt.step()
    result["ddp"] = {"params": {k: p.detach().clone() for k, p in net.named_parameters()},
                     "buffers": _buffers(net)}
    # a copy (an EMA model) shares the group and still syncs
    twin = copy.deepcopy(net)
    result["copy shares the group"] = twin[1].process_group is group
    x, _, _ = inputs(16, salt=9)
    result["copy out"] = twin(share(x, SPLITS["even"], rank)).detach()
    # a cumulative average (momentum None, as update_bn runs) skips a batch empty on every rank
    net = synced_net()
    for m in net.modules():
        if isinstance(m, wnorm.SyncMeanOnlyBatchNorm):
            m.momentum = None
    with torch.no_grad():
        for n in (0, 6, 0, 4):
            net(share(inputs(2 * n, salt=n)[0], (n, n), rank))
    result["cumulative"] = _buffers(net)
    # a gradient penalty (double backward): the second-order graph sums over the ranks too
    net = synced_net()
    x, _, _ = inputs(sum(SPLITS["uneven"]), salt=3)
    result["penalty"] = _penalty_grads(net, share(x, SPLITS["uneven"], rank))
    # eval mode: the running mean, nothing sent (a rank's eval alone does not hang)
    if rank == 0:
        result["eval"] = net.eval()(inputs(4)[0]).detach()
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("sync"))


def close(a, b, **tol) -> None:
    torch.testing.assert_close(a, b, rtol=tol.get("rtol", 1e-5), atol=tol.get("atol", 1e-6))


# --------------------------------------------------------------------------- distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", list(SPLITS))
def test_shares_of_a_batch_compute_what_one_process_computes_on_the_whole(ranks, case) -> None:
    sizes = SPLITS[case]
    ref = plain_net()
    x, _, c = inputs(sum(sizes))
    x.requires_grad_()
    out = ref(x)
    (out * c).sum().backward()
    for r in range(WORLD):
        got = ranks[r][case]
        close(got["out"], share(out.detach(), sizes, r))
        close(got["x.grad"], share(x.grad, sizes, r))  # the mean's gradient spans the ranks
        for k, b in _buffers(ref).items():  # the global mean, on every rank
            close(got["buffers"][k], b)
    # the loss is a sum over ranks: the ranks' parameter gradients sum to the whole one's
    for k, g in _grads(ref).items():
        close(sum(ranks[r][case]["grads"][k] for r in range(WORLD)), g)
    # and they are not what per-rank means give
    if case != "empty":
        local = plain_net()
        local(share(x.detach(), sizes, 0))
        assert not torch.allclose(local[1].running_mean, ranks[0][case]["buffers"]["1.running_mean"])


@pytest.mark.slow
def test_a_gradient_penalty_over_shares_equals_one_process_on_the_whole_batch(ranks) -> None:
    # the backward's all-reduce had no autograd rule: a double backward took the group's sum
    # of the gradient for this rank's own, and the penalty's gradients were off
    net = plain_net()
    x, _, _ = inputs(sum(SPLITS["uneven"]), salt=3)
    want = _penalty_grads(net, x)
    for k, v in want.items():
        close(sum(r["penalty"][k] for r in ranks), v, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_bfloat16_shares_compute_what_one_process_computes_in_bfloat16(ranks) -> None:
    x, _, c = inputs(8)
    bn = wnorm.MeanOnlyBatchNorm2d(3)
    xb = x.to(torch.bfloat16).requires_grad_()
    out = bn(xb)
    (out.float() * c[:, :, None, None].expand(-1, -1, 6, 6)[:, :3]).sum().backward()
    sizes = SPLITS["uneven"]
    for r in range(WORLD):
        got = ranks[r]["bf16"]
        assert got["out"].dtype == torch.bfloat16
        # one rounding apart at most (the sums are taken in another order)
        torch.testing.assert_close(got["out"], share(out.detach(), sizes, r), rtol=1e-2,
                                   atol=2e-2)
        torch.testing.assert_close(got["x.grad"], share(xb.grad, sizes, r), rtol=1e-2,
                                   atol=2e-2)
        torch.testing.assert_close(got["running_mean"], bn.running_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_synced_training_step_makes_no_host_sync(ranks) -> None:
    assert ranks[0]["syncs"] == [] and ranks[1]["syncs"] == []


@pytest.mark.slow
def test_compiled_it_has_no_graph_break_and_gives_the_eager_outputs_and_gradients(ranks) -> None:
    for r in ranks:
        assert r["graph breaks"] == 0
        close(*r["compiled"]["out"])
        got, want = r["compiled"]["grads"]
        for k in want:
            close(got[k], want[k])


@pytest.mark.slow
def test_ddp_training_equals_one_process_on_the_global_batches(ranks) -> None:
    ref = plain_net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        x, y, _ = inputs(16, salt=step)
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
    a, b = ranks[0]["ddp"], ranks[1]["ddp"]
    for part in ("params", "buffers"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k  # bitwise across ranks
    start = dict(plain_net().named_parameters())
    assert any(not torch.equal(a["params"][k], start[k]) for k in start)  # it did train
    for k, p in ref.named_parameters():
        close(a["params"][k], p.detach())
    for k, buf in ref.named_buffers():
        close(a["buffers"][k], buf)


@pytest.mark.slow
def test_a_deep_copy_shares_the_process_group_and_keeps_syncing(ranks) -> None:
    assert ranks[0]["copy shares the group"] and ranks[1]["copy shares the group"]
    x, _, _ = inputs(16, salt=9)
    net = plain_net()
    for k, p in net.named_parameters():
        p.data.copy_(ranks[0]["ddp"]["params"][k])
    for k, b in net.named_buffers():
        b.copy_(ranks[0]["ddp"]["buffers"][k])
    whole = net(x).detach()
    close(torch.cat([ranks[0]["copy out"], ranks[1]["copy out"]]), whole)


@pytest.mark.slow
def test_a_cumulative_average_skips_batches_empty_on_every_rank(ranks) -> None:
    ref = plain_net()
    for m in ref.modules():
        if isinstance(m, MeanOnlyBatchNormBase):
            m.momentum = None
    with torch.no_grad():
        for n in (6, 4):  # the two batches some rank saw
            ref(inputs(2 * n, salt=n)[0])
    for r in range(WORLD):
        got = ranks[r]["cumulative"]
        for k, b in _buffers(ref).items():
            close(got[k], b)
    assert torch.isfinite(ranks[0]["eval"]).all()


# --------------------------------------------------------------------------- one process
def test_without_a_process_group_it_is_the_plain_layer_bit_for_bit() -> None:
    for momentum in (0.1, None):
        ref, net = plain_net(), synced_net()
        for m in list(ref.modules()) + list(net.modules()):
            if isinstance(m, MeanOnlyBatchNormBase):
                m.momentum = momentum
        for step in range(2):
            x, _, c = inputs(6, salt=step)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = ref(xa), net(xb)
            assert torch.equal(ya, yb)
            (ya * c).sum().backward()
            (yb * c).sum().backward()
            assert torch.equal(xa.grad, xb.grad)
        for (k, a), b in zip(_grads(ref).items(), _grads(net).values()):
            assert torch.equal(a, b), k
        for (k, a), b in zip(_buffers(ref).items(), _buffers(net).values()):
            assert torch.equal(a, b), k
        x = inputs(4)[0]
        assert torch.equal(ref.eval()(x), net.eval()(x))


def test_conversion_keeps_the_parameters_buffers_mode_and_hooks_and_a_shared_layer_shared() -> None:
    bn = wnorm.MeanOnlyBatchNorm1d(3, momentum=0.3).eval()
    seen = []
    handle = bn.register_forward_hook(lambda m, a, o: seen.append(o))
    model = nn.Sequential(nn.Linear(2, 3), bn, nn.Linear(3, 3), bn)
    bias, rm, nbt = bn.bias, bn.running_mean, bn.num_batches_tracked
    out = wnorm.SyncMeanOnlyBatchNorm.convert_sync_batchnorm(model)
    assert out is model
    new = model[1]
    assert type(new) is wnorm.SyncMeanOnlyBatchNorm and model[3] is new
    assert new.bias is bias and new.running_mean is rm and new.num_batches_tracked is nbt
    assert not new.training and new.momentum == 0.3 and new.process_group is None
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "1.bias",
                                                        "2.weight", "2.bias"]
    model(torch.randn(4, 2))
    assert len(seen) == 2  # the hook moved with the layer (two calls of the shared layer)
    handle.remove()
    model(torch.randn(4, 2))
    assert len(seen) == 2  # and the user's handle still removes it
    # a mean-only batch norm itself is returned replaced
    assert type(wnorm.SyncMeanOnlyBatchNorm.convert_sync_batchnorm(
        wnorm.MeanOnlyBatchNorm3d(2))) is wnorm.SyncMeanOnlyBatchNorm


def test_a_layer_with_a_forward_of_its_own_is_left_with_a_warning() -> None:
    class Mine(wnorm.MeanOnlyBatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    patched = wnorm.MeanOnlyBatchNorm2d(2)
    patched.forward = lambda x: x
    model = nn.Sequential(Mine(2), patched)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wnorm.SyncMeanOnlyBatchNorm.convert_sync_batchnorm(model)
    said = [str(w.message) for w in caught]
    assert len(said) == 2, said
    assert "0 (Mine) has a forward of its own" in said[0]
    assert "1 (MeanOnlyBatchNorm2d) has a forward of its own" in said[1]
    assert type(model[0]) is Mine and model[1] is patched


def test_a_converted_model_folds_to_the_same_eval_outputs_and_loads_plain_checkpoints() -> None:
    ref = plain_net()
    ref(inputs(8)[0])  # running means that are not zero
    net = synced_net()
    assert net.load_state_dict(ref.state_dict()) is not None  # the same keys
    x = inputs(5, salt=3)[0]
    expected = ref.eval()(x)
    assert torch.equal(net.eval()(x), expected)
    folded = wnorm.fold(net)
    assert not any(isinstance(m, MeanOnlyBatchNormBase) for m in folded.modules())
    close(folded(x), expected)


def test_wrong_input_is_refused_naming_the_layer() -> None:
    bn = wnorm.SyncMeanOnlyBatchNorm(4)
    with pytest.raises(wnorm.WnormError, match=r"SyncMeanOnlyBatchNorm: expected 4 channels"):
        bn(torch.randn(2, 3, 5))
    with pytest.raises(wnorm.WnormError, match=r"2D or 3D or 4D or 5D input"):
        bn(torch.randn(4))
    with pytest.raises(wnorm.WnormError, match="expected an nn.Module"):
        wnorm.SyncMeanOnlyBatchNorm.convert_sync_batchnorm("model")


def test_the_conversion_keeps_the_path_apply_recorded_for_errors():
    net = wnorm.apply(nn.Sequential(nn.Linear(4, 8), wnorm.MeanOnlyBatchNorm1d(4)))
    net = wnorm.SyncMeanOnlyBatchNorm.convert_sync_batchnorm(net)
    with pytest.raises(wnorm.WnormError, match=r"^1 \(SyncMeanOnlyBatchNorm\): expected 4 "):
        net(torch.randn(2, 4))


def test_a_process_group_that_is_no_group_is_refused_not_ignored():
    # it was kept and ignored: the layer ran as the plain one
    with pytest.raises(wnorm.WnormError, match=r"SyncMeanOnlyBatchNorm: process_group must be a "
                                               r"torch.distributed ProcessGroup .* got str"):
        wnorm.SyncMeanOnlyBatchNorm(3, process_group="not a group")
