"""The exceptions e5lite raises for bad models and bad input."""


class E5LiteError(Exception):
    """Base class: a problem with a model, a file or an argument, described in one line."""


class WeightsError(E5LiteError, ValueError):
    """A checkpoint whose keys, shapes or files do not fit the config."""


class ModelNotFoundError(E5LiteError, FileNotFoundError):
    """A model path or hub id that cannot be resolved to a local folder."""
