"""wnorm: weight normalization (Salimans & Kingma, 2016) for any PyTorch model.

The reparameterization w = g * v / ||v||, the paper's data-dependent initialization and
mean-only batch normalization, folding for inference and checkpoint interop with PyTorch's two
weight-norm APIs. Importing wnorm imports torch and nothing else.
"""

from .apply import DEFAULT_TYPES, apply
from .cache import cached
from .data_init import InitReport, data_init
from .errors import WnormError
from .family import (
    balanced_weight_norm,
    centered_weight_norm,
    forced_weight_norm,
    weight_standardization,
)
from .fold import ChannelShift, fold
from .init import arpit_init
from .mean_only_bn import (
    MeanOnlyBatchNorm1d,
    MeanOnlyBatchNorm2d,
    MeanOnlyBatchNorm3d,
    update_bn,
)
from .sphere import Projection, is_projected, project_, project_after_step
from .state_dict import convert_state_dict, load_state_dict
from .sync_mean_only_bn import SyncMeanOnlyBatchNorm
from .weight_norm import is_weight_normalized, remove_weight_norm, weight_norm

__version__ = "0.2.0"

__all__ = [
    "__version__",
    "WnormError",
    "weight_norm",
    "remove_weight_norm",
    "is_weight_normalized",
    "centered_weight_norm",
    "weight_standardization",
    "forced_weight_norm",
    "balanced_weight_norm",
    "project_after_step",
    "project_",
    "Projection",
    "is_projected",
    "apply",
    "DEFAULT_TYPES",
    "data_init",
    "InitReport",
    "MeanOnlyBatchNorm1d",
    "MeanOnlyBatchNorm2d",
    "MeanOnlyBatchNorm3d",
    "SyncMeanOnlyBatchNorm",
    "update_bn",
    "cached",
    "fold",
    "ChannelShift",
    "load_state_dict",
    "convert_state_dict",
    "arpit_init",
]
