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
in that state. ``torch.compile`` cannot trace a draw from a ``torch.Generator`` (each would be a
graph break): :func:`draw_ahead` makes the next forward's draws beforehand, eagerly, the same
numbers in the same order, and the forward then only reads them.

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

__all__ = ["STACKABLE", "SeedDropout", "SeedNoise", "SeedStack", "draw_ahead",
           "seed_state_dict", "seed_streams", "stack", "stack_inputs"]

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


def _blocks(shape: tuple[int, ...], generators: list[torch.Generator],
            draw: Callable[[tuple[int, ...], torch.Generator], Tensor]) -> Tensor:
    """``draw(block, g)`` for each seed's channel block of a tensor of ``shape``, seed s's from
    ``generators[s]``, side by side along the channels (dim 1)."""
    block = (shape[0], shape[1] // len(generators), *shape[2:])
    if len(generators) == 1:
        return draw(block, generators[0])
    return torch.cat([draw(block, g) for g in generators], dim=1)


# what draw_ahead looked up a layer's input by: the model's input and the autocast around it
_Key = tuple[tuple[int, ...], torch.dtype, torch.device, bool, torch.dtype]
# a layer's input: shape, dtype, device
_Input = tuple[tuple[int, ...], torch.dtype, torch.device]


class _SeedDraws(nn.Module):
    """What :class:`SeedNoise` and :class:`SeedDropout` share: one generator per seed, and the
    draws :func:`draw_ahead` made for the next forward."""

    def __init__(self, generators: list[torch.Generator]) -> None:
        super().__init__()
        self.generators = generators
        self._ahead: Tensor | None = None  # the next forward's draws, made by draw_ahead
        self._label = type(self).__name__  # draw_ahead names it as its model's child
        self._armed: _Key | None = None  # draw_ahead had no input for this key: record it
        self._inputs: dict[_Key, _Input] = {}  # recorded at forwards that drew in the layer

    def _active(self) -> bool:
        raise NotImplementedError

    def _disarm(self) -> None:
        """An inactive forward (eval) records nothing: the input that a later training forward
        gets need not be the one :func:`draw_ahead` was called on."""
        if self._armed is not None:
            self._armed = None

    def _draw(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        raise NotImplementedError

    def _drawn(self, x: Tensor) -> Tensor:
        """The draws for input ``x``: those :func:`draw_ahead` made, else drawn now."""
        ahead, self._ahead = self._ahead, None  # each draw serves one forward
        if ahead is None:
            if self._armed is not None:
                self._inputs[self._armed] = (tuple(x.shape), x.dtype, x.device)
                self._armed = None
            return self._draw(tuple(x.shape), x.dtype, x.device)
        if ahead.shape != x.shape or ahead.dtype != x.dtype or ahead.device != x.device:
            raise WnormError(
                f"seed_stack: {self._label} ({type(self).__name__}) got an input "
                f"{tuple(x.shape)} {x.dtype} on {x.device}, but draw_ahead drew for "
                f"{tuple(ahead.shape)} {ahead.dtype} on {ahead.device}; pass draw_ahead the "
                "input of the forward that follows it, in the same autocast")
        return ahead


class SeedNoise(_SeedDraws):
    """:class:`~experiments.nets.GaussianNoise` (``x + sigma * N(0, 1)`` in training) with seed
    s's channel block drawn from ``generators[s]``."""

    def __init__(self, sigma: float, generators: list[torch.Generator]) -> None:
        super().__init__(generators)
        self.sigma = sigma

    def _active(self) -> bool:
        return self.training and self.sigma > 0

    def _draw(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        return _blocks(shape, self.generators, lambda block, g: torch.randn(
            block, generator=g, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        if not self._active():
            self._disarm()
            return x
        return x + self.sigma * self._drawn(x)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, seeds={len(self.generators)}"


class SeedDropout(_SeedDraws):
    """``nn.Dropout(p)`` with seed s's channel block's mask drawn from ``generators[s]``: the
    mask is ``bernoulli_(1 - p)`` scaled by ``1 / (1 - p)``, as ``F.dropout`` computes it on a
    CPU."""

    def __init__(self, p: float, generators: list[torch.Generator]) -> None:
        super().__init__(generators)
        self.p = p

    def _active(self) -> bool:
        return self.training and self.p > 0

    def _draw(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        keep = 1.0 - self.p
        return _blocks(shape, self.generators, lambda block, g: torch.empty(
            block, device=device, dtype=dtype).bernoulli_(keep, generator=g).div_(keep))

    def forward(self, x: Tensor) -> Tensor:
        if not self._active():
            self._disarm()
            return x
        return x * self._drawn(x)

    def extra_repr(self) -> str:
        return f"p={self.p}, seeds={len(self.generators)}"


def draw_ahead(model: nn.Module, x: Tensor) -> nn.Module:
    """Draw now, eagerly, the input noise and dropout masks of ``model``'s next forward on
    ``x``: the :class:`SeedNoise` and :class:`SeedDropout` layers of ``model`` (a
    :func:`seed_streams` model, or one holding it: a compiled one too) in the order they are
    registered, which is a stack's forward order (a model that calls them in another order
    would get other numbers than its forward draws), each seed's from its generator, the numbers
    the forward would draw itself; that forward then reads them and draws nothing, so
    ``torch.compile`` traces it whole. Returns ``model``.

    Each layer's input shape and dtype (autocast may change the dtype) are recorded at the
    first forward after a call on an input of a new shape, dtype, device or autocast: that
    forward still draws in its layers (compiled, it breaks its graph there, as without this
    function); the later ones on such inputs read what this function drew. In eval mode
    nothing is drawn, and an eval forward after a call that would record records nothing.
    Call it under the autocast of the forward that follows. A call drops the draws of an
    earlier one that no forward used (the generators stay where that call left them). A
    forward without a call before it draws in its layers, as always.

    Raises:
        WnormError: from the forward, naming the layer, when its input is not the one the draws
            were made for (the forward ran on another input than ``x``).

    Example:
        >>> nets = [PaperNet("weightnorm", in_channels=1, width=0.05) for _ in range(2)]
        >>> streams = [torch.Generator().manual_seed(s) for s in range(2)]
        >>> model, x = stack(nets, streams), torch.randn(4, 2, 28, 28)
        >>> out = draw_ahead(model, x)(x)  # a new input: drawn in the layers, and recorded
        >>> compiled = torch.compile(model, backend="eager")
        >>> _ = draw_ahead(model, x)  # drawn here, eagerly
        >>> out = compiled(x)  # reads them: one graph, no break
    """
    # every such layer however deep (a model wrapped in a Sequential, a compiled one's
    # _orig_mod), in the order they were registered, which is a stack's forward order
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _SeedDraws)]
    for name, m in layers:
        m._ahead, m._armed, m._label = None, None, f"{type(model).__name__}[{name}]"
    active = [m for _, m in layers if m._active()]
    device = x.device.type
    key = (tuple(x.shape), x.dtype, x.device, torch.is_autocast_enabled(device),
           torch.get_autocast_dtype(device))
    if any(key not in m._inputs for m in active):  # all or none: the draws keep their order
        for m in active:
            m._armed = key
        return model
    for m in active:
        m._ahead = m._draw(*m._inputs[key])
    return model


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
