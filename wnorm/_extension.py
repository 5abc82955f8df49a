"""Build and load wnorm's C++ kernels (``wnorm/csrc``) on first use.

The kernels are compiled once per machine and torch version with
``torch.utils.cpp_extension.load`` (a C++ compiler and ninja are needed; the result is cached
under ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). Where they cannot be
built, :func:`kernels` returns None, :func:`unavailable_reason` says why, :mod:`wnorm.optim`
trains through autograd, and :func:`wnorm.fuse_mean_only` and :func:`wnorm.data_init` use
PyTorch ops instead: the same results at PyTorch's speed. ``WNORM_NO_EXTENSION=1`` turns the
kernels off. :func:`readable` says whether the kernels may read a tensor's memory at all.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["kernels", "readable", "unavailable_reason"]

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = [str(_CSRC / n) for n in ("fused_step.cpp", "activation.cpp", "data_init.cpp",
                                              "conv_mean.cpp")]
_state: dict[str, Any] = {}


# Vector instructions by the CPU capability torch itself dispatches to on this machine.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma",
               "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}


def _capability() -> str:
    try:
        cap = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        cap = "DEFAULT"
    return cap if cap in _ISA_FLAGS else "DEFAULT"


def _name() -> str:
    # One build per torch version (the extension links against torch's C++ ABI) and per
    # instruction set (a cache shared by different machines must not hand AVX-512 code to a
    # CPU without it).
    tag = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    return f"wnorm_kernels_v4_torch{tag}_{_capability().lower()}"


def _ninja_on_path() -> None:
    # torch.utils.cpp_extension runs `ninja` from PATH; a venv's own ninja (pip package) is not
    # on it unless the venv is activated
    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore[import-not-found]

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for d in dirs:
        if shutil.which("ninja", path=d):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def _announce(name: str) -> None:
    # a first build takes ~30 s: say so rather than stall silently (a cached one says nothing)
    try:
        from torch.utils.cpp_extension import _get_build_directory

        cached = os.path.exists(os.path.join(_get_build_directory(name, False), name + ".so"))
    except Exception:  # a private helper of torch's: never let it break the build
        cached = False
    if not cached:
        print("wnorm: building its C++ kernels for this machine (once, about 30 s)",
              file=sys.stderr, flush=True)


def _build(load: Any) -> Any:
    flags = ["-O3", "-fopenmp-simd", "-fno-math-errno", *_ISA_FLAGS.get(_capability(), [])]
    _announce(_name() + "_omp")
    try:
        # OpenMP: at::parallel_for splits large layers over torch's threads. The extension
        # needs libgomp.so.1, which resolves to the copy torch has loaded already.
        return load(_name() + "_omp", _SOURCES, extra_cflags=[*flags, "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception:  # e.g. a compiler without OpenMP: one thread per step
        return load(_name(), _SOURCES, extra_cflags=flags, verbose=False)


def kernels() -> Any | None:
    """The compiled module (``sgd_step``, ``adam_step``, ..., ``act_forward_sum``,
    ``act_backward_add_``, ``conv_mean_forward``, ``conv_mean_backward`` and
    ``data_init_layer``), or None where it cannot be built."""
    if "module" in _state:
        return _state["module"]
    module, reason = None, ""
    if os.environ.get("WNORM_NO_EXTENSION", "") not in ("", "0"):
        reason = "WNORM_NO_EXTENSION is set"
    else:
        try:
            from torch.utils.cpp_extension import load

            _ninja_on_path()
            module = _build(load)
        except Exception as err:  # no compiler, no ninja, read-only cache...: fall back
            last = str(err).strip().splitlines()[-1] if str(err).strip() else ""
            reason = f"{type(err).__name__}: {last}"
            warnings.warn(
                f"wnorm: the C++ kernels could not be built ({reason}); wnorm.optim trains "
                "through autograd, fuse_mean_only and data_init use PyTorch ops instead (same "
                "results, PyTorch's speed)",
                RuntimeWarning,
                stacklevel=3,
            )
    _state["module"], _state["reason"] = module, reason
    return module


_has_storage = getattr(torch._C, "_has_storage", None)
_is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def readable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels may read these tensors' memory (None entries are skipped): ordinary
    tensors with storage, not a tensor subclass (a ``FakeTensor`` has no data, a ``DTensor``
    is one shard) nor a functorch wrapper (``vmap``'s batched gradients, ``torch.func.grad``).
    Device, dtype and layout are for the caller to check."""
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return False
        if (_has_storage is not None and not _has_storage(t)) or \
                (_is_wrapped is not None and _is_wrapped(t)):
            return False
    return True


def unavailable_reason() -> str:
    """Why :func:`kernels` returned None ("" when it did not, or was not asked yet)."""
    return _state.get("reason", "")
