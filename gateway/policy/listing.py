"""Filtered model listings: `/api/tags`, `/api/ps`, `/v1/models` show only allowed models.

The rewrite keeps every byte outside the list, and every kept entry's bytes, exactly as
Ollama sent them: the list is cut out of the original text by position, not re-serialised.
A response that is not a 200 with the expected JSON passes through unchanged.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from multidict import CIMultiDictProxy

from gateway.policy.decode import (
    DecodedTooLarge,
    DecodeError,
    UnsupportedEncoding,
    content_codings,
    decode_body,
)

MAX_LISTING_BYTES = 32 * 1024 * 1024
RESULT_CACHE_SIZE = 64
RESULT_CACHE_MAX_BODY = 64 * 1024  # bounds the cache to 2 x 4 MiB at worst
_RESULTS: dict[tuple[bytes, tuple[str, ...], ListingShape, Allows], bytes] = {}
_WS = " \t\r\n"
_decoder = json.JSONDecoder()

Allows = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class ListingShape:
    key: str  # the top-level key holding the list
    id_fields: tuple[str, ...]  # fields naming the model in each entry


TAGS = ListingShape(key="models", id_fields=("name", "model"))
OPENAI = ListingShape(key="data", id_fields=("id",))
SHAPES = {"/api/tags": TAGS, "/api/ps": TAGS, "/v1/models": OPENAI}


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def filter_listing(text: str, shape: ListingShape, allows: Allows) -> str | None:
    """`text` with disallowed entries removed from the list, or None if not the shape."""
    try:
        document = json.loads(text)
    except ValueError:
        return None
    if not isinstance(document, dict) or shape.key not in document:
        return None
    entries = document[shape.key]
    if not (entries is None or isinstance(entries, list)):
        return None
    # Fast path (the common case): one list, every entry allowed -> the very same text.
    # The key counted in the raw text rules out a duplicate key json.loads would hide.
    if (
        entries is not None
        and text.count(f'"{shape.key}"') == 1
        and all(_entry_allowed(e, shape, allows) for e in entries)
    ):
        return text
    # Walk the top-level object again, by position, to splice the list(s) in place.
    pieces: list[str] = []
    i = _skip_ws(text, 0) + 1  # past '{'
    copied = 0
    while True:
        i = _skip_ws(text, i)
        if text[i] == "}":
            break
        key, i = _decoder.raw_decode(text, i)
        i = _skip_ws(text, i) + 1  # past ':'
        i = _skip_ws(text, i)
        start = i
        value, i = _decoder.raw_decode(text, i)
        if key == shape.key:  # every duplicate too: a client might read either
            pieces.append(text[copied:start])
            pieces.append(_filtered_array(text, start, value, shape, allows))
            copied = i
        i = _skip_ws(text, i)
        if text[i] == ",":
            i += 1
    pieces.append(text[copied:])
    return "".join(pieces)


def _filtered_array(
    text: str, start: int, value: object, shape: ListingShape, allows: Allows
) -> str:
    if not isinstance(value, list):
        return "[]"  # Ollama writes null for an empty list; [] is what clients expect
    kept: list[str] = []
    i = start + 1  # past '['
    for entry in value:
        i = _skip_ws(text, i)
        entry_start = i
        _, i = _decoder.raw_decode(text, i)
        if _entry_allowed(entry, shape, allows):
            kept.append(text[entry_start:i])
        i = _skip_ws(text, i)
        if text[i] == ",":
            i += 1
    return "[" + ",".join(kept) + "]"


def _entry_allowed(entry: object, shape: ListingShape, allows: Allows) -> bool:
    if not isinstance(entry, dict):
        return False
    names = [entry[f] for f in shape.id_fields if f in entry]
    # Every name the entry carries must be allowed; an entry naming nothing is dropped.
    return bool(names) and all(isinstance(n, str) and n and allows(n) for n in names)


@dataclass(slots=True)
class ListingTap:
    """A ResponseTap (gateway.relay) that buffers a small listing and filters it at the end."""

    shape: ListingShape
    allows: Allows
    limit: int = MAX_LISTING_BYTES
    rewrites: bool = True
    _active: bool = False
    _codings: list[str] = field(default_factory=list)
    _chunks: list[bytes] = field(default_factory=list)
    _size: int = 0
    _overflow: bool = False

    def begin(self, status: int, headers: CIMultiDictProxy[str]) -> None:
        self._active = status == 200
        self._codings = content_codings(headers.getall("Content-Encoding", []))

    def feed(self, chunk: bytes) -> bytes:
        if not self._active:
            return chunk
        self._size += len(chunk)
        if self._size > self.limit:
            self._overflow = True  # cannot filter what we did not keep: show nothing
            self._chunks.clear()
        elif not self._overflow:
            self._chunks.append(chunk)
        return b""

    def end(self) -> bytes:
        if not self._active:
            return b""
        if self._overflow:
            return self._encode(json.dumps({self.shape.key: []}).encode())
        body = b"".join(self._chunks)
        # The same listing is asked for again and again (clients poll /api/tags): remember
        # the answer per (Ollama's bytes, caller's allow-list), bounded.
        if len(body) > RESULT_CACHE_MAX_BODY:
            return self._filter(body)
        key = (body, tuple(self._codings), self.shape, self.allows)
        cached = _RESULTS.get(key)
        if cached is None:
            cached = self._filter(body)
            if len(_RESULTS) >= RESULT_CACHE_SIZE:
                _RESULTS.clear()
            _RESULTS[key] = cached
        return cached

    def _filter(self, body: bytes) -> bytes:
        try:
            text = decode_body(body, self._codings, self.limit).decode("utf-8")
        except (UnsupportedEncoding, DecodedTooLarge):
            # Unreadable here, so unfilterable: fail closed rather than leak the names.
            return self._encode(json.dumps({self.shape.key: []}).encode())
        except (DecodeError, UnicodeDecodeError):
            return body
        filtered = filter_listing(text, self.shape, self.allows)
        if filtered is None or filtered is text:
            return body  # not a listing, or nothing to hide: Ollama's bytes as they came
        return self._encode(filtered.encode("utf-8"))

    def _encode(self, data: bytes) -> bytes:
        """Re-apply the upstream's Content-Encoding (the header is relayed as sent)."""
        for coding in self._codings:
            if coding in ("gzip", "x-gzip"):
                data = gzip.compress(data)
            elif coding == "deflate":
                data = zlib.compress(data)
            elif coding in ("zstd", "zst", "zstandard"):
                import zstandard

                data = zstandard.ZstdCompressor().compress(data)
        return data
