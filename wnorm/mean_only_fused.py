r"""Mean-only batch norm computed inside the layer before it, without sweeps over the activations.

For a layer :math:`t = W \ast x` (Linear or ConvNd, no bias) followed by mean-only batch norm
:math:`\tilde t = t - \mu[t] + b`, linearity gives the batch mean from one small evaluation of
the same layer on the sum of the batch,

.. math::
    \mu[t]_c = \frac{1}{N P} \sum_p \Big(W \ast \sum_n x_n\Big)_{c,p}, \qquad
    \tilde t = W \ast x + (b - \mu[t]),

with N samples and P output positions, so the mean is subtracted as the layer's own bias: no
reduction over :math:`t` and no extra pass to subtract it. For a convolution the small
evaluation needs only :math:`S[k, i]`, the batch sum of input channel k under kernel tap i over
all output positions, :math:`\mu[t]_c = \sum_{k,i} W[c, k, i]\, S[k, i] / (N P)`; the taps
are separable, so :math:`S` is two small matmuls with a 0/1 matrix per spatial axis.
Backward: the bias gradient :math:`\sum \nabla_{\tilde t} L` (which the convolution's backward
computes anyway) flows into :math:`\mu` and from there to :math:`W` (an outer product with
:math:`S`) and to every sample of :math:`x` (the adjoint matmuls, then one in-place add on
:math:`\nabla_x L`). A Linear layer at a small batch instead centers its input,
:math:`\tilde t = (x - \bar x) W^T + b`, in plain autograd ops. The outputs, gradients and
running mean equal the unfused pair's up to rounding. In eval mode the running mean is used
as a bias: no pass over the activations either (:func:`wnorm.fold` leaves plain layers for
deployment).

A leaky ReLU or ReLU right before such a convolution pair is folded in too: its output and the
batch sum of that output come from one pass (wnorm's C++ kernel on CPU), and in the backward the
mean's batch-constant input-gradient term is added inside the activation's own backward pass, so
the pair adds no pass over the activations at all.

:func:`fuse_mean_only` switches this on for every such pair in the ``nn.Sequential`` containers
of a model. The module tree, parameters, state dict keys and the layers' own behaviour when
called alone are unchanged; only the container's forward takes the shortcut, and only when both
modules could have been called plainly (no hooks, no tracing or compiling, no autocast, an input
of the expected rank, dtype and device). Otherwise it calls them one after the other as before.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from ._extension import kernels, readable
from .errors import WnormError
from .mean_only_bn import (
    MeanOnlyBatchNorm1d,
    MeanOnlyBatchNorm2d,
    MeanOnlyBatchNorm3d,
    _MeanOnlyBatchNorm,
)

__all__ = ["fuse_mean_only"]

_aten = torch.ops.aten
_fx = torch.fx._symbolic_trace
_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
_fx_tracing = getattr(_fx, "is_fx_symbolic_tracing", _fx.is_fx_tracing)  # the former: torch >= 2.7

#: layer class -> (the mean-only batch norm class that fits its output, number of spatial dims)
_CONVS: dict[type[nn.Module], tuple[type[_MeanOnlyBatchNorm], int]] = {
    nn.Conv1d: (MeanOnlyBatchNorm1d, 1),
    nn.Conv2d: (MeanOnlyBatchNorm2d, 2),
    nn.Conv3d: (MeanOnlyBatchNorm3d, 3),
    nn.ConvTranspose1d: (MeanOnlyBatchNorm1d, 1),
    nn.ConvTranspose2d: (MeanOnlyBatchNorm2d, 2),
    nn.ConvTranspose3d: (MeanOnlyBatchNorm3d, 3),
}
# A subclass that overrides forward computes something else: match on the forward function
# (weight_norm's generated subclasses keep the original one).
_FORWARDS = {cls.forward: (cls, bn, d) for cls, (bn, d) in _CONVS.items()}
_FORWARDS[nn.Linear.forward] = (nn.Linear, MeanOnlyBatchNorm1d, 0)
_HELPERS = {cls: ("_conv_forward",) if cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
            else ("_output_padding",) for cls in _CONVS}
_FUSED_DTYPES = (torch.float32, torch.float64)
#: inputs and weights of these exact types only: a tensor subclass (a FakeTensor used outside
#: its mode, a DTensor, a quantized weight) gets the plain calls, which it knows how to run
_PLAIN_TYPES = (Tensor, nn.Parameter)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


def _constant(make: Any) -> Any:
    """``make`` cached by its arguments, except while a dispatch mode (FakeTensorMode, ...) is
    active: a tensor made then belongs to that mode and must not outlive it in the cache."""
    cached = functools.lru_cache(maxsize=512)(make)

    @functools.wraps(make)
    def get(*args: Any) -> Any:
        return make(*args) if _dispatch_modes() else cached(*args)

    get.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return get


def _read_by(size: int, k: int, stride: int, pad: int, dil: int, out: int) -> list[list[bool]]:
    """[tap][position]: whether kernel tap i reads input position l at some output position
    (zeros padding: taps that land in the padding read nothing). Plain Python: no tensor data
    is needed to decide which positions are read."""
    return [[(pos + pad - i * dil) % stride == 0 and 0 <= (pos + pad - i * dil) // stride < out
             for pos in range(size)] for i in range(k)]


@_constant
def _taps(size: int, k: int, stride: int, pad: int, dil: int, out: int, dtype: torch.dtype,
          device: torch.device) -> Tensor:
    """R[i, l] = 1 where kernel tap i reads input position l (see :func:`_read_by`). Cached,
    so made as ordinary tensors even under ``torch.inference_mode`` (an inference tensor cannot
    be saved for a backward)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(_read_by(size, k, stride, pad, dil, out), dtype=dtype,
                            device=device)


@_constant
def _unread(geometry: tuple[tuple[int, ...], ...], device: torch.device) -> Tensor | None:
    """A mask of the input positions that no kernel tap reads (a stride longer than the
    kernel's reach), or None when every position is read. ``geometry``: per spatial axis,
    (size, kernel, stride, padding, dilation, output size)."""
    unread = [[not any(col) for col in zip(*_read_by(*axis))] for axis in geometry]
    if not any(any(axis) for axis in unread):
        return None
    with torch.inference_mode(False), torch.no_grad():
        masks = [torch.tensor(axis, device=device) for axis in unread]
        out = masks[0]
        for m in masks[1:]:  # unread if unread along any axis
            out = out.unsqueeze(-1) | m
        return out


def _conv_mean(ctx: Any, x: Tensor, xs: Tensor, w: Tensor, args: tuple[Any, ...]) -> Tensor:
    """The batch mean of ``conv(x, w)`` per output channel from the batch sum ``xs``; keeps on
    ``ctx`` what :func:`_conv_mean_backward` needs (``ctx.kern``: wnorm's C++ kernels where
    they take these tensors, else None)."""
    stride, padding, dilation, transposed, _, groups = args
    ctx.kern = None
    if transposed:
        s = torch.convolution(xs, w, None, *args)
        count = x.shape[0] * (s.numel() // s.shape[1])
        mean = s.sum(dim=[0, *range(2, s.dim())]) / count
        ctx.s_shape, ctx.taps = s.shape, ()
    else:
        ksize, insize = w.shape[2:], x.shape[2:]
        out = [(n + 2 * p - d * (k - 1) - 1) // st + 1
               for n, k, st, p, d in zip(insize, ksize, stride, padding, dilation)]
        geometry = tuple(zip(insize, ksize, stride, padding, dilation, out))
        ctx.taps = tuple(_taps(*axis, x.dtype, x.device) for axis in geometry)
        count = x.shape[0] * math.prod(out)
        ctx.unread = _unread(geometry, x.device)
        kern = _mean_kernels(xs, w)
        if kern is not None:  # one call for the window sums and the mean
            mean, ctx.sums = kern.conv_mean_forward(xs[0], w, ctx.taps, groups, count)
            ctx.kern = kern
        else:
            ctx.sums = _window_sums(xs[0], ctx.taps, ctx.unread)
            mean = (w.reshape(groups, w.shape[0] // groups, -1)
                    @ ctx.sums.reshape(groups, -1, 1)).reshape(-1) / count
    ctx.args, ctx.count = args, count
    return mean


def _cpu_kernels(need: str, *tensors: Tensor) -> Any | None:
    """wnorm's C++ kernels (built on first use) when they have ``need`` and can read every
    tensor: CPU, float/double of one dtype, contiguous, plain (:func:`readable`); else None."""
    dt = tensors[0].dtype
    if dt not in _FUSED_DTYPES or not readable(*tensors) or any(
            t.device.type != "cpu" or t.dtype != dt or not t.is_contiguous() for t in tensors):
        return None
    kern = kernels()
    return kern if kern is not None and hasattr(kern, need) else None


def _mean_kernels(xs: Tensor, w: Tensor) -> Any | None:
    """The kernels for the convolution mean's small algebra on ``xs`` and ``w``, or None."""
    return _cpu_kernels("conv_mean_forward", xs, w)


def _conv_mean_backward(ctx: Any, gsum: Tensor, xs: Tensor, w: Tensor, in_channels: int,
                        gw: Tensor | None, need_x: bool, graph: bool) -> tuple[Any, Any]:
    """(the batch-constant input-gradient term, shaped like ``xs``, or None; ``gw``, the
    convolution's weight gradient, plus the mean's term) given the bias gradient ``gsum``."""
    args, taps = ctx.args, ctx.taps
    need_w = gw is not None
    if (ctx.kern is not None and not graph and gsum.dtype == w.dtype
            and gsum.is_contiguous() and (gw is None or gw.is_contiguous())
            and readable(gsum, gw)):  # e.g. vmap's batched gradients are not
        gxs = ctx.kern.conv_mean_backward(gsum, w, ctx.sums, taps, args[5], ctx.count, gw,
                                          need_x)
        return (None if gxs is None else gxs.unsqueeze(0)), gw
    gmean = (gsum / -ctx.count).to(w.dtype)  # dL/dmean, with dmean/ds = 1/count folded in
    if args[3]:  # transposed: back through the layer on the one-sample batch sum
        gs = gmean.view((1, -1) + (1,) * (xs.dim() - 2)).expand(ctx.s_shape)
        gxs, gw2, _ = _aten.convolution_backward(
            gs.contiguous(), xs, w, None, *args, [need_x, need_w, False])
        return gxs, _add(gw, gw2, graph)
    groups = args[5]
    gxs = None
    if need_w:
        sums = _window_sums(xs[0], taps, ctx.unread) if graph else ctx.sums
        gw2 = (gmean.view(groups, -1, 1) * sums.reshape(groups, 1, -1)).view(w.shape)
        gw = _add(gw, gw2, graph)
    if need_x:
        wg = w.reshape(groups, w.shape[0] // groups, -1)
        gsums = (gmean.view(groups, 1, -1) @ wg).view(in_channels, *w.shape[2:])
        gxs = _spread(gsums, taps).unsqueeze(0)
    return gxs, gw


def _add(a: Tensor | None, b: Tensor | None, graph: bool) -> Tensor | None:
    """``a + b``, in place on ``a`` unless a double backward will follow (``graph``)."""
    if a is None or b is None:
        return a
    return a + b if graph else a.add_(b)


class _ConvMeanOnly(torch.autograd.Function):
    r"""``conv(x, w) - mean + shift`` with the batch mean computed from ``sum_n x_n``; returns
    the mean too.

    Convolutions: the mean is :math:`w \cdot S / (N P)`, where :math:`S[k, i]`, the sum of
    input channel k under kernel tap i over all output positions, comes from two small matmuls
    of the batch sum with a 0/1 matrix per spatial axis (separable). Transposed convolutions
    run the layer on the one-sample batch sum instead.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, shift: Tensor, args: tuple[Any, ...]) -> Any:
        xs = x.sum(0, keepdim=True)
        mean = _conv_mean(ctx, x, xs, w, args)
        y = torch.convolution(x, w, shift - mean, *args)
        ctx.save_for_backward(x, w, xs)
        ctx.mark_non_differentiable(mean)
        return y, mean

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_mean: Any) -> tuple[Tensor | None, ...]:
        x, w, xs = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        graph = torch.is_grad_enabled()  # create_graph: a double backward will follow
        if graph:  # xs must be a function of x in that graph, not a saved constant
            xs = x.sum(0, keepdim=True)
        gx, gw, gsum = _aten.convolution_backward(
            grad, x, w, [grad.shape[1]], *ctx.args, [need_x, need_w, True])
        if need_x or need_w:
            gxs, gw = _conv_mean_backward(ctx, gsum, xs, w, x.shape[1], gw, need_x, graph)
            gx = _add(gx, gxs, graph)  # the same term for every sample of the batch
        return gx, gw, gsum, None


class _ActConvMeanOnly(torch.autograd.Function):
    """``conv(act(u), w) - mean + shift`` for ``act`` = leaky ReLU (ReLU: slope 0), the activation
    that precedes the layer folded in: forward, the activation and its batch sum in one pass;
    backward, the mean's batch-constant input-gradient term added inside the activation's
    backward. With wnorm's C++ kernels each is one sweep (CPU, contiguous float/double); without,
    the same math in PyTorch ops.

    Like ``nn.ReLU``/``nn.LeakyReLU`` (slope >= 0), the backward takes its mask from the
    activation's output, which is internal here: an in-place edit of ``u`` after the forward
    (e.g. an in-place ReLU on a skip path) does not disturb it. ``u`` itself is only needed to
    rebuild the graph for a double backward, or for a negative slope.
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, w: Tensor, shift: Tensor, args: tuple[Any, ...],
                slope: float) -> Any:
        kern = _act_kernels(u)
        if kern is not None:
            x, xs = kern.act_forward_sum(u, slope)
            xs = xs.unsqueeze(0)
        else:
            x = _act(u, slope)
            xs = x.sum(0, keepdim=True)
        mean = _conv_mean(ctx, x, xs, w, args)
        y = torch.convolution(x, w, shift - mean, *args)
        ctx.save_for_backward(x, w, xs)
        # u without autograd's saved-tensor version check: checked by hand where it is used
        ctx.u, ctx.u_version = u, (None if u.is_inference() else u._version)
        ctx.slope, ctx.act_kern = slope, kern
        ctx.mark_non_differentiable(mean)
        return y, mean

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_mean: Any) -> tuple[Tensor | None, ...]:
        x, w, xs = ctx.saved_tensors
        need_u, need_w = ctx.needs_input_grad[:2]
        slope = ctx.slope
        graph = torch.is_grad_enabled()
        if graph or slope < 0:
            u = ctx.u
            if ctx.u_version is not None and u._version != ctx.u_version:
                raise RuntimeError(
                    "wnorm.fuse_mean_only: the input of a folded activation was modified by an "
                    "in-place operation after the forward, and this backward needs it (a double "
                    "backward, or a negative slope); call fuse_mean_only(model, enabled=False)")
            if graph:  # x and xs as functions of u, for the double backward
                x = _act(u, slope)
                xs = x.sum(0, keepdim=True)
        mask_of = x if slope >= 0 else ctx.u  # x > 0 exactly where u > 0 when slope >= 0
        gx, gw, gsum = _aten.convolution_backward(
            grad, x, w, [grad.shape[1]], *ctx.args, [need_u, need_w, True])
        gu = None
        if need_u or need_w:
            gxs, gw = _conv_mean_backward(ctx, gsum, xs, w, x.shape[1], gw, need_u, graph)
            if need_u:
                if graph:
                    gx = gx + gxs
                    gu = torch.where(mask_of > 0, gx, gx * slope if slope else 0.0)
                elif (ctx.act_kern is not None and gx.is_contiguous()
                      and mask_of.is_contiguous() and readable(gx, mask_of, gxs)):
                    gu = ctx.act_kern.act_backward_add_(gx, mask_of, gxs.contiguous(), slope)
                elif slope == 0:
                    gu = _aten.threshold_backward(gx.add_(gxs), x, 0)
                else:
                    gu = _aten.leaky_relu_backward(gx.add_(gxs), mask_of, slope, slope >= 0)
        return gu, gw, gsum, None, None


def _act(u: Tensor, slope: float) -> Tensor:
    # relu for slope 0: leaky_relu(-inf, 0.0) is 0 * -inf = NaN
    return F.relu(u) if slope == 0 else F.leaky_relu(u, slope)


def _act_kernels(u: Tensor) -> Any | None:
    """The kernels for the folded activation on ``u``, or None."""
    return _cpu_kernels("act_forward_sum", u)


#: Up to this batch size a Linear pair centers its input (:func:`_centered_linear`); above it,
#: :class:`_LinearMeanOnly`. Both are exact; on a 2-core AVX-512 CPU, 256 -> 256 layers, the
#: first was cheaper at batch 1-256 (no Python in its backward), the second at 500 and more
#: (fewer passes over the input).
_CENTER_MAX_BATCH = 256


def _centered_linear(x: Tensor, w: Tensor, shift: Tensor, track: bool) -> tuple[Tensor, Any]:
    """``x @ w.T - mean + shift`` for (N, in) inputs as ``(x - mean_n x) @ w.T + shift``: the
    layer is linear, so the batch mean of its output is the layer applied to the batch mean of
    its input. Plain autograd ops: exact gradients of any order and forward-mode AD, with no
    Python in the backward. Returns the batch mean of ``x @ w.T`` too (detached) when ``track``,
    for the running mean, else None."""
    xbar = x.mean(0)
    y = torch.addmm(shift, x - xbar, w.t())
    return y, (torch.mv(w.detach(), xbar.detach()) if track else None)


class _LinearMeanOnly(torch.autograd.Function):
    """``x @ w.T - mean + shift`` for (N, in) inputs, the mean from ``w @ sum_n x_n / N``;
    returns the mean too."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, shift: Tensor) -> Any:
        xs = x.sum(0)
        mean = (w @ xs).div_(x.shape[0])
        y = torch.addmm(shift - mean, x, w.t())
        ctx.save_for_backward(x, w, xs)
        ctx.mark_non_differentiable(mean)
        return y, mean

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_mean: Any) -> tuple[Tensor | None, ...]:
        x, w, xs = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        graph = torch.is_grad_enabled()
        if graph:  # xs as a function of x, for the double backward
            xs = x.sum(0)
        gsum = grad.sum(0)
        gmean = gsum / -x.shape[0]  # dL/dmean with dmean/d(w xs) = 1/N folded in
        gx = gw = None
        if need_x:  # grad @ w, plus the same row for every sample
            gx = grad @ w
            gx = gx + gmean @ w if graph else gx.add_(gmean @ w)
        if need_w:
            gw = grad.t() @ x
            gw = gw + torch.outer(gmean, xs) if graph else gw.addr_(gmean, xs)
        return gx, gw, gsum


def _window_sums(xs: Tensor, taps: tuple[Tensor, ...], unread: Tensor | None = None) -> Tensor:
    """S[k, i...] = sum over l... of xs[k, l...] * prod_d taps[d][i_d, l_d]. Positions in
    ``unread`` are zeroed first: their 0 taps would turn an inf or NaN there into NaN, where
    the convolution never reads them."""
    if unread is not None:
        xs = xs.masked_fill(unread, 0)
    if len(taps) == 1:
        return xs @ taps[0].t()
    if len(taps) == 2:  # (K1, H) @ (C, H, W) @ (W, K2): two matmuls, no einsum parsing
        return taps[0] @ xs @ taps[1].t()
    return torch.einsum("kpqr,ip,jq,lr->kijl", xs, *taps)


def _spread(gsums: Tensor, taps: tuple[Tensor, ...]) -> Tensor:
    """The adjoint of :func:`_window_sums`: each tap's value back onto the positions it reads."""
    if len(taps) == 1:
        return gsums @ taps[0]
    if len(taps) == 2:
        return taps[0].t() @ gsums @ taps[1]
    return torch.einsum("kijl,ip,jq,lr->kpqr", gsums, *taps)


def _conv_args(layer: nn.Module, spatial: int) -> tuple[Any, ...] | None:
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return None
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    out_pad = list(layer.output_padding) if transposed else [0] * spatial
    return (list(layer.stride), list(layer.padding), list(layer.dilation), transposed, out_pad,
            layer.groups)


def _has_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` runs more than its class's forward: hooks, a compiled call, or a
    forward replaced on the instance (as accelerate's ``add_hook_to_module`` does)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks or getattr(m, "_compiled_call_impl", None) is not None
                or "forward" in m.__dict__)


def _global_state_allows() -> bool:
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks
            or _module._global_backward_hooks or _module._global_backward_pre_hooks):
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or _compiling():
        return False
    return not _fx_tracing()


def _pair_kind(layer: nn.Module, bn: nn.Module) -> tuple[type[nn.Module], int] | None:
    """(layer class, spatial dims) if ``layer`` then ``bn`` can be fused at all, else None."""
    if not isinstance(bn, _MeanOnlyBatchNorm):
        return None
    hit = _FORWARDS.get(getattr(type(layer), "forward", None))
    if hit is None or not isinstance(layer, hit[0]) or type(bn) is not hit[1]:
        return None
    cls, _, spatial = hit
    if any(getattr(type(layer), f) is not getattr(cls, f) for f in _HELPERS.get(cls, ())):
        return None  # forward kept, but a helper it calls overridden: it computes something else
    out = layer.out_features if cls is nn.Linear else layer.out_channels
    if out != bn.num_features or (spatial and _conv_args(layer, spatial) is None):
        return None
    return cls, spatial


def _pair_weight(layer: nn.Module, bn: _MeanOnlyBatchNorm, kind: tuple[type[nn.Module], int],
                 x: Tensor, args: tuple[Any, ...] | None) -> Tensor | None:
    """The layer's weight when the pair can run fused on ``x`` (``args``: the conv's, None for
    Linear), else None: hooks, an unexpected input, autocast. The weight is read once, after
    the checks that do not need it, as the layer itself reads it once (a parametrization such
    as spectral norm advances its state on every read)."""
    spatial = kind[1]
    if (_has_hooks(layer) or _has_hooks(bn) or (spatial and args is None)
            or type(x) not in _PLAIN_TYPES):
        return None
    # (runs on every call of every pair: each attribute read once)
    b, dt = _bn_bias(bn), x.dtype
    if (not isinstance(b, Tensor) or x.dim() != spatial + 2 or x.shape[0] == 0
            or x.numel() == 0 or dt != b.dtype or dt not in _FUSED_DTYPES):
        return None
    dev = x.device
    if dev != b.device or torch.is_autocast_enabled(dev.type):
        return None
    w = layer.weight
    return w if w.dtype == dt and w.device == dev and type(w) in _PLAIN_TYPES else None


def _bn_bias(bn: _MeanOnlyBatchNorm) -> Any:
    """``bn.bias``, from the parameter dict when it is there (no ``Module.__getattr__``); a bias
    made a buffer or None by the user is looked up as the forward would."""
    b = bn._parameters.get("bias")
    return b if b is not None else getattr(bn, "bias", None)


def _pair_forward(layer: nn.Module, bn: _MeanOnlyBatchNorm, kind: tuple[type[nn.Module], int],
                  x: Any, fusable: bool) -> Tensor | None:
    """``bn(layer(x))`` the fused way, or None where the plain calls must run instead.

    ``kind`` is :func:`_pair_kind` of the pair (checked when the container's plan was made);
    ``fusable``: no global hooks, tracing or compiling.
    """
    if not fusable or not isinstance(x, Tensor):
        return None
    cls, spatial = kind
    batch_mean = bn.training or not bn.track_running_stats
    if spatial and batch_mean and _functorch_active():
        return None  # vmap, grad, jvp: the conv Functions have no rules for them
    args = _conv_args(layer, spatial) if spatial else None
    w = _pair_weight(layer, bn, kind, x, args)
    if w is None:
        return None
    lb = layer.bias
    if not batch_mean:  # eval: a constant bias
        bias = _bn_bias(bn) - bn.running_mean
        if lb is not None:
            bias = lb + bias
        return F.linear(x, w, bias) if args is None else torch.convolution(x, w, bias, *args)
    if args is None and (x.shape[0] <= _CENTER_MAX_BATCH or _functorch_active()):
        y, mean = _centered_linear(x, w, _shift(bn, lb), bn.training and bn.track_running_stats)
    elif args is None:
        y, mean = _LinearMeanOnly.apply(x, w, _shift(bn, lb))
    else:
        y, mean = _ConvMeanOnly.apply(x, w, _shift(bn, lb), args)
    return _tracked(y, mean, bn, lb)


def _shift(bn: _MeanOnlyBatchNorm, lb: Tensor | None) -> Tensor:
    """The bias to add after subtracting the batch mean. The layer's own bias ``lb`` is in the
    batch mean too, so it cancels (and gets a zero gradient, as in the unfused pair)."""
    return bn.bias if lb is None else bn.bias + (lb - lb)


def _tracked(y: Tensor, mean: Tensor, bn: _MeanOnlyBatchNorm, lb: Tensor | None) -> Tensor:
    """``y``, after moving ``bn``'s running mean toward this batch's mean (when it tracks)."""
    if bn.training and bn.track_running_stats:
        bn._track(mean if lb is None else mean + lb.detach())
    return y


def _act_slope(act: nn.Module) -> float | None:
    """The negative slope of a leaky ReLU or ReLU the fused path can fold in, else None."""
    if type(act) is nn.LeakyReLU and not act.inplace:
        return float(act.negative_slope)
    if type(act) is nn.ReLU and not act.inplace:
        return 0.0
    return None  # in place: its side effect on the input is visible to the caller


def _act_pair_forward(act: nn.Module, layer: nn.Module, bn: _MeanOnlyBatchNorm,
                      kind: tuple[type[nn.Module], int], u: Any, fusable: bool) -> Tensor:
    """``bn(layer(act(u)))`` for a leaky ReLU/ReLU ``act`` before a conv pair: the activation
    folded into the pair's function in training; otherwise the activation, then the pair."""
    slope = _act_slope(act)
    if (slope is None or not fusable or _has_hooks(act) or not isinstance(u, Tensor)
            or not (bn.training or not bn.track_running_stats) or _functorch_active()):
        return _pair_or_plain(layer, bn, kind, act(u), fusable)
    args = _conv_args(layer, kind[1])
    w = _pair_weight(layer, bn, kind, u, args)
    if w is None:
        return _pair_or_plain(layer, bn, kind, act(u), fusable)
    lb = layer.bias
    y, mean = _ActConvMeanOnly.apply(u, w, _shift(bn, lb), args, slope)
    return _tracked(y, mean, bn, lb)


def _pair_or_plain(layer: nn.Module, bn: _MeanOnlyBatchNorm, kind: tuple[type[nn.Module], int],
                   x: Any, fusable: bool) -> Any:
    out = _pair_forward(layer, bn, kind, x, fusable)
    return bn(layer(x)) if out is None else out


class _MeanOnlyFusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose forward runs each layer + mean-only batch norm pair fused."""

    def _get_name(self) -> str:
        return "Sequential"

    def _plan(self) -> list[Any]:
        """The modules in order, each layer + mean-only BN pair as one ``(layer, bn, kind)``
        entry; remade whenever the modules or their classes change."""
        mods = tuple(self._modules.values())
        key = (mods, tuple(map(type, mods)))
        cached = self.__dict__.get("_wnorm_plan")
        if cached is not None and cached[0] == key:
            return cached[1]
        plan: list[Any] = []
        i = 0
        while i < len(mods):
            kind = _pair_kind(mods[i], mods[i + 1]) if i + 1 < len(mods) else None
            if kind:
                act = plan[-1] if plan and not isinstance(plan[-1], tuple) else None
                if kind[1] and act is not None and type(act) in (nn.LeakyReLU, nn.ReLU):
                    plan[-1] = (act, mods[i], mods[i + 1], kind)  # conv pair after an activation
                else:
                    plan.append((mods[i], mods[i + 1], kind))
                i += 2
            else:
                plan.append(mods[i])
                i += 1
        self.__dict__["_wnorm_plan"] = (key, plan)
        return plan

    def forward(self, input: Any) -> Any:  # noqa: A002 (nn.Sequential's own name)
        fusable = _global_state_allows()
        for step in self._plan():
            if type(step) is not tuple:
                input = step(input)
            elif len(step) == 3:
                input = _pair_or_plain(*step, input, fusable)
            else:
                input = _act_pair_forward(*step, input, fusable)
        return input

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_wnorm_plan", None)  # derived from the modules: remade at the next forward
        return state


def _pairs(seq: nn.Sequential) -> list[tuple[str, str]]:
    items = list(seq._modules.items())
    return [(a, b) for (a, la), (b, lb) in zip(items, items[1:]) if _pair_kind(la, lb)]


def fuse_mean_only(model: nn.Module, enabled: bool = True) -> nn.Module:
    r"""Compute each mean-only batch norm inside the layer before it:
    :math:`\tilde t = W \ast x + (b - \mu[W \ast x])`, the mean from :math:`W \ast \sum_n x_n`.

    Finds, in every ``nn.Sequential`` of ``model``, a Linear, ConvNd or ConvTransposeNd (zeros
    padding, numeric padding) directly followed by the mean-only batch norm of its output rank
    and width, and makes that container run the pair as one layer whose bias is :math:`b - \mu`.
    This removes mean-only batch norm's passes over the activations (a reduction and a subtract
    forward, a reduction and a subtract backward) at the price of one pass over the layer's
    input forward and one in-place add on its gradient backward. Outputs, gradients (to the
    layer's weight or to ``g`` and ``v``) and running means equal the unfused pair's up to float
    rounding; eval mode uses the running mean as a bias. Nothing else changes: parameters, state
    dict keys, ``repr`` and each module called on its own. A pair falls back to the two plain
    calls whenever the shortcut could differ from them: hooks on either module or a forward
    replaced on its instance, tracing, scripting or compiling, autocast, an input of another
    rank, dtype or device. See :mod:`wnorm.mean_only_fused` for the math.

    Rounding: a convolution's weight gradient is the convolution's own (on the uncentered
    output gradient) plus the mean's correction, two terms that nearly cancel when the layer's
    input has a large mean against its spread. In float32 its rounding error grows with that
    ratio: several times the unfused pair's when the input's mean is a few times its standard
    deviation. Float64, or inputs near zero mean (after an activation, normalized data), are
    unaffected in practice.

    A ``nn.LeakyReLU``/``nn.ReLU`` (not in place) directly before a convolution pair is folded
    into it in training, which removes those two passes as well (on CPU with wnorm's C++
    kernels, built on first use like :mod:`wnorm.optim`'s; PyTorch ops otherwise).

    Args:
        model: the model, changed in place.
        enabled: False undoes an earlier call (the containers get ``nn.Sequential`` back).

    Returns:
        The same model.

    Raises:
        WnormError: ``enabled`` and no pair was found; the message says what a pair is.

    Example:
        >>> import torch, wnorm
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False),
        ...                           wnorm.MeanOnlyBatchNorm2d(8), torch.nn.ReLU())
        >>> x = torch.randn(4, 3, 6, 6)
        >>> before = net(x)
        >>> net = wnorm.fuse_mean_only(net)
        >>> torch.allclose(net(x), before, atol=1e-5)
        True
    """
    found = 0
    for m in model.modules():
        if type(m) is nn.Sequential and enabled:
            pairs = _pairs(m)
            if pairs:
                m.__class__ = _MeanOnlyFusedSequential
                found += len(pairs)
        elif type(m) is _MeanOnlyFusedSequential:
            if enabled:
                found += len(_pairs(m))
            else:
                m.__class__ = nn.Sequential
                m.__dict__.pop("_wnorm_plan", None)
    if enabled and not found:
        raise WnormError(
            f"fuse_mean_only: {type(model).__name__} has no pair to fuse: a pair is a Linear, "
            "ConvNd or ConvTransposeNd (padding_mode='zeros', numeric padding, forward not "
            "overridden, nor the _conv_forward or _output_padding it calls) followed directly, "
            "in an nn.Sequential, by the MeanOnlyBatchNorm of the same rank and channel count"
        )
    return model
