"""Transitional: the names ``wnorm/__init__.py`` still imports from here.

The code now lives in :mod:`wnorm.state_dict` (``load_state_dict``, ``convert_state_dict``) and,
for the command line, :mod:`wnorm._files` and :mod:`wnorm._layouts`. Delete this module when
``wnorm/__init__.py`` imports ``load_state_dict`` and ``convert_state_dict`` from
``.state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ._files import convert_checkpoint, find_state_dicts, load_checkpoint, save_checkpoint
from ._layouts import FORMATS
from .state_dict import _Incompatible as IncompatibleKeys
from .state_dict import _plan, _unwrap, convert_state_dict, load_state_dict

__all__ = ["FORMATS", "IncompatibleKeys", "load_state_dict", "incompatible_keys",
           "convert_state_dict", "convert_checkpoint", "load_checkpoint", "save_checkpoint",
           "find_state_dicts"]


def incompatible_keys(model: nn.Module, state_dict: Mapping[str, Any]) -> IncompatibleKeys:
    """The keys :func:`load_state_dict` would call missing and unexpected; loads nothing."""
    return _plan(_unwrap(model), state_dict)[1]
