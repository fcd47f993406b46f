"""The errors moe_compile raises on bad input; each message names the problem and the remedy."""


class MoECompileError(Exception):
    """Base class: every error of ours carries a one-line message fit for the CLI."""


class ProfileError(MoECompileError, ValueError):
    """A profile file or override is malformed or unknown."""


class FeatureUnavailableError(MoECompileError, RuntimeError):
    """A feature was forced on that this version, this machine or this device does not have."""


class ModelLoadError(MoECompileError, ValueError):
    """A model path, config or built-in name could not be turned into a model."""


class MissingDependencyError(MoECompileError, ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""


class CheckpointError(MoECompileError, RuntimeError):
    """An optimized checkpoint cannot be written or read: missing, incomplete, tampered or from a newer version."""
