"""Bounded request-body decompression (Content-Encoding), for reading model names. Pure.

Only the copy that is inspected is decompressed; the original bytes are forwarded. Output
is bounded as well as input: a 10 kB gzip bomb must not become 10 GB of memory.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterable

CHUNK = 64 * 1024


class DecodeError(ValueError):
    """Corrupt compressed data (400)."""


class UnsupportedEncoding(ValueError):
    """An encoding this gateway cannot read, so cannot authorise (415)."""


class DecodedTooLarge(ValueError):
    """The decompressed body exceeds the bound (413)."""


def content_codings(values: Iterable[str]) -> list[str]:
    """The codings of (possibly several) Content-Encoding headers, in the order applied."""
    codings = [
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    ]
    return [c for c in codings if c != "identity"]


def decode_body(data: bytes, codings: list[str], limit: int) -> bytes:
    """Undo `codings` (last applied is undone first); every stage bounded by `limit`."""
    for coding in reversed(codings):
        if coding in ("gzip", "x-gzip"):
            data = _zlib(data, 16 + zlib.MAX_WBITS, limit, multi_member=True)
        elif coding == "deflate":
            try:  # RFC 9110 says zlib-wrapped; some clients send raw deflate
                data = _zlib(data, zlib.MAX_WBITS, limit, multi_member=False)
            except DecodeError:
                data = _zlib(data, -zlib.MAX_WBITS, limit, multi_member=False)
        elif coding in ("zstd", "zst", "zstandard"):
            data = _zstd(data, limit)
        else:
            raise UnsupportedEncoding(f"unsupported Content-Encoding: {coding}")
    return data


def _zlib(data: bytes, wbits: int, limit: int, *, multi_member: bool) -> bytes:
    out = bytearray()
    remaining = data
    while True:
        stream = zlib.decompressobj(wbits)
        try:
            chunk = stream.decompress(remaining, limit + 1 - len(out))
            out += chunk
            while stream.unconsumed_tail and len(out) <= limit:
                out += stream.decompress(stream.unconsumed_tail, limit + 1 - len(out))
        except zlib.error:
            raise DecodeError("request body is not valid compressed data") from None
        if len(out) > limit:
            raise DecodedTooLarge("decompressed request body too large")
        if not stream.eof:
            raise DecodeError("compressed request body is truncated")
        remaining = stream.unused_data
        if not remaining:
            return bytes(out)
        if not multi_member:
            raise DecodeError("trailing data after the compressed request body")


def _zstd(data: bytes, limit: int) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise UnsupportedEncoding(
            "Content-Encoding zstd needs the `zstandard` package on the gateway "
            "(pip install 'ollama-gateway[zstd]')"
        ) from None

    # Go's zstd decoder reads every concatenated frame; so must we, or a second frame
    # would name a model we never saw.
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    out = bytearray()
    try:
        while chunk := reader.read(CHUNK):
            out += chunk
            if len(out) > limit:
                raise DecodedTooLarge("decompressed request body too large")
    except zstandard.ZstdError:
        raise DecodeError("request body is not valid zstd data") from None
    return bytes(out)
