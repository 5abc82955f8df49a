r"""The paper's data-dependent initialization (Salimans & Kingma, 2016, section 3).

For each weight-normalized layer, in the order one forward pass reaches it,

.. math::
    t = \frac{v\cdot x}{\lVert v\rVert},\qquad
    g \leftarrow \frac{s}{\sigma[t]},\qquad b \leftarrow -\mu[t]\,g

(:math:`s` = ``init_scale``), so that the layer's pre-activation
:math:`y = s\,(t-\mu[t])/\sigma[t]` has mean 0 and standard deviation :math:`s` per unit on the
batch, and the next layers see that standardized output in the same pass.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _classes, _held, _pytorch_wn, _slot
from .errors import WnormError, expect_module, refuse_sharded
from .mean_only_bn import MeanOnlyBatchNormBase
from .weight_norm import _is_conv1d, default_dim

__all__ = ["data_init", "InitReport", "LayerInit", "NO_BIAS_NOTE"]

#: :attr:`LayerInit.note` of an initialized layer without a bias: there is no bias to set to
#: :math:`-\mu[t]\,g`, so its pre-activation keeps the mean :math:`\mu[t]\,g` on the batch
#: (a mean-only batch norm after it removes it); only the spread is set to ``init_scale``.
NO_BIAS_NOTE = "no bias: mean not removed"

_INIT_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
#: torch_geometric convolutions whose output scales with their Linears' outputs once the biases
#: inside them are 0 (g of every Linear times c per output channel multiplies that channel of
#: the output by c), and where the bias added after the aggregation lives: the convolution's
#: own ``bias``, or that of the Linear named here.
_PYG_CONVS = {"GCNConv": "", "ChebConv": "", "TAGConv": "", "SAGEConv": "lin_l",
              "GraphConv": "lin_rel", "SGConv": "lin", "ClusterGCNConv": "lin_out",
              "LEConv": "lin3"}
#: those that aggregate their Linears' outputs (the others aggregate their inputs and apply the
#: Linears after): their aggregation must commute with a positive scale per channel
_AGGREGATE_OUTPUTS = {"GCNConv", "LEConv"}
_SCALE_FREE_AGGR = {"SumAggregation", "MeanAggregation", "MaxAggregation", "MinAggregation"}


@dataclass
class LayerInit:
    """What :func:`data_init` did to one layer.

    ``mu`` and ``sigma`` are the per-unit mean and standard deviation of
    :math:`t = v\\cdot x/\\lVert v\\rVert` (of :math:`w\\cdot x` for a plain layer) on the batch,
    before the init; ``None`` for a skipped layer, whose ``reason`` says why. ``note``: what
    an initialized layer's init did not do, e.g. :data:`NO_BIAS_NOTE`.
    """

    name: str
    kind: str
    status: str  # "initialized" | "skipped"
    reason: str = ""
    mu: Tensor | None = field(default=None, repr=False)
    sigma: Tensor | None = field(default=None, repr=False)
    note: str = ""


class InitReport(list[LayerInit]):
    """A list of :class:`LayerInit`, one per candidate layer, in the order the pass reached them."""

    @property
    def initialized(self) -> list[LayerInit]:
        return [r for r in self if r.status == "initialized"]

    @property
    def skipped(self) -> list[LayerInit]:
        return [r for r in self if r.status == "skipped"]

    def __str__(self) -> str:
        rows = ["layer | type | status | mean mu[t] | mean sigma[t]", "---|---|---|---|---"]
        for r in self:
            mu = f"{float(r.mu.mean()):.4g}" if r.mu is not None else ""
            sd = f"{float(r.sigma.mean()):.4g}" if r.sigma is not None else ""
            why = r.reason or r.note
            status = r.status + (f" ({why})" if why else "")
            rows.append(f"{r.name} | {r.kind} | {status} | {mu} | {sd}")
        return "\n".join(rows)


# --------------------------------------------------------------------------- targets
@dataclass
class _Target:
    """One pre-activation to standardize: ``module``'s output, set through the gains of
    ``gains`` (wnorm layers: g; plain layers: their weight rows) and the bias ``bias`` (None: no
    bias to take the mean away); ``zero``: other biases the output depends on, set to 0."""

    name: str
    module: nn.Module
    gains: list[nn.Module]
    bias: Tensor | None
    zero: list[Tensor]
    note: str = ""


def _is_pyg(module: nn.Module, name: str) -> bool:
    """Whether ``module`` is torch_geometric's class ``name`` (or, for "Linear", a subclass):
    by name, so that torch_geometric is never imported here."""
    cls = _classes.base_class(module)
    if name == "Linear":
        return any(c.__name__ == "Linear" and c.__module__.startswith("torch_geometric.")
                   for c in cls.__mro__)
    return cls.__name__ == name and cls.__module__.startswith("torch_geometric.")


def _inherits_pyg(module: nn.Module, name: str) -> bool:
    """Whether ``module`` is an instance of torch_geometric's class ``name`` (by name, so that
    torch_geometric is never imported here)."""
    return "torch_geometric" in sys.modules and any(
        c.__name__ == name and c.__module__.startswith("torch_geometric.")
        for c in type(module).__mro__)


def _is_message_passing(module: nn.Module) -> bool:
    return _inherits_pyg(module, "MessagePassing")


def _reason_cannot(module: nn.Module, wn: bool) -> str:
    """Why the paper's init cannot set this layer's gain ("" when it can)."""
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return "recurrent layer: the paper's init does not apply (section 3)"
    if not (isinstance(module, _INIT_TYPES) or _is_pyg(module, "Linear") or _is_conv1d(module)):
        return (f"{type(module).__name__} is not a layer type data_init initializes (Linear, "
                "ConvNd and ConvTransposeNd, torch_geometric's Linear)")
    if wn:
        s = _slot.slot(module, "weight")
        if s is None:
            return "its 'weight' is not weight-normalized"
        if not s.map.has_g:
            return f"no per-unit g to set ({s.map.kind} weight)"
        if s.map.dim != default_dim(module):
            return f"g is not one per output unit (dim={s.map.dim})"
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups != 1:
        return f"ConvTranspose with groups > 1: one {'g' if wn else 'weight slice'} serves " \
               "several output channels"
    return ""


def _reason_computed(module: nn.Module) -> str:
    """Why a plain-type layer whose 'weight' is no parameter of its own (computed by PyTorch's
    weight norm or another parametrization) cannot be initialized ("" when its weight is one)."""
    if any(f.name == "weight" for f in _pytorch_wn.find(module)):
        return ("its 'weight' is computed by PyTorch's weight norm: call wnorm.apply(model) "
                "first, which adopts it, so that data_init sets its g")
    if parametrize.is_parametrized(module, "weight"):
        chain = [type(p).__name__ for p in module.parametrizations["weight"]]
        return (f"its 'weight' is computed by a parametrization ({', '.join(chain)}), whose "
                "rows data_init cannot scale")
    return ""


def _reason_frozen(module: nn.Module) -> str:
    """Why a frozen layer is left as it is ("" when nothing the init writes is frozen): a
    pretrained backbone frozen under a new head keeps its function."""
    written = (("g" if "weight_g" in module._parameters else "weight", _gain_param(module)),
               ("bias", module._parameters.get("bias")))
    frozen = [n for n, p in written if p is not None and not p.requires_grad]
    if frozen:
        return (f"frozen ({'/'.join(frozen)} with requires_grad=False): left as it is; "
                "unfreeze it to initialize it")
    return ""


def _graph_conv(label: str, conv: nn.Module, lins: list[tuple[str, nn.Module]],
                include_plain: bool = False) -> tuple[_Target | None, str]:
    """The target standardizing a torch_geometric convolution's output through its Linears
    ``lins`` (``(name, module)``, every Linear inside it), or None and why it cannot."""
    kind = _classes.base_class(conv).__name__
    if not any(_is_pyg(conv, n) for n in _PYG_CONVS):
        return None, (f"{kind}'s output does not scale with its Linears' (attention weights or "
                      "a nonlinear message computed from them)")
    if kind == "SAGEConv" and (conv.project or conv.normalize):
        what, why = (("project", "a ReLU of a biased Linear before the aggregation")
                     if conv.project else ("normalize", "its output is L2-normalized"))
        return None, f"SAGEConv with {what}=True does not scale with its Linears' ({why})"
    aggr = type(getattr(conv, "aggr_module", None)).__name__
    if kind in _AGGREGATE_OUTPUTS and aggr not in _SCALE_FREE_AGGR:
        return None, (f"{kind} aggregates its Linears' outputs with {aggr}, which does not "
                      "commute with a per-channel scale")
    for name, m in lins:
        wn = bool(_slot.slots_of(m))
        why = _reason_cannot(m, wn) or _reason_frozen(m)
        if why or not (wn or include_plain):
            return None, f"its {name} cannot be set ({why or 'not weight-normalized'})"
    where = _PYG_CONVS[kind]
    bias = (conv if not where else getattr(conv, where))._parameters.get("bias")
    if bias is not None and not bias.requires_grad:  # a frozen pretrained convolution
        return None, "its bias is frozen (requires_grad=False)"
    zero = [b for _, m in lins if (b := m._parameters.get("bias")) is not None and b is not bias]
    return _Target(label, conv, [m for _, m in lins], bias, zero,
                   "" if bias is not None else NO_BIAS_NOTE), ""


def _unit_axis(module: nn.Module, y: Tensor) -> int:
    if not isinstance(module, nn.modules.conv._ConvNd):
        return y.dim() - 1  # Linear (and graph layers): features last
    # ConvNd: (N, C, *spatial) has the weight's rank; unbatched (C, *spatial) one less
    return 1 if y.dim() == _gain_param(module).dim() else 0


def _gain_param(module: nn.Module) -> Tensor:
    p = module._parameters
    return p["weight_g"] if "weight_g" in p else p["weight"]


def _candidates(named: list[tuple[str, nn.Module]], include_plain: bool) -> tuple[
        list[_Target], list[LayerInit], list[tuple[str, nn.Module]]]:
    """The targets, the candidates skipped with a reason, and the other modules holding
    parameters (a tie with one of them makes a target unsafe to set)."""
    targets: list[_Target] = []
    skipped: list[LayerInit] = []
    others: list[tuple[str, nn.Module]] = []
    grouped: set[int] = set()
    inside: dict[int, str] = {}  # a Linear inside a convolution not initialized as a whole: why
    for mname, m in named:
        if not _is_message_passing(m):
            continue
        label = mname or "<model>"
        # a Linear inside the aggregation (MultiAggregation's projection, an attentional
        # gate) acts before the output is formed: it is no gain of the output's channels, and
        # is initialized as a layer of its own
        inner = {id(c) for a in m.children() if _inherits_pyg(a, "Aggregation")
                 for c in a.modules()}
        lins = [(n, c) for n, c in m.named_modules() if c is not m and id(c) not in inner
                and (isinstance(c, nn.Linear) or _is_pyg(c, "Linear"))]
        if not (include_plain or any(_slot.slots_of(c) for _, c in lins)):
            continue
        t, why = _graph_conv(label, m, lins, include_plain)
        if t is not None:
            targets.append(t)
            grouped.update(id(c) for _, c in lins)
            grouped.add(id(m))
        else:
            for _, c in lins:
                inside.setdefault(id(c), f"inside {label} ({type(m).__name__}): {why}; this "
                                         "layer's own output is standardized, not the "
                                         "convolution's")
    for mname, m in named:
        label = mname or "<model>"
        if id(m) in grouped:
            continue
        wn = bool(_slot.slots_of(m))
        plain = (include_plain and (isinstance(m, _INIT_TYPES) or _is_pyg(m, "Linear")
                                    or _is_conv1d(m))
                 and m._parameters.get("weight") is not None)
        if not (wn or plain):
            # a Linear/Conv whose weight is computed: asked for, so said to be left as it is
            why = (include_plain and (isinstance(m, _INIT_TYPES) or _is_pyg(m, "Linear")
                                      or _is_conv1d(m)) and _reason_computed(m))
            if why:
                skipped.append(LayerInit(label, type(m).__name__, "skipped", why))
            if m._parameters or why:
                others.append((label, m))
            continue
        why = _reason_cannot(m, wn) or _reason_frozen(m)
        if why:
            skipped.append(LayerInit(label, type(m).__name__, "skipped", why))
            others.append((label, m))
            continue
        bias = m._parameters.get("bias")
        # a parametrized bias is no parameter of the layer: it is left as it is, as none is
        notes = [inside.get(id(m), ""), "" if bias is not None else
                 "bias parametrized: not set, mean not removed"
                 if parametrize.is_parametrized(m, "bias") else NO_BIAS_NOTE]
        targets.append(_Target(label, m, [m], bias, [], "; ".join(n for n in notes if n)))
    return targets, skipped, others


def _tensors(t: _Target) -> list[Tensor]:
    """What initializing ``t`` writes."""
    out = [_gain_param(m) for m in t.gains] + t.zero
    return out + ([t.bias] if t.bias is not None else [])


def _drop_shared(targets: list[_Target], others: list[tuple[str, nn.Module]],
                 skipped: list[LayerInit]) -> list[_Target]:
    """Targets writing a tensor another target or module holds too (a tie) are unsafe: setting
    it for one would change the other after the fact. Among targets sharing one, the first in
    model order stays; a target sharing one with a module the init leaves alone is skipped."""
    owner: dict[int, str] = {}
    for label, o in others:
        for p in o._parameters.values():
            if p is not None:
                owner.setdefault(id(p), label)
    kept: list[_Target] = []
    mine: dict[int, str] = {}
    for t in targets:
        ids = {id(x) for x in _tensors(t)}
        clash = next((owner[i] for i in ids if i in owner), None)
        if clash is not None:
            skipped.append(LayerInit(t.name, type(t.module).__name__, "skipped",
                                     f"parameters shared with {clash}, which data_init does "
                                     "not initialize"))
            continue
        first = next((mine[i] for i in ids if i in mine), None)
        if first is not None:
            skipped.append(LayerInit(t.name, type(t.module).__name__, "skipped",
                                     f"parameters shared with {first}, initialized first"))
            continue
        mine.update((i, t.name) for i in ids)
        kept.append(t)
    return kept


# --------------------------------------------------------------------------- the pass
def _distributed() -> bool:
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


_LOCAL = object()  # the process group of a pass outside torch.distributed


def _mean(r: Tensor, group: Any) -> Tensor:
    """Per-unit mean of ``r`` (before, units, after) over every rank's values (ranks may hold
    batches of different sizes: the count travels with the sums)."""
    if group is _LOCAL:
        return r.mean((0, 2))
    import torch.distributed as dist

    s = r.sum((0, 2))
    both = torch.cat([s, s.new_full((1,), float(r.shape[0] * r.shape[2]))])
    dist.all_reduce(both, group=group)
    return both[:-1] / both[-1]


def _units_view(y: Tensor, axis: int) -> Tensor:
    """``y`` as (before, units, after): a view where the layout allows (channels-last too)."""
    return y.reshape(math.prod(y.shape[:axis]), y.shape[axis], math.prod(y.shape[axis + 1:]))


def _wide(r: Tensor) -> Tensor:
    """``r`` in float32 at least (a bfloat16 sum of a batch loses most of its digits)."""
    wide = torch.promote_types(r.dtype, torch.float32)
    return r if r.dtype == wide else r.to(wide)


def _copy_all(dst: list[Tensor], src: list[Tensor]) -> None:
    """``d.copy_(s)`` for every pair, batched (one kernel per dtype on a GPU); a tensor with
    its conj or neg bit set (a ``.conj()`` view kept as a buffer) is copied on its own, since
    the batched copy refuses those without copying anything."""
    lone = [i for i, (d, s) in enumerate(zip(dst, src))
            if d.is_conj() or d.is_neg() or s.is_conj() or s.is_neg()]
    if lone:
        for i in lone:
            dst[i].copy_(src[i])
        skip = set(lone)
        dst = [d for i, d in enumerate(dst) if i not in skip]
        src = [s for i, s in enumerate(src) if i not in skip]
    if dst:
        torch._foreach_copy_(dst, src)


def _standardize(y: Tensor, axis: int, scale: float, group: Any) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(out, mu, inv)``: per unit along ``axis``, the population mean :math:`\mu` of ``y``
    over every other axis (and every rank), ``inv`` = 1/:math:`\sigma` and
    ``out = scale (y - mu) inv`` shaped (before, units, after), in float32 at least; inv is 0
    where every value of a unit is equal. In one process batch norm's kernel computes them in
    one call; across ranks the sums are all-reduced, the spread from the centered sum of
    squares (not E[y^2] - mu^2, which cancels when |mu| >> sigma)."""
    r = _wide(_units_view(y, axis))
    # a unit whose values are all equal has sigma 0, but the rounded mean leaves a spread of
    # about eps*|mu| (a constant batch gave g ~ 1e7 on the CPU), and a GEMM may round equal
    # rows apart (float64 on AMD CPUs): a range within a few roundings is no variation. The
    # rounding is of the summed terms, which a unit whose output cancels to near 0 hides: the
    # layer's largest magnitude (one input for all units) measures it. bf16/fp16 outputs
    # absorb the wider accumulator's noise but for one ulp of their own, per unit.
    if r.numel() == 0:  # this rank's call reached the layer with nothing (a data-dependent
        # split): it still takes part in every all-reduce, with values that change nothing
        top, low = r.new_full((r.shape[1],), -math.inf), r.new_full((r.shape[1],), math.inf)
    else:
        top, low = r.amax((0, 2)), r.amin((0, 2))
    if group is _LOCAL:
        out, mu, inv = torch.native_batch_norm(r, None, None, None, None, True, 0.0, 0.0)
    else:
        import torch.distributed as dist

        ends = torch.cat([top, -low])
        dist.all_reduce(ends, op=dist.ReduceOp.MAX, group=group)
        top, low = ends[:len(top)], -ends[len(top):]
        mu = _mean(r, group)
        out = r - mu.view(1, -1, 1)
        inv = _mean(out * out, group).rsqrt_()
        out.mul_(inv.view(1, -1, 1))
    level = torch.maximum(top, -low)  # |top| and |low| at most, as top >= low
    if y.element_size() > 2:
        level = level.amax().mul_(64.0 * torch.finfo(y.dtype).eps)
    else:
        level = level.mul_(torch.finfo(y.dtype).eps)
    inv.masked_fill_(top - low <= level, 0.0)  # as batch norm's kernel gives for sigma 0
    if scale != 1.0:
        out.mul_(scale)
    return out, mu, inv


@dataclass
class _Done:
    """A target the pass initialized: the mean and 1/sigma of its units, and what it wrote, for
    the check after the pass (``gains`` as stored; ``shift``: the bias it wrote, minus the
    output's mean as stored, or that mean, kept where there is no bias)."""

    target: _Target
    mu: Tensor
    inv: Tensor  # 1/sigma
    gains: list[Tensor]
    shift: Tensor
    count: int  # values per unit on this rank

    def ok(self) -> Tensor:
        """Per unit: every g positive and finite, the bias (or kept mean) finite."""
        ok = self.shift.abs() < math.inf  # NaN fails every comparison
        for g in self.gains:
            ok &= (g > 0) & (g < math.inf)
        return ok


class _Pass:
    """The hooks of one init pass: each target is initialized at the first call reaching it."""

    def __init__(self, targets: list[_Target], init_scale: float, group: Any,
                 names: dict[nn.Module, str], inputs: list[Tensor]) -> None:
        self.by_module = {t.module: t for t in targets}
        self.names = names
        self.scale, self.group = init_scale, group
        self.done: dict[nn.Module, _Done] = {}
        #: targets whose pre hook ran (g set to 1, biases to 0): one the model then left
        #: through an exception it caught is restored after the pass
        self.entered: set[nn.Module] = set()
        self.means: dict[nn.Module, Tensor] = {}  # each mean-only BN's first call's mean
        self.call_means: dict[nn.Module, Tensor] = {}  # what its current call subtracts
        self.inputs = inputs
        #: per target: whether its input was computed by the model, not a tensor of the batch
        self.computed: dict[nn.Module, bool] = {}

    def pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if module in self.done:
            return
        t = self.by_module[module]
        self.entered.add(module)
        fed = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]  # layer(input=h)
        self.computed[module] = bool(fed) and not any(a is b for a in fed for b in self.inputs)
        for m in t.gains:  # the layer now outputs t = v.x/||v|| (+ 0); a plain layer w.x
            g = m._parameters.get("weight_g")
            if g is not None:
                g.fill_(1.0)
        for b in t.zero:
            b.zero_()
        if t.bias is not None:
            t.bias.zero_()

    def post(self, module: nn.Module, args: Any, y: Any) -> Any:
        if module in self.done:
            return None
        t = self.by_module[module]
        if not (isinstance(y, Tensor) and y.is_floating_point()):
            what = f"a {y.dtype} tensor" if isinstance(y, Tensor) else type(y).__name__
            raise WnormError(
                f"{t.name} ({type(module).__name__}): its forward returned {what}; data_init "
                "standardizes a layer's floating-point output tensor. Leave this layer "
                "unnormalized (exclude it in wnorm.apply) or initialize it yourself")
        axis = _unit_axis(module, y) if t.gains == [module] else y.dim() - 1
        if y.numel() == 0 and self.group is _LOCAL:
            raise WnormError(f"{t.name} ({type(module).__name__}): an empty batch reached it "
                             f"(output shape {tuple(y.shape)}); data init needs a batch on "
                             "which every unit varies")
        out, mu, inv = _standardize(y, axis, self.scale, self.group)
        gain = inv * self.scale if self.scale != 1.0 else inv
        stored = []
        for m in t.gains:
            p = _gain_param(m)
            gs = gain if gain.dtype == p.dtype else gain.to(p.dtype)
            stored.append(gs)
            if p is m._parameters.get("weight_g"):
                p.copy_(gs.view(p.shape))
            else:  # a plain layer: its rows scaled
                d = default_dim(m)
                p.mul_(gs.view([-1 if i == d else 1 for i in range(p.dim())]))
        if t.bias is not None:  # zeroed by pre: b = 0 - mu g, one kernel, rounded once
            shape = t.bias.shape
            shift = t.bias.addcmul_(mu.view(shape), gain.view(shape), value=-1).view(-1)
        else:
            shift = mu * gain  # the output's mean at g = gain
            out += shift.view(1, -1, 1)  # no bias: the mean stays
        self.done[module] = _Done(t, mu, inv, stored, shift, out.shape[0] * out.shape[2])
        out = out.view(y.shape) if out.is_contiguous() else out.reshape(y.shape)
        return out if out.dtype == y.dtype else out.to(y.dtype)

    def bn_pre(self, module: MeanOnlyBatchNormBase, args: Any) -> None:
        # a shared layer's later calls: in training mode (or without running statistics) its
        # forward subtracts each call's own batch mean, which the layers after it are then
        # initialized on; in eval mode the running mean, which is the first call's
        batch = module.training or module.running_mean is None  # as its forward decides
        if module in self.means and not batch:
            return
        x = args[0]
        module._check(x)
        if x.numel() == 0 and module in self.means:
            # a later call on nothing (its forward gives an empty output): the first call's
            # mean is subtracted from no value; across ranks this one still takes part in the
            # all-reduce of the others' means (it sends a count of 0)
            if self.group is _LOCAL:
                self.call_means[module] = self.means[module]
                return
        elif x.numel() == 0 and self.group is _LOCAL:  # across ranks: a count of 0 (below)
            raise WnormError(
                f"data_init: {self.names.get(module, '<model>')} ({type(module).__name__}) got "
                f"an empty batch {tuple(x.shape)}; its running mean is the batch mean of its "
                "input")
        mean = _mean(_wide(_units_view(x, 1)), self.group)
        self.means.setdefault(module, mean)
        self.call_means[module] = mean

    def bn_post(self, module: MeanOnlyBatchNormBase, args: Any, out: Any) -> Any:
        # the batch mean over every rank, as running mean (the first call's) and as what is
        # subtracted, so that the layers after it are initialized as one process on the union
        # of the batches would be
        mean = self.call_means[module]
        if module.running_mean is not None:
            module.running_mean.copy_(self.means[module])
        x = args[0]
        bias = getattr(module, "bias", None)
        shift = (bias - mean) if bias is not None else -mean
        return x + shift.to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))


def _positive_scale(value: Any) -> float:
    """``init_scale`` as a float: any real number (Python, NumPy, a 0-dim real tensor) that is
    positive and finite; a bool is refused (True is no scale anyone means)."""
    x: float | None = None
    if isinstance(value, Tensor):
        if value.dim() == 0 and not (value.is_complex() or value.dtype == torch.bool):
            x = float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            x = float(value)
        except (OverflowError, ValueError, TypeError):
            x = math.inf
    if x is None or not (math.isfinite(x) and x > 0):
        raise WnormError(
            f"data_init: init_scale must be a positive finite number; got {value!r} (a Python "
            "or NumPy real number, or a 0-dim real tensor; not a bool)")
    return x


def _zero_row(t: _Target) -> bool:
    """Whether a plain layer of ``t`` has a weight row of norm 0 (a zero-initialized head),
    seen after the pass scaled it by 1/sigma = inf: a row that is not positive and finite."""
    for m in t.gains:
        w = m._parameters.get("weight")
        if m._parameters.get("weight_g") is None and w is not None:
            n = torch.norm_except_dim(w.detach(), 2, default_dim(m))
            if not bool(((n > 0) & (n < math.inf)).all()):
                return True
    return False


def _fail(t: _Target, mu: Tensor, sigma: Tensor, ok: Tensor, init_scale: float,
          count: int, computed_input: bool = False) -> None:
    """Raise for ``t``'s bad units, saying whether the batch, ``init_scale`` or (for a layer
    reached after others, whose input the model computed) what comes before it is at fault."""
    label = f"{t.name} ({type(t.module).__name__})"
    idx = (~ok).nonzero().flatten().tolist()
    units = ok.numel()
    which = f"{len(idx)} of {units} units ({idx[:10]}{'...' if len(idx) > 10 else ''})"
    m, sd = mu.double().cpu()[idx], sigma.double().cpu()[idx]
    gdtype = _gain_param(t.gains[0]).dtype
    gi = torch.finfo(gdtype)
    bi = torch.finfo(t.bias.dtype) if t.bias is not None else None

    def fits(scale: float) -> tuple[bool, bool]:
        """Whether g = scale/sigma[t] (finite, not 0) and b = -mu[t] g (finite) fit."""
        g = scale / sd
        return (bool(((g <= gi.max) & (g.to(gdtype) != 0)).all()),
                bi is None or bool(((m.abs() * g) <= bi.max).all()))

    # the batch is fine for these units when the init with init_scale 1 would fit: then
    # init_scale is what puts g (or b) out of the dtype's range
    varies = bool(((sd > 0) & torch.isfinite(sd) & torch.isfinite(m)).all())
    if varies and all(fits(1.0)):
        g = init_scale / sd
        g_ok, b_ok = fits(init_scale)
        seen = (f"sigma[t] on this batch is in [{float(sd.min()):.3g}, {float(sd.max()):.3g}] "
                "for them, and init_scale 1 would fit")
        if not g_ok:
            big = bool((g > gi.max).any())
            raise WnormError(
                f"{label}: init_scale={init_scale!r} is too {'large' if big else 'small'} for "
                f"this layer's {gdtype}: g = init_scale/sigma[t] "
                f"{'overflows it' if big else 'underflows it to 0'} for {which} ({seen}; "
                f"{gdtype} holds normal magnitudes from {gi.smallest_normal:.3g} to "
                f"{gi.max:.3g}); use an init_scale nearer 1")
        if not b_ok:
            raise WnormError(
                f"{label}: init_scale={init_scale!r} is too large for this layer's "
                f"{t.bias.dtype}: the bias b = -mu[t]*init_scale/sigma[t] overflows it for "
                f"{which} ({seen}; |mu[t]|/sigma[t] is up to "
                f"{float((m.abs() / sd).max()):.3g}); use a smaller init_scale")
    # the batch varies, but on a scale where even init_scale 1 puts g (or b) out of the
    # dtype's range (a float16 layer whose pre-activations are near 1e-5): not the batch's fault
    if varies:
        g_ok, b_ok = fits(init_scale)
        if not (g_ok and b_ok):
            if g_ok:
                what, dtype, big = "the bias b = -mu[t]*init_scale/sigma[t]", t.bias.dtype, True
            else:
                what, dtype = "g = init_scale/sigma[t]", gdtype
                big = bool((init_scale / sd > gi.max).any())
            top = float(sd.min()) * gi.max
            if bi is not None and bool((m != 0).any()):
                top = min(top, float((sd / m.abs()).min()) * bi.max)
            # printed to 3 digits, rounded inward (at most 0.5% off): the bound itself fits
            fit = (f"init_scale up to {0.99 * top:.3g}" if big else
                   f"init_scale at least {1.01 * float(sd.max()) * gi.smallest_normal:.3g}")
            raise WnormError(
                f"{label}: the batch varies (sigma[t] in [{float(sd.min()):.3g}, "
                f"{float(sd.max()):.3g}] for {which}), but {what} "
                f"{'overflows' if big else 'underflows'} this layer's {dtype} at init_scale="
                f"{init_scale!r} ({dtype} holds normal magnitudes from "
                f"{torch.finfo(dtype).smallest_normal:.3g} to {torch.finfo(dtype).max:.3g}); use "
                f"{fit}, rescale the inputs, or run data_init in float32 and convert the model "
                "after")
    # no unit varies at all (batch norm's kernel gives 1/sigma = 0 there, so sigma reads inf
    # in one process and 0 across ranks; it does so too for a variance beyond float32, which
    # takes pre-activations near 1e19): with no zero weight row, the layer's input is one
    # constant over the batch, which a varying batch gives through what the model computes
    # before it (a codec's quantizer that maps the whole batch to one code)
    if computed_input and count > 1 and len(idx) == units and bool(
            (((sd == 0) | (sd == math.inf)) & torch.isfinite(m)).all()) and not _zero_row(t):
        raise WnormError(
            f"{label}: every one of its {units} units has the same pre-activation for the whole "
            f"init batch ({count} values per unit, sigma 0), so its input, computed by the "
            "model, does not vary on the batch: what comes before this layer makes it constant "
            "(e.g. a quantizer mapping every example to one code), or the part of the batch it "
            "depends on does not vary; initialize the part of the model before that point "
            "(data_init(model.encoder, ...)), or use a batch on which this layer's input varies")
    raise WnormError(
        f"{label}: the pre-activations of {len(idx)} of {units} units have sigma 0 or "
        f"non-finite statistics on the init batch ({count} values per unit; units "
        f"{idx[:10]}{'...' if len(idx) > 10 else ''}); data init needs a batch on which every "
        "unit varies (more than one example, finite inputs, no zero rows in the weight)")


def _gather(ts: list[Tensor]) -> list[Tensor]:
    """``ts`` on the first one's device: a model split across devices (pipeline stages) has
    its layers' statistics there, and the pass's one check and copy read them at once."""
    at = ts[0].device
    return [t if t.device == at else t.to(at) for t in ts]


def _values(a: Tensor) -> Tensor:
    """The stored values of ``a`` (a sparse adjacency, as torch_geometric accepts, too)."""
    if a.layout == torch.strided:
        return a
    return a._values() if a.layout == torch.sparse_coo else a.values()  # uncoalesced is fine


def _check_inputs(inputs: list[Tensor], cause: BaseException | None = None) -> None:
    """Raise if a floating-point input of the batch has NaN or inf values."""
    for i, a in enumerate(inputs):
        if a.is_floating_point() and not bool(torch.isfinite(_values(a)).all()):
            raise WnormError(f"data_init: input {i} of the batch has NaN or inf values") from cause


def _refuse_empty_anywhere(empty: str | None, inputs: list[Tensor], model: nn.Module,
                           group: Any) -> None:
    """Raise on every rank when any rank's batch is empty (every tensor input of it is): a
    rank raising alone would leave the others waiting in the pass's first all-reduce for good.
    One all-reduce of a flag per rank, read on the host, on the device of the model's
    parameters, where the pass's own all-reduces run (NCCL takes no CPU tensor: a batch may
    hold CPU lengths)."""
    import torch.distributed as dist

    rank = dist.get_rank(group)
    if rank < 0:
        raise WnormError(
            f"data_init: this process (global rank {dist.get_rank()}) is not in the "
            "process_group given; call data_init with that group on its ranks only")
    where = next((p.device for p in model.parameters()),
                 inputs[0].device if inputs else torch.device("cpu"))
    flags = torch.zeros(dist.get_world_size(group), device=where)
    if empty is not None:
        flags[rank] = 1.0
    dist.all_reduce(flags, group=group)
    ranks = flags.nonzero().flatten().tolist()
    if ranks:
        mine = f" (here {empty})" if empty is not None else ""
        raise WnormError(
            f"data_init: the batch is empty on rank{'s' if len(ranks) > 1 else ''} "
            f"{', '.join(map(str, ranks))} of the process group (ranks within it){mine}; every "
            "rank needs a non-empty batch (the ranks' batches are initialized on as one)")


def _check_batch(batch: Any) -> None:
    """Refuse what is no batch of inputs: a DataLoader or an iterator of batches (the commonest
    first mistake, which the forward refuses naming nothing of data_init), a NumPy array."""
    from torch.utils.data import DataLoader

    what = ("a DataLoader" if isinstance(batch, DataLoader) else
            "an iterator" if isinstance(batch, Iterator) else
            "a NumPy array" if type(batch).__module__ == "numpy" else "")
    if what:
        raise WnormError(
            f"data_init: batch is {what}; pass one batch of the model's inputs as a tensor (or a "
            "tuple/list of positional inputs, or a dict of keyword inputs), e.g. "
            "x, _ = next(iter(loader)); wnorm.data_init(model, x)")


def data_init(
    model: nn.Module,
    batch: Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any],
    *,
    init_scale: float | Tensor = 1.0,
    include_plain: bool = False,
    process_group: Any = None,
) -> InitReport:
    r"""Data-dependent init, :math:`g \leftarrow s/\sigma[t]`, :math:`b \leftarrow -\mu[t]\,g`.

    Salimans & Kingma (2016), section 3, https://arxiv.org/abs/1602.07868. Feeds ``batch``
    through ``model`` once (``no_grad``, the model's train/eval mode as it is); each
    weight-normalized layer, at the first call reaching it, gets g and a bias that give its
    pre-activation :math:`t = v\cdot x/\lVert v\rVert` mean 0 and std ``init_scale`` per unit
    on the batch, and hands that output on, so later layers are initialized on what they will
    see. Forward hooks follow any container, residual or shared module; one host sync in all;
    under ``torch.distributed`` (one more: the ranks agree that no batch is empty) every rank
    gets what one process gets on the union of the batches (order: ``apply``, ``data_init``,
    then DDP or ``fully_shard``; every rank must reach the same layers in the same order, so no
    data-dependent routing). Mean-only batch norms get their input's batch mean as running
    mean. torch_geometric convolutions whose output is linear in their Linears (GCN,
    GraphSAGE, ...) are standardized as a whole, others (GAT, ...) Linear by Linear, with the
    reason in the report. A layer without a bias keeps its mean (:data:`NO_BIAS_NOTE`); of
    targets sharing a g or bias only the first is set.

    Args:
        model: the model, changed in place.
        batch: the input: a tensor, a tuple/list of positional arguments, or a mapping of
            keyword arguments. The paper used 500 training examples.
        init_scale: :math:`s`, the std of every initialized pre-activation (default 1.0).
        include_plain: also initialize plain Linear/Conv layers (each weight row scaled by
            :math:`s/\sigma`, bias :math:`-\mu s/\sigma`): the paper's "normal
            parameterization" baseline.
        process_group: the ``torch.distributed`` group to reduce over (default: the world).

    Returns:
        An :class:`InitReport`: per layer its :math:`\mu[t]` and :math:`\sigma[t]` before the
        init, and whether it was initialized (with a ``note``) or skipped (and why); skipped
        layers also raise a warning.

    Raises:
        WnormError: ``init_scale`` is not a positive finite number, the batch is empty
            (every tensor in it; on any rank: every rank raises) or non-finite, a layer gets
            nothing in one process, this rank is not in ``process_group``, the model's weights
            are sharded (DTensor), a layer's :math:`\sigma[t]` is 0, or its g or b does not fit
            its dtype. The model is then left exactly as it was (parameters and buffers
            restored).

    Example:
        >>> import torch, wnorm
        >>> net = wnorm.apply(torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(),
        ...                                        torch.nn.Linear(8, 3)))
        >>> report = wnorm.data_init(net, torch.randn(64, 5))
        >>> [r.status for r in report]
        ['initialized', 'initialized']
    """
    expect_module("data_init", model)
    init_scale = _positive_scale(init_scale)
    if not isinstance(include_plain, bool):  # "False" is truthy: plain layers rescaled unasked
        raise WnormError(f"data_init: include_plain must be True or False; got {include_plain!r}")
    _check_batch(batch)
    if isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    else:
        args, kwargs = (batch,), {}
    inputs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)]
    # empty only when every tensor is: a graph with no edges or an empty mask is a batch (a
    # layer that still gets nothing is refused by name, in the pass)
    empty = (", ".join(f"input {i} has shape {tuple(a.shape)}" for i, a in enumerate(inputs))
             if inputs and all(a.numel() == 0 for a in inputs) else None)
    named = list(model.named_modules())
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:  # its forward would fail deep inside, on .item() or a device mismatch
        raise WnormError(
            f"data_init: {meta} is on the meta device (it has no values); materialize the model "
            "first: model.to_empty(device=...), then reset_parameters() or a checkpoint load")
    if _distributed():
        group = process_group
        _refuse_empty_anywhere(empty, inputs, model, group)
    elif process_group is not None:
        raise WnormError(f"data_init: process_group={process_group!r} was given, but "
                         "torch.distributed is not initialized (init_process_group first)")
    else:
        group = _LOCAL
        if empty is not None:
            raise WnormError(f"data_init: the batch is empty ({empty})")
    refuse_sharded("data_init", model, "call wnorm.apply and wnorm.data_init on the unsharded "
                   "model, then fully_shard (or DDP)")

    for _, m in named:  # a write into a weight still held (nn.init, model.apply) lands first:
        _held.flush_all(m)  # else it would land mid-pass, undoing g = 1 before the layer runs
    targets, skipped, others = _candidates(named, include_plain)
    targets = _drop_shared(targets, others, skipped)
    mobn = [(n, m) for n, m in named if isinstance(m, MeanOnlyBatchNormBase)]
    if not (targets or skipped or mobn):
        raise WnormError(
            f"data_init: {type(model).__name__} has no weight-normalized layer and no mean-only "
            "batch norm, so there is nothing to initialize; call wnorm.apply(model) first"
            + ("" if include_plain else
               " (or pass include_plain=True to initialize its plain Linear/Conv layers)"))
    touched = [x for t in targets for x in _tensors(t)]
    touched += [b for _, m in named for b in m._buffers.values() if b is not None]
    with torch.no_grad():
        # one batched copy (one kernel on a GPU) instead of a clone per tensor
        saved = [torch.empty_like(x) for x in touched]
        _copy_all(saved, touched)
        # a non-finite value makes its input's sum non-finite: checked with the layers, in the
        # pass's one host sync (an overflowing sum of finite values is rechecked exactly)
        sums = [_values(a).sum(dtype=torch.promote_types(a.dtype, torch.float32))
                for a in inputs if a.is_floating_point()]
    p = _Pass(targets, init_scale, group, {m: n or "<model>" for n, m in mobn}, inputs)
    handles = []
    for t in targets:
        handles.append(t.module.register_forward_pre_hook(p.pre, with_kwargs=True))
        handles.append(t.module.register_forward_hook(p.post))
    for _, m in mobn:
        handles.append(m.register_forward_pre_hook(p.bn_pre))
        handles.append(m.register_forward_hook(p.bn_post))
    try:
        with torch.no_grad(), _classes.recording_reads() as reads:
            model(*args, **kwargs)
            # a layer whose forward raised, caught by the model (a fallback path), never
            # reached its post hook: its g of 1 and zeroed biases are put back
            left = [t for t in targets if t.module in p.entered and t.module not in p.done]
            if left:
                at = {id(x): i for i, x in enumerate(touched)}
                back = [at[id(x)] for t in left for x in _tensors(t)]
                _copy_all([touched[i] for i in back], [saved[i] for i in back])
        done = list(p.done.values())
        if done:  # every g is in (0, inf) exactly when its log is finite, every b when it is
            sums.append(torch.cat(_gather([x for d in done for x in d.gains])).log().sum())
            sums.append(torch.cat(_gather([d.shift for d in done])).sum())
        if sums:  # the pass's one host sync: one sum of them all is finite (x - x is 0)
            total = torch.stack(_gather(sums)).sum() if len(sums) > 1 else sums[0]
            if not bool((total - total) == 0):
                _check_inputs(inputs)
                for i, d in enumerate(done):
                    ok = d.ok()
                    if not bool(ok.all()):
                        _fail(d.target, d.mu, d.inv.reciprocal(), ok, init_scale, d.count,
                              computed_input=i > 0 and p.computed.get(d.target.module, False))
                # else every unit fits: a sum of finite inputs overflowed, nothing is wrong
        # in the try: under warnings-as-errors the warning below raises, and the model must then
        # be as it was, not initialized behind an error
        report = InitReport()
        if done:  # one device-to-host copy for every layer's statistics
            stats = torch.cat(_gather([d.mu for d in done] + [d.inv for d in done])).cpu()
            stats[len(stats) // 2:].reciprocal_()  # sigma, on the host
            parts = stats.split([d.mu.numel() for d in done] * 2)
            for i, d in enumerate(done):
                t = d.target
                report.append(LayerInit(t.name, type(t.module).__name__, "initialized", "",
                                        parts[i], parts[len(done) + i], t.note))
        # in training mode a model may skip layers at random (LayerDrop in wav2vec2/HuBERT)
        unreached = ("not reached by the forward pass" + (
            " (the model is in training mode, where some models skip layers at random, e.g. "
            "LayerDrop: data_init with model.eval() reaches every layer)"
            if model.training else ""))
        raised = ("its forward raised an error that the model caught, every time it was "
                  "called: left as it is")
        # a weight read while its layer's forward never ran: the parent hands it to a function
        # itself (WavLM's attention passes q_proj.weight to F.multi_head_attention_forward),
        # in any mode; a read outside a layer's forward is held (flushed before the pass)
        elsewhere = ("its weight is read by the model outside the layer's own forward (e.g. "
                     "passed to F.multi_head_attention_forward by its parent), so it has no "
                     "output of its own to standardize: left as it is")
        for t in targets:
            if t.module not in p.done:
                read = any(s.held is not None or id(s) in reads for m in t.gains
                           for s in _slot.slots_of(m).values())
                skipped.append(LayerInit(t.name, type(t.module).__name__, "skipped",
                                         raised if t.module in p.entered else
                                         elsewhere if read else unreached))
        report.extend(skipped)
        if report.skipped:
            warnings.warn("data_init: layers not initialized: "
                          + "; ".join(f"{r.name} ({r.reason})" for r in report.skipped),
                          stacklevel=2)
    except BaseException as e:
        with torch.no_grad():  # leave the model as it was: no half-initialized network
            _copy_all(touched, saved)
        if isinstance(e, Exception) and not isinstance(e, WnormError):
            _check_inputs(inputs, e)  # a NaN input is the likelier cause of a failed forward
        if isinstance(e, TypeError) and isinstance(batch, (tuple, list)) and len(batch) > 1:
            raise WnormError(
                f"data_init: the model's forward refused the batch ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); a {type(batch).__name__} batch "
                f"is passed as {len(batch)} positional arguments, model(*batch): for a "
                "DataLoader's (inputs, targets) pair, pass batch[0]") from e
        raise
    finally:
        for h in handles:
            h.remove()

    return report
