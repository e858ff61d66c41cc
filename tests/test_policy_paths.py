"""Canonical paths (pure): one spelling per route, or 400. See gateway/policy/paths.py."""

from __future__ import annotations

import pytest

from gateway.policy.paths import SAFE_CHARS, PathError, canonical_path


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/", "/"),
        ("/api/chat", "/api/chat"),
        ("/api/chat/", "/api/chat"),
        ("//api//chat//", "/api/chat"),
        ("///", "/"),
        ("/api/%63hat", "/api/chat"),  # Go decodes before routing: so do we
        ("/%61%70%69/pull", "/api/pull"),
        ("/API/Chat", "/API/Chat"),  # case kept; the route table compares case-insensitively
        ("/api/blobs/sha256:abc", "/api/blobs/sha256:abc"),
        ("/api/blobs/sha256%3Aabc", "/api/blobs/sha256:abc"),
        ("/v1/models/llama3.2:latest", "/v1/models/llama3.2:latest"),
        ("/v1/models/x%40y", "/v1/models/x@y"),
        ("http://evil.example/api/pull", "/api/pull"),  # absolute-form: authority ignored
        ("HTTP://evil.example:80/api//pull/", "/api/pull"),
        ("http://evil.example", "/"),
        ("https://h/api/%70ull", "/api/pull"),
        ("/a-b_c~d.e", "/a-b_c~d.e"),
    ],
)
def test_canonical_forms(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == canonical
    assert canonical_path(canonical) == canonical  # idempotent: forwarded form is stable


@pytest.mark.parametrize(
    "raw",
    [
        "/api/../api/pull",
        "/v1/../api/pull",
        "/api/./pull",
        "/./api/pull",
        "/..",
        "/v1/%2e%2e/api/pull",
        "/v1/%2E%2E/api/pull",
        "/v1/.%2e/api/pull",
        "/api/%2e/pull",
        "/api%2Fpull",
        "/api%2fpull",
        "/v1/..%2Fapi/pull",
        "/api/pull%00",
        "/api/pull%00.json",
        "/api/pu%0all",
        "/api/pull;x=1",
        "/api;/pull",
        "/api/pull%3B",
        "/api\\pull",
        "/api%5Cpull",
        "/v1\\..\\api\\pull",
        "/api/%2570ull",  # double encoding: %25 decodes to a literal '%'
        "/api/pull#frag",
        "/api/pull%23",
        "/api/pull%20",
        "/api/pu ll",
        "/api/p%C3%BCll",
        "/api/p\u00fcll",
        "/api/pull%",
        "/api/pull%2",
        "/api/pull%zz",
        "*",
        "api/pull",
        "evil.example:80",
        "http//x/api/pull",
        "http://x?/api/pull",
    ],
)
def test_ambiguous_or_unsafe_paths_are_refused(raw: str) -> None:
    with pytest.raises(PathError):
        canonical_path(raw)


def test_overlong_path_is_refused() -> None:
    with pytest.raises(PathError):
        canonical_path("/" + "a" * 5000)


def test_canonical_output_needs_no_encoding() -> None:
    # The relay forwards ctx.path verbatim: every character must be a literal path char.
    every_escape = "".join(f"%{b:02X}" for b in range(0x21, 0x7F) if chr(b) != "/")
    for raw in (f"/x/{every_escape}",):
        with pytest.raises(PathError):
            canonical_path(raw)
    safe = "".join(sorted(SAFE_CHARS - {"."}))
    assert canonical_path("/" + "".join(f"%{ord(c):02x}" for c in safe)) == "/" + safe
