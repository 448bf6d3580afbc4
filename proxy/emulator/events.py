"""Value types between the emulator's engine (time, VRAM, slots) and its HTTP layer."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.config import GpuSpec, ModelSpec


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """One emulated Ollama server: its GPUs and its OLLAMA_* settings (times in seconds)."""

    gpus: tuple[GpuSpec, ...]
    num_parallel: int = 1
    max_loaded_models: int = 0
    """0 = Ollama's auto value, 3 x number of GPUs."""
    max_queue: int = 512
    keep_alive: float = 300.0
    context_length: int = 0
    """0 = Ollama's VRAM-tiered default (4k / 32k / 256k)."""
    spread: bool = False
    spread_penalty: float = 0.06
    cpu_slowdown: float = 10.0
    reserve_bytes: int = 457 * 1024**2
    """Per-GPU minimum Ollama keeps free."""
    origins: tuple[str, ...] = ()
    """Extra allowed CORS origins (OLLAMA_ORIGINS)."""
    seed: int = 0
    """Varies the generated text (the same seed and request give the same answer)."""


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    """What a completion asks of the engine, after the HTTP layer parsed and rendered it."""

    model: ModelSpec
    prompt_tokens: tuple[str, ...]
    num_predict: int | None = None
    """None (or negative) = the model stops on its own after a deterministic length."""
    num_ctx: int | None = None
    keep_alive: float | None = None
    """None keeps the runner's current keep-alive (sticky); seconds otherwise, inf = forever."""
    seed: int | None = None


@dataclass(frozen=True)
class Loaded:
    """First event of a generation: the runner was handed over after ``load_duration`` seconds."""

    load_duration: float


@dataclass(frozen=True)
class Token:
    """One generated token's text."""

    text: str


@dataclass(frozen=True, kw_only=True)
class Done:
    """Last event of a generation, with Ollama's metrics (seconds; the HTTP layer makes ns)."""

    done_reason: str
    load_duration: float
    prompt_eval_count: int
    prompt_eval_duration: float
    eval_count: int
    eval_duration: float


Event = Loaded | Token | Done


@dataclass(frozen=True, kw_only=True)
class EmbedResult:
    load_duration: float
    prompt_eval_count: int
    duration: float


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """One entry of /api/ps."""

    model: ModelSpec
    size: int
    size_vram: int
    context_length: int
    expires_at: float
    """Virtual time at which the idle timer fires; inf = forever."""
    gpus: tuple[int, ...]


@dataclass(kw_only=True)
class Faults:
    """Fault knobs for reliability tests; the HTTP layer sets them from POST /emulator/faults."""

    fail_next: int = 0
    """The next N model requests fail with 500 before the first byte."""
    hang: bool = False
    """Model requests never answer (the connection stays open)."""
    die_after_tokens: int | None = None
    """Streams end with Ollama's mid-stream error after this many tokens."""
    slow: float = 1.0
    """Every model-time duration is multiplied by this."""
    fail_message: str = field(
        default="model runner has unexpectedly stopped, this may be due to resource limitations "
        "or an internal error, check ollama server logs for details"
    )
