"""Canonical request paths: the one form that is both authorised and forwarded.

Ollama (Go's net/http + gin) percent-decodes the path before routing, so `/api/%70ull` *is*
`/api/pull` upstream. Deciding on one spelling and forwarding another is the classic proxy
bypass; here every path is reduced to a single form, or refused with 400 when its meaning
is ambiguous. The result only holds characters that need no encoding in a path, so the relay
can forward it verbatim.

Rules (see docs/policy.md):
- absolute-form targets (`http://host/api/pull`) are reduced to their path; the authority
  is ignored (the gateway, not the client, names the upstream);
- every `%XX` is decoded once; a decoded byte outside the safe set (`/`, `\\`, NUL,
  controls, `%`, `;`, `?`, `#`, space, non-ASCII...) is refused;
- empty segments (`//`, trailing `/`) are dropped; `.` and `..` segments are refused;
- case is kept (the route table compares case-insensitively, see `routes.py`).
"""

from __future__ import annotations

import re

# RFC 3986 pchar minus ';' (matrix params that some servers strip) and '%' (already decoded):
# a path made only of these is valid as-is and means the same to every parser.
SAFE_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~:@!$&'()*+,="
)
MAX_PATH_LENGTH = 4096
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*(.*)", re.DOTALL)
_HEX = frozenset("0123456789abcdefABCDEF")


class PathError(ValueError):
    """The request target cannot be given one unambiguous meaning (answered with 400)."""


def canonical_path(target: str) -> str:
    """The canonical form of a request path (no query), or PathError."""
    if not target.startswith("/"):
        absolute = _ABSOLUTE_FORM.fullmatch(target)
        if absolute is None:  # asterisk-form, authority-form, garbage
            raise PathError("unsupported request target")
        # Absolute-form: only the path counts; the client's authority must not matter.
        target = absolute.group(1) or "/"
        if not target.startswith("/"):
            raise PathError("unsupported request target")
    if len(target) > MAX_PATH_LENGTH:
        raise PathError("path too long")
    segments: list[str] = []
    for raw in target.split("/"):
        if not raw:
            continue  # '//' and a trailing '/' collapse: one spelling per route
        segment = _decode_segment(raw) if "%" in raw else raw
        if not SAFE_CHARS.issuperset(segment):
            # Defends against %2F (a '/' the upstream sees but the rule did not), %00,
            # backslashes (Windows-style separators), ';params', '#', double encoding.
            raise PathError("unsupported character in path")
        if segment in (".", ".."):
            raise PathError("dot segments are not allowed in paths")
        segments.append(segment)
    return "/" + "/".join(segments)


def loggable_target(target: str) -> str:
    """A refused target as it may be logged: an absolute-form's authority dropped.

    `http://user:password@host/...` carries credentials in its userinfo; the access log
    records the path of every request, refused ones included.
    """
    absolute = _ABSOLUTE_FORM.fullmatch(target)
    if absolute is not None:
        return absolute.group(1) or "/"
    # Authority-form (`CONNECT user:pw@host:443`) and other garbage: not worth a log field.
    return target if target.startswith("/") or target == "*" else "-"


def _decode_segment(raw: str) -> str:
    """Strict single percent-decoding: every '%' must start a valid escape."""
    out: list[str] = []
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "%":
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or not _HEX.issuperset(pair):
                raise PathError("malformed percent-encoding in path")
            out.append(chr(int(pair, 16)))  # bytes >= 0x80 fail the SAFE_CHARS check
            i += 3
        else:
            out.append(char)
            i += 1
    return "".join(out)


UPSTREAM_PREFIX = "/upstreams/"


def split_upstream_prefix(path: str) -> tuple[str, str | None]:
    """`/upstreams/NAME/api/pull` -> (`/api/pull`, NAME); other paths -> (path, None).

    Applied to the canonical path, so the policy judges and the relay forwards the path
    without the prefix (a non-admin is refused `/upstreams/x/api/pull` as `/api/pull`).
    """
    if not path.lower().startswith(UPSTREAM_PREFIX):
        return path, None
    name, _, tail = path[len(UPSTREAM_PREFIX) :].partition("/")
    if not name:
        return path, None
    return "/" + tail, name
