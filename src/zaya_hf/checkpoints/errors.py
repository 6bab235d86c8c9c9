"""What can be wrong with a checkpoint folder. Every error names the file, field or tensor at fault.

The classes are the model's own (`zaya_hf.modeling_zaya`, `zaya_hf.configuration_zaya`): a tensor missing from a
folder is the same failure whether `from_pretrained` or `convert_checkpoint` finds it. This package adds the two
failures only it can detect, and keeps its earlier names for the shared classes.
"""

from ..configuration_zaya import CheckpointError, InvalidConfigError
from ..modeling_zaya import (
    CorruptCheckpointError,
    InvalidWeightsError,
    MismatchedWeightsError,
    MissingWeightsError,
    UnexpectedWeightsError,
)

# Earlier names of the shared classes (the same objects).
MissingTensorsError = MissingWeightsError
UnexpectedTensorsError = UnexpectedWeightsError
WrongShapeError = MismatchedWeightsError


class UnknownLayoutError(CheckpointError):
    """The folder is neither a current-layout nor a legacy-layout ZAYA checkpoint (or mixes the two)."""


class VerificationError(CheckpointError):
    """A written checkpoint failed its forward-pass check."""

