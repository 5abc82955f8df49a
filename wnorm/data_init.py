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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import _reparam
from .errors import WnormError
from .mean_only_bn import _MeanOnlyBatchNorm
from .weight_norm import default_dim

__all__ = ["data_init", "InitReport", "LayerInit", "NO_BIAS_NOTE"]

#: :attr:`LayerInit.note` of an initialized layer without a bias: there is no bias to set to
#: :math:`-\mu[t]\,g`, so its pre-activation keeps the mean :math:`\mu[t]\,g` on the batch
#: (a mean-only batch norm after it removes it); only the spread is set to ``init_scale``.
NO_BIAS_NOTE = "no bias: mean not removed"

_INIT_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
#: torch_geometric convolutions whose output is linear in their weight-normalized Linears'
#: outputs (plus their bias): scaling those g's by s scales the convolution's output by s, so
#: the init standardizes the convolution's output, the pre-activation of the graph layer.
_PYG_LINEAR_CONVS = {"GCNConv", "SAGEConv", "GraphConv", "ChebConv", "TAGConv", "SGConv",
                     "ClusterGCNConv", "LEConv"}


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
def _mro_names(m: nn.Module) -> set[str]:
    return {c.__name__ for c in type(m).__mro__}


@dataclass
class _Target:
    """One pre-activation to standardize: ``module``'s output, along ``axis`` (-1: last), set
    through the gains of ``gains`` (wnorm layers: g; plain layers: their weight rows) and the
    bias ``bias`` (None: no bias to take the mean away)."""

    name: str
    module: nn.Module
    gains: list[nn.Module]
    bias: Tensor | None
    zero: list[Tensor]  # biases the output depends on besides ``bias``: set to 0
    note: str = ""


def _reason_cannot(module: nn.Module, wn: bool) -> str:
    """Why the paper's init cannot set this layer's gain ("" when it can)."""
    if isinstance(module, nn.RNNBase):
        return "recurrent layer: the paper's init does not apply (section 3)"
    if not (isinstance(module, _INIT_TYPES) or "Linear" in _mro_names(module)
            and type(module).__module__.startswith("torch_geometric")):
        return f"{type(module).__name__} has no per-unit pre-activation to standardize"
    if wn:
        s = _reparam.slot(module, "weight")
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


def _unit_axis(module: nn.Module, y: Tensor) -> int:
    if not isinstance(module, nn.modules.conv._ConvNd):
        return y.dim() - 1  # Linear (and graph layers): features last
    # ConvNd: (N, C, *spatial) has the weight's rank; unbatched (C, *spatial) one less
    return 1 if y.dim() == _gain_param(module).dim() else 0


def _gain_param(module: nn.Module) -> Tensor:
    p = module._parameters
    return p["weight_g"] if "weight_g" in p else p["weight"]


def _candidates(model: nn.Module, include_plain: bool) -> tuple[
        list[_Target], list[LayerInit], list[tuple[str, nn.Module]]]:
    """The targets, the candidates skipped with a reason, and the other modules holding
    parameters (a tie with one of them makes a target unsafe to set)."""
    targets: list[_Target] = []
    skipped: list[LayerInit] = []
    others: list[tuple[str, nn.Module]] = []
    in_group: set[int] = set()
    named = list(model.named_modules())
    parent = {id(c): p for _, p in named for c in p.children()}
    for mname, m in named:
        label = mname or "<model>"
        if "MessagePassing" in _mro_names(m) and type(m).__name__ in _PYG_LINEAR_CONVS:
            lins = [c for c in m.children() if _reparam.slot(c, "weight") is not None]
            if lins and all(not _reason_cannot(c, True) for c in lins):
                bias = m._parameters.get("bias")
                lin_biases = [c._parameters["bias"] for c in lins
                              if c._parameters.get("bias") is not None]
                if bias is None and lin_biases:  # the Linear applied after aggregation
                    bias, lin_biases = lin_biases[0], lin_biases[1:]
                targets.append(_Target(label, m, lins, bias, lin_biases,
                                       "" if bias is not None else NO_BIAS_NOTE))
                in_group.update(id(c) for c in lins)
    for mname, m in named:
        label = mname or "<model>"
        if id(m) in in_group or any(t.module is m for t in targets):
            continue
        wn = bool(m.__dict__.get("_wn"))
        plain = (include_plain and isinstance(m, _INIT_TYPES)
                 and m._parameters.get("weight") is not None)
        if not (wn or plain):
            if m._parameters:
                others.append((label, m))
            continue
        why = _reason_cannot(m, wn)
        if why:
            skipped.append(LayerInit(label, type(m).__name__, "skipped", why))
            others.append((label, m))
            continue
        bias = m._parameters.get("bias")
        note = "" if bias is not None else NO_BIAS_NOTE
        up = parent.get(id(m))
        if up is not None and "MessagePassing" in _mro_names(up):
            note = (f"inside {type(up).__name__}, whose output is not linear in this "
                    "layer's (attention or a nonlinear message): this layer's own output is "
                    "standardized, not the convolution's") + (f"; {note}" if note else "")
        targets.append(_Target(label, m, [m], bias, [], note))
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


def _sums(t: Tensor, dims: list[int], group: Any) -> tuple[Tensor, Tensor]:
    """Per-unit sum and count of ``t`` over ``dims``, summed over the ranks when distributed."""
    n = t.new_full((1,), float(math.prod(t.shape[d] for d in dims)))
    s = t.sum(dims)
    if _distributed():
        import torch.distributed as dist

        both = torch.cat([s.flatten(), n])
        dist.all_reduce(both, group=group)
        s, n = both[:-1].view(s.shape), both[-1:]
    return s, n


class _Pass:
    """The hooks of one init pass: each target is initialized at the first call reaching it."""

    def __init__(self, targets: list[_Target], init_scale: float, group: Any,
                 names: dict[nn.Module, str]) -> None:
        self.by_module = {t.module: t for t in targets}
        self.names = names
        self.scale, self.group = init_scale, group
        self.done: dict[nn.Module, tuple[_Target, Tensor, Tensor, Tensor]] = {}  # mu, sigma, ok
        self.count: dict[nn.Module, int] = {}  # values per unit on this rank
        self.means: dict[nn.Module, Tensor] = {}

    def pre(self, module: nn.Module, args: Any) -> None:
        t = self.by_module[module]
        if module in self.done:
            return
        for m in t.gains:  # the layer now outputs t = v.x/||v|| (+ 0); a plain layer w.x
            if _reparam.slot(m, "weight") is not None:
                m._parameters["weight_g"].fill_(1.0)
        for b in t.zero + ([t.bias] if t.bias is not None else []):
            b.zero_()

    def post(self, module: nn.Module, args: Any, y: Any) -> Any:
        t = self.by_module[module]
        if module in self.done or not isinstance(y, Tensor):
            return None
        axis = _unit_axis(module, y) if t.gains == [module] else y.dim() - 1
        units = y.shape[axis]
        wide = torch.promote_types(y.dtype, torch.float32)
        r = y.detach().to(wide)
        dims = [d for d in range(r.dim()) if d != axis]
        s, n = _sums(r, dims, self.group)
        shape = [1] * r.dim()
        shape[axis] = units
        mu = (s / n).view(shape)
        c = r - mu
        var = _sums(c * c, dims, self.group)[0].view(shape) / n.view([1] * r.dim())
        sigma = var.sqrt()
        scale = self.scale / sigma
        shift = mu * scale
        flat_scale, flat_shift = scale.reshape(units), shift.reshape(units)
        ok = (sigma.reshape(units) > 0) & torch.isfinite(flat_shift) & torch.isfinite(flat_scale)
        for m in t.gains:
            p = _gain_param(m)
            gs = flat_scale.to(p.dtype)
            ok &= torch.isfinite(gs) & (gs > 0)
            if p is m._parameters.get("weight_g"):
                p.copy_(gs.view(p.shape))
            else:  # a plain layer: scale each output unit's row of w
                d = default_dim(m)
                p.mul_(gs.view([units if i == d else 1 for i in range(p.dim())]))
        out = c * scale
        if t.bias is not None:
            bs = (-flat_shift).to(t.bias.dtype)
            ok &= torch.isfinite(bs)
            t.bias.copy_(bs.view(t.bias.shape))
        else:
            out = out + shift  # no bias: the mean stays
        self.done[module] = (t, mu.reshape(units), sigma.reshape(units), ok)
        self.count[module] = r.numel() // max(units, 1)
        return out.to(y.dtype)

    def bn_pre(self, module: _MeanOnlyBatchNorm, args: Any) -> None:
        if module in self.means:
            return
        x = args[0]
        module._check(x)
        if x.numel() == 0:
            raise WnormError(
                f"data_init: {self.names.get(module, '<model>')} ({type(module).__name__}) got "
                f"an empty batch {tuple(x.shape)}; its running mean is the batch mean of its "
                "input")
        xw = x.detach().to(torch.promote_types(x.dtype, torch.float32))
        dims = [0, *range(2, x.dim())]
        s, n = _sums(xw, dims, self.group)
        self.means[module] = s / n

    def bn_post(self, module: _MeanOnlyBatchNorm, args: Any, out: Any) -> Any:
        # the batch mean over every rank, as running mean and as what is subtracted, so that
        # the layers after it are initialized as one process on the union of the batches would
        mean = self.means.get(module)
        if mean is None:
            return None
        if module.track_running_stats:
            module.running_mean.copy_(mean.to(module.running_mean.dtype))
        x = args[0]
        shift = (module.bias - mean).to(x.dtype) if module.bias is not None else -mean.to(x.dtype)
        return x + shift.view((1, -1) + (1,) * (x.dim() - 2))


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


def _fail(t: _Target, mu: Tensor, sigma: Tensor, ok: Tensor, init_scale: float,
          count: int) -> None:
    """Raise for ``t``'s bad units, saying whether the batch or ``init_scale`` is at fault."""
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
    if bool(((sd > 0) & torch.isfinite(sd) & torch.isfinite(m)).all()) and all(fits(1.0)):
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
    raise WnormError(
        f"{label}: the pre-activations of {len(idx)} of {units} units have sigma 0 or "
        f"non-finite statistics on the init batch ({count} values per unit; units "
        f"{idx[:10]}{'...' if len(idx) > 10 else ''}); data init needs a batch on which every "
        "unit varies (more than one example, finite inputs, no zero rows in the weight)")


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
    through ``model`` once (under ``no_grad``, in the model's current train/eval mode). Each
    weight-normalized layer with one g per output unit, at the first call that reaches it,
    measures :math:`t = v\cdot x/\lVert v\rVert` per unit (over the batch and every spatial
    position, in float32 at least), sets g and the bias so that its pre-activation has mean 0
    and std ``init_scale`` on the batch, and hands that standardized output on, so later layers
    are initialized on what they will see. Residual branches, shared modules and any container
    work, since the init follows the forward pass itself (forward hooks). Mean-only batch norms
    get their input's batch mean as running mean. The number of host syncs does not grow with
    the number of layers. Under ``torch.distributed`` the statistics are all-reduced: every
    rank gets what one process gets on the union of the batches (call it before DDP or
    ``fully_shard`` wraps the model).

    torch_geometric: in convolutions whose output is linear in their weight-normalized Linears
    (GCNConv, SAGEConv, GraphConv, ChebConv, TAGConv, SGConv, ClusterGCNConv, LEConv), the
    convolution's output is standardized through its Linears' g and its bias; in others (GAT,
    GATv2, Transformer, GIN) each Linear's own output is, and the report's note says so.

    A layer without a bias keeps the mean :math:`\mu[t]\,g` (note :data:`NO_BIAS_NOTE`). Among
    targets sharing a g or bias (a tie), the first in model order is initialized and the others
    skipped; a target sharing one with a module the init leaves alone is skipped.

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
        WnormError: ``init_scale`` is not a positive finite number, the batch is empty or
            non-finite, the model's weights are sharded (DTensor), a layer's
            :math:`\sigma[t]` is 0, or its g or b does not fit its dtype. The model is then
            left exactly as it was (parameters and buffers restored).

    Example:
        >>> import torch, wnorm
        >>> net = wnorm.apply(torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(),
        ...                                        torch.nn.Linear(8, 3)))
        >>> report = wnorm.data_init(net, torch.randn(64, 5))
        >>> [r.status for r in report]
        ['initialized', 'initialized']
    """
    init_scale = _positive_scale(init_scale)
    if isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    else:
        args, kwargs = (batch,), {}
    for i, a in enumerate(list(args) + list(kwargs.values())):
        if isinstance(a, Tensor):
            if a.numel() == 0:
                raise WnormError(
                    f"data_init: the batch is empty (input {i} has shape {tuple(a.shape)})")
            if a.is_floating_point() and not bool(torch.isfinite(a).all()):
                raise WnormError(f"data_init: input {i} of the batch has NaN or inf values")
    for mname, m in model.named_modules():
        for pname, p in m._parameters.items():
            if p is not None and type(p.data).__name__ == "DTensor":
                raise WnormError(
                    f"data_init: {mname or '<model>'}.{pname} is sharded (a DTensor, e.g. after "
                    "FSDP2's fully_shard); call wnorm.apply and wnorm.data_init on the unsharded "
                    "model, then fully_shard (or DDP)")

    targets, skipped, others = _candidates(model, include_plain)
    targets = _drop_shared(targets, others, skipped)
    mobn = [m for m in model.modules() if isinstance(m, _MeanOnlyBatchNorm)]
    touched = [x for t in targets for x in _tensors(t)]
    touched += [b for m in model.modules() for b in m._buffers.values() if b is not None]
    with torch.no_grad():
        saved = [x.clone() for x in touched]
    p = _Pass(targets, init_scale, process_group,
              {m: n or "<model>" for n, m in model.named_modules() if m in set(mobn)})
    handles = []
    for t in targets:
        handles.append(t.module.register_forward_pre_hook(p.pre))
        handles.append(t.module.register_forward_hook(p.post))
    for m in mobn:
        handles.append(m.register_forward_pre_hook(p.bn_pre))
        handles.append(m.register_forward_hook(p.bn_post))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
            done = list(p.done.values())
            # one host sync for the whole model: every unit of every layer fit
            if done and not bool(torch.stack([ok.all() for *_, ok in done]).all()):
                for t, mu, sigma, ok in done:
                    if not bool(ok.all()):
                        _fail(t, mu, sigma, ok, init_scale, p.count[t.module])
    except BaseException:
        with torch.no_grad():  # leave the model as it was: no half-initialized network
            for x, old in zip(touched, saved):
                x.copy_(old)
        raise
    finally:
        for h in handles:
            h.remove()

    report = InitReport()
    if done:
        flat = torch.cat([torch.cat([mu, sigma]) for _, mu, sigma, _ in done]).cpu()  # one sync
        at = 0
        for t, mu, _, _ in done:
            u = mu.numel()
            report.append(LayerInit(t.name, type(t.module).__name__, "initialized", "",
                                    flat[at:at + u], flat[at + u:at + 2 * u], t.note))
            at += 2 * u
    for t in targets:
        if t.module not in p.done:
            skipped.append(LayerInit(t.name, type(t.module).__name__, "skipped",
                                     "not reached by the forward pass"))
    report.extend(skipped)
    if report.skipped:
        warnings.warn("data_init: layers not initialized: "
                      + "; ".join(f"{r.name} ({r.reason})" for r in report.skipped),
                      stacklevel=2)
    return report
