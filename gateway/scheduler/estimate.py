"""A request's token estimate at dispatch, before Ollama has counted anything.

The fair queue charges a user when its request is dispatched and reconciles with Ollama's
reported counts when it ends. The estimate only needs to be in the right range: prompt
tokens from the body size (about 4 bytes a token), completion tokens from the limit the
request sets (`num_predict`, `max_tokens`...) or a default for an open-ended generation.
"""

from __future__ import annotations

from typing import Any

BYTES_PER_TOKEN = 4
DEFAULT_COMPLETION_TOKENS = 256  # an open-ended answer, until Ollama says how long it was
MAX_ESTIMATE = 1_000_000
EMBEDDING_PATHS = frozenset({"/api/embed", "/api/embeddings", "/v1/embeddings"})
_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def completion_limit(body: dict[str, Any]) -> int | None:
    """The completion cap the request sets, in any of Ollama's or OpenAI's spellings."""
    options = body.get("options")
    if isinstance(options, dict) and (n := _positive_int(options.get("num_predict"))):
        return n
    for name in _LIMIT_FIELDS:
        if n := _positive_int(body.get(name)):
            return n
    return None


def estimate_tokens(path: str, body: Any, body_size: int) -> int:
    """Prompt + completion tokens this request is expected to use."""
    prompt = max(1, body_size // BYTES_PER_TOKEN)
    if path in EMBEDDING_PATHS:
        return min(prompt, MAX_ESTIMATE)
    limit = completion_limit(body) if isinstance(body, dict) else None
    completion = limit if limit is not None else DEFAULT_COMPLETION_TOKENS
    return min(prompt + completion, MAX_ESTIMATE)
