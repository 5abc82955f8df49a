r"""Weight normalization written out in NumPy, to read: every formula of the paper, step by step.

Salimans & Kingma (2016), https://arxiv.org/abs/1602.07868. This file is for learning and for
checking: it is not used by the rest of wnorm (which runs on PyTorch), it imports only NumPy,
and ``import wnorm`` does not import it; write ``from wnorm import reference``.

Conventions (the same as ``torch.nn.Linear``): a dense layer has ``out`` units and ``k`` inputs;
``v`` has shape ``(out, k)``, one row :math:`v_i` per unit; ``g`` and ``b`` have shape ``(out,)``;
a batch ``x`` has shape ``(B, k)``. :math:`\lVert v\rVert` is the Euclidean norm of one row,
:math:`\sqrt{\sum_j v_{ij}^2}`, so every unit has its own length ``g_i`` and direction
:math:`v_i/\lVert v_i\rVert`.

Contents, in the order of the paper:

1. :func:`weight`, :func:`dense_forward` -- eq. 2, :math:`w = g\,v/\lVert v\rVert`.
2. :func:`dense_backward` -- eqs. 3-4 directly, and as a projection :math:`M_w` (section 2.1).
3. :func:`sgd_norm_growth` -- why :math:`\lVert v\rVert` grows under SGD (section 2.1).
4. :func:`init_v`, :func:`data_init` -- the data-dependent initialization (section 3).
5. :func:`mean_only_bn_forward`, :func:`mean_only_bn_backward` -- mean-only BN (section 4).

Example:
    >>> import numpy as np
    >>> from wnorm import reference as ref
    >>> rng = np.random.default_rng(0)
    >>> v, g = rng.normal(size=(4, 3)), np.array([1.0, 2.0, 0.5, 3.0])
    >>> np.linalg.norm(ref.weight(g, v), axis=1)  # ||w_i|| = g_i, whatever v is
    array([1. , 2. , 0.5, 3. ])
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "ACTIVATIONS",
    "Grads",
    "Layer",
    "row_norms",
    "weight",
    "dense_forward",
    "dense_backward",
    "projection",
    "sgd_norm_growth",
    "init_v",
    "data_init",
    "mlp_forward",
    "mean_only_bn_forward",
    "mean_only_bn_backward",
]

# phi and its derivative phi'. Leaky ReLU 0.1 is what the paper's CIFAR-10 code uses.
ACTIVATIONS = {
    "identity": (lambda a: a, lambda a: np.ones_like(a)),
    "relu": (lambda a: np.maximum(a, 0.0), lambda a: (a > 0).astype(a.dtype)),
    "leaky_relu": (lambda a: np.where(a > 0, a, 0.1 * a), lambda a: np.where(a > 0, 1.0, 0.1)),
}


# ----------------------------------------------------------------------------- 1. forward
def row_norms(v: np.ndarray) -> np.ndarray:
    r"""The Euclidean norm of each row (unit): :math:`\lVert v_i\rVert = \sqrt{\sum_j v_{ij}^2}`."""
    return np.sqrt(np.sum(v * v, axis=1))


def weight(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    r"""Eq. 2: :math:`w_i = g_i\,v_i/\lVert v_i\rVert`, shape ``(out, k)``.

    The direction of :math:`w_i` comes from :math:`v_i`, its length is exactly :math:`g_i`
    (:math:`\lVert w_i\rVert = g_i`): length and direction are now separate parameters.
    """
    return (g / row_norms(v))[:, None] * v


def dense_forward(x: np.ndarray, g: np.ndarray, v: np.ndarray, b: np.ndarray,
                  phi: str = "identity") -> np.ndarray:
    r"""A weight-normalized dense layer, :math:`y = \phi(w\cdot x + b)` with eq. 2's w.

    ``x``: ``(B, k)``; returns ``(B, out)``. ``phi`` is a key of :data:`ACTIVATIONS`.

    Example:
        >>> import numpy as np
        >>> x, v = np.array([[1.0, 2.0]]), np.array([[3.0, 4.0]])   # ||v|| = 5
        >>> dense_forward(x, g=np.array([10.0]), v=v, b=np.array([1.0]))  # 10*(3+8)/5 + 1
        array([[23.]])
    """
    return ACTIVATIONS[phi][0](x @ weight(g, v).T + b)


# ----------------------------------------------------------------------------- 2. backward
class Grads(NamedTuple):
    """Gradients of the loss with respect to each input of :func:`dense_forward`."""

    g: np.ndarray  # (out,)
    v: np.ndarray  # (out, k)
    b: np.ndarray  # (out,)
    x: np.ndarray  # (B, k)


def projection(w_i: np.ndarray) -> np.ndarray:
    r""":math:`M_w = I - \frac{w w^\top}{\lVert w\rVert^2}`, a ``(k, k)`` matrix for one unit's w.

    It projects a vector onto the plane orthogonal to :math:`w` (hence to :math:`v`):
    :math:`M_w w = 0`, and :math:`M_w u = u` for every :math:`u \perp w`.
    """
    return np.eye(w_i.size) - np.outer(w_i, w_i) / (w_i @ w_i)


def dense_backward(grad_y: np.ndarray, x: np.ndarray, g: np.ndarray, v: np.ndarray,
                   b: np.ndarray, phi: str = "identity", form: str = "direct") -> Grads:
    r"""Backpropagate :math:`\nabla_y L` (shape ``(B, out)``) through :func:`dense_forward`.

    First as for any dense layer, with :math:`a = w\cdot x + b` the pre-activation:
    :math:`\nabla_a L = \nabla_y L\,\phi'(a)`, :math:`\nabla_b L = \sum_{batch}\nabla_a L`,
    :math:`\nabla_w L = \sum_{batch}\nabla_a L\,x^\top`, :math:`\nabla_x L = \nabla_a L\,w`.
    Then the chain rule through :math:`w = g\,v/\lVert v\rVert`, per unit:

    - ``form="direct"``, eqs. 3-4:
      :math:`\nabla_g L = \frac{\nabla_w L\cdot v}{\lVert v\rVert}`,
      :math:`\nabla_v L = \frac{g}{\lVert v\rVert}\nabla_w L
      - \frac{g\,\nabla_g L}{\lVert v\rVert^2}\,v`.
    - ``form="projection"``: :math:`\nabla_v L = \frac{g}{\lVert v\rVert} M_w \nabla_w L`,
      the same vector (substitute :math:`w = g v/\lVert v\rVert` into :math:`M_w`), built
      with the explicit ``(k, k)`` matrix of :func:`projection` for every unit.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x, v = rng.normal(size=(5, 3)), rng.normal(size=(2, 3))
        >>> g, b, gy = np.ones(2), np.zeros(2), rng.normal(size=(5, 2))
        >>> d = dense_backward(gy, x, g, v, b, form="direct")
        >>> p = dense_backward(gy, x, g, v, b, form="projection")
        >>> bool(np.allclose(d.v, p.v)), bool(np.allclose(np.sum(d.v * v, axis=1), 0))
        (True, True)
    """
    w = weight(g, v)
    a = x @ w.T + b                           # pre-activation, (B, out)
    grad_a = grad_y * ACTIVATIONS[phi][1](a)  # through phi
    grad_b = grad_a.sum(axis=0)
    grad_w = grad_a.T @ x                     # (out, k): the gradient a plain layer would get
    grad_x = grad_a @ w
    nv = row_norms(v)
    # eq. 3: the part of grad_w along the direction v/||v||
    grad_g = np.sum(grad_w * v, axis=1) / nv
    if form == "direct":
        # eq. 4: scale grad_w by g/||v||, then remove its component along v
        grad_v = (g / nv)[:, None] * grad_w - (g * grad_g / nv**2)[:, None] * v
    elif form == "projection":
        # the same, as (g/||v||) M_w grad_w with M_w a (k, k) matrix per unit
        grad_v = np.stack([(g[i] / nv[i]) * projection(w[i]) @ grad_w[i] for i in range(len(g))])
    else:
        raise ValueError(f"dense_backward: form must be 'direct' or 'projection'; got {form!r}")
    return Grads(grad_g, grad_v, grad_b, grad_x)


# ----------------------------------------------------------------------------- 3. norm growth
def sgd_norm_growth(v: np.ndarray, grad_v: np.ndarray, lr: float) -> tuple[np.ndarray, np.ndarray]:
    r"""One plain SGD step :math:`v' = v - \eta\,\nabla_v L`, and the norm-growth law it obeys.

    Returns :math:`(\lVert v'\rVert,\ \sqrt{1+C^2}\,\lVert v\rVert)`, per unit: they are equal.

    :math:`\nabla_v L` from eq. 4 is orthogonal to :math:`v` (it is :math:`M_w` applied to
    something), so the step :math:`\Delta v = -\eta\nabla_v L` is at right angles to :math:`v`
    and Pythagoras gives :math:`\lVert v'\rVert^2 = \lVert v\rVert^2 + \lVert\Delta v\rVert^2`,
    i.e. :math:`\lVert v'\rVert = \sqrt{1+C^2}\,\lVert v\rVert` with
    :math:`C = \lVert\Delta v\rVert/\lVert v\rVert`. The norm can only grow, faster when the
    steps are large or noisy, and the effective step on the direction, :math:`g/\lVert v\rVert`
    (eq. 4), shrinks as it grows: the learning rate stabilizes itself.

    Example:
        >>> import numpy as np
        >>> v, grad_v = np.array([[3.0, 4.0]]), np.array([[4.0, -3.0]])  # at right angles
        >>> sgd_norm_growth(v, grad_v, lr=1.0)   # C = 1: ||v'|| = sqrt(2) * 5
        (array([7.07106781]), array([7.07106781]))
    """
    step = -lr * grad_v
    new_norm = row_norms(v + step)
    c = row_norms(step) / row_norms(v)
    return new_norm, np.sqrt(1.0 + c**2) * row_norms(v)


# ----------------------------------------------------------------------------- 4. data init
class Layer(NamedTuple):
    """One weight-normalized dense layer's parameters."""

    g: np.ndarray  # (out,)
    v: np.ndarray  # (out, k)
    b: np.ndarray  # (out,)


def init_v(sizes: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    r"""Section 3: every element of every v from :math:`N(0, 0.05^2)`; ``sizes = [k, ..., out]``."""
    return [rng.normal(0.0, 0.05, size=(n_out, n_in)) for n_in, n_out in zip(sizes[:-1], sizes[1:])]


def data_init(vs: list[np.ndarray], x: np.ndarray, init_scale: float = 1.0,
              phi: str = "relu") -> list[Layer]:
    r"""Section 3: choose each layer's ``g`` and ``b`` from one batch ``x``, layer by layer.

    For each layer in turn, with :math:`x` what reaches it:

    1. :math:`t = v\cdot x/\lVert v\rVert` (the layer with :math:`g = 1`, :math:`b = 0`);
    2. :math:`\mu[t]`, :math:`\sigma[t]`: mean and standard deviation of each unit over the batch
       (population std, dividing by B);
    3. :math:`g \leftarrow s/\sigma[t]`, :math:`b \leftarrow -\mu[t]\,g` (s = ``init_scale``),
       so the pre-activation :math:`g\,t + b = s\,(t - \mu[t])/\sigma[t]` has mean 0, std s;
    4. the next layer gets :math:`\phi` of that standardized pre-activation.

    The last layer is linear (no :math:`\phi` after it). Returns one :class:`Layer` per ``v``.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(100, 5))
        >>> layers = data_init(init_v([5, 8, 3], rng), x)
        >>> y = mlp_forward(layers, x)       # the same batch: standardized outputs
        >>> bool(np.allclose(y.mean(0), 0)), bool(np.allclose(y.std(0), 1))
        (True, True)
    """
    layers = []
    for i, v in enumerate(vs):
        t = x @ (v / row_norms(v)[:, None]).T      # step 1: (B, out)
        mu, sigma = t.mean(axis=0), t.std(axis=0)  # step 2: per unit, over the batch
        g = init_scale / sigma                     # step 3
        b = -mu * g
        layers.append(Layer(g, v, b))
        a = g * t + b                              # = init_scale * (t - mu) / sigma
        x = a if i == len(vs) - 1 else ACTIVATIONS[phi][0](a)  # step 4
    return layers


def mlp_forward(layers: list[Layer], x: np.ndarray, phi: str = "relu") -> np.ndarray:
    """A stack of :func:`dense_forward` layers, ``phi`` between them, the last one linear."""
    for i, (g, v, b) in enumerate(layers):
        x = dense_forward(x, g, v, b, phi="identity" if i == len(layers) - 1 else phi)
    return x


# ----------------------------------------------------------------------------- 5. mean-only BN
def mean_only_bn_forward(t: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""Section 4: :math:`\tilde t = t - \mu[t] + b`: subtract the batch mean, no std.

    ``t``: ``(B, out)`` (e.g. :math:`w\cdot x`), ``b``: ``(out,)``. In eval, the running mean
    replaces :math:`\mu[t]` (not modelled here).
    """
    return t - t.mean(axis=0) + b


def mean_only_bn_backward(grad_tt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Section 4: :math:`\nabla_t L = \nabla_{\tilde t}L - \mathrm{mean}(\nabla_{\tilde t}L)`.

    Returns ``(grad_t, grad_b)``.

    Each :math:`t_n` also moves the mean :math:`\mu[t]` by :math:`t_n/B`, so every example's
    gradient loses the batch average of the gradients.
    :math:`\nabla_b L = \sum_{batch}\nabla_{\tilde t} L`.

    Example:
        >>> import numpy as np
        >>> mean_only_bn_backward(np.array([[1.0], [3.0]]))
        (array([[-1.],
               [ 1.]]), array([4.]))
    """
    return grad_tt - grad_tt.mean(axis=0), grad_tt.sum(axis=0)
