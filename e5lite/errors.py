"""Every exception e5lite raises on purpose, in one place: bad models, bad input, refused requests."""


class E5LiteError(Exception):
    """Base class: a problem with a model, a file or an argument, described in one line."""


class ConfigError(E5LiteError, ValueError):
    """A config.json that e5lite cannot run."""


class WeightsError(E5LiteError, ValueError):
    """A checkpoint whose keys, shapes or files do not fit the config."""


class ModelNotFoundError(E5LiteError, FileNotFoundError):
    """A model path or hub id that cannot be resolved to a local folder."""


class InputError(E5LiteError, ValueError):
    """Input the caller passed that cannot be used: a missing file, a bad JSONL line, a bad flag value."""


class TextTooLongError(InputError):
    """A text past the model's maximum length while truncation is off; ``index`` is its position in the call."""

    def __init__(self, index: int, max_length: int):
        super().__init__(f"text {index} is longer than the model's maximum of {max_length} tokens (truncation is off)")
        self.index, self.max_length = index, max_length


class TextEncodingError(InputError):
    """A text the tokenizer cannot take (e.g. one holding a lone surrogate); ``index`` is its position in the call."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"text {index} cannot be tokenised: {reason}")
        self.index = index


class ApiError(Exception):
    """A request the server refuses: HTTP status, one-line message, and the offending field (OpenAI ``param``)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
