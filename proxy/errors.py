"""The one exception tree of ollamux; edges (HTTP, CLI) translate it, nothing else does.

OllamuxError
├── ConfigError            bad config file: names the file, the field path and a fix (CLI exit 2)
├── LaunchError            an instance could not be started or did not become ready
├── GpuUnavailable         no NVIDIA GPU can be read: no NVML library, no driver, or no GPU (exit 1)
├── ApiKeyError            `ollamux keys`: no key of that name, or one exists already (exit 1)
├── RoutingError           the proxy cannot place a request now (HTTP 503 + Retry-After)
│   ├── QueueFull          the model's (or the total) wait queue is at its limit
│   ├── QueueTimeout       the request waited longer than queue.timeout for a slot
│   └── NoHealthyInstance  no instance answers its health check
├── RequestRefused         the client's request breaks one of the proxy's limits (HTTP 4xx)
│   ├── BodyTooLarge       the body is over limits.max_body (413)
│   ├── BodyTimeout        the body stalled longer than limits.client_idle (408)
│   └── BodyIncomplete     the client ended the body before it was whole (400)
├── UpstreamError          an exchange with an instance failed (retried before the first byte)
│   ├── UpstreamConnectError   could not connect, or the connection broke
│   ├── UpstreamTimeout        no answer in time
│   ├── UpstreamStatus         answered 5xx before the first byte of a body we relay
│   └── UpstreamBroken         its answer broke off (or carried Ollama's error line) before
│                              anything reached the client (a non-streamed answer the proxy builds)
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
        self.problems: tuple[ConfigError, ...] = (self,)
        """Every problem found (several when independent fields are wrong), each on its own."""
        where = ": ".join(part for part in (source, path) if part)
        super().__init__(f"{where}: {message}" if where else message)

    @classmethod
    def of(cls, problems: list[ConfigError]) -> ConfigError:
        """One error for ``problems``: the only one, or one whose message has a line for each."""
        flat = [p for problem in problems for p in problem.problems]
        if len(flat) == 1:
            return flat[0]
        error = cls("\n".join(str(p) for p in flat))
        error.problems = tuple(flat)
        return error


class LaunchError(OllamuxError):
    """An instance process failed to start, died at once, or never answered its health check."""


class GpuUnavailable(OllamuxError):
    """NVML cannot report any GPU; the message is one sentence saying why and what to do."""


class ApiKeyError(OllamuxError):
    """``ollamux keys add|revoke``: the name is taken, or no key has it."""


class RoutingError(OllamuxError):
    """The proxy cannot place the request now; clients get 503 with Retry-After."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class QueueFull(RoutingError):
    """Admission control refused the request (per-model or total queue limit)."""


class QueueTimeout(RoutingError):
    """The request waited ``queue.timeout`` without getting a slot."""


class NoHealthyInstance(RoutingError):
    """Every instance is down, ejected or draining."""

    def __init__(
        self, message: str = "no healthy Ollama instance is available", *, retry_after: int = 5
    ) -> None:
        super().__init__(message, retry_after=retry_after)


class RequestRefused(OllamuxError):
    """The proxy refuses the client's request; clients get ``status`` with an Ollama-style body."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BodyTooLarge(RequestRefused):
    """The request body is larger than ``limits.max_body``."""

    status = 413


class BodyTimeout(RequestRefused):
    """The client stopped sending its request body for longer than ``limits.client_idle``."""

    status = 408


class BodyIncomplete(RequestRefused):
    """The client's body ended before its declared length or chunked end."""


class UpstreamError(OllamuxError):
    """One exchange with an instance failed."""

    kind = "error"

    def __init__(self, instance: str, message: str) -> None:
        super().__init__(f"{instance}: {message}")
        self.instance = instance
        self.message = message


class UpstreamConnectError(UpstreamError):
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class UpstreamStatus(UpstreamError):
    """A 5xx answer before any byte was relayed; the body is kept to relay if no retry helps."""

    kind = "status"

    def __init__(
        self, instance: str, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(instance, f"answered {status}")
        self.status = status
        self.body = body
        self.headers = headers or {}


class UpstreamBroken(UpstreamStatus):
    """The answer broke off before anything reached the client; the body is what to answer."""

    kind = "midstream"

    def __init__(
        self,
        instance: str,
        message: str,
        status: int = 502,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(instance, status, body, headers)
        self.message = message


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
