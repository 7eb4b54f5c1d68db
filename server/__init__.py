"""scaleswap.server: OpenAI-compatible HTTP server and CLI."""
