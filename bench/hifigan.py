"""HiFi-GAN V1's generator (Kong et al. 2020) in plain PyTorch, for timing only.

The architecture and initialization of the reference implementation (jik876/hifi-gan,
``models.py``, config ``config_v1.json``): ``conv_pre`` 80 -> 512 channels (kernel 7), four
upsampling stages (``ConvTranspose1d`` with rates 8, 8, 2, 2 and kernels 16, 16, 4, 4, the
channels halving 512 -> 256 -> 128 -> 64 -> 32), after each a multi-receptive-field fusion: the
mean of three ``ResBlock1`` (kernels 3, 7, 11, dilations 1, 3, 5), leaky ReLU 0.1 throughout,
then ``conv_post`` (kernel 7) to one channel and tanh. One mel frame becomes 256 samples.

The reference wraps every conv in ``torch.nn.utils.weight_norm``; here every conv is plain, so
the benchmark can normalize it with any method (or put a normalization layer after it, ``norm``).
``width`` scales the channel counts (the CPU rows use a narrower model than the GPU ones).

Example:
    >>> import torch
    >>> g = Generator(width=1 / 16)
    >>> g(torch.randn(2, 80, 3)).shape   # 3 mel frames -> 3 * 256 samples
    torch.Size([2, 1, 768])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import norm_layers

__all__ = ["Generator", "HOP", "LRELU_SLOPE"]

#: samples per mel frame: the product of the upsampling rates
HOP = 8 * 8 * 2 * 2
LRELU_SLOPE = 0.1
UPSAMPLE_RATES = (8, 8, 2, 2)
UPSAMPLE_KERNELS = (16, 16, 4, 4)
RESBLOCK_KERNELS = (3, 7, 11)
RESBLOCK_DILATIONS = ((1, 3, 5), (1, 3, 5), (1, 3, 5))


def _padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


def _init(m: nn.Module) -> None:
    # the reference's init_weights: N(0, 0.01) for every conv it applies it to
    if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
        m.weight.data.normal_(0.0, 0.01)


def _with_norm(conv: nn.Module, norm: str, ch: int) -> nn.Module:
    """``conv`` alone, or ``conv`` followed by a normalization layer (``norm_layers``)."""
    extra = norm_layers(norm, ch, dims=1)
    return nn.Sequential(conv, *extra) if extra else conv


class ResBlock1(nn.Module):
    """``x += c2(lrelu(c1(lrelu(x))))`` for three (c1, c2) pairs; c1 dilated, c2 not."""

    def __init__(self, ch: int, kernel: int, dilations: tuple[int, ...], norm: str = "none"):
        super().__init__()
        bias = norm == "none"
        self.convs1 = nn.ModuleList(
            _with_norm(nn.Conv1d(ch, ch, kernel, 1, dilation=d, padding=_padding(kernel, d),
                                 bias=bias), norm, ch) for d in dilations)
        self.convs2 = nn.ModuleList(
            _with_norm(nn.Conv1d(ch, ch, kernel, 1, dilation=1, padding=_padding(kernel),
                                 bias=bias), norm, ch) for _ in dilations)
        self.apply(_init)

    def forward(self, x: Tensor) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = c1(F.leaky_relu(x, LRELU_SLOPE))
            xt = c2(F.leaky_relu(xt, LRELU_SLOPE))
            x = xt + x
        return x


class Generator(nn.Module):
    """HiFi-GAN V1's generator: mel ``(N, 80, T)`` -> waveform ``(N, 1, 256 T)`` in [-1, 1].

    Args:
        width: channel multiplier (1.0: V1's 512 initial channels).
        norm: ``"none"`` (convs with biases), ``"bn"`` (BatchNorm1d after every conv but
            ``conv_post``) or ``"meanonly"`` (``wnorm.MeanOnlyBatchNorm1d`` there); convs followed
            by a normalization layer have no bias.
        n_mels: input channels.
    """

    def __init__(self, width: float = 1.0, norm: str = "none", n_mels: int = 80):
        super().__init__()
        c0 = max(2 ** len(UPSAMPLE_RATES), round(512 * width))  # >= 1 channel at the end
        bias = norm == "none"
        self.num_kernels = len(RESBLOCK_KERNELS)
        self.conv_pre = _with_norm(nn.Conv1d(n_mels, c0, 7, 1, padding=3, bias=bias), norm, c0)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        ch = c0
        for i, (u, k) in enumerate(zip(UPSAMPLE_RATES, UPSAMPLE_KERNELS)):
            cin, ch = c0 // 2**i, c0 // 2 ** (i + 1)
            up = nn.ConvTranspose1d(cin, ch, k, u, padding=(k - u) // 2, bias=bias)
            _init(up)
            self.ups.append(_with_norm(up, norm, ch))
            for kr, d in zip(RESBLOCK_KERNELS, RESBLOCK_DILATIONS):
                self.resblocks.append(ResBlock1(ch, kr, d, norm))
        self.conv_post = nn.Conv1d(ch, 1, 7, 1, padding=3)
        _init(self.conv_post)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / self.num_kernels
        # the reference's last activation uses F.leaky_relu's default slope, 0.01
        x = self.conv_post(F.leaky_relu(x))
        return torch.tanh(x)
