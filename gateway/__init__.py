"""ollama-gateway: a fast, secure, streaming gateway in front of Ollama."""

__version__ = "0.1.0"
