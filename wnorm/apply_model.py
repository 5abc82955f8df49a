"""Weight-normalize every eligible weight of a model in one call."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase

from torch import nn

from .errors import WnormError
from .weight_norm import _DEFAULT, is_weight_normalized, weight_norm

__all__ = ["apply", "DEFAULT_TYPES", "NORM_TYPES"]

#: The layer types :func:`apply` normalizes unless told otherwise. Embedding is eligible
#: (``types=wnorm.DEFAULT_TYPES + (nn.Embedding,)``) but not a default: fixed-norm embedding rows
#: change what a lookup table can represent.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.RNNBase,
)

#: Normalization layers: never weight-normalized, whatever ``types`` says.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def _weight_names(module: nn.Module) -> list[str]:
    if isinstance(module, nn.RNNBase):
        return [n for n in module._flat_weights_names if n.startswith("weight_")]
    p = module._parameters.get("weight")
    already = (
        "weight" in module.__dict__.get("_wn", ())
        or "weight_g" in module._parameters
        or "weight" in getattr(module, "parametrizations", {})
    )  # let weight_norm say what normalized it
    return ["weight"] if already or (p is not None and p.dim() >= 1) else []


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def apply(
    model: nn.Module,
    *,
    types: tuple[type[nn.Module], ...] = DEFAULT_TYPES,
    include: Iterable[str] | None = None,
    exclude: Iterable[str | type[nn.Module]] = (),
    dim: int | None | object = _DEFAULT,
    filter: Callable[[str, nn.Module], bool] | None = None,
    method: Callable[..., nn.Module] = weight_norm,
) -> nn.Module:
    r"""Apply :func:`wnorm.weight_norm` (:math:`w = g\,v/\lVert v\rVert`) to every eligible weight.

    A module is eligible when it is an instance of one of ``types``, is not a normalization layer
    (BatchNorm, GroupNorm, LayerNorm, ..., never touched), and passes the name and type filters.
    Its ``weight`` is normalized, or for RNN/LSTM/GRU every ``weight_*`` of its flat weights
    (each gate row is an output unit).

    Args:
        model: the model, changed in place.
        types: the layer types to normalize (default :data:`DEFAULT_TYPES`: Linear, ConvNd,
            ConvTransposeNd, RNNBase).
        include: glob patterns on module names (``"encoder.*"``); when given, only matching
            modules are normalized.
        exclude: glob patterns on module names, or module types, to leave alone
            (e.g. ``["head"]``, ``[nn.ConvTranspose1d]``).
        dim: passed to :func:`weight_norm` (default: each layer type's output-unit axis).
        filter: ``(name, module) -> bool``, a last say on each eligible module.
        method: the reparameterization (default :func:`wnorm.weight_norm`; also
            :func:`wnorm.centered_weight_norm`, :func:`wnorm.weight_standardization`,
            :func:`wnorm.forced_weight_norm`, or a ``functools.partial`` of one).

    Returns:
        The same model.

    Raises:
        WnormError: no module was selected, or a selected weight cannot be normalized
            (already normalized, zero-norm rows, non-finite values); the message names it.

    Example:
        >>> import torch, wnorm
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> _ = wnorm.apply(net, exclude=["2"])
        >>> [n for n, _ in net.named_parameters()]
        ['0.bias', '0.weight_g', '0.weight_v', '2.weight', '2.bias']
    """
    patterns = [e for e in exclude if isinstance(e, str)]
    ex_types = tuple(e for e in exclude if isinstance(e, type))
    include = list(include) if include is not None else None
    chosen: list[tuple[str, nn.Module]] = []
    for mname, module in model.named_modules(remove_duplicate=True):
        if not isinstance(module, types) or isinstance(module, NORM_TYPES):
            continue
        if ex_types and isinstance(module, ex_types):
            continue
        if patterns and _matches(mname, patterns):
            continue
        if include is not None and not _matches(mname, include):
            continue
        if filter is not None and not filter(mname, module):
            continue
        chosen.append((mname, module))
    if not chosen:
        raise WnormError(
            f"apply: no module of {type(model).__name__} was selected "
            f"(types={[t.__name__ for t in types]}, include={include}, exclude={list(exclude)})"
        )
    for mname, module in chosen:
        for pname in _weight_names(module):
            if is_weight_normalized(module, pname):
                raise WnormError(
                    f"{mname or '<model>'} ({type(module).__name__}): '{pname}' is already "
                    "weight-normalized by wnorm"
                )
            method(module, pname, dim, where=mname or "<model>")
    return model
