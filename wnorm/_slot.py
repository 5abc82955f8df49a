r"""A reparameterized parameter's record (:class:`Slot`), and what a weight computed from g and
v is valid for.

A layer that wnorm reparameterizes keeps ``{name: Slot}`` in ``module.__dict__["_wn"]``; the
functions here find slots and their (g, v), and tell whether g and v are still the tensors, at
the versions and addresses, a weight was computed from (:mod:`wnorm._held` and
:mod:`wnorm.cache` key their weights on that).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .errors import WnormError
from .maps import Map

__all__ = ["Slot", "version_of", "key_of", "same", "addresses", "pair", "check_finite",
           "slots", "slot", "slots_of"]


class Slot:
    """One reparameterized parameter: its map, a name for messages, the weight last handed to
    code outside the layer's forward (``held``, with ``held_key``: the g and v it was computed
    from, the versions of g, v and itself then, and a copy of it) and the weight cached by
    :func:`wnorm.cached` (``cached``, valid for ``key``)."""

    __slots__ = ("name", "map", "where", "gname", "vname", "held", "held_key", "cached", "key",
                 "cached_at")

    def __init__(self, name: str, map: Map, where: str) -> None:
        self.name, self.map, self.where = name, map, where
        self.gname, self.vname = name + "_g", name + "_v"
        self.held: Tensor | None = None
        self.held_key: tuple[Any, ...] = ()
        self.cached: Tensor | None = None
        self.key: tuple[Any, ...] = ()
        self.cached_at = -1  # the cached weight's version when cached: a write moves it

    @property
    def dim(self) -> int | None:
        return self.map.dim

    @property
    def kind(self) -> str:
        return self.map.kind

    @property
    def has_g(self) -> bool:
        return self.map.has_g

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.name, self.map, self.where)  # held and cached weights are derived

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> Slot:
        import copy

        return Slot(self.name, copy.deepcopy(self.map, memo), self.where)


# pickled models name it where wnorm 0.2.0 defined it (wnorm._reparam imports it): pickles
# load both ways between versions
Slot.__module__ = "wnorm._reparam"

def version_of(t: Tensor) -> int:
    """``t``'s version, or -1 for an inference tensor (a weight read, or a layer built, under
    ``torch.inference_mode``), which has no version counter: a write into a held weight is
    then told by the copy taken at the read; a write into g or v built there, inside a
    :func:`wnorm.cached` block, is not seen, as one through ``.data`` is not."""
    return -1 if t.is_inference() else t._version


def key_of(g: Tensor | None, v: Tensor) -> tuple[Any, ...]:
    return (g, v, None if g is None else version_of(g), version_of(v))


def same(key: tuple[Any, ...], g: Tensor | None, v: Tensor) -> bool:
    """Whether ``key`` was taken from these very g and v, at their current versions (tensors
    compared by identity: ``==`` on a tensor compares its values)."""
    return (bool(key) and key[0] is g and key[1] is v
            and key[2] == (None if g is None else version_of(g)) and key[3] == version_of(v))


def pair(module: nn.Module, slot: Slot) -> tuple[Tensor | None, Tensor]:
    """``(g, v)`` of ``slot`` (g None for a map without one), or an error naming what took
    them away: ``torch.nn.utils.prune`` and ``register_parametrization`` on ``<name>_v`` move
    it out of the module's parameters."""
    params = module._parameters
    g, v = params.get(slot.gname), params.get(slot.vname)
    if v is None or (g is None and slot.map.has_g):
        gone = slot.vname if v is None else slot.gname
        raise WnormError(
            f"{slot.where}: '{gone}' is no longer a parameter of this layer (torch.nn.utils."
            f"prune or a parametrization registered on it moves it away), but '{slot.name}' is "
            f"computed from '{slot.gname}' and '{slot.vname}'; remove that first (prune."
            f"remove / parametrize.remove_parametrizations), or prune the plain weight of "
            f"wnorm.fold(model)")
    return g, v


def check_finite(slot: Slot, w: Tensor) -> None:
    """Refuse to cache a weight with NaN or inf (a zero row of v, a non-finite g): a host sync,
    once per weight and :func:`wnorm.cached` block."""
    if w.is_meta:  # no values to check (a model built on the meta device)
        return
    if not bool(torch.isfinite(w).all()):
        rows = (~torch.isfinite(w)).flatten(1).any(1) if slot.map.dim == 0 and w.dim() > 1 \
            else None
        which = "" if rows is None else f" in rows {rows.nonzero().flatten().tolist()[:10]}"
        raise WnormError(
            f"{slot.where}: the weight-normalized '{slot.name}' has non-finite values{which}: a "
            f"zero row of '{slot.vname}' (no direction; structured pruning of "
            f"'{slot.vname}' makes those: prune the unit's '{slot.gname}' instead), a row too "
            f"small for its norm to be computed (entries below about 1e-19 in float32), or a "
            f"non-finite '{slot.gname}' or '{slot.vname}'")


def addresses(g: Tensor | None, v: Tensor) -> tuple[Any, ...]:
    """Where g's and v's data are, and how v's is read: ``v.data = v.data.t()`` keeps a square
    weight's address, and a meta tensor is always at 0, its strides following its shape (g is
    a vector: its address says it all). Checked at every cached access: kept to three reads."""
    return (None if g is None else g.data_ptr(), v.data_ptr(), v.stride())


def slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, Slot]]:
    """``(module name, module, slot)`` for every attached parameter in ``model``."""
    for mname, module in model.named_modules():
        for s in module.__dict__.get("_wn", {}).values():
            yield mname, module, s


def slot(module: nn.Module, name: str) -> Slot | None:
    """The slot of ``module.<name>``, or None when it is not attached."""
    return module.__dict__.get("_wn", {}).get(name)


def slots_of(module: nn.Module) -> dict[str, Slot]:
    """``{parameter name: slot}`` of ``module`` itself (empty when nothing is attached)."""
    return module.__dict__.get("_wn", {})
