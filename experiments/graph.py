r"""Graph networks on a k-nearest-neighbour graph of Fashion-MNIST: normal vs weight norm.

Semi-supervised node classification. The nodes are ``nodes`` Fashion-MNIST training images (a
fixed random draw); each node's features are its pixels' first ``pca`` principal components
(centered, not whitened); each node is joined to its ``k`` nearest neighbours in that feature
space (Euclidean), made undirected (an edge if either end is among the other's ``k``). Per
seed, ``labels_per_class`` labelled nodes per class train the network, ``val_nodes`` others
validate, every other node is test. A two-layer network, full batch,

.. math::
    \text{logits} = \mathrm{conv}_2\big(\mathrm{drop}(\phi(\mathrm{conv}_1(\mathrm{drop}(X),
    A))), A\big),

with GCNConv (:math:`\hat A = D^{-1/2}(A+I)D^{-1/2}`, ReLU), SAGEConv (mean of the neighbours
plus a root weight, ReLU) or GATConv (``heads`` attention heads, ELU) from torch_geometric,
Adam, cross-entropy on the labelled nodes. Variants (same seed: same split, same starting
weights, same dropout draws):

- ``normal``: the convolutions as torch_geometric initializes them;
- ``normal-init``: the paper's normal-parameterization baseline, the same weights rescaled by
  the data-dependent init, :math:`w = s\,w_0/\sigma[w_0\cdot x]`, bias :math:`-\mu s/\sigma`,
  then trained as plain weights. Made by ``wnorm.apply``, ``wnorm.data_init`` and
  ``wnorm.fold`` (v starts as :math:`w_0`, so :math:`g\,v/\lVert v\rVert` after the init is
  that w): ``data_init(include_plain=True)`` leaves torch_geometric's plain Linears alone;
- ``weightnorm``: ``wnorm.apply(model)``, :math:`w = g\,v/\lVert v\rVert` on every Linear inside
  the convolutions, starting as the same function as ``normal``, no data init;
- ``weightnorm-init``: the same, then ``wnorm.data_init(model, (x, edge_index))`` on the whole
  graph: GCN's and SAGE's outputs are standardized as a whole, GAT's per Linear.

The init pass runs in eval mode (no dropout) on every node's features (the graph is
transductive: every node is seen, only the training labels are used). Training passes the
adjacency as a sparse CSR matrix (several times faster on a CPU than ``edge_index`` without
torch-scatter); the init pass passes ``edge_index`` (``data_init`` checks its inputs for NaN,
which a sparse tensor does not support); both compute the same function (tested).

Run (from the repository root; the committed results, whose ``sessions.jsonl`` says how long
they took)::

    python -m experiments.graph --out results/graph
    python -m experiments.graph --models gat --seeds 0,1,2 --out results/graph  # GAT: ~6x slower
    python -m experiments.graph --report-only --out results/graph   # redraw the report

Each (model, variant, seed) writes ``<out>/graph-<model>-<variant>-s<seed>/`` (``config.json``
with the graph's statistics, ``version.json``, ``log.txt``, ``metrics.jsonl``: one line per
epoch with ``train_loss`` (the step's loss, dropout on), ``val_loss``, ``train_acc``,
``val_acc``, ``test_acc`` (eval mode, after the step); the last line of each ``--log-every``
chunk also has ``seconds``, the training time so far; a run whose loss stops being finite
ends with ``{"epoch": e, "diverged": true}``). Then ``<out>/report.md`` and ``<out>/graph.png``
are generated from every graph run folder under ``<out>``, and ``<out>/sessions.jsonl`` gets
the invocation's command, wall time, CPU time and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import wnorm
from wnorm import WnormError

from .common import (RunFolder, add_options, add_run_flags, check_config, config_from_args,
                     pending, precision_info, progress, resolve_device, split_list)
from .data import load_fashion_mnist

__all__ = ["GraphConfig", "Graph", "GraphNet", "MODELS", "VARIANTS", "QUICK", "knn_graph",
           "build_graph", "build_model", "split_nodes", "train_one", "main"]


# --------------------------------------------------------------------------- defaults
@dataclass
class GraphConfig:
    """One run; the defaults are the committed run (sessions.jsonl says how long it took)."""

    experiment: str = "graph"
    model: str = "gcn"  # gcn | sage | gat
    variant: str = "weightnorm"  # normal | normal-init | weightnorm | weightnorm-init
    seed: int = 0  # the split (which nodes are labelled), the weights, the dropout draws
    data_dir: str | None = None  # default: /usr/share/datasets/fashion-mnist, then the cache
    nodes: int = 10000  # Fashion-MNIST training images, one fixed draw for every seed
    pca: int = 64  # features: the first principal components of the pixels (0: raw pixels)
    k: int = 10  # neighbours per node before the graph is made undirected
    labels_per_class: int = 20  # labelled training nodes per class (Planetoid's count)
    val_nodes: int = 1000
    hidden: int = 64  # GAT: heads x hidden/heads
    heads: int = 4  # GAT only
    dropout: float = 0.5  # on the input features and the hidden layer (Kipf & Welling)
    lr: float = 0.01
    weight_decay: float = 0.0  # off: it acts differently on w and on (g, v) (on v it only
    #                             changes the effective step size), a comparison of its own
    epochs: int = 60  # validation accuracy was flat after epoch ~30 in trial runs of 100-200
    init_scale: float = 1.0
    log_every: int = 10  # epochs between host syncs, log lines and metrics writes
    out: str = "runs/graph"
    threads: int | None = 1  # on 2 shared cores, 2 threads ran several times slower
    device: str = "auto"


MODELS = ("gcn", "sage", "gat")
VARIANTS = ("normal", "normal-init", "weightnorm", "weightnorm-init")
DEFAULT_MODELS = "gcn,sage"  # GAT's attention softmax is several times slower on a CPU
DEFAULT_SEEDS = "0,1,2,3,4"  # with 3, no effect at all looks "consistent" one time in four
#: --quick: tiny sizes that run in seconds (for tests)
QUICK = {"nodes": 200, "pca": 16, "k": 5, "labels_per_class": 2, "val_nodes": 40, "hidden": 8,
         "heads": 2, "epochs": 6, "log_every": 4}
CLASSES = 10
# ---------------------------------------------------------------------------------------------

# the fields common.RULES does not know: (test, what it must be)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "nodes": (lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
    "pca": (lambda v: isinstance(v, int) and 0 <= v <= 784, "an integer in [0, 784]"),
    "k": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "labels_per_class": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "val_nodes": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "heads": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "weight_decay": (lambda v: isinstance(v, float) and math.isfinite(v) and v >= 0,
                     "a finite number >= 0"),
}


def check_graph_config(cfg: GraphConfig) -> None:
    """:func:`experiments.common.check_config` plus this experiment's fields and their sizes.

    Raises:
        WnormError: ``--option must be ...; got value`` (or which two options disagree).
    """
    check_config(cfg)
    for name, (ok, what) in _RULES.items():
        value = getattr(cfg, name)
        if not ok(value):
            raise WnormError(f"--{name.replace('_', '-')} must be {what}; got {value!r}")
    if cfg.model not in MODELS:
        raise WnormError(f"--models: unknown {cfg.model!r}; expected some of {list(MODELS)}")
    if cfg.variant not in VARIANTS:
        raise WnormError(f"--variants: unknown {cfg.variant!r}; expected some of "
                         f"{list(VARIANTS)}")
    labelled = cfg.labels_per_class * CLASSES
    if labelled + cfg.val_nodes >= cfg.nodes:
        raise WnormError(f"--labels-per-class {cfg.labels_per_class} x {CLASSES} classes + "
                         f"--val-nodes {cfg.val_nodes} leave no test node of --nodes "
                         f"{cfg.nodes}")
    if cfg.k >= cfg.nodes:
        raise WnormError(f"--k {cfg.k} must be smaller than --nodes {cfg.nodes}")
    if cfg.pca > cfg.nodes:
        raise WnormError(f"--pca {cfg.pca} components need at least as many --nodes; got "
                         f"{cfg.nodes}")
    if cfg.model == "gat" and cfg.hidden % cfg.heads:
        raise WnormError(f"--hidden {cfg.hidden} must be a multiple of --heads {cfg.heads} "
                         "(GAT's hidden layer is heads x hidden/heads)")


# --------------------------------------------------------------------------- the graph
def knn_graph(x: Tensor, k: int, block: int = 1024) -> Tensor:
    r"""The undirected k-nearest-neighbour graph of the rows of ``x`` (Euclidean), as an
    ``edge_index`` ``(2, E)``: :math:`\{i, j\}` is an edge when j is among i's k nearest rows
    or i among j's; no self-loops; both directions listed, sorted by target then source.

    Distances are computed ``block`` rows at a time (memory ``block x N``), so a 10k-node graph
    needs no pyg-lib or torch-cluster (which ``torch_geometric.nn.knn_graph`` requires). Among
    equal distances, ``torch.topk`` chooses.

    Raises:
        WnormError: ``k`` is not in [1, N).

    Example:
        >>> knn_graph(torch.tensor([[0.0], [1.0], [3.0], [7.0]]), k=1).tolist()
        [[1, 0, 2, 1, 3, 2], [0, 1, 1, 2, 2, 3]]
    """
    n = x.shape[0]
    if not 1 <= k < n:
        raise WnormError(f"knn_graph: k must be in [1, {n}) for {n} nodes; got {k}")
    nbrs = []
    for start in range(0, n, block):
        d = torch.cdist(x[start:start + block], x)
        rows = torch.arange(d.shape[0], device=x.device)
        d[rows, rows + start] = math.inf  # not one's own neighbour
        nbrs.append(d.topk(k, dim=1, largest=False).indices)
    src = torch.cat(nbrs).reshape(-1)
    dst = torch.arange(n, device=x.device).repeat_interleave(k)
    both = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], dim=1)
    key = torch.unique(both[1] * n + both[0])  # dedupe and sort by (target, source)
    return torch.stack([key % n, key // n])


@dataclass
class Graph:
    """The node features ``x`` (N, F), labels ``y`` (N,), the ``edge_index`` of
    :func:`knn_graph`, its adjacency ``adj`` (sparse CSR, ones) and the GCN-normalized
    :math:`\\hat A` both as ``gcn_adj`` (sparse CSR) and as ``gcn_edge_index`` +
    ``gcn_edge_weight`` (with the self-loops); ``info`` describes them for config.json."""

    x: Tensor
    y: Tensor
    edge_index: Tensor
    adj: Tensor
    gcn_edge_index: Tensor
    gcn_edge_weight: Tensor
    gcn_adj: Tensor
    info: dict[str, Any]

    def to(self, device: torch.device) -> Graph:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return Graph(**moved, info=self.info)

    def inputs(self, model: str, sparse: bool) -> tuple[Tensor, ...]:
        """The model's positional inputs: sparse adjacency (the fast path for training) or
        edge_index (what ``wnorm.data_init`` takes: it checks its inputs for NaN, which a
        sparse tensor does not support)."""
        if model == "gcn":
            return ((self.x, self.gcn_adj) if sparse
                    else (self.x, self.gcn_edge_index, self.gcn_edge_weight))
        return (self.x, self.adj) if sparse else (self.x, self.edge_index)


def build_graph(cfg: GraphConfig, *, echo: Callable[[str], None] = print) -> Graph:
    """Load ``cfg.nodes`` Fashion-MNIST training images and build :class:`Graph` from them.

    Raises:
        WnormError: the data is missing or malformed (the message says how to get it).
    """
    from torch_geometric.nn.conv.gcn_conv import gcn_norm
    from torch_geometric.utils import to_torch_csr_tensor

    t0 = time.perf_counter()
    data = load_fashion_mnist(cfg.data_dir, train_subset=cfg.nodes, test_subset=1)
    if data.x_train.shape[0] != cfg.nodes:
        raise WnormError(f"graph: --nodes {cfg.nodes} but the training set has "
                         f"{data.x_train.shape[0]} images")
    pixels = data.x_train.flatten(1).double()  # float64: the covariance sums 10k rows
    centered = pixels - pixels.mean(0)
    if cfg.pca:
        evals, evecs = torch.linalg.eigh(centered.T @ centered / len(centered))
        x = (centered @ evecs[:, -cfg.pca:].flip(1)).float()  # largest component first
        explained = float(evals[-cfg.pca:].sum() / evals.sum())
    else:
        x, explained = data.x_train.flatten(1), 1.0
    y = data.y_train
    n = len(y)
    edge_index = knn_graph(x, cfg.k)
    adj = to_torch_csr_tensor(edge_index, size=(n, n))
    gcn_ei, gcn_w = gcn_norm(edge_index, None, n, add_self_loops=True)
    gcn_adj = to_torch_csr_tensor(gcn_ei, gcn_w, size=(n, n))
    degree = torch.bincount(edge_index[1], minlength=n).float()
    info = {
        "data": data.describe() | {"test": 0},  # the test images are not used
        "nodes": n, "features": int(x.shape[1]),
        "features_from": f"the first {cfg.pca} principal components of the pixels "
                         f"((x - 127.5)/128), {100 * explained:.1f}% of their variance"
                         if cfg.pca else "the pixels, (x - 127.5)/128",
        "edges_undirected": int(edge_index.shape[1]) // 2,
        "degree_mean": float(degree.mean()), "degree_max": int(degree.max()),
        # the fraction of edges joining two nodes of the same class
        "edge_homophily": float((y[edge_index[0]] == y[edge_index[1]]).float().mean()),
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    echo(f"graph: {n} nodes, {info['edges_undirected']} undirected edges (k {cfg.k}, mean "
         f"degree {info['degree_mean']:.1f}), {info['features']} features, edge homophily "
         f"{info['edge_homophily']:.3f}; built in {info['build_seconds']:.1f} s")
    return Graph(x, y, edge_index, adj, gcn_ei, gcn_w, gcn_adj, info)


def split_nodes(y: Tensor, labels_per_class: int, val_nodes: int, seed: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """``(train, val, test)`` node indices: the first ``labels_per_class`` nodes of each class
    in a seeded random order, then the next ``val_nodes`` of that order, then the rest.

    Raises:
        WnormError: a class has fewer than ``labels_per_class`` nodes, or no node is left to
            test.
    """
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train = []
    for c in range(CLASSES):
        of_c = order[y[order] == c]
        if len(of_c) < labels_per_class:
            raise WnormError(f"graph: class {c} has {len(of_c)} nodes, fewer than "
                             f"--labels-per-class {labels_per_class}")
        train.append(of_c[:labels_per_class])
    train_t = torch.cat(train)
    rest = order[~torch.isin(order, train_t)]
    if len(rest) <= val_nodes:
        raise WnormError(f"graph: {len(rest)} unlabelled nodes leave none to test after "
                         f"--val-nodes {val_nodes}")
    return train_t, rest[:val_nodes], rest[val_nodes:]


# --------------------------------------------------------------------------- the network
class GraphNet(nn.Module):
    """``conv2(drop(act(conv1(drop(x), A))), A)``: two torch_geometric convolutions."""

    def __init__(self, model: str, in_dim: int, hidden: int, classes: int, heads: int = 4,
                 dropout: float = 0.5) -> None:
        from torch_geometric.nn import GATConv, GCNConv, SAGEConv

        super().__init__()
        self.dropout = dropout
        self.act: Callable[[Tensor], Tensor] = F.elu if model == "gat" else F.relu
        if model == "gcn":  # Â is computed once (Graph.gcn_adj), not in every forward
            self.conv1 = GCNConv(in_dim, hidden, normalize=False)
            self.conv2 = GCNConv(hidden, classes, normalize=False)
        elif model == "sage":
            self.conv1, self.conv2 = SAGEConv(in_dim, hidden), SAGEConv(hidden, classes)
        elif model == "gat":
            self.conv1 = GATConv(in_dim, hidden // heads, heads=heads)
            self.conv2 = GATConv(hidden, classes, heads=1)
        else:
            raise WnormError(f"graph: unknown model {model!r}; expected one of {list(MODELS)}")

    def forward(self, x: Tensor, adj: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        extra = () if edge_weight is None else (edge_weight,)
        h = self.drop(x)
        h = self.drop(self.act(self.conv1(h, adj, *extra)))
        return self.conv2(h, adj, *extra)

    def drop(self, h: Tensor) -> Tensor:
        """Inverted dropout, :math:`h\\,m/(1-p)` with :math:`m \\sim` Bernoulli(1-p) per
        element, drawn as ``rand >= p``: on a CPU this took half of ``F.dropout``'s time
        (``bernoulli_``), a third of an epoch."""
        if not self.training or self.dropout == 0:
            return h
        return h * (torch.rand_like(h) >= self.dropout) / (1 - self.dropout)


def build_model(cfg: GraphConfig, graph: Graph) -> tuple[GraphNet, str]:
    """The network of ``cfg.variant`` (seeded by ``cfg.seed``, on ``graph``'s device) and the
    data init's report (``""`` for the variants without one)."""
    torch.manual_seed(cfg.seed)  # the same starting weights for every variant of a seed
    net = GraphNet(cfg.model, graph.x.shape[1], cfg.hidden, CLASSES, cfg.heads, cfg.dropout)
    net = net.to(graph.x.device)
    if cfg.variant == "normal":
        return net, ""
    wnorm.apply(net)  # torch_geometric's Linear is among the default types
    rep = ""
    if cfg.variant.endswith("-init"):
        net.eval()  # the init pass without dropout
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch_geometric's jit use
            rep = str(wnorm.data_init(net, graph.inputs(cfg.model, sparse=False),
                                      init_scale=cfg.init_scale))
        net.train()
    if cfg.variant == "normal-init":
        wnorm.fold(net)  # plain weights again, holding the initialized w = g v/||v||
    return net, rep


# --------------------------------------------------------------------------- training
def run_name(cfg: GraphConfig) -> str:
    return f"graph-{cfg.model}-{cfg.variant}-s{cfg.seed}"


def train_one(cfg: GraphConfig, graph: Graph, echo: bool = True, *, overwrite: bool = False,
              progress_bar: bool = False) -> RunFolder:
    """Train ``cfg.model``/``cfg.variant`` with ``cfg.seed`` on ``graph``; writes and returns
    the run folder. The device is waited for once every ``cfg.log_every`` epochs.

    Raises:
        WnormError: a bad setting, or the folder already holds a run and ``overwrite`` is
            False (before the folder is touched).
    """
    check_graph_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    g = graph.to(device)
    train, val, test = (t.to(device) for t in split_nodes(
        graph.y, cfg.labels_per_class, cfg.val_nodes, cfg.seed))
    net, init_report = build_model(cfg, g)
    inputs = g.inputs(cfg.model, sparse=True)
    n_params = sum(p.numel() for p in net.parameters())
    name = run_name(cfg)
    extra = {"graph": graph.info, "split": {"train": len(train), "val": len(val),
                                            "test": len(test)},
             "parameters": n_params, "precision": precision_info(device)}
    with RunFolder(Path(cfg.out) / name, cfg, device, extra, echo=echo,
                   overwrite=overwrite) as folder:
        log = folder.log
        log(f"{name}: {len(train)} labelled / {len(val)} val / {len(test)} test nodes, "
            f"{n_params:,} parameters, device {device}")
        if init_report:
            log(f"data init on all {g.x.shape[0]} nodes (eval mode):\n{init_report}")
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # per epoch: train loss, val loss, train acc, val acc, test acc (on the device)
        stats = torch.zeros(cfg.epochs, 5, device=device)
        keys = ("train_loss", "val_loss", "train_acc", "val_acc", "test_acc")
        t0, done = time.perf_counter(), 0
        with progress(cfg.epochs, f"{name}", progress_bar) as bar:
            for epoch in range(cfg.epochs):
                net.train()
                loss = F.cross_entropy(net(*inputs)[train], g.y[train])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                net.eval()
                with torch.no_grad():
                    logits = net(*inputs)
                    right = logits.argmax(1) == g.y
                    stats[epoch] = torch.stack([
                        loss.detach(), F.cross_entropy(logits[val], g.y[val]),
                        right[train].float().mean(), right[val].float().mean(),
                        right[test].float().mean()])
                if bar is not None:
                    bar.update(1)
                if (epoch + 1) % cfg.log_every and epoch + 1 < cfg.epochs:
                    continue
                rows = stats[done:epoch + 1].tolist()  # the chunk's one wait
                seconds = time.perf_counter() - t0
                for i, r in enumerate(rows, done + 1):
                    if not all(math.isfinite(v) for v in r):
                        folder.write({"epoch": i, "diverged": True})
                        log(f"epoch {i}: a loss became non-finite ({r}); diverged, stopping "
                            f"this run (a lower --lr may help)")
                        return folder
                    row = {"epoch": i} | dict(zip(keys, r))
                    if i == epoch + 1:
                        row["seconds"] = round(seconds, 3)
                    folder.write(row)
                done = epoch + 1
                last = dict(zip(keys, rows[-1]))
                log(f"epoch {done}/{cfg.epochs}  train loss {last['train_loss']:.4f}  val loss "
                    f"{last['val_loss']:.4f}  acc train {100 * last['train_acc']:.1f}% val "
                    f"{100 * last['val_acc']:.2f}% test {100 * last['test_acc']:.2f}%  "
                    f"{seconds:.1f}s")
    return folder


# --------------------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.graph",
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated, of {', '.join(MODELS)} (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated (default: %(default)s)")
    p.add_argument("--seeds", default=DEFAULT_SEEDS,
                   help="comma-separated (default: %(default)s)")
    p.add_argument("--out", default=GraphConfig.out,
                   help="parent folder of the run folders and of the report "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=GraphConfig.threads,
                   help="torch CPU threads (default: %(default)s)")
    p.add_argument("--device", default=GraphConfig.device,
                   help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes that run in seconds (for tests); explicit options still win")
    add_run_flags(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False,
                   help="progress bars on stderr (default: off)")
    p.add_argument("--report-only", action="store_true",
                   help="redraw report.md and graph.png from the run folders under --out")
    add_options(p, GraphConfig, skip={"experiment", "model", "variant", "seed", "out",
                                      "threads", "device"})
    return p


def _configs(args: argparse.Namespace) -> list[GraphConfig]:
    models = split_list(args.models, str, "--models")
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise WnormError(f"--models: unknown {bad}; expected some of {list(MODELS)}")
    variants = split_list(args.variants, str, "--variants")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise WnormError(f"--variants: unknown {bad}; expected some of {list(VARIANTS)}")
    seeds = split_list(args.seeds, int, "--seeds")
    base = {"out": args.out, "threads": args.threads, "device": args.device}
    configs = [config_from_args(GraphConfig, args, QUICK if args.quick else None,
                                **(base | {"model": m, "variant": v, "seed": s}))
               for m in models for s in seeds for v in variants]
    for c in configs:
        check_graph_config(c)
    return configs


def main(argv: list[str] | None = None) -> int:
    """Train every (model, variant, seed) asked for, then write the report; returns the exit
    status."""
    from .report_graph import existing_runs, refuse_mixed, report  # it imports this module

    p = parser()
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        try:
            print(report([out], out), end="")
        except WnormError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        configs = _configs(args)
    except WnormError as e:
        p.error(str(e))
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    try:
        todo = pending(configs, lambda c: out / run_name(c), overwrite=args.overwrite,
                       resume=args.resume)
        # before training: a report of these runs beside the ones already in --out must not
        # average two settings
        replaced = {run_name(c) for c in configs}
        kept = [(r.config, r.folder) for r in existing_runs(out) if r.folder.name not in replaced]
        refuse_mixed(kept + [(asdict(c), out / run_name(c)) for c in configs])
        if configs[0].threads:
            torch.set_num_threads(configs[0].threads)
        graph = build_graph(configs[0]) if todo else None
        for cfg in todo:
            folder = train_one(cfg, graph, overwrite=args.overwrite or args.resume,
                               progress_bar=args.progress)
            print(f"run folder: {folder.path}")
        wall = time.perf_counter() - t0
        used = resource.getrusage(resource.RUSAGE_SELF)
        session = {"command": "python -m experiments.graph " + " ".join(
                       sys.argv[1:] if argv is None else argv),
                   "runs": len(todo), "run_names": [run_name(c) for c in todo],
                   "kept": len(configs) - len(todo),
                   "wall_s": round(wall, 1),
                   "cpu_s": round(used.ru_utime + used.ru_stime, 1),
                   "cpus": os.cpu_count(), "threads": configs[0].threads,
                   "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
        with (out / "sessions.jsonl").open("a") as f:
            f.write(json.dumps(session) + "\n")
        print(report([out], out), end="")
    except WnormError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"graph: {len(todo)} runs in {wall:.0f} s; wrote {out / 'report.md'} and "
          f"{out / 'graph.png'}")
    return 0


if __name__ == "__main__":
    from .common import entry_point

    entry_point(main)
