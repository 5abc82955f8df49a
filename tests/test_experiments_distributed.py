"""experiments.nets under torch.distributed (2 CPU processes, gloo): the data init on each rank's share
of the init batch gives every rank the model that one process gets on the whole batch."""

from __future__ import annotations

import json
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


def _classify_rank(rank: int, world: int, port: int, argv: list[str]) -> None:
    # what torchrun sets; experiments.classify joins the group itself
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    from experiments.classify import main

    if main(argv) != 0:
        raise SystemExit(1)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_classify_on_two_ranks_equals_one_process_on_the_whole_batches(tmp_path: Path) -> None:
    # the mean-only batch norms take the mean of the whole batch, not of each rank's share:
    # without noise and dropout, two ranks train the model one process trains
    import socket

    from fakes import write_fashion

    write_fashion(tmp_path / "data", n_train=40, n_test=20)
    argv = ["--data-dir", str(tmp_path / "data"), "--variants", "wn+meanonly", "--seeds", "0",
            "--epochs", "2", "--width", "0.04", "--batch-size", "20", "--init-examples", "20",
            "--noise", "0", "--dropout", "0", "--threads", "1", "--no-progress",
            "--device", "cpu"]
    from experiments.classify import main

    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_classify_rank, args=(2, port, argv + ["--out", str(tmp_path / "two")]), nprocs=2)
    name = "fashion-mnist-wn+meanonly-s0"
    one, two = ([json.loads(line) for line in (tmp_path / d / name / "metrics.jsonl")
                 .read_text().splitlines()] for d in ("one", "two"))
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for k in ("train_loss", "test_loss", "test_error"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a, b)


def _classify_rank_own_out(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    _classify_rank(rank, world, port, argv + ["--out", f"{out}{rank}"])  # no shared folders


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_resume_on_ranks_that_share_no_file_system_trains_what_rank_0_left(
        tmp_path: Path) -> None:
    # rank 0 holds seed 0 finished; rank 1 sees no run folders (another node's disk): it trained
    # seed 0 while rank 0 trained seed 1, their gradients averaged in the same collectives
    import socket

    from fakes import write_fashion

    write_fashion(tmp_path / "data", n_train=40, n_test=20)
    argv = ["--data-dir", str(tmp_path / "data"), "--variants", "wn+meanonly", "--epochs", "2",
            "--width", "0.04", "--batch-size", "20", "--init-examples", "20", "--noise", "0",
            "--dropout", "0", "--threads", "1", "--no-progress", "--device", "cpu"]
    from experiments.classify import main

    assert main(argv + ["--seeds", "0", "--out", str(tmp_path / "node0")]) == 0
    assert main(argv + ["--seeds", "1", "--out", str(tmp_path / "one")]) == 0
    kept = (tmp_path / "node0" / "fashion-mnist-wn+meanonly-s0" / "metrics.jsonl").read_text()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = mp.start_processes(
        _classify_rank_own_out, nprocs=2, join=False, start_method="spawn",
        args=(2, port, argv + ["--seeds", "0,1", "--resume"], str(tmp_path / "node")))
    try:
        for _ in range(120):  # ranks that disagree may hang in a collective: fail, not hang
            if ranks.join(timeout=1):
                break
        else:
            pytest.fail("the ranks did not finish in 120 s")
    finally:
        for p in ranks.processes:
            p.kill()
    assert not (tmp_path / "node1").exists()  # rank 1 wrote nothing, trained nothing alone
    name = "fashion-mnist-wn+meanonly-s1"
    one, two = ([json.loads(line) for line in (tmp_path / d / name / "metrics.jsonl")
                 .read_text().splitlines()] for d in ("one", "node0"))
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):  # both ranks trained seed 1: one process's run
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4, abs=1e-6)
    assert (tmp_path / "node0" / "fashion-mnist-wn+meanonly-s0" / "metrics.jsonl"
            ).read_text() == kept
