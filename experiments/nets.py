r"""The paper's CIFAR-10 network (section 5), in the paper's five normalizer variants and four
relatives.

.. code-block:: text

    GaussianNoise(0.15)                               (training only)
    3 x [conv 3x3, 96w,  pad 1] ; maxpool 2 ; dropout 0.5
    3 x [conv 3x3, 192w, pad 1] ; maxpool 2 ; dropout 0.5
    conv 3x3, 192w, valid ; 2 x [NiN: conv 1x1, 192w]
    global average pool ; dense 10
    leaky ReLU (slope 0.1) after every conv

``w`` is the width multiplier (1.0 = the paper). Inputs: 1 or 3 channels, 28x28 or 32x32 (any
size >= 12 works: 28 -> 14 -> 7 -> 5, 32 -> 16 -> 8 -> 6 before the global pool).

Variants (``VARIANTS``), "every layer gets the chosen normalizer"; the first five are the
paper's, the last five (``RELATIVES``) weight normalization's relatives:

============== ============================================= ==========================
variant        layers                                        init (on 500 examples)
============== ============================================= ==========================
normal         plain Conv/Linear                             data init, include_plain
weightnorm     ``wnorm.apply``                               data init
batchnorm      plain + BatchNorm after each conv and dense   none (BN standardizes)
wn+meanonly    WN + MeanOnlyBatchNorm after each conv, dense data init
meanonly       plain + MeanOnlyBatchNorm after each conv,    data init, include_plain
               dense
centered       ``wnorm.centered_weight_norm`` (Huang et al.)  data init
ws+gn          ``wnorm.weight_standardization`` on each conv none (GN standardizes)
               + GroupNorm after it (Qiao et al.); plain
               dense layer
forced         ``wnorm.forced_weight_norm``, learned g       data init
               (EDM2, Karras et al.)
balanced       ``wnorm.balanced_weight_norm`` (Defazio &     data init
               Bottou)
arpit          ``wnorm.apply`` (weight norm)                 ``wnorm.arpit_init``: no data
============== ============================================= ==========================

Every weight starts as :math:`N(0, 0.05^2)`, every bias at 0, as in the authors' code. A layer
followed by a normalizer has no bias (the normalizer's own bias replaces it). ``meanonly`` gets
the data init of ``normal`` because mean-only BN does not rescale: without it, a 0.05-std init
shrinks the signal layer by layer whenever the fan-in is below :math:`1/0.05^2 = 400` (at
width 0.125 the logits come out with std about 1e-5), and the comparison would measure that.

``ws+gn``: weight standardization has no g, so the scale is left to the GroupNorm after each conv
(:math:`\gcd(C, 32)` groups: Qiao et al.'s 32 at full width, 4 groups of 3 channels for 12
channels at width 0.125); the dense classifier is plain, as in their networks (a standardized
dense layer with nothing after it would fix the logits' scale at :math:`\sqrt{\text{fan-in}}`).
``arpit`` gets orthogonal ``v``, zero biases and :math:`g = \sqrt{2\,\text{fan-in}/\text{fan-out}}`
(:math:`\sqrt{\text{fan-in}/\text{fan-out}}` for the classifier), from the weights alone.

:class:`MLP` is a small fully connected network for the learning-rate sweep
(:mod:`experiments.lr_sweep`) in the variants that need no normalization layer.

Only wnorm's public API is used: ``wnorm.apply`` (and the relatives' functions), ``data_init``,
``arpit_init``, the mean-only BN layers; training is then any torch.optim optimizer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import wnorm
from wnorm import WnormError

__all__ = ["VARIANTS", "PAPER_VARIANTS", "RELATIVES", "MLP_VARIANTS", "METHODS", "GaussianNoise",
           "MLP",
           "PaperNet", "build", "initialize", "uses_data_init", "reparameterized_layers"]

PAPER_VARIANTS = ("normal", "weightnorm", "batchnorm", "wn+meanonly", "meanonly")
RELATIVES = ("centered", "ws+gn", "forced", "balanced", "arpit")
VARIANTS = PAPER_VARIANTS + RELATIVES
#: The variants an :class:`MLP` comes in (those without a normalization layer).
MLP_VARIANTS = ("normal", "weightnorm", "centered", "forced", "balanced", "arpit")
#: variant -> the public wnorm function that reparameterizes its layers (via ``wnorm.apply``)
METHODS = {
    "weightnorm": wnorm.weight_norm,
    "wn+meanonly": wnorm.weight_norm,
    "centered": wnorm.centered_weight_norm,
    "ws+gn": wnorm.weight_standardization,
    "forced": wnorm.forced_weight_norm,
    "balanced": wnorm.balanced_weight_norm,
    "arpit": wnorm.weight_norm,
}
_DATA_INIT = {"normal", "weightnorm", "wn+meanonly", "meanonly", "centered", "forced",
              "balanced"}
_PLAIN = {"normal", "meanonly"}  # data init scales the plain weights (include_plain)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 32), channels)


_NORM: dict[str, tuple[type[nn.Module] | object, type[nn.Module] | None] | None] = {
    "normal": None,
    "weightnorm": None,
    "batchnorm": (nn.BatchNorm2d, nn.BatchNorm1d),
    "wn+meanonly": (wnorm.MeanOnlyBatchNorm2d, wnorm.MeanOnlyBatchNorm1d),
    "meanonly": (wnorm.MeanOnlyBatchNorm2d, wnorm.MeanOnlyBatchNorm1d),
    "centered": None,
    "ws+gn": (_group_norm, None),  # None: the dense layer keeps its bias and no normalizer
    "forced": None,
    "balanced": None,
    "arpit": None,
}


class GaussianNoise(nn.Module):
    """``x + sigma * N(0, 1)`` in training, identity in eval."""

    def __init__(self, sigma: float = 0.15) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.sigma > 0:
            return x + self.sigma * torch.randn_like(x)
        return x

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise WnormError(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}")


def uses_data_init(variant: str) -> bool:
    """Whether ``variant`` gets the paper's data-dependent init before training."""
    _check_variant(variant)
    return variant in _DATA_INIT


class PaperNet(nn.Sequential):
    """The section-5 network: ``(N, in_channels, H, W) -> (N, num_classes)`` logits.

    Args:
        variant: one of :data:`VARIANTS`.
        in_channels: 1 (Fashion-MNIST) or 3 (CIFAR-10).
        width: multiplier on the 96/192 channels (at least 1 channel each).
        num_classes: outputs of the dense layer (default 10).
        noise: std of the Gaussian input noise (default 0.15).
        dropout: dropout probability after each pool (default 0.5).
        slope: leaky ReLU negative slope (default 0.1).

    Example:
        >>> net = PaperNet("weightnorm", in_channels=1, width=0.1)
        >>> net(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        variant: str,
        in_channels: int = 3,
        width: float = 1.0,
        num_classes: int = 10,
        noise: float = 0.15,
        dropout: float = 0.5,
        slope: float = 0.1,
    ) -> None:
        _check_variant(variant)
        if width <= 0:
            raise WnormError(f"PaperNet: width must be positive; got {width}")
        c1, c2 = max(1, round(96 * width)), max(1, round(192 * width))
        norm = _NORM[variant]

        def conv(cin: int, cout: int, k: int, pad: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=pad, bias=norm is None)]
            if norm is not None:
                layers.append(norm[0](cout))  # type: ignore[operator]
            layers.append(nn.LeakyReLU(slope))
            return layers

        layers: list[nn.Module] = [GaussianNoise(noise)]
        layers += conv(in_channels, c1, 3, 1) + conv(c1, c1, 3, 1) + conv(c1, c1, 3, 1)
        layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
        layers += conv(c1, c2, 3, 1) + conv(c2, c2, 3, 1) + conv(c2, c2, 3, 1)
        layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
        layers += conv(c2, c2, 3, 0) + conv(c2, c2, 1, 0) + conv(c2, c2, 1, 0)
        dense_norm = norm[1] if norm is not None else None
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, num_classes,
                                                                    bias=dense_norm is None)]
        if dense_norm is not None:
            layers.append(dense_norm(num_classes))
        super().__init__(*layers)
        self.variant = variant
        _init_and_normalize(self, variant)


def _init_and_normalize(model: nn.Module, variant: str) -> None:
    """Weights :math:`N(0, 0.05^2)`, biases 0 (the authors' code), then the variant's
    reparameterization of every conv and dense layer (``ws+gn``: the convs only)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0.0, 0.05)
                if m.bias is not None:
                    m.bias.zero_()
    if variant in METHODS:  # ws+gn: the convs only (its dense layer stays plain)
        types = (nn.Conv2d,) if variant == "ws+gn" else (nn.Conv2d, nn.Linear)
        wnorm.apply(model, types=types, method=METHODS[variant])


class MLP(nn.Sequential):
    """A small fully connected classifier for the learning-rate sweep:
    ``(N, C, H, W) -> flatten -> [dense hidden, leaky ReLU] x depth -> dense classes``.

    Same init as :class:`PaperNet` (weights :math:`N(0, 0.05^2)`, biases 0, then the variant's
    reparameterization and :func:`initialize`); no noise, no dropout.

    Args:
        variant: one of :data:`MLP_VARIANTS`.
        in_features: inputs per example (784 for Fashion-MNIST).
        hidden: units per hidden layer (default 100).
        depth: hidden layers (default 2).
        num_classes: outputs (default 10).
        slope: leaky ReLU negative slope (default 0.1).

    Example:
        >>> MLP("centered", 784)(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, variant: str, in_features: int, hidden: int = 100, depth: int = 2,
                 num_classes: int = 10, slope: float = 0.1) -> None:
        if variant not in MLP_VARIANTS:
            raise WnormError(f"MLP: unknown variant {variant!r}; expected one of "
                             f"{list(MLP_VARIANTS)}")
        if hidden < 1 or depth < 0:
            raise WnormError(f"MLP: hidden must be >= 1 and depth >= 0; got {hidden}, {depth}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(slope)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
        self.variant = variant
        _init_and_normalize(self, variant)


def build(variant: str, in_channels: int, width: float, **kwargs: float) -> PaperNet:
    """:class:`PaperNet` for ``variant`` (not yet data-initialized: see :func:`initialize`)."""
    return PaperNet(variant, in_channels=in_channels, width=width, **kwargs)


def reparameterized_layers(model: nn.Module) -> dict[str, Tensor]:
    """``{layer name: its v}`` for every conv or dense layer whose ``weight`` wnorm
    reparameterizes (found through the public ``wnorm.is_weight_normalized`` and the
    ``weight_v`` parameter every reparameterization keeps); the output units are along v's
    first axis for these layers."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and wnorm.is_weight_normalized(m, "weight"):
            out[name or "<model>"] = dict(m.named_parameters(recurse=False))["weight_v"]
    return out


def initialize(model: PaperNet | MLP, batch: Tensor, init_scale: float = 1.0) -> str:
    """The variant's init on ``batch`` (the paper: 500 training examples), in training mode as
    in the authors' init pass (noise and dropout on). Returns a one-line summary for the log.
    ``arpit`` is initialized from its weights alone (``batch`` unused).

    Under ``torch.distributed`` call it on every rank with that rank's share of the batch:
    :func:`wnorm.data_init` all-reduces the statistics, so every rank gets the same ``g``, ``b``.
    """
    if model.variant == "arpit":
        gains = wnorm.arpit_init(model)
        return (f"arpit: Arpit et al. init without data, {len(gains)} layers, g from "
                f"{min(gains.values()):.3g} to {max(gains.values()):.3g}")
    if not uses_data_init(model.variant):
        return f"{model.variant}: no data-dependent init"
    was_training = model.training
    model.train()
    try:
        report = wnorm.data_init(model, batch, init_scale=init_scale,
                                 include_plain=model.variant in _PLAIN)
    finally:
        model.train(was_training)
    return (f"{model.variant}: data init on {batch.shape[0]} examples, "
            f"{len(report.initialized)} layers initialized, {len(report.skipped)} skipped")
