"""Edits of a weight-normalized model by any means take effect (issue 15, items 1, 2, 5, 6, 10,
11): edits of g and v are seen by the next forward, writes into the computed weight are split
back into g and v, reset_parameters gives the layer's usual init, fold leaves Parameters and
touches nothing but the model it is given, and a half-precision weight survives weight_norm."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import wnorm

D = torch.float64


def layer_and_twin(make=lambda: nn.Linear(6, 4)):
    torch.manual_seed(0)
    wn = wnorm.weight_norm(make())
    return wn, torch.randn(5, 6)


def expected(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output from its g and v as they are, computed here by eq. 2."""
    g, v = m.weight_g.detach(), m.weight_v.detach()
    w = g * v / v.norm(dim=1, keepdim=True)
    return nn.functional.linear(x, w, m.bias.detach())


# ------------------------------------------------------------------ item 5: edits of g and v
EDITS = {
    "data": lambda m, new: m.weight_v.data.copy_(new),
    "data-mul": lambda m, new: m.weight_g.data.mul_(0.5),
    "copy_": lambda m, new: m.weight_v.copy_(new),
    "lerp_": lambda m, new: m.weight_v.lerp_(new, 0.3),
    "foreach_lerp_": lambda m, new: torch._foreach_lerp_([m.weight_v, m.weight_g],
                                                         [new, m.weight_g * 2], 0.3),
    "load_state_dict": lambda m, new: m.load_state_dict(
        {**m.state_dict(), "weight_v": new}),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_every_edit_of_g_and_v_is_seen_by_the_next_forward(edit, mode):
    """EMA code writes through .data, copy_, lerp_ or torch._foreach_lerp_; before, an eval
    forward after a .data edit used the old weight (outputs off by 0.84 relative)."""
    m, x = layer_and_twin()
    m.train(mode == "train")
    with torch.no_grad():
        m(x)  # a forward before the edit
        new = torch.randn_like(m.weight_v)
        EDITS[edit](m, new)
        torch.testing.assert_close(m(x), expected(m, x), rtol=1e-6, atol=1e-6)


def test_to_dtype_and_back_is_seen():
    m, x = layer_and_twin()
    with torch.no_grad():
        y = m(x)
        m.double()
        torch.testing.assert_close(m(x.double()), y.double(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ item 6: writes into w
@pytest.fixture(params=["cpu", "as on a GPU"])
def compare(request, monkeypatch):
    """Flush as on a CPU (asks whether a held weight was written) and as on a GPU (does not:
    no host sync), both run here."""
    if request.param != "cpu":
        monkeypatch.setattr("wnorm._held._COMPARE_ON", ())
    return request.param


WRITES = {
    "nn.init.zeros_": lambda w: nn.init.zeros_(w),
    "nn.init.kaiming_uniform_": lambda w: nn.init.kaiming_uniform_(w, a=5 ** 0.5),
    "copy_": lambda w: w.copy_(torch.linspace(-1, 1, w.numel()).view_as(w)),
    "data.normal_": lambda w: w.data.normal_(0.0, 0.02),  # DCGAN-style init
    "row": lambda w: w[2].fill_(0.25),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_a_write_into_the_weight_takes_effect_in_training_and_eval(write, compare):
    """Before, nn.init on layer.weight was silently ignored in training and applied to the
    eval path only."""
    m, x = layer_and_twin()
    torch.manual_seed(1)
    with torch.no_grad():
        w = m.weight
        WRITES[write](w)
        wanted = w.detach().clone()
    for mode in (True, False):
        m.train(mode)
        torch.testing.assert_close(m.weight.detach(), wanted, rtol=1e-6, atol=1e-7)
        out = m(x)
        assert torch.isfinite(out).all()  # a zero row is g = 0, not NaN
        torch.testing.assert_close(out.detach(), nn.functional.linear(x, wanted, m.bias),
                                   rtol=1e-5, atol=1e-6)


def test_model_apply_with_an_init_function_initializes_every_layer():
    torch.manual_seed(0)
    net = wnorm.apply(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))

    def init_fn(m):
        if isinstance(m, nn.Linear):
            nn.init.orthogonal_(m.weight)
            nn.init.zeros_(m.bias)

    net.apply(init_fn)
    for m in (net[0], net[2]):
        w = m.weight.detach()
        rows = w if w.shape[0] <= w.shape[1] else w.t()
        torch.testing.assert_close(rows @ rows.t(), torch.eye(rows.shape[0]), atol=1e-5, rtol=0)
        assert torch.equal(m.weight_v.detach(), w)  # v took the written rows, g their norms


def test_a_write_lands_before_state_dict_and_pickling(compare):
    m, _ = layer_and_twin()
    nn.init.constant_(m.weight, 0.5)
    sd = m.state_dict()
    torch.testing.assert_close(sd["weight_g"], torch.full((4, 1), 0.5 * 6 ** 0.5))
    nn.init.constant_(m.weight, 0.25)
    copied = copy.deepcopy(m)
    torch.testing.assert_close(copied.weight, torch.full((4, 6), 0.25))


def test_a_stale_read_does_not_undo_an_optimizer_step(compare):
    """A weight read outside the forward (logging) and not written must not be written back
    over the step that followed."""
    m, x = layer_and_twin()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    _ = m.weight.detach().norm()  # a read for logging
    m(x).square().sum().backward()
    opt.step()
    after = (m.weight_g.detach().clone(), m.weight_v.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing was written: nothing to say
        m(x)  # the next access
    assert torch.equal(m.weight_g, after[0]) and torch.equal(m.weight_v, after[1])


DATA_WRITES = {
    "data[0] = 3": lambda w: w.data.__setitem__(0, 3.0),
    "data.mul_(2)": lambda w: w.data.mul_(2),
}


@pytest.mark.parametrize("write", list(DATA_WRITES))
def test_a_write_through_data_after_backward_and_before_the_step_lands(write, compare):
    """A .data write moves no version: before, the optimizer step that followed made the held
    weight look stale and the write was dropped without a word. Written rows land over the
    step, as a write through autograd's view does; the others keep it. On a CPU a warning
    says so; on a GPU telling would be a host sync, so the write lands unannounced."""
    m, x = layer_and_twin()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    loss = m(x).square().sum()
    w = m.weight  # read after the forward (logging), kept
    loss.backward()
    DATA_WRITES[write](w)
    written = w.detach().clone()
    opt.step()
    g, v = m.weight_g.detach(), m.weight_v.detach()
    stepped = g * v / v.norm(dim=1, keepdim=True)  # the weight the step gave
    wanted = written.clone()
    if write == "data[0] = 3":
        wanted[1:] = stepped[1:]  # unwritten rows: the step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = m(x)
    said = [str(c.message) for c in caught]
    assert (said != []) == (compare == "cpu"), said
    assert all("'weight' was written in place after it was read" in s for s in said)
    torch.testing.assert_close(m.weight.detach(), wanted, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.detach(), nn.functional.linear(x, wanted, m.bias),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("read_again_inside", [False, True])
def test_a_weight_read_and_written_under_inference_mode(read_again_inside):
    # an inference tensor has no version counter: reading layer.weight there raised
    # "Inference tensors do not track version counter", naming no layer
    torch.manual_seed(0)
    m = wnorm.weight_norm(nn.Linear(4, 3))
    w0 = m.weight.detach().clone()
    with torch.inference_mode():
        m.weight.mul_(2)
        if read_again_inside:
            torch.testing.assert_close(m.weight, 2 * w0)
    torch.testing.assert_close(m.weight, 2 * w0)
    m(torch.randn(2, 4)).sum().backward()  # trains as before
    assert m.weight_v.grad is not None and m.weight_g.grad is not None


def test_writes_into_a_standardized_weight_are_refused_naming_the_layer():
    m = wnorm.weight_standardization(nn.Linear(6, 4))
    nn.init.constant_(m.weight, 1.0)
    with pytest.raises(wnorm.WnormError, match=r"Linear: 'weight' was written in place, but a "
                                               r"WeightStandardization weight"):
        m(torch.randn(2, 6))


@pytest.mark.parametrize("method", [wnorm.centered_weight_norm, wnorm.balanced_weight_norm])
def test_a_centered_weight_takes_a_writes_centered_rows_and_refuses_constant_ones(method):
    # a constant row has no centered part: it became 0 with g = 0, a unit that never learns
    torch.manual_seed(0)
    m, x = method(nn.Linear(6, 4)), torch.randn(3, 6)
    g, v = m.weight_g.detach().clone(), m.weight_v.detach().clone()
    nn.init.constant_(m.weight, 0.5)
    with pytest.raises(wnorm.WnormError, match=r"Linear: 'weight' was written with constant "
                                               r"nonzero rows, but a \w+WeightNorm centers"):
        m(x)
    assert torch.equal(m.weight_g, g) and torch.equal(m.weight_v, v)  # as it was
    w = torch.randn(4, 6) + 1.0
    with torch.no_grad():
        m.weight.copy_(w)
    m(x).sum().backward()  # the write's centered rows: the mean is dropped, as documented
    torch.testing.assert_close(m.weight, w - w.mean(dim=1, keepdim=True))
    nn.init.zeros_(m.weight)  # a zero row is a weight of 0 (g = 0), which the map can hold
    assert m(x).sub(m.bias).abs().max() == 0


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(6, 4), lambda: nn.Conv2d(3, 5, 3), lambda: nn.ConvTranspose1d(3, 4, 5),
    lambda: nn.LSTM(3, 4),
], ids=["linear", "conv2d", "convT1d", "lstm"])
def test_reset_parameters_gives_the_layers_usual_init(make):
    """v is re-initialized as the layer's own init would and g = ||v||: the weight equals a
    plain layer's init from the same seed (before, the weight was left as it was)."""
    torch.manual_seed(0)
    plain, wn = make(), wnorm.apply(make())
    torch.manual_seed(5)
    plain.reset_parameters()
    torch.manual_seed(5)
    wn.reset_parameters()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(getattr(wn, name).detach(), p.detach(), rtol=0, atol=1e-7,
                                   msg=name)


# ------------------------------------------------------------------ items 1 and 2: fold
@pytest.mark.parametrize("api", ["old", "new", "wnorm"])
def test_fold_leaves_parameters_with_their_requires_grad(api):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 4, 5), nn.ReLU(), nn.Conv1d(4, 2, 3))
    plain_count = sum(p.numel() for p in net.parameters())
    for m in (net[0], net[2]):
        {"old": torch.nn.utils.weight_norm, "new": torch.nn.utils.parametrizations.weight_norm,
         "wnorm": wnorm.weight_norm}[api](m)
    net[2].requires_grad_(False)
    x = torch.randn(2, 3, 12)
    with torch.no_grad():
        y = net(x)
    wnorm.fold(net)
    assert sum(p.numel() for p in net.parameters()) == plain_count  # was 0.12M of 76.6M (DAC)
    for m in (net[0], net[2]):
        assert type(m) is nn.Conv1d and isinstance(m._parameters["weight"], nn.Parameter)
        assert not m._buffers and not m._load_state_dict_pre_hooks
    assert net[0].weight.requires_grad and not net[2].weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(net(x), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("api", ["old", "new", "wnorm"])
def test_fold_of_a_deep_copy_leaves_the_original_working(api):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    for m in (net[0], net[2]):
        {"old": torch.nn.utils.weight_norm, "new": torch.nn.utils.parametrizations.weight_norm,
         "wnorm": wnorm.weight_norm}[api](m)
    x = torch.randn(5, 3)
    with torch.no_grad():
        y = net(x)
    folded = wnorm.fold(copy.deepcopy(net))
    with torch.no_grad():
        torch.testing.assert_close(net(x), y, rtol=0, atol=0)  # AttributeError before
        torch.testing.assert_close(folded(x), y, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ item 11: half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_leaves_a_half_precision_weight_bit_for_bit(dtype, dim):
    """Before, dim=None on a bf16 layer moved 12 of 20 entries of a 5 x 4 Linear by one ulp in
    about a quarter of random layers; PyTorch's own leaves it unchanged."""
    for seed in range(40):
        torch.manual_seed(seed)
        lin = nn.Linear(4, 5).to(dtype)
        w = lin.weight.detach().clone()
        wnorm.weight_norm(lin, dim=dim)
        assert torch.equal(lin.weight, w), seed


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_leaves_a_float32_weight_bit_for_bit(dim):
    for seed in range(40):
        torch.manual_seed(seed)
        conv = nn.Conv2d(3, 6, 3)
        w = conv.weight.detach().clone()
        wnorm.weight_norm(conv, dim=dim)
        assert torch.equal(conv.weight, w), seed


def test_a_parameter_replaced_after_a_read_or_inside_a_cached_block():
    """The held and cached weights are keyed on g and v by identity: replacing either (another
    Parameter of the same shape) is seen, and never compares tensors by value."""
    m, x = layer_and_twin()
    _ = m.weight  # held
    m.weight_v = nn.Parameter(torch.randn(4, 6))
    torch.testing.assert_close(m(x), expected(m, x))
    with torch.no_grad(), wnorm.cached():
        m(x)
        m.weight_g = nn.Parameter(m.weight_g.detach() * 2)
        torch.testing.assert_close(m(x), expected(m, x))


@pytest.mark.parametrize("then", ["forward", "export"])
def test_a_parameter_assigned_after_a_write_into_the_weight_wins(then):
    # the write came first: it lands in the g and v it was made over, and the Parameter
    # assigned since replaces them (eager code landed the write over the new Parameter, and
    # torch.export in the old g and v: the two disagreed)
    m, x = layer_and_twin()
    with torch.no_grad():
        m.weight[0].zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.weight_g = nn.Parameter(torch.full((4, 1), 2.0))
    assert m.weight_v[0].abs().sum() > 0  # v kept its direction: the write's g went away
    if then == "export":
        torch.testing.assert_close(torch.export.export(m, (x,)).module()(x), expected(m, x))
    torch.testing.assert_close(m(x), expected(m, x))
    torch.testing.assert_close(m.weight.norm(dim=1), torch.full((4,), 2.0))


def test_a_write_from_one_thread_is_kept_while_another_thread_runs_a_forward():
    # "inside a layer's forward" is per thread: an inference thread (or nn.DataParallel's
    # replicas) running a forward must not make another thread's nn.init write a no-op
    import threading

    entered, release = threading.Event(), threading.Event()

    class SlowLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            entered.set()
            assert release.wait(10)
            return super().forward(x)

    slow = wnorm.weight_norm(SlowLinear(3, 3))
    layer = wnorm.weight_norm(nn.Linear(4, 2))
    other = threading.Thread(target=slow, args=(torch.zeros(1, 3),))
    other.start()
    try:
        assert entered.wait(10)
        nn.init.constant_(layer.weight, 0.5)  # while the other thread is inside a forward
    finally:
        release.set()
        other.join()
    torch.testing.assert_close(layer(torch.ones(1, 4)), torch.full((1, 2), 2.0) + layer.bias)


def test_a_read_between_two_forwards_leaves_their_backward_valid(compare):
    # logging a weight between the forwards of an accumulated loss: the flush at the second
    # forward must not invalidate what the first one saved for backward
    layer = wnorm.weight_norm(nn.Linear(4, 3))
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    expected = copy.deepcopy(layer)
    (expected(x1).square().sum() + expected(x2).square().sum()).backward()
    y1 = layer(x1)
    with torch.no_grad():
        layer.weight.norm()  # a read from outside the layer's forward
    y2 = layer(x2)
    (y1.square().sum() + y2.square().sum()).backward()
    for name in ("weight_g", "weight_v", "bias"):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(expected, name).grad)



def _written_then_stepped() -> nn.Module:
    """A layer whose weight was written in place after backward, then stepped."""
    torch.manual_seed(0)
    m = wnorm.apply(nn.Sequential(nn.Linear(4, 3)))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(2, 4)).sum().backward()
    with torch.no_grad():
        m[0].weight.zero_()
    opt.step()
    return m


def test_a_write_into_the_weight_and_an_in_place_change_of_g_and_v_warn_and_the_write_lands(
        compare):
    # which came last is not recorded: a write after backward and before the step is meant to
    # land; a checkpoint loaded in place after an nn.init write is said to be overwritten
    m = _written_then_stepped()
    with pytest.warns(UserWarning, match=r"'weight' was written in place after it was read, "
                      r"and 'weight_g'/'weight_v' were changed in place \(or through \.data\) "
                      r"since; the write into "
                      r"'weight' lands"):
        assert m[0].weight.abs().sum() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        m(torch.ones(2, 4))


ACCESSES = {
    "forward": lambda m: m(torch.ones(2, 4)),
    "layer.weight": lambda m: m[0].weight,
    "state_dict": lambda m: m.state_dict(),
    # torch.compile's frame evaluation adds frames a computed stacklevel counted: it named
    # torch/_dynamo/eval_frame.py
    "compiled forward": lambda m: torch.compile(m, backend="eager")(torch.ones(2, 4)),
}


@pytest.mark.parametrize("access", list(ACCESSES))
def test_the_warning_of_a_write_landing_over_a_step_names_the_users_line(access):
    # before, a fixed stacklevel named a line inside torch's Module call or wnorm itself
    m = _written_then_stepped()
    with pytest.warns(UserWarning, match="was written in place after it was read") as said:
        ACCESSES[access](m)
    assert [w.filename for w in said] == [__file__]


def test_an_edit_of_g_and_v_through_data_after_a_read_of_the_weight_is_kept(compare):
    # EMA updates through .data, with nn.MultiheadAttention reading out_proj.weight in its own
    # forward (outside the Linear's): the held weight must not be taken for a write
    mha = wnorm.apply(nn.MultiheadAttention(8, 2))
    x = torch.randn(3, 2, 8)
    with torch.no_grad():
        mha(x, x, x)  # holds out_proj.weight
        mha.out_proj.weight_g.data.mul_(0.5)
        mha.out_proj.weight_v.data.add_(0.1)
        g, v = mha.out_proj.weight_g.clone(), mha.out_proj.weight_v.clone()
        mha(x, x, x)
    assert torch.equal(mha.out_proj.weight_g, g) and torch.equal(mha.out_proj.weight_v, v)
    layer = wnorm.weight_norm(nn.Linear(4, 3))
    w = layer.weight  # read, then both: g edited through .data and one row written
    layer.weight_g.data.mul_(2)
    with torch.no_grad():
        w[1].fill_(0.5)
    expected = layer.weight_g.detach().clone()
    expected[1] = 0.5 * 2  # the written row: its norm
    torch.testing.assert_close(layer.weight[1], torch.full((4,), 0.5))  # this access splits
    torch.testing.assert_close(layer.weight_g, expected)


def test_a_read_of_a_weight_with_a_nan_row_is_not_taken_for_a_write(compare):
    # a diverged run: NaN never equals NaN, so a row read and left alone looked written, and
    # the next forward warned that g and v were changed in place
    layer = wnorm.weight_norm(nn.Linear(4, 3))
    with torch.no_grad():
        layer.weight_v[1] = float("nan")
    g, v = layer.weight_g.detach().clone(), layer.weight_v.detach().clone()
    layer.weight.norm()  # logging: holds the weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 4))
    assert torch.equal(layer.weight_g, g) and torch.equal(layer.weight_v[[0, 2]], v[[0, 2]])
    assert layer.weight_v[1].isnan().all()


class _LM(nn.Module):
    """GPT-2 style: the LM head shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(10, 6), nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def _tied_lm() -> nn.Module:
    torch.manual_seed(0)
    return wnorm.apply(_LM(), types=wnorm.DEFAULT_TYPES + (nn.Embedding,))


def test_a_write_through_one_holder_of_a_tie_is_seen_by_the_other(compare):
    # nn.init through the head must reach the embedding's next forward, and a training step
    # must not see it land mid-graph
    LM = _LM
    lm = _tied_lm()
    plain = LM()
    nn.init.normal_(lm.head.weight, std=0.02)
    with torch.no_grad():
        plain.emb.weight.copy_(lm.head.weight)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(lm(ids), plain(ids))
    nn.init.normal_(lm.head.weight, std=0.02)
    lm(ids).sum().backward()  # the write lands before the embedding's forward saves g and v


@pytest.mark.parametrize("step", [False, True])
def test_a_write_through_the_head_of_a_tie_reaches_a_compiled_models_first_forward(
        step, compare):
    # the embedding computed its weight from g and v inside the graph, missing the head's
    # write (the head landed it at its own graph break): one forward mixed the two, off by ~8,
    # and a first training step raised autograd's in-place error, or on a GPU got wrong grads
    lm, eager = _tied_lm(), _tied_lm()
    pretrained = torch.randn(10, 6)
    for m in (lm, eager):
        with torch.no_grad():
            m.head.weight.copy_(pretrained)
    ids = torch.tensor([[1, 2, 3]])
    torch._dynamo.reset()
    compiled = torch.compile(lm, backend="eager")
    y, want = compiled(ids), eager(ids)
    torch.testing.assert_close(y, torch.tanh(pretrained[ids]) @ pretrained.t())
    if step:
        y.square().sum().backward()
        want.square().sum().backward()
        for (name, p), q in zip(lm.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_dropped_model_whose_weight_was_read_leaves_no_entry_behind():
    # a weight read outside forward (logging) is registered so that a tie's other holders
    # see writes into it; a dropped model's entry stayed for good
    import gc

    from wnorm import _held

    gc.collect()
    before = len(_held.HELD)
    for _ in range(50):
        m = wnorm.weight_norm(nn.Linear(4, 3))
        m.weight.sum()  # read outside forward: held
        del m
    gc.collect()
    assert len(_held.HELD) == before


def test_a_layer_built_under_inference_mode_reads_and_folds():
    # its g and v are inference tensors: reading layer.weight raised "Inference tensors do
    # not track version counter", where a plain or PyTorch-normalized layer reads fine
    with torch.inference_mode():
        m = wnorm.weight_norm(nn.Linear(3, 4))
        x = torch.randn(2, 3)
        w = m.weight
        torch.testing.assert_close(m(x), x @ w.t() + m.bias)
        assert len(m.state_dict()) == 3
        folded = wnorm.fold(m)
        torch.testing.assert_close(folded.weight, w)


RESTORES = {
    # ES and TRPO perturb, evaluate and restore the parameters through .data: no version moves
    "vector_to_parameters": lambda m, flat: nn.utils.vector_to_parameters(flat, m.parameters()),
    "p.data = t": lambda m, flat: [setattr(p, "data", t.view_as(p).clone()) for p, t in zip(
        m.parameters(), flat.split([p.numel() for p in m.parameters()]))],
    "p.data.mul_": lambda m, flat: [p.data.mul_(0.5) for p in m.parameters()],
}


@pytest.mark.parametrize("restore", list(RESTORES))
def test_a_write_into_the_weight_then_an_edit_of_g_and_v_through_data_is_not_silent(
        restore, compare):
    # the write lands over them (which came last is not recorded), as after an in-place edit;
    # it used to land without a word, the edit through .data being invisible to the versions
    if compare != "cpu" and restore == "p.data.mul_":
        pytest.skip("an edit in place through .data is told by the values: a host sync on a GPU")
    torch.manual_seed(0)
    m = wnorm.apply(nn.Sequential(nn.Linear(4, 3)))
    flat = nn.utils.parameters_to_vector(m.parameters()).detach().clone() + 1
    written = torch.linspace(-1, 1, 12).view(3, 4)
    with torch.no_grad():
        m[0].weight.copy_(written)
        RESTORES[restore](m, flat)
    with pytest.warns(UserWarning, match=r"were changed in place \(or through \.data\) since"):
        torch.testing.assert_close(m[0].weight, written, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_write_held_at_a_fork_lands_before_it_not_over_what_a_child_trained():
    # Hogwild: the parent writes an init into a weight of a shared model, forks workers that
    # train it, and reads it after join. Each side used to land the write at its next access:
    # the parent's put the init back over the workers' training
    import multiprocessing as mp

    torch.manual_seed(0)
    m = wnorm.apply(nn.Sequential(nn.Linear(4, 3)))
    m.share_memory()
    written = torch.linspace(-1, 1, 12).view(3, 4)
    with torch.no_grad():
        m[0].weight.copy_(written)  # held, to land at the next access
    child = mp.get_context("fork").Process(target=_train_a_step, args=(m,))
    child.start()
    child.join()
    assert child.exitcode == 0
    layer = m[0]
    trained = (layer.weight_g * layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)).detach()
    assert not torch.allclose(trained, written)  # the child trained the shared g and v
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(layer.weight, trained)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_the_warning_of_a_write_landing_at_a_fork_names_the_users_line():
    import multiprocessing as mp

    m = wnorm.apply(nn.Sequential(nn.Linear(4, 3)))
    with torch.no_grad():
        m[0].weight.zero_()  # held
    m[0].weight_g.data.mul_(2)  # and g changed since: the write lands over it, at the fork
    child = mp.get_context("fork").Process(target=int)
    with pytest.warns(UserWarning, match="lands over their change") as said:
        child.start()
    child.join()
    assert [w.filename for w in said] == [__file__]  # it named multiprocessing/popen_fork.py


def _train_a_step(m: nn.Module) -> None:
    torch.set_num_threads(1)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()


def _arpit(m: nn.Module) -> None:
    wnorm.arpit_init(m)
    assert torch.allclose(m[2].weight_g, torch.full_like(m[2].weight_g, 8 ** 0.5 / 2))


def _project(m: nn.Module) -> None:
    wnorm.project_(m, radius="unit")
    assert torch.allclose(m[2].weight_v.norm(dim=1), torch.ones(4))


def _project_after_step(m: nn.Module) -> None:
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    wnorm.project_after_step(opt, m, radius="unit")
    opt.step()
    assert torch.allclose(m[2].weight_v.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("setter", [_arpit, _project, _project_after_step])
def test_a_write_lands_before_a_function_that_sets_g_and_v_not_over_it(setter, compare):
    # arpit_init's gains and project_'s spheres were undone at the next access by a write
    # still held (an earlier custom init), with a warning that blamed the user for them
    torch.manual_seed(0)
    m = wnorm.apply(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    with torch.no_grad():
        m[2].weight.mul_(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setter(m)
        g, v = m[2].weight_g.detach().clone(), m[2].weight_v.detach().clone()
        m(torch.randn(2, 8))
    assert torch.equal(m[2].weight_g, g) and torch.equal(m[2].weight_v, v)


def test_functional_call_after_a_write_uses_its_tensors_and_the_module_keeps_the_write(compare):
    # the write landed in the caller's g and v, in place: the call computed neither theirs nor
    # the module's, and the module lost its write
    from torch.func import functional_call

    m, x = layer_and_twin()
    nn.init.constant_(m.weight, 0.5)
    g2, v2 = torch.rand(4, 1) + 1, torch.randn(4, 6)
    given = g2.clone(), v2.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = functional_call(m, {"weight_g": g2, "weight_v": v2}, (x,))
    assert torch.equal(g2, given[0]) and torch.equal(v2, given[1])
    want = nn.functional.linear(x, g2 * v2 / v2.norm(dim=1, keepdim=True), m.bias)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(m.weight, torch.full((4, 6), 0.5))


def test_a_write_between_a_forward_and_its_backward_is_refused_as_an_in_place_change(compare):
    # on a GPU (no host sync) the write landed through .data: the first forward's backward ran
    # on the written g and v, its gradient off by up to 7.7, without a word
    m, x = layer_and_twin()
    first = m(x).pow(2).sum()
    with torch.no_grad():
        m.weight[1] = 0.5
    second = m(x).pow(2).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (first + second).backward()


def _removed(lm: nn.Module) -> nn.Module:
    wnorm.remove_weight_norm(lm.emb)
    wnorm.remove_weight_norm(lm.head)
    assert lm.emb.weight is lm.head.weight  # still one Parameter
    return lm


TIE_ACCESSES = {  # PyTorch reaches the embedding, the first holder, before the head
    "double": lambda lm: lm.double(),
    "deepcopy": copy.deepcopy,
    "pickle": lambda lm: __import__("pickle").loads(__import__("pickle").dumps(lm)),
    "emb.state_dict": lambda lm: (lm, lm.emb.state_dict())[0],
    "share_memory": lambda lm: lm.share_memory(),
    "remove_weight_norm": _removed,
}


@pytest.mark.parametrize("access", list(TIE_ACCESSES))
@pytest.mark.parametrize("write", ["nn.init", ".data"])
def test_a_write_through_the_second_holder_of_a_tie_lands_before_the_first_is_reached(
        access, write, compare):
    # the head's write landed only when the head's weight was read: copies and moves of the
    # embedding lost it (or raised, half-moved), and its state dict missed it
    lm = _tied_lm()
    pretrained = torch.randn(10, 6)
    if write == "nn.init":
        with torch.no_grad():
            lm.head.weight.copy_(pretrained)
    else:
        lm.head.weight.data.copy_(pretrained)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = TIE_ACCESSES[access](lm)
    for m in (out.emb, out.head):
        torch.testing.assert_close(m.weight.float(), pretrained, rtol=1e-6, atol=1e-6)


def test_a_load_of_a_tie_stored_once_replaces_a_write_through_the_other_holder(compare):
    # a checkpoint with the embedding's keys only (savers store a tie once), strict=False: the
    # head's write, still held, landed over the checkpoint just loaded
    saved = _tied_lm()
    with torch.no_grad():
        saved.emb.weight.copy_(torch.randn(10, 6))
    sd = {k: v for k, v in saved.state_dict().items() if k.startswith("emb.")}
    lm = _tied_lm()
    lm.head.weight.data.normal_(std=0.02)  # transformers' _init_weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        missing, _ = lm.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["head.weight_g", "head.weight_v"]
    for m in (lm.emb, lm.head):
        torch.testing.assert_close(m.weight, saved.emb.weight)


def test_a_write_inside_a_cached_block_is_said_to_be_gone_at_the_blocks_end():
    # the block's forwards used the write, and it vanished after the block without a word
    m, x = layer_and_twin()
    g, v = m.weight_g.detach().clone(), m.weight_v.detach().clone()
    with pytest.warns(UserWarning, match=r"'weight' was written in place inside a wnorm\.cached"
                      r"\(\) block") as said, torch.no_grad():
        with wnorm.cached():
            nn.init.zeros_(m.weight)
            assert m(x).sub(m.bias).abs().max() == 0
    assert [w.filename for w in said] == [__file__]
    assert torch.equal(m.weight_g, g) and torch.equal(m.weight_v, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), wnorm.cached():  # a read alone: nothing to say
            m(x), m.weight.norm()


@pytest.mark.parametrize("then", ["a forward with grad", "a step, then a forward"])
def test_a_write_inside_a_cached_block_is_said_to_be_gone_when_the_block_computes_it_again(
        then):
    # the block computed the weight again (for a graph, or after a step) and the write was gone
    # with no word: the end-of-block check saw only the weight cached last
    m, x = layer_and_twin()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"'weight' was written in place inside a wnorm\.cached"
                      r"\(\) block") as said:
        with wnorm.cached():
            with torch.no_grad():
                nn.init.zeros_(m.weight)
            if then == "a forward with grad":
                m(x).sum().backward()
            else:
                with torch.no_grad():
                    m(x)
                m(x).sum().backward()  # the written weight has no graph: computed again
                opt.step()
                with torch.no_grad():
                    m(x)
    assert said[0].filename == __file__


def _fullgraph_runs(m: nn.Module, x: torch.Tensor) -> None:
    torch._dynamo.reset()
    torch.compile(m, backend="eager", fullgraph=True)(x)


@pytest.mark.parametrize("land", ["arpit_init", "reset_parameters", "projection step",
                                  "pickled v given to a new layer"])
def test_a_read_landed_by_any_path_leaves_no_graph_break_behind(land):
    # the flag that sends a tie's other holder to land writes under torch.compile stayed on v
    # when a path landed only the layer's own slot: the next compiled forward broke on a tie
    # that did not exist, and fullgraph=True failed
    import io

    torch.manual_seed(0)
    m = wnorm.apply(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    x = torch.randn(3, 8)
    float(m[0].weight.norm())  # logging: the weight is held
    if land == "arpit_init":
        wnorm.arpit_init(m)
    elif land == "reset_parameters":
        m[0].reset_parameters()
    elif land == "projection step":
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        wnorm.project_after_step(opt, m, radius="unit")
        m(x).sum().backward()
        float(m[0].weight.norm())
        opt.step()
    else:
        buf = io.BytesIO()
        torch.save([m[0].weight_g, m[0].weight_v], buf)  # a Parameter carries its __dict__
        buf.seek(0)
        g, v = torch.load(buf)
        m = wnorm.apply(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
        m[0].weight_g, m[0].weight_v = g, v
    _fullgraph_runs(m, x)
