"""torch_geometric models (GCN, GAT, GraphSAGE and the other convolutions built on PyG's
Linear) as first-class wnorm models: ``wnorm.apply`` selects their Linears by default,
``data_init`` initializes them inside message passing (for convolutions whose output scales
with their Linears', the convolution's output -- the graph layer's pre-activation -- is
standardized per channel on the batch graph; in others, such as GAT, each Linear's own output
is, and the report says why), and training, state dicts, copies, pickling, fold and
torch.compile work.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import wnorm
from conftest import readme_example
from wnorm.data_init import NO_BIAS_NOTE

gnn = pytest.importorskip("torch_geometric.nn")

N, E, F_IN, HID, CLASSES = 60, 240, 8, 16, 3
TOL = 1e-4


def graph(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random graph: node features (N, F_IN) with nonzero means, edges (2, E)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, F_IN, generator=gen) * 2 + 0.5
    return x, torch.randint(0, N, (2, E), generator=gen)


CONVS = {
    "gcn": lambda i, o: gnn.GCNConv(i, o),
    "sage": lambda i, o: gnn.SAGEConv(i, o),
    "gat": lambda i, o: gnn.GATConv(i, o // 2, heads=2),
}


class Net(nn.Module):
    """Two graph convolutions and a PyG Linear head."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.c1 = CONVS[kind](F_IN, HID)
        self.c2 = CONVS[kind](HID, HID)
        self.head = gnn.Linear(HID, CLASSES)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x, edge_index))
        h = torch.relu(self.c2(h, edge_index))
        return self.head(h)


def net(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net(kind)


def first_outputs(model: nn.Module, names: list[str], batch) -> dict[str, torch.Tensor]:
    mods = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [mods[n].register_forward_hook(
        lambda m, a, y, n=n: seen.setdefault(n, y.detach().clone())) for n in names]
    with torch.no_grad():
        model(*batch)
    for h in handles:
        h.remove()
    return seen


def per_channel(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = y.double()
    return y.mean(0), y.std(0, correction=0)


def pyg_linears(model: nn.Module) -> list[str]:
    from torch_geometric.nn.dense.linear import Linear

    return [n for n, m in model.named_modules() if isinstance(m, Linear)]


# --------------------------------------------------------------------------- apply
@pytest.mark.parametrize("kind", list(CONVS))
def test_apply_selects_pyg_linears_by_default_and_keeps_outputs(kind):
    model = net(kind)
    x, ei = graph()
    with torch.no_grad():
        before = model(x, ei)
    lins = pyg_linears(model)
    assert len(lins) >= 3
    wnorm.apply(model)
    mods = dict(model.named_modules())
    assert all(wnorm.is_weight_normalized(mods[n]) for n in lins)
    for n in lins:
        keys = set(mods[n].state_dict())
        assert {"weight_g", "weight_v"} <= keys and "weight" not in keys, (n, keys)
    with torch.no_grad():
        torch.testing.assert_close(model(x, ei), before, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- data_init
@pytest.mark.parametrize("kind", ["gcn", "sage"])
def test_data_init_standardizes_the_convolution_output_per_channel(kind):
    """GCN and GraphSAGE: their output is linear in their Linears' (and their bias), so the
    init sets those g's and the bias after the aggregation such that the convolution's output
    has mean 0 and std init_scale per channel on the batch graph."""
    model = wnorm.apply(net(kind))
    x, ei = graph()
    report = wnorm.data_init(model, (x, ei), init_scale=0.5)
    assert [(r.name, r.kind, r.status, r.note) for r in report] == [
        ("c1", type(model.c1).__name__, "initialized", ""),
        ("c2", type(model.c2).__name__, "initialized", ""),
        ("head", "Linear", "initialized", "")]
    outs = first_outputs(model, ["c1", "c2", "head"], (x, ei))
    for name, y in outs.items():
        mu, sd = per_channel(y)
        assert mu.abs().max() < TOL and (sd - 0.5).abs().max() < TOL, name
    # the report's statistics are the convolution's output at g = 1 and biases 0: g = s/sigma
    for r in report[:2]:
        conv = dict(model.named_modules())[r.name]
        lins = [m for m in conv.children() if wnorm.is_weight_normalized(m)]
        assert len(lins) == (1 if r.kind == "GCNConv" else 2)
        for lin in lins:
            torch.testing.assert_close(lin.weight_g.detach().flatten(), 0.5 / r.sigma)


def test_gat_linears_are_initialized_one_by_one_and_the_report_says_why():
    """GAT's output is an attention-weighted average of its Linear's outputs, with attention
    logits computed from those outputs: no g makes the convolution's output standardized in
    one step (scaling g changes the attention). Each Linear's own output is standardized
    (std init_scale; it has no bias, so its mean stays), and the note says so."""
    model = wnorm.apply(net("gat"))
    x, ei = graph()
    report = wnorm.data_init(model, (x, ei))
    by_name = {r.name: r for r in report}
    assert list(by_name) == ["c1.lin", "c2.lin", "head"]
    for n in ("c1.lin", "c2.lin"):
        r = by_name[n]
        assert r.status == "initialized"
        assert f"inside {n[:2]} (GATConv)" in r.note and "attention" in r.note
        assert "not the convolution's" in r.note and NO_BIAS_NOTE in r.note
    outs = first_outputs(model, ["c1.lin", "c2.lin", "head"], (x, ei))
    for name, y in outs.items():
        mu, sd = per_channel(y)
        assert (sd - 1).abs().max() < TOL, name
    assert per_channel(outs["head"])[0].abs().max() < TOL


class One(nn.Module):
    """One convolution between two tanh's (its input has a nonzero mean)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(torch.tanh(x), edge_index))


@pytest.mark.parametrize("make", [
    lambda: gnn.ChebConv(F_IN, HID, K=3),  # Linears in a ModuleList, some called by .forward()
    lambda: gnn.TAGConv(F_IN, HID, K=2),
    lambda: gnn.LEConv(F_IN, HID),  # lin1's bias is aggregated: the output bias is lin3's
    lambda: gnn.SGConv(F_IN, HID, K=2),
    lambda: gnn.GraphConv(F_IN, HID),
    lambda: gnn.ClusterGCNConv(F_IN, HID),
    lambda: gnn.GCNConv(F_IN, HID, aggr="max"),
], ids=["cheb", "tag", "le", "sg", "graph", "clustergcn", "gcn-max"])
def test_other_linear_convolutions_are_standardized_as_a_whole(make):
    """LEConv was reported initialized with its output mean off by 2.6 and std by 0.8: lin1's
    bias, which the aggregation multiplies by each node's degree, was taken as its bias."""
    torch.manual_seed(0)
    model = wnorm.apply(One(make()))
    x, ei = graph()
    report = wnorm.data_init(model, (x, ei))
    assert [(r.name, r.status, r.note) for r in report] == [("conv", "initialized", "")]
    mu, sd = per_channel(first_outputs(model, ["conv"], (x, ei))["conv"])
    assert mu.abs().max() < TOL and (sd - 1).abs().max() < TOL


@pytest.mark.parametrize("make", [
    lambda: gnn.SAGEConv(F_IN, HID, aggr=["mean", "max"], aggr_kwargs=dict(
        mode="proj", mode_kwargs=dict(in_channels=F_IN, out_channels=HID))),
    lambda: gnn.SAGEConv(F_IN, HID, aggr=["mean", "max"], aggr_kwargs=dict(
        mode="proj", mode_kwargs=dict(in_channels=F_IN, out_channels=F_IN))),
    lambda: gnn.SAGEConv(F_IN, HID, aggr=gnn.aggr.AttentionalAggregation(
        gate_nn=gnn.Linear(F_IN, 1))),
], ids=["proj-to-out", "proj-to-in", "attention-gate"])
def test_a_linear_inside_the_aggregation_is_a_layer_of_its_own(make):
    # it was taken as one of the convolution's gains: the output was reported standardized
    # with means up to 0.77, or the init raised a raw shape error
    torch.manual_seed(0)
    model = wnorm.apply(One(make()))
    x, ei = graph()
    report = wnorm.data_init(model, (x, ei))
    assert ("conv", "initialized") in [(r.name, r.status) for r in report]
    assert any(r.name.startswith("conv.aggr_module.") and r.status == "initialized"
               for r in report)
    mu, sd = per_channel(first_outputs(model, ["conv"], (x, ei))["conv"])
    assert mu.abs().max() < TOL and (sd - 1).abs().max() < TOL


@pytest.mark.parametrize("make, exclude, why", [
    (lambda: gnn.SAGEConv(F_IN, HID), "conv.lin_r",
     "its lin_r cannot be set (not weight-normalized)"),
    (lambda: gnn.SAGEConv(F_IN, HID, project=True), (), "project=True"),
    (lambda: gnn.SAGEConv(F_IN, HID, normalize=True), (), "normalize=True"),
    (lambda: gnn.LEConv(F_IN, HID, aggr="mul"), (), "aggregates its Linears' outputs with "
                                                    "MulAggregation"),
], ids=["partly-normalized", "project", "normalize", "mul-aggregation"])
def test_convolutions_that_do_not_scale_are_initialized_linear_by_linear(make, exclude, why):
    torch.manual_seed(0)
    model = wnorm.apply(One(make()), exclude=exclude)
    x, ei = graph()
    report = wnorm.data_init(model, (x, ei))
    assert report and not report.skipped
    assert all(r.name.startswith("conv.") and why in r.note
               and "this layer's own output is standardized" in r.note for r in report), \
        [(r.name, r.note) for r in report]
    outs = first_outputs(model, [r.name for r in report], (x, ei))
    for r in report:
        mu, sd = per_channel(outs[r.name])
        assert (sd - 1).abs().max() < TOL, r.name
        if NO_BIAS_NOTE not in r.note:
            assert mu.abs().max() < TOL, r.name


# --------------------------------------------------------------------------- training and I/O
def trained(kind: str, steps: int = 5) -> tuple[nn.Module, list[float]]:
    model = wnorm.apply(net(kind))
    x, ei = graph()
    wnorm.data_init(model, (x, ei))
    y = torch.randint(0, CLASSES, (N,), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x, ei), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


@pytest.mark.parametrize("kind", list(CONVS))
def test_training_steps_reduce_the_loss_and_train_g_and_v(kind):
    model, losses = trained(kind, steps=15)
    assert losses[-1] < losses[0]
    start = net(kind)
    wnorm.apply(start)
    moved = {n for (n, p), q in zip(model.named_parameters(), start.parameters())
             if not torch.equal(p, q)}
    assert any(n.endswith("weight_g") for n in moved) and any(n.endswith("weight_v")
                                                             for n in moved)


@pytest.mark.parametrize("kind", list(CONVS))
def test_state_dict_keeps_g_and_v_and_loads_to_identical_outputs(kind):
    model, _ = trained(kind)
    sd = model.state_dict()
    assert any(k.endswith("lin.weight_g") or k.endswith("lin_l.weight_g") for k in sd)
    assert not any(k.endswith(".weight") for k in sd)
    fresh = wnorm.apply(net(kind, seed=1))
    fresh.load_state_dict(sd)
    for (k, a), b in zip(fresh.state_dict().items(), sd.values()):
        assert torch.equal(a, b), k
    x, ei = graph(2)
    with torch.no_grad():
        assert torch.equal(fresh(x, ei), model(x, ei))
    other = wnorm.apply(net(kind, seed=2))
    wnorm.load_state_dict(other, sd)  # wnorm's loader, strict: every key checked
    with torch.no_grad():
        assert torch.equal(other(x, ei), model(x, ei))


@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_deepcopy_and_pickle_keep_a_working_wnorm_model(kind, how):
    model, _ = trained(kind)
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    x, ei = graph(2)
    with torch.no_grad():
        assert torch.equal(twin(x, ei), model(x, ei))
    mods = dict(twin.named_modules())
    assert all(wnorm.is_weight_normalized(mods[n]) for n in pyg_linears(twin))
    # the copy trains on its own: the original does not move
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin(x, ei).square().mean().backward()
    opt.step()
    with torch.no_grad():
        assert not torch.equal(twin(x, ei), model(x, ei))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", list(CONVS))
def test_fold_gives_plain_parameters_and_the_same_outputs(kind):
    model, _ = trained(kind)
    x, ei = graph(2)
    with torch.no_grad():
        expected = model(x, ei)
    folded = wnorm.fold(copy.deepcopy(model))
    mods = dict(folded.named_modules())
    for n in pyg_linears(folded):
        m = mods[n]
        assert not wnorm.is_weight_normalized(m)
        assert type(m._parameters["weight"]) is nn.Parameter and m.weight.requires_grad
    assert not any("weight_g" in k or "weight_v" in k for k in folded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(folded(x, ei), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(model(x, ei), expected)  # the original is untouched


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CONVS))
def test_torch_compile_gives_the_eager_outputs_and_gradients(kind):
    model, _ = trained(kind)
    x, ei = graph(2)
    compiled = torch.compile(model, backend="aot_eager")
    out_c = compiled(x, ei)
    grads_c = torch.autograd.grad(out_c.square().sum(), list(model.parameters()))
    out_e = model(x, ei)
    grads_e = torch.autograd.grad(out_e.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_e):
        # float32 rounding, relative to the tensor's largest entry: compiled and eager are
        # equally far (~1e-7 of it) from the float64 gradient
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(b.abs().max())))


# --------------------------------------------------------------------------- the README's example
README_EXAMPLE = readme_example("torch_geometric")


def test_readme_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    gen = torch.Generator().manual_seed(0)
    scope = {"x": torch.randn(50, 16, generator=gen),
             "edge_index": torch.randint(0, 50, (2, 200), generator=gen)}
    exec(compile(README_EXAMPLE, "README torch_geometric example", "exec"), scope)
    model, report = scope["model"], scope["report"]
    assert [(r.name, r.status) for r in report] == [("conv1", "initialized"),
                                                    ("conv2", "initialized")]
    assert "conv1 | GCNConv | initialized" in capsys.readouterr().out
    saved = torch.load(tmp_path / "gcn.pt")
    assert {"conv1.lin.weight_g", "conv1.lin.weight_v", "conv1.bias"} <= set(saved)
    outs = first_outputs(model, ["conv1", "conv2"], (scope["x"], scope["edge_index"]))
    for y in outs.values():
        mu, sd = per_channel(y)
        assert mu.abs().max() < TOL and (sd - 1).abs().max() < TOL


def test_a_sparse_adjacency_is_a_batch_input_like_any_other():
    """torch_geometric takes a sparse adjacency in place of edge_index; data_init's NaN check
    raised a raw 'unsupported tensor layout' on it."""
    from torch_geometric.nn import GCNConv

    torch.manual_seed(0)
    conv = wnorm.apply(GCNConv(8, 4, normalize=False))
    x = torch.randn(20, 8)
    adj = torch.sparse_coo_tensor(torch.randint(0, 20, (2, 60)), torch.rand(60), (20, 20))
    for a in (adj, adj.to_sparse_csr()):
        report = wnorm.data_init(conv, (x, a.t()))
        assert [r.status for r in report] == ["initialized"]


@pytest.mark.parametrize("kind", ["gcn", "sage"])
def test_a_graph_with_no_edges_is_a_batch(kind):
    """GCN adds self loops and GraphSAGE has its root weight, so a graph without edges (an
    edge_index of shape (2, 0)) is a valid batch; data_init refused it as "the batch is empty"."""
    model = wnorm.apply(net(kind))
    x, ei = graph()[0], torch.empty(2, 0, dtype=torch.long)
    report = wnorm.data_init(model, (x, ei), init_scale=0.5)
    assert [(r.name, r.status) for r in report] == [
        ("c1", "initialized"), ("c2", "initialized"), ("head", "initialized")]
    for name, y in first_outputs(model, ["c1", "c2", "head"], (x, ei)).items():
        mu, sd = per_channel(y)
        assert mu.abs().max() < TOL and (sd - 0.5).abs().max() < TOL, name


@pytest.mark.parametrize("kind", ["gcn", "sage"])
def test_include_plain_initializes_a_plain_pyg_model(kind):
    """The paper's normal-parameterization baseline on a plain PyG model: before, nothing was
    initialized (an empty report, no warning)."""
    from torch_geometric.nn import GCNConv, SAGEConv

    torch.manual_seed(0)
    make = GCNConv if kind == "gcn" else SAGEConv
    conv = make(8, 4)
    x, ei = torch.randn(30, 8), torch.randint(0, 30, (2, 90))
    report = wnorm.data_init(conv, (x, ei), include_plain=True)
    assert [(r.name, r.status) for r in report] == [("<model>", "initialized")]
    with torch.no_grad():
        y = conv(x, ei)
    assert y.mean(0).abs().max() < 1e-4
    torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["gcn", "sage"])
def test_a_frozen_convolution_is_left_as_it_is_and_the_next_initialized_on_its_output(kind):
    # a frozen pretrained first convolution under a new head: data_init used to overwrite its
    # Linears' g and its bias, and report it initialized
    model = wnorm.apply(net(kind))
    x, ei = graph()
    model.c1.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.c1.state_dict().items()}
    with pytest.warns(UserWarning, match=r"frozen"):
        report = wnorm.data_init(model, (x, ei))
    assert all(torch.equal(v, model.c1.state_dict()[k]) for k, v in frozen.items())
    status = {r.name: r.status for r in report}
    assert status["c2"] == status["head"] == "initialized"
    assert all(s == "skipped" for n, s in status.items() if n.startswith("c1"))
    mu, sd = per_channel(first_outputs(model, ["c2"], (x, ei))["c2"])
    assert mu.abs().max() < TOL and (sd - 1).abs().max() < TOL


def test_a_convolution_whose_bias_alone_is_frozen_is_not_set_as_a_whole():
    model = wnorm.apply(net("gcn"))
    x, ei = graph()
    model.c1.bias.requires_grad_(False)
    bias = model.c1.bias.detach().clone()
    report = wnorm.data_init(model, (x, ei))
    assert torch.equal(model.c1.bias, bias)
    # its Linear is standardized on its own, and the report says why
    notes = {r.name: r.note for r in report if r.status == "initialized"}
    assert "c1" not in notes and "bias is frozen" in notes["c1.lin"]
