"""wnorm.reference (the NumPy walk-through) against the PyTorch implementation and against itself.

Float64 throughout: the reference and wnorm must agree to 1e-10, the reference's two backward
forms and its finite differences to their own rounding.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import wnorm
from wnorm import reference as ref

PHIS = ["identity", "relu", "leaky_relu"]
TORCH_PHI = {"identity": lambda a: a, "relu": torch.relu,
             "leaky_relu": lambda a: torch.nn.functional.leaky_relu(a, 0.1)}


def _layer(rng: np.random.Generator, batch: int = 7, k: int = 5, out: int = 4):
    x = rng.normal(size=(batch, k))
    v = rng.normal(size=(out, k))
    g = rng.uniform(0.5, 2.0, size=out)
    b = rng.normal(size=out)
    grad_y = rng.normal(size=(batch, out))
    return x, g, v, b, grad_y


# ----------------------------------------------------------------------------- vs PyTorch
@pytest.mark.parametrize("phi", PHIS)
def test_forward_and_gradients_match_wnorm_weight_norm(phi: str) -> None:
    """Same g, v, b, x: wnorm.weight_norm(nn.Linear) in float64 gives the reference's outputs
    and autograd gives the reference's hand-written eqs. 3-4 gradients, to 1e-10."""
    rng = np.random.default_rng(1)
    x, g, v, b, grad_y = _layer(rng)
    layer = wnorm.weight_norm(torch.nn.Linear(5, 4).double())
    with torch.no_grad():
        layer.weight_g.copy_(torch.from_numpy(g)[:, None])
        layer.weight_v.copy_(torch.from_numpy(v))
        layer.bias.copy_(torch.from_numpy(b))
    xt = torch.from_numpy(x).requires_grad_()
    y = TORCH_PHI[phi](layer(xt))
    (y * torch.from_numpy(grad_y)).sum().backward()  # so that dL/dy = grad_y

    np.testing.assert_allclose(ref.dense_forward(x, g, v, b, phi), y.detach().numpy(),
                               rtol=0, atol=1e-10)
    for form in ("direct", "projection"):
        d = ref.dense_backward(grad_y, x, g, v, b, phi, form=form)
        np.testing.assert_allclose(d.g, layer.weight_g.grad.numpy().ravel(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(d.v, layer.weight_v.grad.numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(d.b, layer.bias.grad.numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(d.x, xt.grad.numpy(), rtol=0, atol=1e-10)


def _torch_mlp(vs: list[np.ndarray]) -> torch.nn.Sequential:
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                              torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    wnorm.apply(net)
    with torch.no_grad():
        for m, v in zip(net[::2], vs):
            m.weight_v.copy_(torch.from_numpy(v))
    return net


def _both_inits(tol: float) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 5))
    vs = ref.init_v([5, 8, 8, 3], rng)
    layers = ref.data_init(vs, x)
    net = _torch_mlp(vs)
    wnorm.data_init(net, torch.from_numpy(x))
    for m, layer in zip(net[::2], layers):
        np.testing.assert_allclose(m.weight_g.detach().numpy().ravel(), layer.g, rtol=0, atol=tol)
        np.testing.assert_allclose(m.bias.detach().numpy(), layer.b, rtol=0, atol=tol)
        np.testing.assert_array_equal(m.weight_v.detach().numpy(), layer.v)  # v is untouched
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref.mlp_forward(layers, x), rtol=0, atol=tol)


def test_data_init_matches_wnorm_data_init_to_1e10() -> None:
    """A 3-layer MLP, the same v and batch, float64: wnorm.data_init gives the reference's g, b
    and outputs to 1e-10 (its statistics are float32 at least, float64 for a float64 model)."""
    _both_inits(1e-10)


def test_wnorm_data_init_statistics_keep_float64() -> None:
    net = _torch_mlp(ref.init_v([5, 8, 8, 3], np.random.default_rng(3)))
    report = wnorm.data_init(net, torch.randn(16, 5, dtype=torch.float64))
    assert {r.sigma.dtype for r in report} == {torch.float64}


# ----------------------------------------------------------------------------- self-consistency
@pytest.mark.parametrize("phi", PHIS)
def test_backward_forms_agree_and_grad_v_is_orthogonal_to_v(phi: str) -> None:
    rng = np.random.default_rng(4)
    x, g, v, b, grad_y = _layer(rng, batch=9, k=6, out=5)
    d = ref.dense_backward(grad_y, x, g, v, b, phi, form="direct")
    p = ref.dense_backward(grad_y, x, g, v, b, phi, form="projection")
    np.testing.assert_allclose(d.v, p.v, rtol=0, atol=1e-13)
    for grad_v in (d.v, p.v):  # cos(grad_v, v) = 0 (a dead relu unit has grad_v = 0 exactly)
        bound = 1e-14 * ref.row_norms(grad_v) * ref.row_norms(v)
        assert np.all(np.abs(np.sum(grad_v * v, axis=1)) <= bound)


def test_projection_matrix_properties() -> None:
    w = np.random.default_rng(5).normal(size=6)
    m = ref.projection(w)
    np.testing.assert_allclose(m @ w, 0, atol=1e-14)       # kills the w direction
    np.testing.assert_allclose(m @ m, m, atol=1e-14)       # a projection
    np.testing.assert_allclose(m, m.T, atol=0)             # orthogonal projection
    with pytest.raises(ValueError, match="form must be"):
        ref.dense_backward(np.ones((1, 1)), np.ones((1, 1)), np.ones(1), np.ones((1, 1)),
                           np.zeros(1), form="other")


@pytest.mark.parametrize("phi", ["identity", "leaky_relu"])
def test_backward_matches_finite_differences(phi: str) -> None:
    """Central differences of L = sum(grad_y * y) in every entry of g, v, b, x."""
    rng = np.random.default_rng(6)
    x, g, v, b, grad_y = _layer(rng, batch=4, k=3, out=2)
    d = ref.dense_backward(grad_y, x, g, v, b, phi)
    params = {"g": g, "v": v, "b": b, "x": x}

    def loss(**kw: np.ndarray) -> float:
        p = {**params, **kw}
        return float(np.sum(grad_y * ref.dense_forward(p["x"], p["g"], p["v"], p["b"], phi)))

    eps = 1e-6
    for name, value in params.items():
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            plus, minus = value.copy(), value.copy()
            plus[idx] += eps
            minus[idx] -= eps
            numeric[idx] = (loss(**{name: plus}) - loss(**{name: minus})) / (2 * eps)
        np.testing.assert_allclose(getattr(d, name), numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_norm_growth_under_plain_sgd() -> None:
    """Ten plain SGD steps with eq. 4 gradients: every step ||v'|| = sqrt(1 + C^2) ||v||, so the
    norm only grows and the effective step g/||v|| only shrinks."""
    rng = np.random.default_rng(7)
    x, g, v, b, _ = _layer(rng, batch=16, k=5, out=3)
    for _ in range(10):
        grad = ref.dense_backward(rng.normal(size=(16, 3)), x, g, v, b, "leaky_relu")
        new_norm, predicted = ref.sgd_norm_growth(v, grad.v, lr=0.5)
        np.testing.assert_allclose(new_norm, predicted, rtol=1e-12, atol=0)
        assert np.all(new_norm > ref.row_norms(v))
        v = v - 0.5 * grad.v


def test_data_init_standardizes_every_layer() -> None:
    """On the init batch each layer's pre-activation has mean 0 and std init_scale per unit."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(50, 4)) * 3 + 1
    layers = ref.data_init(ref.init_v([4, 6, 6, 2], rng), x, init_scale=0.5)
    h = x
    for i, (g, v, b) in enumerate(layers):
        a = ref.dense_forward(h, g, v, b)
        np.testing.assert_allclose(a.mean(0), 0, atol=1e-12)
        np.testing.assert_allclose(a.std(0), 0.5, rtol=1e-12)
        h = a if i == len(layers) - 1 else np.maximum(a, 0)


def test_mean_only_bn_backward_is_grad_minus_its_mean() -> None:
    rng = np.random.default_rng(9)
    t, b, grad = rng.normal(size=(8, 3)), rng.normal(size=3), rng.normal(size=(8, 3))
    y = ref.mean_only_bn_forward(t, b)
    np.testing.assert_allclose(y.mean(0), b, atol=1e-14)
    grad_t, grad_b = ref.mean_only_bn_backward(grad)
    np.testing.assert_array_equal(grad_t, grad - grad.mean(0))
    np.testing.assert_array_equal(grad_b, grad.sum(0))
    # and autograd through wnorm's layer agrees
    bn = wnorm.MeanOnlyBatchNorm1d(3).double()
    with torch.no_grad():
        bn.bias.copy_(torch.from_numpy(b))
    tt = torch.from_numpy(t).requires_grad_()
    out = bn(tt)
    (out * torch.from_numpy(grad)).sum().backward()
    np.testing.assert_allclose(out.detach().numpy(), y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tt.grad.numpy(), grad_t, rtol=0, atol=1e-12)
    np.testing.assert_allclose(bn.bias.grad.numpy(), grad_b, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- packaging rules
def test_reference_imports_only_numpy_and_stdlib() -> None:
    tree = ast.parse(pathlib.Path(ref.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"numpy", "__future__", "typing"}, roots


def test_import_wnorm_does_not_import_reference() -> None:
    code = "import sys, wnorm; print('wnorm.reference' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- docs/how_it_works.md
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "how_it_works.md"


def _blocks(lang: str) -> list[str]:
    parts = DOC.read_text().split("```")
    return [p[len(lang) + 1:] for p in parts[1::2] if p.startswith(lang + "\n")]


def _code_lines(text: str) -> list[str]:
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def test_doc_snippets_are_quoted_from_reference() -> None:
    """Every quoted line (comments aside; `def` lines are shown without type hints) is in the
    reference, so the walk-through cannot drift from the code."""
    source = set(_code_lines(pathlib.Path(ref.__file__).read_text()))
    *quotes, _example = _blocks("python")
    for block in quotes:
        for line in _code_lines(block):
            assert line.startswith("def ") or line in source, line


def test_doc_example_prints_what_the_doc_says(capsys: pytest.CaptureFixture[str]) -> None:
    example, expected = _blocks("python")[-1], _blocks("text")[-1]
    exec(compile(example, str(DOC), "exec"), {})
    assert capsys.readouterr().out == expected
