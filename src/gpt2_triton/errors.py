"""The few error types the project raises across module boundaries."""


class Gpt2TritonError(Exception):
    """Base class: an expected failure with a message meant for a person."""


class RequestValidationError(Gpt2TritonError, ValueError):
    """A request parameter is missing, malformed or out of range.

    The message names the field and the allowed range; servers map it to INVALID_ARG.
    """


class CheckpointError(Gpt2TritonError):
    """A model checkpoint cannot be found, read or downloaded."""


class DataError(Gpt2TritonError):
    """A data file is missing, unreadable or empty."""


class EngineError(Gpt2TritonError):
    """An engine cannot be built or run (missing runtime, bad artifact, unknown sequence)."""


class ExportError(Gpt2TritonError):
    """An export or quantization that cannot be done as asked."""
