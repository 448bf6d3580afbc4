"""The HTTP surface: Ollama's native API, its OpenAI-compatible API and the proxy's admin API."""
