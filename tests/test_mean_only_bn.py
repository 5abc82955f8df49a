"""Mean-only batch normalization (paper sec. 4): t~ = t - mu[t] + b, running mean for eval."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import wnorm
from wnorm import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d, WnormError

D = torch.float64

CASES = [
    (MeanOnlyBatchNorm1d, (16, 3)),
    (MeanOnlyBatchNorm1d, (8, 3, 5)),
    (MeanOnlyBatchNorm2d, (4, 3, 3, 5)),
    (MeanOnlyBatchNorm3d, (2, 3, 2, 3, 4)),
]
IDS = ["1d-NC", "1d-NCL", "2d", "3d"]


def reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean over N and every spatial position, computed without x.mean(dims)."""
    c = x.shape[1]
    return x.movedim(1, 0).reshape(c, -1).sum(1) / (x.numel() // c)


def bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (x.dim() - 2))


@pytest.mark.parametrize("cls, shape", CASES, ids=IDS)
def test_train_output_has_channel_mean_equal_to_bias(cls, shape):
    bn = cls(3).to(D)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = 3 * torch.randn(shape, dtype=D) + 7
    y = bn(x)
    torch.testing.assert_close(channel_mean(y), bn.bias.detach(), rtol=0, atol=1e-12)
    # only the mean moves: the spread within each channel is the input's
    torch.testing.assert_close(y - bcast(channel_mean(y), y), x - bcast(channel_mean(x), x))


@pytest.mark.parametrize("cls, shape", CASES, ids=IDS)
def test_backward_subtracts_mean_gradient(cls, shape):
    bn = cls(3).to(D)
    x = torch.randn(shape, dtype=D, requires_grad=True)
    grad_y = torch.randn(shape, dtype=D)
    bn(x).backward(grad_y)
    expected = grad_y - bcast(channel_mean(grad_y), grad_y)  # grad_t = grad_y - mean(grad_y)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.bias.grad, grad_y.sum(dim=reduce_dims(grad_y)))
    assert torch.autograd.gradcheck(lambda t: cls(3).to(D)(t), (x.detach().requires_grad_(),))


@pytest.mark.parametrize("cls, shape", CASES, ids=IDS)
def test_gradcheck_and_double_backward_float64(cls, shape):
    """The hand-written backward (one reduction of the incoming gradient) is the exact Jacobian
    of x - mean(x) + b, to first and second order."""
    torch.manual_seed(0)
    bn = cls(3).to(D)
    with torch.no_grad():
        bn.bias.normal_()
    x = torch.randn(shape, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(bn, (x,))
    assert torch.autograd.gradgradcheck(bn, (x,))
    b = bn.bias.detach().clone().requires_grad_(True)

    def with_bias(b: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(bn, {"bias": b}, (x.detach(),))

    assert torch.autograd.gradcheck(with_bias, (b,))


@pytest.mark.parametrize("cls,shape", CASES, ids=IDS)
def test_running_mean_momentum_and_eval(cls, shape):
    bn = cls(3).to(D)
    running = torch.zeros(3, dtype=D)
    for step in range(3):
        x = torch.randn(shape, dtype=D) + step
        bn(x)
        running = 0.9 * running + 0.1 * channel_mean(x)  # the paper's EMA, 0.9 on the old value
        torch.testing.assert_close(bn.running_mean, running, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == 3
    bn.eval()
    with torch.no_grad():
        bn.bias.fill_(0.25)
        x = torch.randn(shape, dtype=D)
        torch.testing.assert_close(bn(x), x - bcast(running, x) + 0.25)
        torch.testing.assert_close(bn.running_mean, running)  # eval leaves it alone


def test_running_mean_never_joins_the_graph():
    """The running mean is updated from a detached batch mean: after a training step with
    grads on, it has no grad_fn, and a second backward through the output still works."""
    net = wnorm.apply(nn.Sequential(nn.Linear(4, 3, bias=False), MeanOnlyBatchNorm1d(3))).to(D)
    x = torch.randn(8, 4, dtype=D, requires_grad=True)
    y = net(x)
    bn = net[1]
    assert bn.running_mean.grad_fn is None and not bn.running_mean.requires_grad
    (g,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
    g.sum().backward()  # double backward: nothing of the buffer update in the graph
    with torch.no_grad():
        t = net[0](x)
    torch.testing.assert_close(bn.running_mean, 0.1 * channel_mean(t))


def test_momentum_none_is_cumulative_average():
    bn = MeanOnlyBatchNorm1d(2, momentum=None).to(D)
    ref = nn.BatchNorm1d(2, momentum=None, affine=False).to(D)
    xs = [torch.randn(5, 2, dtype=D) + i for i in range(7)]  # 1/3, 1/6, 1/7: no float32 value
    for x in xs:
        bn(x), ref(x)
    # to float64's accuracy (a weight 1/n taken in float32 left it off by about 5e-9)
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0),
                               rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-14, atol=1e-14)


def test_no_running_stats_uses_batch_mean_in_eval():
    bn = MeanOnlyBatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(4, 3, 2, 2) + 5
    torch.testing.assert_close(channel_mean(bn(x)), torch.zeros(3), atol=1e-5, rtol=0)
    assert bn.running_mean is None


def test_a_running_mean_frozen_after_training_is_used_in_eval_as_nn_batchnorm_uses_it():
    # track_running_stats=False set after training (PyTorch's way to freeze statistics): eval
    # took batch means, and a batch of one came out as the bias alone
    torch.manual_seed(0)
    bn, ref = MeanOnlyBatchNorm1d(3), nn.BatchNorm1d(3, affine=False)
    for _ in range(3):
        x = torch.randn(8, 3) + 4
        bn(x), ref(x)
    bn.track_running_stats = ref.track_running_stats = False
    x = torch.randn(8, 3) - 2
    bn(x), ref(x)  # training: the running mean stays
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    assert bn.num_batches_tracked == ref.num_batches_tracked == 3
    one = torch.randn(1, 3)
    torch.testing.assert_close(bn.eval()(one), one - ref.running_mean)
    folded = wnorm.fold(nn.Sequential(nn.Linear(2, 3), bn))  # a constant shift: it folds
    assert isinstance(folded[1], nn.Identity)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_for_a_batch_mean_is_refused_as_nn_batchnorm_refuses_it(shape):
    # the output was the bias alone, and the layers before got a gradient of exactly 0
    cls = {2: MeanOnlyBatchNorm1d, 3: MeanOnlyBatchNorm1d, 4: MeanOnlyBatchNorm2d}[len(shape)]
    with pytest.raises(WnormError, match=r"expected more than 1 value per channel .*drop_last"):
        cls(3)(torch.randn(shape))
    with pytest.raises(WnormError, match="more than 1 value per channel"):
        cls(3, track_running_stats=False).eval()(torch.randn(shape))
    cls(3).eval()(torch.randn(shape))  # the running mean: any batch
    cls(3)(torch.randn((2,) + shape[1:]))


@pytest.mark.parametrize("refused, message", [((1, 4), "more than 1 value per channel"),
                                               ((8, 5), "expected 4 channels"),
                                               ((8, 4, 2, 2), "expected a 2D or 3D input")])
def test_a_compiled_model_stays_one_compiled_graph_after_a_refused_batch(refused, message):
    # Dynamo met the WnormError inside the inlined check and skipped the model's frame for good:
    # every later batch ran eagerly, the layers compiled one by one between graph breaks
    runs: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        def run(*args: Any) -> Any:
            runs.append(1)
            return gm.forward(*args)
        return run

    torch._dynamo.reset()
    net = nn.Sequential(MeanOnlyBatchNorm1d(4), nn.Linear(4, 4)).train()
    compiled = torch.compile(net, backend=backend)
    compiled(torch.randn(8, 4))
    with pytest.raises(WnormError, match=message):
        compiled(torch.randn(refused))
    for _ in range(2):
        runs.clear()
        x = torch.randn(8, 4)
        torch.testing.assert_close(compiled(x), net(x))
        assert len(runs) == 1  # the whole model, one graph


def test_reset_parameters_gives_the_layer_as_built_after_a_meta_build_and_after_training():
    # to_empty after a meta-device build, then each module's reset_parameters (FSDP's
    # param_init_fn, wnorm.data_init's own advice): the bias and buffers were uninitialized
    with torch.device("meta"):
        net = wnorm.apply(nn.Sequential(nn.Linear(4, 3), MeanOnlyBatchNorm1d(3)))
    net.to_empty(device="cpu")
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    fresh = MeanOnlyBatchNorm1d(3)
    for k, v in fresh.state_dict().items():
        assert torch.equal(net[1].state_dict()[k], v), k
    bn = MeanOnlyBatchNorm2d(2)
    with torch.no_grad():
        bn.bias.fill_(1.0)
    bn(torch.randn(4, 2, 3, 3) + 5)
    bn.reset_parameters()
    assert bn.bias.abs().sum() == 0 and bn.running_mean.abs().sum() == 0
    assert bn.num_batches_tracked == 0


def test_with_weight_norm_layer():
    """WN + mean-only BN (the paper's best CIFAR variant): gradients match an independent
    computation of the composed map, and ||w|| = g after steps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), MeanOnlyBatchNorm2d(4), nn.ReLU()).to(D)
    wnorm.apply(net)
    x = torch.randn(6, 3, 5, 5, dtype=D)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    conv = net[0]
    torch.testing.assert_close(conv.weight.flatten(1).norm(dim=1), conv.weight_g.reshape(-1).abs())
    t = conv(x)
    torch.testing.assert_close(channel_mean(net[1](t)), net[1].bias.detach(), atol=1e-12, rtol=0)
    # the conv bias has no effect under mean-only BN in train mode: its gradient is 0
    opt.zero_grad()
    net(x).pow(2).mean().backward()
    assert conv.bias.grad.abs().max() < 1e-12


# ---------------------------------------------------------------------------------- bad input
def test_wrong_channel_count():
    with pytest.raises(WnormError, match=r"MeanOnlyBatchNorm2d: expected 3 channels in dim 1; "
                                         r"got shape \(2, 4, 5, 5\)"):
        MeanOnlyBatchNorm2d(3)(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("cls, shape", [(MeanOnlyBatchNorm1d, (2, 3, 4, 5)),
                                        (MeanOnlyBatchNorm2d, (2, 3, 4)),
                                        (MeanOnlyBatchNorm3d, (2, 3, 4, 5))])
def test_wrong_rank(cls, shape):
    with pytest.raises(WnormError, match=rf"{cls.__name__}: expected a .*D input \(N, C, \.\.\.\); "
                                         rf"got shape \({', '.join(map(str, shape))}\)"):
        cls(3)(torch.randn(shape))


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (2, 3, 0)])
def test_an_empty_batch_gives_an_empty_output_as_batch_norm_does(shape, track):
    # a detection head with no region: nn.BatchNorm returns an empty output, this raised
    bn = MeanOnlyBatchNorm1d(3, track_running_stats=track).train()
    ref = nn.BatchNorm1d(3, track_running_stats=track).train()
    x = torch.randn(shape, requires_grad=True)
    y = bn(x)
    assert y.shape == ref(x).shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(bn.bias.grad, torch.zeros(3))
    if track:  # nothing to average: the running mean stays as it was, not NaN; the batch is
        # counted as nn.BatchNorm counts it (it was not: the two checkpoints disagreed)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 1
        assert torch.equal(bn.running_mean, torch.zeros(3))
    assert bn.eval()(torch.randn(shape)).shape == x.shape


def test_a_0_dim_tensor_momentum_is_taken_as_nn_batchnorm_takes_it():
    assert MeanOnlyBatchNorm1d(3, momentum=torch.tensor(0.25)).momentum == 0.25


def test_a_numpy_integer_channel_count_is_taken_as_nn_batchnorm_takes_it():
    import numpy as np

    bn = MeanOnlyBatchNorm1d(np.int64(4))
    assert bn.num_features == 4 and type(bn.num_features) is int


@pytest.mark.parametrize("kwargs, msg", [({"num_features": 0}, "num_features must be a positive"),
                                         ({"num_features": True},
                                          "num_features must be a positive"),
                                         ({"num_features": 3, "momentum": 1.5},
                                          r"momentum must be in \[0, 1\]"),
                                         ({"num_features": 3, "momentum": True},  # read as 1
                                          r"momentum must be in \[0, 1\]"),
                                         ({"num_features": 3, "momentum": "0.1"},  # a TypeError
                                          r"momentum must be in \[0, 1\]")])
def test_bad_constructor_arguments(kwargs, msg):
    with pytest.raises(WnormError, match=rf"MeanOnlyBatchNorm1d: {msg}"):
        MeanOnlyBatchNorm1d(**kwargs)


@pytest.mark.parametrize("train", [True, False])
def test_forward_mode_derivative_is_t_minus_its_mean(train):
    """torch.func.jvp through the layer using batch means (no running stats: a functional call
    must not update buffers): the tangent of x - mean(x) + b is t - mean(t); a detached batch
    mean would drop the second term."""
    bn = MeanOnlyBatchNorm1d(3, track_running_stats=False).to(D).train(train)
    params = {k: v.detach() for k, v in bn.named_parameters()}
    x, t = torch.randn(8, 3, dtype=D), torch.randn(8, 3, dtype=D)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            _, jt = torch.func.jvp(lambda x: torch.func.functional_call(bn, params, (x,)),
                                   (x,), (t,))
        torch.testing.assert_close(jt, t - t.mean(0), rtol=1e-12, atol=1e-12)


def test_torch_func_transforms_with_trainable_parameters():
    """jvp through the layer with a bias that requires grad (its autograd Function now has a
    jvp rule: the tangent is t - mean(t)), and vmap(grad) over groups of samples (the
    generated vmap rule) equal the definition and a Python loop. Both raised before."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), MeanOnlyBatchNorm1d(3, track_running_stats=False),
                        nn.Tanh()).to(D)
    bn = net[1]
    x, t = torch.randn(8, 3, dtype=D), torch.randn(8, 3, dtype=D)
    assert bn.bias.requires_grad
    _, jt = torch.func.jvp(bn, (x,), (t,))
    torch.testing.assert_close(jt, t - t.mean(0), rtol=1e-12, atol=1e-12)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict, xb: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(net, p, (xb,)).pow(2).sum()

    xs = torch.randn(3, 5, 4, dtype=D)
    per_group = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for i, xb in enumerate(xs):
        grads = torch.autograd.grad(loss(dict(net.named_parameters()), xb), list(net.parameters()))
        for (name, _), g in zip(net.named_parameters(), grads):
            torch.testing.assert_close(per_group[name][i], g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer_dtype, x_dtype", [(torch.float32, torch.bfloat16),
                                                  (torch.float64, torch.float32),
                                                  (torch.float32, torch.float16)])
@pytest.mark.parametrize("track", [True, False], ids=["running", "no-running"])
def test_output_has_the_input_dtype_in_every_mode(layer_dtype, x_dtype, track):
    """A norm layer kept in float32 inside a bfloat16 model (as nn.BatchNorm allows): the output
    has the input's dtype in train and eval, with and without grad, like nn.BatchNorm's. Eval and
    no-grad forwards returned the layer's dtype before, and the next layer failed."""
    torch.manual_seed(0)
    bn = MeanOnlyBatchNorm2d(3, track_running_stats=track).to(layer_dtype)
    ref = nn.BatchNorm2d(3, track_running_stats=track).to(layer_dtype)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        if track:
            bn.running_mean.copy_(torch.tensor([1.0, 2.0, -3.0]))
    x = (torch.randn(4, 3, 2, 2) + 3).to(x_dtype)
    for train in (True, False):
        for grad in (True, False):
            bn.train(train), ref.train(train)
            with torch.set_grad_enabled(grad):
                y = bn(x)
                if layer_dtype == torch.float32:  # torch's CPU mixed-dtype batch norm: float32
                    assert ref(x).dtype == x_dtype
            assert y.dtype == x_dtype, (train, grad)
            mean = (bn.running_mean if track and not train
                    else x.to(layer_dtype).mean(dim=(0, 2, 3)))
            expected = x.to(layer_dtype) + bcast(bn.bias.detach() - mean, x)
            torch.testing.assert_close(y.to(layer_dtype), expected, rtol=1e-2, atol=2e-2)



def test_the_gradient_of_a_jvp_with_respect_to_its_tangent_is_autograds():
    # reverse over forward (Jacobian and consistency regularizers): the tangent's own mean must
    # be subtracted with a graph, or d/dt of |J t|^2 misses it
    from torch.func import grad, jvp

    torch.manual_seed(0)
    bn = MeanOnlyBatchNorm1d(3, dtype=torch.float64, track_running_stats=False)
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)

    def f(y):
        return bn(y) ** 2

    def reference(y):
        return (y - y.mean(0, keepdim=True) + bn.bias) ** 2

    def tangent_loss(fn):
        return lambda tt: jvp(fn, (x,), (tt,))[1].pow(2).sum()

    torch.testing.assert_close(grad(tangent_loss(f))(t), grad(tangent_loss(reference))(t),
                               rtol=0, atol=1e-12)


def test_a_bfloat16_batch_gets_batch_norms_accuracy_in_the_mean_and_running_mean():
    # a float32 layer in a bfloat16 model: the mean is taken in float32 and the shift added per
    # element in float32 (rounding the shift first biased a whole channel by up to |mu|/256)
    torch.manual_seed(0)
    x = (torch.randn(512, 4) + torch.tensor([100.0, 37.2, -250.0, 1000.0])).bfloat16()
    bn = MeanOnlyBatchNorm1d(4)
    with torch.no_grad():
        bn.bias.fill_(0.5)
    y = bn(x)
    ref = nn.BatchNorm1d(4, affine=False)
    ref(x.float())  # the same momentum step from zeros
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-6, atol=1e-5)
    assert (y.float().mean(0) - 0.5).abs().max() < 0.01


def test_update_bn_averages_the_batch_means_whatever_empty_batches_the_loader_yields():
    # an empty batch counted in the cumulative average weighed the later batches wrongly:
    # (2 mu_1 + mu_2) / 3 where the docstring promises (mu_1 + mu_2) / 2
    bn = MeanOnlyBatchNorm1d(4)
    b1, b2 = torch.randn(8, 4) + 3, torch.randn(8, 4) - 1
    wnorm.update_bn([b1, torch.zeros(0, 4), b2], bn)
    torch.testing.assert_close(bn.running_mean, (b1.mean(0) + b2.mean(0)) / 2)


def test_update_bn_recomputes_mean_only_running_means_that_pytorchs_leaves_stale():
    """SWA: wnorm.update_bn sets every mean-only layer's running mean to the average of its
    input's batch means over the loader (PyTorch's update_bn finds BatchNorm layers only),
    and BatchNorm layers' statistics as PyTorch's does; momenta and the mode come back."""
    import copy

    from torch.optim.swa_utils import AveragedModel
    from torch.optim.swa_utils import update_bn as torch_update_bn

    torch.manual_seed(0)
    net = wnorm.apply(nn.Sequential(nn.Linear(3, 4), MeanOnlyBatchNorm1d(4, momentum=0.3),
                                    nn.Tanh(), nn.Linear(4, 5), nn.BatchNorm1d(5))).to(D)
    swa = AveragedModel(net).eval()
    batches = [(torch.randn(6, 3, dtype=D) + i, torch.zeros(6)) for i in range(3)]
    ref = copy.deepcopy(swa)
    torch_update_bn(batches, ref)
    wnorm.update_bn(batches, swa)
    m = swa.module
    with torch.no_grad():
        expected = torch.stack([m[0](x).mean(0) for x, _ in batches]).mean(0)
    torch.testing.assert_close(m[1].running_mean, expected, rtol=1e-12, atol=1e-12)
    assert not torch.equal(ref.module[1].running_mean, expected)  # PyTorch's: left as it was
    assert torch.equal(m[4].running_mean, ref.module[4].running_mean)
    assert torch.equal(m[4].running_var, ref.module[4].running_var)
    assert m[1].momentum == 0.3 and m[4].momentum == 0.1 and not swa.training


def test_update_bn_puts_back_every_modules_own_mode():
    # model.train(was_training) set a Dropout or frozen BatchNorm kept in eval to train mode
    net = nn.Sequential(nn.Linear(3, 4), MeanOnlyBatchNorm1d(4), nn.Dropout(0.5),
                        nn.BatchNorm1d(4))
    net[2].eval()
    net[3].eval()
    before = [m.training for m in net.modules()]
    wnorm.update_bn([torch.randn(8, 3) for _ in range(2)], net)
    assert [m.training for m in net.modules()] == before


def test_update_bn_leaves_the_statistics_as_they_were_when_the_loader_raises():
    # the running statistics were reset first and left half-recomputed
    net = nn.Sequential(nn.Linear(3, 4), MeanOnlyBatchNorm1d(4), nn.BatchNorm1d(4))
    net.train()
    for _ in range(3):
        net(torch.randn(8, 3) + 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def loader():
        yield torch.randn(8, 3)
        raise OSError("a corrupt shard")

    with pytest.raises(OSError, match="corrupt shard"):
        wnorm.update_bn(loader(), net)
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert net[1].momentum == 0.1 and net.training


def test_an_input_error_names_the_layer_wnorm_apply_saw():
    # several mean-only BNs in a model raised the same "MeanOnlyBatchNorm1d: expected 4
    # channels", naming none of them
    net = wnorm.apply(nn.Sequential(nn.Linear(4, 4), MeanOnlyBatchNorm1d(4), nn.Linear(4, 8),
                                    MeanOnlyBatchNorm1d(4)))
    with pytest.raises(WnormError, match=r"^3 \(MeanOnlyBatchNorm1d\): expected 4 channels in "
                                         r"dim 1; got shape \(2, 8\)"):
        net(torch.randn(2, 4))


def test_update_bn_with_its_arguments_swapped_says_their_order():
    # a bare AttributeError ('DataLoader' object has no attribute 'modules'), or a tensor's
    # rows fed one by one and refused by a layer for their shape
    net = nn.Sequential(nn.Linear(3, 4), MeanOnlyBatchNorm1d(4))
    loader = torch.utils.data.DataLoader(torch.randn(8, 3), batch_size=4)
    for args in ((net, loader), (torch.randn(8, 3), net)):
        with pytest.raises(wnorm.WnormError, match=r"update_bn: expects \(loader, model, "
                                                   r"device=None\)"):
            wnorm.update_bn(*args)


def test_an_integer_input_or_weight_is_refused_naming_the_layer():
    # torch's errors (mean() could not infer an output dtype; norm() needs floating point)
    # named no layer
    with pytest.raises(wnorm.WnormError, match=r"MeanOnlyBatchNorm1d: expected a floating-point "
                                               r"input; got torch.int64"):
        MeanOnlyBatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long))
    layer = nn.Linear(3, 2)
    layer.weight = nn.Parameter(torch.ones(2, 3, dtype=torch.int32), requires_grad=False)
    with pytest.raises(wnorm.WnormError, match=r"Linear: 'weight' is torch.int32; weight "
                                               r"normalization needs a floating-point weight"):
        wnorm.weight_norm(layer)
