"""experiments.graph: the kNN graph is the brute-force one, the model computes the same function
from the sparse adjacency it trains on and from the edge_index the data init reads, the
variants of a seed start where they should (same function, standardized outputs after the
init, plain weights for normal-init, the same dropout draws), the split is a split, the report
calls a difference noise unless the seeds say otherwise, and the command runs end to end."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import wnorm
from experiments import graph as G
from experiments import report_graph as R

from fakes import write_fashion

warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch_geometric's jit use


def _graph(n: int = 120, f: int = 12, k: int = 4, seed: int = 0) -> G.Graph:
    """A :class:`Graph` built the way :func:`build_graph` builds one, from random features with
    class-dependent means (so that the labels and the graph agree somewhat)."""
    from torch_geometric.nn.conv.gcn_conv import gcn_norm
    from torch_geometric.utils import to_torch_csr_tensor

    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % G.CLASSES
    x = torch.randn(n, f, generator=gen) + 3 * torch.randn(G.CLASSES, f, generator=gen)[y]
    ei = G.knn_graph(x, k)
    gcn_ei, gcn_w = gcn_norm(ei, None, n, add_self_loops=True)
    return G.Graph(x, y, ei, to_torch_csr_tensor(ei, size=(n, n)), gcn_ei, gcn_w,
                   to_torch_csr_tensor(gcn_ei, gcn_w, size=(n, n)), {})


def _cfg(**kw) -> G.GraphConfig:
    return G.GraphConfig(**({"hidden": 8, "heads": 2, "nodes": 120, "labels_per_class": 2,
                             "val_nodes": 20} | kw))


def test_knn_graph_is_the_symmetrized_brute_force_graph() -> None:
    x = torch.randn(300, 5)
    k = 6
    ei = G.knn_graph(x, k, block=64)  # several blocks, one of them partial
    d = torch.cdist(x, x).fill_diagonal_(float("inf"))
    knn = d.topk(k, largest=False).indices
    want = {(int(j), i) for i in range(300) for j in knn[i]}
    want |= {(b, a) for a, b in want}
    got = {(int(s), int(t)) for s, t in ei.T}
    assert got == want and len(got) == ei.shape[1]  # no edge listed twice
    assert not any(s == t for s, t in got)
    # sorted by target, then source: what a CSR adjacency of target rows expects
    keys = (ei[1] * 300 + ei[0]).tolist()
    assert keys == sorted(keys)
    with pytest.raises(wnorm.WnormError, match="k must be in"):
        G.knn_graph(x, 300)


@pytest.mark.parametrize("model", G.MODELS)
def test_sparse_and_edge_index_inputs_compute_the_same_function(model: str) -> None:
    g = _graph()
    torch.manual_seed(0)
    net = G.GraphNet(model, g.x.shape[1], 8, G.CLASSES, heads=2).eval()
    with torch.no_grad():
        a = net(*g.inputs(model, sparse=True))
        b = net(*g.inputs(model, sparse=False))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", G.MODELS)
def test_variants_start_where_they_should(model: str) -> None:
    g = _graph()
    out, rng, nets = {}, {}, {}
    for variant in G.VARIANTS:
        nets[variant], _ = G.build_model(_cfg(model=model, variant=variant), g)
        rng[variant] = torch.get_rng_state()  # what the dropout draws will come from
        with torch.no_grad():
            out[variant] = nets[variant].eval()(*g.inputs(model, sparse=True))
    for variant in G.VARIANTS[1:]:
        assert torch.equal(rng[variant], rng["normal"])
    # weight norm starts as the same function; so do the two data-initialized variants
    torch.testing.assert_close(out["weightnorm"], out["normal"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["normal-init"], out["weightnorm-init"], rtol=1e-4,
                               atol=1e-4)
    assert not torch.allclose(out["normal-init"], out["normal"], atol=1e-3)
    assert not any(wnorm.is_weight_normalized(m) for m in nets["normal-init"].modules())
    assert any(wnorm.is_weight_normalized(m) for m in nets["weightnorm-init"].modules())
    if model != "gat":  # GCN and SAGE: the convolution's output is standardized as a whole
        with torch.no_grad():
            logits = out["weightnorm-init"]
        torch.testing.assert_close(logits.mean(0), torch.zeros(G.CLASSES), atol=1e-4, rtol=0)
        torch.testing.assert_close(logits.std(0, unbiased=False), torch.ones(G.CLASSES),
                                   atol=1e-3, rtol=0)


def test_split_is_disjoint_complete_balanced_and_seeded() -> None:
    y = torch.arange(400) % G.CLASSES
    train, val, test = G.split_nodes(y, 3, 50, seed=1)
    every = torch.cat([train, val, test])
    assert sorted(every.tolist()) == list(range(400))
    assert torch.bincount(y[train], minlength=G.CLASSES).tolist() == [3] * G.CLASSES
    assert len(val) == 50
    again = G.split_nodes(y, 3, 50, seed=1)
    other = G.split_nodes(y, 3, 50, seed=2)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again))
    assert not torch.equal(train, other[0])
    with pytest.raises(wnorm.WnormError, match="class 0 has 40 nodes, fewer than"):
        G.split_nodes(y, 41, 10, seed=0)


@pytest.mark.parametrize("base, other, verdict", [
    ({0: 70.0, 1: 71.0, 2: 72.0}, {0: 75.0, 1: 76.0, 2: 77.0}, "better on every seed, the seed "
                                                                "ranges apart"),
    ({0: 70.0, 1: 71.0, 2: 75.0}, {0: 71.0, 1: 72.0, 2: 76.0}, "better on every seed, but the "
                                                                "seed ranges overlap"),
    ({0: 70.0, 1: 71.0, 2: 72.0}, {0: 71.0, 1: 70.0, 2: 72.5}, "mixed across seeds: within "
                                                                "noise"),
    ({0: 70.0, 1: 71.0, 2: 72.0}, {0: 60.0, 1: 61.0, 2: 62.0}, "worse on every seed, the seed "
                                                                "ranges apart"),
    ({0: 7.0, 1: 8.0, 2: 9.0}, {0: 8.0, 1: 8.0, 2: 9.0}, "better on 1 seed, tied on 2: within "
                                                          "noise"),
    ({0: 7.0, 1: 8.0}, {0: 7.0, 1: 8.0}, "tied on every seed: no difference measured"),
])
def test_paired_verdicts(base, other, verdict) -> None:
    text, said = R._paired(base, other, higher_better=True, digits=2)
    assert said == verdict
    diffs = [other[s] - base[s] for s in base]
    assert text.startswith(f"{sum(diffs) / len(diffs):+.2f}")
    # lower-is-better measures flip better and worse
    flipped = R._paired(base, other, higher_better=False, digits=2)[1]
    assert flipped == verdict.replace("better", "WORSE").replace("worse", "better").replace(
        "WORSE", "worse")


def test_quick_run_writes_run_folders_report_and_plot(tmp_path: Path) -> None:
    data_dir, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data_dir, n_train=200, n_test=5)
    args = ["--quick", "--models", "gcn,sage,gat", "--seeds", "0,1", "--data-dir",
            str(data_dir), "--out", str(out), "--device", "cpu"]
    assert G.main(args) == 0
    names = sorted(f.name for f in out.iterdir() if f.is_dir())
    assert names == sorted(f"graph-{m}-{v}-s{s}" for m in G.MODELS for v in G.VARIANTS
                           for s in (0, 1))
    for name in names:
        f = out / name
        config = json.loads((f / "config.json").read_text())
        assert config["experiment"] == "graph" and config["epochs"] == G.QUICK["epochs"]
        assert config["graph"]["nodes"] == 200 and config["split"] == {"train": 20, "val": 40,
                                                                        "test": 140}
        assert {"git_commit", "torch", "wnorm", "argv"} <= set(json.loads(
            (f / "version.json").read_text()))
        rows = [json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == list(range(1, G.QUICK["epochs"] + 1))
        assert ["seconds" in r for r in rows] == [False, False, False, True, False, True]
        for r in rows:
            assert 0 <= r["val_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and r["train_loss"] > 0
        log = (f / "log.txt").read_text()
        assert f"epoch {G.QUICK['epochs']}/{G.QUICK['epochs']}" in log
        assert ("data init on all 200 nodes" in log) == name.rsplit("-s", 1)[0].endswith("-init")
    md = (out / "report.md").read_text()
    assert (out / "graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| model (seeds) | normal | normal-init | weightnorm | weightnorm-init |" in md
    for model in ("GCN", "SAGE", "GAT"):
        assert f"| {model} (2) | " in md
        assert f"## {model}" in md and f"**{model}, test accuracy at the best validation" in md
        for v in G.VARIANTS:
            assert f"| {v} | 2 |" in md
    assert "200 Fashion-MNIST training images as nodes" in md and "Ran `python -m " in md
    assert "Hardware and code (GCN, SAGE, GAT): " in md
    assert "(either side) with 2 seeds (GCN, SAGE, GAT), 50% of the time" in md
    session = json.loads((out / "sessions.jsonl").read_text())
    assert session["runs"] == 24 and session["wall_s"] > 0

    # the report is regenerated from the folders alone; a second run is refused untouched
    (out / "report.md").unlink()
    assert G.main(["--report-only", "--out", str(out)]) == 0
    assert (out / "report.md").read_text() == md
    before = (out / names[0] / "metrics.jsonl").read_bytes()
    assert G.main(args) == 2
    assert (out / names[0] / "metrics.jsonl").read_bytes() == before
    # new seeds with another setting would be averaged with these: refused before training
    assert G.main(args[:4] + ["2", *args[5:], "--epochs", "5"]) == 2
    assert not (out / "graph-gcn-normal-s2").exists()


@pytest.mark.parametrize("bad, says", [
    (["--models", "gcn,gin"], "--models: unknown ['gin']"),
    (["--variants", "normal,batchnorm"], "--variants: unknown ['batchnorm']"),
    (["--seeds", "0,0"], "--seeds: 0 is given twice"),
    (["--k", "0"], "--k must be an integer >= 1; got 0"),
    (["--pca", "1000"], "--pca must be an integer in [0, 784]; got 1000"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0; got -1.0"),
    (["--dropout", "1"], "--dropout must be in [0, 1); got 1.0"),
    (["--nodes", "300", "--val-nodes", "200", "--labels-per-class", "10"],
     "leave no test node of --nodes 300"),
    (["--models", "gat", "--hidden", "10", "--heads", "4"],
     "--hidden 10 must be a multiple of --heads 4"),
])
def test_bad_options_are_argparse_errors(bad, says, capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        G.main(bad + ["--out", str(tmp_path / "never")])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_report_leaves_out_diverged_and_unfinished_runs_and_says_so(tmp_path: Path) -> None:
    data_dir, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data_dir, n_train=200, n_test=5)
    assert G.main(["--quick", "--models", "sage", "--seeds", "0,1", "--data-dir",
                   str(data_dir), "--out", str(out), "--device", "cpu"]) == 0
    metrics = out / "graph-sage-weightnorm-s1" / "metrics.jsonl"
    first = metrics.read_text().splitlines()[0]
    metrics.write_text(first + "\n" + json.dumps({"epoch": 2, "diverged": True}) + "\n")
    (out / "graph-sage-normal-init-s0" / "metrics.jsonl").write_text(first + "\n")
    for name in ("graph-sage-normal-init-s1", "graph-sage-weightnorm-init-s0",
                 "graph-sage-weightnorm-init-s1"):
        path = out / name / "metrics.jsonl"
        path.write_text(first + "\n" + json.dumps({"epoch": 2, "diverged": True}) + "\n")
    md = R.report([out], out)
    assert "| weightnorm (left out: seed 1 diverged) | 1 |" in md
    assert "| normal-init (left out: seed 0 unfinished, seed 1 diverged) | 0 |" in md
    assert "| weightnorm-init (left out: seed 0 diverged, seed 1 diverged) | 0 |" in md
    assert "| normal | 2 |" in md
