"""wnorm.optim: optimizer-side weight normalization must be torch.optim on (g, v), moved.

The fused kernel (wnorm/csrc/fused_step.cpp) turns the plain weight's gradient into the
gradients of g and v (paper eqs. 3-4) and applies torch's SGD/Adam/AdamW rule inside the step.
These tests hold it to what the module promises: the same parameters, optimizer state and
state dicts as torch.optim training g and v through autograd (twin models on the same
batches), the fused path actually taken where it applies and autograd kept where it does not,
every way g and v can change outside the step followed, and the errors that guard the mode.
"""

from __future__ import annotations

import copy
import gc
import io

import pytest
import torch
from nets import Tagger
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import wnorm
import wnorm._extension
from wnorm import WnormError

STEPS = 8
N = 6  # batch size


# --------------------------------------------------------------------------- models and data
class EmbedNet(nn.Module):
    """An embedding (weight-normalized rows) averaged over a bag, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(idx).mean(1))


def _conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.LeakyReLU(0.1), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 8), nn.Linear(8, 3))


def _conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(3, 5, 3), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(5 * 6, 4))


def _convT() -> nn.Module:
    return nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.LeakyReLU(0.1), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3))


def _x_conv(gen, dtype):
    return torch.randn(N, 3, 6, 6, generator=gen, dtype=dtype)


def _x_conv1d(gen, dtype):
    return torch.randn(N, 3, 8, generator=gen, dtype=dtype)


def _x_convT(gen, dtype):
    return torch.randn(N, 3, 4, 4, generator=gen, dtype=dtype)


def _x_embed(gen, dtype):
    return torch.randint(0, 12, (N, 4), generator=gen)


def _x_lstm(gen, dtype):
    return torch.randn(N, 5, 4, generator=gen, dtype=dtype)


# kind: (factory, input maker, output shape, apply's types, fused module names, autograd ones)
MODELS = {
    "conv": (_conv, _x_conv, (N, 3), wnorm.DEFAULT_TYPES, ["0", "3", "4"], []),
    "conv1d": (_conv1d, _x_conv1d, (N, 4), wnorm.DEFAULT_TYPES, ["0", "3"], []),
    "convT": (_convT, _x_convT, (N, 3), wnorm.DEFAULT_TYPES, ["3"], ["0"]),  # ConvT: dim 1
    "embed": (EmbedNet, _x_embed, (N, 3), wnorm.DEFAULT_TYPES + (nn.Embedding,),
              ["emb", "out"], []),
    "lstm": (Tagger, _x_lstm, (N, 5, 3), wnorm.DEFAULT_TYPES, ["head"], ["lstm"]),
}


def build(kind: str = "conv", dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A weight-normalized model with g moved away from ||v|| (so g and ||v|| play apart)."""
    factory, _, _, types, _, _ = MODELS[kind]
    torch.manual_seed(seed)
    model = wnorm.apply(factory(), types=types).to(dtype)
    with torch.no_grad():
        for _, module, pname, _ in wnorm.normalized_weights(model):
            g = getattr(module, pname + "_g")
            g.mul_(0.5 + torch.rand(g.shape, dtype=g.dtype))
    return model


def batches(kind: str = "conv", dtype: torch.dtype = torch.float64, n: int = STEPS,
            seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    _, make_x, out_shape, _, _, _ = MODELS[kind]
    gen = torch.Generator().manual_seed(seed)
    return [(make_x(gen, dtype), torch.randn(out_shape, generator=gen, dtype=dtype))
            for _ in range(n)]


def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Nonlinear in the output, so every step's gradient differs."""
    return (out - y).square().mean() + 0.1 * torch.tanh(out).sum()


def modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    found = dict(model.named_modules())
    return [found[n] for n in names]


def twins(kind="conv", dtype=torch.float64, seed=0) -> tuple[nn.Module, nn.Module]:
    ref = build(kind, dtype, seed)
    return ref, copy.deepcopy(ref)


def train(model, opt, data, *, sched=None, clip=None, accumulate=1) -> list[float]:
    """zero_grad / forward / backward (x accumulate) / [clip] / step / [sched.step]."""
    losses = []
    for x, y in data:
        opt.zero_grad()
        for _ in range(accumulate):
            loss = loss_of(model(x), y)
            loss.backward()
        if clip is not None:
            if hasattr(opt, "param_grads"):  # wnorm.optim: move w.grad to g/v first
                opt.param_grads()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    return losses


# --------------------------------------------------------------------------- comparisons
def _tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 2e-5


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str,
                 tol: float | None = None) -> None:
    """|got - want| <= tol * max|want| (tol by dtype): equal up to rounding."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    tol = _tol(want.dtype) if tol is None else tol
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{what}: max |diff| {err:.3g} vs max |want| {scale:.3g}"


def assert_same_training(ma, oa, mb, ob, tol: float | None = None) -> None:
    """Every parameter and every optimizer state tensor of the twins agree (same keys too)."""
    pa, pb = dict(ma.named_parameters()), dict(mb.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert_close(pb[name].detach(), pa[name].detach(), name, tol)
        sa, sb = oa.state.get(pa[name], {}), ob.state.get(pb[name], {})
        assert sorted(sa) == sorted(sb), (name, sorted(sa), sorted(sb))
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert_close(sb[key], sa[key], f"state[{name}][{key}]", tol)
            else:
                assert sb[key] == sa[key], (name, key)
    for ga, gb in zip(oa.param_groups, ob.param_groups):
        assert {k: v for k, v in ga.items() if k != "params"} == \
               {k: v for k, v in gb.items() if k != "params"}


def assert_plain_weights_consistent(model: nn.Module, names: list[str]) -> None:
    """The weight a fused layer computes with is g v/||v|| of its current g and v."""
    for m in modules(model, names):
        want = torch._weight_norm(m.weight_v.detach(), m.weight_g.detach(), 0)
        assert_close(m.weight.detach(), want, "plain weight")


# --------------------------------------------------------------------------- 1. trajectories
# (id, optimizer name, keyword arguments, fused?)
OPTS = [
    ("sgd", "SGD", dict(lr=0.05), True),
    ("sgd-momentum", "SGD", dict(lr=0.05, momentum=0.9), True),
    ("sgd-nesterov-wd", "SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2), True),
    ("sgd-dampening", "SGD", dict(lr=0.05, momentum=0.8, dampening=0.3), True),
    ("sgd-maximize", "SGD", dict(lr=0.02, momentum=0.5, maximize=True), True),
    ("adam", "Adam", dict(lr=1e-2), True),
    ("adam-wd", "Adam", dict(lr=1e-2, weight_decay=1e-2), True),
    ("adamw-wd", "AdamW", dict(lr=1e-2, weight_decay=5e-2), True),
    ("adamw-default-wd", "AdamW", dict(lr=1e-2), True),
    ("adam-maximize", "Adam", dict(lr=1e-2, betas=(0.8, 0.99), maximize=True), True),
    ("adam-foreach", "Adam", dict(lr=1e-2, foreach=True), True),
    ("adam-fused", "Adam", dict(lr=1e-2, fused=True), True),
    ("sgd-foreach", "SGD", dict(lr=0.05, momentum=0.9, foreach=True), True),
    ("adam-amsgrad", "Adam", dict(lr=1e-2, amsgrad=True), False),
    ("adam-beta1-0.5", "Adam", dict(lr=1e-2, betas=(0.5, 0.999)), False),
]


def cases(*ids: str) -> list[tuple]:
    by_id = {c[0]: c for c in OPTS}
    return [by_id[i] for i in ids]


def pair(name: str, kw: dict, ma: nn.Module, mb: nn.Module):
    """torch.optim.<name> on ma's parameters, wnorm.optim.<name> on mb (the model)."""
    return getattr(torch.optim, name)(ma.parameters(), **kw), getattr(wnorm.optim, name)(mb, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", OPTS, ids=[c[0] for c in OPTS])
def test_trajectory_equals_torch_optim(case, dtype):
    _, name, kw, fused = case
    ma, mb = twins("conv", dtype)
    oa, ob = pair(name, kw, ma, mb)
    assert (len(ob.fused_layers()) == 3) == fused, ob.fused_layers()
    data = batches("conv", dtype)
    la, lb = train(ma, oa, data), train(mb, ob, data)
    assert (len(ob.fused_layers()) == 3) == fused  # still fused after training
    assert_same_training(ma, oa, mb, ob)
    assert lb == pytest.approx(la, rel=1e-10 if dtype == torch.float64 else 1e-4)
    assert la[-1] != la[0]  # it did train
    assert_plain_weights_consistent(mb, ["0", "3", "4"] if fused else [])


@pytest.mark.parametrize("kind", ["conv1d", "convT", "embed", "lstm"])
@pytest.mark.parametrize("case", cases("sgd-momentum", "adam-wd", "adamw-wd"), ids=lambda c: c[0])
def test_trajectory_other_layer_types(kind, case):
    _, name, kw, _ = case
    ma, mb = twins(kind)
    oa, ob = pair(name, kw, ma, mb)
    fused, other = MODELS[kind][4], MODELS[kind][5]
    assert len(ob.fused_layers()) == len(fused)
    assert sorted(ob.fused_layers()) == sorted(f"{n}.weight" for n in fused)
    data = batches(kind)
    train(ma, oa, data)
    train(mb, ob, data)
    assert_same_training(ma, oa, mb, ob)
    assert_plain_weights_consistent(mb, fused)
    for m in modules(mb, other):  # untouched by the kernel: no plain weight
        assert all(s.plain is None for s in m._wn.values())


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=2e-2)),
                                     ("AdamW", dict(lr=2e-2, weight_decay=0.1))])
def test_trajectory_with_lr_scheduler(name, kw):
    ma, mb = twins()
    oa, ob = pair(name, kw, ma, mb)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=3, gamma=0.3)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=3, gamma=0.3)
    data = batches()
    train(ma, oa, data, sched=sa)
    train(mb, ob, data, sched=sb)
    assert ob.param_groups[0]["lr"] == pytest.approx(kw["lr"] * 0.3**2)
    assert len(ob.fused_layers()) == 3
    assert_same_training(ma, oa, mb, ob)


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=2e-2))])
def test_trajectory_lr_changed_by_hand_and_gradient_accumulation(name, kw):
    ma, mb = twins()
    oa, ob = pair(name, kw, ma, mb)
    data = batches()
    train(ma, oa, data[:4], accumulate=2)
    train(mb, ob, data[:4], accumulate=2)
    for o in (oa, ob):
        o.param_groups[0]["lr"] *= 0.25
    train(ma, oa, data[4:], accumulate=2)
    train(mb, ob, data[4:], accumulate=2)
    assert_same_training(ma, oa, mb, ob)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
                                     ("Adam", dict(lr=1e-3)), ("AdamW", dict(lr=1e-3))])
def test_trajectory_large_layer_threaded_path(name, kw, dtype):
    """Over 65536 weights the kernel splits rows over threads (at::parallel_for)."""
    torch.manual_seed(0)
    ma = wnorm.apply(nn.Sequential(nn.Linear(300, 256), nn.Tanh(), nn.Linear(256, 3))).to(dtype)
    with torch.no_grad():
        ma[0].weight_g.mul_(0.5 + torch.rand_like(ma[0].weight_g))
    mb = copy.deepcopy(ma)
    oa, ob = pair(name, kw, ma, mb)
    assert len(ob.fused_layers()) == 2
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 300, generator=gen, dtype=dtype),
             torch.randn(16, 3, generator=gen, dtype=dtype)) for _ in range(4)]
    train(ma, oa, data)
    train(mb, ob, data)
    assert_same_training(ma, oa, mb, ob)
    assert_plain_weights_consistent(mb, ["0", "2"])


def test_loss_on_g_and_v_directly_and_a_shared_layer():
    """A penalty on weight_g/weight_v themselves (their .grad is filled by backward) and a
    layer applied twice: the gradients from both routes add up as with autograd."""
    ma, mb = twins()
    oa, ob = pair("Adam", dict(lr=1e-2), ma, mb)
    for x, y in batches():
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad()
            h = m[2](m[1](m[0](x)))
            out = m[4](m[3](h)) + 0.1 * m[4](m[3](2 * h))  # layers 3 and 4 used twice
            loss = loss_of(out, y) + 0.01 * m[3].weight_g.square().sum() \
                + 1e-3 * m[0].weight_v.abs().sum()
            loss.backward()
            o.step()
    assert_same_training(ma, oa, mb, ob)


def test_step_without_gradients_and_an_unused_layer():
    """No backward: step changes nothing. A fused layer the forward did not use: not stepped
    (no weight decay, no momentum), as torch skips parameters without a gradient."""
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1), ma, mb)
    before = {k: v.detach().clone() for k, v in mb.named_parameters()}
    ob.step()
    assert all(torch.equal(v.detach(), before[k]) for k, v in mb.named_parameters())
    for x, y in batches(n=3):
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad()
            loss_of(m[3](m[2](m[1](m[0](x))))[:, :3], y).backward()  # layer 4 unused
            o.step()
    assert torch.equal(mb[4].weight_v.detach(), before["4.weight_v"])
    assert mb[4].weight_v not in ob.state or not ob.state[mb[4].weight_v]
    assert_same_training(ma, oa, mb, ob)


def test_parameter_groups_with_model_keyword():
    """Groups with their own options: each group's fused layers use that group's options;
    a layer whose g and v sit in different groups stays on autograd."""
    ma, mb = twins()

    def groups(m):
        return [
            {"params": [m[0].weight_g, m[0].weight_v, m[0].bias], "lr": 0.02},
            {"params": [m[3].weight_g, m[3].weight_v, m[3].bias, m[4].weight_v], "momentum": 0.5},
            {"params": [m[4].weight_g, m[4].bias], "lr": 0.3, "weight_decay": 0.1},
        ]

    oa = torch.optim.SGD(groups(ma), lr=0.1, momentum=0.9)
    ob = wnorm.optim.SGD(groups(mb), lr=0.1, momentum=0.9, model=mb)
    assert sorted(ob.fused_layers()) == ["0.weight", "3.weight"]
    data = batches()
    train(ma, oa, data)
    train(mb, ob, data)
    assert_same_training(ma, oa, mb, ob)
    assert mb[4].weight_v.grad is not None  # the split layer trained through autograd


def test_parameters_not_given_to_the_optimizer_are_left_alone():
    """A layer the optimizer does not hold stays on autograd and is not stepped."""
    ma, mb = twins()
    params = [p for n, p in mb.named_parameters() if not n.startswith("4.")]
    ob = wnorm.optim.Adam(params, lr=1e-2, model=mb)
    oa = torch.optim.Adam([p for n, p in ma.named_parameters() if not n.startswith("4.")], lr=1e-2)
    frozen = mb[4].weight_v.detach().clone()
    assert sorted(ob.fused_layers()) == ["0.weight", "3.weight"]
    data = batches()
    train(ma, oa, data)
    train(mb, ob, data)
    assert_same_training(ma, oa, mb, ob)
    assert torch.equal(mb[4].weight_v.detach(), frozen)
    assert mb[4].weight_v.grad is not None


# --------------------------------------------------------------------------- 2. fused path taken
@pytest.mark.parametrize("kind", list(MODELS))
def test_fused_path_is_taken_where_it_applies(kind):
    model = build(kind)
    opt = wnorm.optim.SGD(model, lr=0.1)
    fused, other = MODELS[kind][4], MODELS[kind][5]
    names = opt.fused_layers()
    assert len(names) == len(fused) and names == wnorm.optim.fused_layers(opt)
    for n in other:
        assert not any(f.startswith(f"{n} (") for f in names)
    x, y = batches(kind, n=1)[0]
    loss_of(model(x), y).backward()
    for m in modules(model, fused):
        assert m.weight.grad is not None  # the plain weight got the gradient...
        assert m.weight_g.grad is None and m.weight_v.grad is None  # ...g and v did not
        assert m.weight.is_leaf
    for m in modules(model, other):  # ConvTranspose (dim 1), LSTM: autograd as usual
        for pname in m._wn:
            assert getattr(m, pname + "_g").grad is not None
            assert getattr(m, pname + "_v").grad is not None
    opt.step()
    assert opt.fused_layers() == names


def test_fused_layers_of_a_torch_optimizer_is_empty():
    model = build()
    assert wnorm.optim.fused_layers(torch.optim.SGD(model.parameters(), lr=0.1)) == []


def test_zero_grad_clears_plain_weight_gradients():
    model = build()
    opt = wnorm.optim.SGD(model, lr=0.1)
    x, y = batches(n=1)[0]
    loss_of(model(x), y).backward()
    opt.zero_grad(set_to_none=False)
    assert float(model[3].weight.grad.abs().sum()) == 0.0
    opt.zero_grad()
    assert model[3].weight.grad is None and model[0].weight.grad is None


def test_zero_grad_keep_tensors_trajectory():
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-3), ma, mb)
    for x, y in batches():
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad(set_to_none=False)
            loss_of(m(x), y).backward()
            o.step()
    assert_same_training(ma, oa, mb, ob)


# --------------------------------------------------------------------------- 3. gradients
@pytest.mark.parametrize("kind", list(MODELS))
def test_param_grads_equal_paper_eqs_3_4(kind):
    ma, mb = twins(kind)
    opt = wnorm.optim.Adam(mb, lr=1e-2)
    x, y = batches(kind, n=1)[0]
    loss_of(ma(x), y).backward()
    loss_of(mb(x), y).backward()
    fused = modules(mb, MODELS[kind][4])
    gws = {m: m.weight.grad.clone() for m in fused}
    opt.param_grads()
    for m in fused:
        assert m.weight.grad is None  # moved, not copied
        # eqs. 3-4 from the plain weight's gradient, written out
        g, v, gw = m.weight_g.detach(), m.weight_v.detach(), gws[m]
        n = v.flatten(1).norm(dim=1).view(g.shape)
        grad_g = (gw * v).flatten(1).sum(1).view(g.shape) / n
        assert_close(m.weight_g.grad, grad_g, "eq. 3")
        assert_close(m.weight_v.grad, g / n * gw - g * grad_g / n**2 * v, "eq. 4")
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        assert_close(pb.grad, pa.grad, f"{name}.grad")  # the same as autograd's
    opt.param_grads()  # nothing left to move: a second call changes nothing
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        assert_close(pb.grad, pa.grad, f"{name}.grad after a second param_grads()")


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=2e-2))])
def test_gradient_clipping_through_param_grads(name, kw):
    ma, mb = twins()
    oa, ob = pair(name, kw, ma, mb)
    data = batches()
    train(ma, oa, data, clip=0.05)
    train(mb, ob, data, clip=0.05)
    assert_same_training(ma, oa, mb, ob)
    assert len(ob.fused_layers()) == 3  # param_grads() does not end the mode


def test_param_grads_then_more_backward_accumulates():
    """param_grads() moves what is there; a later backward adds to g.grad/v.grad at step()."""
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.1), ma, mb)
    x, y = batches(n=1)[0]
    for m, o in ((ma, oa), (mb, ob)):
        loss_of(m(x), y).backward()
        if o is ob:
            o.param_grads()
        loss_of(m(2 * x), y).backward()
        o.step()
    assert_same_training(ma, oa, mb, ob)


# --------------------------------------------------------------------------- 4. no extension
@pytest.fixture
def no_extension(monkeypatch):
    """WNORM_NO_EXTENSION=1 and a fresh kernel cache; monkeypatch restores the cached kernel."""
    monkeypatch.setenv("WNORM_NO_EXTENSION", "1")
    monkeypatch.setattr(wnorm._extension, "_state", {})
    yield


@pytest.mark.parametrize("case", cases("sgd-nesterov-wd", "adam-wd", "adamw-wd"),
                         ids=lambda c: c[0])
def test_no_extension_trains_like_torch(no_extension, case):
    _, name, kw, _ = case
    ma, mb = twins()
    oa, ob = pair(name, kw, ma, mb)
    assert ob.fused_layers() == []
    assert "WNORM_NO_EXTENSION" in wnorm._extension.unavailable_reason()
    data = batches()
    train(ma, oa, data)
    train(mb, ob, data)
    assert_same_training(ma, oa, mb, ob)
    assert mb[3].weight_v.grad is not None  # autograd as usual


def test_a_failed_build_warns_and_trains_through_autograd(monkeypatch):
    """No compiler (or any build error): one RuntimeWarning naming the cause, nothing fused,
    training exactly as torch.optim's."""
    import torch.utils.cpp_extension as cpp

    def broken(*args, **kwargs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(cpp, "load", broken)
    monkeypatch.setattr(wnorm._extension, "_state", {})
    ma, mb = twins()
    with pytest.warns(RuntimeWarning, match="could not be built.*no C\\+\\+ compiler"):
        oa, ob = pair("Adam", dict(lr=1e-2), ma, mb)
    assert ob.fused_layers() == []
    assert "no C++ compiler" in wnorm._extension.unavailable_reason()
    data = batches()
    train(ma, oa, data), train(mb, ob, data)
    assert_same_training(ma, oa, mb, ob)


@pytest.mark.slow  # builds the one-thread variant of the kernel once (about 30 s, then cached)
def test_a_compiler_without_openmp_gets_the_one_thread_build(monkeypatch):
    import torch.utils.cpp_extension as cpp

    real, names = cpp.load, []

    def no_openmp(name, *args, **kwargs):
        names.append(name)
        if "-fopenmp" in kwargs.get("extra_cflags", []):
            raise RuntimeError("unrecognized command-line option '-fopenmp'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cpp, "load", no_openmp)
    monkeypatch.setattr(wnorm._extension, "_state", {})
    assert wnorm._extension.kernels() is not None
    assert len(names) == 2 and names[0] == names[1] + "_omp"


def test_kernel_is_back_after_the_no_extension_test():
    assert wnorm._extension.kernels() is not None
    assert len(wnorm.optim.SGD(build(), lr=0.1).fused_layers()) == 3


# --------------------------------------------------------------------------- 5. state dicts
def _resume(first, second, name, kw, k=3):
    """Train k steps with optimizer class ``first``, save, reload into a fresh model with
    ``second``, continue; compare with one uninterrupted torch.optim run."""
    data = batches()
    ref = build()
    ref_opt = getattr(torch.optim, name)(ref.parameters(), **kw)
    train(ref, ref_opt, data)

    m1 = build()
    o1 = first(m1, **kw) if first.__module__ == "wnorm.optim" else first(m1.parameters(), **kw)
    train(m1, o1, data[:k])
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)

    m2 = build(seed=5)  # different weights: everything must come from the checkpoint
    m2.load_state_dict(ckpt["model"])
    o2 = second(m2, **kw) if second.__module__ == "wnorm.optim" else second(m2.parameters(), **kw)
    o2.load_state_dict(ckpt["opt"])
    train(m2, o2, data[k:])
    assert_same_training(ref, ref_opt, m2, o2)
    return o1, o2


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
                                     ("Adam", dict(lr=1e-2, weight_decay=1e-3)),
                                     ("AdamW", dict(lr=1e-2))])
def test_state_dict_wnorm_to_torch(name, kw):
    o1, _ = _resume(getattr(wnorm.optim, name), getattr(torch.optim, name), name, kw)
    sd = o1.state_dict()
    keys = {"SGD": ["momentum_buffer"], "Adam": ["exp_avg", "exp_avg_sq", "step"],
            "AdamW": ["exp_avg", "exp_avg_sq", "step"]}[name]
    assert all(sorted(s) == keys for s in sd["state"].values())
    assert len(sd["state"]) == len(list(o1.param_groups[0]["params"]))


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
                                     ("Adam", dict(lr=1e-2, weight_decay=1e-3)),
                                     ("AdamW", dict(lr=1e-2))])
def test_state_dict_torch_to_wnorm(name, kw):
    _, o2 = _resume(getattr(torch.optim, name), getattr(wnorm.optim, name), name, kw)
    assert len(o2.fused_layers()) == 3


def test_state_dict_wnorm_to_wnorm_and_model_keys():
    _resume(wnorm.optim.Adam, wnorm.optim.Adam, "Adam", dict(lr=1e-2))
    model = build()
    keys = list(model.state_dict())
    opt = wnorm.optim.Adam(model, lr=1e-2)
    train(model, opt, batches(n=2))
    assert list(model.state_dict()) == keys
    assert "0.weight" not in keys and "0.weight_g" in keys and "0.weight_v" in keys


# --------------------------------------------------------------------------- 6. resync
def _forward_equal(ma, mb, x, tol=None):
    with torch.no_grad():
        assert_close(mb(x), ma(x), "output", tol)


def _twins_after_two_steps(name: str = "Adam", kw: dict | None = None):
    """Twin models and optimizers (torch.optim, wnorm.optim) after two identical steps."""
    ma, mb = twins()
    oa, ob = pair(name, kw or dict(lr=1e-2), ma, mb)
    data = batches()
    train(ma, oa, data[:2])
    train(mb, ob, data[:2])
    return ma, oa, mb, ob, data


def test_resync_after_model_load_state_dict():
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.1, momentum=0.9), ma, mb)
    data = batches()
    train(ma, oa, data[:2])
    train(mb, ob, data[:2])
    other = build(seed=3).state_dict()
    ma.load_state_dict(other)
    mb.load_state_dict(other)
    _forward_equal(ma, mb, data[2][0])
    assert_close(mb[3].weight.detach(), build(seed=3)[3].weight.detach(), "loaded weight")
    train(ma, oa, data[2:])
    train(mb, ob, data[2:])
    assert_same_training(ma, oa, mb, ob)


def test_resync_after_in_place_edit_under_no_grad():
    ma, oa, mb, ob, data = _twins_after_two_steps()
    for m in (ma, mb):
        with torch.no_grad():
            m[3].weight_v[0].mul_(-2.0)
            m[0].weight_g.mul_(1.5)
    _forward_equal(ma, mb, data[2][0])
    train(ma, oa, data[2:])
    train(mb, ob, data[2:])
    assert_same_training(ma, oa, mb, ob)


def test_resync_after_data_init():
    ma, oa, mb, ob, data = _twins_after_two_steps()
    init = torch.randn(32, 3, 6, 6, dtype=torch.float64)
    ra, rb = wnorm.data_init(ma, init), wnorm.data_init(mb, init)
    assert [r.status for r in rb] == [r.status for r in ra] == ["initialized"] * 3
    for r1, r2 in zip(ra, rb):
        assert_close(r2.sigma, r1.sigma, f"{r1.name} sigma")
    _forward_equal(ma, mb, init)
    with torch.no_grad():  # the init standardized the last layer's pre-activations
        assert torch.allclose(mb(init).std(0, unbiased=False), torch.ones(3, dtype=torch.float64))
    train(ma, oa, data[2:])
    train(mb, ob, data[2:])
    assert_same_training(ma, oa, mb, ob)


def test_double_after_fused_training_continues_in_float64():
    """.double() on a model in fused mode: the plain weight follows g and v to float64, and an
    SGD optimizer without state keeps training it, as torch's does."""
    ma, mb = twins(dtype=torch.float32)
    oa, ob = pair("SGD", dict(lr=0.05), ma, mb)
    data32, data64 = batches(dtype=torch.float32), batches(dtype=torch.float64)
    train(ma, oa, data32[:3])
    train(mb, ob, data32[:3])
    ma.double()
    mb.double()
    for m in modules(mb, ["0", "3", "4"]):
        assert m.weight.dtype == torch.float64 and m.weight_v.dtype == torch.float64
    # the twins trained 3 steps in float32: they agree to float32 rounding, now in float64
    _forward_equal(ma, mb, data64[3][0], tol=_tol(torch.float32))
    train(ma, oa, data64[3:])
    train(mb, ob, data64[3:])
    assert len(ob.fused_layers()) == 3
    for m in modules(mb, ["0", "3", "4"]):
        assert m.weight.dtype == torch.float64
    assert_same_training(ma, oa, mb, ob, tol=_tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9)),
                                     ("Adam", dict(lr=1e-2, weight_decay=1e-3))])
def test_the_step_writes_the_plain_weight_that_g_and_v_give_bit_for_bit(name, kw, dtype):
    """The plain weight the kernel's step writes equals, bit for bit, the one computed from the
    new g and v alone (what a resumed run, or a resync after a load, starts from). Rows of 7
    (shorter than one block of the fixed-order sum), 37 (blocks and a tail) and 300 x 256
    (the threaded path)."""
    from wnorm.weight_norm import _plain_compute

    torch.manual_seed(0)
    model = wnorm.apply(nn.Sequential(nn.Linear(7, 37), nn.Tanh(), nn.Linear(37, 300),
                                      nn.Tanh(), nn.Linear(300, 256))).to(dtype)
    opt = getattr(wnorm.optim, name)(model, **kw)
    assert len(opt.fused_layers()) == 3
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(16, 7, generator=gen, dtype=dtype)
        opt.zero_grad()
        loss_of(model(x), torch.zeros(16, 256, dtype=dtype)).backward()
        opt.step()
    for i in (0, 2, 4):
        layer = model[i]
        written = layer._wn["weight"].plain.detach().clone()
        fresh = _plain_compute(layer.weight_v.detach(), layer.weight_g.detach(), 0)
        assert torch.equal(written, fresh), f"layer {i}: {(written - fresh).abs().max():.3g}"
        assert_close(written, torch._weight_norm(layer.weight_v.detach(),
                                                 layer.weight_g.detach(), 0), "g v/||v||")


# --------------------------------------------------------------------------- 7. errors, release
def test_edit_between_backward_and_step_is_an_error_naming_the_layer():
    model = build()
    opt = wnorm.optim.SGD(model, lr=0.1)
    x, y = batches(n=1)[0]
    loss_of(model(x), y).backward()
    with torch.no_grad():
        model[3].weight_v.mul_(2.0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(WnormError, match=r"3 \(Linear\).*weight_v.*changed after the forward"):
        opt.step()
    # nothing was stepped (one parameter group): the refused step is all or nothing
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), before[k]), k
    # the way out the message gives: zero_grad, forward again, step
    opt.zero_grad()
    loss_of(model(x), y).backward()
    opt.step()


def test_g_edit_between_backward_and_step_is_an_error():
    model = build()
    opt = wnorm.optim.Adam(model, lr=0.1)
    x, y = batches(n=1)[0]
    loss_of(model(x), y).backward()
    with torch.no_grad():
        model[0].weight_g.add_(0.1)
    with pytest.raises(WnormError, match=r"0 \(Conv2d\)"):
        opt.step()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_no_model_is_an_error(name):
    model = build()
    with pytest.raises(WnormError, match="needs the model"):
        getattr(wnorm.optim, name)(model.parameters(), lr=0.1)
    with pytest.raises(WnormError, match="different model"):
        getattr(wnorm.optim, name)(model, lr=0.1, model=build())
    opt = getattr(wnorm.optim, name)(model.parameters(), lr=0.1, model=model)
    assert len(opt.fused_layers()) == 3


def test_second_optimizer_on_owned_layer_is_an_error_until_release():
    model = build()
    first = wnorm.optim.SGD(model, lr=0.1)
    with pytest.raises(WnormError, match=r"already owned by another wnorm.optim"):
        wnorm.optim.Adam(model, lr=0.1)
    assert len(first.fused_layers()) == 3  # the failed attempt took nothing away
    first.release()
    assert first.fused_layers() == []
    second = wnorm.optim.Adam(model, lr=0.1)
    assert len(second.fused_layers()) == 3
    x, y = batches(n=1)[0]
    loss_of(model(x), y).backward()
    assert model[3].weight_v.grad is None and model[3].weight.grad is not None
    second.step()


def test_release_moves_pending_gradients_and_returns_to_autograd():
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.1, momentum=0.9), ma, mb)
    data = batches()
    train(ma, oa, data[:3])
    train(mb, ob, data[:3])
    x, y = data[3]
    for m, o in ((ma, oa), (mb, ob)):
        o.zero_grad()
        loss_of(m(x), y).backward()
    ob.release()  # the pending plain-weight gradients move to g.grad / v.grad
    assert mb[3].weight_v.grad is not None
    oa.step()
    ob.step()
    train(ma, oa, data[4:])
    train(mb, ob, data[4:])
    assert ob.fused_layers() == []
    assert mb[3].weight_v.grad is not None
    assert_same_training(ma, oa, mb, ob)


def test_dropped_optimizer_returns_layers_to_autograd():
    model = build()
    opt = wnorm.optim.Adam(model, lr=1e-2)
    x, y = batches(n=1)[0]
    loss_of(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    del opt
    gc.collect()
    loss_of(model(x), y).backward()
    for m in modules(model, ["0", "3", "4"]):
        assert m.weight_v.grad is not None and m.weight_g.grad is not None
        assert all(s.plain is None for s in m._wn.values())
    wnorm.optim.SGD(model, lr=0.1)  # free to be owned again


# --------------------------------------------------------------------------- 8. inference, copies
def test_eval_no_grad_inference_in_fused_mode():
    ma, mb = twins()
    oa, ob = pair("Adam", dict(lr=1e-2), ma, mb)
    data = batches()
    train(ma, oa, data[:4])
    train(mb, ob, data[:4])
    ma.eval()
    mb.eval()
    x = data[4][0]
    _forward_equal(ma, mb, x)
    with torch.inference_mode():
        assert_close(mb(x), ma(x), "inference_mode output")
    out = mb(x)  # eval with grad enabled: still differentiable w.r.t. the input path
    assert out.requires_grad
    assert len(ob.fused_layers()) == 3


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_of_a_fused_model_is_on_autograd(how, copied):
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.1, momentum=0.9), ma, mb)
    data = batches()
    train(ma, oa, data[:3])
    train(mb, ob, data[:3])
    x, y = data[3]
    loss_of(mb(x), y).backward()  # a pending plain-weight gradient too
    mc = copied(mb, how)
    assert list(mc.state_dict()) == list(ma.state_dict())
    for m in modules(mc, ["0", "3", "4"]):
        assert all(s.plain is None for s in m._wn.values())
    _forward_equal(ma, mc, x)
    loss_of(mc(x), y).backward()
    for m in modules(mc, ["0", "3", "4"]):
        assert m.weight_v.grad is not None
    # the copy trains with torch.optim like the twin; the original is still fused
    oc = torch.optim.SGD(mc.parameters(), lr=0.1)
    oc.step()
    assert len(ob.fused_layers()) == 3
    assert mb[3].weight.grad is not None and mb[3].weight_v.grad is None


# --------------------------------------------------------------------------- 9. closures
@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.05, momentum=0.9)), ("Adam", dict(lr=1e-2))])
def test_step_with_closure(name, kw):
    ma, mb = twins()
    oa, ob = pair(name, kw, ma, mb)
    for x, y in batches():
        got = []
        for m, o in ((ma, oa), (mb, ob)):
            def closure(m=m, o=o):
                o.zero_grad()
                loss = loss_of(m(x), y)
                loss.backward()
                return loss
            loss = o.step(closure)
            assert torch.is_tensor(loss) and loss.requires_grad  # the closure's own loss
            got.append(float(loss.detach()))
        assert got[1] == pytest.approx(got[0], rel=1e-12)
    assert_same_training(ma, oa, mb, ob)


def test_lbfgs_style_repeated_closure_calls():
    """A closure called twice before the step: the second backward accumulates (zero_grad
    first), and the step uses the last gradients, as torch's."""
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.05), ma, mb)
    x, y = batches(n=1)[0]
    for m, o in ((ma, oa), (mb, ob)):
        def closure(m=m, o=o):
            o.zero_grad()
            loss = loss_of(m(x), y)
            loss.backward()
            return loss
        closure()
        o.step(closure)
    assert_same_training(ma, oa, mb, ob)


# --------------------------------------------------------------------------- 10. step hooks
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_step_hooks_run_once_per_step(name):
    ma, mb = twins()
    oa, ob = pair(name, dict(lr=1e-2), ma, mb)  # torch's own class is hooked too by now
    calls = {"pre": 0, "post": 0, "pre_a": 0}
    ob.register_step_pre_hook(lambda o, a, k: calls.__setitem__("pre", calls["pre"] + 1))
    ob.register_step_post_hook(lambda o, a, k: calls.__setitem__("post", calls["post"] + 1))
    oa.register_step_pre_hook(lambda o, a, k: calls.__setitem__("pre_a", calls["pre_a"] + 1))
    train(ma, oa, batches(n=3))
    train(mb, ob, batches(n=3))
    assert calls == {"pre": 3, "post": 3, "pre_a": 3}
    assert_same_training(ma, oa, mb, ob)


def test_global_step_hook_runs_once_per_step():
    model = build()
    opt = wnorm.optim.SGD(model, lr=0.1)
    torch.optim.SGD(build().parameters(), lr=0.1).step()  # torch.optim.SGD.step is wrapped
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda o, a, k: seen.append(type(o).__module__))
    try:
        train(model, opt, batches(n=2))
    finally:
        handle.remove()
    assert seen == ["wnorm.optim", "wnorm.optim"]


def test_pre_hook_changing_lr_is_used_by_the_fused_step():
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.1), ma, mb)

    def halve(o, a, k):
        for grp in o.param_groups:
            grp["lr"] *= 0.5

    oa.register_step_pre_hook(halve)
    ob.register_step_pre_hook(halve)
    data = batches(n=3)
    train(ma, oa, data)
    train(mb, ob, data)
    assert ob.param_groups[0]["lr"] == pytest.approx(0.1 / 8)
    assert_same_training(ma, oa, mb, ob)


# --------------------------------------------------------------------------- found in review
def test_freezing_a_layer_after_the_optimizer_exists_is_honoured():
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.1), ma, mb)
    data = batches()
    train(ma, oa, data[:2]), train(mb, ob, data[:2])
    for m in (ma, mb):
        m[3].requires_grad_(False)
    frozen = mb[3].weight_v.detach().clone()
    train(ma, oa, data[2:]), train(mb, ob, data[2:])
    assert torch.equal(mb[3].weight_v.detach(), frozen)
    assert_same_training(ma, oa, mb, ob)


def test_refresh_after_a_data_edit_recomputes_the_plain_weight():
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.1), ma, mb)
    train(ma, oa, batches(n=2)), train(mb, ob, batches(n=2))
    for m in (ma, mb):
        m[3].weight_v.data.mul_(-2.0)  # .data hides the edit from the version counter
        wnorm.refresh(m)
    x = batches(n=1, seed=9)[0][0]
    torch.testing.assert_close(mb(x), ma(x))


def test_step_consumes_the_plain_weight_gradient():
    """model.zero_grad() cannot see the plain weights, so step() consumes their gradients
    (None afterwards): training with model.zero_grad() equals torch.optim with zero_grad()."""
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.1, momentum=0.9), ma, mb)
    fused = _fused_modules(ob, mb)
    assert fused
    for x, y in batches(n=4):
        oa.zero_grad()
        loss_of(ma(x), y).backward()
        oa.step()
        mb.zero_grad()  # the model's, not the optimizer's
        loss_of(mb(x), y).backward()
        assert all(m.weight.grad is not None for m in fused)
        ob.step()
        assert all(m.weight.grad is None for m in fused)
    assert_same_training(ma, oa, mb, ob)


def _fused_modules(opt, model) -> list[nn.Module]:
    names = set(opt.fused_layers())
    return [m for n, m in model.named_modules() if f"{n}.weight" in names]


def test_double_with_momentum_state_continues_like_torch():
    ma, mb = twins(dtype=torch.float32)
    oa, ob = pair("SGD", dict(lr=0.05, momentum=0.9), ma, mb)
    for dtype in (torch.float32, torch.float64):
        if dtype == torch.float64:
            ma.double(), mb.double()
        train(ma, oa, batches(n=2, dtype=dtype)), train(mb, ob, batches(n=2, dtype=dtype))
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert pb.dtype == torch.float64
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


def test_functional_call_gradients_reach_the_passed_parameters():
    model = build()
    opt = wnorm.optim.SGD(model, lr=0.1)
    params = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
    x, y = batches(n=1)[0]
    loss_of(torch.func.functional_call(model, params, (x,)), y).backward()
    assert params["3.weight_v"].grad is not None and params["3.weight_g"].grad is not None
    assert opt.fused_layers()  # the model's own layers are still fused


def test_a_refused_step_with_several_groups_changes_nothing():
    m = build()
    opt = wnorm.optim.SGD([{"params": list(m[0].parameters())},
                           {"params": list(m[3].parameters()) + list(m[4].parameters())}],
                          lr=0.1, model=m)
    x, y = batches(n=1)[0]
    loss_of(m(x), y).backward()
    with torch.no_grad():
        m[3].weight_v.mul_(2.0)
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    with pytest.raises(WnormError, match="changed after the forward"):
        opt.step()
    assert [k for k, p in m.named_parameters() if not torch.equal(p.detach(), before[k])] == []


# --------------------------------------------------------------------------- second review
class _TiedV(nn.Module):
    """Two weight-normalized layers sharing one weight_v (each with its own g)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = wnorm.weight_norm(nn.Linear(5, 5, bias=False))
        self.b = wnorm.weight_norm(nn.Linear(5, 5, bias=False))
        self.b.weight_v = self.a.weight_v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class _TiedLM(nn.Module):
    """Embedding and output layer tied through both weight_g and weight_v."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = wnorm.weight_norm(nn.Embedding(10, 4))
        self.out = wnorm.weight_norm(nn.Linear(4, 10))
        self.out.weight_g, self.out.weight_v = self.emb.weight_g, self.emb.weight_v

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(i)))


@pytest.mark.parametrize("name, kw", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=1e-2))])
def test_tied_parameters_are_stepped_once(name, kw):
    gen = torch.Generator().manual_seed(0)
    for cls, make_x in ((_TiedV, lambda: torch.randn(8, 5, generator=gen, dtype=torch.float64)),
                        (_TiedLM, lambda: torch.randint(0, 10, (8,), generator=gen))):
        torch.manual_seed(0)
        ma = cls().double()
        mb = copy.deepcopy(ma)
        oa, ob = pair(name, kw, ma, mb)
        assert ob.fused_layers() == []  # shared g/v: autograd sums the uses, torch steps once
        for _ in range(3):
            x = make_x()
            for m, o in ((ma, oa), (mb, ob)):
                o.zero_grad()
                m(x).square().mean().backward()
                o.step()
        assert_same_training(ma, oa, mb, ob)


def test_momentum_history_of_v_survives_g_joining_later():
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.1, momentum=0.9), ma, mb)
    data = batches()
    for m in (ma, mb):
        m[3].weight_g.requires_grad_(False)  # v trains alone and gets a momentum buffer
    train(ma, oa, data[:2]), train(mb, ob, data[:2])
    for m in (ma, mb):
        m[3].weight_g.requires_grad_(True)
    train(ma, oa, data[2:]), train(mb, ob, data[2:])
    assert_same_training(ma, oa, mb, ob)


@pytest.mark.parametrize("name, kw", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=1e-2)),
                                      ("SGD", dict(lr=0.1, weight_decay=0.1))])
def test_zero_grad_keep_tensors_steps_a_layer_the_forward_skipped(name, kw):
    """With zero_grad(set_to_none=False) torch steps an unused layer with zero gradients
    (momentum, Adam's count, weight decay move it); so does wnorm.optim."""
    ma, mb = twins()
    oa, ob = pair(name, kw, ma, mb)
    for i, (x, y) in enumerate(batches()):
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad(set_to_none=False)
            if i < 2:
                out = m(x)
            else:  # the last layer is skipped from now on
                out = m[:4](x)[:, : y.shape[-1]]
            loss_of(out, y).backward()
            o.step()
    assert_same_training(ma, oa, mb, ob)


def test_grad_scaler_is_refused_while_layers_are_fused():
    model = build(dtype=torch.float32)
    opt = wnorm.optim.SGD(model, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batches(dtype=torch.float32, n=1)[0]
    scaler.scale(loss_of(model(x), y)).backward()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    with pytest.raises(WnormError, match="GradScaler"):
        scaler.step(opt)
    assert all(torch.equal(p.detach(), before[k]) for k, p in model.named_parameters())
    opt.release()  # back on autograd: the scaler works as with torch.optim
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("how", ["deepcopy", "save"])
def test_a_copied_optimizer_trains_like_torch(how, copied):
    ma, mb = twins()
    oa, ob = pair("Adam", dict(lr=1e-2), ma, mb)
    data = batches()
    train(ma, oa, data[:2]), train(mb, ob, data[:2])
    mc, oc = copied((mb, ob), how)
    assert oc.fused_layers() == []  # the copy's layers are on autograd
    train(ma, oa, data[2:]), train(mc, oc, data[2:])
    assert_same_training(ma, oa, mc, oc)


def test_a_no_op_to_between_backward_and_step_is_not_an_edit():
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.1), ma, mb)
    for m, o in ((ma, oa), (mb, ob)):
        x, y = batches(n=1)[0]
        o.zero_grad()
        loss_of(m(x), y).backward()
        m.to("cpu")
        m.double()
        o.step()
    assert_same_training(ma, oa, mb, ob)


# --------------------------------------------------------------------------- third review
@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=1e-2)),
                                     ("SGD", dict(lr=0.1, weight_decay=0.1))])
def test_model_zero_grad_and_a_layer_a_later_forward_skips(name, kw):
    """With model.zero_grad() (which cannot see the plain weights), a fused layer the forward
    stops using gets no gradient and is not stepped, as torch skips g and v without one; the
    step used to leave a zero gradient on the plain weight, and momentum, Adam and weight decay
    moved the unused layer."""
    ma, mb = twins()
    oa, ob = pair(name, kw, ma, mb)
    for i, (x, y) in enumerate(batches(n=5)):
        for m, o in ((ma, oa), (mb, ob)):
            m.zero_grad()
            out = m(x) if i < 2 else m[3](m[2](m[1](m[0](x))))[:, :3]  # layer 4 unused from 2
            loss_of(out, y).backward()
            o.step()
    assert_same_training(ma, oa, mb, ob)


def test_a_layer_frozen_after_some_steps_stays_put_with_model_zero_grad():
    model = build()
    opt = wnorm.optim.SGD(model, lr=0.1, momentum=0.9)
    for i, (x, y) in enumerate(batches(n=4)):
        if i == 2:
            model[4].requires_grad_(False)
            frozen = {k: p.detach().clone() for k, p in model[4].named_parameters()}
        model.zero_grad()
        loss_of(model(x), y).backward()
        opt.step()
    assert all(torch.equal(p.detach(), frozen[k]) for k, p in model[4].named_parameters())


def test_zero_grad_keep_tensors_steps_an_unused_layer_with_zeros_as_torch_does():
    ma, mb = twins()
    oa, ob = pair("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1), ma, mb)
    for i, (x, y) in enumerate(batches(n=4)):
        for m, o in ((ma, oa), (mb, ob)):
            o.zero_grad(set_to_none=False)
            out = m(x) if i < 2 else m[3](m[2](m[1](m[0](x))))[:, :3]
            loss_of(out, y).backward()
            o.step()
    assert not torch.equal(mb[4].weight_v, build()[4].weight_v)  # moved by momentum and decay
    assert_same_training(ma, oa, mb, ob)


def test_adam_fused_true_step_state_is_float32_as_torch_keeps_it(monkeypatch):
    """torch keeps state["step"] in float32 for fused=True groups, also under a float64 default
    dtype; the state dicts must match torch's."""
    torch.set_default_dtype(torch.float64)
    try:
        ma, mb = twins()
        oa, ob = pair("Adam", dict(lr=1e-2, fused=True), ma, mb)
        train(ma, oa, batches(n=2))
        train(mb, ob, batches(n=2))
    finally:
        torch.set_default_dtype(torch.float32)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert ob.state[pb]["step"].dtype == oa.state[pa]["step"].dtype == torch.float32
    assert_same_training(ma, oa, mb, ob)
