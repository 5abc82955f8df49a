r"""Weight normalization's relatives, usable wherever ``weight_norm`` is:
:func:`wnorm.apply` (``method=...``), :func:`wnorm.data_init` (where there is a g to set),
:func:`wnorm.fold`, :func:`wnorm.remove_weight_norm` and checkpoints of the same kind.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from ._slot import slots_of
from .errors import WnormError, finite_positive
from .maps import BalancedWeightNorm, CenteredWeightNorm, ForcedWeightNorm, WeightStandardization
from .sphere import is_projected
from .weight_norm import DEFAULT, reparameterize

__all__ = ["centered_weight_norm", "weight_standardization", "forced_weight_norm",
           "balanced_weight_norm"]


def centered_weight_norm(
    module: nn.Module, name: str = "weight", dim: int | None = DEFAULT, *, where: str = ""
) -> nn.Module:
    r"""Centered weight normalization: :math:`w = g\,\frac{v - \bar v}{\lVert v - \bar v\rVert}`.

    Huang et al., "Centered Weight Normalization in Accelerating Training of Deep Neural
    Networks", ICCV 2017. Each slice along ``dim`` (each output unit) is centered to mean 0
    before it is normalized, so every row of ``w`` has mean 0 and norm ``g``. Parameters
    ``<name>_g`` (kept-dim, starts at the centered norm) and ``<name>_v`` (starts at the weight),
    like :func:`wnorm.weight_norm`; the layer's function changes by the rows' means.

    Args:
        module: the module that owns the parameter.
        name: the parameter's name (default ``"weight"``).
        dim: the output-unit axis (default: the layer type's, as for ``weight_norm``);
            ``None`` centers and normalizes the whole tensor.
        where: a name for the module in error messages.

    Returns:
        The same module, changed in place.

    Raises:
        WnormError: as :func:`wnorm.weight_norm`, and for a constant slice (zero after centering).

    Example:
        >>> import torch, wnorm
        >>> layer = wnorm.centered_weight_norm(torch.nn.Linear(5, 3))
        >>> w = layer.weight
        >>> bool(w.mean(1).abs().max() < 1e-6), torch.allclose(w.norm(dim=1), layer.weight_g.flatten())
        (True, True)
    """
    return reparameterize(module, name, dim, CenteredWeightNorm, where=where)


def weight_standardization(
    module: nn.Module,
    name: str = "weight",
    dim: int | None = DEFAULT,
    *,
    eps: float = 1e-10,
    where: str = "",
) -> nn.Module:
    r"""Weight standardization: :math:`w = \frac{v - \bar v}{\sqrt{\operatorname{var}(v) + \epsilon}}`.

    Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and Weight
    Standardization", 2019 (arXiv:1903.10520). Each slice along ``dim`` gets mean 0 and
    standard deviation 1 (population variance); there is no g, so the scale is left to a
    following normalization layer (the paper pairs it with GroupNorm). Parameter: ``<name>_v``.

    Args:
        module: the module that owns the parameter.
        name: the parameter's name (default ``"weight"``).
        dim: the output-unit axis (default: the layer type's); ``None``: the whole tensor.
        eps: added to the variance (default 1e-10, so rows really have std 1).
        where: a name for the module in error messages.

    Returns:
        The same module, changed in place.

    Raises:
        WnormError: as :func:`wnorm.weight_norm`, for a constant slice, or an ``eps`` that is not
            a finite number >= 0.

    Example:
        >>> import torch, wnorm
        >>> conv = wnorm.weight_standardization(torch.nn.Conv2d(3, 4, 3))
        >>> w = conv.weight.flatten(1)
        >>> bool(w.mean(1).abs().max() < 1e-6), bool((w.std(1, unbiased=False) - 1).abs().max() < 1e-5)
        (True, True)
    """
    x = math.nan
    if isinstance(eps, numbers.Real) and not isinstance(eps, bool):
        x = float(eps)
    elif isinstance(eps, torch.Tensor) and eps.dim() == 0 and eps.is_floating_point():
        x = float(eps)
    if not 0 <= x < math.inf:  # an infinite eps gave an all-zero weight, silently
        raise WnormError("weight_standardization: eps must be a finite number >= 0; "
                         f"got {eps!r}")
    return reparameterize(module, name, dim, lambda d: WeightStandardization(d, x), where=where)


def forced_weight_norm(
    module: nn.Module,
    name: str = "weight",
    dim: int | None = DEFAULT,
    *,
    gain: float | None = None,
    radius: float | None = None,
    where: str = "",
) -> nn.Module:
    r"""Forced weight normalization: :math:`w = g\,v/\lVert v\rVert` with :math:`\lVert v\rVert`
    held fixed.

    Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2),
    CVPR 2024. The map is weight normalization's; what makes it forced is that every slice of
    ``v`` is put back on the sphere of norm :math:`\sqrt{n}` (n = its size, so entries are of
    order 1; ``radius`` sets another norm) after every optimizer step, by
    :func:`wnorm.project_after_step` (``project_after_step(optimizer, model)``: register it once,
    after building the optimizer). That removes the growth of :math:`\lVert v\rVert` that plain
    weight normalization relies on to lower its effective learning rate (Salimans & Kingma
    2016, section 2.1).
    Reading ``module.<name>`` and running a forward never change a parameter. A layer that runs a
    training forward (train mode, autograd recording) while no projection holds its ``v`` warns
    once: without one it trains as plain weight normalization. ``gain=None`` (default) keeps a
    learned ``<name>_g`` per unit, starting at the weight's norm (the function is unchanged at
    the start); a float fixes the gain, as EDM2 does, and there is no ``<name>_g``.

    Args:
        module: the module that owns the parameter.
        name: the parameter's name (default ``"weight"``).
        dim: the output-unit axis (default: the layer type's); ``None``: the whole tensor.
        gain: a fixed gain instead of a learned g (default None: learned).
        radius: the norm every slice of ``v`` is held at (default None: :math:`\sqrt{n}`, as
            EDM2). The step an optimizer takes on ``v`` turns the weight by about
            step / radius, so the radius sets the effective learning rate of the direction: to
            train like plain weight normalization at the start, pass the weight's initial row
            norm (about 0.58 for PyTorch's default Linear/Conv init).
        where: a name for the module in error messages.

    Returns:
        The same module, changed in place.

    Raises:
        WnormError: as :func:`wnorm.weight_norm`, or a non-positive ``gain`` or ``radius``.

    Example:
        >>> import torch, wnorm
        >>> layer = wnorm.forced_weight_norm(torch.nn.Linear(16, 4))
        >>> opt = torch.optim.SGD(layer.parameters(), lr=1.0)
        >>> _ = wnorm.project_after_step(opt, layer)  # v back on its sphere after every step
        >>> for _ in range(3):
        ...     opt.zero_grad(); layer(torch.randn(8, 16)).pow(2).sum().backward(); opt.step()
        >>> torch.allclose(layer.weight_v.norm(dim=1), torch.full((4,), 4.0))  # sqrt(16)
        True
    """
    gain, radius = _positive("gain", gain), _positive("radius", radius)
    reparameterize(module, name, dim, lambda d: ForcedWeightNorm(d, gain, radius), where=where)
    if not any(h is _check_projected for h in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(_check_projected)
    return module


# modules already warned about (once each): a weak set, so warning keeps nothing alive
_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _check_projected(module: nn.Module, args: Any) -> None:
    """Before a training forward, warn (once per module) when a forced v is not projected after
    optimizer steps. Reads Python state only: no parameter changes, no host sync."""
    if not (module.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return
    if module in _WARNED:
        return
    params = module._parameters
    for s in slots_of(module).values():
        if not isinstance(s.map, ForcedWeightNorm):
            continue
        v = params.get(s.vname)
        if v is not None and v.requires_grad and not is_projected(module, s.vname):
            _WARNED.add(module)
            warnings.warn(
                f"{s.where}: '{s.vname}' of forced_weight_norm is trained, but nothing puts it "
                "back on its sphere after optimizer steps, so this layer trains as plain weight "
                "normalization; after building the optimizer, call "
                "wnorm.project_after_step(optimizer, model)", UserWarning, stacklevel=2)
            return


_check_projected.wnorm_owned = True  # type: ignore[attr-defined]  # removed with the last slot


# the name the forward pre-hook had when it renormalized v itself: models pickled then keep
# loading (the hook is looked up by name), and now only check
_project_forced = _check_projected


def balanced_weight_norm(
    module: nn.Module, name: str = "weight", dim: int | None = DEFAULT, *, where: str = ""
) -> nn.Module:
    r"""Balanced normalization: :math:`w = g\,\frac{v - \bar v}{\lVert v - \bar v\rVert_1}`.

    Defazio & Bottou, "Controlling Covariate Shift using Balanced Normalization of Weights",
    2018 (https://arxiv.org/abs/1812.04549; revised as "... Equilibrium Normalization of
    Weights"). Each slice along ``dim`` (each output unit) is centered, so its weights sum to 0,
    and divided by its L1 norm, so :math:`\sum_j |w_j| = |g|`: the positive weights sum to
    :math:`|g|/2` and the negative ones to :math:`-|g|/2`. Inputs of a common level (e.g. after a
    ReLU) then meet balanced positive and negative contributions: a constant input gives exactly
    the bias, whatever the weights, so the output's mean does not drift with them, without batch
    statistics. Assumed, as only the paper's abstract and summaries were at hand (they say
    centered, L1, balanced contributions): the mean and L1 norm run over every axis but ``dim``;
    the scale is one learned ``<name>_g`` per unit, starting at the centered weight's L1 norm
    (the layer then computes its centered weight: its function changes by the rows' means); no
    fixed fan-in factor (g absorbs it; :func:`wnorm.data_init` sets g from data). Parameters
    ``<name>_g`` and ``<name>_v``, like :func:`wnorm.centered_weight_norm`.

    Args:
        module: the module that owns the parameter.
        name: the parameter's name (default ``"weight"``).
        dim: the output-unit axis (default: the layer type's, as for ``weight_norm``);
            ``None`` balances the whole tensor.
        where: a name for the module in error messages.

    Returns:
        The same module, changed in place.

    Raises:
        WnormError: as :func:`wnorm.weight_norm`, and for a constant slice (zero after centering).

    Example:
        >>> import torch, wnorm
        >>> layer = wnorm.balanced_weight_norm(torch.nn.Linear(5, 3))
        >>> w = layer.weight
        >>> bool(w.sum(1).abs().max() < 1e-6)  # balanced: each row sums to 0
        True
        >>> torch.allclose(w.abs().sum(1), layer.weight_g.flatten())  # L1 norm g
        True
    """
    return reparameterize(module, name, dim, BalancedWeightNorm, where=where)


def _positive(what: str, value: object) -> float | None:
    """``value`` as a float when it is a finite number > 0; None stays None."""
    if value is None:
        return None
    x = finite_positive(value)
    if x is None:
        raise WnormError(f"forced_weight_norm: {what} must be a finite number > 0 or None; "
                         f"got {value!r}")
    return x
