"""Where requests name models, and reading those names the way Ollama reads them. Pure.

Ollama decodes bodies with Go's encoding/json, which matches object keys to struct fields
case-insensitively (with Unicode folding: `MODEL`, `ſource`) and lets the last duplicate
win. Python's json keeps `MODEL` as a separate key and also keeps the last duplicate, so
reading only `obj["model"]` would let `{"model":"ok","MODEL":"forbidden"}` through. Here
every top-level key that folds to a model field is a candidate, and all must be allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Routes whose body names models, by lower-cased canonical path. Others under /api and /v1
# are still read (a route added upstream later must not slip through): see `body_fields`.
_DEFAULT_FIELDS = ("model", "name")
_FIELDS: dict[str, tuple[str, ...]] = {
    "/api/create": ("model", "name", "from"),
    "/api/copy": ("source", "destination"),
}
MULTIPART_PATHS = frozenset({"/v1/audio/transcriptions"})
LISTING_PATHS = frozenset({"/api/tags", "/api/ps", "/v1/models"})
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class BodyError(ValueError):
    """A body that cannot be read the way Ollama would read it (answered with 400)."""


@dataclass(frozen=True, slots=True)
class BodySpec:
    """How the authorise stage reads one route's body."""

    multipart: bool
    fields: tuple[str, ...]


def body_spec(method: str, path: str) -> BodySpec | None:
    """How to read this request's body for model names, or None: leave it streaming.

    Blob uploads are never read (they are huge and name no model); only /api and /v1 take
    JSON bodies upstream.
    """
    if method.upper() in _NO_BODY_METHODS:
        return None
    lowered = path.lower()
    if lowered.startswith("/api/blobs/") or lowered == "/api/blobs":
        return None
    if lowered in MULTIPART_PATHS:
        return BodySpec(multipart=True, fields=("model",))
    if lowered.startswith(("/api/", "/v1/")):
        return BodySpec(multipart=False, fields=_FIELDS.get(lowered, _DEFAULT_FIELDS))
    return None


def path_model(path: str) -> str | None:
    """The model named in the path: `/v1/models/{model}` (everything after, `/` included)."""
    lowered = path.lower()
    if lowered.startswith("/v1/models/"):
        return path[len("/v1/models/") :]
    return None


def parse_json_object(text: str) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """The parsed top-level object and its key/value pairs in order, duplicates kept."""
    last: list[list[tuple[str, Any]]] = [[]]

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        last[0] = pairs  # the outermost object is finished (and hooked) last
        return dict(pairs)

    try:
        value = json.loads(text, object_pairs_hook=hook, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise BodyError("request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BodyError("request body must be a JSON object")
    return value, last[0]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_candidates(pairs: list[tuple[str, Any]], fields: tuple[str, ...]) -> list[str]:
    """Every value Go could bind to one of `fields`, in order; BodyError on a non-string."""
    found: list[str] = []
    for key, value in pairs:
        if key.casefold() not in fields:
            continue
        if value is None:
            continue  # Go leaves the field empty; the upstream then refuses the request
        if not isinstance(value, str):
            raise BodyError(f"{key} must be a string")
        if value:
            found.append(value)
    return found
