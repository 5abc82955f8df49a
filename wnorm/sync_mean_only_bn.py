r"""Mean-only batch normalization with the batch mean taken over every rank of a process group.

.. math::
    \tilde t = t - \mu[t] + b, \qquad \mu[t] = \frac{\sum_r \sum_{n \in r} t_n}{\sum_r N_r}

what :class:`torch.nn.SyncBatchNorm` is to ``nn.BatchNorm``: under DDP (or FSDP) each rank sees
only its share of the global batch, and a mean over that share is noisier than the paper's
minibatch mean, the more so the more ranks. Forward, the per-channel sums and the element count
travel in one all-reduce; backward, the sums of the incoming gradient in a second one:
:math:`\nabla_t L = \nabla_{\tilde t} L - \sum_r \sum_{n \in r} \nabla_{\tilde t_n} L / N`.
Neither reads anything on the host, so a step stays free of host syncs (NCCL's collectives are
CUDA-graph capturable); gloo runs it on CPUs.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import WnormError
from .mean_only_bn import (
    _LOW,
    MeanOnlyBatchNorm1d,
    MeanOnlyBatchNorm2d,
    MeanOnlyBatchNorm3d,
    MeanOnlyBatchNormBase,
    _shifted,
    move_hooks,
)

__all__ = ["SyncMeanOnlyBatchNorm"]


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Sums and counts in float32 at least (a bfloat16 sum of 1000 values near 100 is off by
    hundreds; a float32 count is exact up to 2**24 elements per channel, and off by less than
    1e-7 of itself beyond)."""
    return torch.float32 if dtype in _LOW else dtype


class _SumOverRanks(torch.autograd.Function):
    r"""``t`` summed over the ranks of ``group``, differentiable to every order: rank s's
    :math:`y = \sum_r t_r` reaches every rank's loss, so its gradient is the sum over ranks of
    theirs, the same all-reduce (``torch.distributed.nn.functional.all_reduce`` is deprecated,
    and the functional collectives that replace it have no autograd rule for it)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _SumOverRanks.apply(grad, ctx.group), None


class _SubtractSyncedMean(torch.autograd.Function):
    """``x - mean + bias`` per channel, ``mean`` the group's mean computed by the caller; the
    backward subtracts the group's mean of the incoming gradient (one all-reduce of its
    per-channel sums) and gives ``bias`` this rank's own sum, which DDP then averages as it
    averages every gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor, mean: Tensor, dims: list[int], count: Tensor,
                group: Any) -> Tensor:
        ctx.dims, ctx.count, ctx.group = dims, count, group
        ctx.bias_dtype, ctx.shape = bias.dtype, (1, -1) + (1,) * (x.dim() - 2)
        return _shifted(x, bias - mean)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        total = grad.sum(dim=ctx.dims, dtype=_wide(grad.dtype))
        if torch.is_grad_enabled():
            # a double backward (create_graph=True, a gradient penalty) differentiates this sum
            # over ranks: the in-place all_reduce has no autograd rule, and its graph would
            # take the group's sum for this rank's own
            everywhere = _SumOverRanks.apply(total, ctx.group)
        else:
            everywhere = total.clone()
            dist.all_reduce(everywhere, group=ctx.group)
        grad_x = grad - (everywhere / ctx.count).to(grad.dtype).view(ctx.shape)
        return grad_x, total.to(ctx.bias_dtype), None, None, None, None


class SyncMeanOnlyBatchNorm(MeanOnlyBatchNormBase):
    r"""Mean-only batch norm over ``(N, C, ...)`` whose training-mode batch mean is taken over
    every rank of ``process_group``: :math:`\tilde t = t - \mu[t] + b`.

    Salimans & Kingma (2016), section 4, https://arxiv.org/abs/1602.07868, at the batch the
    paper means when the batch is split across ranks (as :class:`torch.nn.SyncBatchNorm` does
    for ``nn.BatchNorm``; it leaves mean-only layers alone). Build one directly, or convert a
    model's mean-only layers with :meth:`convert_sync_batchnorm` before wrapping it in DDP.
    Ranks may hold batches of different sizes, an empty one included (every rank must call
    the layer, as with any collective). In eval mode the running mean is used and nothing is
    synced; with ``track_running_stats=False`` eval uses this rank's batch mean, as
    ``nn.SyncBatchNorm`` does. Without an initialized process group, or with a group of one
    rank, it is :class:`MeanOnlyBatchNorm1d`/``2d``/``3d`` exactly. Its state dict is theirs:
    checkpoints load either way.

    Args:
        num_features: C, the number of channels.
        momentum: weight of the new batch mean in the running mean (default 0.1); ``None``
            for a cumulative average.
        track_running_stats: keep a running mean for eval (default True).
        process_group: the group whose ranks share the batch (default: the default group,
            looked up at each forward).

    Raises:
        WnormError: wrong input rank (2 to 5) or channel count.

    Example:
        >>> import torch, wnorm
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), wnorm.MeanOnlyBatchNorm2d(8))
        >>> net = wnorm.SyncMeanOnlyBatchNorm.convert_sync_batchnorm(net)
        >>> net[1]
        SyncMeanOnlyBatchNorm(8, momentum=0.1, track_running_stats=True)
    """

    _ndims = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, momentum, track_running_stats, device, dtype)
        if process_group is not None and not (
                dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            # anything else was kept and ignored: the layer ran as the plain one
            raise WnormError(f"{type(self).__name__}: process_group must be a "
                             "torch.distributed ProcessGroup (dist.new_group(...)) or None; got "
                             f"{type(process_group).__name__}")
        self.process_group = process_group

    def __deepcopy__(self, memo: dict[int, Any]) -> SyncMeanOnlyBatchNorm:
        # a process group is a handle on this process's communicators: a copy (an EMA model,
        # AveragedModel) shares it; copying it would fail
        if self.process_group is not None:
            memo.setdefault(id(self.process_group), self.process_group)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _group(self) -> Any:
        """The group to sync over, or None: in eval mode, without an initialized default
        group, or in a group of one rank (then nothing is sent)."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        group = self._group()
        if group is None:
            return super().forward(x)
        self._check(x)
        self._record_length(x)
        dims = [0] + list(range(2, x.dim()))
        with torch.no_grad():  # _SubtractSyncedMean's backward accounts for the mean
            # one message: the sums, then the count (an empty batch sends zeros, and still
            # takes part, so that no other rank waits for it)
            local = x.sum(dim=dims, dtype=_wide(x.dtype))
            stats = torch.cat([local, local.new_full((1,), x.numel() // x.shape[1])])
            dist.all_reduce(stats, group=group)
        count = stats[-1].clamp_min(1)  # an empty batch on every rank: an empty output
        mean = stats[:-1] / count
        if self._tracking():
            self._track_synced(mean, stats[-1] > 0)
        if torch.is_grad_enabled() and (x.requires_grad or self.bias.requires_grad):
            return _SubtractSyncedMean.apply(x, self.bias, mean, dims, count, group)
        return _shifted(x, self.bias - mean)

    def _track_synced(self, mean: Tensor, seen: Tensor) -> None:
        """:meth:`_track`, with the running mean left as it is when no rank saw an element
        (a tensor weight of 0: no host sync). A cumulative average counts only batches seen,
        so that the next weighs right; an exponential one counts every batch, as
        ``nn.BatchNorm`` counts an empty one."""
        rm, m = self.running_mean, self.momentum
        wide = torch.promote_types(rm.dtype, torch.float32)
        if m is None:
            self.num_batches_tracked.add_(seen.long())
            n = self.num_batches_tracked.to(wide).clamp_min(1)
            weight = torch.where(seen, n.reciprocal(), 0.0)
        else:
            self.num_batches_tracked.add_(1)
            weight = seen.to(wide) * m
        rm.lerp_(mean.to(rm.dtype), weight.to(rm.dtype))

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        r"""Replace every :class:`MeanOnlyBatchNorm1d`/``2d``/``3d`` (and
        :class:`SyncMeanOnlyBatchNorm`) in ``module`` by a :class:`SyncMeanOnlyBatchNorm` over
        ``process_group``: :math:`\mu[t]` becomes the mean over every rank's batch.

        The counterpart of :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`; call both on
        a model with both kinds of batch norm. The new layer takes the old one's bias
        Parameter and buffers (the same tensors: an optimizer already holding the bias still
        does), its mode and its hooks; a layer used in two places is replaced by one layer.
        A subclass with a forward of its own, or a layer whose ``forward`` was replaced on the
        instance, is left as it is, with a warning.

        Args:
            module: the model (or one mean-only batch norm); changed in place.
            process_group: the group whose ranks share the batch (default: the default group).

        Returns:
            ``module``, or its replacement when ``module`` itself is a mean-only batch norm.
        """
        if not isinstance(module, nn.Module):
            raise WnormError(f"convert_sync_batchnorm: expected an nn.Module; got "
                             f"{type(module).__name__}")
        done: dict[int, nn.Module] = {}

        def convert(m: nn.Module, where: str) -> nn.Module:
            if id(m) in done:
                return done[id(m)]
            new = m
            if isinstance(m, MeanOnlyBatchNormBase):
                if type(m) in _PLAIN and "forward" not in m.__dict__:
                    new = _synced(m, process_group)
                else:
                    warnings.warn(
                        f"convert_sync_batchnorm: {where} ({type(m).__name__}) has a forward of "
                        "its own; it is left as it is (its batch means stay per rank)",
                        stacklevel=3)
            done[id(m)] = new
            for name, child in list(new._modules.items()):
                if child is not None:
                    new._modules[name] = convert(child, f"{where}.{name}" if where else name)
            return new

        return convert(module, "")


_PLAIN = (MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d, SyncMeanOnlyBatchNorm)


def _synced(m: MeanOnlyBatchNormBase, group: Any) -> SyncMeanOnlyBatchNorm:
    """A :class:`SyncMeanOnlyBatchNorm` holding ``m``'s own bias, buffers, mode and hooks."""
    new = SyncMeanOnlyBatchNorm.__new__(SyncMeanOnlyBatchNorm)
    nn.Module.__init__(new)
    new.num_features, new.momentum = m.num_features, m.momentum
    new.track_running_stats, new.process_group = m.track_running_stats, group
    new.bias = m.bias
    for name in ("running_mean", "num_batches_tracked"):
        new.register_buffer(name, m._buffers.get(name))
    new.train(m.training)
    for key in ("_saw_length", "_where"):  # fold's record of (N, C, L) input; apply's path
        if key in m.__dict__:
            new.__dict__[key] = m.__dict__[key]
    if 2 not in type(m)._ndims:  # a 2d/3d layer's input has axes after its channels, which
        new.__dict__["_saw_length"] = True  # fold must know without a forward (any rank here)
    move_hooks(m, new)
    return new
