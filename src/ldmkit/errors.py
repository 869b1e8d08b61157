"""One small error hierarchy. Messages name the file or argument and what is allowed; the CLI prints
them on one line (`error: ...`, exit 2) and the HTTP API answers 4xx with the same text."""


class LdmkitError(Exception):
    """Base class for every error a user can cause (bad file, bad argument)."""


class CheckpointError(LdmkitError):
    """A file or folder is unreadable, corrupt, unsafe, or does not match the model it should hold."""


class UnsupportedModelError(CheckpointError):
    """A file is recognised (SDXL, SD3, Flux, ...) but ldmkit cannot run that family yet."""


class ConfigError(LdmkitError):
    """A configuration value is missing, of the wrong type, or outside what is allowed."""


class RequestError(LdmkitError):
    """An HTTP request the server understands but refuses: answered 422 with this message."""


class TrainingError(LdmkitError):
    """A training run cannot go on (a non-finite loss); the last good checkpoint is left as it was."""


class Stopped(LdmkitError):
    """A training run stopped on a signal (SIGTERM, SIGINT) after writing a checkpoint at its last step; the
    command exits 128 + the signal's number, as a process the signal ended would."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class NotFoundError(LdmkitError):
    """A model, ControlNet or other named thing a request asks for is not offered: answered 404."""


class BusyError(LdmkitError):
    """The server's queue is full: answered 503 with Retry-After."""
