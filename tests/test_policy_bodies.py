"""Reading model names from bodies, filtering listings, CORS decisions (pure parts)."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
import zstandard
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import CorsConfig
from gateway.policy.decode import (
    DecodedTooLarge,
    DecodeError,
    UnsupportedEncoding,
    content_codings,
    decode_body,
)
from gateway.policy.fields import BodyError, body_spec, json_candidates, parse_json_object
from gateway.policy.listing import OPENAI, TAGS, ListingTap, filter_listing
from gateway.policy.multipart import form_values
from gateway.policy.origins import CorsPolicy, CorsRefused


def names(body: str, fields: tuple[str, ...] = ("model", "name")) -> list[str]:
    _, pairs = parse_json_object(body)
    return json_candidates(pairs, fields)


def test_every_spelling_go_would_bind_is_a_candidate() -> None:
    # Go's encoding/json: case-insensitive keys (Unicode folding), last duplicate wins.
    assert names('{"model":"ok","MODEL":"bad"}') == ["ok", "bad"]
    assert names('{"model":"ok","model":"bad"}') == ["ok", "bad"]
    assert names('{"Name":"x"}') == ["x"]
    assert names('{"\\u017fource":"bad"}', ("source",)) == ["bad"]  # U+017F folds to "s"
    assert names('{"model":null,"messages":[{"model":"nested"}]}') == []
    assert names('{"model":""}') == []


@pytest.mark.parametrize(
    "body",
    [
        '{"model":1}',
        '{"model":["a"]}',
        '{"model":{"a":1}}',
        "[1]",
        '"x"',
        "{",
        "",
        '{"model":"a"}{"model":"b"}',
        '{"model":NaN}',
        "\ufeff{}",
    ],
)
def test_unreadable_bodies_are_400(body: str) -> None:
    with pytest.raises(BodyError):
        names(body)


def test_body_spec_by_route() -> None:
    assert body_spec("GET", "/api/chat") is None
    assert body_spec("POST", "/api/blobs/sha256:1") is None  # streamed, never read
    assert body_spec("POST", "/api/copy").fields == ("source", "destination")  # type: ignore[union-attr]
    assert body_spec("POST", "/api/create").fields == ("model", "name", "from")  # type: ignore[union-attr]
    assert body_spec("DELETE", "/api/delete").fields == ("model", "name")  # type: ignore[union-attr]
    assert body_spec("POST", "/v1/audio/transcriptions").multipart  # type: ignore[union-attr]
    assert body_spec("POST", "/v1/some/future/route") is not None
    assert body_spec("POST", "/elsewhere") is None


def part(name: str, value: str, extra: str = "") -> str:
    return f'--B\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n{value}\r\n'


@pytest.mark.parametrize(
    ("body", "found"),
    [
        (
            part("model", "whisper") + part("file", "RIFF", '; filename="a.wav"') + "--B--\r\n",
            ["whisper"],
        ),
        (part("model", "a") + part("MODEL", "b") + "--B--", ["a", "b"]),
        (part("file", "x\r\n--Bx not a delimiter") + part("model", "m") + "--B--", ["m"]),
        (part("prompt", "hi") + "--B--\r\nepilogue " + part("model", "hidden"), []),
        ("--B \t\r\nContent-Disposition: form-data; name=model\r\n\r\nm\r\n--B--", ["m"]),
        ('--B\r\ncontent-disposition: form-data; name="mo\\del"\r\n\r\nm\r\n--B--', ["m"]),
        ("--B\r\n\r\nno headers\r\n--B--", []),
    ],
)
def test_multipart_model_fields(body: str, found: list[str]) -> None:
    assert form_values("multipart/form-data; boundary=B", body.encode(), "model") == found


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", part("model", "m") + "--B--"),
        ("multipart/form-data", part("model", "m") + "--B--"),
        ("multipart/form-data; boundary=B; boundary=C", part("model", "m") + "--B--"),
        ("multipart/form-data; boundary*=B", part("model", "m") + "--B--"),
        ("multipart/form-data; boundary=B", "preamble\r\n" + part("model", "m") + "--B--"),
        (
            "multipart/form-data; boundary=B",
            "--B\nContent-Disposition: form-data; name=model\n\nm\n--B--",
        ),  # LF-only framing
        ("multipart/form-data; boundary=B", part("model", "m")),  # no closing delimiter
        (
            "multipart/form-data; boundary=B",
            '--B\r\nContent-Disposition: form-data;\r\n name="model"\r\n\r\nm\r\n--B--',
        ),  # folded header
        (
            "multipart/form-data; boundary=B",
            "--B\r\nContent-Disposition: form-data; name*=utf-8''model\r\n\r\nm\r\n--B--",
        ),  # RFC 2231 spelling
        (
            "multipart/form-data; boundary=B",
            "--B\r\nContent-Disposition: form-data; "
            'name="model"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=6D\r\n--B--',
        ),
        (
            "multipart/form-data; boundary=B",
            '--B\r\nContent-Disposition: form-data; name="model\r\n\r\nm\r\n--B--',
        ),  # unparseable, mentions model
        ("multipart/form-data; boundary=B", "--Bjunk\r\n\r\nm\r\n--B--"),
    ],
)
def test_ambiguous_multipart_is_400(content_type: str, body: str) -> None:
    with pytest.raises(BodyError):
        form_values(content_type, body.encode(), "model")


def test_decompression_is_bounded_and_strict() -> None:
    data = b'{"model":"llama3.2"}'
    assert decode_body(gzip.compress(data), ["gzip"], 100) == data
    assert decode_body(zlib.compress(data), ["deflate"], 100) == data
    assert decode_body(zstandard.ZstdCompressor().compress(data), ["zstd"], 100) == data
    two_frames = zstandard.ZstdCompressor().compress(
        data[:5]
    ) + zstandard.ZstdCompressor().compress(data[5:])
    assert decode_body(two_frames, ["zstd"], 100) == data  # Go reads every frame too
    stacked = zstandard.ZstdCompressor().compress(gzip.compress(data))
    assert decode_body(stacked, content_codings(["gzip", "zstd"]), 100) == data
    assert content_codings(["identity", " GZIP , br"]) == ["gzip", "br"]
    with pytest.raises(DecodedTooLarge):
        decode_body(gzip.compress(b" " * 10_000), ["gzip"], 1024)
    with pytest.raises(DecodedTooLarge):
        decode_body(zstandard.ZstdCompressor().compress(b" " * 10_000), ["zstd"], 1024)
    with pytest.raises(DecodeError):
        decode_body(b"not gzip", ["gzip"], 100)
    with pytest.raises(DecodeError):
        decode_body(gzip.compress(data)[:-6], ["gzip"], 100)
    with pytest.raises(UnsupportedEncoding):
        decode_body(data, ["br"], 100)


TAGS_BODY = (
    '{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","size":1},\n'
    ' {"name":"gpt-oss:120b-cloud","model":"gpt-oss:120b-cloud","size":2},'
    '{"name":"qwen2.5:7b","model":"qwen2.5:7b","details":{"x":"\\u003c"}}],"extra":1.50}'
)


def allow_local(name: str) -> bool:
    return not name.endswith("cloud")


def test_listing_filter_keeps_every_other_byte() -> None:
    filtered = filter_listing(TAGS_BODY, TAGS, allow_local)
    assert filtered == (
        '{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","size":1},'
        '{"name":"qwen2.5:7b","model":"qwen2.5:7b","details":{"x":"\\u003c"}}],"extra":1.50}'
    )
    assert filter_listing(TAGS_BODY, TAGS, lambda n: False) == '{"models":[],"extra":1.50}'
    openai = '{"object":"list","data":[{"id":"a:latest"},{"id":"b-cloud:x-cloud"}]}\n'
    assert filter_listing(openai, OPENAI, allow_local) == (
        '{"object":"list","data":[{"id":"a:latest"}]}\n'
    )
    assert filter_listing('{"object":"list","data":null}', OPENAI, allow_local) == (
        '{"object":"list","data":[]}'
    )
    # Entries must be named, and by allowed names only (name and model both checked).
    odd = '{"models":[{"size":1},"x",{"name":"ok","model":"gpt-oss:cloud"}]}'
    assert filter_listing(odd, TAGS, allow_local) == '{"models":[]}'
    assert filter_listing('{"error":"boom"}', TAGS, allow_local) is None
    assert filter_listing("not json", TAGS, allow_local) is None
    assert filter_listing('{"models":{}}', TAGS, allow_local) is None


def headers(**items: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(items))


def run_tap(
    tap: ListingTap, status: int, hdrs: CIMultiDictProxy[str], chunks: list[bytes]
) -> bytes:
    tap.begin(status, hdrs)
    out = b"".join(tap.feed(c) for c in chunks)
    return out + tap.end()


def test_listing_tap() -> None:
    body = TAGS_BODY.encode()
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
    out = run_tap(ListingTap(TAGS, allow_local), 200, headers(), chunks)
    assert b"gpt-oss" not in out and json.loads(out)["extra"] == 1.5
    # Errors and non-JSON pass through untouched.
    error = b'{"error":"boom"}'
    assert run_tap(ListingTap(TAGS, allow_local), 500, headers(), [error]) == error
    assert run_tap(ListingTap(TAGS, allow_local), 200, headers(), [b"<html>"]) == b"<html>"
    # Compressed listings are filtered and re-compressed; unreadable ones show nothing.
    zipped = run_tap(
        ListingTap(TAGS, allow_local),
        200,
        headers(**{"Content-Encoding": "gzip"}),
        [gzip.compress(body)],
    )
    assert b"gpt-oss" not in gzip.decompress(zipped)
    brotli = run_tap(
        ListingTap(TAGS, allow_local), 200, headers(**{"Content-Encoding": "br"}), [body]
    )
    assert brotli == b'{"models": []}'
    # Too big to buffer: nothing is shown rather than everything.
    big = run_tap(ListingTap(TAGS, allow_local, limit=10), 200, headers(), chunks)
    assert json.loads(big) == {"models": []}


def test_cors_policy() -> None:
    off = CorsPolicy.from_config(CorsConfig())
    assert not off.enabled and not off.allows("https://a.example")
    with pytest.raises(CorsRefused):
        off.preflight("https://a.example", "POST", "")
    cors = CorsPolicy.from_config(
        CorsConfig(origins=("https://app.example", "https://*.corp.example"), max_age=60)
    )
    assert cors.allows("https://app.example") and cors.allows("HTTPS://APP.EXAMPLE")
    assert cors.allows("https://a.b.corp.example")
    for bad in (
        "https://evil.example",
        "https://app.example.evil",
        "null",
        "https://corp.example",
        "https://x.corp.example.evil",
        "http://app.example",
    ):
        assert not cors.allows(bad), bad
    answer = cors.preflight(
        "https://app.example",
        "POST",
        "Authorization, content-type, X-Stainless-OS, x-stainless-retry-count, x-evil",
    )
    assert answer["Access-Control-Allow-Origin"] == "https://app.example"
    assert answer["Access-Control-Max-Age"] == "60"
    assert answer["Access-Control-Allow-Headers"] == (
        "authorization, content-type, x-stainless-os, x-stainless-retry-count"
    )
    assert "Access-Control-Allow-Credentials" not in answer
    with pytest.raises(CorsRefused):
        cors.preflight("https://app.example", "CONNECT", "")
    with pytest.raises(CorsRefused):
        cors.preflight("https://evil.example", "POST", "")
    anyone = CorsPolicy.from_config(CorsConfig(origins=("*",)))
    assert anyone.allows("https://whatever.example") and not anyone.allows("null")
