"""Exceptions: one base class so callers can catch everything peftlab raises on bad input."""


class PeftlabError(Exception):
    """Base class of peftlab's errors."""


class UnknownMethodError(PeftlabError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigError(PeftlabError, ValueError):
    """A hyperparameter is out of range or inconsistent."""


class TargetError(PeftlabError, ValueError):
    """A target names nothing usable, or the model cannot host the method."""


class AdapterFileError(PeftlabError, ValueError):
    """An adapter directory is missing, corrupt, or does not fit the model."""


class MergeError(PeftlabError, ValueError):
    """The adapter cannot be folded into the base weights."""
