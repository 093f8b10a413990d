"""The exceptions users can cause. Each message is one sentence naming the field, file or tensor."""


class MoelibError(Exception):
    """Base class: the command-line tools print these without a traceback and exit non-zero."""


class ConfigError(MoelibError, ValueError):
    """A configuration field breaks a rule (the message names the field and the rule)."""


class DataError(MoelibError, ValueError):
    """Input data is malformed: token ids out of range, a corrupt dataset file, a wrong shape."""


class CheckpointError(MoelibError):
    """A checkpoint is missing, truncated or does not match the model."""


class BackendUnavailableError(MoelibError, RuntimeError):
    """A requested backend cannot run here (the message says why and what would work)."""
