r"""Initialization without data for weight-normalized networks (Arpit, Campos & Bengio, 2019)."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _held, _slot
from .errors import WnormError, expect_module
from .maps import ForcedWeightNorm, same_weight
from .weight_norm import _is_class, _is_conv1d, default_dim

__all__ = ["arpit_init"]


def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _patterns(what: str, arg: Iterable[str] | str) -> list[str]:
    """``arg`` as a list of glob patterns: one string is one pattern (``list("head")`` would be
    the patterns 'h', 'e', 'a', 'd', which match no layer)."""
    items = [arg] if isinstance(arg, str) else list(arg)
    for e in items:
        if not isinstance(e, str):
            raise WnormError(f"arpit_init: {what} expects glob patterns of layer names (str); "
                             f"got {e!r}")
    return items


def _reason_skipped(module: nn.Module, spec: _slot.Slot) -> str:
    """Why arpit_init leaves this weight-normalized layer as it is ("" when it sets it), in
    data_init's words where the cause is the same: the init sets one g per output unit."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        # the gains keep the scale of an activation through the layer; an embedding's input is
        # an index (a one-hot vector), so there is none to keep, and a ReLU gain would only
        # shrink its rows (to norm 0.25 for a 1000 x 32 table): their scale is the model's choice
        return ("a lookup table: its input is an index, not an activation whose scale the "
                "gains keep")
    if not (isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or _is_conv1d(module)
            or _is_class(module, "Linear", "torch_geometric.")):
        # the fans and gains are derived for a Linear or a convolution feeding a ReLU: another
        # layer (a Bilinear's product of two inputs) gets no gain the paper vouches for
        return (f"{type(module).__name__}: Arpit et al. derive gains for Linear and "
                "convolution layers only")
    if not spec.has_g:
        return f"no per-unit g to set ({spec.kind} weight)"
    if spec.dim != default_dim(module):
        return f"g is not one per output unit (dim={spec.dim})"
    # a pretrained backbone frozen under a new head keeps its function (data_init leaves it too)
    frozen = [n for n in (spec.vname, spec.gname, "bias")
              if (p := module._parameters.get(n)) is not None and not p.requires_grad]
    if frozen:
        return (f"frozen ({'/'.join(frozen)} with requires_grad=False): it keeps what it "
                "learned; unfreeze it to initialize it")
    return ""


def _gain(mname: str, m: nn.Module, spec: _slot.Slot, linear: list[str],
          block_last: list[str], shortcuts: list[str], blocks_per_stage: int | None) -> float:
    """The layer's g for its role: sqrt(c fan_in / fan_out), c = 2 before a ReLU, 1/N for a
    block's last conv, 1 for shortcuts and linear outputs."""
    v = m._parameters[spec.vname]
    units = v.shape[spec.dim]
    fan_in = v.numel() // units
    # fan_out: the outputs one input entry reaches. A conv's output unit repeats over
    # positions, so each input entry reaches kernel-size of them, in its group's units
    # only, and a stride skips positions. A transposed conv's units (dim 1 of its
    # (in, out/groups, *k) weight) are already one group's, and its stride skips none
    kernel = math.prod(m.kernel_size) if isinstance(m, nn.modules.conv._ConvNd) else 1
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
        fan_out = units * kernel / (m.groups * math.prod(m.stride))
    else:
        fan_out = units * kernel
    if _match(mname, shortcuts) or _match(mname, linear):
        return math.sqrt(fan_in / fan_out)
    if _match(mname, block_last):
        return math.sqrt(fan_in / (blocks_per_stage * fan_out))  # type: ignore[operator]
    return math.sqrt(2.0 * fan_in / fan_out)


def arpit_init(
    model: nn.Module,
    *,
    linear: Iterable[str] | None = None,
    block_last: Iterable[str] = (),
    shortcuts: Iterable[str] = (),
    blocks_per_stage: int | None = None,
) -> dict[str, float]:
    r"""Arpit et al.'s init for weight-normalized ReLU networks and ResNets, no data needed.

    .. math::
        v \sim \text{orthogonal},\quad b = 0,\quad
        g = \sqrt{2\,\mathrm{fan_{in}}/\mathrm{fan_{out}}}\ \text{(layers followed by ReLU)},\quad
        g = \sqrt{\mathrm{fan_{in}}/(N\,\mathrm{fan_{out}})}\ \text{(a block's last conv)},\quad
        g = \sqrt{\mathrm{fan_{in}}/\mathrm{fan_{out}}}\ \text{(shortcuts, linear outputs)}

    Arpit, Campos & Bengio, "How to Initialize your Network? Robust Initialization for
    WeightNorm & ResNets", NeurIPS 2019 (arXiv:1906.02341). With orthonormal rows, a layer maps
    a fan_in-dimensional input of squared norm :math:`\lVert x\rVert^2` to an output of expected
    squared norm :math:`g^2\,\mathrm{fan_{out}}/\mathrm{fan_{in}}\,\lVert x\rVert^2`; the gains
    above keep activations' scale through ReLU (which halves it) and through N residual blocks
    per stage. For convolutions, fan_in is the length of ``v``'s slice per g, and fan_out the
    number of outputs one input entry reaches: ``in_channels/groups * kernel size`` and
    ``out_channels/groups * kernel size / stride`` for a conv; ``in_channels * kernel size``
    and ``out_channels/groups * kernel size`` for a transposed conv, whose weight is stored
    ``(in, out/groups, *kernel)`` (one g serves one output channel of each group) and whose
    stride spaces its outputs without dropping any. A conv with orthonormal rows then scales
    the expected squared norm of the whole feature map by
    :math:`g^2\,\mathrm{fan_{out}}/\mathrm{fan_{in}}`. A forced weight norm with a learned g
    computes weight norm's map: it is set alike, its orthogonal rows of ``v`` scaled to the
    sphere it holds them on.
    A weight-normalized layer it cannot set (no learned g: weight standardization, a forced
    weight norm with a fixed gain; or g not one per output unit: ``dim=None`` or another axis)
    is left as it is, with a warning naming it and why; so is an embedding (``nn.Embedding``,
    ``nn.EmbeddingBag``): its input is an index, not an activation whose scale the gains keep;
    a layer other than a Linear or a convolution (an ``nn.Bilinear`` given through ``types=``),
    whose gains the paper does not derive; and a layer tied to one left as it is (an LM head
    sharing its embedding's weight). So is a frozen layer (its v, g or bias with
    ``requires_grad=False``: a pretrained backbone under a new head). A bias computed by a
    parametrization keeps its value, with a warning naming its layer.

    Args:
        model: a model with weight-normalized layers (``wnorm.apply`` first); changed in place.
        linear: glob patterns of layers not followed by a ReLU (default: the last
            weight-normalized layer in module order, the classifier); a str is one pattern.
        block_last: glob patterns of each residual block's last conv (needs ``blocks_per_stage``).
        shortcuts: glob patterns of shortcut (projection) layers.
        blocks_per_stage: N, residual blocks per stage.

    Returns:
        ``{layer name: g}`` for every initialized layer.

    Raises:
        WnormError: no weight-normalized layer with a learned per-unit g, ``block_last`` without
            ``blocks_per_stage`` (or one that is not a whole number > 0), a pattern matching no
            weight-normalized layer (a typo would leave that layer the ReLU gain), tied layers
            (one g and v) whose roles ask for two gains (checked before anything is written), or
            a layer with more units than fan_in can't have orthonormal rows (it then gets
            orthonormal columns; reported only if the shape is degenerate).

    Example:
        >>> import torch, wnorm
        >>> net = wnorm.apply(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
        ...                                        torch.nn.Linear(32, 10)))
        >>> gains = wnorm.arpit_init(net)
        >>> {k: round(v, 3) for k, v in gains.items()}
        {'0': 2.0, '2': 1.789}
    """
    expect_module("arpit_init", model)
    for m in model.modules():  # a write into a weight still held (nn.init) lands first: else
        _held.flush_all(m)  # it would land over the gains and orthogonal v set here
    block_last, shortcuts = _patterns("block_last", block_last), _patterns("shortcuts", shortcuts)
    if blocks_per_stage is not None and not (isinstance(blocks_per_stage, numbers.Integral)
                                             and not isinstance(blocks_per_stage, bool)
                                             and blocks_per_stage > 0):
        raise WnormError("arpit_init: blocks_per_stage must be a whole number > 0 (N residual "
                         f"blocks per stage); got {blocks_per_stage!r}")
    if block_last and not blocks_per_stage:
        raise WnormError("arpit_init: block_last needs blocks_per_stage (N blocks per stage)")
    layers, other, skipped, last = [], [], [], None
    names: list[str] = []  # every weight-normalized layer's, for the patterns' typo check
    left: dict[int, str] = {}  # id of a parameter of a layer left as it is -> its name
    for mname, m in model.named_modules():
        other += [f"{mname or '<model>'}.{n}" for n in _slot.slots_of(m) if n != "weight"]
        spec = _slot.slot(m, "weight")
        if spec is None:
            continue
        if spec.has_g and not same_weight(spec.kind, "wn"):
            raise WnormError(
                f"arpit_init: {mname or '<model>'} ({type(m).__name__}) is reparameterized by "
                f"{spec.map!r}; Arpit et al.'s gains hold for weight norm's map alone (its "
                "orthogonal v and gain g would not give the claimed energy); exclude it")
        last = mname or "<model>"
        names.append(last)
        # a layer left out is said to be: its v and bias keep values the init was asked to
        # replace, and the layers after it get activations of a scale the gains did not plan for
        reason = _reason_skipped(m, spec)
        if reason:
            skipped.append(f"{last} ({reason})")
            left.update((id(p), last) for p in m._parameters.values() if p is not None)
        else:
            layers.append((last, m, spec))
    # a layer tied to one left as it is (an LM head sharing its embedding's weight) is left too,
    # as data_init does: setting it would change the other after all
    for entry in list(layers):
        tie = next((left[id(p)] for p in entry[1]._parameters.values() if id(p) in left), None)
        if tie is not None:
            layers.remove(entry)
            skipped.append(f"{entry[0]} (shares its weight with {tie}, which is left as it is)")
    # its gains are for a feed-forward layer's 'weight': a recurrent layer's gate weights are
    # left as they are, and said to be
    why = f"left as they are: {other} (Arpit et al.'s gains are for feed-forward layers)"
    not_set = "layers not initialized: " + "; ".join(skipped)
    if not layers:
        raise WnormError(
            "arpit_init: no weight-normalized layer it can set (a learned per-unit g, not "
            f"frozen) in {type(model).__name__}; " + ("; ".join(said for said, on in
                                                     ((why, other), (not_set, skipped)) if on)
                                           or "call wnorm.apply(model) first"))
    # the default is the last weight-normalized layer even when it is left out: another layer,
    # followed by a ReLU, would otherwise get the linear gain
    linear = [last] if linear is None else _patterns("linear", linear)
    # a pattern naming no weight-normalized layer (a typo) would leave the layer it meant with
    # the ReLU gain, silently
    for what, pats in (("linear", linear), ("block_last", block_last), ("shortcuts", shortcuts)):
        for pat in pats:
            if not any(fnmatchcase(n, pat) for n in names):
                raise WnormError(
                    f"arpit_init: {what} pattern {pat!r} matches no weight-normalized layer of "
                    f"{type(model).__name__} (a typo?); its weight-normalized layers are e.g. "
                    f"{names[:8]}")
    if other:
        warnings.warn(f"arpit_init: {why}", stacklevel=2)
    if skipped:
        warnings.warn(f"arpit_init: {not_set}", stacklevel=2)
    # zero_() on the tensor a parametrization computes would change nothing
    kept = [n for n, m, _ in layers if parametrize.is_parametrized(m, "bias")]
    if kept:
        warnings.warn(f"arpit_init: biases left as they are, not set to 0: {kept} (computed by "
                      "a parametrization)", stacklevel=2)
    plan = [(mname, m, spec, _gain(mname, m, spec, linear, block_last, shortcuts,
                                   blocks_per_stage)) for mname, m, spec in layers]
    # tied layers (one g and v held by two modules) get one gain: refused before anything is
    # written when their roles ask for two, since the last write would win without a word
    first: dict[int, tuple[str, float]] = {}
    for mname, m, spec, gain in plan:
        seen = first.setdefault(id(m._parameters[spec.gname]), (mname, gain))
        if not math.isclose(seen[1], gain, rel_tol=1e-12):
            raise WnormError(
                f"arpit_init: {seen[0]} and {mname} share one g and v, but their roles ask for "
                f"gains {seen[1]:.4g} and {gain:.4g}; one g cannot hold both: give both the "
                "same role (linear=, block_last=, shortcuts=), or untie them")
    gains: dict[str, float] = {}
    done: set[int] = set()
    with torch.no_grad():
        for mname, m, spec, gain in plan:
            gains[mname] = gain
            bias = m._parameters.get("bias")  # a parametrized bias is computed: none here
            if bias is not None:
                bias.zero_()
            v = m._parameters[spec.vname]
            if id(v) not in done:  # a tie: its v is drawn once (each g of its own is filled)
                done.add(id(v))
                units = v.shape[spec.dim]
                flat = v.movedim(spec.dim, 0).reshape(units, -1)
                q = torch.empty_like(flat, dtype=torch.float32)
                nn.init.orthogonal_(q)
                if isinstance(spec.map, ForcedWeightNorm):  # its rows on the sphere it holds
                    q.mul_(spec.map.sphere(v) / q.norm(dim=1, keepdim=True))
                v.copy_(q.reshape(v.movedim(spec.dim, 0).shape).movedim(0, spec.dim))
            m._parameters[spec.gname].fill_(gain)
    return gains
