"""A strict multipart/form-data reader for one job: every value of the `model` field. Pure.

Ollama reads `/v1/audio/transcriptions` with Go's mime/multipart. A lenient parser here
and a different one upstream could disagree on where parts start and so on the model
(a "parser differential"). This one accepts only what both read the same way and answers
400 otherwise: the body starts with its boundary, CRLF line ends, a delimiter counts only
where Go's counts (followed by `--`, space, tab or a line end), no header folding, no
duplicate or RFC 2231 parameters, no Content-Transfer-Encoding on a model part.
"""

from __future__ import annotations

from gateway.policy.fields import BodyError

_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_MAX_BOUNDARY = 70  # RFC 2046


def parse_params(value: str) -> tuple[str, dict[str, str]]:
    """`type/sub; a=b; c="d"` -> ("type/sub", {"a": "b", "c": "d"}), strictly like Go's."""
    head, _, rest = value.partition(";")
    kind = head.strip().lower()
    if not kind or not _TOKEN.issuperset(kind.replace("/", "")):
        raise BodyError("malformed media type")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while True:
        while i < n and rest[i] in " \t":
            i += 1
        if i >= n:
            return kind, params
        start = i
        while i < n and rest[i] in _TOKEN:
            i += 1
        name = rest[start:i].lower()
        if not name or i >= n or rest[i] != "=":
            raise BodyError("malformed media type parameter")
        if "*" in name:  # RFC 2231 continuations/charsets: another way to spell "model"
            raise BodyError("extended media type parameters are not supported")
        i += 1
        if i < n and rest[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(rest[i])
                i += 1
            if i >= n:
                raise BodyError("unterminated quoted string in media type")
            i += 1
            param = "".join(chars)
        else:
            start = i
            while i < n and rest[i] in _TOKEN:
                i += 1
            param = rest[start:i]
            if not param:
                raise BodyError("malformed media type parameter")
        if name in params:
            raise BodyError("duplicate media type parameter")
        params[name] = param
        while i < n and rest[i] in " \t":
            i += 1
        if i < n:
            if rest[i] != ";":
                raise BodyError("malformed media type parameter")
            i += 1


def form_values(content_type: str, body: bytes, field: str) -> list[str]:
    """Every value of form field `field` (compared case-insensitively), in order."""
    kind, params = parse_params(content_type)
    if kind != "multipart/form-data":
        raise BodyError("expected a multipart/form-data body")
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > _MAX_BOUNDARY or not boundary.isascii():
        raise BodyError("multipart boundary missing or invalid")
    dash = b"--" + boundary.encode("ascii")
    if not body.startswith(dash):
        raise BodyError("multipart body must start with its boundary")
    data = b"\r\n" + body
    delimiter = b"\r\n" + dash
    found: list[str] = []
    position = 0  # where the current delimiter starts in `data`
    while True:
        after = position + len(delimiter)
        if data.startswith(b"--", after):
            return found  # the closing delimiter; Go ignores the epilogue too
        line_end = data.find(b"\r\n", after)
        if line_end < 0 or data[after:line_end].strip(b" \t"):
            raise BodyError("malformed multipart delimiter line")
        content_start, headers = _read_headers(data, line_end + 2, delimiter)
        position = _next_delimiter(data, content_start, delimiter)
        disposition = headers.get("content-disposition")
        if disposition is None:
            continue
        try:
            kind, params = parse_params(disposition)
        except BodyError:
            if field in disposition.casefold():
                raise  # cannot tell whether Go would read this part as the field
            continue
        if kind != "form-data" or params.get("name", "").casefold() != field:
            continue
        if "content-transfer-encoding" in headers:  # Go decodes quoted-printable
            raise BodyError(f"Content-Transfer-Encoding is not supported on the {field} part")
        try:
            found.append(data[content_start:position].decode("utf-8"))
        except UnicodeDecodeError:
            raise BodyError(f"{field} must be UTF-8") from None


def _read_headers(data: bytes, start: int, delimiter: bytes) -> tuple[int, dict[str, str]]:
    if data.startswith(b"\r\n", start):
        return start + 2, {}
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        raise BodyError("multipart part headers do not end")
    block = data[start:end]
    if delimiter in block:
        raise BodyError("multipart part headers do not end")
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        if b"\r" in line or b"\n" in line or line[:1] in (b" ", b"\t"):
            raise BodyError("malformed multipart part header")  # bare CR/LF, folding
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN.issuperset(name.decode("latin-1")):
            raise BodyError("malformed multipart part header")
        key = name.decode("ascii").lower()
        if key in headers and key in ("content-disposition", "content-transfer-encoding"):
            raise BodyError(f"duplicate {key} header in a multipart part")
        headers[key] = value.strip(b" \t").decode("utf-8", "surrogateescape")
    return end + 4, headers


def _next_delimiter(data: bytes, start: int, delimiter: bytes) -> int:
    """Where the part that starts at `start` ends, as Go's multipart reader finds it."""
    search = start
    while True:
        found = data.find(delimiter, search)
        if found < 0:
            raise BodyError("multipart body ends without its closing boundary")
        after = found + len(delimiter)
        if data[after : after + 1] in (b" ", b"\t", b"\r", b"\n") or data.startswith(b"--", after):
            return found
        search = found + 1  # `--boundaryX...` inside content is data, for Go as well
