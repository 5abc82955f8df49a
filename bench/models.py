"""The paper's CIFAR-10 convnet and an MLP, with an optional normalization layer after each layer.

    convnet  the network of the paper's section 5 (3x conv3x3 96, pool, 3x conv3x3 192, pool,
             conv3x3 192 valid, 2x NiN 1x1 192, global average pool, dense 10, leaky ReLU 0.1),
             without dropout and input noise; ``width`` scales the channel counts.
    mlp      ``depth`` Linear layers, ``width`` -> ... -> ``width`` -> 10, leaky ReLU 0.1.

Layers followed by a normalization layer have no bias (the normalizer has one), as in the
paper's code.
"""

from __future__ import annotations

from torch import nn

import wnorm

__all__ = ["norm_layers", "convnet", "mlp"]


def norm_layers(norm: str, ch: int, dims: int) -> list[nn.Module]:
    """``[]`` for ``"none"``, else one BatchNorm (``"bn"``) or mean-only BN (``"meanonly"``)."""
    if norm == "none":
        return []
    if norm == "bn":
        return [{1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](ch)]
    if norm == "meanonly":
        return [{1: wnorm.MeanOnlyBatchNorm1d, 2: wnorm.MeanOnlyBatchNorm2d}[dims](ch)]
    raise ValueError(f"norm must be 'none', 'bn' or 'meanonly'; got {norm!r}")


def convnet(width: float = 1.0, norm: str = "none") -> nn.Sequential:
    """The paper's CIFAR-10 convnet (section 5) at ``width`` x its channel counts."""
    c1, c2 = max(1, round(96 * width)), max(1, round(192 * width))
    bias = norm == "none"
    layers: list[nn.Module] = []

    def conv(cin: int, cout: int, k: int, pad: int) -> None:
        layers.extend([nn.Conv2d(cin, cout, k, padding=pad, bias=bias),
                       *norm_layers(norm, cout, 2), nn.LeakyReLU(0.1)])

    conv(3, c1, 3, 1), conv(c1, c1, 3, 1), conv(c1, c1, 3, 1)
    layers.append(nn.MaxPool2d(2))
    conv(c1, c2, 3, 1), conv(c2, c2, 3, 1), conv(c2, c2, 3, 1)
    layers.append(nn.MaxPool2d(2))
    conv(c2, c2, 3, 0), conv(c2, c2, 1, 0), conv(c2, c2, 1, 0)
    layers.extend([nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 10)])
    return nn.Sequential(*layers)


def mlp(width: int = 256, depth: int = 4, norm: str = "none") -> nn.Sequential:
    """``depth`` Linear layers: ``width`` inputs, ``width`` hidden units, 10 outputs."""
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers.extend([nn.Linear(width, width, bias=norm == "none"),
                       *norm_layers(norm, width, 1), nn.LeakyReLU(0.1)])
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)
