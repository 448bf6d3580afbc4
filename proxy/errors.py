"""The one exception tree of ollamux; edges (HTTP, CLI) translate it, nothing else does.

    OllamuxError
    ├── ConfigError            bad config file: names the file, the field path and a fix (CLI exit 2)
    ├── LaunchError            an instance could not be started or did not become ready
    └── EmulatorError          the emulated Ollama refuses a request; carries Ollama's status and text
        ├── ModelNotFound      the model is not in the emulator's store (404; wording per endpoint)
        ├── BadRequest         400 with Ollama's message
        ├── ServerBusy         OLLAMA_MAX_QUEUE exceeded (503, Ollama's exact body)
        └── RunnerFailed       the model runner failed (500); mid-stream it ends the stream instead
"""

from __future__ import annotations


class OllamuxError(Exception):
    """Base class of every error ollamux raises on purpose."""


class ConfigError(OllamuxError):
    """A config file (or command-line setting) is invalid.

    The message always names where (file and field path, e.g. ``instances[2].port``), what is wrong,
    and how to fix it.
    """

    def __init__(self, message: str, *, source: str = "", path: str = "") -> None:
        self.source = source
        self.path = path
        where = ": ".join(part for part in (source, path) if part)
        super().__init__(f"{where}: {message}" if where else message)


class LaunchError(OllamuxError):
    """An instance process failed to start, died at once, or never answered its health check."""


class EmulatorError(OllamuxError):
    """An error the emulated Ollama answers with, as Ollama's HTTP status and error text."""

    status = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class ModelNotFound(EmulatorError):
    """The requested model is not in the store."""

    status = 404


class BadRequest(EmulatorError):
    """The request is invalid in a way Ollama reports with 400."""

    status = 400


class ServerBusy(EmulatorError):
    """The scheduler queue (OLLAMA_MAX_QUEUE) is full."""

    status = 503
    MESSAGE = "server busy, please try again.  maximum pending requests exceeded"

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class RunnerFailed(EmulatorError):
    """The runner died or was told to fail (fault injection)."""

    status = 500
