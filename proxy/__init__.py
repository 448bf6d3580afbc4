"""ollamux: a load-balancing reverse proxy for Ollama, one server per GPU."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
