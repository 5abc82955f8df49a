"""Weight-normalize every eligible weight of a model in one call."""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from . import _classes, _pytorch_wn, _slot
from .errors import WnormError, expect_module, warn_at_user
from .mean_only_bn import MeanOnlyBatchNormBase
from .weight_norm import DEFAULT, default_dim, is_weight_normalized, weight_norm

__all__ = ["apply", "DEFAULT_TYPES", "NORM_TYPES", "default_types"]

#: The layer types :func:`apply` normalizes unless told otherwise (plus torch_geometric's
#: ``Linear`` when torch_geometric is loaded, see :func:`default_types`). Embedding is eligible
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
    nn.RNNCellBase,
)

#: Normalization layers: never weight-normalized, whatever ``types`` says.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def default_types() -> tuple[type[nn.Module], ...]:
    """:data:`DEFAULT_TYPES`, plus ``torch_geometric.nn.dense.linear.Linear`` (which GCN, GAT,
    GraphSAGE and most of PyG's layers are built on) when torch_geometric has been imported: a
    model holding PyG layers has imported it, and wnorm never imports it itself."""
    pyg = sys.modules.get("torch_geometric.nn.dense.linear")
    return DEFAULT_TYPES + ((pyg.Linear,) if pyg is not None else ())


def _weight_names(module: nn.Module, types: tuple[type[nn.Module], ...]) -> list[str]:
    """The weights of a selected module to normalize: those PyTorch's weight norm holds (any
    name: MultiheadAttention's ``in_proj_weight``), and, for one of ``types``, its plain
    ``weight`` (an RNN's every ``weight_*``). A module selected only for adoption
    (``types=()``) keeps its other weights as they are."""
    adopted = [f.name for f in _pytorch_wn.find(module)]
    if not isinstance(module, types):
        return adopted
    return list(dict.fromkeys(_type_weight_names(module) + adopted))


def _type_weight_names(module: nn.Module) -> list[str]:
    if isinstance(module, nn.RNNBase):
        return [n for n in module._flat_weights_names if n.startswith("weight_")]
    if isinstance(module, nn.RNNCellBase):  # LSTMCell, GRUCell, RNNCell: gate rows, as RNNs
        have = set(_slot.slots_of(module)) | {f.name for f in _pytorch_wn.find(module)}
        return [n for n in ("weight_ih", "weight_hh")
                if n in have or module._parameters.get(n) is not None]
    p = module._parameters.get("weight")
    already = "weight" in _slot.slots_of(module) or any(
        f.name == "weight" for f in _pytorch_wn.find(module))
    return ["weight"] if already or (p is not None and p.dim() >= 1) else []


def _computed_by(module: nn.Module) -> str:
    """What computes a selected layer's ``weight`` when it is no Parameter of its own ("" when
    it is one, or nothing wnorm knows): another parametrization (spectral norm, orthogonal),
    the old ``spectral_norm``'s hook, or ``torch.nn.utils.prune``'s."""
    if module._parameters.get("weight") is not None:
        return ""
    if parametrize.is_parametrized(module, "weight"):
        chain = ", ".join(type(p).__name__ for p in module.parametrizations["weight"])
        return f"a PyTorch parametrization ({chain})"
    for hook in module._forward_pre_hooks.values():
        if getattr(hook, "_tensor_name", None) == "weight":
            return f"torch.nn.utils.prune ({type(hook).__name__})"
        if getattr(hook, "name", None) == "weight":
            return f"PyTorch's {type(hook).__name__} hook"
    return ""


def _pattern_list(arg: Any, what: str, types_ok: bool) -> list[Any]:
    """``include``/``exclude`` as a list: one string (or type) is one pattern, not its
    characters; anything else that is not a pattern is an error, never silently ignored."""
    if arg is None:
        return []
    if isinstance(arg, (str, type)):
        arg = [arg]
    try:
        items = list(arg)
    except TypeError:
        items = [arg]
    wanted = "glob patterns (str) or module types" if types_ok else "glob patterns (str)"
    for e in items:
        if not (isinstance(e, str) or (types_ok and isinstance(e, type)
                                       and issubclass(e, nn.Module))):
            raise WnormError(f"apply: {what} takes {wanted}; got {e!r}")
    return items


def _some_names(model: nn.Module, n: int = 6) -> list[str]:
    names = [m for m, _ in model.named_modules() if m]
    return names[:n] + (["..."] if len(names) > n else [])


def _first(model: nn.Module) -> str:
    return next((m for m, _ in model.named_modules() if m), "0")


class _TooMany(Exception):
    pass


def _paths(model: nn.Module, fn: str, budget: int = 100_000) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every path to every module, parents first, as
    ``named_modules(remove_duplicate=False)`` gives them, but a child holding a module on its
    own path (``self.owner = parent``) is not followed (that recursed forever), and a model
    whose shared modules nest so deep that their paths pass ``budget`` (their number doubles
    at each level) gets each module once, under its first name, with a warning."""
    out: list[tuple[str, nn.Module]] = []
    on_path: set[int] = set()

    def walk(prefix: str, module: nn.Module) -> None:
        out.append((prefix, module))
        if len(out) > budget:
            raise _TooMany
        on_path.add(id(module))
        for cname, child in module._modules.items():
            if child is not None and id(child) not in on_path:
                walk(f"{prefix}.{cname}" if prefix else cname, child)
        on_path.discard(id(module))

    try:
        walk("", model)
    except _TooMany:
        warn_at_user(
            f"{fn}: {type(model).__name__} reaches its modules by more than {budget:,} paths "
            "(modules reached on several paths are walked on each); include and exclude "
            "patterns are matched against each module's first name only")
        return list(model.named_modules())
    return out


def _excluded(model: nn.Module, exclude: list[Any], fn: str = "apply") -> set[int]:
    """The ids of the modules ``exclude`` names (by glob on any of their names, or by type) and
    of every module inside one: excluding an attention block leaves its projections alone too.
    An entry matching no module is an error: a typo would otherwise exclude nothing, silently."""
    if not exclude:  # the walk below visits every path of a shared module: only when asked
        return set()
    out: set[int] = set()
    out_names: set[str] = set()
    used: set[int] = set()
    # every path of a shared module: it is excluded when any path to it is
    for mname, module in _paths(model, fn):
        hits = [i for i, e in enumerate(exclude)
                if (isinstance(module, e) if isinstance(e, type) else fnmatchcase(mname, e))]
        used.update(hits)
        parent = mname.rpartition(".")[0] if mname else None  # yielded before its children
        if hits or parent in out_names:
            out.add(id(module))
            out_names.add(mname)
    for i, e in enumerate(exclude):
        if i not in used:
            what = e.__name__ if isinstance(e, type) else repr(e)
            raise WnormError(
                f"{fn}: exclude entry {what} matches no module of {type(model).__name__} "
                f"(a typo?); its modules are e.g. {_some_names(model)}")
    return out


def _included(model: nn.Module, include: list[str], fn: str = "apply") -> set[int]:
    """The ids of the modules ``include`` names by glob on any of their names: a shared module
    is included when any path to it matches, as :func:`_excluded` excludes it. An entry
    matching no module is an error, as it is for ``exclude``."""
    out: set[int] = set()
    used: set[int] = set()
    for mname, module in _paths(model, fn):
        hits = [i for i, e in enumerate(include) if fnmatchcase(mname, e)]
        if hits:
            used.update(hits)
            out.add(id(module))
    for i, e in enumerate(include):
        if i not in used:
            raise WnormError(
                f"{fn}: include entry {e!r} matches no module of {type(model).__name__} "
                f"(a typo?); its modules are e.g. {_some_names(model)}; a pattern matches a "
                f"whole name, so '{_first(model)}.*' selects the modules inside "
                f"'{_first(model)}'")
    return out


def _method_dim(method: Callable[..., nn.Module], dim: Any) -> Any:
    """``dim``, or the one a ``functools.partial`` of ``method`` fixes: apply passes ``dim`` by
    keyword, which would override the partial's silently, and checks ties along it."""
    name = f"{method.__module__}.{method.__qualname__}" if hasattr(method, "__qualname__") \
        else repr(method)
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):  # a callable without a signature: the call itself tells
        sig = None
    if sig is not None:
        try:
            sig.bind(nn.Module(), "weight", dim=None, where="")
        except TypeError as e:
            raise WnormError(
                f"apply: method must accept (module, name, dim=..., *, where=...) and "
                f"reparameterize module.<name> with wnorm, as wnorm.weight_norm does; got "
                f"{name}{sig} ({e})") from None
    fixed = method.keywords.get("dim", DEFAULT) if isinstance(method, functools.partial) \
        else DEFAULT
    if fixed is DEFAULT:
        return dim
    if dim is not DEFAULT and dim != fixed:
        raise WnormError(f"apply: dim={dim!r}, but method fixes dim={fixed!r}; give it once")
    return fixed


def _label(mname: str, module: nn.Module) -> str:
    return f"{mname or '<model>'} ({type(module).__name__})"


def _resolved_dim(module: nn.Module, pname: str, dim: Any) -> Any:
    return default_dim(module, pname) if dim is DEFAULT else dim


class _Undo:
    """What :func:`apply` changed, to put back exactly when a later weight fails: each touched
    module's class, attributes and the dicts of parameters, submodules and hooks that adopting
    PyTorch's weight norm edits (the same objects, in order)."""

    _DICTS = ("_parameters", "_modules", "_forward_pre_hooks", "_load_state_dict_pre_hooks")

    def __init__(self) -> None:
        self.saved: dict[int, tuple[nn.Module, type, dict[str, Any], dict[str, Any]]] = {}

    def keep(self, module: nn.Module) -> None:
        plist = module.__dict__.get("_modules", {}).get("parametrizations")
        if plist is not None:  # adopting PyTorch's weight norm deletes an entry of it
            self.keep(plist)
        if id(module) not in self.saved:
            d = module.__dict__
            inner = {k: dict(d[k]) for k in self._DICTS if k in d}
            if "_wn" in d:
                inner["_wn"] = dict(d["_wn"])
            self.saved[id(module)] = (module, module.__class__, dict(d), inner)

    def restore(self) -> None:
        for module, cls, attrs, inner in reversed(self.saved.values()):
            d = module.__dict__
            d.clear()
            d.update(attrs)
            for k, content in inner.items():  # the same dict objects, their old contents
                d[k].clear()
                d[k].update(content)
            module.__class__ = cls
        # an RNN's flat weights read its parametrized properties: only once every module (its
        # parametrizations list too, restored after it) is back (a KeyError left it broken)
        for module, *_ in self.saved.values():
            _classes.refresh_flat_weights(module)


def apply(
    model: nn.Module,
    *,
    types: tuple[type[nn.Module], ...] | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | type[nn.Module] | Iterable[str | type[nn.Module]] = (),
    dim: int | None | object = DEFAULT,
    filter: Callable[[str, nn.Module], bool] | None = None,
    method: Callable[..., nn.Module] = weight_norm,
) -> nn.Module:
    r"""Apply :func:`wnorm.weight_norm` (:math:`w = g\,v/\lVert v\rVert`) to every eligible weight.

    A module is eligible when it is one of ``types``, is no normalization layer and passes
    the name and type filters; its ``weight`` is normalized (an RNN's every ``weight_*``).
    Layers PyTorch's ``weight_norm`` (either API) already holds are adopted, whatever their
    type: the same g and v Parameters and axis, the same outputs bit for bit. Tied weights
    stay tied (every holder gets the same g and v) or the call raises naming both holders;
    it is all or nothing: when it raises, the model is exactly as it was.

    Args:
        model: the model, changed in place.
        types: the layer types to normalize (default :func:`default_types`: Linear, ConvNd,
            ConvTransposeNd, RNNs and RNN cells, and torch_geometric's Linear). Layers already
            normalized by PyTorch's ``weight_norm`` (either API) are adopted whatever their
            type: the same g and v Parameters, the same axis, the same outputs bit for bit.
        include: a glob pattern, or several, on module names (``"encoder.*"``); when given, only
            matching modules are normalized. A pattern matches a whole name: ``"encoder"``
            names the container, ``"encoder.*"`` the modules inside it. A module shared under
            several names is matched on each; an entry matching no module is an error.
        exclude: glob patterns on module names, or module types, to leave alone (one, or
            several: ``"head"``, ``["head", nn.ConvTranspose1d]``), with every module inside
            them (``nn.MultiheadAttention`` leaves its ``out_proj`` alone too).
        dim: passed to :func:`weight_norm` (default: each layer type's output-unit axis).
        filter: ``(name, module) -> bool``, a last say on each eligible module.
        method: the reparameterization (default :func:`wnorm.weight_norm`; also
            :func:`wnorm.centered_weight_norm`, :func:`wnorm.weight_standardization`,
            :func:`wnorm.forced_weight_norm`, :func:`wnorm.balanced_weight_norm`, or a
            ``functools.partial`` of one, whose ``dim`` serves as ``dim``), called as
            ``method(module, name, dim=dim, where=module_name)``.

    Returns:
        The same model.

    Raises:
        WnormError: no module was selected, a pattern is not a string (or type, for
            ``exclude``), an ``exclude`` entry matches no module (a typo), ``method`` does not
            take that call or fixes another ``dim`` than the one given, a selected weight
            cannot be normalized (already normalized, not initialized yet by a lazy module's
            first forward, zero-norm rows, non-finite values) or is tied to a weight that
            cannot share its g and v; the message names it.

    Example:
        >>> import torch, wnorm
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> _ = wnorm.apply(net, exclude="2")
        >>> [n for n, _ in net.named_parameters()]
        ['0.bias', '0.weight_g', '0.weight_v', '2.weight', '2.bias']
    """
    expect_module("apply", model)
    for what, fn in (("filter", filter), ("method", method)):
        if fn is not None and not callable(fn):
            raise WnormError(f"apply: {what} must be callable; got {type(fn).__name__}")
    ddp = sys.modules.get("torch.nn.parallel.distributed")
    if ddp is not None and any(isinstance(m, ddp.DistributedDataParallel)
                               for m in model.modules()):
        raise WnormError(
            "apply: the model is wrapped in DistributedDataParallel, which keeps all-reducing the "
            "weights it was built with (not g and v), so the ranks would drift apart; apply "
            "(and data_init) to the unwrapped model first, then wrap it in DDP")
    dim = _method_dim(method, dim)
    if types is None:
        types = default_types()
    elif isinstance(types, (type, str)):
        types = (types,)
    else:
        types = tuple(types)
    bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad:
        raise WnormError(f"apply: types takes nn.Module classes (e.g. torch.nn.Linear); got "
                         f"{bad[0]!r}")
    include_l = _pattern_list(include, "include", False) if include is not None else None
    exclude_l = _pattern_list(exclude, "exclude", True)
    excluded = _excluded(model, exclude_l)
    included = _included(model, include_l) if include_l is not None else None
    chosen: list[tuple[str, nn.Module]] = []
    # every (module name, module, parameter name) holding each Parameter: ties are found here
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=True):
        for pname, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((mname, module, pname))
        if not (isinstance(module, types) or _pytorch_wn.find(module)) or isinstance(
                module, NORM_TYPES):
            continue
        if id(module) in excluded:
            continue
        if included is not None and id(module) not in included:
            continue
        if filter is not None and not filter(mname, module):
            continue
        chosen.append((mname, module))
    if not chosen:
        raise WnormError(
            f"apply: no module of {type(model).__name__} was selected "
            f"(types={[t.__name__ for t in types]}, include={include_l}, exclude={exclude_l}); "
            f"its modules are e.g. {_some_names(model)}; a pattern matches a whole name, so "
            f"'{_first(model)}.*' selects the modules inside '{_first(model)}'"
        )

    # Check what can be checked before changing anything.
    targets: list[tuple[str, nn.Module, str]] = []
    left: list[str] = []  # selected layers whose weight something else computes
    for mname, module in chosen:
        lazy = [n for n, p in module._parameters.items()
                if isinstance(p, nn.parameter.UninitializedParameter)]
        if lazy:
            raise WnormError(
                f"{_label(mname, module)}: {lazy} are not initialized yet (a lazy module "
                "materializes them at its first forward); run one forward pass on a batch "
                "before wnorm.apply"
            )
        names = _weight_names(module, types)
        if not names and (by := _computed_by(module)):
            left.append(f"{_label(mname, module)}, whose 'weight' {by} computes")
        for pname in names:
            if is_weight_normalized(module, pname):
                raise WnormError(
                    f"{_label(mname, module)}: '{pname}' is already weight-normalized by wnorm;"
                    f" leave it out (wnorm.apply(model, exclude=[{mname!r}])) or apply once"
                )
            targets.append((mname, module, pname))
    if not targets:  # e.g. types=(nn.MultiheadAttention,): selected, but nothing to normalize
        mname, module = chosen[0]
        have = [n for n, p in module._parameters.items() if p is not None]
        why = f" ({'; '.join(left[:3])}: remove that first)" if left else ""
        raise WnormError(
            f"apply: the {len(chosen)} selected module(s) hold no parameter 'weight' to "
            f"normalize (e.g. {_label(mname, module)}, whose parameters are {have}){why}; name "
            "another with wnorm.weight_norm(module, name), or select their submodules")
    if left:  # an SN-GAN discriminator keeps its spectral norm: said, not done silently
        warnings.warn(f"apply leaves {len(left)} selected layer(s) plain: "
                      f"{'; '.join(left[:5])}{'; ...' if len(left) > 5 else ''} (exclude "
                      "them to leave them plain without this warning)", UserWarning, stacklevel=2)
    selected = {(id(m), pn) for _, m, pn in targets}
    for mname, module, pname in targets:
        p = module._parameters.get(pname)
        tied = holders.get(id(p), ()) if p is not None else ()
        if len(tied) < 2:
            continue
        d = _resolved_dim(module, pname, dim)
        for oname, other, opname in tied:
            if (id(other), opname) not in selected:
                raise WnormError(
                    f"{_label(mname, module)}: '{pname}' is the same Parameter as "
                    f"'{opname}' of {_label(oname, other)}, which is not selected; normalizing "
                    "one of them would untie them. Select both (e.g. add its type to types=) "
                    "so that they share one g and v, or exclude both"
                )
            od = _resolved_dim(other, opname, dim)
            if od != d:
                raise WnormError(
                    f"{_label(mname, module)}: '{pname}' is the same Parameter as '{opname}' "
                    f"of {_label(oname, other)}, but their output units lie along different "
                    f"axes (dim {d} and {od}), so one g cannot serve both; exclude both, or "
                    "untie them first"
                )

    undo = _Undo()
    # id(tied Parameter) -> (the Parameter, kept alive; the first holder normalized)
    leaders: dict[int, tuple[nn.Parameter, tuple[nn.Module, str]]] = {}
    try:
        for mname, module, pname in targets:
            p = module._parameters.get(pname)
            tied = p is not None and len(holders.get(id(p), ())) > 1
            undo.keep(module)
            method(module, pname, dim=dim, where=mname or "<model>")
            if _slot.slot(module, pname) is None:  # ties and undo rely on wnorm's slots
                raise WnormError(
                    f"{_label(mname, module)}: method {method!r} left '{pname}' not "
                    "reparameterized by wnorm; method must be wnorm.weight_norm or one of its "
                    "family (or a functools.partial of one)")
            if not tied:
                continue
            if id(p) not in leaders:
                leaders[id(p)] = (p, (module, pname))
                continue
            _share(leaders[id(p)][1], module, pname)
    except BaseException:
        undo.restore()
        raise
    # a mean-only BN's input errors name its path (several in a model look alike otherwise)
    for mname, module in model.named_modules():
        if isinstance(module, MeanOnlyBatchNormBase):
            module.__dict__.setdefault("_where", mname or "<model>")
    return model


def _share(leader: tuple[nn.Module, str], module: nn.Module, pname: str) -> None:
    """Give ``module.<pname>`` (just normalized) the g and v of the first holder of its tie."""
    lmod, lname = leader
    lslot, slot = _slot.slot(lmod, lname), _slot.slot(module, pname)
    if lslot.map != slot.map:  # type: ignore[union-attr]
        raise WnormError(
            f"{slot.where}: '{pname}' is tied to '{lname}' of {lslot.where}, but they were "  # type: ignore[union-attr]
            f"normalized differently ({lslot.map!r} vs {slot.map!r}), so they cannot share "  # type: ignore[union-attr]
            "g and v")
    names = [(slot.gname, lslot.gname)] if slot.map.has_g else []  # type: ignore[union-attr]
    for mine, theirs in names + [(slot.vname, lslot.vname)]:  # type: ignore[union-attr]
        module.register_parameter(mine, lmod._parameters[theirs])
    _classes.refresh_flat_weights(module)
