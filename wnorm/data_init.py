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
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._extension import kernels, readable
from .errors import WnormError
from .mean_only_bn import (
    MeanOnlyBatchNorm1d,
    MeanOnlyBatchNorm2d,
    MeanOnlyBatchNorm3d,
    _MeanOnlyBatchNorm,
)
from .mean_only_fused import _global_state_allows, _has_hooks, _MeanOnlyFusedSequential
from .weight_norm import WN, _Spec, default_dim

__all__ = ["data_init", "InitReport", "LayerInit", "NO_BIAS_NOTE"]

#: :attr:`LayerInit.note` of an initialized layer without a bias: there is no bias to set to
#: :math:`-\mu[t]\,g`, so its pre-activation keeps the mean :math:`\mu[t]\,g` on the batch
#: (a mean-only batch norm after it removes it); only the spread is set to ``init_scale``.
NO_BIAS_NOTE = "no bias: mean not removed"

_INIT_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
_RAW_DTYPES = (torch.float32, torch.float64)
#: containers whose forward is exactly "call each child in turn": data_init may run them itself
_SEQUENTIAL = (nn.Sequential, _MeanOnlyFusedSequential)
_MEAN_ONLY = (MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d)


@dataclass
class LayerInit:
    """What :func:`data_init` did to one layer.

    ``mu`` and ``sigma`` are the per-unit mean and standard deviation of
    :math:`t = v\\cdot x/\\lVert v\\rVert` (of :math:`w\\cdot x` for a plain layer) on the batch,
    before the init; ``None`` for a skipped layer, whose ``reason`` says why. ``note``: what
    an initialized layer's init did not do, e.g. :data:`NO_BIAS_NOTE` for a layer without a
    bias (its pre-activation keeps the mean :math:`\\mu[t]\\,g`; only its spread is set).
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


def _unit_axis(module: nn.Module, y: Tensor) -> int:
    if isinstance(module, nn.Linear):
        return y.dim() - 1
    # ConvNd: (N, C, *spatial) has the weight's rank; unbatched (C, *spatial) one less
    return 1 if y.dim() == _weight_ndim(module) else 0


def _weight_ndim(module: nn.Module) -> int:
    p = module._parameters.get("weight")
    return (p if p is not None else module._parameters["weight_v"]).dim()


def _reason_cannot(module: nn.Module, is_wn: bool) -> str:
    """Why the paper's init cannot set this layer ("" when it can)."""
    if isinstance(module, nn.RNNBase):
        return "recurrent layer: the paper's init does not apply (section 3)"
    if not isinstance(module, _INIT_TYPES):
        return f"{type(module).__name__} has no per-unit pre-activation to standardize"
    if is_wn:
        specs = module.__dict__["_wn"]
        if "weight" not in specs:
            return "its 'weight' is not weight-normalized"
        if not specs["weight"].has_g:
            return f"no per-unit g to set ({specs['weight'].kind} weight)"
        if specs["weight"].dim != default_dim(module):
            return f"g is not one per output unit (dim={specs['weight'].dim})"
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups != 1:
        what = "g" if is_wn else "weight slice"
        return f"ConvTranspose with groups > 1: one {what} serves several output channels"
    return ""


def _distributed(group: Any) -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _reduce(t: Tensor, group: Any) -> Tensor:
    """Sum ``t`` over the ranks when torch.distributed is running; ``t`` itself otherwise."""
    if _distributed(group):
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


class _Initializer:
    """Forward hooks that initialize each target layer at the first call that reaches it."""

    def __init__(self, names: dict[nn.Module, str], is_wn: dict[nn.Module, bool],
                 init_scale: float, group: Any,
                 ties: dict[nn.Module, list[nn.Module]] | None = None) -> None:
        self.names, self.is_wn = names, is_wn
        # targets sharing a g, bias or plain weight with other targets: the first reached is
        # initialized, the others are skipped (setting the shared tensor again would undo it)
        self.ties = ties or {}
        self.init_scale, self.group = init_scale, group
        self.distributed = _distributed(group)
        self.done: dict[nn.Module, LayerInit] = {}
        # layers whose forward runs with w = v itself (raw), with their spec (its cache holds v)
        self.raw: dict[nn.Module, _Spec] = {}
        # the last output handed on with units on axis 1, its version, and its batch mean
        # (None: 0, the layer has a bias)
        self.handoff: tuple[Tensor, int, Tensor | None] | None = None
        # the mean-only BN the last post() applied in its output, and its input's batch mean
        self.folded: _MeanOnlyBatchNorm | None = None
        self.folded_mean: Tensor | None = None

    def hand_on(self, out: Tensor, mean: Tensor | None) -> None:
        """Remember ``out``'s batch mean over every axis but 1 for the layer it goes to next
        (not for inference tensors: they have no version counter to show an in-place edit)."""
        self.handoff = None if out.is_inference() else (out, out._version, mean)

    def mean_of(self, x: Tensor) -> Tensor | None:
        """The mean of ``x`` over every axis but 1 when ``x`` is the (unchanged) output that
        an initialized layer with units on axis 1 just handed on; None otherwise. It is known:
        0 where the layer has a bias, else the scaled mean mu[r]*s/sigma[r] = mu[t]*g."""
        h = self.handoff
        if h is None or x is not h[0] or x._version != h[1]:
            return None
        return x.new_zeros(x.shape[1]) if h[2] is None else h[2]

    def pre(self, module: nn.Module, args: Any) -> None:
        if module in self.done:
            return
        if self.ties and module in self.ties:
            first = next((o for o in self.ties[module] if o in self.done), None)
            if first is not None:  # post() sees it done, and leaves it alone
                how = ("initialized first" if self.done[first].status == "initialized"
                       else "reached first")
                self.done[module] = LayerInit(
                    self.names[module], type(module).__name__, "skipped",
                    f"parameters shared with {self.names[first]}, {how}")
                return
        if self.is_wn[module]:
            spec = module.__dict__["_wn"]["weight"]
            g, v = module._parameters["weight_g"], module._parameters["weight_v"]
            if (spec.kind == WN and spec.plain is None and v.dtype in _RAW_DTYPES
                    and not (torch.compiler.is_compiling() or torch._C._is_tracing())):
                # Raw: the layer computes r = v.x (+ 0), with v itself as its cached weight, so
                # no weight is recomputed; t = r/||v|| is only ever needed through its
                # statistics, which post() rescales. The cache entry is cleared in post().
                # (A compiled or traced forward computes the weight, never the cache: not raw.)
                spec.cache, spec.g, spec.v, spec.gver, spec.vver = v, g, v, g._version, v._version
                self.raw[module] = spec
            else:
                g.fill_(1.0)  # the layer now outputs t = v.x/||v|| (+ 0)
        bias = module._parameters.get("bias")
        if bias is not None:
            bias.zero_()

    def post(self, module: nn.Module, args: Any, y: Tensor,
             fold: _MeanOnlyBatchNorm | None = None) -> Tensor | None:
        """The forward hook (``fold``: see :meth:`_post_kernel`)."""
        self.folded = None
        if module in self.done:
            return None
        spec = self.raw.pop(module, None)
        if spec is not None:
            spec.clear()
            if not self.distributed:
                out = self._post_kernel(module, y, spec, fold)
                if out is not None:
                    return out
            v = module._parameters["weight_v"]
            vnorm = torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != spec.dim])
            if (not self.distributed and y.dim() >= 2 and y.dtype in _RAW_DTYPES
                    and _unit_axis(module, y) == 1):
                return self._post_fast(module, y, vnorm)
        name = self.names[module]
        axis = _unit_axis(module, y)
        units = y.shape[axis] if y.dim() else 0
        wide = torch.promote_types(y.dtype, torch.float32)  # float32 at least; float64 stays
        t = y.detach()
        if t.dtype != wide:
            t = t.to(wide)
        if spec is not None:  # raw output r = v.x: t = r/||v||
            t = t / vnorm.to(wide).view(_along(t.dim(), axis, units))
        dims = [d for d in range(t.dim()) if d != axis]  # reduce in place: no transposed copy
        n = t.numel() // max(units, 1)
        if self.distributed:
            shape = _along(y.dim(), axis, units)
            count = torch.tensor([float(n)], device=t.device)
            total = _reduce(torch.cat([t.sum(dims), count]), self.group)
            n = int(total[-1])
            if n == 0:
                raise WnormError(f"{name} ({type(module).__name__}): data init got an empty batch")
            mu = (total[:-1] / n).view(shape)
            c = t - mu
            sigma = (_reduce(c.pow(2).sum(dims), self.group) / n).sqrt().view(shape)
            scale = self.init_scale / sigma
        else:
            if n == 0:
                raise WnormError(f"{name} ({type(module).__name__}): data init got an empty batch")
            # population statistics, two passes (torch.var_mean is ~15x slower on CPU here)
            mu = t.mean(dim=dims, keepdim=True)
            c = t - mu
            sigma = None  # computed for the report from scale, below
            # init_scale / sqrt(mean(c^2)); (c*c).sum is 5x faster than vector_norm here
            scale = (c * c).sum(dim=dims, keepdim=True).rsqrt_().mul_(
                self.init_scale * math.sqrt(n))
        shift = mu * scale  # the new bias is -shift
        # g (a plain layer: its weight rows' factor) and b as they will be stored, in their
        # dtypes: each must be finite, and g positive (a g that underflows to 0 kills the unit)
        target = module.weight_g if self.is_wn[module] else module.weight
        bias = module.bias
        gs = scale if scale.dtype == target.dtype else scale.to(target.dtype)
        bs = shift if bias is None or shift.dtype == bias.dtype else shift.to(bias.dtype)
        # one sync for the happy path: sigma 0 gives scale inf, then shift inf or NaN; NaN in
        # the statistics reaches shift too; g inf or 0 makes g + 1/g inf (a sum that merely
        # overflows is rechecked unit by unit)
        gw = gs if gs.dtype == wide else gs.to(wide)
        if not math.isfinite(float(bs.sum(dtype=wide) + (gw + gw.reciprocal()).sum())):
            sig = (c * c).mean(dim=dims, keepdim=True).sqrt() if sigma is None else sigma
            ok = ((sig > 0) & torch.isfinite(sig) & torch.isfinite(mu) & torch.isfinite(gs)
                  & (gs > 0) & torch.isfinite(bs))
            idx = (~ok).flatten().nonzero().flatten().tolist()
            if idx:
                self._fail(module, idx, units, n, mu, sig, target.dtype,
                           None if bias is None else bias.dtype)
        if self.is_wn[module]:
            g = target
            g.copy_(gs.view(g.shape) if gs.is_contiguous() else gs.reshape(g.shape))
        else:
            w = target
            w.mul_(gs.reshape(_along(w.dim(), default_dim(module), units)))
        out = c.mul_(scale)  # c is ours: standardize it in place
        if bias is not None:
            bias.copy_(bs.view(bias.shape)).neg_()
        else:
            out += shift  # no bias: the mean stays
        if sigma is None:
            sigma = self.init_scale / scale
        self.done[module] = LayerInit(name, type(module).__name__, "initialized", "",
                                      mu.reshape(units).cpu(), sigma.reshape(units).cpu(),
                                      "" if module.bias is not None else NO_BIAS_NOTE)
        return out if out.dtype == y.dtype else out.to(y.dtype)

    def _post_kernel(self, module: nn.Module, y: Tensor, spec: _Spec,
                     fold: _MeanOnlyBatchNorm | None = None) -> Tensor | None:
        """post() for a raw layer in one process as one C++ call (``csrc/data_init.cpp``): the
        statistics of r = v.x, g, b and the standardized output; None where the kernel does not
        apply (no kernels, another device or dtype, a non-contiguous tensor).

        ``fold``: a standard mean-only BN the driven pass runs right after this layer. For a
        layer without a bias, whose output keeps its (scaled) mean, the kernel returns that
        BN's output instead, ``(r - mu[r])*s/sigma[r] + b_bn``; then ``self.folded`` is the BN
        and ``self.folded_mean`` the mean it subtracted, for the pass to do its bookkeeping."""
        if y.device.type != "cpu":
            return None
        kern = kernels()  # built on first use: not for a model on another device
        p = module._parameters
        v, g, bias = p["weight_v"], p["weight_g"], p.get("bias")
        if (kern is None or not readable(y, v, g, bias) or y.dtype != v.dtype or y.dim() == 0
                or not y.is_contiguous() or not v.is_contiguous() or g.dtype != v.dtype
                or not g.is_contiguous()
                or (bias is not None and (bias.dtype != v.dtype or not bias.is_contiguous()))):
            return None
        axis = _unit_axis(module, y)
        offset = None
        if (fold is not None and bias is None and axis == 1 and y.dim() in fold._ndims
                and y.shape[1] == fold.num_features):  # else the BN runs, and says what is wrong
            b = getattr(fold, "bias", None)  # as its forward reads it (a buffer, even)
            if (isinstance(b, Tensor) and b.dtype == y.dtype and b.device == y.device
                    and b.is_contiguous() and b.numel() == y.shape[1]):
                offset = b
        out, mu, sigma, bad = kern.data_init_layer(y, axis, v, spec.dim, g, bias, self.init_scale,
                                                   offset)
        if bad:  # nothing was written
            self._fail(module, bad, y.shape[axis], y.numel() // y.shape[axis], mu, sigma,
                       g.dtype, None if bias is None else bias.dtype)
        self.done[module] = LayerInit(self.names[module], type(module).__name__, "initialized",
                                      "", mu, sigma, "" if bias is not None else NO_BIAS_NOTE)
        # the mean a bias-less layer's output keeps: mu[t] g = mu[r] s/sigma[r]
        mean = None if bias is not None else torch.mul(mu, g.view(-1))
        if offset is not None:
            self.folded, self.folded_mean, self.handoff = fold, mean, None
        elif axis == 1 and y.dim() >= 2:
            self.hand_on(out, mean)
        return out

    def _post_fast(self, module: nn.Module, y: Tensor, vnorm: Tensor) -> Tensor:
        """post() for a raw layer with units on axis 1, in one process: batch norm's kernel
        gives the standardized output and the statistics of r = v.x in one call; g and b are
        written in place (the rollback in data_init() restores them on an error)."""
        out, mu, scale = torch.native_batch_norm(y, None, None, None, None, True, 0.0, 0.0)
        if self.init_scale != 1.0:
            scale = scale.mul_(self.init_scale)
            out = out.mul_(self.init_scale)
        bias, g = module.bias, module.weight_g
        shift = mu * scale if bias is None else torch.mul(mu, scale, out=bias.view(-1))
        gflat = torch.mul(scale, vnorm, out=g.view(-1))  # g = s/sigma[t], as sigma[t] is
        # batch norm's kernel gives scale 0 where sigma is 0; NaN statistics reach the shift;
        # g inf or 0 (init_scale out of the dtype's range) makes g + 1/g inf. One sync.
        sigma = torch.reciprocal(gflat)  # sigma[r]/||v||; so sigma[t] = s/g
        if not math.isfinite(float(shift.sum() + (gflat + sigma).sum())):
            dims = [0, *range(2, y.dim())]
            sd = y.var(dim=dims, correction=0).sqrt()  # the error path: recomputed, exactly
            ok = ((sd > 0) & torch.isfinite(sd) & torch.isfinite(mu) & torch.isfinite(shift)
                  & torch.isfinite(gflat) & (gflat > 0))
            idx = (~ok).nonzero().flatten().tolist()
            if idx:  # else a sum of finite values overflowed
                self._fail(module, idx, y.shape[1], y.numel() // y.shape[1], mu / vnorm,
                           sd / vnorm, g.dtype, None if bias is None else bias.dtype)
        if bias is None:  # no bias to take the mean away: it stays, scaled (y * scale)
            out = out.add_(shift.view(_along(out.dim(), 1, out.shape[1])))
        else:
            bias.neg_()
        if self.init_scale != 1.0:
            sigma.mul_(self.init_scale)
        self.hand_on(out, None if bias is not None else shift.view(-1))  # the mean stayed
        mu = mu.div_(vnorm)  # mu[t] = mu[r]/||v||
        self.done[module] = LayerInit(self.names[module], type(module).__name__, "initialized",
                                      "", mu.cpu(), sigma.cpu(),
                                      "" if bias is not None else NO_BIAS_NOTE)
        return out

    def _fail(self, module: nn.Module, idx: list[int], units: int, n: int,
              mu: Tensor | None = None, sigma: Tensor | None = None,
              gdtype: torch.dtype | None = None, bdtype: torch.dtype | None = None) -> None:
        """Raise for the bad units ``idx``. With the per-unit ``mu`` and ``sigma`` of t: when
        the batch is fine for them (sigma positive, both finite), what does not fit is
        g = init_scale/sigma[t] or b = -mu[t] g in the layer's dtype, and the message says so."""
        label = f"{self.names[module]} ({type(module).__name__})"
        which = f"{len(idx)} of {units} units ({idx[:10]}{'...' if len(idx) > 10 else ''})"
        if mu is not None and sigma is not None and gdtype is not None:
            at = torch.tensor(idx, dtype=torch.long)
            m = mu.detach().reshape(-1).cpu().double()[at]
            sd = sigma.detach().reshape(-1).cpu().double()[at]
            gi = torch.finfo(gdtype)
            bi = torch.finfo(bdtype) if bdtype is not None else None

            def fits(scale: float) -> tuple[bool, bool]:
                """Whether g = scale/sigma[t] (finite, not 0) and b = -mu[t] g (finite) fit."""
                g = scale / sd
                g_ok = bool(((g <= gi.max) & (g.to(gdtype) != 0)).all())
                b_ok = bi is None or bool(((m.abs() * g) <= bi.max).all())
                return g_ok, b_ok

            # the batch is fine for these units when the init with init_scale 1 would fit: then
            # init_scale is what puts g (or b) out of the dtype's range
            if (bool(((sd > 0) & torch.isfinite(sd) & torch.isfinite(m)).all())
                    and all(fits(1.0))):
                s = self.init_scale
                g_ok, b_ok = fits(s)
                seen = (f"sigma[t] on this batch is in [{float(sd.min()):.3g}, "
                        f"{float(sd.max()):.3g}] for them, and init_scale 1 would fit")
                if not g_ok:
                    big = bool(((s / sd) > gi.max).any())
                    raise WnormError(
                        f"{label}: init_scale={s!r} is too {'large' if big else 'small'} for "
                        f"this layer's {gdtype}: g = init_scale/sigma[t] "
                        f"{'overflows it' if big else 'underflows it to 0'} for {which} "
                        f"({seen}; {gdtype} holds normal magnitudes from "
                        f"{gi.smallest_normal:.3g} to {gi.max:.3g}); use an init_scale nearer 1"
                    )
                if not b_ok:
                    raise WnormError(
                        f"{label}: init_scale={s!r} is too large for this layer's {bdtype}: the "
                        f"bias b = -mu[t]*init_scale/sigma[t] overflows it for {which} ({seen}; "
                        f"|mu[t]|/sigma[t] is up to {float((m.abs() / sd).max()):.3g}); use a "
                        "smaller init_scale"
                    )
        raise WnormError(
            f"{label}: the pre-activations of {len(idx)} "
            f"of {units} units have sigma 0 or non-finite statistics on the init batch "
            f"({int(n)} values per unit; units {idx[:10]}{'...' if len(idx) > 10 else ''}); "
            "data init needs a batch on which every unit varies (more than one example, "
            "finite inputs, no zero rows in the weight)"
        )


def _mean_only_step(bn: _MeanOnlyBatchNorm, x: Tensor, apply: bool = True) -> Tensor:
    """What ``bn(x)`` does during the init pass, without its own reduction: with ``_init_mean``
    set (and the running mean set to it) the forward's output is x - mean + b in every mode; in
    training its running-mean update moves the running mean from that mean to the same mean,
    and counts the batch. ``apply=False``: ``x`` is that output already (folded into the
    layer before); only the checks and the count."""
    bn._check(x)
    bn._check_batch(x)
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
    if not apply:
        return x
    shift = bn.bias - bn.__dict__["_init_mean"]
    if shift.dtype != x.dtype:  # the input's dtype out, as the layer's forward gives
        shift = shift.to(x.dtype)
    return x + shift.view((1, -1) + (1,) * (x.dim() - 2))


def _shared_parameters(names: dict[nn.Module, str], is_wn: dict[nn.Module, bool],
                       others: list[tuple[str, nn.Module]], touched: list[Tensor],
                       skipped: list[LayerInit]) -> dict[nn.Module, list[nn.Module]]:
    """Find the targets whose g, bias or plain weight another module holds too (tied layers),
    appending the targets' such tensors to ``touched``. A target sharing one with a module the
    pass does not initialize is dropped from ``names`` into ``skipped`` (setting it would change
    that module too: the init's own input, for a module that ran before). Returns, for targets
    sharing with other targets, those targets: the pass initializes the first it reaches."""
    # the common case, nothing shared, costs a list and a dict (data_init is benchmarked)
    mine = [(t, m) for m in names
            for t in (m._parameters.get("weight_g"), m._parameters.get("bias"),
                      None if is_wn[m] else m._parameters.get("weight"))
            if t is not None]
    owner = {id(t): m for t, m in mine}
    ties: dict[nn.Module, list[nn.Module]] = {}
    if len(owner) == len(mine):
        touched.extend(t for t, _ in mine)
    else:
        owner = {}
        for t, m in mine:
            o = owner.setdefault(id(t), m)
            if o is m:
                touched.append(t)
            elif o not in ties.get(m, ()):
                ties.setdefault(m, []).append(o)
                ties.setdefault(o, []).append(m)
    drop: dict[nn.Module, str] = {}
    for label, o in others:
        for t in o._parameters.values():
            if t is not None and id(t) in owner:
                drop.setdefault(owner[id(t)], label)
    if not drop and not ties:
        return ties
    queue = list(drop)
    while queue:  # a target tied to a dropped one shares with a module left alone, too
        m = queue.pop()
        for o in ties.pop(m, ()):
            if o not in drop:
                drop[o] = names[m]
                queue.append(o)
    for m, label in drop.items():
        skipped.append(LayerInit(
            names.pop(m), type(m).__name__, "skipped",
            f"parameters shared with {label}, which data_init does not initialize"))
        del is_wn[m]
        ties.pop(m, None)
    for m in ties:
        ties[m] = [o for o in ties[m] if o not in drop]
    return {m: os for m, os in ties.items() if os}


def _positive_scale(value: Any) -> float:
    """``init_scale`` as a float: any real number (Python, NumPy, a 0-dim real tensor) that is
    positive and finite; a bool is refused (True is no scale anyone means)."""
    x: float | None = None
    if type(value) is float:
        x = value
    elif isinstance(value, Tensor):
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


def _along(ndim: int, axis: int, size: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = size
    return tuple(shape)


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
    weight-normalized Linear/ConvNd/ConvTransposeNd layer, at the first call that reaches it,
    computes :math:`t = v\cdot x/\lVert v\rVert` per output unit, sets ``g`` and ``bias`` so its
    pre-activation is standardized to mean 0 and std ``init_scale`` on the batch, and hands that
    standardized output on, so later layers are initialized on what they will see. Residual
    branches, shared modules (initialized at their first call) and nested containers work,
    because the init follows the forward pass itself. Statistics are computed in float32 at
    least, over the batch and every spatial position; under ``torch.distributed`` they are
    all-reduced, so every rank gets the same ``g`` and ``b`` as one process on the union of the
    ranks' batches.
    Mean-only batch norm layers get the batch mean of their input as their running mean.
    The pass uses forward hooks on the layers; a model that is a tree of ``nn.Sequential``
    containers over leaf modules, none of them hooked, is instead run child by child by
    ``data_init`` itself (what ``Sequential.forward`` does), with the same result and less
    overhead. On CPU each layer's statistics, ``g``, ``b`` and standardized output come from
    one call of wnorm's C++ kernels (built on first use, like :mod:`wnorm.optim`'s; PyTorch
    ops where they cannot be built).

    A layer without a bias has no :math:`b` to take the mean away: its ``g`` is set as above,
    so its pre-activation has std ``init_scale`` but keeps the mean :math:`\mu[t]\,g` on the
    batch (a mean-only batch norm after it removes it). It is reported ``"initialized"`` with
    the note :data:`NO_BIAS_NOTE` (``"no bias: mean not removed"``).

    Tied layers: the pass sets each target's ``g``, ``bias`` (and, with ``include_plain``, its
    weight). Where one of these is shared with another module (a tie, e.g. from
    :func:`wnorm.apply`), setting it for one layer would change the other after the fact, so:
    among targets sharing it, the first the pass reaches is initialized and the others are
    skipped (reason ``"parameters shared with <name>, initialized first"``); a target sharing
    it with a module the pass does not initialize (e.g. a tied embedding) is skipped. Sharing
    only ``v`` is no tie here: both layers are initialized.

    Args:
        model: the model, changed in place.
        batch: the input: a tensor, a tuple/list of positional arguments, or a mapping of
            keyword arguments. The paper used 500 training examples.
        init_scale: :math:`s`, the std of every initialized pre-activation (default 1.0): a
            positive finite real number (Python, NumPy, or a 0-dim real tensor; not a bool).
        include_plain: also initialize plain (not weight-normalized) Linear/Conv layers, by
            scaling each weight row by :math:`s/\sigma` and setting the bias to
            :math:`-\mu s/\sigma`: the paper's "normal parameterization" baseline.
        process_group: the ``torch.distributed`` group to reduce over (default: the world).

    Returns:
        An :class:`InitReport`: per layer, its name, the :math:`\mu[t]` and :math:`\sigma[t]`
        measured before the init, and whether it was initialized (with a ``note`` on what its
        init did not do) or skipped (and why). Layers that cannot be initialized (recurrent
        ones, Embedding, grouped ConvTranspose, tied ones as above, layers the pass did not
        reach; with ``include_plain``, plain ones too) are skipped with a warning, never
        silently.

    Raises:
        WnormError: ``init_scale`` is not a positive finite number, the batch is empty or
            non-finite, a layer's :math:`\sigma[t]` is 0 (e.g. one example through a Linear),
            or its :math:`g = s/\sigma[t]` or :math:`b` does not fit the layer's dtype (the
            message says whether the batch or ``init_scale`` is at fault). The model is left
            unchanged when this happens: parameters and every buffer (e.g. BatchNorm's running
            statistics, which a train-mode pass updates) are restored.

    Example:
        >>> import torch, wnorm
        >>> net = wnorm.apply(torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(),
        ...                                        torch.nn.Linear(8, 3)))
        >>> report = wnorm.data_init(net, torch.randn(64, 5))
        >>> [r.status for r in report]
        ['initialized', 'initialized']
        >>> y = net(torch.randn(64, 5))  # a fresh batch: close to standardized, not exactly
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
            if (a.is_floating_point() and not math.isfinite(float(a.sum()))
                    and not bool(torch.isfinite(a).all())):  # the sum may just overflow
                raise WnormError(f"data_init: input {i} of the batch has NaN or inf values")

    names: dict[nn.Module, str] = {}
    is_wn: dict[nn.Module, bool] = {}
    report = InitReport()
    skipped: list[LayerInit] = []
    mobn: list[tuple[str, _MeanOnlyBatchNorm]] = []
    others: list[tuple[str, nn.Module]] = []  # modules with parameters that are no target
    buffers: list[Tensor] = []  # the pass may change any buffer (BatchNorm's running stats...)
    # A tree of plain Sequentials over leaf modules, none of them hooked, one tensor in: the pass
    # can run each child in turn itself (what Sequential.forward does) and initialize each layer
    # right after its call, without hooks; otherwise hooks on the layers do it.
    drive = (type(model) in _SEQUENTIAL and len(args) == 1 and not kwargs
             and isinstance(args[0], Tensor) and _global_state_allows())
    for mname, m in model.named_modules():
        label = mname or "<model>"
        wn = bool(m.__dict__.get("_wn"))
        if drive and (_has_hooks(m) if type(m) in _SEQUENTIAL else bool(m._modules)):
            drive = False  # a container that is not a plain Sequential, or one run otherwise
        if m._buffers:
            buffers.extend(b for b in m._buffers.values() if b is not None)
        if isinstance(m, _MeanOnlyBatchNorm):
            mobn.append((label, m))
        if not wn and not (include_plain and isinstance(m, _INIT_TYPES)
                           and m._parameters.get("weight") is not None):
            if m._parameters:
                others.append((label, m))
            continue
        why = _reason_cannot(m, wn)
        if why:  # a candidate (weight-normalized, or plain with include_plain) it cannot set
            skipped.append(LayerInit(label, type(m).__name__, "skipped", why))
            others.append((label, m))
            continue
        names[m], is_wn[m] = label, wn

    # What the pass may change: g, biases and plain weights of the targets, and every buffer.
    touched: list[Tensor] = []
    ties = _shared_parameters(names, is_wn, others, touched, skipped)
    touched += buffers

    init = _Initializer(names, is_wn, float(init_scale), process_group, ties)
    drive = drive and not any(_has_hooks(m) for m in names) and not any(
        _has_hooks(m) for _, m in mobn)
    handles = []
    if not drive:
        for m in names:
            handles.append(m.register_forward_pre_hook(init.pre))
            handles.append(m.register_forward_hook(init.post))
    mobn_means: dict[nn.Module, Tensor] = {}
    mobn_names = {m: label for label, m in mobn}

    def mobn_pre(module: nn.Module, inp: tuple[Any, ...], mean: Tensor | None = None) -> None:
        if module in mobn_means:
            return
        x = inp[0]
        module._check(x)  # rank and width, with the layer's own message
        if x.numel() == 0:
            raise WnormError(
                f"data_init: {mobn_names[module]} ({type(module).__name__}) got an empty batch "
                f"{tuple(x.shape)}; its running mean is the batch mean of its input")
        if mean is None:  # known when x is the standardized output of a layer just set
            mean = init.mean_of(x)
        if mean is None:
            xw = x if x.dtype in _RAW_DTYPES else x.float()
            dims = [0, *range(2, x.dim())]
            if init.distributed:
                total = _reduce(torch.cat([xw.sum(dim=dims), torch.tensor(
                    [x.numel() / x.shape[1]], device=x.device)]), process_group)
                mean = total[:-1] / total[-1]
            else:
                mean = xw.mean(dim=dims)
        mobn_means[module] = mean
        # Every call of this pass (a shared layer's later calls too, and under torch.distributed
        # every rank) subtracts this mean, not its own batch mean, so that the layers after it
        # are initialized on what one process on the union of the batches would see. Set before
        # the layer runs: in eval mode it subtracts its running mean.
        # (a plain instance attribute: the class declares it; no Module.__setattr__ needed)
        module.__dict__["_init_mean"] = mean if mean.dtype == x.dtype else mean.to(x.dtype)
        if module.track_running_stats:
            rm = module.running_mean
            rm.copy_(mean if mean.dtype == rm.dtype else mean.to(rm.dtype))

    def mobn_post(module: nn.Module, inp: tuple[Any, ...], out: Tensor) -> Tensor | None:
        # for a subclass whose own forward may not use _init_mean: the output it should give
        mean = mobn_means.get(module)
        if mean is None:
            return None
        if module.track_running_stats:  # a train-mode forward moved it toward the local mean
            module.running_mean.copy_(mean.to(module.running_mean.dtype))
        x = inp[0]
        return x + (module.bias - mean).to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))

    # mean-only BNs whose forward may not follow the init protocol (_init_mean): a subclass's
    # or an instance's own forward; their output is corrected by mobn_post
    own_forward = {m for _, m in mobn if type(m).forward is not _MeanOnlyBatchNorm.forward
                   or "forward" in m.__dict__}
    # the ones the driven pass may apply itself (_mean_only_step): wnorm's own classes,
    # nothing of them overridden
    standard = {m for _, m in mobn if type(m) in _MEAN_ONLY and not (
        m.__dict__.keys() & {"forward", "_check", "_check_batch", "_track"})}
    if not drive:
        for _, m in mobn:
            handles.append(m.register_forward_pre_hook(mobn_pre))
            if m in own_forward:
                handles.append(m.register_forward_hook(mobn_post))

    def run(seq: nn.Module, x: Any) -> Any:
        """``seq(x)`` for a Sequential of the driven tree: its children in turn, each target
        layer and mean-only BN with what its hooks would have done around its call."""
        mods = list(seq._modules.values())  # a None child fails as in Sequential.forward
        i = 0
        while i < len(mods):
            m = mods[i]
            i += 1
            if type(m) in _SEQUENTIAL:
                x = run(m, x)
            elif m in names:
                nxt = mods[i] if i < len(mods) else None
                fold = nxt if nxt in standard and nxt not in mobn_means else None
                init.pre(m, (x,))
                y = m(x)
                out = init.post(m, (x,), y, fold)
                x = y if out is None else out
                if fold is not None and init.folded is fold:  # x is the BN's output already
                    mobn_pre(fold, (x,), init.folded_mean)
                    _mean_only_step(fold, x, apply=False)
                    i += 1
            elif isinstance(m, _MeanOnlyBatchNorm):
                mobn_pre(m, (x,))
                if m in standard:
                    x = _mean_only_step(m, x)
                else:
                    y = m(x)
                    out = mobn_post(m, (x,), y) if m in own_forward else None
                    x = y if out is None else out
            else:
                x = m(x)
        return x

    with torch.no_grad():
        saved = [t.clone() for t in touched]
    try:
        with torch.no_grad():
            if drive:
                run(model, args[0])
            else:
                model(*args, **kwargs)
    except BaseException:
        with torch.no_grad():  # leave the model as it was: no half-initialized network
            for t, old in zip(touched, saved):
                t.copy_(old)
        raise
    finally:
        for h in handles:
            h.remove()
        for spec in init.raw.values():  # reached by the pass, but it failed before post()
            spec.clear()
        for _, m in mobn:
            m.__dict__.pop("_init_mean", None)

    report.extend(init.done.values())  # in the order the pass reached them
    for m, label in names.items():
        if m not in init.done:
            skipped.append(LayerInit(label, type(m).__name__, "skipped",
                                     "not reached by the forward pass"))
    report.extend(skipped)
    if report.skipped:
        warnings.warn(
            "data_init: layers not initialized: "
            + "; ".join(f"{r.name} ({r.reason})" for r in report.skipped),
            stacklevel=2,
        )
    return report
