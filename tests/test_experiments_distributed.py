"""experiments.nets under torch.distributed (2 CPU processes, gloo): the data init on each rank's share
of the init batch gives every rank the model that one process gets on the whole batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from experiments.nets import build, initialize

pytestmark = pytest.mark.slow


def _worker(rank: int, world: int, init_file: str, batch: torch.Tensor, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        net = build("wn+meanonly", 1, 0.05, noise=0.0, dropout=0.0)
        initialize(net, batch[rank::world])
        torch.save(net.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_sharded_data_init_matches_one_process(tmp_path: Path) -> None:
    batch = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    mp.spawn(_worker, args=(2, str(tmp_path / "rdv"), batch, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    ref = build("wn+meanonly", 1, 0.05, noise=0.0, dropout=0.0)
    initialize(ref, batch)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in ref.state_dict().items():
        for state in states:
            torch.testing.assert_close(state[key], value, atol=1e-5, rtol=1e-5, msg=key)
