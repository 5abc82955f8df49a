r"""Fold a trained model for inference: plain weights :math:`w = g\,v/\lVert v\rVert`, and eval-mode
mean-only batch norm merged into the preceding layer's bias.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _held, _pytorch_wn, _reparam, _slot
from .errors import WnormError, expect_module, refuse_sharded
from .maps import WeightNorm
from .mean_only_bn import MeanOnlyBatchNormBase, move_hooks
from .weight_norm import _earlier_weight

__all__ = ["fold", "ChannelShift"]

_BIAS_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
#: the forwards that add a layer's bias once to its output and do nothing else, each with its
#: class: a ConvNd's forward adds it in that class's ``_conv_forward``
_BIAS_FORWARDS = {c.forward: c for c in (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d)}


class ChannelShift(nn.Module):
    r"""Add a constant per channel, :math:`y = x + c` along dim 1: a folded mean-only batch norm
    (:math:`c = b - \mu_{\text{running}}`) where no preceding layer could take it as a bias.

    As the batch norm did, it returns the input's dtype (a bfloat16 input under autocast stays
    bfloat16; a half-precision sum is taken in float32 and rounded once) and refuses an input
    whose dim 1 is not its channel count. ``origin`` names the batch norm in its errors.

    Raises:
        WnormError: an input with fewer than 2 dims, or not ``shift.numel()`` channels in dim 1.
    """

    def __init__(self, shift: Tensor, origin: str = "") -> None:
        super().__init__()
        self.register_buffer("shift", shift.detach().clone())
        self.origin = origin

    def forward(self, x: Tensor) -> Tensor:
        # shapes are known on the host (no sync); without the check a 1-channel input broadcast
        # silently to every channel, where the batch norm replaced raised. A trace records no
        # Python branch (and warns at each size compared), so it is skipped there
        if not torch.jit.is_tracing() and (x.dim() < 2 or x.shape[1] != self.shift.numel()):
            where = f" (folded from {self.origin})" if self.origin else ""
            raise WnormError(f"ChannelShift{where}: expected {self.shift.numel()} channels in "
                             f"dim 1; got shape {list(x.shape)}")
        # in x's dtype, as mean_only_bn._shifted gives (the same sum, rounded once), written
        # out here since TorchScript compiles no comparison with a module-level tuple of dtypes
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
            return (x.float() + self.shift.float().view(shape)).to(x.dtype)
        return x + self.shift.to(x.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"{self.shift.numel()}"

    def __setstate__(self, state: dict) -> None:
        state.setdefault("origin", "")  # a ChannelShift pickled before it named its origin
        super().__setstate__(state)


def _shift_of(bn: MeanOnlyBatchNormBase, where: str) -> Tensor:
    if bn.running_mean is None:  # a running mean kept, tracking switched off since: eval uses it
        raise WnormError(
            f"{where} ({type(bn).__name__}): cannot fold: track_running_stats=False and no "
            "running mean: it uses batch means in eval too, which no constant reproduces"
        )
    return (bn.bias - bn.running_mean).detach()


def _adds_bias_once(layer: nn.Module) -> bool:
    """Whether ``layer`` runs torch's own forward for its class, which adds the bias once to
    the output. A subclass with a forward of its own (an output scale, StyleGAN's bias * lr_mul),
    or a ``_conv_forward`` of its own under Conv's forward (on the class or the instance),
    would not add the shift as it stands."""
    base = _BIAS_FORWARDS.get(type(layer).forward)
    return (base is not None and "_conv_forward" not in layer.__dict__
            and getattr(type(layer), "_conv_forward", None)
            is getattr(base, "_conv_forward", None))


def _absorb(layer: nn.Module, shift: Tensor) -> bool:
    """Add ``shift`` to ``layer``'s bias (creating one if needed); False if it cannot."""
    # a parametrized bias is computed on each access: an add into it would be lost
    if (not isinstance(layer, _BIAS_TYPES) or not _adds_bias_once(layer)
            or _slot.slots_of(layer) or parametrize.is_parametrized(layer, "bias")):
        return False
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != shift.numel():
        return False
    with torch.no_grad():
        if layer.bias is None:
            w = layer.weight
            layer.bias = nn.Parameter(torch.zeros(out, dtype=w.dtype, device=w.device),
                                      requires_grad=w.requires_grad)
        layer.bias.add_(shift.to(layer.bias.dtype))
    return True


def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` runs more than its own forward: hooks, or a forward set on the
    instance (e.g. accelerate's ``add_hook_to_module``)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def _chains(parent: nn.Module) -> bool:
    """Whether ``parent`` runs its children one after the other and nothing else: an
    ``nn.Sequential`` with Sequential's own forward. A subclass with its own (a residual block
    built on Sequential) may use a child's output again, which the shift must not reach."""
    return (isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward
            and "forward" not in parent.__dict__)


def _shift_module(bn: MeanOnlyBatchNormBase, shift: Tensor, where: str) -> ChannelShift:
    """A :class:`ChannelShift` for ``bn`` (at ``where``) that keeps its hooks: the hook dicts
    move over as they are, so handles the user holds still remove them."""
    out = ChannelShift(shift, f"{where}, {type(bn).__name__}")
    move_hooks(bn, out)
    return out


def _check(model: nn.Module) -> None:
    """Raise, naming the layer, whatever fold would otherwise raise part-way through, when
    some layers were already folded (an optimizer holding their g and v cut off): nothing of
    ``model`` has changed when this raises. Writes into a held weight land in g and v here, as
    ``state_dict()`` lands them, so that none is refused in the middle of the fold."""
    from torch.nn.utils.weight_norm import WeightNorm as TorchWeightNorm

    for mname, module in model.named_modules():
        where = mname or "<model>"
        label = f"{where} ({parametrize.type_before_parametrizations(module).__name__})"
        for hook in module._forward_pre_hooks.values():
            if not isinstance(hook, TorchWeightNorm) or isinstance(hook, _pytorch_wn.Adopted):
                continue  # an Adopted hook is wnorm's: its g and v are checked as wnorm's
            gone = [n for n in (hook.name + "_g", hook.name + "_v") if n not in module._parameters]
            if gone:  # _pytorch_wn.find would fail with a bare KeyError
                raise WnormError(
                    f"{label}: {gone} of torch.nn.utils.weight_norm are no longer parameters of "
                    "this layer (torch.nn.utils.prune moves them away); remove that first "
                    "(prune.remove)")
        slots = _slot.slots_of(module)
        for s in slots.values():
            _slot.pair(module, s)  # raises, naming what took g or v away
        if slots:
            # _reparam.detach refuses a class parametrize subclassed on top of wnorm's; the
            # class it sees is this one after PyTorch's weight norms are stripped off
            new = {f.name for f in _pytorch_wn.find(module) if f.api == "new"}
            others = [n for n in module._modules.get("parametrizations") or {} if n not in new]
            after = type(module).__bases__[0] if new and not others else type(module)
            if "_wn_base" not in after.__dict__:
                raise WnormError(
                    f"{label}: PyTorch parametrizations ({others}) were registered on top of "
                    "wnorm's weight norm, and fold gives the layer its own class back, which "
                    "would drop theirs; remove them first (torch.nn.utils.parametrize."
                    "remove_parametrizations)")
        if isinstance(module, MeanOnlyBatchNormBase) and "forward" not in module.__dict__:
            _shift_of(module, where)  # raises for track_running_stats=False
    for module in model.modules():
        _held.flush_all(module)
    # a zero row of v (structured pruning of weight_v) gives NaN rows, which the plain model
    # would hold for good: refused, naming the layer and rows (a host sync per weight: fold is
    # no training step)
    with torch.no_grad():
        for mname, module in model.named_modules():
            for s in _slot.slots_of(module).values():
                _slot.check_finite(s, s.map.weight(*_slot.pair(module, s)))
            for found in _pytorch_wn.find(module):  # PyTorch's own, either API, folded too
                s = _slot.Slot(found.name, WeightNorm(found.dim), f"{mname or '<model>'} ("
                               f"{parametrize.type_before_parametrizations(module).__name__})")
                if found.api == "new":
                    chain = module.parametrizations[found.name]
                    g, v = chain.original0, chain.original1
                    s.gname, s.vname = (f"parametrizations.{found.name}.original{i}"
                                        for i in (0, 1))
                else:
                    g, v = module._parameters[s.gname], module._parameters[s.vname]
                _slot.check_finite(s, s.map.weight(g, v))


def _plain_weights(model: nn.Module) -> None:
    """Every weight normalized by wnorm or PyTorch (either API) becomes a plain Parameter
    holding the weight, with v's ``requires_grad``, one per (g, v) however many modules hold it
    (a tie stays a tie); nothing outside ``model`` changes."""
    tied: dict[int, tuple[Tensor, nn.Parameter]] = {}  # v -> its weight: ties stay tied
    for module in list(model.modules()):
        for found in _pytorch_wn.find(module):
            g, v = _pytorch_wn.strip(module, found)
            module.register_parameter(found.name,
                                      _reparam.plain_weight(WeightNorm(found.dim), g, v, tied))
        for name in list(_slot.slots_of(module)):
            s = _slot.slot(module, name)
            g, v = _slot.pair(module, s)
            if id(v) not in tied:  # a holder of a tie wnorm.remove_weight_norm took apart
                tied.update(_earlier_weight(module, s, g, v))
            _reparam.detach(module, name, tied)


def fold(model: nn.Module) -> nn.Module:
    r"""Make ``model`` plain for inference and export, with the same eval outputs.

    Every weight-normalized weight (by wnorm, or by PyTorch's ``torch.nn.utils.weight_norm`` or
    ``torch.nn.utils.parametrizations.weight_norm``) becomes a plain parameter holding
    :math:`w = g\,v/\lVert v\rVert` (a wnorm module gets its original class back; modules
    sharing one g and v share the one weight), and every
    mean-only batch norm folds its eval-mode affine map :math:`x \mapsto x - \mu_{\text{running}}
    + b` into the bias of the layer right before it in an ``nn.Sequential`` (Linear or ConvNd
    with the same channel count, used nowhere else, without hooks; a subclass with a forward of
    its own, or a ``_conv_forward`` of its own, which may scale or reuse that layer's output,
    does not count); where there is no such layer it becomes a :class:`ChannelShift` adding the
    constant (and keeping the batch norm's hooks).
    A Linear takes the shift as its bias: it adds along the last axis, which is the batch norm's
    channel axis for the usual (N, C) input; a batch norm that has run on (N, C, L) input in
    this process (eagerly) becomes a :class:`ChannelShift` instead. One that never ran in this
    process (loaded from a checkpoint) or ran only compiled is taken to follow (N, C): fold
    such a model after one eager forward of a typical batch. Eval outputs are unchanged
    (float32, to ~1e-6); train-mode mean-only BN used batch means, which no folded model
    reproduces, so fold is for eval use. A mean-only
    batch norm whose ``forward`` was replaced on the instance is left as it is, with a warning.

    Args:
        model: the model, changed in place.

    Returns:
        The same model (or, when ``model`` itself is a mean-only batch norm, a
        :class:`ChannelShift`).

    Raises:
        WnormError: a mean-only batch norm has ``track_running_stats=False``; a parametrization
            or pruning stacked on a weight norm; a weight with NaN or inf rows (a zero row of v,
            as structured pruning of ``weight_v`` makes); sharded parameters. Raised before anything
            changes: the model is left as it was.

    Example:
        >>> import torch, wnorm
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), wnorm.MeanOnlyBatchNorm1d(6))
        >>> net = wnorm.apply(net).eval()
        >>> x = torch.randn(3, 4)
        >>> before = net(x)
        >>> folded = wnorm.fold(net)
        >>> folded
        Sequential(
          (0): Linear(in_features=4, out_features=6, bias=True)
          (1): Identity()
        )
        >>> torch.allclose(folded(x), before, atol=1e-6)
        True
    """
    expect_module("fold", model)
    refuse_sharded("fold", model, "fold an unsharded copy of the model, loaded from a full "
                   "state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict "
                   "with full_state_dict=True)")
    _check(model)
    _plain_weights(model)
    if isinstance(model, MeanOnlyBatchNormBase):
        if "forward" in model.__dict__:
            return model
        return _shift_module(model, _shift_of(model, "<model>"), "<model>")
    uses: dict[int, int] = {}  # modules by id, and bias Parameters by id (a shared bias)
    for m in model.modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for m in model.modules():
        b = m._parameters.get("bias")
        if b is not None:
            uses[id(b)] = uses.get(id(b), 0) + 1
    for pname, parent in list(model.named_modules()):
        # every slot, duplicates included: named_children() skips a module's second slot, and
        # then the module before a batch norm would not be the one that runs before it
        children = list(parent._modules.items())
        for i, (cname, child) in enumerate(children):
            if not isinstance(child, MeanOnlyBatchNormBase):
                continue
            where = f"{pname}.{cname}" if pname else cname
            if "forward" in child.__dict__:
                warnings.warn(f"wnorm.fold: {where} ({type(child).__name__}) has a forward set "
                              "on the instance; it is left unfolded", stacklevel=2)
                continue
            shift = _shift_of(child, where)
            prev = children[i - 1][1] if _chains(parent) and i > 0 else None
            # a layer used elsewhere too (or whose bias another layer shares) would carry the
            # shift into its other uses; a hook on it (or on the batch norm) would see the output
            # before the shift
            bias = None if prev is None else prev._parameters.get("bias")
            # a Linear's bias adds along the last axis: after (N, C, L) input it is not this
            # batch norm's channel axis, and the shift must stay a ChannelShift along dim 1
            # (a 2d/3d batch norm's input always has axes after its channels)
            lengthwise = isinstance(prev, nn.Linear) and (
                child.__dict__.get("_saw_length", False) or 2 not in child._ndims)
            if (prev is not None and not lengthwise and uses[id(prev)] == 1 and not _hooked(prev)
                    and not _hooked(child) and (bias is None or uses[id(bias)] == 1)
                    and _absorb(prev, shift)):
                parent._modules[cname] = nn.Identity()
            else:
                parent._modules[cname] = _shift_module(child, shift, where)
    return model
