"""PyTorch's own weight norm on a module: find it, take it off without touching other modules,
and leave what PyTorch's removal looks for once wnorm has adopted it.

PyTorch has two APIs: the old ``torch.nn.utils.weight_norm`` (a forward pre-hook and parameters
``<name>_g``/``<name>_v``) and ``torch.nn.utils.parametrizations.weight_norm`` (a generated
``Parametrized<Class>`` with ``parametrizations.<name>.original0`` = g and ``original1`` = v).
``parametrize.remove_parametrizations`` deletes the property from the generated class, which a
deep copy shares with its original, and registers the computed weight as a buffer; :func:`strip`
does neither.

Code written for PyTorch's weight norm takes it off with ``torch.nn.utils.remove_weight_norm``
(transformers' ``remove_weight_norm()`` methods do, whichever API put it on): an adopted
weight keeps an :class:`Adopted` hook there, through which that call removes wnorm's.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.utils.weight_norm import WeightNorm as TorchWeightNorm

from ._classes import class_for, ensure_property

__all__ = ["Found", "Adopted", "find", "strip", "drop_adopted"]


class Found(NamedTuple):
    """One weight normalized by PyTorch: its name, ``api`` ("old" or "new") and norm axis
    (non-negative; None for one norm over the whole tensor, which PyTorch writes as -1)."""

    name: str
    api: str
    dim: int | None


def _axis(dim: int | None, ndim: int) -> int | None:
    return None if dim is None or dim == -1 else dim % ndim


class Adopted(TorchWeightNorm):
    r"""The forward pre-hook left on a module whose PyTorch weight norm of ``name`` wnorm adopted
    (:math:`w = g\,v/\lVert v\rVert` is then wnorm's, computed at every access).

    ``torch.nn.utils.remove_weight_norm(module, name)`` looks for a ``WeightNorm`` hook of that
    name and calls its :meth:`remove`: here that is :func:`wnorm.remove_weight_norm`, so a
    model's own ``remove_weight_norm()`` leaves plain layers with the same outputs. The hook
    does nothing at forward; wnorm takes it off with the weight norm.
    """

    def __call__(self, module: nn.Module, inputs: object) -> None:
        return None  # wnorm's property computes the weight; PyTorch's hook would assign it

    def remove(self, module: nn.Module) -> None:
        from .weight_norm import remove_weight_norm

        hooks = module._forward_pre_hooks
        key = next((k for k, h in hooks.items() if h is self), None)
        remove_weight_norm(module, self.name)  # its detach takes this hook off too
        if key is not None:
            # torch.nn.utils.remove_weight_norm deletes this entry itself once remove() returns
            hooks[key] = self


def drop_adopted(module: nn.Module, name: str) -> None:
    """Take the :class:`Adopted` hook of ``name`` off ``module`` (none: nothing to do)."""
    hooks = module._forward_pre_hooks
    for key, hook in list(hooks.items()):
        if isinstance(hook, Adopted) and hook.name == name:
            del hooks[key]


def find(module: nn.Module) -> list[Found]:
    """PyTorch's weight norm on ``module`` itself (not its children); an :class:`Adopted`
    hook is wnorm's, not PyTorch's."""
    from torch.nn.utils.parametrizations import _WeightNorm

    found = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, TorchWeightNorm) and not isinstance(hook, Adopted):
            ndim = module._parameters[hook.name + "_v"].dim()
            found.append(Found(hook.name, "old", _axis(hook.dim, ndim)))
    plist = module.__dict__.get("_modules", {}).get("parametrizations")
    if plist is not None:
        for pname, chain in plist.items():
            if len(chain) == 1 and isinstance(chain[0], _WeightNorm):
                found.append(Found(pname, "new", _axis(chain[0].dim, chain.original1.dim())))
    return found


def _remove_compat_hooks(module: nn.Module, name: str) -> None:
    # parametrizations.weight_norm also registers a load_state_dict pre-hook that renames
    # '<name>_g'/'<name>_v' keys to 'parametrizations.<name>.original0/1'; left behind, it would
    # send a later wnorm checkpoint's g and v to keys nothing loads.
    hooks = module._load_state_dict_pre_hooks
    for key, hook in list(hooks.items()):
        fn = getattr(hook, "hook", hook)
        fn = getattr(fn, "func", fn)
        if getattr(fn, "__name__", "") != "_weight_norm_compat_hook":
            continue
        cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
        if "name" in cells and cells["name"].cell_contents == name:
            del hooks[key]


def strip(module: nn.Module, found: Found) -> tuple[Tensor, Tensor]:
    """Take PyTorch's weight norm of ``found`` off ``module`` and return its ``(g, v)``
    Parameters (the same objects, so optimizers and ties that hold them still do).
    ``module.<name>`` is left unset: the caller registers what replaces it."""
    name = found.name
    if found.api == "old":
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, TorchWeightNorm) and hook.name == name:
                del module._forward_pre_hooks[key]
        g = module._parameters.pop(name + "_g")
        v = module._parameters.pop(name + "_v")
        module.__dict__.pop(name, None)  # the hook's last computed weight, a plain attribute
        return g, v
    plist = module._modules["parametrizations"]
    chain = plist[name]
    g, v = chain.original0, chain.original1
    del plist[name]
    _remove_compat_hooks(module, name)
    # wnorm's class may sit on the generated one already (an LSTMCell's second adopted weight):
    # the generated class is then the one under it, and wnorm's goes back on top of what
    # replaces it (dropping it lost wnorm's class, and the generated one stayed)
    top = type(module)
    cls = top.__dict__.get("_wn_base", top)
    if len(plist) == 0:
        # Leave the generated class alone (a deep copy shares it); move this module back to the
        # class it was built as.
        del module._modules["parametrizations"]
        new = cls.__bases__[0]
    else:
        # other tensors stay parametrized: this module gets a class of its own, the generated
        # one without the property of `name`
        ns = {k: val for k, val in cls.__dict__.items()
              if k not in (name, "__dict__", "__weakref__")}
        new = type(cls.__name__, cls.__bases__, ns)
    if cls is not top:
        new = class_for(new)
        for slot_name in module.__dict__.get("_wn", {}):  # the weights wnorm computes already
            ensure_property(new, slot_name)
    module.__class__ = new
    return g, v
