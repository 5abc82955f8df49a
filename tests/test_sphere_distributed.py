"""The hypersphere projection under DDP and FSDP2, on 2 CPU processes over gloo (127.0.0.1 only).

- DDP: parameters are plain tensors, identical on every rank after a step, so each rank projects
  its copy and the ranks stay bitwise identical, equal to one process training on the same global
  batches with the same projection.
- FSDP2 (``fully_shard``, ``Shard(0)``): each rank holds whole rows of every weight whose units lie
  along dim 0, so row norms are local; the gathered parameters equal the one-process run. A weight
  whose units lie along another axis (ConvTranspose, dim 1) is refused with a clear error.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import spawn_ranks

import wnorm
from wnorm.sphere import project_after_step

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
]

WORLD = 2
PER_RANK = 6
STEPS = 4


def model() -> nn.Sequential:
    """A forced layer (own sphere), a plain Linear and a weight-normalized one (radius
    'initial': the plain weight's rows and the v rows held at their starting norms)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    wnorm.forced_weight_norm(net[0])
    wnorm.weight_norm(net[4])  # 3 rows: sharded unevenly (2 + 1) under FSDP2
    return net


def batches() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(WORLD * PER_RANK, 6, generator=gen) for _ in range(STEPS)]
    ys = [torch.randint(0, 3, (WORLD * PER_RANK,), generator=gen) for _ in range(STEPS)]
    return xs, ys


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * PER_RANK:(rank + 1) * PER_RANK]


def _train(net: nn.Module, opt: torch.optim.Optimizer, rank: int) -> None:
    for x, y in zip(*batches()):
        opt.zero_grad()
        nn.functional.cross_entropy(net(shard(x, rank)), shard(y, rank)).backward()
        opt.step()


def _worker(rank: int) -> dict[str, object]:
    result: dict[str, object] = {}
    net = model()
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(ddp.parameters(), lr=0.05)
    result["ddp-names"] = project_after_step(opt, ddp, radius="initial").names
    _train(ddp, opt, rank)
    result["ddp"] = {k: p.detach().clone() for k, p in net.named_parameters()}

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    net = model()
    for i in (0, 2, 4):
        fully_shard(net[i], mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    result["fsdp-names"] = project_after_step(opt, net, radius="initial").names
    _train(net, opt, rank)
    result["fsdp"] = {k: p.detach().full_tensor().clone() for k, p in net.named_parameters()}

    # one output unit on two ranks: rank 1's shard of the head has no row; it raised a reshape
    # error on that rank alone while rank 0 went on to its next collective
    head = nn.Sequential(wnorm.forced_weight_norm(nn.Linear(4, 3)), nn.Tanh(),
                         wnorm.forced_weight_norm(nn.Linear(3, 1)))
    fully_shard(head[0], mesh=mesh)
    fully_shard(head[2], mesh=mesh)
    fully_shard(head, mesh=mesh)
    head_opt = torch.optim.SGD(head.parameters(), lr=0.1)
    project_after_step(head_opt, head)
    head(shard(torch.randn(8, 4, generator=torch.Generator().manual_seed(3)), rank)).sum() \
        .backward()
    head_opt.step()
    result["fsdp-one-unit"] = head[2].weight_v.detach().full_tensor().norm(dim=1)

    # a zero row of v in rank 1's shard only: rank 1 refused alone, and rank 0 waited in its
    # next collective for good
    zero_row = wnorm.weight_norm(nn.Linear(3, 4))
    with torch.no_grad():
        zero_row.weight_v[3].zero_()
    fully_shard(zero_row, mesh=mesh)
    try:
        project_after_step(torch.optim.SGD(zero_row.parameters(), lr=0.1), zero_row,
                           radius="unit")
        result["fsdp-zero-row"] = ""
    except wnorm.WnormError as e:
        result["fsdp-zero-row"] = str(e)

    convt = wnorm.forced_weight_norm(nn.ConvTranspose1d(4, 6, 3))  # units along dim 1
    fully_shard(convt, mesh=mesh)
    try:
        project_after_step(torch.optim.SGD(convt.parameters(), lr=0.1), convt)
        result["fsdp-convT-error"] = ""
    except wnorm.WnormError as e:
        result["fsdp-convT-error"] = str(e)
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("sphere-dist"))


def reference() -> dict[str, torch.Tensor]:
    """One process, the same global batches, the loss averaged over the ranks' shards."""
    net = model()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    project_after_step(opt, net, radius="initial")
    for x, y in zip(*batches()):
        opt.zero_grad()
        loss = sum(nn.functional.cross_entropy(net(shard(x, r)), shard(y, r))
                   for r in range(WORLD)) / WORLD
        loss.backward()
        opt.step()
    return {k: p.detach().clone() for k, p in net.named_parameters()}


def _check_spheres(params: dict[str, torch.Tensor]) -> None:
    start = dict(model().named_parameters())
    torch.testing.assert_close(params["0.weight_v"].norm(dim=1), torch.full((8,), 6 ** 0.5))
    torch.testing.assert_close(params["2.weight"].norm(dim=1), start["2.weight"].norm(dim=1))
    torch.testing.assert_close(params["4.weight_v"].norm(dim=1), start["4.weight_v"].norm(dim=1))
    assert not torch.allclose(params["2.weight"], start["2.weight"])  # it did train


def test_ddp_ranks_stay_identical_on_their_spheres_and_equal_one_process(ranks) -> None:
    names = ["module.0.weight_v", "module.2.weight", "module.4.weight_v"]
    assert ranks[0]["ddp-names"] == names
    a, b = ranks[0]["ddp"], ranks[1]["ddp"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    _check_spheres(a)
    ref = reference()
    for k in ref:
        torch.testing.assert_close(a[k], ref[k], rtol=1e-5, atol=1e-6)


def test_fsdp2_shards_project_locally_and_equal_one_process(ranks) -> None:
    assert ranks[0]["fsdp-names"] == ["0.weight_v", "2.weight", "4.weight_v"]
    got = ranks[0]["fsdp"]
    for k in got:
        assert torch.equal(got[k], ranks[1]["fsdp"][k]), k
    _check_spheres(got)
    ref = reference()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_fsdp2_a_layer_with_fewer_units_than_ranks_is_projected(ranks) -> None:
    for r in ranks:  # its one row on its sphere, sqrt(fan-in), the empty shard left alone
        torch.testing.assert_close(r["fsdp-one-unit"], torch.full((1,), 3 ** 0.5))


def test_fsdp2_a_shard_refused_on_one_rank_is_refused_on_every_rank(ranks) -> None:
    assert "1 of 2 slices have norm 0" in ranks[1]["fsdp-zero-row"]
    assert "every rank refuses" in ranks[1]["fsdp-zero-row"]
    assert "another rank's shard of it was refused" in ranks[0]["fsdp-zero-row"]


def test_fsdp2_shards_that_split_a_slice_are_a_clear_error(ranks) -> None:
    msg = ranks[0]["fsdp-convT-error"]
    assert msg.startswith("weight_v: a DTensor placed (Shard(dim=0),); its slices along dim 1 "
                          "are split across ranks"), msg
    assert "FSDP2's Shard(0)" in msg
