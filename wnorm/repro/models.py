r"""The paper's CIFAR-10 network (section 5), in the five normalizer variants compared.

.. code-block:: text

    GaussianNoise(0.15)                               (training only)
    3 x [conv 3x3, 96w,  pad 1] ; maxpool 2 ; dropout 0.5
    3 x [conv 3x3, 192w, pad 1] ; maxpool 2 ; dropout 0.5
    conv 3x3, 192w, valid ; 2 x [NiN: conv 1x1, 192w]
    global average pool ; dense 10
    leaky ReLU (slope 0.1) after every conv

``w`` is the width multiplier (1.0 = the paper). Inputs: 1 or 3 channels, 28x28 or 32x32 (any
size >= 12 works: 28 -> 14 -> 7 -> 5, 32 -> 16 -> 8 -> 6 before the global pool).

Variants (``VARIANTS``), "every layer gets the chosen normalizer":

============== ============================================= ==========================
variant        layers                                        init (on 500 examples)
============== ============================================= ==========================
normal         plain Conv/Linear                             data init, include_plain
weightnorm     ``wnorm.apply``                               data init
batchnorm      plain + BatchNorm after each conv and dense   none (BN standardizes)
wn+meanonly    WN + MeanOnlyBatchNorm after each conv, dense data init
meanonly       plain + MeanOnlyBatchNorm after each conv,    data init, include_plain
               dense
============== ============================================= ==========================

Every weight starts as :math:`N(0, 0.05^2)`, every bias at 0, as in the authors' code. A layer
followed by a normalizer has no bias (the normalizer's own bias replaces it). ``meanonly`` gets
the data init of ``normal`` because mean-only BN does not rescale: without it, a 0.05-std init
shrinks the signal layer by layer whenever the fan-in is below :math:`1/0.05^2 = 400` (at
width 0.125 the logits come out with std about 1e-5), and the comparison would measure that.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import wnorm
from wnorm import WnormError

__all__ = ["VARIANTS", "GaussianNoise", "PaperNet", "build", "initialize", "uses_data_init"]

VARIANTS = ("normal", "weightnorm", "batchnorm", "wn+meanonly", "meanonly")
_WN = {"weightnorm", "wn+meanonly"}
_DATA_INIT = {"normal", "weightnorm", "wn+meanonly", "meanonly"}
_NORM: dict[str, tuple[type[nn.Module], type[nn.Module]] | None] = {
    "normal": None,
    "weightnorm": None,
    "batchnorm": (nn.BatchNorm2d, nn.BatchNorm1d),
    "wn+meanonly": (wnorm.MeanOnlyBatchNorm2d, wnorm.MeanOnlyBatchNorm1d),
    "meanonly": (wnorm.MeanOnlyBatchNorm2d, wnorm.MeanOnlyBatchNorm1d),
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
                layers.append(norm[0](cout))
            layers.append(nn.LeakyReLU(slope))
            return layers

        layers: list[nn.Module] = [GaussianNoise(noise)]
        layers += conv(in_channels, c1, 3, 1) + conv(c1, c1, 3, 1) + conv(c1, c1, 3, 1)
        layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
        layers += conv(c1, c2, 3, 1) + conv(c2, c2, 3, 1) + conv(c2, c2, 3, 1)
        layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
        layers += conv(c2, c2, 3, 0) + conv(c2, c2, 1, 0) + conv(c2, c2, 1, 0)
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, num_classes,
                                                                    bias=norm is None)]
        if norm is not None:
            layers.append(norm[1](num_classes))
        super().__init__(*layers)
        self.variant = variant
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.normal_(0.0, 0.05)
                    if m.bias is not None:
                        m.bias.zero_()
        if variant in _WN:
            wnorm.apply(self)


def build(variant: str, in_channels: int, width: float, **kwargs: float) -> PaperNet:
    """:class:`PaperNet` for ``variant`` (not yet data-initialized: see :func:`initialize`)."""
    return PaperNet(variant, in_channels=in_channels, width=width, **kwargs)


def initialize(model: PaperNet, batch: Tensor, init_scale: float = 1.0) -> str:
    """The variant's init on ``batch`` (the paper: 500 training examples), in training mode as
    in the authors' init pass (noise and dropout on). Returns a one-line summary for the log.

    Under ``torch.distributed`` call it on every rank with that rank's share of the batch:
    :func:`wnorm.data_init` all-reduces the statistics, so every rank gets the same ``g``, ``b``.
    """
    if not uses_data_init(model.variant):
        return f"{model.variant}: no data-dependent init"
    was_training = model.training
    model.train()
    try:
        report = wnorm.data_init(model, batch, init_scale=init_scale,
                                 include_plain=model.variant not in _WN)
    finally:
        model.train(was_training)
    return (f"{model.variant}: data init on {batch.shape[0]} examples, "
            f"{len(report.initialized)} layers initialized, {len(report.skipped)} skipped")
