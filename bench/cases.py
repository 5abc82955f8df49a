"""The models, the five variants and the benchmark cases.

Models:
    convnet  the CIFAR-10 network of the paper's section 5 (3x conv3x3 96, pool, 3x conv3x3 192,
             pool, conv3x3 192 valid, 2x NiN 1x1 192, global average pool, dense 10, leaky ReLU
             0.1), without dropout and input noise; ``width`` scales the channel counts.
    mlp      4 Linear layers, 256 -> 256 -> 256 -> 256 -> 10, leaky ReLU 0.1.

Variants (one model each, same seed):
    plain           no normalization
    wnorm           ``wnorm.apply(model)``; training steps with ``wnorm.optim.SGD``/``Adam``
                    (optimizer-side weight norm: plain-layer forward and backward)
    wnorm-autograd  ``wnorm.apply(model)`` trained with ``torch.optim.SGD``/``Adam`` (the
                    drop-in path: weight norm in the autograd graph); train cases only
    plain-fused     the plain model with ``torch.optim.SGD``/``Adam(fused=True)``, PyTorch's own
                    one-kernel CPU step: what plain training costs with the fastest torch
                    optimizer (``plain`` uses torch's default per-parameter loop); train only
    torch        ``torch.nn.utils.parametrizations.weight_norm`` on every Linear/Conv2d
    batchnorm    BatchNorm after each conv / hidden linear
    wn+meanonly  ``wnorm.apply`` + ``wnorm.MeanOnlyBatchNorm`` after each conv / hidden linear,
                 each pair fused by ``wnorm.fuse_mean_only``, trained with ``wnorm.optim`` like
                 ``wnorm``

Layers followed by a normalizer have no bias (the normalizer has one), as in the paper's code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import wnorm

VARIANTS = ("plain", "wnorm", "wnorm-autograd", "plain-fused", "torch", "batchnorm",
            "wn+meanonly")
#: variants of cases that do not train: the optimizer-only variants would repeat others there
NO_TRAIN = tuple(v for v in VARIANTS if v not in ("wnorm-autograd", "plain-fused"))
#: variants that train with wnorm.optim instead of torch.optim
FUSED: tuple[str, ...] = ()  # wnorm.optim is gone: every variant trains with torch.optim

#: The issue's targets for wnorm's ratio to plain (CPU); GPU convnet training gets 1.03.
TARGETS = {
    "convnet.train": {"wnorm": 1.02, "wn+meanonly": 1.05},
    "convnet.train.cuda": {"wnorm": 1.03, "wn+meanonly": 1.05},
    "mlp.train": {"wnorm": 1.15},
    "infer": {"wnorm": 1.03},
    "data_init": {"wnorm": 3.0, "wn+meanonly": 3.0},
}


# --------------------------------------------------------------------------- models
def _norm_layer(norm: str, ch: int, dims: int) -> list[nn.Module]:
    if norm == "bn":
        return [nn.BatchNorm2d(ch) if dims == 2 else nn.BatchNorm1d(ch)]
    if norm == "meanonly":
        return [wnorm.MeanOnlyBatchNorm2d(ch) if dims == 2 else wnorm.MeanOnlyBatchNorm1d(ch)]
    return []


def convnet(width: float = 1.0, norm: str = "none") -> nn.Sequential:
    """The paper's CIFAR-10 convnet (section 5) at ``width`` x its channel counts."""
    c1, c2 = max(1, round(96 * width)), max(1, round(192 * width))
    bias = norm == "none"
    layers: list[nn.Module] = []

    def conv(cin: int, cout: int, k: int, pad: int) -> None:
        layers.extend([nn.Conv2d(cin, cout, k, padding=pad, bias=bias),
                       *_norm_layer(norm, cout, 2), nn.LeakyReLU(0.1)])

    conv(3, c1, 3, 1), conv(c1, c1, 3, 1), conv(c1, c1, 3, 1)
    layers.append(nn.MaxPool2d(2))
    conv(c1, c2, 3, 1), conv(c2, c2, 3, 1), conv(c2, c2, 3, 1)
    layers.append(nn.MaxPool2d(2))
    conv(c2, c2, 3, 0), conv(c2, c2, 1, 0), conv(c2, c2, 1, 0)
    layers.extend([nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 10)])
    return nn.Sequential(*layers)


def mlp(norm: str = "none", width: int = 256, depth: int = 4) -> nn.Sequential:
    """``depth`` Linear layers: ``width`` inputs, ``width`` hidden units, 10 outputs."""
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers.extend([nn.Linear(width, width, bias=norm == "none"),
                       *_norm_layer(norm, width, 1), nn.LeakyReLU(0.1)])
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def build(model: str, variant: str, *, width: float = 1.0, device: str = "cpu") -> nn.Module:
    """One model of ``model`` ("convnet"/"mlp") in ``variant``, seeded so variants start alike."""
    norm = {"batchnorm": "bn", "wn+meanonly": "meanonly"}.get(variant, "none")
    variant = "plain" if variant == "plain-fused" else variant
    torch.manual_seed(0)
    net = convnet(width, norm) if model == "convnet" else mlp(norm)
    if variant in ("wnorm", "wnorm-autograd", "wn+meanonly"):
        wnorm.apply(net)
    if variant == "torch":
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                torch.nn.utils.parametrizations.weight_norm(m)
    return net.to(device)


def inputs(model: str, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (batch, 3, 32, 32) if model == "convnet" else (batch, 256)
    x = torch.randn(shape, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x.to(device), y.to(device)


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One row of the table: a model, a workload and the variants that run it."""

    name: str
    model: str  # "convnet" | "mlp"
    kind: str  # "train" | "infer" | "data_init"
    batch: int
    opt: str = ""  # "sgd" | "adam" for train
    bf16: bool = False
    variants: tuple[str, ...] = VARIANTS
    targets: dict[str, float] = field(default_factory=dict)
    note: str = ""


def cases(device: str) -> list[Case]:
    cuda = device.startswith("cuda")
    out = [
        Case("convnet.train.adam.b100", "convnet", "train", 100, "adam",
             targets=TARGETS["convnet.train.cuda" if cuda else "convnet.train"]),
    ]
    for opt in ("sgd", "adam"):
        for b in (1, 32):
            out.append(Case(f"mlp.train.{opt}.b{b}", "mlp", "train", b, opt,
                            targets=TARGETS["mlp.train"]))
    for model in ("mlp", "convnet"):
        for b in (1, 32):
            out.append(Case(f"{model}.infer.b{b}", model, "infer", b, variants=NO_TRAIN,
                            targets=TARGETS["infer"]))
    di = ("plain", "wnorm", "wn+meanonly")
    note = "plain = one no_grad forward of the plain model; others = wnorm.data_init"
    out += [
        Case("mlp.data_init.b32", "mlp", "data_init", 32, variants=di,
             targets=TARGETS["data_init"], note=note),
        Case("mlp.data_init.b500", "mlp", "data_init", 500, variants=di,
             targets=TARGETS["data_init"], note=note),
        Case("convnet.data_init.b100", "convnet", "data_init", 100, variants=di,
             targets=TARGETS["data_init"], note=note),
    ]
    if cuda:
        out += [
            Case("convnet.train.adam.b100.bf16", "convnet", "train", 100, "adam", bf16=True,
                 targets=TARGETS["convnet.train.cuda"]),
            Case("mlp.train.adam.b32.bf16", "mlp", "train", 32, "adam", bf16=True,
                 targets=TARGETS["mlp.train"]),
            Case("convnet.infer.b32.bf16", "convnet", "infer", 32, bf16=True, variants=NO_TRAIN,
                 targets=TARGETS["infer"]),
        ]
    return out


def make_step(case: Case, variant: str, *, width: float, device: str) -> tuple[Callable[[], Any], str]:
    """The callable that one timed call runs, or raises ``NotApplicable`` with the reason."""
    if case.kind == "train" and variant == "batchnorm" and case.batch == 1:
        raise NotApplicable("BatchNorm cannot train on a batch of 1")
    net = build(case.model, "plain" if case.kind == "data_init" and variant == "plain" else variant,
                width=width, device=device)
    x, y = inputs(case.model, case.batch, device)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if case.bf16
           else contextlib.nullcontext())
    if case.kind == "train":
        net.train()
        opt: torch.optim.Optimizer
        optim: Any = torch.optim
        params: Any = net if variant in FUSED else net.parameters()
        extra: dict[str, Any] = {"fused": True} if variant == "plain-fused" else {}
        if case.opt == "sgd":
            opt = optim.SGD(params, lr=1e-3, momentum=0.9, **extra)
        else:
            opt = optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **extra)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()

        how = (f"wnorm.optim.{type(opt).__name__}" if variant in FUSED
               else f"torch.optim.{type(opt).__name__}" + ("(fused=True)" if extra else ""))
        return step, f"train step ({how}): zero_grad, forward, cross-entropy, backward, step"
    if case.kind == "infer":
        net.eval()

        def step() -> None:
            with torch.no_grad(), amp:
                net(x)

        return step, "model.eval() forward under torch.no_grad (no fold)"
    if case.kind == "data_init":
        net.train()
        if variant == "plain":
            def step() -> None:
                with torch.no_grad():
                    net(x)

            return step, "one forward pass (no_grad, train mode) of the plain model"

        def step() -> None:
            wnorm.data_init(net, x)

        return step, "wnorm.data_init(model, batch)"
    raise ValueError(f"unknown case kind {case.kind!r}")


class NotApplicable(Exception):
    """A variant that cannot run a case (e.g. BatchNorm training at batch 1)."""
