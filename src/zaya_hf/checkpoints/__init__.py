"""ZAYA checkpoints: the current and the legacy layout, conversion both ways, verification, export for the Hub.

Nothing here travels with a checkpoint; the flat modeling files never import this sub-package.
"""

from .convert import convert_checkpoint
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    InvalidConfigError,
    InvalidWeightsError,
    MismatchedWeightsError,
    MissingTensorsError,
    MissingWeightsError,
    UnexpectedTensorsError,
    UnexpectedWeightsError,
    UnknownLayoutError,
    VerificationError,
    WrongShapeError,
)
from .hub import export_for_hub, model_card, remote_code_files
from .layouts import (
    current_config_to_legacy,
    detect_layout,
    expected_tensor_shapes,
    legacy_config_to_current,
    legacy_names,
    tensor_groups,
)
from .verify import CheckpointReport, verify_checkpoint

__all__ = [
    "CheckpointError",
    "CheckpointReport",
    "CorruptCheckpointError",
    "InvalidConfigError",
    "InvalidWeightsError",
    "MismatchedWeightsError",
    "MissingTensorsError",
    "MissingWeightsError",
    "UnexpectedTensorsError",
    "UnexpectedWeightsError",
    "UnknownLayoutError",
    "VerificationError",
    "WrongShapeError",
    "convert_checkpoint",
    "current_config_to_legacy",
    "detect_layout",
    "expected_tensor_shapes",
    "export_for_hub",
    "legacy_config_to_current",
    "legacy_names",
    "model_card",
    "remote_code_files",
    "tensor_groups",
    "verify_checkpoint",
]
