r"""The mechanism that attaches a map (:mod:`wnorm.maps`) to a module's parameter, and detaches it.

:func:`attach` removes ``<name>`` from the module's parameters, registers ``<name>_g`` and
``<name>_v``, and moves the module to a generated subclass of its own class (``isinstance``,
the class name and ``repr`` are unchanged) whose property ``<name>`` returns
``map.weight(g, v)``, computed on every access: edits of g and v by any means are seen by the
next forward (the class: :mod:`wnorm._classes`; a parameter's record: :mod:`wnorm._slot`).
:func:`wnorm.cached` is the explicit way to compute each weight once.

Writes to the computed weight. The weight handed to code outside the layer's own forward is
kept until the next access, so that writes into it (``nn.init``, ``model.apply(init_fn)``,
``.copy_``, ``.data`` edits) are not lost: then, or at ``state_dict()``, ``.to()``, pickling or
``reset_parameters()``, the rows that differ from what g and v give are split back into g and v
(:meth:`Map.split`), without a host sync (:mod:`wnorm._held`). Inside the layer's forward
nothing is kept.

The module pickles, deep-copies and loads with ``torch.load(..., weights_only=False)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _pytorch_wn
from ._classes import base_class, class_for, ensure_property, refresh_flat_weights
from ._classes import rebuild as _rebuild  # noqa: F401 (pickles name it, and Slot, here)
from ._held import land_writes
from ._optimizer_check import replaced
from ._slot import Slot, pair
from .errors import WnormError
from .maps import Map

__all__ = ["attach", "detach", "plain_weight"]


def _check_own_class(module: nn.Module) -> None:
    """Refuse a module whose class another mechanism (PyTorch's parametrize) has subclassed on
    top of wnorm's: giving it its class back would drop that mechanism's class with it."""
    if "_wn" in module.__dict__ and "_wn_base" not in type(module).__dict__:
        raise WnormError(
            f"{type(module).__name__}: PyTorch parametrizations "
            f"({list(getattr(module, 'parametrizations', {}))}) were registered on top of wnorm's "
            "weight norm; remove them first (torch.nn.utils.parametrize.remove_parametrizations)")


def attach(module: nn.Module, name: str, map: Map, g: Tensor | None, v: Tensor,
           where: str) -> None:
    """Make ``module.<name>`` computed as ``map.weight(g, v)``; ``g`` and ``v`` are registered
    as given when they are Parameters (kept by optimizers and ties), else wrapped."""
    req = v.requires_grad
    old = module._parameters.pop(name, None)
    if isinstance(old, nn.Parameter) and old is not v and old is not g:
        replaced(old, where, name)

    def param(t: Tensor) -> nn.Parameter:
        return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=req)

    if map.has_g:
        module.register_parameter(name + "_g", param(g))  # type: ignore[arg-type]
    module.register_parameter(name + "_v", param(v))
    cls = class_for(type(module))
    ensure_property(cls, name)
    if "_wn" not in module.__dict__:
        object.__setattr__(module, "_wn", {})
    module.__dict__["_wn"][name] = Slot(name, map, where)
    module.__class__ = cls
    refresh_flat_weights(module)


def plain_weight(map: Map, g: Tensor | None, v: Tensor,
                 tied: dict[int, tuple[Tensor, nn.Parameter]]) -> nn.Parameter:
    """The Parameter holding ``map.weight(g, v)`` (``requires_grad`` as v's): the one ``tied``
    already has for this ``v`` (a tie stays one weight), else a new one, recorded there."""
    seen = tied.get(id(v))
    if seen is not None and seen[0] is v:
        return seen[1]
    with torch.no_grad():
        w = nn.Parameter(map.weight(g, v).detach().clone(), requires_grad=v.requires_grad)
    tied[id(v)] = (v, w)  # v kept alive: its id names it while ``tied`` lives
    return w


def detach(module: nn.Module, name: str,
           tied: dict[int, tuple[Tensor, nn.Parameter]] | None = None) -> None:
    """Undo :func:`attach`: ``module.<name>`` becomes a plain Parameter holding the weight
    (``requires_grad`` as v's); the module gets its class back when nothing stays attached.
    ``tied``, shared across calls, maps a ``v`` already detached elsewhere to its Parameter, so
    that holders of one (g, v) keep one weight."""
    _check_own_class(module)
    specs = module.__dict__["_wn"]
    s = specs[name]
    along = module.__dict__.get("_wn_along")
    if along and name in along:  # adopted with a sibling: a fresh weight_norm is one again
        module.__dict__["_wn_along"] = along - {name}
    land_writes(module)  # a tie's other holders' too: both removals give the written weight
    params = module._parameters
    g, v = pair(module, s)
    w_param = plain_weight(s.map, g, v, {} if tied is None else tied)
    del specs[name]
    params.pop(s.gname, None)
    del params[s.vname]
    params[name] = w_param
    _pytorch_wn.drop_adopted(module, name)  # a plain weight: PyTorch's removal has nothing left
    if not specs:
        del module.__dict__["_wn"]
        module.__class__ = base_class(module)
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "wnorm_owned", False):  # e.g. forced WN's check: ours, gone too
                del module._forward_pre_hooks[key]
    refresh_flat_weights(module)


