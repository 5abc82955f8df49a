r"""Optimizer-side weight normalization: plain-layer forward and backward, the same (g, v) steps.

.. math::
    \nabla_g L = \frac{\nabla_{\mathbf w} L\cdot\mathbf v}{\lVert\mathbf v\rVert},\qquad
    \nabla_{\mathbf v} L = \frac{g}{\lVert\mathbf v\rVert}\nabla_{\mathbf w} L
        - \frac{g\,\nabla_g L}{\lVert\mathbf v\rVert^2}\,\mathbf v

Trained through autograd, every weight-normalized layer pays for :math:`w = g\,v/\lVert v\rVert`
twice per step: a norm and a scaling in the forward pass and eqs. 3-4 (above) in the backward
pass, each a sweep over the weight. The paper's authors moved that work into the optimizer
(their Keras code does): the forward and backward passes use a plain weight tensor ``w``, and
the optimizer step turns :math:`\nabla_w L` into :math:`\nabla_g L, \nabla_v L`, applies the
optimizer's rule to ``g`` and ``v``, and writes the next ``w``. The parameters, their
trajectory and the state dicts (model and optimizer) are those of
``torch.optim.SGD``/``Adam``/``AdamW`` training ``g`` and ``v`` through autograd; only where the
work happens changes. A run resumed from its checkpoint (model and optimizer state dicts)
continues bit for bit: the step writes ``w`` with the same code that computes a resumed run's
first ``w`` from the loaded ``g`` and ``v``. On CPU one C++ kernel per step does it for all layers, one read of each
row of ``v``, ``w``'s gradient and the optimizer state (see ``wnorm/csrc/fused_step.cpp``).

Every other parameter (biases, normalization layers, layers wnorm does not normalize) gets the
same rule in the kernel (dense float32/float64 CPU tensors) or from the torch optimizer's own
step (anything else: sparse gradients, other devices and dtypes). A weight-normalized layer
stays on autograd (its
``g.grad``/``v.grad`` are filled as usual) where the kernel does not apply: non-CPU or
half-precision parameters, ``dim`` other than 0, centered/standardized/forced weights,
recurrent layers, ``amsgrad``/``capturable``/``differentiable``, distributed training
(DDP all-reduces ``g.grad``/``v.grad``), or no C++ compiler (see :mod:`wnorm._extension`).

While an optimizer of this module is alive, the layers it owns receive their gradient on the
weight (``layer.weight.grad``), not on ``weight_g``/``weight_v``: call :meth:`param_grads`
before clipping or inspecting those. ``step()`` consumes those gradients (it sets them to None,
as ``zero_grad()`` would ``g.grad``/``v.grad``), so ``model.zero_grad()``, which cannot see the
plain weights, works as well as ``opt.zero_grad()``: a layer that a later forward skips, or
that was frozen, gets no gradient and is not stepped, as torch skips ``g`` and ``v`` without
one. ``opt.zero_grad(set_to_none=False)`` gives the layers it stepped zero gradients, as torch
zeroes ``g.grad``/``v.grad`` (an unused layer is then stepped with zeros, as in torch). The
patterns that differ from torch: stepping twice on one ``backward()`` without zeroing (torch
re-applies the old gradients) and ``model.zero_grad(set_to_none=False)`` (torch then steps an
unused layer with zeros; here it is not stepped). A frozen layer
(``requires_grad_(False)``), a layer called with other tensors
(``torch.func.functional_call``), a compiled or traced forward and weights that share ``g`` or
``v`` with another layer (tied weights) go through autograd.

Not supported while layers are fused (use ``torch.optim``, or ``release()`` first):
``torch.amp.GradScaler`` (refused with an error: it cannot see the plain weights' gradients)
and ``torch.autograd.grad(loss, model.parameters())`` (the fused layers' ``g`` and ``v`` are
not in the graph; PyTorch says so, or returns None with ``allow_unused=True``).
``release()`` (or dropping the optimizer) returns the layers to autograd.

Example:
    >>> import torch, wnorm
    >>> model = wnorm.apply(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)))
    >>> opt = wnorm.optim.Adam(model, lr=1e-3)   # the model, or model= with parameter groups
    >>> model(torch.randn(16, 4)).square().mean().backward()
    >>> opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import _extension
from .errors import WnormError
from .weight_norm import WN, _norm, _plain_compute, _Spec

__all__ = ["SGD", "Adam", "AdamW", "fused_layers"]

_KERNEL_DTYPES = (torch.float32, torch.float64)


class _Layer:
    """One weight this optimizer owns: its module, name, spec and parameters."""

    __slots__ = ("name", "module", "pname", "spec", "g", "v", "rows", "stepped")

    def __init__(self, name: str, module: nn.Module, pname: str, spec: _Spec) -> None:
        self.name = f"{name}.{pname}" if name else pname  # as in model.named_parameters()
        self.module, self.pname, self.spec = module, pname, spec
        self.g = module._parameters[spec.gname]
        self.v = module._parameters[spec.vname]
        self.rows = self.v.shape[0]
        self.stepped = False  # stepped by the kernel once: zero_grad(set_to_none=False) zeroes it

    def current(self) -> bool:
        """Whether the layer is still normalized by the same spec and parameters."""
        m = self.module
        return (m.__dict__.get("_wn", {}).get(self.pname) is self.spec
                and m._parameters.get(self.spec.gname) is self.g
                and m._parameters.get(self.spec.vname) is self.v)


def _split(params: Any, model: nn.Module | None, cls: str) -> tuple[Any, nn.Module]:
    if isinstance(params, nn.Module):
        if model is not None and model is not params:
            raise WnormError(f"wnorm.optim.{cls}: got a module and a different model=")
        return params.parameters(), params
    if model is None:
        raise WnormError(
            f"wnorm.optim.{cls} needs the model to find its weight-normalized layers: pass the "
            f"model itself (wnorm.optim.{cls}(model, lr=...)) or model=model with parameters "
            f"or parameter groups; got {type(params).__name__} and no model"
        )
    if not isinstance(model, nn.Module):
        raise WnormError(
            f"wnorm.optim.{cls}: model must be an nn.Module; got {type(model).__name__}"
        )
    return params, model


def _distributed(model: nn.Module) -> bool:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return True
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _unhooked(fn: Callable[..., Any]) -> Callable[..., Any]:
    # torch wraps an optimizer class's step once to run step hooks; ours already ran them
    return fn.__wrapped__ if getattr(fn, "hooked", False) else fn  # type: ignore[attr-defined]


class _Optimizer(torch.optim.Optimizer):
    """What the three optimizers share: attaching layers, the fused step, zero_grad."""

    _torch_class: type[torch.optim.Optimizer]

    def _attach(self, model: nn.Module) -> None:
        self._wn_groups: list[list[_Layer]] = [[] for _ in self.param_groups]
        self._wn_reason = ""
        if _distributed(model):
            self._wn_reason = "distributed training: DDP reduces g.grad and v.grad"
            return
        if not any(s.kind == WN for m in model.modules()
                   for s in m.__dict__.get("_wn", {}).values()):
            return
        if _extension.kernels() is None:
            self._wn_reason = f"no fused kernels ({_extension.unavailable_reason()})"
            return
        where = {id(p): i for i, grp in enumerate(self.param_groups) for p in grp["params"]}
        me = weakref.ref(self)
        # a g or v shared by two normalized weights (tied layers) would be stepped once per
        # layer by the kernel, where torch steps it once with the summed gradient: autograd
        uses: dict[int, int] = {}
        for module in model.modules():
            for spec in module.__dict__.get("_wn", {}).values():
                for n in (spec.gname, spec.vname):
                    p = module._parameters.get(n)
                    if p is not None:
                        uses[id(p)] = uses.get(id(p), 0) + 1
        for mname, module in model.named_modules():
            for pname, spec in module.__dict__.get("_wn", {}).items():
                if spec.kind != WN or spec.dim != 0 or isinstance(module, nn.RNNBase):
                    continue
                g, v = module._parameters[spec.gname], module._parameters[spec.vname]
                if uses[id(g)] > 1 or uses[id(v)] > 1:
                    continue
                group = where.get(id(v))
                if group is None or where.get(id(g)) != group:
                    continue  # not (both) ours: autograd as usual
                if not (g.requires_grad and v.requires_grad and v.is_contiguous()
                        and g.is_contiguous() and v.device.type == "cpu"
                        and v.dtype in _KERNEL_DTYPES and g.dtype == v.dtype):
                    continue
                if not self._group_supported(self.param_groups[group]):
                    continue
                if spec.plain is not None and spec.owner() is not None:
                    raise WnormError(
                        f"{spec.where}: '{pname}' is already owned by another wnorm.optim "
                        "optimizer; call its release() first"
                    )
                with torch.no_grad():  # as the kernel's steps write it (bit-exact resume)
                    w = _plain_compute(v, g, 0).detach().requires_grad_(True)
                spec.plain, spec.owner = w, me
                spec.mark_synced(g, v)
                self._wn_groups[group].append(_Layer(mname, module, pname, spec))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy (deepcopy, torch.save/load of the optimizer) owns no plain weights: the copied
        # model's layers are back on autograd, so it trains as the torch optimizer does
        super().__setstate__(state)
        self.__dict__.setdefault("_wn_groups", [[] for _ in self.param_groups])
        self.__dict__.setdefault("_wn_reason", "a copy: layers train through autograd")

    @property
    def _step_supports_amp_scaling(self) -> bool:  # type: ignore[override]
        # True while the kernel owns layers, so that torch.amp.GradScaler hands the step to us
        # (which refuses it, clearly) instead of unscaling only the g/v gradients it can see
        return bool(self.__dict__.get("_amp_scaling")) or any(self.__dict__.get("_wn_groups", ()))

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value: bool) -> None:  # torch's fused=True sets it
        self.__dict__["_amp_scaling"] = value

    # ------------------------------------------------------------------ overridden per class
    def _group_supported(self, group: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _fused_group(self, group: dict[str, Any], ready: list[_Layer], kern: Any) -> list[_Layer]:
        """Run the kernel on the layers of ``ready`` it takes; return those."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_wn_groups"):
            self._wn_groups.append([])  # layers added later train through autograd

    def fused_layers(self) -> list[str]:
        """The weights this optimizer updates with the fused kernel, named as in
        ``model.named_modules()`` plus the weight's name, e.g. ``["0.weight", "3.weight"]``."""
        return [lay.name for grp in self._wn_groups for lay in grp
                if lay.spec.plain is not None and lay.current()]

    def release(self) -> None:
        """Return every layer to autograd weight normalization (``g.grad``/``v.grad`` again)."""
        self.param_grads()
        for grp in self._wn_groups:
            for lay in grp:
                if lay.spec.owner is not None and lay.spec.owner() is self:
                    lay.spec.release()
            grp.clear()

    def param_grads(self) -> None:
        """Move the gradients on the plain weights to ``g.grad`` and ``v.grad`` (eqs. 3-4,
        added to what is there), e.g. to clip or inspect them; :meth:`step` then uses those."""
        for grp in self._wn_groups:
            for lay in grp:
                self._to_param_grads(lay)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for grp in self._wn_groups:
            for lay in grp:
                w = lay.spec.plain
                if w is None:
                    continue
                if set_to_none:
                    w.grad = None
                elif w.grad is not None:
                    w.grad.zero_()
                elif lay.stepped and lay.current():
                    # torch zeroes g.grad/v.grad, which exist once a step has used them: the
                    # layer is stepped with zeros if the next forward skips it, as in torch
                    w.grad = torch.zeros_like(w)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """One step: the fused kernel where it applies, torch's own step for the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self, "grad_scale", None) is not None and any(self._wn_groups):
            for attr in ("grad_scale", "found_inf"):  # GradScaler deletes them only on success
                self.__dict__.pop(attr, None)
            raise WnormError(
                "wnorm.optim: torch.amp.GradScaler cannot unscale or check the gradients of "
                "the plain weights this optimizer's kernel steps; with a GradScaler use "
                "torch.optim (weight norm through autograd), or call release() first"
            )
        # every group is checked before any is stepped: a refused step changes nothing
        plans = [(group, self._ready(layers)) for group, layers in
                 zip(self.param_groups, self._wn_groups) if layers]
        for group, ready in plans:
            if ready and not self._group_supported(group):  # e.g. amsgrad switched on later
                for lay in ready:
                    self._to_param_grads(lay)
                ready.clear()
        if not plans:  # nothing fused (no kernel, distributed, no normalized layer): torch's step
            _unhooked(self._torch_class.step)(self)
            return loss
        kern = _extension.kernels()
        for group, ready in plans:
            if ready:
                # The step consumes the plain weights' gradients: None, as the zero_grad()
                # that follows would leave g.grad/v.grad (model.zero_grad() cannot see the
                # plain weights), so a layer that a later forward skips gets no gradient and
                # is not stepped, as torch skips g and v without one.
                for lay in self._fused_group(group, ready, kern):
                    lay.spec.mark_synced(lay.g, lay.v)
                    lay.spec.plain.grad = None  # type: ignore[union-attr]
                    lay.stepped = True
        # the other parameters: the same rule in the kernel, torch's step for what it cannot take
        left = [self._plain_group(group, kern) if self._group_supported(group)
                else group["params"] for group in self.param_groups]
        if any(left):
            saved = [group["params"] for group in self.param_groups]
            try:
                for group, params in zip(self.param_groups, left):
                    group["params"] = params
                _unhooked(self._torch_class.step)(self)
            finally:
                for group, params in zip(self.param_groups, saved):
                    group["params"] = params
        return loss

    # ------------------------------------------------------------------ internals
    def _ready(self, layers: list[_Layer]) -> list[_Layer]:
        """The layers with a plain-weight gradient (their g and v checked unchanged since the
        forward pass), in order. Raises before anything is changed."""
        ready = []
        for lay in layers:  # the hot path of every step: checks inline, cheapest first
            spec = lay.spec
            w = spec.plain
            if w is None or w.grad is None or spec.owner() is not self or not lay.current():
                continue
            g, v = lay.g, lay.v
            if not spec.plain_in_sync(g, v):
                raise WnormError(
                    f"{spec.where}: '{spec.gname}' or '{spec.vname}' changed after the forward "
                    f"pass that produced the gradient of '{lay.pname}'; call step() right after "
                    "backward(), or zero_grad() and run the forward pass again"
                )
            ready.append(lay)
        return ready

    def _plain_group(self, group: dict[str, Any], kern: Any) -> list[Tensor]:
        """Step the group's parameters with a gradient that the kernel can take; return the
        rest, for torch's step."""
        raise NotImplementedError

    def _kernel_takes(self, lay: _Layer, vstate: tuple[Tensor, ...] = (),
                      gstate: tuple[Tensor, ...] = ()) -> bool:
        """Whether the kernel can update ``lay`` with these optimizer state tensors of v and g;
        if not, its gradient moves to g and v and torch's step updates it."""
        g, v = lay.g, lay.v
        gw = lay.spec.plain.grad  # type: ignore[union-attr]
        ok = (g.grad is None and v.grad is None and gw is not None and _dense(v, gw, *vstate)
              and _matches(g, g) and all(_matches(t, g) for t in gstate))
        if not ok:
            self._to_param_grads(lay)
        return ok

    @staticmethod
    def _to_param_grads(lay: _Layer) -> None:
        w = lay.spec.plain
        if w is None or w.grad is None or not lay.current():
            return
        g, v, gw = lay.g, lay.v, w.grad
        with torch.no_grad():
            n = _norm(v, 0)
            axes = list(range(1, v.dim()))
            dot = (gw * v).sum(dim=axes, keepdim=True) if axes else gw * v
            grad_g = dot / n  # eq. 3
            grad_v = gw * (g / n) - v * (g * grad_g / (n * n))  # eq. 4
            g.grad = grad_g.to(g.dtype) if g.grad is None else g.grad + grad_g
            v.grad = grad_v if v.grad is None else v.grad + grad_v
        w.grad = None


def _matches(t: Tensor, p: Tensor) -> bool:
    """Whether ``t`` is a dense contiguous CPU tensor with ``p``'s dtype and shape, and that
    dtype is one the kernel computes in."""
    return (t.layout == torch.strided and t.is_cpu and t.is_contiguous()
            and t.dtype == p.dtype and p.dtype in _KERNEL_DTYPES and t.shape == p.shape)


def _dense(p: Tensor, grad: Tensor, *state: Tensor | None) -> bool:
    """Whether the kernel can update ``p`` with ``grad`` and these state tensors (None: none
    yet)."""
    return (_matches(p, p) and _matches(grad, p)
            and all(t is None or _matches(t, p) for t in state))


class SGD(_Optimizer, torch.optim.SGD):
    r"""``torch.optim.SGD`` whose weight-normalized layers run forward and backward as plain
    layers; the step applies eqs. 3-4 and SGD's rule to ``g`` and ``v`` (see :mod:`wnorm.optim`).

    Args:
        params: the model (an ``nn.Module``), or parameters / parameter groups with ``model=``.
        model: the model that owns the parameters, when ``params`` is not the model.
        *args, **kwargs: ``torch.optim.SGD``'s (lr, momentum, dampening, weight_decay,
            nesterov, maximize, ...).

    Raises:
        WnormError: no model was given, or a layer is owned by another wnorm.optim optimizer.
    """

    _torch_class = torch.optim.SGD

    def __init__(self, params: Iterable[Any] | nn.Module, *args: Any,
                 model: nn.Module | None = None, **kwargs: Any) -> None:
        params, model = _split(params, model, "SGD")
        torch.optim.SGD.__init__(self, params, *args, **kwargs)
        self._attach(model)

    def _group_supported(self, group: dict[str, Any]) -> bool:
        return not group.get("differentiable", False)

    def _fused_group(self, group: dict[str, Any], ready: list[_Layer], kern: Any) -> list[_Layer]:
        momentum = float(group["momentum"])
        layers, vbuf, gbuf, first = [], [], [], []
        for lay in ready:
            if momentum == 0:
                if self._kernel_takes(lay):
                    layers.append(lay)
                    first.append(False)
                continue
            sv, sg = self.state[lay.v], self.state[lay.g]
            bv, bg = sv.get("momentum_buffer"), sg.get("momentum_buffer")
            fresh = bv is None and bg is None
            if (bv is None) != (bg is None):  # one has history, one not (e.g. g was frozen)
                self._to_param_grads(lay)
                continue
            if not (self._kernel_takes(lay) if fresh else self._kernel_takes(lay, (bv,), (bg,))):
                continue
            if fresh:
                bv = sv["momentum_buffer"] = torch.zeros_like(lay.v)
                bg = sg["momentum_buffer"] = torch.zeros_like(lay.g)
            layers.append(lay)
            vbuf.append(bv)
            gbuf.append(bg)
            first.append(fresh)
        if not layers:
            return layers
        kern.sgd_step(
            [lay.spec.plain for lay in layers], [lay.spec.plain.grad for lay in layers],
            [lay.v for lay in layers], [lay.g for lay in layers], vbuf, gbuf,
            [lay.rows for lay in layers], first, float(group["lr"]), momentum,
            float(group["dampening"]), float(group["weight_decay"]), bool(group["nesterov"]),
            bool(group.get("maximize", False)),
        )
        return layers

    def _plain_group(self, group: dict[str, Any], kern: Any) -> list[Tensor]:
        momentum = float(group["momentum"])
        ps, grads, bufs, first, left = [], [], [], [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            buf = self.state[p].get("momentum_buffer") if momentum != 0 else None
            if not _dense(p, grad, buf):
                left.append(p)
                continue
            if momentum != 0:
                first.append(buf is None)
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(buf)
            else:
                first.append(False)
            ps.append(p)
            grads.append(grad)
        if ps:
            kern.sgd_plain_step(ps, grads, bufs, first, float(group["lr"]), momentum,
                                float(group["dampening"]), float(group["weight_decay"]),
                                bool(group["nesterov"]), bool(group.get("maximize", False)))
        return left


class Adam(_Optimizer, torch.optim.Adam):
    r"""``torch.optim.Adam`` whose weight-normalized layers run forward and backward as plain
    layers; the step applies eqs. 3-4 and Adam's rule to ``g`` and ``v`` (see :mod:`wnorm.optim`).

    Args:
        params: the model (an ``nn.Module``), or parameters / parameter groups with ``model=``.
        model: the model that owns the parameters, when ``params`` is not the model.
        *args, **kwargs: ``torch.optim.Adam``'s (lr, betas, eps, weight_decay, amsgrad,
            maximize, ...). ``amsgrad``, ``capturable`` and ``differentiable`` groups train
            through autograd.

    Raises:
        WnormError: no model was given, or a layer is owned by another wnorm.optim optimizer.
    """

    _torch_class = torch.optim.Adam

    def __init__(self, params: Iterable[Any] | nn.Module, *args: Any,
                 model: nn.Module | None = None, **kwargs: Any) -> None:
        params, model = _split(params, model, type(self).__name__)
        self._torch_class.__init__(self, params, *args, **kwargs)
        self._attach(model)

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return bool(group.get("decoupled_weight_decay", False))

    def _adam_state(self, p: Tensor, fused: bool) -> tuple[Tensor, Tensor, Tensor] | None:
        """``p``'s (exp_avg, exp_avg_sq, step), made as torch.optim.Adam's _init_group makes
        them when there are none; None when existing state is not what the kernel takes."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype(fused))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        m, s, step = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step")
        if (m is None or s is None or step is None or not (_matches(m, p) and _matches(s, p))
                or not (step.is_cpu and step.numel() == 1 and step.dtype in _KERNEL_DTYPES)):
            return None
        return m, s, step

    def _group_supported(self, group: dict[str, Any]) -> bool:
        beta1 = float(group["betas"][0])
        # the kernel follows ATen's lerp for weights < 0.5, i.e. beta1 > 0.5 (the usual 0.9)
        return not (group.get("amsgrad") or group.get("capturable")
                    or group.get("differentiable")) and beta1 > 0.5

    def _fused_group(self, group: dict[str, Any], ready: list[_Layer], kern: Any) -> list[_Layer]:
        layers: list[_Layer] = []
        vm, vs, gm, gs, vstep, gstep = [], [], [], [], [], []
        for lay in ready:
            if not self._kernel_takes(lay):
                continue
            fused = bool(group.get("fused"))
            v_state, g_state = self._adam_state(lay.v, fused), self._adam_state(lay.g, fused)
            if v_state is None or g_state is None:  # e.g. loaded, or from before .double()
                self._to_param_grads(lay)
                continue
            for (m, s, st), ms, ss, sts in ((v_state, vm, vs, vstep), (g_state, gm, gs, gstep)):
                ms.append(m)
                ss.append(s)
                sts.append(st)
            layers.append(lay)
        if not layers:
            return layers
        beta1, beta2 = (float(b) for b in group["betas"])
        kern.adam_step(
            [lay.spec.plain for lay in layers], [lay.spec.plain.grad for lay in layers],
            [lay.v for lay in layers], [lay.g for lay in layers], vm, vs, gm, gs, vstep, gstep,
            [lay.rows for lay in layers], float(group["lr"]), beta1, beta2, float(group["eps"]),
            float(group["weight_decay"]), self._decoupled(group),
            bool(group.get("maximize", False)),
        )
        return layers


    def _plain_group(self, group: dict[str, Any], kern: Any) -> list[Tensor]:
        ps, grads, ms, ss, steps, left = [], [], [], [], [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            st = self._adam_state(p, bool(group.get("fused"))) if _dense(p, grad) else None
            if st is None:
                left.append(p)
                continue
            ps.append(p)
            grads.append(grad)
            ms.append(st[0])
            ss.append(st[1])
            steps.append(st[2])
        if ps:
            beta1, beta2 = (float(b) for b in group["betas"])
            kern.adam_plain_step(ps, grads, ms, ss, steps, float(group["lr"]), beta1, beta2,
                                 float(group["eps"]), float(group["weight_decay"]),
                                 self._decoupled(group), bool(group.get("maximize", False)))
        return left


def _scalar_dtype(fused: bool = False) -> torch.dtype:
    # torch.optim's dtype for state["step"]: float64 under a float64 default dtype, except for
    # fused=True groups (torch.optim.optimizer._get_scalar_dtype)
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class AdamW(Adam, torch.optim.AdamW):
    r"""``torch.optim.AdamW`` (decoupled weight decay) with optimizer-side weight normalization;
    see :class:`Adam` and :mod:`wnorm.optim`."""

    _torch_class = torch.optim.AdamW

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return True


def fused_layers(optimizer: torch.optim.Optimizer) -> list[str]:
    """The weights ``optimizer`` updates with wnorm's fused kernel ([] for any other optimizer)."""
    return optimizer.fused_layers() if isinstance(optimizer, _Optimizer) else []
