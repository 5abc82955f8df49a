"""The variants, the cases (one table row each), their sizes and the issue's targets.

Variants (one model each, built from the same seed; layers followed by a normalization layer
have no bias):
    plain        no normalization
    wnorm        ``wnorm.apply(model)`` (the drop-in path: weight norm in the autograd graph)
    torch-new    ``torch.nn.utils.parametrizations.weight_norm`` on every Linear/Conv/ConvTranspose
    torch-old    ``torch.nn.utils.weight_norm`` (the deprecated hook API) on the same layers
    batchnorm    BatchNorm after each conv / hidden linear
    wn+meanonly  ``wnorm.apply`` + ``wnorm.MeanOnlyBatchNorm1d/2d`` after each conv / hidden linear

Every variant of a training case trains with the same ``torch.optim`` optimizer as plain:
Adam with ``fused=True`` (torch's one-kernel step, on CPU and CUDA), and on the CPU MLP rows
also SGD (momentum 0.9), with and without ``fused=True``. PyTorch's two weight norms take
their default ``dim=0``, as users call them (for ConvTranspose that is the input-channel axis;
wnorm normalizes per output unit): the cost is the same number of passes over the weight.

Case kinds:
    train         zero_grad, forward, loss, backward, optimizer step
    infer         ``model.eval()`` forward under ``torch.no_grad`` (no fold, no cache)
    infer-cached  the same inside one ``wnorm.cached()`` block held over all timed calls (and
                  ``torch.nn.utils.parametrize.cached()`` for torch-new, PyTorch's equivalent)
    data_init     ``wnorm.data_init(model, batch)``, as a multiple of one no_grad forward of
                  the plain model on the same batch (the ``plain`` column)
    memory        peak memory of one training step (CUDA only), ratio to plain
Any case can run under ``torch.compile(model)`` (the optimizer step stays eager): ratios are
then to the compiled plain model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import wnorm

from .hifigan import HOP, Generator
from .models import convnet, mlp

__all__ = ["VARIANTS", "Sizes", "Case", "Step", "NotApplicable", "SIZES", "cases", "build",
           "make_step", "inputs", "skip_reason"]

VARIANTS = ("plain", "wnorm", "torch-new", "torch-old", "batchnorm", "wn+meanonly")
WN = ("wnorm", "wn+meanonly")
CACHED = ("plain", "wnorm", "torch-new", "wn+meanonly")
DATA_INIT = ("plain", "wnorm", "wn+meanonly")
COMPILED = ("plain", "wnorm", "torch-new")
#: the CPU's compiled rows also show the batch-norm variants (compiling costs minutes there,
#: which a GPU lease of 10 minutes per call cannot spare)
COMPILED_CPU = COMPILED + ("batchnorm", "wn+meanonly")

#: Issue 16's targets for the ratio to plain, by the device whose rows they are.
TARGETS: dict[str, dict[str, dict[str, float]]] = {
    "cuda": {
        "train": {"wnorm": 1.02, "wn+meanonly": 1.10},
        "infer": {"wnorm": 1.01},
        "infer-cached": {"wnorm": 1.01},
        "compile": {"wnorm": 1.02},
        "memory": {"wnorm": 1.10},
        "data_init": {"wnorm": 2.0, "wn+meanonly": 2.0},
    },
    "cpu": {
        "mlp.train": {"wnorm": 1.10},
        "convnet.train": {"wnorm": 1.02},
        "infer": {"wnorm": 1.03},
        "infer-cached": {"wnorm": 1.03},
    },
}


@dataclass(frozen=True)
class Sizes:
    """Model sizes and batches of one device's rows."""

    conv_width: float  # x the paper's channels (96/192)
    conv_train_batch: int
    conv_infer_batches: tuple[int, ...]
    mlp_width: int
    mlp_train_batches: tuple[int, ...]
    mlp_infer_batches: tuple[int, ...]
    hifi_width: float  # x V1's 512 initial channels
    hifi_train: tuple[int, int]  # (batch, mel frames); 256 samples per frame
    hifi_infer: tuple[int, int]


#: Full sizes per device's rows (the CPU convnet width is chosen by bench.run unless given),
#: and tiny ones for ``--quick``, which only checks that everything runs.
SIZES = {
    "cuda": Sizes(1.0, 100, (100,), 1024, (256,), (256,), 1.0, (16, 32), (1, 32)),
    "cpu": Sizes(0.25, 100, (1, 32), 256, (1, 32), (1, 32), 0.25, (2, 16), (1, 16)),
    "quick-cuda": Sizes(1 / 16, 100, (100,), 64, (256,), (256,), 1 / 16, (16, 2), (1, 2)),
    "quick-cpu": Sizes(1 / 16, 100, (1, 32), 256, (1, 32), (1, 32), 1 / 16, (2, 2), (1, 2)),
}


@dataclass
class Case:
    """One row of the table: a model, a workload and the variants that run it."""

    name: str
    model: str  # "convnet" | "mlp" | "hifigan"
    kind: str  # "train" | "infer" | "infer-cached" | "data_init" | "memory"
    batch: int
    frames: int = 0  # hifigan: mel frames per example
    opt: str = ""  # "adam-fused" | "sgd" | "sgd-fused" (train, memory)
    bf16: bool = False
    compile: bool = False
    variants: tuple[str, ...] = VARIANTS
    targets: dict[str, float] = field(default_factory=dict)


class NotApplicable(Exception):
    """A variant that cannot run a case (e.g. BatchNorm training at batch 1)."""


def skip_reason(case: Case, device: str) -> str | None:
    """Why ``case`` cannot run on ``device`` at all (``None``: it can)."""
    if case.kind == "memory" and not device.startswith("cuda"):
        return "peak memory is measured with torch.cuda.max_memory_allocated: needs CUDA"
    return None


def _label(model: str, sizes: Sizes) -> str:
    return f"mlp4x{sizes.mlp_width}" if model == "mlp" else model


def cases(rows: str, sizes: Sizes, *, compile: bool | None = None) -> list[Case]:
    """The cases of ``rows`` ("cpu" or "cuda") at ``sizes``, in run order.

    ``compile`` adds the ``torch.compile`` rows (default: on for CUDA rows, off for CPU).
    """
    cuda = rows == "cuda"
    tg = TARGETS[rows]
    compile = cuda if compile is None else compile
    out: list[Case] = []
    hb, hf = sizes.hifi_train
    hifi = f"hifigan.train.adam-fused.b{hb}x{hf * HOP}"

    def row(name: str, model: str, kind: str, batch: int, **kw: Any) -> None:
        out.append(Case(name, model, kind, batch, **kw))

    # training
    cb = sizes.conv_train_batch
    if cuda:
        for bf16 in (False, True):
            row(f"convnet.train.adam-fused.b{cb}" + ".bf16" * bf16, "convnet", "train", cb,
                opt="adam-fused", bf16=bf16, targets=tg["train"])
        row(hifi + ".bf16", "hifigan", "train", hb, frames=hf, opt="adam-fused", bf16=True,
            targets=tg["train"])
        for b in sizes.mlp_train_batches:
            row(f"{_label('mlp', sizes)}.train.adam-fused.b{b}", "mlp", "train", b,
                opt="adam-fused", targets=tg["train"])
    else:
        for opt in ("sgd", "sgd-fused", "adam-fused"):
            for b in sizes.mlp_train_batches:
                row(f"{_label('mlp', sizes)}.train.{opt}.b{b}", "mlp", "train", b, opt=opt,
                    targets=tg["mlp.train"])
        row(f"convnet.train.adam-fused.b{cb}", "convnet", "train", cb, opt="adam-fused",
            targets=tg["convnet.train"])
        row(hifi, "hifigan", "train", hb, frames=hf, opt="adam-fused")

    # inference, then the same inside the explicit cache
    ib, inf = sizes.hifi_infer
    for kind, variants in (("infer", VARIANTS), ("infer-cached", CACHED)):
        for b in sizes.mlp_infer_batches:
            row(f"{_label('mlp', sizes)}.{kind}.b{b}", "mlp", kind, b, variants=variants,
                targets=tg[kind])
        for b in sizes.conv_infer_batches:
            row(f"convnet.{kind}.b{b}", "convnet", kind, b, variants=variants, targets=tg[kind])
        row(f"hifigan.{kind}.b{ib}x{inf * HOP}", "hifigan", kind, ib, frames=inf,
            variants=variants, targets=tg[kind])

    # data-dependent init, in units of one forward pass
    di = tg.get("data_init", {})
    row(f"{_label('mlp', sizes)}.data_init.b{max(sizes.mlp_train_batches)}", "mlp", "data_init",
        max(sizes.mlp_train_batches), variants=DATA_INIT, targets=di)
    row(f"convnet.data_init.b{cb}", "convnet", "data_init", cb, variants=DATA_INIT, targets=di)
    row(f"hifigan.data_init.b{hb}x{hf * HOP}", "hifigan", "data_init", hb, frames=hf,
        variants=DATA_INIT, targets=di)

    # peak training memory (CUDA rows)
    if cuda:
        for c in [c for c in out if c.kind == "train"]:
            row(c.name.replace(".train.", ".memory."), c.model, "memory", c.batch,
                frames=c.frames, opt=c.opt, bf16=c.bf16, targets=tg["memory"])

    # torch.compile(model) training, ratio to compiled plain
    if compile:
        ctg = tg.get("compile", {})
        compiled = COMPILED if cuda else COMPILED_CPU
        for bf16 in ((False, True) if cuda else (False,)):
            row(f"convnet.train.adam-fused.b{cb}" + ".bf16" * bf16 + ".compile", "convnet",
                "train", cb, opt="adam-fused", bf16=bf16, compile=True, variants=compiled,
                targets=ctg)
        b = max(sizes.mlp_train_batches)
        row(f"{_label('mlp', sizes)}.train.adam-fused.b{b}.compile", "mlp", "train", b,
            opt="adam-fused", compile=True, variants=compiled, targets=ctg)
    return out


# --------------------------------------------------------------------------- models
def _reparameterized(net: nn.Module) -> list[nn.Module]:
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d)
    return [m for m in net.modules() if isinstance(m, kinds)]


def build(model: str, variant: str, sizes: Sizes, device: str) -> nn.Module:
    """One ``model`` ("convnet"/"mlp"/"hifigan") in ``variant``, seeded so variants start alike."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    norm = {"batchnorm": "bn", "wn+meanonly": "meanonly"}.get(variant, "none")
    torch.manual_seed(0)
    if model == "convnet":
        net: nn.Module = convnet(sizes.conv_width, norm)
    elif model == "mlp":
        net = mlp(sizes.mlp_width, 4, norm)
    elif model == "hifigan":
        net = Generator(sizes.hifi_width, norm)
    else:
        raise ValueError(f"model must be 'convnet', 'mlp' or 'hifigan'; got {model!r}")
    if variant in WN:
        wnorm.apply(net)
    elif variant == "torch-new":
        for m in _reparameterized(net):
            torch.nn.utils.parametrizations.weight_norm(m)
    elif variant == "torch-old":
        with warnings.catch_warnings():  # deprecated in favour of parametrizations
            warnings.simplefilter("ignore", FutureWarning)
            for m in _reparameterized(net):
                torch.nn.utils.weight_norm(m)
    return net.to(device)


def inputs(case: Case, sizes: Sizes, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch and its target: labels, or for HiFi-GAN a waveform."""
    g = torch.Generator().manual_seed(1)
    b = case.batch
    if case.model == "hifigan":
        x = torch.randn(b, 80, case.frames, generator=g)
        y = torch.rand(b, 1, case.frames * HOP, generator=g) * 2 - 1
    else:
        shape = (b, 3, 32, 32) if case.model == "convnet" else (b, sizes.mlp_width)
        x = torch.randn(shape, generator=g)
        y = torch.randint(0, 10, (b,), generator=g)
    return x.to(device), y.to(device)


def _optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "adam-fused":
        return torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, fused=True)
    if name in ("sgd", "sgd-fused"):
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=name == "sgd-fused")
    raise ValueError(f"optimizer must be 'adam-fused', 'sgd' or 'sgd-fused'; got {name!r}")


def _cache_context(variant: str) -> contextlib.AbstractContextManager[Any]:
    if variant in WN:
        return wnorm.cached()
    if variant == "torch-new":
        return torch.nn.utils.parametrize.cached()
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- steps
@dataclass
class Step:
    """What one timed call runs, a description, and a context held around all timed calls."""

    fn: Callable[[], Any]
    what: str
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext


def make_step(case: Case, variant: str, sizes: Sizes, device: str) -> Step:
    """The callable one timed call runs, or raises :class:`NotApplicable` with the reason."""
    train_like = case.kind in ("train", "memory")
    if train_like and variant in ("batchnorm", "wn+meanonly") and case.batch == 1:
        # one value per channel: its batch mean is itself (both refuse it)
        raise NotApplicable("a batch norm (BatchNorm, mean-only) cannot train on a batch of 1")
    net = build(case.model, variant, sizes, device)
    x, y = inputs(case, sizes, device)
    amp: Callable[[], contextlib.AbstractContextManager[Any]] = (
        (lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)) if case.bf16
        else contextlib.nullcontext)
    loss_fn = F.l1_loss if case.model == "hifigan" else F.cross_entropy
    fwd: Callable[..., torch.Tensor] = torch.compile(net) if case.compile else net
    prefix = "torch.compile(model); " if case.compile else ""
    prefix += "bf16 autocast; " if case.bf16 else ""

    if train_like:
        net.train()
        opt = _optimizer(case.opt, net.parameters())

        def train() -> None:
            opt.zero_grad(set_to_none=True)
            with amp():
                loss = loss_fn(fwd(x), y)
            loss.backward()
            opt.step()

        how = f"torch.optim.{type(opt).__name__}" + ("(fused=True)" if "fused" in case.opt else "")
        loss_name = "L1 to a waveform" if case.model == "hifigan" else "cross-entropy"
        return Step(train, f"{prefix}train step ({how}): zero_grad, forward, {loss_name}, "
                           "backward, step")
    if case.kind in ("infer", "infer-cached"):
        net.eval()

        def infer() -> None:
            with torch.no_grad(), amp():
                fwd(x)

        if case.kind == "infer":
            return Step(infer, f"{prefix}model.eval() forward under torch.no_grad (no fold)")
        ctx = {"torch-new": "torch.nn.utils.parametrize.cached()"}.get(variant, "wnorm.cached()")
        return Step(infer, f"{prefix}model.eval() forward under torch.no_grad, all timed calls "
                           f"inside one {ctx}", lambda: _cache_context(variant))
    if case.kind == "data_init":
        net.train()
        if variant == "plain":
            def forward() -> None:
                with torch.no_grad():
                    net(x)

            return Step(forward, "one forward pass (no_grad, train mode) of the plain model")

        def init() -> None:
            wnorm.data_init(net, x)

        return Step(init, "wnorm.data_init(model, batch)")
    raise ValueError(f"unknown case kind {case.kind!r}")

