"""Distributed guarantees, on 2 CPU processes over gloo (127.0.0.1 only).

The order: ``wnorm.apply``, ``wnorm.data_init`` (each rank on its own batch), then DDP or FSDP2's
``fully_shard``, then train.

- ``wnorm.data_init`` all-reduces its statistics: every rank gets the same g and b, equal to one
  process initializing on the union of the ranks' batches (also when the model is already
  wrapped by DDP).
- DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) training of a data-initialized wnorm
  model keeps the parameters identical across ranks (bitwise) and equal (float tolerance) to one
  process training on the same global batches.
- After ``fully_shard`` (DTensor parameters), ``wnorm.apply``, ``wnorm.weight_norm`` and
  ``wnorm.data_init`` raise a WnormError that says which order to use.

One spawn serves the whole file (a module fixture): the workers write what they computed to
files and the tests compare it with single-process references computed here.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import wnorm
from conftest import readme_example, spawn_ranks
from nets import mean_only_convnet

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
]

WORLD = 2
PER_RANK = 8  # examples per rank; the global batch is WORLD * PER_RANK
STEPS = 3


def plain_convnet() -> nn.Module:
    """Conv -> mean-only BN -> conv -> pool -> linear, from seed 0."""
    torch.manual_seed(0)
    return mean_only_convnet(6, 4)


def convnet() -> nn.Module:
    """:func:`plain_convnet`, every weight normalized."""
    return wnorm.apply(plain_convnet())


def batches() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The init batch and STEPS training batches (inputs, targets), all global."""
    gen = torch.Generator().manual_seed(123)
    # per-rank batches that differ in distribution, so local statistics differ from global ones
    x0 = torch.randn(WORLD * PER_RANK, 3, 6, 6, generator=gen)
    x0[PER_RANK:] = 2.0 * x0[PER_RANK:] + 1.0
    xs = [torch.randn(WORLD * PER_RANK, 3, 6, 6, generator=gen) for _ in range(STEPS)]
    ys = [torch.randint(0, 4, (WORLD * PER_RANK,), generator=gen) for _ in range(STEPS)]
    return x0, xs[0], xs, ys  # xs[0] doubles as a probe input


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * PER_RANK:(rank + 1) * PER_RANK]


def optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-2)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --------------------------------------------------------------------------- the worker
#: the README's example (``make_model`` returns the plain model, ``local_batch`` is this rank's)
README_EXAMPLE = readme_example("fsdp2")


def _error(fn) -> str:
    """The message of the WnormError ``fn`` raises ("" when it raises none)."""
    try:
        fn()
    except wnorm.WnormError as e:
        return str(e)
    return ""


def _train(model: nn.Module, kind: str, rank: int) -> None:
    _, _, xs, ys = batches()
    opt = optimizer(kind, model.parameters())
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(shard(x, rank)), shard(y, rank))
        loss.backward()
        opt.step()


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded parameters of an FSDP2 model, by their unwrapped names."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.named_parameters()}


class Split(nn.Module):
    """The first ``n`` rows go through ``a`` first, then all rows through ``a`` again."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 4), wnorm.MeanOnlyBatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        first = self.b(self.bn(self.a(x[:n])))
        return torch.cat([first, self.b(self.bn(self.a(x)))])


def _worker(rank: int) -> dict[str, object]:
    from torch.distributed.fsdp import fully_shard

    x0 = batches()[0]
    result: dict[str, object] = {}
    for mode in ("train", "eval"):
        net = convnet().train(mode == "train")
        wnorm.data_init(net, shard(x0, rank))
        result[f"init-{mode}"] = {k: v.clone() for k, v in net.state_dict().items()}
    net = convnet()
    wnorm.data_init(nn.parallel.DistributedDataParallel(net), shard(x0, rank))
    result["init-in-ddp"] = {k: v.clone() for k, v in net.state_dict().items()}
    for kind in ("sgd", "adam"):
        net = convnet()
        _train(nn.parallel.DistributedDataParallel(net), kind, rank)
        result[f"ddp-{kind}"] = params_of(net)
    for kind in ("sgd", "adam"):
        scope = {"make_model": plain_convnet, "local_batch": shard(x0, rank)}
        exec(compile(README_EXAMPLE, "README FSDP2 example", "exec"), scope)
        net = scope["model"]
        _train(net, kind, rank)
        result[f"fsdp-{kind}"] = _full(net)
    # a layer (and a mean-only BN) reached with nothing on rank 1 at its first call, by a
    # data-dependent split: rank 1 raised alone while rank 0 waited in an all-reduce for good
    torch.manual_seed(0)
    split = wnorm.apply(Split())
    report = wnorm.data_init(split, (torch.randn(16, 4, generator=torch.Generator().manual_seed(
        rank)), 0 if rank == 1 else 8))
    result["split"] = ([r.status for r in report],
                       {k: v.clone() for k, v in split.state_dict().items()})
    # a write still pending when fully_shard copies g and v into shards: lost, and said so
    pending = wnorm.apply(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)))
    with torch.no_grad():
        pending[2].weight.mul_(3.0)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        fully_shard(pending)
    result["pending write"] = [str(w.message) for w in said]
    # after sharding: errors that say which order to use
    sharded = convnet()
    fully_shard(sharded)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    fully_shard(plain)
    # a sharded plain checkpoint with a row float32 cannot take the norm of, into a sharded
    # wnorm model: named by wnorm on every rank (it was DTensor's error from nonzero)
    # (row 1 is in rank 0's shard only); a zero row too (it was DTensor's error on rank 0
    # alone, while rank 1 loaded)
    for what, value in (("tiny", 1e-24), ("zero", 0.0), ("nan", float("nan"))):
        torch.manual_seed(0)
        src = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        with torch.no_grad():
            src[0].weight[1] = value
        fully_shard(src)
        dst = wnorm.apply(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)))
        fully_shard(dst)
        try:
            dst.load_state_dict(src.state_dict())
            result[f"sharded {what} row"] = ""
        except RuntimeError as e:
            result[f"sharded {what} row"] = str(e)
    # a full state dict given to sharded wnorm layers (set_model_state_dict): a zero row of v
    # refused on every rank (it loaded NaN weights), a dead unit (g = 0) loaded
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    for what in ("zero v row", "dead unit"):
        torch.manual_seed(0)
        full = {k: t.detach().clone() for k, t in wnorm.apply(
            nn.Sequential(nn.Linear(16, 7), nn.ReLU(), nn.Linear(7, 3))).state_dict().items()}
        full["0.weight_v" if what == "zero v row" else "0.weight_g"][2] = 0.0
        into = wnorm.apply(nn.Sequential(nn.Linear(16, 7), nn.ReLU(), nn.Linear(7, 3)))
        fully_shard(into)
        try:
            set_model_state_dict(into, full, options=StateDictOptions(full_state_dict=True))
            result[f"full sd, {what}"] = ""
        except RuntimeError as e:
            result[f"full sd, {what}"] = str(e)
    only_rank_1 = dist.new_group([1])  # every rank takes part in creating it
    result["errors"] = {
        "data_init": _error(lambda: wnorm.data_init(sharded, shard(x0, rank))),
        # rank 1's batch is empty: both ranks raise (rank 0 waited in an all-reduce for good)
        "empty on rank 1": _error(lambda: wnorm.data_init(
            convnet(), x0[:0] if rank == 1 else shard(x0, rank))),
        # a group without this rank: named, not a RuntimeError from a world size of -1
        "not in the group": _error(lambda: wnorm.data_init(
            convnet(), shard(x0, rank), process_group=only_rank_1)) if rank == 0 else "",
        "apply": _error(lambda: wnorm.apply(plain)),
        "weight_norm": _error(lambda: wnorm.weight_norm(plain[0])),
        "load_state_dict": _error(lambda: wnorm.load_state_dict(sharded,
                                                                convnet().state_dict())),
    }
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("dist"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert list(a) == list(b)
    for k in a:
        if tol:
            torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- data init
INIT_KEYS = ("0.weight_g", "3.weight_g", "3.bias", "7.weight_g", "7.bias",
             "1.running_mean")


def _check_init(ranks: list[dict], mode: str) -> None:
    x0 = batches()[0]
    ref = convnet().train(mode == "train")
    wnorm.data_init(ref, x0)  # one process, the union of the ranks' batches
    got = [r[f"init-{mode}"] for r in ranks]
    assert_same(got[0], got[1])  # every rank the same, bitwise
    expected = ref.state_dict()
    for k in INIT_KEYS:
        torch.testing.assert_close(got[0][k], expected[k], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=k: f"{k}: {m}")
    for k in expected:  # v is untouched by the init
        if k.endswith("weight_v"):
            assert torch.equal(got[0][k], expected[k])


def test_data_init_eval_mode_same_on_every_rank_and_equals_union(ranks) -> None:
    _check_init(ranks, "eval")


def test_data_init_train_mode_same_on_every_rank_and_equals_union(ranks) -> None:
    _check_init(ranks, "train")


def test_data_init_of_a_ddp_wrapped_model_equals_before_wrapping(ranks) -> None:
    for r in ranks:
        assert_same(r["init-in-ddp"], r["init-train"], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- DDP training
def reference_training(kind: str, init: bool = False) -> dict[str, torch.Tensor]:
    """One process, the same global batches: the loss is the mean of the ranks' losses (each
    rank's mean-only BN uses its own batch mean, as it does under DDP; FSDP2 averages gradients
    the same way). ``init``: data_init on the union of the ranks' init batches first."""
    x0, _, xs, ys = batches()
    net = convnet()
    if init:
        wnorm.data_init(net, x0)
    opt = optimizer(kind, net.parameters())
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = sum(nn.functional.cross_entropy(net(shard(x, r)), shard(y, r))
                   for r in range(WORLD)) / WORLD
        loss.backward()
        opt.step()
    return params_of(net)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_ddp_training_identical_across_ranks_and_equals_one_process(ranks, kind: str) -> None:
    got = [r[f"ddp-{kind}"] for r in ranks]
    assert_same(got[0], got[1])  # bitwise across ranks
    start = params_of(convnet())
    assert any(not torch.equal(got[0][k], start[k]) for k in start)  # it did train
    assert_same(got[0], reference_training(kind), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- FSDP2
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_fsdp2_training_identical_across_ranks_and_equals_one_process(ranks, kind: str) -> None:
    got = [r[f"fsdp-{kind}"] for r in ranks]
    assert_same(got[0], got[1])
    assert any(k.endswith("weight_g") for k in got[0]) and any(k.endswith("weight_v")
                                                               for k in got[0])
    start = params_of(convnet())
    assert any(not torch.equal(got[0][k], start[k]) for k in start)
    assert_same(got[0], reference_training(kind, init=True), rtol=1e-5, atol=1e-6)


def test_a_write_pending_when_fully_shard_copies_g_and_v_is_said_to_be_lost(ranks) -> None:
    # FSDP2 copies g and v into shards before assigning them: the write landed in the tensors
    # it replaced, with no word
    for r in ranks:
        assert any("was sharded (FSDP2's fully_shard)" in m and "is lost" in m
                   for m in r["pending write"]), r["pending write"]


@pytest.mark.parametrize("call", ["data_init", "apply", "weight_norm"])
def test_wnorm_after_fully_shard_is_an_error_that_gives_the_order(ranks, call: str) -> None:
    for r in ranks:
        msg = r["errors"][call]
        assert "sharded (a DTensor" in msg, msg
        assert re.search(r"wnorm\.apply .*wnorm\.data_init.* then fully_shard", msg), msg


def test_loading_into_a_sharded_model_is_an_error_that_gives_the_order(ranks) -> None:
    # was PyTorch's "aten.copy_.default got mixed torch.Tensor and DTensor"
    for r in ranks:
        msg = r["errors"]["load_state_dict"]
        assert "sharded (a DTensor" in msg, msg
        assert "wnorm.apply, wnorm.load_state_dict, then fully_shard" in msg, msg
        assert "set_model_state_dict" in msg, msg


def test_a_sharded_row_whose_norm_cannot_be_computed_is_named_on_every_rank(ranks) -> None:
    for r in ranks:
        msg = r["sharded tiny row"]
        assert "'0.weight': 1 slices along dim 0 (indices [1]) have norms that torch.float32 " \
               "cannot compute" in msg, msg
        msg = r["sharded zero row"]
        assert "'0.weight': expected a nonzero norm in every slice along dim 0 to normalize it " \
               "there; got 1 zero slices (indices [1])" in msg, msg
        assert "'0.weight_v' has 1 slices along dim 0 (indices [2]) whose norms torch." \
               "float32 computes as 0, inf or NaN" in r["full sd, zero v row"]
        assert r["full sd, dead unit"] == ""
        msg = r["sharded nan row"]  # a gloo abort: one rank's check ran a collective alone
        assert "'0.weight': expected finite values; got 16 NaN/inf of 128" in msg, msg


def test_an_empty_batch_on_one_rank_is_an_error_on_every_rank(ranks) -> None:
    for r in ranks:
        msg = r["errors"]["empty on rank 1"]
        assert "the batch is empty on rank 1 of the process group (ranks within it)" in msg, msg
    assert "(here input 0 has shape (0, 3, 6, 6))" in ranks[1]["errors"]["empty on rank 1"]
    assert "(here" not in ranks[0]["errors"]["empty on rank 1"]


def test_a_layer_reached_with_nothing_on_one_rank_is_initialized_on_the_others_batch(
        ranks) -> None:
    (status0, sd0), (status1, sd1) = (r["split"] for r in ranks)
    assert status0 == status1 == ["initialized", "initialized"]
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)  # one model, as on the union


def test_a_rank_outside_the_process_group_is_told_so(ranks) -> None:
    msg = ranks[0]["errors"]["not in the group"]
    assert "this process (global rank 0) is not in the process_group given" in msg, msg
