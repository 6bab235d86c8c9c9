"""What can be wrong with a checkpoint folder. Every error names the file or tensor at fault."""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read, converted, verified or exported as it is."""


class UnknownLayoutError(CheckpointError):
    """The folder is neither a current-layout nor a legacy-layout ZAYA checkpoint (or mixes the two)."""


class CorruptCheckpointError(CheckpointError):
    """A shard is truncated or unreadable, or the index and the shards disagree about where a tensor is."""


class MissingTensorsError(CheckpointError):
    """Tensors the configuration requires are not in the checkpoint."""


class UnexpectedTensorsError(CheckpointError):
    """The checkpoint holds tensors that the layout has no place for: they would be lost by a conversion."""


class WrongShapeError(CheckpointError):
    """A tensor's shape differs from the one the configuration implies."""


class VerificationError(CheckpointError):
    """A written checkpoint failed its forward-pass check."""
