r"""Mean-only batch normalization (Salimans & Kingma, 2016, section 4).

.. math::
    \tilde t = t - \mu[t] + b

per channel, where :math:`\mu[t]` is the minibatch mean in training and a running mean in eval.
No division by the standard deviation: combined with weight normalization, the scale comes from
``g`` and only the mean is taken from the batch, which adds gentler noise than full batch norm.
Backward: :math:`\nabla_t L = \nabla_{\tilde t} L - \operatorname{mean}(\nabla_{\tilde t} L)`
and :math:`\nabla_b L = \sum \nabla_{\tilde t} L`, from one reduction of the incoming gradient
(:class:`_SubtractMean`); autograd's own derivative of ``x - x.mean()`` materializes the expanded
mean gradient and adds it in extra sweeps over the activations.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from ._eager import eager, graph_break
from .errors import WnormError

__all__ = ["MeanOnlyBatchNorm1d", "MeanOnlyBatchNorm2d", "MeanOnlyBatchNorm3d", "move_hooks",
           "MeanOnlyBatchNormBase", "update_bn"]


_LOW = (torch.float16, torch.bfloat16)


def _wide_mean(x: Tensor, dims: list[int]) -> Tensor:
    """The batch mean, in float32 at least: a bfloat16 mean of values near 100 is off by 0.25."""
    return x.mean(dim=dims, dtype=torch.float32) if x.dtype in _LOW else x.mean(dim=dims)


def _shape(x: Tensor) -> tuple[int, ...]:
    """``x``'s shape as Python ints, also under ``torch.jit.trace``, whose traced sizes made
    every check here a TracerWarning (nn.BatchNorm's own checks give none): a trace is of
    one input's shape anyway."""
    state = torch._C._get_tracing_state()
    if state is None:
        return tuple(x.shape)
    torch._C._set_tracing_state(None)
    try:
        return tuple(x.shape)
    finally:
        torch._C._set_tracing_state(state)


def _shifted(x: Tensor, shift: Tensor) -> Tensor:
    """``x + shift`` per channel, in x's dtype. For half-precision x the sum is taken in float32
    and rounded once per element: rounding the shift itself first would bias every element of
    a channel the same way (nn.BatchNorm does not)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if x.dtype in _LOW:
        return (x.float() + shift.float().view(shape)).to(x.dtype)
    return x + (shift if shift.dtype == x.dtype else shift.to(x.dtype)).view(shape)


class _SubtractMean(torch.autograd.Function):
    """``x - mean + bias`` (per channel), ``mean`` being ``x``'s mean over ``dims`` computed by
    the caller, with the one-reduction backward (the mean's own gradient path is accounted for
    in ``x``'s, so ``mean`` gets none). torch.func transforms (``vmap``, ``grad``) use the
    generated vmap rule. This class has no forward-mode rule, so that torch.compile traces it
    whole (Dynamo breaks the graph at a Function with a custom ``jvp``); eager forwards use
    :class:`_SubtractMeanJvp`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, bias: Tensor, mean: Tensor, dims: list[int]) -> Tensor:
        return _shifted(x, bias - mean)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, bias, _, dims = inputs
        ctx.dims, ctx.count = dims, x.numel() // x.shape[1]
        ctx.bias_dtype, ctx.shape = bias.dtype, (1, -1) + (1,) * (x.dim() - 2)
        ctx.out_shape, ctx.out_dtype = x.shape, x.dtype

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        total = grad.sum(dim=ctx.dims, dtype=torch.promote_types(grad.dtype, torch.float32))
        grad_x = grad - (total / ctx.count).to(grad.dtype).view(ctx.shape)
        return grad_x, total.to(ctx.bias_dtype), None, None


class _SubtractMeanJvp(_SubtractMean):
    """:class:`_SubtractMean` with its forward-mode rule (``torch.func.jvp``): the tangent of
    ``x - mean + b`` is ``x_t - mean_t + b_t``, the tangent of ``mean`` taken as given."""

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, bias_t: Tensor | None, mean_t: Tensor | None,
            _dims: Any) -> Tensor:
        if x_t is not None:
            # the mean's tangent from x_t itself: the one passed in was computed under no_grad
            # and has no graph back to x_t, which a backward through this tangent needs
            mean_t = x_t.mean(dim=ctx.dims)
        shift = None
        for t, sign in ((bias_t, 1.0), (mean_t, -1.0)):
            if t is not None:
                shift = sign * t if shift is None else shift + sign * t
        if shift is None:
            return x_t
        shift = shift.to(ctx.out_dtype).view(ctx.shape)
        return shift.expand(ctx.out_shape).clone() if x_t is None else x_t + shift


class _SubtractMeanEager(torch.autograd.Function):
    """:class:`_SubtractMeanJvp` in the ``forward(ctx, ...)`` style, for eager calls outside
    torch.func transforms: ``Function.apply`` binds the arguments of a ``setup_context``-style
    Function through ``inspect.signature``, which cost 17 us per call, as much as the layer's
    own kernels on a (32, 256) batch. torch.func transforms need that style (and get it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor, mean: Tensor, dims: list[int]) -> Tensor:
        _SubtractMean.setup_context(ctx, (x, bias, mean, dims), None)  # type: ignore[arg-type]
        return _shifted(x, bias - mean)

    backward = _SubtractMean.backward
    jvp = _SubtractMeanJvp.jvp


#: the hook dicts of an nn.Module (the later ones exist in newer PyTorch versions only)
_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
          "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
          "_backward_pre_hooks")


def move_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the hooks of ``src`` (the module it replaces): the hook dicts move over as
    they are, so handles the user holds still remove them."""
    for attr in _HOOKS:
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))


class MeanOnlyBatchNormBase(nn.Module):
    """What the 1d, 2d and 3d layers share; they differ in the input ranks they take."""

    _ndims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, numbers.Integral) or isinstance(num_features, bool) \
                or num_features <= 0:
            raise WnormError(
                f"{type(self).__name__}: num_features must be a positive int; got {num_features!r}"
            )
        num_features = int(num_features)  # np.int64(4) too, as nn.BatchNorm takes it
        if isinstance(momentum, Tensor) and momentum.dim() == 0 and momentum.is_floating_point():
            momentum = float(momentum)  # as nn.BatchNorm takes it
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(
                momentum, numbers.Real) or not 0.0 <= momentum <= 1.0):
            raise WnormError(
                f"{type(self).__name__}: momentum must be in [0, 1] or None; got {momentum!r}"
            )
        self.num_features = num_features
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("num_batches_tracked", None)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this first; its own error ("no attribute '_ndims'") says
        # nothing of what to do
        raise WnormError(
            f"{type(self).__name__}: torch.jit.script cannot compile a mean-only batch norm; "
            "script wnorm.fold(copy.deepcopy(model)) for inference (each becomes a bias or a "
            "ChannelShift), or use torch.export, torch.compile or torch.jit.trace")

    def reset_running_stats(self) -> None:
        if self.running_mean is not None:
            self.running_mean.zero_()
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running mean, batch count and bias 0: the layer as built. What ``to_empty`` after a
        meta-device build (FSDP's ``param_init_fn``) and re-initializing loops call, as they
        call ``nn.BatchNorm``'s."""
        self.reset_running_stats()
        nn.init.zeros_(self.bias)

    def _label(self) -> str:
        """``path (Class)`` where :func:`wnorm.apply` recorded the path, else the class."""
        where = self.__dict__.get("_where")
        return f"{where} ({type(self).__name__})" if where else type(self).__name__

    def _check(self, x: Tensor) -> tuple[int, ...]:
        """``x``'s shape, checked to be this layer's input's (raises, naming the layer)."""
        shape = _shape(x)
        if len(shape) not in self._ndims or shape[1] != self.num_features or not (
                x.is_floating_point() or x.is_complex()):
            # (a constant message: Dynamo takes no shape, which may be symbolic, in it)
            graph_break(f"wnorm: {self._label()}: expected a floating-point "
                        f"{' or '.join(f'{d}D' for d in self._ndims)} input with "
                        f"{self.num_features} channels in dim 1; uncompiled, its WnormError "
                        "gives the shape it got")
            self._refuse_shape(shape, x.dtype)
        return shape

    # the refusals raise outside any compiled graph: an exception Dynamo met in an inlined
    # method made it skip the calling frame (the whole model) for good, and every later batch
    # ran eagerly in pieces. Under fullgraph=True, the graph break before them names the layer
    @eager
    def _refuse_shape(self, shape: tuple[int, ...], dtype: torch.dtype) -> NoReturn:
        if not (dtype.is_floating_point or dtype.is_complex):  # torch's mean names no layer
            raise WnormError(f"{self._label()}: expected a floating-point input; got {dtype}")
        if len(shape) not in self._ndims:
            raise WnormError(
                f"{self._label()}: expected a {' or '.join(f'{d}D' for d in self._ndims)} "
                f"input (N, C, ...); got shape {tuple(shape)}"
            )
        raise WnormError(
            f"{self._label()}: expected {self.num_features} channels in dim 1; "
            f"got shape {tuple(shape)}"
        )

    @eager
    def _refuse_count(self, shape: tuple[int, ...]) -> NoReturn:
        raise WnormError(
            f"{self._label()}: expected more than 1 value per channel for a batch mean; got "
            f"input shape {tuple(shape)} (its mean is itself: the output would be the bias "
            "alone, with no gradient to the layers before); use batches of 2 or more "
            "(DataLoader(..., drop_last=True)), as nn.BatchNorm requires")

    def _record_length(self, x: Tensor) -> None:
        if x.dim() > 2 and 2 in self._ndims and not torch.compiler.is_compiling() and \
                "_saw_length" not in self.__dict__:
            # for fold: a Linear before this layer adds along the last axis, which is a layer's
            # channel axis only for (N, C) input (an eager record; a compiled forward makes
            # none, and fold then trusts the Sequential as before). 2d/3d layers, whose input
            # always has axes after its channels, need none
            self.__dict__["_saw_length"] = True

    def _tracking(self) -> bool:
        """Whether this forward moves the running mean: training, with running stats."""
        return self.training and self.track_running_stats and self.running_mean is not None

    def _check_count(self, shape: tuple[int, ...]) -> None:
        """Refuse one value per channel for a batch mean, as ``nn.BatchNorm`` does: the output
        would be the bias alone and the layers before get no gradient (a DataLoader's last
        batch of one example; ``drop_last=True`` avoids it)."""
        count = shape[0]
        for n in shape[2:]:
            count *= n
        if count == 1:
            graph_break(f"wnorm: {self._label()}: a training batch with 1 value per channel, "
                        "which mean-only batch norm refuses as nn.BatchNorm does; use batches "
                        "of 2 or more")
            self._refuse_count(shape)

    def _track(self, mean: Tensor) -> None:
        """Move the running mean toward this batch's ``mean`` (training with running stats).
        The buffers need no grad and ``mean`` is detached: no graph, no ``no_grad`` context."""
        self.num_batches_tracked.add_(1)
        m: Any = self.momentum
        rm = self.running_mean
        if m is None:  # cumulative average, as BatchNorm does (a tensor weight: no host sync);
            # 1/n in float32 at least, float64 for a float64 mean (an integer's reciprocal
            # is float32, which left a float64 running mean off by 5e-9)
            n = self.num_batches_tracked.to(torch.promote_types(rm.dtype, torch.float32))
            m = n.reciprocal().to(rm.dtype)
        mean = mean.detach()
        rm.lerp_(mean if mean.dtype == rm.dtype else mean.to(rm.dtype), m)

    def forward(self, x: Tensor) -> Tensor:
        shape = self._check(x)
        self._record_length(x)
        if 0 in shape:
            # an empty batch (a detection head with no region) has no mean: an empty output,
            # as nn.BatchNorm gives, and the running mean left as it is, not made NaN; the batch
            # is counted, as nn.BatchNorm counts it (a checkpoint's num_batches_tracked agrees),
            # except in a cumulative average (momentum None, as update_bn runs), where the count
            # weighs the next batch: an empty batch would skew the average toward the earlier
            if self._tracking() and self.momentum is not None:
                self.num_batches_tracked.add_(1)
            return _shifted(x, self.bias - self.running_mean
                            if self.running_mean is not None else self.bias)
        # batch statistics as nn.BatchNorm takes them: in training, and in eval where there is
        # no running mean (track_running_stats=False set after training freezes it, but eval
        # still uses it); the running mean moves only in training with track_running_stats
        if self.training or self.running_mean is None:
            self._check_count(shape)
            dims = [0] + list(range(2, x.dim()))
            if torch.compiler.is_exporting() or torch._C._get_tracing_state() is not None:
                # torch.export traces a Function's forward, not its backward (the layers before
                # this one got wrong gradients, or none), and jit.trace records it as a Python
                # call that jit.save refuses: the mean keeps its graph, and autograd's
                # derivative of x - mean + b is the exact one
                mean = _wide_mean(x, dims)
                if self._tracking():
                    self._track(mean.detach())
                return _shifted(x, self.bias - mean)
            # no graph (_SubtractMean's backward accounts for the mean), but not detached:
            # forward-mode AD (torch.func.jvp) needs the mean's tangent
            if torch.is_grad_enabled():
                with torch.no_grad():
                    mean = _wide_mean(x, dims)
            else:
                mean = _wide_mean(x, dims)
            if self._tracking():
                self._track(mean)
            if torch.is_grad_enabled() and (x.requires_grad or self.bias.requires_grad):
                fn = (_SubtractMean if torch.compiler.is_compiling() else _SubtractMeanJvp
                      if torch._C._are_functorch_transforms_active() else _SubtractMeanEager)
                return fn.apply(x, self.bias, mean, dims)
        else:
            mean = self.running_mean
        # the input's dtype out, in every mode, as nn.BatchNorm gives (a float32 layer in a
        # bfloat16 model)
        return _shifted(x, self.bias - mean)


class MeanOnlyBatchNorm1d(MeanOnlyBatchNormBase):
    r"""Mean-only batch norm over ``(N, C)`` or ``(N, C, L)``: :math:`\tilde t = t - \mu[t] + b`.

    Salimans & Kingma (2016), section 4, https://arxiv.org/abs/1602.07868. Subtracts the
    per-channel minibatch mean (training) or the running mean (eval), adds a learned bias, and
    never divides by a standard deviation.

    Args:
        num_features: C, the number of channels.
        momentum: weight of the new batch mean in the running mean (default 0.1, i.e. 0.9 on the
            old value as in the paper's code); ``None`` for a cumulative average.
        track_running_stats: keep a running mean for eval (default True); if False, eval uses
            batch means too.

    Raises:
        WnormError: wrong input rank or channel count.

    Example:
        >>> import torch, wnorm
        >>> bn = wnorm.MeanOnlyBatchNorm1d(3)
        >>> y = bn(torch.randn(8, 3) + 5)
        >>> bool(y.mean(0).abs().max() < 1e-5)
        True
    """

    _ndims = (2, 3)


class MeanOnlyBatchNorm2d(MeanOnlyBatchNormBase):
    r"""Mean-only batch norm over ``(N, C, H, W)``: :math:`\tilde t = t - \mu[t] + b`.

    See :class:`MeanOnlyBatchNorm1d` for the arguments; the mean runs over N, H and W.
    """

    _ndims = (4,)


class MeanOnlyBatchNorm3d(MeanOnlyBatchNormBase):
    r"""Mean-only batch norm over ``(N, C, D, H, W)``: :math:`\tilde t = t - \mu[t] + b`.

    See :class:`MeanOnlyBatchNorm1d` for the arguments; the mean runs over N, D, H and W.
    """

    _ndims = (5,)


def update_bn(loader: Iterable[Any], model: nn.Module,
              device: torch.device | str | int | None = None) -> None:
    r"""Running means :math:`\mu = \frac1K\sum_k \mu_k[t]` over the loader's K batches, for
    every :class:`MeanOnlyBatchNorm1d`/``2d``/``3d`` and ``nn.BatchNorm`` layer of ``model``.

    :func:`torch.optim.swa_utils.update_bn` with mean-only batch norms included: PyTorch's
    finds ``nn.BatchNorm`` layers only, and leaves the running means of mean-only ones as the
    trained model had them (an SWA model then runs on statistics of other weights). Each
    layer's running statistics are reset and recomputed as a cumulative average over one pass
    of ``loader`` in training mode (no grad); momenta and every module's mode are put back,
    and a pass that raises part-way leaves the running statistics as they were.

    Args:
        loader: batches: tensors, or lists/tuples whose first element is the model's input.
        model: the model (an ``AveragedModel`` too).
        device: where to move each batch first (default: leave it).

    Example:
        >>> import torch, wnorm
        >>> from torch.optim.swa_utils import AveragedModel
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), wnorm.MeanOnlyBatchNorm1d(4))
        >>> swa = AveragedModel(net)
        >>> wnorm.update_bn([torch.randn(8, 3) + 1], swa)
        >>> bool(swa.module[1].running_mean.abs().sum() > 0)
        True
    """
    if not isinstance(model, nn.Module) or isinstance(loader, (nn.Module, Tensor)):
        raise WnormError(
            f"update_bn: expects (loader, model, device=None), a loader of batches (a "
            f"DataLoader, a list of tensors) and an nn.Module; got {type(loader).__name__} and "
            f"{type(model).__name__}")
    layers = [m for m in model.modules()
              if isinstance(m, (nn.modules.batchnorm._BatchNorm, MeanOnlyBatchNormBase))
              and m.track_running_stats]
    if not layers:
        return
    momenta = {m: m.momentum for m in layers}
    # each module's own mode (a Dropout or a frozen BatchNorm kept in eval inside a training
    # model): model.train(was_training) would set every one to the root's
    modes = {m: m.training for m in model.modules()}
    # put back if the pass fails part-way (a loader raising): the trained statistics, not
    # reset ones or an average of the batches seen so far
    saved = {m: {k: b.clone() for k, b in m._buffers.items() if b is not None} for m in layers}
    for m in layers:
        m.reset_running_stats()
    model.train()
    done = False
    try:
        for m in layers:
            m.momentum = None
        with torch.no_grad():
            for batch in loader:
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                model(x if device is None else x.to(device))
        done = True
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
        if not done:
            with torch.no_grad():
                for m, bufs in saved.items():
                    for k, b in bufs.items():
                        m._buffers[k].copy_(b)
