"""wnorm: weight normalization (Salimans & Kingma, 2016) for any PyTorch model.

The reparameterization w = g * v / ||v||, the paper's data-dependent initialization and
mean-only batch normalization, folding for inference and checkpoint interop with PyTorch's two
weight-norm APIs. Importing wnorm imports torch and nothing else.
"""

from .apply_model import DEFAULT_TYPES, NORM_TYPES, apply
from .checkpoint import (
    FORMATS,
    IncompatibleKeys,
    convert_checkpoint,
    convert_state_dict,
    find_state_dicts,
    incompatible_keys,
    load_checkpoint,
    load_state_dict,
    save_checkpoint,
)
from .data_init import InitReport, LayerInit, data_init
from .errors import WnormError
from .family import centered_weight_norm, forced_weight_norm, weight_standardization
from .fold import ChannelShift, fold
from .init import arpit_init
from . import optim
from .mean_only_bn import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d
from .mean_only_fused import fuse_mean_only
from .weight_norm import (
    default_dim,
    is_weight_normalized,
    normalized_weights,
    refresh,
    remove_weight_norm,
    weight_norm,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "WnormError",
    "weight_norm",
    "remove_weight_norm",
    "is_weight_normalized",
    "normalized_weights",
    "default_dim",
    "refresh",
    "apply",
    "DEFAULT_TYPES",
    "NORM_TYPES",
    "data_init",
    "InitReport",
    "LayerInit",
    "MeanOnlyBatchNorm1d",
    "MeanOnlyBatchNorm2d",
    "MeanOnlyBatchNorm3d",
    "fuse_mean_only",
    "fold",
    "ChannelShift",
    "load_state_dict",
    "incompatible_keys",
    "IncompatibleKeys",
    "convert_state_dict",
    "convert_checkpoint",
    "find_state_dicts",
    "load_checkpoint",
    "save_checkpoint",
    "FORMATS",
    "centered_weight_norm",
    "weight_standardization",
    "forced_weight_norm",
    "arpit_init",
    "optim",
]
