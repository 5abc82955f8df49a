r"""Several seeds of the section-5 network trained as one network: their layers side by side.

For S seeds of :class:`~experiments.nets.PaperNet`, every conv :math:`C_{in} \to C_{out}` becomes
one conv :math:`S C_{in} \to S C_{out}` with ``groups = S``, the dense layer a grouped 1x1 conv,
and every normalizer one over :math:`S C` channels (GroupNorm with S times the groups). Seed s
owns channel block s of every layer, so the stack computes

.. math::
    \operatorname{stack}(x_1, \dots, x_S) = \big(f_{\theta_1}(x_1), \dots, f_{\theta_S}(x_S)\big)

exactly: weight normalization, the data-dependent init and batch statistics are all per output
channel, Adam is elementwise, and the loss is the sum of the seeds' losses, so each seed's
gradient is its own network's. Input ``(N, S*C, H, W)`` (seed s's images in channels
``s*C .. (s+1)*C``, see :func:`stack_inputs`), output ``(N, S, classes)``. One kernel launch
then does S seeds' work, which is what fills a large GPU at the paper's batch of 100.

Random numbers: given one ``torch.Generator`` per seed (:func:`seed_streams`), the input noise
and the dropout masks of seed s's channel block are drawn from seed s's generator, in the order
and with the ops its own network draws them from the global generator (``randn``, then
``bernoulli_``, per layer in forward order). A seed's draws then do not depend on the other seeds
of its stack, and on a CPU they are those of its network run alone with the global generator
in that state.

``arpit`` is not stackable: its gains depend on a layer's fan-out, which grouping changes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

import wnorm
from wnorm import WnormError

from .nets import METHODS, GaussianNoise, PaperNet

__all__ = ["STACKABLE", "SeedDropout", "SeedNoise", "SeedStack", "seed_state_dict",
           "seed_streams", "stack", "stack_inputs"]

STACKABLE = ("normal", "weightnorm", "batchnorm", "wn+meanonly", "meanonly", "centered",
             "ws+gn", "forced")


class SeedStack(nn.Sequential):
    """The layers of S seeds' networks side by side; ``(N, S*C, H, W) -> (N, S, classes)``."""

    def __init__(self, layers: list[nn.Module], seeds: int, variant: str) -> None:
        super().__init__(*layers)
        self.seeds, self.variant = seeds, variant

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)  # (N, S*classes, 1, 1)
        return out.reshape(out.shape[0], self.seeds, -1)


def _blocks(x: Tensor, generators: list[torch.Generator],
            draw: Callable[[tuple[int, ...], torch.Generator], Tensor]) -> Tensor:
    """``draw(shape, g)`` for each seed's channel block of ``x``, seed s's from
    ``generators[s]``, side by side along the channels (dim 1)."""
    shape = (x.shape[0], x.shape[1] // len(generators), *x.shape[2:])
    if len(generators) == 1:
        return draw(shape, generators[0])
    return torch.cat([draw(shape, g) for g in generators], dim=1)


class SeedNoise(nn.Module):
    """:class:`~experiments.nets.GaussianNoise` (``x + sigma * N(0, 1)`` in training) with seed
    s's channel block drawn from ``generators[s]``."""

    def __init__(self, sigma: float, generators: list[torch.Generator]) -> None:
        super().__init__()
        self.sigma, self.generators = sigma, generators

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.sigma <= 0:
            return x
        return x + self.sigma * _blocks(x, self.generators, lambda shape, g: torch.randn(
            shape, generator=g, device=x.device, dtype=x.dtype))

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, seeds={len(self.generators)}"


class SeedDropout(nn.Module):
    """``nn.Dropout(p)`` with seed s's channel block's mask drawn from ``generators[s]``: the
    mask is ``bernoulli_(1 - p)`` scaled by ``1 / (1 - p)``, as ``F.dropout`` computes it on a
    CPU."""

    def __init__(self, p: float, generators: list[torch.Generator]) -> None:
        super().__init__()
        self.p, self.generators = p, generators

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p <= 0:
            return x
        keep = 1.0 - self.p
        return x * _blocks(x, self.generators, lambda shape, g: torch.empty(
            shape, device=x.device, dtype=x.dtype).bernoulli_(keep, generator=g).div_(keep))

    def extra_repr(self) -> str:
        return f"p={self.p}, seeds={len(self.generators)}"


def seed_streams(model: nn.Sequential, generators: list[torch.Generator]) -> nn.Sequential:
    """Replace the input noise and dropout layers of ``model`` (a :class:`SeedStack` of
    ``len(generators)`` seeds, or one seed's :class:`~experiments.nets.PaperNet`) by
    :class:`SeedNoise` and :class:`SeedDropout` drawing seed s's block from
    ``generators[s]`` (on the model's device); returns ``model``.

    Raises:
        WnormError: the number of generators is not the model's number of seeds.
    """
    seeds = getattr(model, "seeds", 1)
    if len(generators) != seeds:
        raise WnormError(f"seed_streams: {len(generators)} generators for a model of {seeds} "
                         "seeds; expected one per seed")
    for i, m in enumerate(model):
        if isinstance(m, (GaussianNoise, SeedNoise)):
            model[i] = SeedNoise(m.sigma, generators)
        elif isinstance(m, (nn.Dropout, SeedDropout)):
            model[i] = SeedDropout(m.p, generators)
    return model


def _side_by_side(m: nn.Module, s: int) -> nn.Module:
    """One layer doing what ``s`` copies of ``m`` do, each on its own channel block."""
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(s * m.in_channels, s * m.out_channels, m.kernel_size, stride=m.stride,
                         padding=m.padding, dilation=m.dilation, groups=s * m.groups,
                         bias=m.bias is not None)
    if isinstance(m, nn.Linear):  # on (N, C, 1, 1) after the global pool
        return nn.Conv2d(s * m.in_features, s * m.out_features, 1, groups=s,
                         bias=m.bias is not None)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return nn.BatchNorm2d(s * m.num_features, eps=m.eps, momentum=m.momentum,
                              affine=m.affine, track_running_stats=m.track_running_stats)
    if isinstance(m, (wnorm.MeanOnlyBatchNorm1d, wnorm.MeanOnlyBatchNorm2d)):
        return wnorm.MeanOnlyBatchNorm2d(s * m.num_features, momentum=m.momentum,
                                         track_running_stats=m.track_running_stats)
    if isinstance(m, nn.GroupNorm):
        return nn.GroupNorm(s * m.num_groups, s * m.num_channels, eps=m.eps, affine=m.affine)
    if isinstance(m, nn.Flatten):
        return nn.Identity()  # the dense layer is a 1x1 conv: it keeps (N, C, 1, 1)
    if isinstance(m, (GaussianNoise, nn.LeakyReLU, nn.MaxPool2d, nn.Dropout,
                      nn.AdaptiveAvgPool2d)):
        return copy.deepcopy(m)  # elementwise or per channel already
    raise WnormError(f"seed_stack: no side-by-side form for {type(m).__name__}")


def stack(nets: list[PaperNet], generators: list[torch.Generator] | None = None) -> SeedStack:
    """One :class:`SeedStack` holding the parameters and buffers of ``nets`` (same variant and
    shape, any weights: each net's state is copied into its channel block).

    With ``generators`` (one per net), each seed's noise and dropout are drawn from its own
    (:func:`seed_streams`); without, the stack's noise and dropout layers draw the whole stack's
    numbers from the global generator, so a seed's draws depend on the others.

    Raises:
        WnormError: no nets, nets of different variants or shapes, or a variant that cannot be
            stacked (see :data:`STACKABLE`).

    Example:
        >>> nets = [PaperNet("weightnorm", in_channels=1, width=0.05) for _ in range(2)]
        >>> x = torch.randn(2, 4, 1, 28, 28)  # (seeds, batch, C, H, W)
        >>> out = stack(nets).eval()(stack_inputs(x))
        >>> torch.allclose(out[:, 1], nets[1].eval()(x[1]), atol=1e-5)
        True
    """
    if not nets:
        raise WnormError("seed_stack: no networks to stack")
    variant = nets[0].variant
    if variant not in STACKABLE:
        raise WnormError(f"seed_stack: variant {variant!r} cannot be stacked; expected one of "
                         f"{list(STACKABLE)}")
    shapes = [{k: v.shape for k, v in n.state_dict().items()} for n in nets]
    if any(n.variant != variant for n in nets) or any(s != shapes[0] for s in shapes):
        raise WnormError("seed_stack: every network must be the same variant and shape")
    s = len(nets)
    like = next(nets[0].parameters())
    model = SeedStack([_side_by_side(m, s) for m in nets[0]], s, variant).to(like)
    for i, m in enumerate(nets[0]):  # reparameterize the layers the seeds' nets have
        if wnorm.is_weight_normalized(m, "weight"):
            METHODS[variant](model[i])
    states = [n.state_dict() for n in nets]
    merged = {}
    for key, target in model.state_dict().items():
        if target.dim() == 0:
            merged[key] = states[0][key].clone()  # a shared counter (num_batches_tracked)
        else:
            per = (target.shape[0] // s, *target.shape[1:])
            merged[key] = torch.cat([st[key].reshape(per) for st in states])
    model.load_state_dict(merged)
    return model if generators is None else seed_streams(model, generators)


def seed_state_dict(model: SeedStack, seed_index: int, like: PaperNet) -> dict[str, Tensor]:
    """The state dict of seed ``seed_index``'s own network, shaped as ``like``'s (the inverse of
    :func:`stack` for one seed)."""
    out = {}
    ref = like.state_dict()
    for key, t in model.state_dict().items():
        out[key] = t.clone() if t.dim() == 0 else \
            t.chunk(model.seeds)[seed_index].reshape(ref[key].shape).clone()
    return out


def stack_inputs(x: Tensor) -> Tensor:
    """``(S, N, C, H, W)`` (seed s's batch at ``x[s]``) -> ``(N, S*C, H, W)``, a stack's input."""
    s, n, c, h, w = x.shape
    return x.transpose(0, 1).reshape(n, s * c, h, w)


if __name__ == "__main__":  # a library module: run as a command, it did nothing and exited 0
    raise SystemExit("experiments.seed_stack is a part of python -m experiments.classify_gpu, "
                     "not a command of its own; run that (its --help lists the options)")
